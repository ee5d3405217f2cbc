"""Pieces of the browser test: a real ``mlflow server``, headless Chromium, polling."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from mlflow_server import MlflowServer, free_port  # noqa: F401 (re-exported)

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
T = TypeVar("T")


def wait_for(what: str, probe: Callable[[], T | None], timeout: float = 120.0,
             interval: float = 0.5) -> T:
    """Poll ``probe`` until it returns something; fail saying ``what`` never came."""
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = probe()
        except Exception as exc:  # the server may still be writing: try again
            last_error = exc
            value = None
        if value is not None:
            return value
        time.sleep(interval)
    raise AssertionError(f"{what} did not appear within {timeout:.0f}s"
                         + (f" (last error: {last_error!r})" if last_error else ""))


def chromium(profile_dir: Path, width: int = 1400, height: int = 1000) -> Any:
    """Headless Chromium through the Debian chromedriver (Selenium Manager never runs:
    both paths are given, so nothing is downloaded)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic",
                "--no-first-run", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
                f"--user-data-dir={profile_dir}", f"--window-size={width},{height}"):
        options.add_argument(arg)
    service = Service(executable_path=str(CHROMEDRIVER))
    return webdriver.Chrome(options=options, service=service)


def body_text(driver: Any) -> str:
    from selenium.webdriver.common.by import By

    return str(driver.find_element(By.TAG_NAME, "body").text)


def wait_for_text(driver: Any, *needles: str, timeout: float = 60.0) -> str:
    """The page text once it contains every needle (the UI renders asynchronously)."""
    def probe() -> str | None:
        text = body_text(driver)
        return text if all(n in text for n in needles) else None
    try:
        return wait_for(f"page text {needles}", probe, timeout=timeout, interval=0.25)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\npage at {driver.current_url}:\n"
                             f"{body_text(driver)[:3000]}") from None


def shown_with_text(driver: Any, text: str, timeout: float = 60.0) -> Any:
    """The last visible element whose own text is exactly ``text`` (the last: the
    artifact tree comes after the sidebar and breadcrumbs, which may say it too)."""
    from selenium.webdriver.common.by import By

    def probe() -> Any:
        shown = [e for e in driver.find_elements(
            By.XPATH, f"//*[normalize-space(text())='{text}']") if e.is_displayed()]
        return shown[-1] if shown else None
    return wait_for(f"a visible {text!r}", probe, timeout=timeout, interval=0.25)


def click_text(driver: Any, text: str, timeout: float = 60.0) -> None:
    shown_with_text(driver, text, timeout).click()


def scroll_to_text(driver: Any, text: str, timeout: float = 60.0) -> None:
    """Scroll the element saying ``text`` to the top of its scrolling pane."""
    element = shown_with_text(driver, text, timeout)
    driver.execute_script("arguments[0].scrollIntoView({block: 'start'});", element)


def close_assistant(driver: Any) -> None:
    """The MLflow 3 UI opens an assistant panel beside the run: close it for the pictures."""
    from selenium.webdriver.common.by import By

    for button in driver.find_elements(By.CSS_SELECTOR, "button[aria-label='Close']"):
        if button.is_displayed():
            button.click()
            return


def screenshot(driver: Any, name: str, tmp_path: Path, repo: Path) -> Path:
    """Into ``$LRCTL_SCREENSHOTS_DIR`` (relative to ``repo``) when set, else ``tmp_path``."""
    out_dir = Path(os.environ.get("LRCTL_SCREENSHOTS_DIR") or tmp_path)
    if not out_dir.is_absolute():
        out_dir = repo / out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / name
    assert driver.save_screenshot(str(path)), f"screenshot {path} failed"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return path
