"""``lrctl decisions RUN`` and ``lrctl report RUN`` find the runs of the controller on
``$LRCTL_SOCKET`` where it keeps them: a controller started with ``--state-dir`` keeps
them where no default would look."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch
from live_controller import live_controller

import lrctl

POLICY = {"version": 1, "policies": [{"kind": "warmup", "steps": 5}]}


def _cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "lrctl", *args], capture_output=True,
                          text=True, timeout=120, env=env)


def test_a_run_is_found_in_the_state_dir_of_the_controller_on_the_socket(
        tmp_path: Path) -> None:
    with live_controller(audit=True) as srv:
        weight = torch.nn.Parameter(torch.ones(3))
        opt = torch.optim.SGD([weight], lr=0.1)
        ctl = lrctl.attach(opt, policy=POLICY, socket=srv.socket, spawn=False,
                           run_name="own-state-dir", timeout=30.0)
        for _ in range(10):
            opt.zero_grad()
            loss = (weight ** 2).sum()
            loss.backward()
            ctl.step(loss)
            opt.step()
        key = ctl.run_key
        ctl.close()
        elsewhere = tmp_path / "default-state"  # where the default would look: nothing
        env = {**os.environ, "LRCTL_SOCKET": srv.socket, "LRCTL_STATE_DIR": str(elsewhere)}
        found = _cli(env, "decisions", "own-state-dir")
        assert found.returncode == 0, found.stderr
        assert "warmup_done" in found.stdout
        picture = tmp_path / "timeline.png"
        drawn = _cli(env, "report", "own-state-dir", "-o", str(picture))
        assert drawn.returncode == 0, drawn.stderr
        assert picture.stat().st_size > 0 and key in drawn.stdout
        # With no controller on the socket, only the defaults are searched, and the
        # message says where it looked.
        gone = {**env, "LRCTL_SOCKET": str(tmp_path / "nobody.sock")}
        missing = _cli(gone, "decisions", "own-state-dir")
        assert missing.returncode == 2
        assert "no run matches 'own-state-dir'" in missing.stderr
        assert str(elsewhere) in missing.stderr
        # ... and how to look where such a controller kept them (the message gave no
        # hint, and 'latest runs: none' read as if the run were gone).
        assert "pass --state-dir D" in missing.stderr
        assert len(missing.stderr.strip().splitlines()) == 1
        found = _cli(gone, "decisions", "own-state-dir", "--state-dir", srv.state_dir)
        assert found.returncode == 0 and "warmup_done" in found.stdout, found.stderr
