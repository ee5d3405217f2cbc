"""No reactive policy moves the LR on a step it cannot judge.

A framework that reports the loss only on some steps (a Trainer logging every
N steps, a callback that lost its loss source) sends observations without a
loss. Those steps happened, so schedules advance; but a policy that reacts to
the loss has nothing to react to, and must hold: the range test once grew the
LR on every such step and ran it away, and the divergence guard counted them as
clean and regrew.
"""

from __future__ import annotations

import math
from typing import Any

import pytest

import lrctl

LR = 0.1
BLIND = 300  # loss-less observations: more than any growth, patience or regrow interval


def losses(n: int, start: int = 0) -> list[float]:
    return [2.0 * math.exp(-(start + t) / 40.0) + 0.5 for t in range(n)]


@pytest.mark.parametrize("policy", [
    {"kind": "rangetest", "growth": 1.2, "min_steps": 3},
    {"kind": "plateau", "patience": 2, "factor": 0.5},
    {"kind": "plateau", "metric": "grad_norm", "patience": 2, "factor": 0.5},
    {"kind": "divergence", "min_samples": 8, "window": 16, "regrow_after": 5},
])
def test_observations_without_statistics_hold_the_lr(policy: dict[str, Any]) -> None:
    engine = lrctl.load_policy({"version": 1, "policies": [policy]}, base_lrs=[LR])
    for t, loss in enumerate(losses(10)):
        engine.observe(step=t, loss=loss, grad_norm=1.0)
    held = engine.lrs
    for t in range(10, 10 + BLIND):
        assert engine.observe(step=t, loss=None, grad_norm=None) == held, t


def test_range_test_grows_only_on_steps_with_a_loss() -> None:
    """Reported every 10th step, the sweep reaches the multiplier that every-step
    reporting reaches after as many losses, not after as many steps."""
    policy = {"version": 1, "policies": [{"kind": "rangetest", "growth": 1.1, "min_steps": 3,
                                          "max_factor": 1.0e9}]}
    every = lrctl.load_policy(policy, base_lrs=[LR])
    sparse = lrctl.load_policy(policy, base_lrs=[LR])
    values = losses(5)
    for t, loss in enumerate(values):
        every.observe(step=t, loss=loss)
    for t in range(50):
        sparse.observe(step=t, loss=values[t // 10] if t % 10 == 0 else None)
    assert sparse.lrs == pytest.approx(every.lrs)


def test_divergence_backoff_does_not_regrow_on_blind_steps() -> None:
    engine = lrctl.load_policy({"version": 1, "policies": [
        {"kind": "divergence", "min_samples": 8, "window": 16, "regrow_after": 5,
         "cooldown": 2}]}, base_lrs=[LR])
    for t, loss in enumerate(losses(20)):
        engine.observe(step=t, loss=loss, grad_norm=1.0)
    engine.observe(step=20, loss=math.nan, grad_norm=1.0)
    backed_off = engine.lrs
    assert backed_off[0] < LR
    for t in range(21, 21 + BLIND):
        engine.observe(step=t, loss=None, grad_norm=None)
    assert engine.lrs == backed_off
    for t, loss in enumerate(losses(5, start=21), start=21 + BLIND):
        engine.observe(step=t, loss=loss, grad_norm=1.0)
    assert engine.lrs[0] > backed_off[0], "clean observations with statistics still regrow"


def test_a_loss_the_log_scale_cannot_judge_is_said_once() -> None:
    """A negative loss (a critic's, a negative log-likelihood) under the default
    ``loss_scale: log``: the guard judged no loss at all, and said nothing (found by an
    adversarial pass: -4.8 jumping to +500 went unremarked). The first such loss is
    recorded, once, with the fix; the grad norm is still judged; state survives a
    checkpoint; on the linear scale the same run is judged and the jump backed off."""
    curve = [-4.8 + 0.001 * t for t in range(300)] + [500.0]
    engine = lrctl.load_policy({"version": 1, "policies": [{"kind": "divergence"}]}, [LR])
    for t, loss in enumerate(curve[:150]):
        engine.observe(t, loss, 1.0)
    again = lrctl.load_policy({"version": 1, "policies": [{"kind": "divergence"}]}, [LR])
    again.load_state_dict(engine.state_dict())
    for t, loss in enumerate(curve[150:], start=150):
        again.observe(t, loss, 1.0)
    notes = [d for d in engine.decisions + again.decisions if d.action == "loss_not_judged"]
    assert [d.step for d in notes] == [0] and "loss_scale: linear" in notes[0].reason
    linear = lrctl.load_policy({"version": 1, "policies": [
        {"kind": "divergence", "loss_scale": "linear"}]}, [LR])
    for t, loss in enumerate(curve):
        linear.observe(t, loss, 1.0)
    assert [d.action for d in linear.decisions if d.step == 300] == ["backoff"]
    assert not any(d.action == "loss_not_judged" for d in linear.decisions)


def test_a_loss_of_exactly_zero_is_said_to_need_no_change() -> None:
    """A batch the model fits exactly has a loss of 0 (the curve ``lrctl replay`` ships
    has 2 361 of them): its note says there is nothing to change, and names the fix only
    for a loss that can be negative."""
    engine = lrctl.load_policy({"version": 1, "policies": [{"kind": "divergence"}]}, [LR])
    for t in range(40):
        engine.observe(t, 0.0 if t % 3 == 0 else 0.01, 1.0)
    [note] = [d for d in engine.decisions if d.action == "loss_not_judged"]
    assert note.step == 0
    assert "nothing to change for a batch the model fits exactly" in note.reason
    assert engine.lrs == [LR]
