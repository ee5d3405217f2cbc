"""The range test's verdict: conclusive only when the loss fell beyond its noise.

Known-answer tables: a seeded synthetic loss series and the exact decisions. On a
flat, noisy loss the best of the smoothed curve is a low outlier, and a sweep that
settled from it moved the LR by noise alone (on these series: to 0.06× the given
LR). Such a sweep is inconclusive now, and the LR the user gave stands.
"""

from __future__ import annotations

import json
import random

import pytest

import lrctl
from lrctl.config import ConfigError

BASE_LR = 1e-3
#: The shipped file's sweep (policies/rangetest.yaml); alpha and fall_z at their
#: defaults (0.01, 2.0).
SHIPPED = {"start_factor": 0.01, "growth": 1.07, "smoothing_window": 5, "min_steps": 20,
           "rise": 0.08, "anchor": "best", "settle": 0.35}


def sweep(losses: list[float], **knobs: object) -> lrctl.Engine:
    engine = lrctl.load_policy({"version": 1, "policies": [{"kind": "rangetest", **knobs}]},
                               base_lrs=[BASE_LR])
    for step, loss in enumerate(losses):
        engine.observe(step, loss)
    return engine


def flat(seed: int, level: float = 1.0, sd: float = 0.15, n: int = 300) -> list[float]:
    """Pure noise: the LR never moves this loss."""
    rng = random.Random(seed)
    return [level + sd * rng.gauss(0.0, 1.0) for _ in range(n)]


def falls_then_explodes(shift: float = 0.0, n: int = 110) -> list[float]:
    """Flat at 2 while the LR is too small (60 steps), a fall to 1 over 40 steps, then
    a blow-up; 2 % noise."""
    rng = random.Random(0)
    out = []
    for t in range(n):
        level = 2.0 if t < 60 else 2.0 - (t - 60) / 40 if t < 100 else 1.0 + 0.01 * (t - 100) ** 2
        out.append(level + shift + 0.02 * rng.gauss(0.0, 1.0))
    return out


def test_a_flat_noisy_loss_is_inconclusive_and_the_given_lr_stands() -> None:
    """±15 % noise around 1: the smoothed loss "rises" 8 % over its lowest at step 104
    (noise); the lowest was 0.14 under the start, under 2 σ of the per-step noise
    (0.155), so nothing says where the good LR is. (It settled at 0.06× the LR.)"""
    engine = sweep(flat(2), **SHIPPED)
    assert [(d.step, d.action) for d in engine.decisions] == [(104, "range_test_done")]
    (done,) = engine.decisions
    assert done.evidence["conclusive"] is False
    assert "inconclusive, so the given LR stands" in done.reason
    assert done.evidence["fall"] == pytest.approx(0.1403, abs=1e-4)
    assert done.evidence["noise_sigma"] == pytest.approx(0.1553, abs=1e-4)
    assert done.new_lrs == (BASE_LR,) and engine.applied_lrs == [BASE_LR]


@pytest.mark.parametrize("sd", [0.05, 0.15, 0.3])
def test_pure_noise_never_moves_the_lr(sd: float) -> None:
    """Twenty seeds of flat noise at each size (before: 0, 15 and 20 of 20 moved it)."""
    for seed in range(20):
        engine = sweep(flat(seed, sd=sd), **SHIPPED)
        (done,) = engine.decisions
        assert done.evidence["conclusive"] is False, (seed, done.reason)
        assert engine.applied_lrs == [BASE_LR]


def test_a_fall_then_a_blow_up_is_conclusive() -> None:
    """The lowest smoothed loss is at observation 101 (multiplier 0.01 × 1.07^101); the
    rise past 8 % over it ends the sweep at step 105; the LR settles at 0.35× that."""
    engine = sweep(falls_then_explodes(), **SHIPPED)
    assert [(d.step, d.action) for d in engine.decisions] == [(105, "range_test_done")]
    (done,) = engine.decisions
    assert done.evidence["conclusive"] is True and done.evidence["trend_verdict"] == "fell"
    assert done.evidence["best_multiplier"] == pytest.approx(0.01 * 1.07 ** 101)
    assert engine.applied_lrs[0] == pytest.approx(BASE_LR * 0.35 * 0.01 * 1.07 ** 101)
    assert done.evidence["fall"] > 2.0 * done.evidence["noise_sigma"]


def test_a_negative_loss_is_judged_relative_to_its_magnitude() -> None:
    """A log-likelihood objective below zero: the same fall, shifted by -3, settles at
    the same LR (its 8 % rise is of |lowest|, so it stops one step later); flat noise
    around -1 is inconclusive (it settled at 0.018× the LR: a negative start "fell" 10 %
    by being any lower at all)."""
    engine = sweep(falls_then_explodes(shift=-3.0), **SHIPPED)
    assert [(d.step, d.action) for d in engine.decisions] == [(106, "range_test_done")]
    assert engine.decisions[0].evidence["conclusive"] is True
    assert engine.applied_lrs[0] == pytest.approx(BASE_LR * 0.35 * 0.01 * 1.07 ** 101)

    engine = sweep(flat(2, level=-1.0), **SHIPPED)
    assert [(d.step, d.action) for d in engine.decisions] == [(204, "range_test_done")]
    assert engine.decisions[0].evidence["conclusive"] is False
    assert engine.applied_lrs == [BASE_LR]


def test_the_slowdown_test_applies_to_a_negative_loss() -> None:
    """It was never run on a loss below zero: a fall from -6 to -10 that slows."""
    losses = [-(10.0 - 4.0 * 0.8 ** t) for t in range(15)]
    losses += [losses[-1] - 0.0005 * t for t in range(40)]
    engine = sweep(losses, growth=1.1, slowdown=0.5, anchor="steepest", settle=1.0,
                   smoothing_window=3, min_steps=4)
    assert [(d.step, d.action) for d in engine.decisions] == [(7, "range_test_done")]
    assert engine.decisions[0].evidence["statistic"] == "loss_fall"


def test_the_fall_test_survives_a_checkpoint_mid_sweep() -> None:
    losses = falls_then_explodes()
    whole = sweep(losses, **SHIPPED)
    first = sweep(losses[:80], **SHIPPED)
    second = lrctl.load_policy({"version": 1, "policies": [{"kind": "rangetest", **SHIPPED}]},
                               base_lrs=[BASE_LR])
    second.load_state_dict(json.loads(json.dumps(first.state_dict(), allow_nan=False)))
    for step, loss in enumerate(losses[80:], start=80):
        second.observe(step, loss)
    assert [d.to_dict() for d in second.decisions] == [d.to_dict() for d in whole.decisions]
    assert second.state_dict() == whole.state_dict()


@pytest.mark.parametrize("key, bad", [("alpha", 0.0), ("alpha", 0.5), ("fall_z", -1.0),
                                      ("fall_z", "two")])
def test_the_fall_test_knobs_are_validated(key: str, bad: object) -> None:
    with pytest.raises(ConfigError, match=key):
        sweep([], **{key: bad})
