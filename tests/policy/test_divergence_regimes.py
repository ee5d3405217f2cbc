"""Divergence guard: transient spikes vs a run that moved to a new loss level."""

from __future__ import annotations

import json
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
    assert actions == [(500, "backoff"), (709, "regrow")]  # the cooldown's last one counts
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


class TooHighLR:
    """A model of an LR set ×100 by mistake at step 200: while the LR applied is more
    than twice the one that trains, each step taken multiplies the loss by ``growth``
    (it climbs; an LR that is not too high brings it back down ×0.8 a step toward 1). A
    skipped step leaves the weights, and so the loss, as they were."""

    def __init__(self, growth: float = 6.0) -> None:
        self.level = 1.0
        self.growth = growth

    def loss(self, rng: random.Random) -> float:
        return noisy(self.level, rng)

    def step(self, t: int, lr: float, skipped: bool) -> None:
        if skipped:
            return
        applied = lr * (100.0 if t >= 200 else 1.0)
        self.level = (min(self.level * self.growth, 1e6) if applied > 0.2
                      else max(1.0, self.level * 0.8))


def test_a_back_off_that_does_not_take_is_followed_by_harder_ones() -> None:
    """An LR set ×100 by mistake, the loss climbing ×6 a step while the LR is too high:
    the cooldown's losses stay far above max_shift × the old median, so the guard backs
    off by ×factor² after each cooldown until the loss comes down, stops skipping so that
    the model can train back, and keeps the cut (the loss did come down: the LR caused
    it). The state carries the incident across a resume."""
    rng = random.Random(2)
    text = "version: 1\npolicies:\n  - kind: divergence\n    skip_spikes: true\n"
    engine = lrctl.load_policy(text, [0.1])
    model = TooHighLR()
    resumed = None
    skipped = []
    for t in range(400):
        loss = model.loss(rng)
        engine.observe(step=t, loss=loss, grad_norm=1.0)
        skipped += [t] if engine.should_skip else []
        if t == 215:  # mid-incident: the state carries the escalation
            resumed = lrctl.load_policy(text, [0.1])
            resumed.load_state_dict(engine.state_dict())
        elif resumed is not None:
            resumed.observe(step=t, loss=loss, grad_norm=1.0)
        model.step(t, engine.lrs[0], engine.should_skip)
    backs = [(d.evidence["factor"], d.evidence["statistic"])
             for d in engine.decisions if d.action == "backoff"]
    assert backs[:2] == [(0.5, "loss"), (0.25, "loss_level")]
    first = next(d.step for d in engine.decisions if d.action == "backoff")
    assert skipped == list(range(first, first + 10)), "only the first cooldown is skipped"
    assert model.level < 2.0, "the loss came back down"
    assert engine.lrs[0] * 100 <= 0.2, "the cut was kept"
    assert not [d for d in engine.decisions if d.evidence.get("level_accepted")]
    assert not engine.should_stop
    assert resumed is not None and resumed.lrs == engine.lrs
    assert [d.to_dict() for d in resumed.decisions] == [
        d.to_dict() for d in engine.decisions if d.step > 215]


def test_a_lasting_sixfold_loss_level_gives_the_lr_back() -> None:
    """A harder data mix that stays (the loss 6× up whatever the LR): the skipped cooldown
    cannot tell it from a blow-up, so the guard cuts harder three times; the loss does
    not come down through them, nor in min_samples observations at the cut LR, so the LR
    did not cause it: the level is accepted and the LR given back to its value before
    the incident; the run never stops. Plateau decay, told
    of the new level, judges afresh instead of reading a rise. The state carries the
    watch across a resume."""
    rng = random.Random(3)
    text = ("version: 1\npolicies:\n  - kind: divergence\n    skip_spikes: true\n"
            "  - kind: plateau\n    test: stall\n    patience: 200\n    threshold: 0.01\n")
    engine = lrctl.load_policy(text, [0.1])
    resumed = None
    for t in range(1200):
        loss = noisy(0.05 if t < 400 else 0.30, rng)
        engine.observe(step=t, loss=loss, grad_norm=1.0)
        if t == 450:  # accepted, watching the cut LR
            resumed = lrctl.load_policy(text, [0.1])
            resumed.load_state_dict(engine.state_dict())
        elif resumed is not None:
            resumed.observe(step=t, loss=loss, grad_norm=1.0)
    backs = [d.step for d in engine.decisions if d.action == "backoff"]
    assert backs == [400, 410, 420, 430]  # ½, then ¼ three times
    (given,) = [d for d in engine.decisions if d.evidence.get("level_accepted")]
    assert given.action == "regrow" and 440 + 32 <= given.step <= 440 + 40
    assert given.evidence["multiplier"] == 1.0 and "a change of data" in given.reason
    assert given.evidence["loss_after"] > given.evidence["loss_before"] / 1.5
    guard = engine.policies[0]
    assert guard.multiplier() == 1.0
    assert not engine.should_stop
    assert resumed is not None and [d.to_dict() for d in resumed.decisions] == [
        d.to_dict() for d in engine.decisions if d.step > 450]
    # Flat noise at the new level is a stall: plateau decay may act on it, but only on
    # windows wholly after the change (with burn-in), never on one across it.
    reduces = [d for d in engine.decisions if d.action == "reduce" and d.step > 400]
    assert all(d.evidence["older_mean"] > 0.2 for d in reduces)
    assert reduces and all(d.step >= 400 + 100 + 200 for d in reduces)


def test_a_loss_that_climbs_on_from_an_accepted_level_is_still_caught() -> None:
    """A slower climb (×1.3 a step): the cooldown sits within max_shift of the old level,
    which is accepted. The window moves to that level with the spread it learned, so
    detection stays armed and the climb spikes again at once (a window re-filled from a
    ten-value cooldown would be blind for min_samples steps while the loss ran away)."""
    rng = random.Random(5)
    engine = lrctl.load_policy(
        "version: 1\npolicies:\n  - kind: divergence\n    skip_spikes: true\n", [0.1])
    model = TooHighLR(growth=1.3)
    worst = 0.0
    for t in range(460):
        engine.observe(step=t, loss=model.loss(rng), grad_norm=1.0)
        model.step(t, engine.lrs[0], engine.should_skip)
        worst = max(worst, model.level)
    backs = [d for d in engine.decisions if d.action == "backoff"]
    assert len(backs) >= 6 and all(d.evidence["factor"] == 0.5 for d in backs)
    assert engine.lrs[0] * 100 <= 0.2, "cut until the LR trains"
    assert worst < 100.0, "never ran away"
    assert model.level < 2.0
    assert not engine.should_stop


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


def _six_fold(engine: lrctl.Engine, steps: int, rng: random.Random,
              nan_at: frozenset[int] = frozenset()) -> None:
    """The loss 6× up from step 400, whatever the LR (a change of data)."""
    for t in range(steps):
        loss = math.nan if t in nan_at else noisy(0.05 if t < 400 else 0.30, rng)
        engine.observe(step=t, loss=loss, grad_norm=1.0)


def test_no_lr_is_given_back_after_a_stop() -> None:
    """A stop (here at max_backoffs, on a NaN while the level settles) ends the incident:
    the guard never raises the LR after it asked the run to stop."""
    engine = lrctl.load_policy({"version": 1, "policies": [
        {"kind": "divergence", "max_backoffs": 4}]}, [0.1])
    _six_fold(engine, 520, random.Random(3), nan_at=frozenset({445}))
    assert engine.should_stop
    stop = next(d.step for d in engine.decisions if d.action == "stop")
    assert not [d for d in engine.decisions if d.step > stop and d.action == "regrow"]


def test_the_lr_is_given_back_to_its_value_before_the_incident_not_an_older_one() -> None:
    """Earlier incidents left the LR partly regrown (×1/4 at step 400): the give-back
    returns to that, not to the value before the earlier incidents."""
    engine = lrctl.load_policy({"version": 1, "policies": [{"kind": "divergence"}]}, [0.1])
    _six_fold(engine, 520, random.Random(3), nan_at=frozenset({100, 120, 140}))
    (given,) = [d for d in engine.decisions if d.evidence.get("level_accepted")]
    assert given.evidence["multiplier"] == 0.25
    assert engine.lrs == [pytest.approx(0.025)]


def test_a_saved_state_does_not_change_as_the_run_goes_on() -> None:
    engine = lrctl.load_policy({"version": 1, "policies": [{"kind": "divergence"}]}, [0.1])
    rng = random.Random(3)
    _six_fold(engine, 451, rng)
    state = engine.state_dict()
    frozen = json.dumps(state)
    for t in range(451, 520):
        engine.observe(step=t, loss=noisy(0.30, rng), grad_norm=1.0)
    assert json.dumps(state) == frozen


def test_a_burst_that_ends_within_the_cooldown_is_no_new_level() -> None:
    """A 7-step ×3 burst fills most of a 10-step cooldown but is over by its newer half:
    the statistics stay at the old level, so a lasting ×2.5 jump later is still caught."""
    rng = random.Random(1)
    engine = lrctl.load_policy({"version": 1, "policies": [{"kind": "divergence"}]}, [0.1])
    for t in range(560):
        level = 3.0 if 400 <= t < 407 else (2.5 if t >= 440 else 1.0)
        engine.observe(step=t, loss=noisy(level, rng), grad_norm=1.0)
    assert [d.step for d in engine.decisions if d.action == "backoff"] == [400, 440]
