"""A run goes to its training script's MLflow store, never to the controller's.

A newcomer's find: a controller started with ``MLFLOW_TRACKING_URI`` in its environment
(or started by a script that had it: the controller inherits the script's environment,
and serves later scripts for minutes) put the runs of a script that set no store into
its own, while the README (and ``lrctl demo``'s "your runs are in …") said MLflow's
default in the script's directory. A real controller, a real sqlite store.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from daemon_helpers import ControllerProc, until
from sqlite_store import made_sqlite_store


def test_the_controllers_own_tracking_uri_chooses_no_runs_store(
        make_controller, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    script_dir = tmp_path / "script"
    script_dir.mkdir()
    _, client = made_sqlite_store(script_dir)  # MLflow's default store for this script
    elsewhere = tmp_path / "elsewhere" / "theirs.db"
    env = dict(os.environ, MLFLOW_TRACKING_URI=f"sqlite:///{elsewhere}")
    ctl_proc: ControllerProc = make_controller(env=env, audit=True)
    # The script imports no mlflow (its hook then looks at the environment alone).
    script = ("import sys, torch, lrctl\n"
              "opt = torch.optim.SGD([torch.nn.Parameter(torch.ones(2))], lr=0.1)\n"
              "with lrctl.attach(opt, socket=sys.argv[1], spawn=False, run_name='mine') as c:\n"
              "    for step in range(5):\n"
              "        c.step(1.0 / (step + 1)); opt.step()\n"
              "assert 'mlflow' not in sys.modules\n")
    script_env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    out = subprocess.run([sys.executable, "-c", script, ctl_proc.socket], cwd=script_dir,
                         env=script_env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr

    def shipped() -> list[object]:
        return client.search_runs([e.experiment_id for e in client.search_experiments()],
                                  filter_string="tags.mlflow.runName = 'mine'")

    runs = until(shipped, "the run in the script's own store")
    assert len(runs) == 1
    assert not elsewhere.parent.exists()
