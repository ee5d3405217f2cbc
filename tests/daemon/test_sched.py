"""``lrctl serve --sched batch``: the controller runs under SCHED_BATCH, so an arriving
observation never preempts the training process; it still answers every step."""

from __future__ import annotations

import os

import pytest
import torch
from live_controller import live_controller

import lrctl


@pytest.mark.parametrize(("flag", "policy"), [((), os.SCHED_OTHER),
                                              (("--sched", "batch"), os.SCHED_BATCH)])
def test_the_controller_runs_under_the_scheduling_policy_asked_for(
        flag: tuple[str, ...], policy: int) -> None:
    opt = torch.optim.SGD([torch.nn.Parameter(torch.ones(2))], lr=0.1)
    with live_controller(args=flag) as controller:
        assert controller.proc is not None
        assert os.sched_getscheduler(controller.proc.pid) == policy
        with lrctl.attach(opt, socket=controller.socket, spawn=False, sync=True,
                          policy={"version": 1, "policies": [{"kind": "divergence"}]}) as ctl:
            for _ in range(20):
                ctl.step(1.0, grad_norm=1.0)
                opt.step()
            assert ctl.connected and ctl.late_waits == 0
