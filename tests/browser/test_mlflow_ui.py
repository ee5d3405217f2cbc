"""The MLflow UI answers "why did the LR change?", checked in a real browser.

A short training run (examples/train_plain.py) talks to a real controller
that ships its audit trail to a real ``mlflow server``; headless Chromium then
opens the run page and must show the ``lrctl/lr/g0`` chart on the model-metrics
tab and the decision records in ``lrctl/decisions.jsonl`` on the artifacts tab.

Screenshots go to the test's temporary directory, or to
``$LRCTL_SCREENSHOTS_DIR`` when set: ``LRCTL_SCREENSHOTS_DIR=docs pytest
tests/browser`` refreshes docs/mlflow-run.png and docs/mlflow-decisions.png.
"""

from __future__ import annotations

import gc
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from browser_helpers import CHROMEDRIVER, CHROMIUM, MlflowServer, chromium, wait_for
from live_controller import REPO, live_controller, subprocess_env

HAVE_BROWSER = CHROMIUM.exists() and CHROMEDRIVER.exists()
# .ci/run installs chromium and sets LRCTL_REQUIRE_BROWSER: there, a missing browser fails.
pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not HAVE_BROWSER and not os.environ.get("LRCTL_REQUIRE_BROWSER"),
                       reason=f"needs {CHROMIUM} and {CHROMEDRIVER} (apt-get install chromium "
                              "chromium-driver; .ci/run installs them)"),
]

# The default policy's stages, tightened so that a 400-step run makes several
# decisions worth looking at: the range test ends, then plateau cuts follow.
POLICY = """\
version: 1
policies:
  - kind: rangetest
  - kind: divergence
  - kind: plateau
    smoothing: ema
    smoothing_window: 20
    factor: 0.5
    patience: 25
    threshold: 0.1
    cooldown: 25
"""
UI_TIMEOUT_S = 60.0


@pytest.fixture
def mlflow_server(tmp_path: Path) -> Iterator[MlflowServer]:
    server = MlflowServer(tmp_path / "mlflow").start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Any]:
    driver = chromium(tmp_path / "chromium-profile", width=1600, height=1200)
    try:
        yield driver
    finally:
        driver.quit()


def shipped_run(client: Any, decisions: int) -> tuple[str, str] | None:
    """``(experiment_id, run_id)`` once the run's LR metric and at least ``decisions``
    decisions are in MLflow (the ``lrctl.decisions`` tag counts those shipped)."""
    experiment = client.get_experiment_by_name("lrctl")
    if experiment is None:
        return None
    for run in client.search_runs([experiment.experiment_id]):
        run_id = run.info.run_id
        if int(run.data.tags.get("lrctl.decisions", "0")) < decisions:
            continue
        paths = {a.path for a in client.list_artifacts(run_id, "lrctl")}
        if "lrctl/decisions.jsonl" in paths and client.get_metric_history(run_id,
                                                                         "lrctl/lr/g0"):
            return experiment.experiment_id, run_id
    return None


def body_text(driver: Any) -> str:
    from selenium.webdriver.common.by import By

    return str(driver.find_element(By.TAG_NAME, "body").text)


def wait_for_text(driver: Any, *needles: str) -> str:
    """The page text once it contains every needle (the UI renders asynchronously)."""
    def probe() -> str | None:
        text = body_text(driver)
        return text if all(n in text for n in needles) else None
    try:
        return wait_for(f"page text {needles}", probe, timeout=UI_TIMEOUT_S, interval=0.25)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\npage at {driver.current_url}:\n"
                             f"{body_text(driver)[:3000]}") from None


def click_text(driver: Any, text: str) -> None:
    """Click the last visible element whose own text is exactly ``text`` (the last: the
    artifact tree comes after the sidebar and breadcrumbs, which may say it too)."""
    from selenium.webdriver.common.by import By

    def probe() -> Any:
        shown = [e for e in driver.find_elements(
            By.XPATH, f"//*[normalize-space(text())='{text}']") if e.is_displayed()]
        return shown[-1] if shown else None
    wait_for(f"a clickable {text!r}", probe, timeout=UI_TIMEOUT_S, interval=0.25).click()


def close_assistant(driver: Any) -> None:
    """The MLflow 3 UI opens an assistant panel beside the run: close it for the pictures."""
    from selenium.webdriver.common.by import By

    for button in driver.find_elements(By.CSS_SELECTOR, "button[aria-label='Close']"):
        if button.is_displayed():
            button.click()
            return


def screenshot(driver: Any, name: str, tmp_path: Path) -> Path:
    out_dir = Path(os.environ.get("LRCTL_SCREENSHOTS_DIR") or tmp_path)
    if not out_dir.is_absolute():
        out_dir = REPO / out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / name
    assert driver.save_screenshot(str(path)), f"screenshot {path} failed"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return path


def test_lr_chart_and_decisions_visible_in_mlflow_ui(
        mlflow_server: MlflowServer, browser: Any, tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY)
    workdir = tmp_path / "work"
    workdir.mkdir()
    with live_controller(audit=True) as ctl:
        proc = subprocess.run(
            [sys.executable, str(REPO / "examples" / "train_plain.py"), "--steps", "400",
             "--policy", str(policy)],
            cwd=workdir, env=subprocess_env(ctl, MLFLOW_TRACKING_URI=mlflow_server.uri),
            capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
        printed = [(int(step), policy, action) for step, policy, action in re.findall(
            r"^  step (\d+): (\S+) (\S+): ", proc.stdout, flags=re.MULTILINE)]
        assert len(printed) >= 2, f"the policy should have made several decisions: {proc.stdout}"
        client = MlflowClient(tracking_uri=mlflow_server.uri)
        try:
            experiment_id, run_id = wait_for("the run's LR metric and decisions in MLflow",
                                             lambda: shipped_run(client, len(printed)),
                                             timeout=120.0)
        except AssertionError as exc:
            runs = [(r.info.run_id, r.info.status, r.data.tags)
                    for e in client.search_experiments()
                    for r in client.search_runs([e.experiment_id])]
            raise AssertionError(f"{exc}\nprinted: {printed}\nruns: {runs}\ncontroller log:\n"
                                 f"{ctl.log.read_text()[-3000:]}") from None
        ctl.stop()  # the decisions are shipped; the rest of the test is the UI

    def uploaded() -> list[dict[str, Any]] | None:
        download_dir = tmp_path / "download"
        local = client.download_artifacts(run_id, "lrctl/decisions.jsonl", str(download_dir))
        records = [json.loads(line) for line in Path(local).read_text().splitlines()]
        shutil.rmtree(download_dir)
        # MLflow's artifact repository starts a thread pool it never shuts down;
        # collecting the repository ends it (the suite's leak guard checks).
        gc.collect()
        return records if len(records) >= len(printed) else None

    decisions = wait_for("the decisions artifact", uploaded, timeout=120.0)
    # What the script printed is what it had received; a decision answering one of
    # the last observations may reach MLflow after the script printed its list.
    assert [(d["step"], d["policy"], d["action"]) for d in decisions][:len(printed)] == printed

    run_url = f"{mlflow_server.uri}/#/experiments/{experiment_id}/runs/{run_id}"

    # Model metrics: lrctl's LR chart (group 0), next to the loss it reacted to.
    browser.get(f"{run_url}/model-metrics")
    wait_for_text(browser, "lrctl/lr/g0", "lrctl/loss")
    close_assistant(browser)
    text = wait_for_text(browser, "lrctl/lr/g0")
    assert "train-plain" in text
    screenshot(browser, "mlflow-run.png", tmp_path)

    # Artifacts: the decision records, with their reasons, in lrctl/decisions.jsonl.
    browser.get(f"{run_url}/artifacts")
    wait_for_text(browser, "Select a file to preview")
    close_assistant(browser)
    click_text(browser, "lrctl")  # the folder, collapsed at first
    wait_for_text(browser, "decisions.jsonl", "policy.yaml")
    click_text(browser, "decisions.jsonl")
    first = decisions[0]
    wait_for_text(browser, "lrctl/decisions.jsonl", '"seq":1', f'"step":{first["step"]}',
                  f'"action":"{first["action"]}"')
    screenshot(browser, "mlflow-decisions.png", tmp_path)
