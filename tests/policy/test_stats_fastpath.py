"""``RobustWindow.outlier``'s shortcut (no quartiles for a value near the middle) decides
exactly as the full computation, down to the bits of its evidence."""

from __future__ import annotations

import math
import struct
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from lrctl.policy.stats import RobustWindow


def _full(window: RobustWindow, value: float, z_max: float,
          floor: float) -> tuple[float, float, float] | None:
    """The rule without the shortcut: the quartiles, then the z-score."""
    median, sigma = window._quantile(0.5), (window._quantile(0.75)
                                             - window._quantile(0.25)) / 1.349
    sigma = max(sigma, floor)
    z = (value - median) / sigma
    return None if z <= z_max else (median, sigma, z)


def _bits(hit: Any) -> Any:
    return None if hit is None else [struct.pack(">d", x) for x in hit]


finite = st.floats(allow_nan=False, allow_infinity=False)
near = st.floats(min_value=-5, max_value=5)
extreme = st.sampled_from([1e308, -1e308, 1.7e308, -1.7e308, 5e-324, 0.0, -0.0])
anything = st.one_of(near, near, finite, extreme, st.sampled_from([math.inf, -math.inf,
                                                                   math.nan]))


@settings(max_examples=500, deadline=None)
@given(size=st.integers(1, 12),
       values=st.lists(st.one_of(near, near, near, finite, extreme), min_size=1, max_size=30),
       probes=st.lists(anything, min_size=1, max_size=5),
       z_max=st.one_of(st.floats(min_value=1e-300, max_value=1e300), st.just(6.0)),
       floor=st.one_of(st.floats(min_value=1e-300, max_value=1e300), st.just(0.05)))
def test_outlier_is_the_full_rule_bit_for_bit(size: int, values: list[float],
                                             probes: list[float], z_max: float,
                                             floor: float) -> None:
    window = RobustWindow(size)
    for v in values:
        window.add(v)
        for probe in probes:
            want = _full(window, probe, z_max, floor)
            assert _bits(window.outlier(probe, z_max, floor)) == _bits(want)
    window.stats()  # the cached quartiles take the other way: the same answers
    for probe in probes:
        assert _bits(window.outlier(probe, z_max, floor)) == _bits(
            _full(window, probe, z_max, floor))


def test_the_shortcut_is_taken_for_ordinary_values() -> None:
    window = RobustWindow(128)
    for i in range(128):
        window.add(math.sin(i) * 0.05)
    assert window.outlier(0.01, 6.0, 0.05) is None
    assert window._stats is None  # decided without the quartiles
    assert window.outlier(10.0, 6.0, 0.05) is not None
