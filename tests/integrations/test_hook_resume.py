"""A plain-loop resume: the optimizer's state is reloaded and the run rejoins its session."""

from __future__ import annotations

import torch
from live_controller import LiveController

import lrctl

POLICY = "version: 1\npolicies:\n  - kind: plateau\n    patience: 2\n    factor: 0.5\n"


def make() -> tuple[torch.nn.Parameter, torch.optim.Optimizer]:
    weight = torch.nn.Parameter(torch.zeros(3))
    return weight, torch.optim.SGD([weight], lr=0.1)


def test_resume_after_load_state_dict_writes_into_the_new_param_groups(
        controller: LiveController) -> None:
    _, opt = make()
    ctl = lrctl.attach(opt, policy=POLICY, sync=True)
    engine = lrctl.load_policy(POLICY, [0.1])  # the uninterrupted reference
    for t in range(6):  # a constant loss: plateau halves at steps 3 and 7
        ctl.step(1.0, grad_norm=1.0)
        engine.observe(step=t, loss=1.0, grad_norm=1.0)
    assert ctl.lr == engine.lrs == [0.05]
    checkpoint = {"optimizer": opt.state_dict(), "run_key": ctl.run_key,
                  "step": ctl.steps_taken}
    ctl.close(end_run=False)  # interrupted, not finished: the session stays

    _, opt2 = make()
    resumed = lrctl.attach(opt2, policy=POLICY, sync=True, resume=checkpoint["run_key"],
                           start_step=checkpoint["step"])
    opt2.load_state_dict(checkpoint["optimizer"])  # replaces param_groups' dicts
    for t in range(6, 9):
        resumed.step(1.0, grad_norm=1.0)
        engine.observe(step=t, loss=1.0, grad_norm=1.0)
    assert resumed.lr == engine.lrs == [0.025]
    assert opt2.param_groups[0]["lr"] == 0.025  # written into the live groups
    resumed.close()
