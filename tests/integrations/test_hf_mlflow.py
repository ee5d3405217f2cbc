"""MLflow across a resume, with the Trainer's own ``MLflowCallback`` and a real server.

The controller keeps a resumed lrctl run in the MLflow run it started with: the
interrupted job's, which that job (killed) left RUNNING. The Trainer opens a
new MLflow run on resume unless ``MLFLOW_RUN_ID`` says which one to reattach
to. The callback records the run it logs to in each checkpoint, warns with the
remedy when the Trainer's run differs, and with the remedy applied the Trainer
and lrctl log into one run, which ends FINISHED.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from live_controller import LiveController, live_controller, subprocess_env
from mlflow.tracking import MlflowClient
from mlflow_server import MlflowServer

JOB = Path(__file__).resolve().parent / "hf_job.py"
TIMEOUT_S = 240
EXITED = 3
STEPS = 16


def job(controller: LiveController, uri: str, out: Path, *extra: str, expect: int,
        **env: str) -> str:
    proc = subprocess.run(
        [sys.executable, str(JOB), str(out), "--steps", str(STEPS), "--save-steps", "4",
         "--lr-log", str(out.parent / "lrs.txt"), "--mlflow", *extra],
        env=subprocess_env(controller, MLFLOW_TRACKING_URI=uri,
                           DISABLE_MLFLOW_INTEGRATION="FALSE", **env),
        capture_output=True, text=True, timeout=TIMEOUT_S)
    output = proc.stdout + proc.stderr
    assert proc.returncode == expect, output[-4000:]
    return output


def saved_run(out: Path, step: int) -> str:
    state = json.loads((out / f"checkpoint-{step}" / "trainer_state.json").read_text())
    saved = state["stateful_callbacks"]["LrctlCallback"]["attributes"]["lrctl_checkpoint"]
    return str(saved["mlflow_run_id"])


@pytest.mark.slow
def test_a_resumed_job_can_keep_one_mlflow_run(tmp_path: Path) -> None:
    out = tmp_path / "out"
    server = MlflowServer(tmp_path / "mlflow").start()
    try:
        with live_controller(audit=True) as controller:  # audit: it ships to MLflow
            resume_into_one_run(controller, server, out)
    finally:
        server.stop()


def resume_into_one_run(controller: LiveController, server: MlflowServer, out: Path) -> None:
    client = MlflowClient(server.uri)
    job(controller, server.uri, out, "--exit-after-save", "8", expect=EXITED)
    first = saved_run(out, 8)  # the Trainer's run, which lrctl's run logs to
    assert client.get_run(first).info.status == "RUNNING"  # killed: never ended

    # Resumed as is: the Trainer opens a second run, and the callback says so.
    said = job(controller, server.uri, out, "--resume", "--exit-after-save", "12",
               expect=EXITED)
    assert f"MLFLOW_RUN_ID={first}" in said
    assert saved_run(out, 12) == first  # lrctl's run still logs to the first one

    # Resumed with the remedy: the Trainer reattaches to the first run.
    said = job(controller, server.uri, out, "--resume", expect=0, MLFLOW_RUN_ID=first)
    assert "MLFLOW_RUN_ID=" not in said
    run = client.get_run(first)
    assert run.info.status == "FINISHED"
    trainer_steps = {m.step for m in client.get_metric_history(first, "loss")}
    assert trainer_steps == set(range(1, 9)) | set(range(13, STEPS + 1))
    deadline = time.monotonic() + 120
    while True:  # the controller ships lrctl's metrics in the background
        lrctl_steps = {m.step for m in client.get_metric_history(first, "lrctl/lr/g0")}
        if max(lrctl_steps, default=0) > 12:
            break
        assert time.monotonic() < deadline, f"lrctl's LRs never reached the run: " \
                                            f"{sorted(lrctl_steps)}"
        time.sleep(0.2)
