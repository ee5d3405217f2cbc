"""A cheap, certain "fell" for the two-half trend test (:meth:`TrendWindow.test`).

The test costs several passes of Python-level float arithmetic over the window
(residuals around each half's least-squares line, their squares and lag-1
products), and on a falling loss, its usual verdict is "fell" by a wide margin.
:func:`surely_fell` bounds the test's standard error from above with a few passes
of C-level arithmetic (``sum``, ``math.dist``) and says True only when even that
bound gives a z above the critical value: then the test itself says "fell". When
it says False, nothing is known (the caller runs the test).

The bound, per half of ``h`` values ``v`` with mean ``m`` (the test's own,
computed alike) and first differences ``Δv``:

* the residuals' sum of squares ``S`` is at most ``D = Σ (v - m)²`` (a
  least-squares line leaves no more than a flat one), and the test's rounding
  moves it by a relative ~1e-13;
* ``S - L`` (``L`` the lag-1 sum of the residuals) is ``½ (Σ (Δr)² + r₀² +
  r_last²)`` exactly, and ``Δr = Δv - slope``, so it is at least ``½ G`` with ``G =
  min over s of Σ (Δv - s)² = Σ Δv² - (v_last - v₀)² / (h - 1)``;
* so ``tau = (1 + rho) / (1 - rho) = 2S / (S - L) - 1`` is at most ``2U / W - 1``
  (``U ≥ S``, ``W ≤ S - L``; at least 1 and at most 39, as the test clips it), and
  ``se² = 2 var tau / h`` with ``var = S / (n - 4)``.

The slack (1e-9 relative on ``U`` and ``G``, 1e-6 on the final comparison) is many
orders of magnitude above the test's rounding errors; values beyond ±1e100, or a
scale below 1e-200, are left to the test (no overflow, no underflow, no NaN in
either computation then). ``tests/policy/test_trend_bound.py`` checks that a True
is always the test's "fell".
"""

from __future__ import annotations

from math import dist

__all__ = ["RHO_MAX", "surely_fell"]

_BIG = 1e100  # every value within ±this: no sum, square or product in the test overflows
_SMALL = 1e-200  # the squares' scale above this: no rounding error of the test underflows
#: The test clips its autocorrelation estimate to this (tau ≤ 39).
RHO_MAX = 0.95
_TAU_MAX = (1.0 + RHO_MAX) / (1.0 - RHO_MAX)


def surely_fell(data: list[float], alpha_z: float, margin: float, delta: float) -> bool:
    """Whether the trend test of the full window ``data`` (``len(data)`` even, ≥ 8) at
    the critical value ``alpha_z`` certainly says "fell" (see the module docstring)."""
    n = len(data)
    h = n // 2
    if not (min(data) > -_BIG and max(data) < _BIG):
        return False
    older, newer = data[:h], data[h:]
    m_old, m_new = sum(older) / h, sum(newer) / h  # (as the test computes them)
    drop = m_old - m_new - margin * abs(m_old) - delta
    if not drop > 0.0:
        return False
    upper = spread = 0.0
    for half, mean in ((older, m_old), (newer, m_new)):
        dev = dist(half, [mean] * h)
        steps = dist(half[1:], half[:-1])
        end = half[-1] - half[0]
        upper += dev * dev
        g = (steps * steps * (1.0 - 1e-9) - end * end / (h - 1) * (1.0 + 1e-9)
             - 1e-9 * dev * dev)
        if g > 0.0:
            spread += 0.5 * g
    if not upper > _SMALL:
        return False
    upper *= 1.0 + 1e-9
    tau = _TAU_MAX
    if spread > 0.0:
        tau = min(tau, max(1.0, 2.0 * upper / spread - 1.0) * (1.0 + 1e-9))
    se2 = 2.0 * (upper / (n - 4)) * tau / h
    return drop * drop > alpha_z * alpha_z * se2 * (1.0 + 1e-6)
