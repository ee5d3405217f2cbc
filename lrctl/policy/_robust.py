"""The rolling median and IQR-based σ of the divergence guard's spike z-scores.

:class:`RobustWindow` keeps the last ``size`` values in arrival order (a deque)
and a sorted copy, from which the quartiles are read. The sorted copy is always
``sorted(values())`` — a stable sort of the arrival order, which the
value-by-value updates (an insertion after its equals, the removal of the first
of the leaving value's equals) keep exactly, ±0.0 included, as long as no NaN
(which has no place in an order) is among the values.

A window that keeps a *screen* (:meth:`RobustWindow.screen`, the divergence
guard's) is judged much less often than it changes: almost every value is told
apart by one comparison with ``limit``. Such a window lets its sorted copy fall
up to ``size // 8`` values behind (and no more than a quarter of the values it
holds) and brings it up to date with one sort (cheaper than that many insertions
and removals) when it is read or that far behind; while its screen can let no
value by, it keeps the copy value by value instead. Its ``limit`` stays sound
meanwhile, because ``p`` values in (and up to ``p`` out) move an order statistic by
at most ``p`` places: see :meth:`RobustWindow._screen`. A window of logs can also take raw values
(:meth:`RobustWindow.add_log`, screened against ``exp_limit``) and their logs
with that sort, all at once.

The arrival order is a bounded deque (a ring buffer in C: one append per value,
the oldest value leaving by itself); ``tests/policy/test_robust_window.py``
checks the window against its definition, computed from scratch.
"""

from __future__ import annotations

import functools
import math
from bisect import bisect_left, insort
from collections import deque
from math import exp, log

__all__ = ["RobustWindow"]

_INF = math.inf
#: A screen needs every value of the window within ±this: no difference of two of them,
#: nor a quartile, can then overflow (or be NaN).
_TAME = 1e300
_NEG_TAME = -_TAME
_SHY = 1.0 - 2.0**-40  # (see _exp_limit)
#: The least screen margin worth the rounding argument (a normal float, far from underflow).
_TINY = 1e-290
#: How much of the z threshold the screen lets through: below 1 by far more than the
#: rounding of the few operations between it and the full rule's z.
_SCREEN_SHARE = 0.99
#: A screened window's sorted copy may fall ``size // _BEHIND_SHARE`` values behind.
_BEHIND_SHARE = 8


class RobustWindow:
    """Median and IQR-based scale of the last ``size`` values (see the module docstring).

    The statistics are computed once per change of the window (:meth:`stats`);
    ``count`` is ``len(window)``.
    """

    __slots__ = ("_armed_at", "_cz", "_fifo", "_floor", "_granted", "_most", "_nan", "_pos",
                 "_raw", "_room", "_sorted", "_stats", "_wild", "exp_limit", "limit", "size")

    def __init__(self, size: int) -> None:
        self.size = size
        self._fifo: deque[float] = deque(maxlen=size)  # arrival order, oldest first
        self._raw: list[float] = []  # newer still: x of add_log(x), their logs not taken yet
        # sorted(values()), as of `_granted - _room` values ago (see the screen below).
        self._sorted: list[float] = []
        self._pos = _positions(0)  # where the quartiles of the sorted copy fall
        self._stats: tuple[float, float] | None = None  # (median, sigma) of the copy
        #: Adds to come, as of the sorted copy, before the last wild value (beyond
        #: ±1e300, or NaN) has left.
        self._wild = 0
        self._nan = 0  # likewise, before the last NaN has left (no place in an order)
        # The screen: none yet (`limit` stays -inf, so no value passes it, and the sorted
        # copy is kept value by value: the room it may fall behind by stays 0).
        self._cz = 0.0
        self._floor = 1.0
        self._armed_at = 0
        self._most = 0
        self._granted = self._room = 0
        self.limit = -_INF
        self.exp_limit = 0.0

    @property
    def count(self) -> int:
        n = len(self._fifo) + len(self._raw)
        return n if n < self.size else self.size

    def __len__(self) -> int:
        return self.count

    def add(self, value: float) -> None:
        if self._raw:
            self._flush()
        if self._room and _NEG_TAME < value < _TAME:
            # Screened: the sorted copy waits (the screen allows for it).
            self._fifo.append(value)
            self._room -= 1
            return
        fifo = self._fifo
        full = len(fifo) == self.size
        old = fifo[0] if full else 0.0
        fifo.append(value)
        self._stats = None
        if self._most and (self._room != self._granted or self._nan or value != value):
            # Screened, the sorted copy behind (or a NaN, which has no place in an order,
            # in the window): one sort, with this value.
            self._room -= 1  # (one more value behind)
            self._sync()
            if not -_TAME < value < _TAME:
                self._wild = self.size
                if value != value:
                    self._nan = self.size
                self._screen()
            return
        data = self._sorted
        insort(data, value)
        if full:
            del data[bisect_left(data, old)]
        else:
            self._pos = _positions(len(fifo))
        if self._most:
            # Screened, but the screen lets nothing by (a wild value in the window, too few
            # values for a margin, a margin past the floats): the copy is kept up to date
            # value by value, as an unscreened window's. A sort per value instead (each
            # value then takes the full rule, which reads the copy) cost a window of
            # 100 000 seconds per thousand values.
            if self._wild:
                self._wild -= 1
            if not -_TAME < value < _TAME:
                self._wild = self.size
            self._screen()

    def add_log(self, x: float) -> None:
        """``add(log(x))``, ``x`` finite and > 0. A screened window takes the log later,
        for all the values that wait for its next sort at once (the same logs: in a
        training loop, one call of a cold ``math.log`` costs about as much as the rest
        of the divergence guard's plain observation)."""
        if self._room:
            self._raw.append(x)
            self._room -= 1
            return
        self.add(log(x))

    def _flush(self) -> None:
        """The logs of the values added by add_log, into the arrival order."""
        raw = self._raw
        self._fifo.extend(map(log, raw))
        raw.clear()

    def _sync(self) -> None:
        """Bring the sorted copy up to date (``sorted(values())``) and the screen with it."""
        if self._raw:
            self._flush()
        behind = self._granted - self._room
        if behind:
            self._sorted = sorted(self._fifo)
            self._pos = _positions(len(self._fifo))
            self._stats = None
            self._wild = max(0, self._wild - behind)
            self._nan = max(0, self._nan - behind)
            self._granted = self._room = 0
        if self._most:
            self._screen()

    def screen(self, z_max: float, floor: float, armed_at: int = 0) -> None:
        """Keep :attr:`limit` for the rule ``outlier(value, z_max, floor)`` (``z_max``
        and ``floor`` > 0) of a caller that judges no value before the window holds
        ``armed_at`` values: a value below ``limit`` is no outlier by that rule, or the
        window is not armed yet (``limit`` is then ``inf``). A value at or above it may
        be either: the full rule decides.

        ``limit`` is a lower bound of the median plus 0.99 × ``z_max`` × a lower bound
        of σ (at least ``floor``), so a value below it has a z of at most about 0.99 ×
        ``z_max`` by the full rule (the few roundings in between are far smaller than
        the margin). While the window holds a value beyond ±1e300 (or NaN) ``limit`` is
        ``-inf``: no value passes, and the full rule decides.
        """
        self._cz = _SCREEN_SHARE * z_max
        self._floor = floor
        self._armed_at = armed_at
        self._most = max(1, self.size // _BEHIND_SHARE)
        self._wild = _wild(self.values(), self.size)
        self._nan = _wild(self.values(), self.size, nan_only=True)
        self._sync()

    def _screen(self) -> None:
        """``limit`` and ``_room`` for the sorted copy as it is (up to date): ``limit``
        holds for the next ``_room`` values added before it is brought up to date.

        ``p`` values in and ``r`` out (``r ≤ p``; ``r > 0`` once the window is full)
        leave the ``i``-th smallest value at least the copy's ``(i - p)``-th and at
        most its ``(i + r)``-th. The quartiles are interpolated between neighbours with
        a weight of at most 0.75, which rounds to no more than the upper one, so for the
        window then (positions ``l50``, ``l75``, ``h25`` of its length) the median is at
        least ``copy[l50 - p]``, the upper quartile at least ``copy[l75 - p]``, the
        lower at most ``copy[h25 + r]``, and σ (IQR / 1.349, monotone) at least their
        spread / 1.349. Those indices only move that way as ``p`` grows: the bound for
        the last of the ``_room`` values holds for all of them. With ``v < lo + q``
        (``lo`` the median's bound, ``q`` the margin, each rounded), ``v - median ≤ q``
        exactly, so the full rule's ``z ≤ q / σ'`` ≈ 0.99 × ``z_max`` (σ' = max(σ,
        floor) ≥ the bound; ``q`` a normal float, so no underflow spoils the ratio).
        """
        self.limit = self._screen_limit()
        self.exp_limit = _exp_limit(self.limit)

    def _screen_limit(self) -> float:
        """``limit`` (see :meth:`_screen`), and ``_room`` with it."""
        count, size = len(self._fifo), self.size
        if count < self._armed_at:  # not armed: no value is judged yet
            self._granted = self._room = self._armed_at - 1 - count
            return _INF
        # The room: up to size // 8 values, and a quarter of those in the window (a
        # filling window's screen, with more, would bound nothing: its median's bound is
        # the value p places below the middle).
        p = min(self._most, count // 4)
        data = self._sorted
        after = min(count + p, size)  # the window's length after p more values
        r = count + p - after  # of which r pushed out old ones
        (_, h25, _), (l50, _, _), (l75, _, _) = _positions(after)
        if self._wild or not p or l50 < p:
            # No value passes: each takes the full rule, and the copy is kept up to date
            # value by value (see add), never more than one value behind.
            self._granted = self._room = 0
            return -_INF
        self._granted = self._room = p
        spread = (data[l75 - p] - data[h25 + r]) / 1.349 if h25 + r < count else 0.0
        q = self._cz * (spread if spread > self._floor else self._floor)
        if not q >= _TINY:
            q = 0.0  # (a margin lost to underflow: the median's bound alone is sound)
        limit = data[l50 - p] + q
        if not limit < _INF:  # (a margin past the floats: no value passes, as above)
            self._granted = self._room = 0
            return -_INF
        return limit

    def _quantile(self, q: float) -> float:
        if self._room != self._granted:
            self._sync()
        data = self._sorted
        pos = q * (len(data) - 1)
        lo = math.floor(pos)
        hi = min(lo + 1, len(data) - 1)
        return data[lo] + (data[hi] - data[lo]) * (pos - lo)

    def stats(self) -> tuple[float, float]:
        """``(median(), sigma())``, computed once until the window changes.

        The same arithmetic as :meth:`_quantile`, with the positions for this length
        worked out once (``IndexError`` on an empty window, as ``_quantile`` raises).
        """
        if self._room != self._granted:
            self._sync()
        stats = self._stats
        if stats is None:
            data = self._sorted
            (l25, h25, f25), (l50, h50, f50), (l75, h75, f75) = self._pos
            q25 = data[l25] + (data[h25] - data[l25]) * f25
            median = data[l50] + (data[h50] - data[l50]) * f50
            q75 = data[l75] + (data[h75] - data[l75]) * f75
            stats = self._stats = (median, (q75 - q25) / 1.349)
        return stats

    def outlier(self, value: float, z_max: float,
                floor: float) -> tuple[float, float, float] | None:
        """``(median, sigma, z)`` when ``value`` lies more than ``z_max > 0`` robust σ
        above the median, σ being ``max(sigma(), floor)`` with ``floor > 0``; else ``None``.

        Most values are no outliers, and most are told apart without the quartiles:
        the median is at least the sorted value just below the middle, and σ at least
        ``floor``, so a value less than half of ``z_max × floor`` above that sorted
        value has a z below about ``z_max / 2`` (rounding is monotone, and tiny next to
        the factor 2). When the window's range overflows, its quartiles can be NaN:
        then the full computation decides, as always. (``tests/policy/
        test_stats_fastpath.py`` checks both ways agree bit for bit.)
        """
        if self._room != self._granted:
            self._sync()
        stats = self._stats
        if stats is None:
            data = self._sorted
            below_middle = data[self._pos[1][0]]
            if (value - below_middle < 0.5 * z_max * floor
                    and data[-1] - data[0] < _INF):
                return None
            stats = self.stats()
        median, sigma = stats
        sigma = max(sigma, floor)
        z = (value - median) / sigma
        if z <= z_max:
            return None
        return median, sigma, z

    def median(self) -> float:
        return self.stats()[0]

    def sigma(self) -> float:
        """Robust standard deviation: IQR / 1.349 (exact for a normal distribution)."""
        return self.stats()[1]

    def values(self) -> list[float]:
        """The values in arrival order, oldest first."""
        if self._raw:
            self._flush()
        return list(self._fifo)

    def load(self, values: list[float]) -> None:
        kept = values[-self.size:] if self.size else []
        self._stats = None
        self._raw.clear()
        self._fifo = deque(kept, maxlen=self.size)
        self._sorted = sorted(self._fifo)
        self._granted = self._room = 0
        count = len(self._fifo)
        self._pos = _positions(count)
        self._wild = _wild(kept, self.size)
        self._nan = _wild(kept, self.size, nan_only=True)
        self._sync()


def _wild(values: list[float], size: int, nan_only: bool = False) -> int:
    """Values to come before the last wild one of ``values`` (a window of ``size``, in
    arrival order) has left: it leaves after those before it, and the room left.
    ``nan_only``: the last NaN."""
    return max((size - len(values) + i + 1 for i, v in enumerate(values)
                if (v != v if nan_only else not -_TAME < v < _TAME)), default=0)


def _exp_limit(limit: float) -> float:
    """A bound below which a positive ``x`` surely has ``log(x) < limit``: ``exp(limit)``
    less 2**-40 of it, far more than the rounding of ``exp`` and ``log`` (about 1e-16
    relative, and 1e-13 absolute on a log of at most 745); ``exp`` kept within the normal
    floats (a lower bound is always sound)."""
    if limit == _INF:
        return _INF
    if limit < -700.0:
        return 0.0
    return exp(limit if limit < 700.0 else 700.0) * _SHY


_Position = tuple[int, int, float]


@functools.lru_cache(maxsize=4096)  # (a window filling up asks for every length in turn)
def _positions(n: int) -> tuple[_Position, _Position, _Position]:
    """Where the 0.25, 0.5 and 0.75 quantiles of ``n`` sorted values fall: ``(lo, hi,
    pos - lo)`` as :meth:`RobustWindow._quantile` computes them."""
    out = []
    for q in (0.25, 0.5, 0.75):
        pos = q * (n - 1)
        lo = math.floor(pos)
        out.append((lo, min(lo + 1, n - 1), pos - lo))
    return out[0], out[1], out[2]
