"""The state dir deleted under a running controller (issue #18, item 3).

Before: the LRs stayed exact, but the directory was never made again: the journal
and the log went on into deleted files, ``lrctl decisions`` found no run, and the
MLflow run stayed RUNNING. Now the controller notices within its housekeeping second,
makes the directory again (0700, never through a symlink), writes each open run's
journal back from the files it still holds open, reopens its log, says so in the log
and in ``lrctl status``, and the run's MLflow run ends with every decision once.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from daemon_helpers import REPO, ControllerProc
from rel_helpers import FIGURES, store_client, until, until_shipped

import lrctl
from lrctl.client import request

QUIET = "version: 1\npolicies:\n  - kind: plateau\n    metric: loss\n    patience: 100000\n"


def test_state_dir_deleted_mid_run_comes_back_with_the_whole_journal(
        make_controller: Callable[..., ControllerProc], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    from sinks_helpers import assert_exactly_once, mlflow_run_id

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)
    controller = make_controller(audit=True)
    state = Path(os.environ["LRCTL_STATE_DIR"])
    opt = torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=0.1)
    made: list[dict] = []
    with lrctl.attach(opt, policy=QUIET, sync=True, spawn=False) as ctl:
        key = ctl.run_key

        def phase(rounds: int) -> None:
            for _ in range(rounds):
                for _ in range(5):
                    ctl.step(1.0, grad_norm=1.0)
                lr = 0.01 * (len(made) + 1)
                made.append(request({"t": "set_lr", "run": key, "lr": lr})["decision"])
                ctl.step(1.0, grad_norm=1.0)
                assert ctl.lr == [lr]

        phase(3)
        shutil.rmtree(state)
        phase(3)  # the run goes on, its LRs exact
        until("the state dir to come back", lambda: bool(
            request({"t": "status"}).get("state_dir_recreated")))
        assert stat.S_IMODE(os.lstat(state).st_mode) == 0o700
        # Its lock came back with it: no second controller can take the directory now.
        other = subprocess.run([sys.executable, "-m", "lrctl", "serve", "--foreground",
                                "--no-audit", "--socket", str(state.parent / "o.sock"),
                                "--state-dir", str(state)], capture_output=True, text=True,
                               cwd=REPO, timeout=60)
        assert other.returncode == 3 and "state directory" in other.stderr, other.stderr
        status = subprocess.run([sys.executable, "-m", "lrctl", "status"], capture_output=True,
                                text=True, cwd=REPO, timeout=60)
        assert "state dir was deleted and recreated 1 time(s)" in status.stdout, status.stdout
        phase(2)
        out = subprocess.run([sys.executable, "-m", "lrctl", "decisions", key, "--json",
                              "--state-dir", str(state)], capture_output=True, text=True,
                             cwd=REPO, timeout=60)
        assert out.returncode == 0, out.stderr
        listed = [json.loads(line) for line in out.stdout.splitlines()]
        assert [(r["seq"], r["new_lrs"]) for r in listed] == [
            (i + 1, d["new_lrs"]) for i, d in enumerate(made)]
    log = (state / "controller.log").read_text()
    assert "recreated" in log
    client = store_client(uri)

    until_shipped(client, state, key, len(made))
    controller.stop()
    uploaded = assert_exactly_once(client, mlflow_run_id(state, key), state, key, tmp_path)
    FIGURES["state dir deleted"] = {"decisions": len(made), "journal": len(listed),
                                    "mlflow": len(uploaded)}
