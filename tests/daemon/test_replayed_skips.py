"""A sync hook's skips on steps it replays after a controller restart are advisory.

While the controller is down the sync hook trains on at its last LR, and a loss spike
then is not skipped: that optimizer step runs. When the restarted controller sees the
step (the hook replays it), its skip cannot be carried out any more: the record says
so (``advisory``, ``already_ran``), where a skip decided live stays carried out. The
LRs are those of an uninterrupted in-process engine all the same.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
from daemon_helpers import POLICIES, ControllerProc, losses

import lrctl

POLICY = str(POLICIES / "default.yaml")
STEPS = 320
LIVE_SPIKE, KILL_AT, DOWN_SPIKE, RESTART_AT = 200, 240, 250, 270


def test_a_skip_on_a_replayed_step_is_recorded_as_advisory(
        make_controller: Callable[..., ControllerProc]) -> None:
    controller = make_controller()
    curve = losses(STEPS, seed=5, spikes=(LIVE_SPIKE, DOWN_SPIKE))  # even steps: spikes
    engine = lrctl.load_policy(POLICY, [0.1])
    expected = [engine.observe(t, loss, 1.0) for t, loss in enumerate(curve)]
    weight = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([weight], lr=0.1)
    stepped: list[int] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # "lost the controller", by design
        ctl = lrctl.attach(opt, policy=POLICY, sync=True, spawn=False, max_backoff=0.05)
        try:
            for t, loss in enumerate(curve):
                if t == KILL_AT:
                    controller.kill9()
                elif t == RESTART_AT:
                    controller.start()
                    while not ctl.connected:  # the replay of the steps since KILL_AT
                        ctl._link.wait(lambda: ctl.connected, 0.2)  # type: ignore[union-attr]
                        ctl._pump()
                weight.grad = torch.ones(1)
                ctl.step(loss, grad_norm=1.0)
                if ctl.should_skip:
                    continue
                before = weight.item()
                opt.step()
                if weight.item() != before:
                    stepped.append(t)
            assert ctl.lr == expected[-1]
        finally:
            ctl.close()
    assert LIVE_SPIKE not in stepped and DOWN_SPIKE in stepped
    skips = {d.step: d for d in ctl.decisions if d.action == "skip"}
    assert sorted(skips) == [LIVE_SPIKE, DOWN_SPIKE]
    live, replayed = skips[LIVE_SPIKE], skips[DOWN_SPIKE]
    assert "advisory" not in live.evidence and "advisory" not in live.reason
    assert replayed.evidence["advisory"] is True and replayed.evidence["already_ran"] is True
    assert "advisory: the hook reported this step after it had run" in replayed.reason
    assert [(d.step, d.action, d.new_lrs) for d in ctl.decisions] == [
        (d.step, d.action, d.new_lrs) for d in engine.decisions]
