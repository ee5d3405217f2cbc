"""Pieces of the browser test: a real ``mlflow server``, headless Chromium, polling."""

from __future__ import annotations

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
