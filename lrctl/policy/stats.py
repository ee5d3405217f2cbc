"""The statistics core: every verdict a reactive policy takes is a test, not a glance.

Per-step training losses are noisy, heavy-tailed and autocorrelated (a run of
hard batches, momentum). Comparing one sample with another, or with the best
sample of a series, decides on noise: the minimum of a noisy series is a low
outlier, so "no sample beat the best" becomes true by chance. The tools here
compare *smoothed estimates* with a noise estimate that accounts for
autocorrelation, and each verdict has a stated false-positive rate.

* :class:`SmoothedLevel`: an exponential moving average with bias correction
  (Adam's ``1 - beta**n``) and a warm-up count before any verdict may use it.
* :class:`TrendWindow`: the last ``window`` values split into an older and a
  newer half. :meth:`TrendWindow.test` compares the halves' means with a
  z-statistic whose standard error uses the lag-1 autocorrelation of the
  values around their half means (the AR(1) integrated autocorrelation time,
  ``tau = (1 + rho) / (1 - rho)``: the effective sample size is ``n / tau``, as
  the batch-means estimators of SASA and SALSA account for). A *linear trend*
  inside the window does not inflate the noise estimate, because residuals are
  taken around each half's own least-squares line.

  Verdicts at one-sided level ``alpha``: ``"fell"`` (the newer half is lower by
  more than ``margin`` × the level, significantly), ``"rose"`` (higher,
  significantly), else ``"flat"``. On stationary noise — i.i.d., AR(1) with
  ``phi`` ≤ 0.9, or Student-t with 3 degrees of freedom, at any level and
  scale — ``"fell"`` and ``"rose"`` each fire at most :data:`FALSE_VERDICT_RATE`
  of the time when the window holds at least 20 autocorrelation times
  (``window ≥ 20 tau``: 40 for i.i.d. noise, 400 for ``phi = 0.9``);
  ``tests/policy/test_stats_properties.py`` checks it. A *stall* is "not fell":
  it is the verdict on a flat series, and on a falling one it fires only when
  the fall per half-window is lost in the noise. :meth:`TrendWindow.surely_fell`
  tells a certain "fell" from a cheap bound (:mod:`._trend_bound`), so that a
  caller runs the test only when it may act.
* :class:`RobustWindow` (:mod:`._robust`): median and IQR-based σ of a rolling
  window, for spike z-scores (the divergence guard's "spiked": ``z`` robust σ
  above the median; at ``z = 6`` a normal value exceeds it with probability 1e-9
  per step), with a screen that tells ordinary values apart at a comparison.

Everything here is pure, deterministic and JSON-serialisable through the
owning policy's ``state_dict``.
"""

from __future__ import annotations

import functools
import math
from collections import deque
from itertools import islice, repeat
from operator import mul, sub
from statistics import NormalDist

from ._robust import RobustWindow
from ._trend_bound import RHO_MAX, surely_fell

__all__ = ["FALSE_VERDICT_RATE", "RobustWindow", "SmoothedLevel", "TrendTest", "TrendWindow",
           "z_for"]

#: The highest rate at which "fell" or "rose" fires on stationary noise (see module doc),
#: for the default ``alpha`` of 0.01; measured rates are lower (the property tests).
FALSE_VERDICT_RATE = 0.05
_INF = math.inf
_RHO_MAX = RHO_MAX  # an autocorrelation estimate above this is clipped (tau ≤ 39)


@functools.lru_cache(maxsize=64)
def z_for(alpha: float) -> float:
    """The one-sided standard-normal quantile for level ``alpha``."""
    if not 0 < alpha < 0.5:
        raise ValueError(f"alpha must be in (0, 0.5), but got {alpha=}")
    return NormalDist().inv_cdf(1.0 - alpha)


class SmoothedLevel:
    """A bias-corrected EMA of span ``span`` (``alpha = 2 / (span + 1)``).

    ``value`` is ``None`` until the first update; ``ready`` once ``warmup``
    values went in (no verdict from an unsmoothed start).
    """

    __slots__ = ("_biased", "alpha", "count", "warmup")

    def __init__(self, span: int, warmup: int | None = None) -> None:
        if span < 1:
            raise ValueError(f"span must be at least 1, but got {span=}")
        self.alpha = 2.0 / (span + 1.0)
        self.warmup = span if warmup is None else warmup
        self._biased = 0.0
        self.count = 0

    def update(self, x: float) -> float:
        self.count += 1
        self._biased = self.alpha * x + (1.0 - self.alpha) * self._biased
        return self._biased / (1.0 - (1.0 - self.alpha) ** self.count)

    @property
    def value(self) -> float | None:
        if self.count == 0:
            return None
        return self._biased / (1.0 - (1.0 - self.alpha) ** self.count)

    @property
    def ready(self) -> bool:
        return self.count >= self.warmup

    def state(self) -> list[float]:
        return [self._biased, self.count]

    def load(self, state: list[float]) -> None:
        self._biased, self.count = float(state[0]), int(state[1])


class TrendTest:
    """The outcome of :meth:`TrendWindow.test`: the halves' means, their
    difference's standard error, ``tau`` and the verdict."""

    __slots__ = ("fall_upper", "newer", "older", "se", "tau", "verdict", "z")

    def __init__(self, older: float, newer: float, se: float, tau: float, z: float,
                 verdict: str, fall_upper: float) -> None:
        self.older, self.newer, self.se, self.tau, self.z = older, newer, se, tau, z
        self.verdict = verdict
        #: The one-sided upper confidence bound (level ``alpha``) of the fall
        #: ``older - newer``: the fall is shown smaller than anything above it.
        self.fall_upper = fall_upper

    def stalled(self, margin: float = 0.0, delta: float = 0.0) -> bool:
        """Whether the fall is *shown* smaller than ``margin × |older| + delta``: its
        upper confidence bound lies below that (an equivalence test). Noise too large to
        tell keeps this False — where "not fell" would be True."""
        return self.fall_upper < margin * abs(self.older) + delta

    def evidence(self) -> dict[str, float | str]:
        return {"older_mean": self.older, "newer_mean": self.newer, "se": self.se,
                "tau": self.tau, "z": self.z, "verdict": self.verdict,
                "fall_upper": self.fall_upper}


class TrendWindow:
    """The last ``window`` values (``window`` even, ≥ 8) and a two-half trend test."""

    __slots__ = ("_values", "window")

    def __init__(self, window: int) -> None:
        if window < 8:
            raise ValueError(f"window must be at least 8, but got {window=}")
        self.window = window - window % 2
        self._values: deque[float] = deque(maxlen=self.window)

    def __len__(self) -> int:
        return len(self._values)

    @property
    def full(self) -> bool:
        return len(self._values) == self.window

    def push(self, x: float) -> bool:
        """Append ``x`` (the oldest value leaves a full window); whether it is full now."""
        values = self._values
        values.append(x)
        return len(values) == self.window

    def push_short(self, x: float) -> bool:
        """Append ``x`` unless the window would then be full (it is not yet); whether it
        did."""
        values = self._values
        if len(values) + 1 < self.window:
            values.append(x)
            return True
        return False

    def clear(self) -> None:
        self._values.clear()

    def values(self) -> list[float]:
        return list(self._values)

    def load(self, values: list[float]) -> None:
        self._values = deque(values[-self.window:], maxlen=self.window)

    def surely_fell(self, alpha: float = 0.01, margin: float = 0.0, delta: float = 0.0,
                    pushing: float | None = None) -> bool:
        """True only when :meth:`test` (with these arguments; after pushing ``pushing``,
        when given) would say "fell", told from a bound at a fraction of its cost
        (:mod:`lrctl.policy._trend_bound`). False: it may say anything, or the window
        is not full."""
        values = self._values
        if len(values) + (pushing is not None) < self.window:
            return False
        data = list(values)
        if pushing is not None:
            data.append(pushing)
            if len(data) > self.window:
                del data[0]
        return surely_fell(data, z_for(alpha), margin, delta)

    def test(self, alpha: float = 0.01, margin: float = 0.0,
             delta: float = 0.0) -> TrendTest | None:
        """Compare the newer half's mean with the older half's; None until full.

        ``margin``: a fall must exceed ``margin × |older mean|`` to count (a
        relative improvement threshold, as ReduceLROnPlateau's ``threshold``);
        ``delta``: and ``delta`` in the metric's own units (an absolute one, as
        early stopping's ``min_delta``).
        """
        if not self.full:
            return None
        data = list(self._values)
        h = self.window // 2
        older, newer = data[:h], data[h:]
        m_old, m_new = sum(older) / h, sum(newer) / h
        # Residuals around each half's own least-squares line: a smooth trend (the
        # usual falling loss) is not mistaken for noise or for autocorrelation.
        # (The sums run over map(): the same products, added in the same order as a
        # generator would give them, without a Python frame per value.)
        res_old, res_new = _detrended(older, m_old), _detrended(newer, m_new)
        res = res_old + res_new
        var = sum(map(mul, res, res)) / (self.window - 4)
        if var <= 0.0:
            tau = 1.0
        else:
            # Lag-1 products within each half (not across the boundary between them).
            lag = sum(map(mul, res_old, islice(res_old, 1, None)))
            lag += sum(map(mul, res_new, islice(res_new, 1, None)))
            rho = min(max(lag / (var * (self.window - 4)), 0.0), _RHO_MAX)
            tau = (1.0 + rho) / (1.0 - rho)
        se = math.sqrt(2.0 * var * tau / h)
        z_crit = z_for(alpha)
        drop = m_old - m_new - margin * abs(m_old) - delta
        if se == 0.0:
            z = math.inf if drop > 0 else (-math.inf if m_new > m_old else 0.0)
        else:
            z = drop / se
        rise_z = (m_new - m_old) / se if se > 0 else (math.inf if m_new > m_old else 0.0)
        if z > z_crit:
            verdict = "fell"
        elif rise_z > z_crit:
            verdict = "rose"
        else:
            verdict = "flat"
        return TrendTest(m_old, m_new, se, tau, z, verdict, m_old - m_new + z_crit * se)


def _detrended(values: list[float], mean: float) -> list[float]:
    """``values`` minus their least-squares line over the index:
    ``v - mean - slope * (i - centre)``, with ``slope = Σ (i - centre)(v - mean) / sxx``."""
    offsets, sxx = _centred_index(len(values))
    deviations = list(map(sub, values, repeat(mean)))
    slope = sum(map(mul, offsets, deviations)) / sxx
    return list(map(sub, deviations, map(mul, repeat(slope), offsets)))


@functools.lru_cache(maxsize=16)
def _centred_index(n: int) -> tuple[tuple[float, ...], float]:
    """``i - centre`` for ``i < n`` and their sum of squares ``sxx``, for :func:`_detrended`."""
    centre = (n - 1) / 2.0
    return tuple(i - centre for i in range(n)), n * (n * n - 1) / 12.0
