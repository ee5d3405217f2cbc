"""``TrendWindow.surely_fell`` says True only where the trend test says "fell".

Plateau decay (``test: trend``) skips the test when the bound says the fall is
certain: a True where the test would say "flat" or "rose" would skip an LR cut. The
series here are built to put the test's z on both sides of the critical value (trends
of every steepness, AR(1) noise up to phi 0.95, outliers, constant stretches, tiny and
huge levels, all of it), and the bound must also be of use: on a clearly falling loss
it spares the test most of the time.
"""

from __future__ import annotations

import math
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lrctl.policy.stats import TrendWindow


def _series(n: int, seed: int, slope: float, phi: float, noise: float, level: float,
            outliers: float, flat: float) -> list[float]:
    rng = random.Random(seed)
    out, e = [], 0.0
    for i in range(n):
        e = phi * e + rng.gauss(0.0, noise)
        v = level * (1.0 - slope * i / n) + level * e
        if rng.random() < outliers:
            v *= 10.0
        if rng.random() < flat:
            v = level
        out.append(v)
    return out


@settings(max_examples=400, deadline=None)
@given(n=st.sampled_from([8, 10, 16, 40, 100, 400]), seed=st.integers(0, 10**6),
       slope=st.one_of(st.floats(-0.2, 0.5), st.floats(0.0, 0.05)),
       phi=st.sampled_from([0.0, 0.5, 0.9, 0.95, -0.5]),
       noise=st.sampled_from([0.0, 1e-9, 0.001, 0.01, 0.05, 0.2]),
       level=st.sampled_from([1.0, 2.5, -3.0, 1e-150, 1e-80, 1e80, 1e120]),
       outliers=st.sampled_from([0.0, 0.0, 0.02]), flat=st.sampled_from([0.0, 0.0, 0.5]),
       alpha=st.sampled_from([0.01, 0.05, 0.2, 0.001]),
       margin=st.sampled_from([0.0, 1e-3, 0.05]), delta=st.sampled_from([0.0, 1e-4]))
def test_a_sure_fall_is_the_tests_verdict(n: int, seed: int, slope: float, phi: float,
                                          noise: float, level: float, outliers: float,
                                          flat: float, alpha: float, margin: float,
                                          delta: float) -> None:
    values = _series(n + 1, seed, slope, phi, noise, level, outliers, flat)
    window = TrendWindow(n)
    window.load(values[:-1])
    sure = window.surely_fell(alpha, margin, delta)
    sure_after = window.surely_fell(alpha, margin, delta, pushing=values[-1])
    verdict = window.test(alpha, margin, delta).verdict  # type: ignore[union-attr]
    if sure:
        assert verdict == "fell"
    window.push(values[-1])
    assert sure_after == window.surely_fell(alpha, margin, delta)
    if sure_after:
        assert window.test(alpha, margin, delta).verdict == "fell"  # type: ignore[union-attr]


@pytest.mark.parametrize("z_target", [2.0, 2.3, 2.33, 2.35, 2.5, 3.0])
def test_near_the_critical_value_the_bound_errs_on_the_side_of_the_test(
        z_target: float) -> None:
    """Falls scaled so that the test's z lands near 2.326 (alpha 0.01): every True is
    a z above it."""
    rng = random.Random(int(z_target * 100))
    for _ in range(60):
        noise = [rng.gauss(0.0, 1.0) for _ in range(400)]
        window = TrendWindow(400)
        window.load(noise)
        base = window.test(0.01).z  # type: ignore[union-attr]
        # A step between the halves adds (step / se) to z: aim at z_target.
        se = window.test(0.01).se  # type: ignore[union-attr]
        step = (z_target - base) * se
        window.load([v + (step if i < 200 else 0.0) for i, v in enumerate(noise)])
        result = window.test(0.01)
        assert result is not None
        if window.surely_fell(0.01):
            assert result.verdict == "fell" and result.z > 2.3263478740408408


def test_the_bound_spares_the_test_on_a_falling_loss() -> None:
    rng = random.Random(3)
    window = TrendWindow(400)
    sure = tested = 0
    for t in range(20000):
        window.push((2.0 * math.exp(-t / 3000) + 0.3) * rng.lognormvariate(0, 0.1))
        if window.full and t % 50 == 0:
            result = window.test(0.01, 1e-3)
            assert result is not None
            if result.verdict == "fell":
                tested += 1
                sure += window.surely_fell(0.01, 1e-3)
    assert tested > 100 and sure > 0.8 * tested


def test_a_window_not_full_is_never_sure() -> None:
    rng = random.Random(7)
    window = TrendWindow(400)
    for i in range(399):
        window.push(2.0 - 0.004 * i + rng.gauss(0.0, 0.05))
    assert not window.surely_fell()
    assert window.surely_fell(pushing=0.4)  # (a clear fall, with the 400th value)
    assert not window.surely_fell(pushing=math.nan)
    assert not window.surely_fell(pushing=math.inf)
