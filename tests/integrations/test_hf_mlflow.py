"""MLflow across a resume, with the Trainer's own ``MLflowCallback`` and a real server.

The Trainer opens a new MLflow run on resume unless ``MLFLOW_RUN_ID`` says which one
to reattach to; the controller follows the Trainer's run: the resumed run gets the
whole lrctl history, and the interrupted job's run (which that job, killed, left
RUNNING) ends KILLED, tagged with the run followed. With ``MLFLOW_RUN_ID`` the Trainer
and lrctl keep logging into one run, which ends FINISHED.
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
def test_a_resumed_job_is_followed_into_the_trainers_new_mlflow_run(tmp_path: Path) -> None:
    out = tmp_path / "out"
    server = MlflowServer(tmp_path / "mlflow").start()
    try:
        with live_controller(audit=True) as controller:  # audit: it ships to MLflow
            first, second = resume_and_follow(controller, server, out)
        assert first != second
    finally:
        server.stop()


def lrctl_steps(client: MlflowClient, run_id: str, at_least: int) -> set[int]:
    """The steps of ``lrctl/lr/g0`` in the run, once the controller shipped past
    ``at_least`` (it ships in the background)."""
    deadline = time.monotonic() + 120
    while True:
        steps = {m.step for m in client.get_metric_history(run_id, "lrctl/lr/g0")}
        if max(steps, default=0) >= at_least:
            return steps
        assert time.monotonic() < deadline, f"lrctl's LRs never reached {run_id}: " \
                                            f"{sorted(steps)}"
        time.sleep(0.2)


def resume_and_follow(controller: LiveController, server: MlflowServer,
                      out: Path) -> tuple[str, str]:
    """The killed job's MLflow run and the one lrctl followed on resume."""
    client = MlflowClient(server.uri)
    job(controller, server.uri, out, "--exit-after-save", "8", expect=EXITED)
    first = saved_run(out, 8)  # the Trainer's run, which lrctl's run logs to
    assert client.get_run(first).info.status == "RUNNING"  # killed: never ended

    # Resumed as is: the Trainer opens a second run, and lrctl follows it.
    job(controller, server.uri, out, "--resume", "--exit-after-save", "12", expect=EXITED)
    second = saved_run(out, 12)
    assert second != first
    assert min(lrctl_steps(client, second, 12)) == 1  # the whole history, from step 1
    deadline = time.monotonic() + 120
    while client.get_run(first).info.status == "RUNNING":
        assert time.monotonic() < deadline, "the interrupted job's run was never ended"
        time.sleep(0.2)
    left = client.get_run(first)
    assert left.info.status == "KILLED"
    assert left.data.tags["lrctl.continued_in"] == second

    # Resumed with MLFLOW_RUN_ID: the Trainer reattaches to the second run; one run.
    job(controller, server.uri, out, "--resume", expect=0, MLFLOW_RUN_ID=second)
    run = client.get_run(second)
    assert run.info.status == "FINISHED"
    trainer_steps = {m.step for m in client.get_metric_history(second, "loss")}
    assert trainer_steps == set(range(9, STEPS + 1))
    assert max(lrctl_steps(client, second, STEPS)) == STEPS
    return first, second
