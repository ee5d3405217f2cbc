"""Which MLflow store a run goes to when its script names none: the controller's
``MLFLOW_TRACKING_URI`` if an operator gave ``lrctl serve`` one, else MLflow's default in
the script's directory; never the store of the script whose ``attach()`` started the
controller.

A newcomer's find: a controller started by a script with ``MLFLOW_TRACKING_URI``
inherited it and, serving later scripts for minutes, put their runs into that store,
while ``lrctl demo`` said "./mlflow.db". Real controllers, real sqlite stores; the
scripts import no mlflow (their hooks then look at their environment alone).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from daemon_helpers import ControllerProc, until
from mlflow.tracking import MlflowClient
from sqlite_store import made_sqlite_store

import lrctl
from lrctl._spawn import spawned_env

SCRIPT = ("import sys, torch, lrctl\n"
          "opt = torch.optim.SGD([torch.nn.Parameter(torch.ones(2))], lr=0.1)\n"
          "with lrctl.attach(opt, socket=sys.argv[1], spawn=False, run_name='mine') as c:\n"
          "    for step in range(5):\n"
          "        c.step(1.0 / (step + 1)); opt.step()\n"
          "assert 'mlflow' not in sys.modules\n")


def _script_naming_no_store(socket: str, cwd: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    out = subprocess.run([sys.executable, "-c", SCRIPT, socket], cwd=cwd, env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr


def _mine(client: MlflowClient) -> list[object]:
    return client.search_runs([e.experiment_id for e in client.search_experiments()],
                              filter_string="tags.mlflow.runName = 'mine'")


def test_a_controller_a_script_started_does_not_take_its_store_along(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        reap_spawned: None) -> None:
    script_dir = tmp_path / "script"
    script_dir.mkdir()
    _, client = made_sqlite_store(script_dir)  # MLflow's default store for that script
    theirs, _ = made_sqlite_store(tmp_path)  # the first script's
    monkeypatch.setenv("MLFLOW_TRACKING_URI", theirs)
    assert "MLFLOW_TRACKING_URI" not in spawned_env()
    opt = torch.optim.SGD([torch.nn.Parameter(torch.ones(2))], lr=0.1)
    with lrctl.attach(opt, spawn=True, run_name="first") as ctl:  # starts the controller
        ctl.step(1.0)
        opt.step()
    _script_naming_no_store(os.environ["LRCTL_SOCKET"], script_dir)
    assert len(until(lambda: _mine(client), "the run in the script's own store")) == 1


def test_an_operators_tracking_uri_is_the_default_of_scripts_naming_none(
        make_controller, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """A controller on a host serving jobs in containers (over TCP): an operator's
    ``MLFLOW_TRACKING_URI`` for ``lrctl serve`` gathers the runs of scripts that name
    no store."""
    script_dir = tmp_path / "script"
    script_dir.mkdir()
    operators, client = made_sqlite_store(tmp_path)
    proc: ControllerProc = make_controller(
        env=dict(os.environ, MLFLOW_TRACKING_URI=operators), audit=True)
    _script_naming_no_store(proc.socket, script_dir)
    assert len(until(lambda: _mine(client), "the run in the operator's store")) == 1
    assert not (script_dir / "mlflow.db").exists()
