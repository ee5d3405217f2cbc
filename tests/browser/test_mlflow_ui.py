"""The MLflow UI tells the LR story at a glance, checked in a real browser.

Two runs of one training script (examples/train_plain.py), with two policies,
talk to a real controller that ships their audit trails to a real ``mlflow
server``; headless Chromium then reads the rendered pages:

* the run's Overview: lrctl's description, with the policy file, the decision
  counts and the latest decisions with their reasons;
* its link to the experiment, which opens the *Model training* runs table;
* the runs' charts side by side (``lrctl/lr/g0`` of both) and the compare page
  (``lrctl.policy_sha256`` of both, as params);
* the run's model metrics (``lrctl/lr/g0``, ``lrctl/event/<action>``);
* the decisions table artifact, rendered as rows.

Screenshots go to the test's temporary directory, or to
``$LRCTL_SCREENSHOTS_DIR`` when set: ``LRCTL_SCREENSHOTS_DIR=docs pytest
tests/browser`` refreshes docs/mlflow-*.png.
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from browser_helpers import (
    CHROMEDRIVER,
    CHROMIUM,
    MlflowServer,
    body_text,
    chromium,
    click_text,
    close_assistant,
    scroll_to_text,
    wait_for,
    wait_for_text,
)
from browser_helpers import screenshot as save_screenshot
from live_controller import REPO, LiveController, live_controller, subprocess_env

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
    factor: {factor}
    patience: 25
    threshold: 0.1
    cooldown: 25
"""
POLICIES = {"plateau-half.yaml": POLICY.format(factor=0.5),
            "plateau-quarter.yaml": POLICY.format(factor=0.25)}
RUN_NAME = "train-plain"  # the script's


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


def screenshot(driver: Any, name: str, tmp_path: Path) -> Path:
    return save_screenshot(driver, name, tmp_path, REPO)


def train(ctl: LiveController, policy: Path, workdir: Path,
          tracking_uri: str) -> list[tuple[int, str, str]]:
    """Run the example script; the decisions it printed: (step, policy, action)."""
    proc = subprocess.run(
        [sys.executable, str(REPO / "examples" / "train_plain.py"), "--steps", "400",
         "--policy", str(policy)],
        cwd=workdir, env=subprocess_env(ctl, MLFLOW_TRACKING_URI=tracking_uri),
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    printed = [(int(step), name, action) for step, name, action in re.findall(
        r"^  step (\d+): (\S+) (\S+): ", proc.stdout, flags=re.MULTILINE)]
    assert len(printed) >= 2, f"the policy should have made several decisions: {proc.stdout}"
    return printed


def finished_run(client: Any, sha256: str, decisions: int) -> Any:
    """The MLflow run of the policy ``sha256`` once lrctl has ended it (so its
    description, table and decisions file are final) with ``decisions`` shipped."""
    experiment = client.get_experiment_by_name("lrctl")
    if experiment is None:
        return None
    for run in client.search_runs([experiment.experiment_id],
                                  f"tags.`lrctl.policy_sha256` = '{sha256}'"):
        if (run.info.status == "FINISHED"
                and int(run.data.tags.get("lrctl.decisions", "0")) >= decisions):
            return run
    return None


def load_decisions_table(client: Any, experiment_id: str, run_id: str) -> Any:
    import mlflow

    mlflow.set_tracking_uri(client.tracking_uri)  # load_table searches runs fluently
    try:
        return client.load_table(experiment_id, "lrctl/decisions_table.json",
                                 run_ids=[run_id])
    finally:
        mlflow.set_tracking_uri(None)
        # MLflow's artifact repositories start thread pools they never shut down;
        # collecting them ends the threads (the suite's leak guard checks).
        gc.collect()


def test_the_mlflow_ui_tells_the_lr_story(mlflow_server: MlflowServer, browser: Any,
                                          tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=mlflow_server.uri)
    workdir = tmp_path / "work"
    workdir.mkdir()
    runs: dict[str, Any] = {}
    printed: dict[str, list[tuple[int, str, str]]] = {}
    with live_controller(audit=True) as ctl:
        for name, text in POLICIES.items():
            (tmp_path / name).write_text(text)
            printed[name] = train(ctl, tmp_path / name, workdir, mlflow_server.uri)
        for name, text in POLICIES.items():
            sha = hashlib.sha256(text.encode()).hexdigest()
            try:
                runs[name] = wait_for(f"the finished run of {name} in MLflow",
                                      lambda sha=sha, name=name: finished_run(
                                          client, sha, len(printed[name])), timeout=120.0)
            except AssertionError as exc:
                raise AssertionError(f"{exc}\nprinted: {printed}\ncontroller log:\n"
                                     f"{ctl.log.read_text()[-3000:]}") from None
        ctl.stop()  # everything is shipped; the rest of the test is MLflow and the UI

    # Through the API first: what the pages below are drawn from.
    experiment = client.get_experiment_by_name("lrctl")
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    exp_id = experiment.experiment_id
    first, second = (runs[name] for name in POLICIES)
    shas = {name: hashlib.sha256(text.encode()).hexdigest() for name, text in POLICIES.items()}
    for name, run in runs.items():
        assert run.data.params["lrctl.policy_sha256"] == shas[name]
        assert run.data.params["lrctl.policy"].endswith(name)
    table = load_decisions_table(client, exp_id, first.info.run_id)
    rows = list(table.itertuples(index=False))
    # What the script printed is what it had received; a decision answering one of
    # the last observations may reach MLflow after the script printed its list.
    assert [(r.step, r.policy, r.action) for r in rows][:len(printed["plateau-half.yaml"])] \
        == printed["plateau-half.yaml"]
    run_url = f"{mlflow_server.uri}/#/experiments/{exp_id}/runs/{first.info.run_id}"
    # The sidebar's GenAI / Model training switch picks the view (GenAI unless the
    # browser chose otherwise or the URL says): the pages below as a trainer sees them.
    training = "?workflowType=machine_learning"

    # Overview: the description summarises the run, newest decision (and its reason) first.
    latest = rows[-1]
    browser.get(run_url + training)
    wait_for_text(browser, "lrctl · policy plateau-half.yaml, sha256 "
                  f"{shas['plateau-half.yaml'][:12]} · {len(rows)} decisions:",
                  " ".join(latest.reason.split())[:60])
    close_assistant(browser)
    scroll_to_text(browser, "Description")
    click_text(browser, "Show more")
    first_row = rows[0]
    wait_for_text(browser, f"{first_row.step} {first_row.policy} {first_row.action}")
    screenshot(browser, "mlflow-overview.png", tmp_path)

    # Its link opens the experiment in the Model training runs table (a new tab).
    click_text(browser, "training runs of this experiment")
    wait_for("the link's tab", lambda: len(browser.window_handles) == 2 or None)
    browser.switch_to.window(browser.window_handles[-1])
    text = wait_for_text(browser, "2 matching runs", "Run Name", RUN_NAME)
    assert f"/experiments/{exp_id}/runs" in browser.current_url
    assert "workflowType=machine_learning" in browser.current_url
    assert "Evaluation runs" not in text  # the GenAI view's tab is not there

    # The two runs' charts side by side: each policy's LR curve.
    browser.get(f"{mlflow_server.uri}/#/experiments/{exp_id}/runs"
                "?workflowType=machine_learning&compareRunsMode=CHART")
    close_assistant(browser)
    scroll_to_text(browser, "lrctl/event")
    wait_for("both runs' lrctl/lr/g0 in one chart",
             lambda: body_text(browser).count(f"{RUN_NAME} (lrctl/lr/g0)") == 2 or None,
             timeout=60.0, interval=0.25)
    screenshot(browser, "mlflow-compare.png", tmp_path)

    # The compare page: the policy each run started with, as params.
    run_ids = json.dumps([first.info.run_id, second.info.run_id])
    browser.get(f"{mlflow_server.uri}/#/compare-runs?runs={run_ids}"
                f"&experiments={json.dumps([exp_id])}")
    wait_for_text(browser, "lrctl.policy_sha256", *shas.values(), *POLICIES)

    # Model metrics: a chart per kind of decision, points where it acted, above the
    # LR chart (group 0). Charts are drawn as they scroll into view.
    browser.get(f"{run_url}/model-metrics{training}")
    wait_for_text(browser, "lrctl/event", "lrctl/lr", f"{RUN_NAME} (lrctl/loss)")
    close_assistant(browser)
    scroll_to_text(browser, "lrctl/event")
    wait_for_text(browser, f"{RUN_NAME} (lrctl/lr/g0)",
                  *(f"{RUN_NAME} (lrctl/event/{action})" for action in {r.action for r in rows}))
    screenshot(browser, "mlflow-run.png", tmp_path)

    # Artifacts: the decisions table renders as rows, reasons included.
    browser.get(f"{run_url}/artifacts{training}")
    wait_for_text(browser, "Select a file to preview")
    close_assistant(browser)
    click_text(browser, "lrctl")  # the folder, collapsed at first
    wait_for_text(browser, "decisions_table.json", "decisions.jsonl", "policy.yaml")
    click_text(browser, "decisions_table.json")
    wait_for_text(browser, "old_lr", "new_lr", "reason", first_row.reason[:60],
                  latest.reason[:60])
    screenshot(browser, "mlflow-decisions.png", tmp_path)
