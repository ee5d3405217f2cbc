"""A run that ended (its goodbye said, its checkpoint gone) rejoined by its key: the
controller starts it afresh at the hook's ``start_step``, so its journal goes on from
there. Before, a loop that counted from 0 again had every step up to the old end, and
an operator's ``set-lr`` among them, dropped from the journal and MLflow as replays of
steps the journal already had (an adversarial pass's find). Real controller, real
sockets, the journal read back."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch
from daemon_helpers import ControllerProc, until
from test_audit_curve import drawn, ended

import lrctl
from lrctl.sinks.journal import RunPaths, read_lines


def _opt() -> torch.optim.Optimizer:
    return torch.optim.SGD([torch.nn.Parameter(torch.ones(2))], lr=0.1)


def _set_lr(key: str, lr: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "lrctl", "set-lr", key, lr],
                          capture_output=True, text=True, timeout=60)


def test_a_rejoined_ended_run_journals_its_new_steps_and_the_operators_set_lr(
        make_controller) -> None:  # type: ignore[no-untyped-def]
    controller: ControllerProc = make_controller(audit=True)
    first = lrctl.attach(_opt(), sync=True, spawn=False, run_name="again")
    for _ in range(19):
        first.step(0.5, grad_norm=1.0)
    key = first.run_key
    assert key is not None
    assert _set_lr(key, "0.05").returncode == 0  # a decision at step 18 in its first life
    first.step(0.5, grad_norm=1.0)
    first.close()
    events = RunPaths.of(Path(controller.state_dir), key).stream("events")
    until(lambda: ended(controller.state_dir, key), f"the end in {events}", 10.0)
    opt = _opt()
    with lrctl.attach(opt, sync=True, spawn=False, resume=key) as ctl:
        for _ in range(5):  # steps 0-4 again: a new life of the run
            ctl.step(0.5, grad_norm=1.0)
            opt.step()
        out = _set_lr(key, "0.02")
        assert out.returncode == 0, out.stderr
        for _ in range(5):
            ctl.step(0.5, grad_norm=1.0)
            opt.step()
        assert opt.param_groups[0]["lr"] == 0.02
        said = [d for d in ctl.decisions if d.action == "set_lr"]
        assert len(said) == 1
    paths = RunPaths.of(Path(controller.state_dir), key)
    journaled = [line.record for line in read_lines(paths.stream("decisions"))]
    set_lr = [(d["step"], d["new_lrs"]) for d in journaled if d["action"] == "set_lr"]
    assert set_lr == [(18, [0.05]), (said[0].step, [0.02])], journaled
    # The new life's points stand (the later of two at a step), its LR among them, and
    # the metrics say where the rewind began, so readers drop the old life's later points.
    points = dict(drawn(controller.state_dir, key))
    assert points[9] == 0.02 and points[4] == 0.1, points
    rewinds = [line.record["rewind"] for line in read_lines(paths.stream("metrics"))
               if "rewind" in line.record]
    assert rewinds == [-1], rewinds
