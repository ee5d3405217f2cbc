"""A hook reconnecting mid-run to a controller that has no state for its run (its
checkpoint lost: a restart after it went) sends the hello it first sent, start_step
and all: the run goes on from the hook's step, and its journal keeps the steps it had
(no rewind to the hook's first step: readers of the journal, lrctl report and the
MLflow run's plots, dropped every step before the hook's reconnect). Real controller,
real sockets, the journal read back."""

from __future__ import annotations

import time
from pathlib import Path

import torch
from daemon_helpers import ControllerProc, until
from test_audit_curve import ended

import lrctl
from lrctl.sinks.journal import RunPaths, read_lines
from lrctl.timeline import load_timeline


def test_a_reconnect_to_a_controller_without_the_runs_state_rewinds_nothing(
        make_controller) -> None:  # type: ignore[no-untyped-def]
    controller: ControllerProc = make_controller(audit=True)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.ones(2))], lr=0.1)
    with lrctl.attach(opt, sync=True, spawn=False, run_name="lost") as ctl:
        for i in range(120):  # (loss points every 50 steps: 0, 50, 100)
            ctl.step(1.0 / (i + 1), grad_norm=1.0)
            opt.step()
        key = ctl.run_key
        assert key is not None
        time.sleep(1.5)  # checkpointed (Limits.save_interval): the hook lets its steps go
        ctl.step(0.5, grad_norm=1.0)
        opt.step()
        controller.kill9()
        runs = Path(controller.state_dir) / "runs"
        for ckpt in list(runs.glob(f"{key}.*")):
            ckpt.unlink()  # its state lost with the controller
        controller.start()

        def stepped_back() -> bool:
            ctl.step(0.5, grad_norm=1.0)
            opt.step()
            time.sleep(0.05)
            return ctl._link is not None and ctl._link.state == "up"

        until(stepped_back, "the hook's reconnect", 30)
        for _ in range(10):
            ctl.step(0.5, grad_norm=1.0)
            opt.step()
    paths = RunPaths.of(Path(controller.state_dir), key)
    until(lambda: ended(controller.state_dir, key), "the run's end", 10.0)
    rewinds = [line.record["rewind"] for line in read_lines(paths.stream("metrics"))
               if "rewind" in line.record]
    assert rewinds == [], rewinds
    xs, _ = load_timeline(paths.root).loss.points()  # what lrctl report and MLflow draw
    first = sorted({step for line in read_lines(paths.stream("metrics"))
                    for name, _, step in line.record["points"]
                    if name == "lrctl/loss" and step < 120})
    assert len(first) > 1 and [x for x in xs if x < 120] == first, (xs, first)
