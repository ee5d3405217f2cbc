"""A screened window's work per value stays small when the screen lets nothing by.

An adversarial pass's find: a divergence guard with ``window: 100000`` (allowed) sorted
its whole window again at every value while it filled (its screen bound nothing until
an eighth of it was in), and for a whole window's length after one value beyond ±1e300:
seconds per thousand observations, on the controller's loop, for every run. Counted
here in sorts, not seconds; the verdicts are checked against an unscreened window.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from lrctl.policy import _robust
from lrctl.policy._robust import RobustWindow

Z, FLOOR = 6.0, 0.05


@contextmanager
def counted_sorts(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    count = [0]

    def counting(values, *args, **kwargs):  # type: ignore[no-untyped-def]
        count[0] += 1
        return sorted(values, *args, **kwargs)

    monkeypatch.setattr(_robust, "sorted", counting, raising=False)
    yield count


def _feed(values: list[float], size: int) -> list[tuple[float, float, float] | None]:
    """Each value's verdict as the divergence guard takes it (the screen, then the full
    rule), from a screened window and from a plain one, which must agree."""
    screened, plain = RobustWindow(size), RobustWindow(size)
    screened.screen(Z, FLOOR, 32)
    verdicts = []
    for i, v in enumerate(values):
        if i >= 31:
            full = plain.outlier(v, Z, FLOOR)
            fast = None if v < screened.limit else screened.outlier(v, Z, FLOOR)
            assert fast == full, (i, v)
            verdicts.append(full)
        screened.add(v)
        plain.add(v)
    return verdicts


@pytest.mark.parametrize("wild_at", [None, 1000])
def test_a_big_window_filling_sorts_rarely_and_judges_exactly(
        monkeypatch: pytest.MonkeyPatch, wild_at: int | None) -> None:
    rng = random.Random(7)
    values = [rng.gauss(0.0, 0.1) for _ in range(4000)]
    for i in range(500, 4000, 450):
        values[i] = 5.0  # spikes the full rule must still find
    if wild_at is not None:
        values[wild_at] = 1e301
    verdicts = _feed(values, 100_000)  # (the plain window sorts nothing: it inserts)
    assert sum(v is not None for v in verdicts) >= 7
    with counted_sorts(monkeypatch) as sorts:
        window = RobustWindow(100_000)
        window.screen(Z, FLOOR, 32)
        for v in values:
            if not v < window.limit:
                window.outlier(v, Z, FLOOR)
            window.add(v)
    assert sorts[0] <= 60, sorts[0]  # (one per value before: ~4 000)


@pytest.mark.parametrize("knobs", ["loss_scale: linear", "min_sigma: 1.0e+308"])
def test_a_guard_whose_screen_bounds_nothing_sorts_rarely(
        monkeypatch: pytest.MonkeyPatch, knobs: str) -> None:
    """A review's finds: a linear-scale guard's loss window was screened for a rule that
    never reads the screen (and sorted the window at every value), and a margin past the
    floats (``min_sigma: 1e308``) let the screen grant room it could not use."""
    import lrctl

    engine = lrctl.load_policy("version: 1\npolicies:\n  - kind: divergence\n"
                               f"    window: 100000\n    {knobs}\n", [0.1])
    rng = random.Random(3)
    with counted_sorts(monkeypatch) as sorts:
        for step in range(3000):
            engine.observe(step, 1.0 + rng.random() * 0.1, 1.0 + rng.random() * 0.1)
    assert sorts[0] <= 100, sorts[0]  # (one per value before)
