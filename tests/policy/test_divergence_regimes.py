"""Divergence guard: transient spikes vs a run that moved to a new loss level."""

from __future__ import annotations

import math
import random

import pytest

import lrctl


def noisy(level: float, rng: random.Random) -> float:
    return level * math.exp(rng.gauss(0.0, 0.05))


def test_level_shift_backs_off_once_then_rebaselines_and_regrows() -> None:
    rng = random.Random(0)
    engine = lrctl.load_policy("version: 1\npolicies:\n  - kind: divergence\n", [0.1])
    for t in range(1200):
        engine.observe(step=t, loss=noisy(1.0 if t < 500 else 2.0, rng), grad_norm=1.0)
    actions = [(d.step, d.action) for d in engine.decisions]
    assert actions == [(500, "backoff"), (710, "regrow")]
    assert not engine.should_stop
    assert engine.lrs == [0.1]


def test_spikes_inside_the_cooldown_are_flagged_not_learned() -> None:
    rng = random.Random(1)
    engine = lrctl.load_policy(
        "version: 1\npolicies:\n  - kind: divergence\n    skip_spikes: true\n", [0.1])
    skipped = []
    for t in range(300):
        burst = 200 <= t < 205  # a 5-step burst of ×100 losses
        engine.observe(step=t, loss=noisy(100.0 if burst else 1.0, rng), grad_norm=1.0)
        if engine.should_skip:
            skipped.append(t)
    assert skipped == [200, 201, 202, 203, 204]
    backoffs = [d.step for d in engine.decisions if d.action == "backoff"]
    assert backoffs == [200]  # one back-off; the rest of the burst is skipped, not cut again
    # the burst did not enter the statistics: a later ×50 spike is still caught
    engine.observe(step=300, loss=50.0, grad_norm=1.0)
    assert engine.last_decisions[-1].action == "backoff"


def test_a_back_off_that_does_not_take_is_followed_by_harder_ones() -> None:
    """An LR set ×100 by mistake: the loss stays ~50× up. That is no new level
    (max_shift 4×): the guard backs off by ×factor² after each cooldown until the
    loss comes down, and stops skipping so that the model can train back."""
    rng = random.Random(2)
    text = "version: 1\npolicies:\n  - kind: divergence\n    skip_spikes: true\n"
    engine = lrctl.load_policy(text, [0.1])
    resumed = None
    skipped = []
    for t in range(400):
        level = 1.0 if t < 200 else (50.0 if t < 231 else 1.2)  # down after 3 back-offs
        loss = noisy(level, rng)
        engine.observe(step=t, loss=loss, grad_norm=1.0)
        skipped += [t] if engine.should_skip else []
        if t == 215:  # mid-incident: the state carries the escalation
            resumed = lrctl.load_policy(text, [0.1])
            resumed.load_state_dict(engine.state_dict())
        elif resumed is not None:
            resumed.observe(step=t, loss=loss, grad_norm=1.0)
    backs = [(d.step, d.evidence["factor"], d.evidence["statistic"])
             for d in engine.decisions if d.action == "backoff"]
    assert backs == [(200, 0.5, "loss"), (210, 0.25, "loss_level"), (220, 0.25, "loss_level"),
                     (230, 0.25, "loss_level")]
    assert skipped == list(range(200, 210)), "only the first cooldown's spikes are skipped"
    assert not engine.should_stop
    assert resumed is not None and resumed.lrs == engine.lrs
    assert [d.to_dict() for d in resumed.decisions] == [
        d.to_dict() for d in engine.decisions if d.step > 215]


def test_a_lasting_sixfold_loss_level_is_accepted_after_three_harder_back_offs() -> None:
    """A harder data mix that stays: the guard never asks such a run to stop."""
    rng = random.Random(3)
    text = "version: 1\npolicies:\n  - kind: divergence\n    skip_spikes: true\n"
    engine = lrctl.load_policy(text, [0.1])
    for t in range(1200):
        engine.observe(step=t, loss=noisy(0.05 if t < 400 else 0.30, rng), grad_norm=1.0)
    backs = [d.step for d in engine.decisions if d.action == "backoff"]
    assert backs == [400, 410, 420, 430]  # ½, then ¼ three times; then the level stands
    assert not engine.should_stop
    regrows = [d.step for d in engine.decisions if d.action == "regrow"]
    assert regrows and regrows[0] > 450
    assert engine.lrs[0] > 0.1 / 128


@pytest.mark.parametrize(("knobs", "level_of"), [
    ("    max_shift: null\n", "loss"),  # switched off
    ("", "grad_norm"),  # grad-norm levels move for benign reasons: never escalated
])
def test_no_harder_back_offs_when_switched_off_or_for_the_grad_norm(
        knobs: str, level_of: str) -> None:
    rng = random.Random(4)
    engine = lrctl.load_policy(f"version: 1\npolicies:\n  - kind: divergence\n{knobs}",
                               [0.1])
    for t in range(600):
        up = 50.0 if t >= 300 else 1.0
        loss, grad = (noisy(up, rng), 1.0) if level_of == "loss" else (noisy(1.0, rng), up)
        engine.observe(step=t, loss=loss, grad_norm=grad)
    assert [d.step for d in engine.decisions if d.action == "backoff"] == [300]
    assert not engine.should_stop
