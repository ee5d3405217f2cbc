"""The journal drops a decision only as the replay of one it has: the same record again
(a controller restarted re-makes its decisions from the observations its hook replays).
Two operator actions between two observations are two records at one step: both are
journaled, so MLflow's audit says the LR the run trains at (before, the second set-lr
was dropped as the first's replay, and MLflow said 0.05 while the run trained at 0.02).
Real controller, real sockets, the journal read back."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch
from daemon_helpers import ControllerProc

import lrctl
from lrctl.sinks.journal import RunPaths, read_lines


def _cli(*args: str) -> None:
    out = subprocess.run([sys.executable, "-m", "lrctl", *args], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr


def test_two_set_lrs_between_two_steps_are_both_journaled(
        make_controller) -> None:  # type: ignore[no-untyped-def]
    controller: ControllerProc = make_controller(audit=True)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.ones(2))], lr=0.1)
    with lrctl.attach(opt, sync=True, spawn=False, run_name="twice") as ctl:
        for _ in range(5):
            ctl.step(0.5, grad_norm=1.0)
            opt.step()
        key = ctl.run_key
        assert key is not None
        _cli("set-lr", key, "0.05")
        _cli("set-lr", key, "0.02")
        for _ in range(3):
            ctl.step(0.5, grad_norm=1.0)
            opt.step()
        assert opt.param_groups[0]["lr"] == 0.02
        said = [(d.step, d.new_lrs) for d in ctl.decisions if d.action == "set_lr"]
    paths = RunPaths.of(Path(controller.state_dir), key)
    journaled = [(r.record["step"], tuple(r.record["new_lrs"]))
                 for r in read_lines(paths.stream("decisions"))
                 if r.record["action"] == "set_lr"]
    assert len(said) == 2 and journaled == said, (journaled, said)
