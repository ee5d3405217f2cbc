"""Which metric points an observation yields, and bounded series for pictures.

A chart of the LR must be a faithful step curve of the LR the optimizer used,
yet a week-long run cannot send MLflow a point per step per group. MLflow draws
straight lines between points, so a change from ``a`` (used up to step ``t-1``)
to ``b`` (from step ``t``) is logged as two points, ``(t-1, a)`` and ``(t, b)``:
the line between them is then vertical to within one step, and every level in
between is flat. Between changes a point every ``log_every`` steps keeps the
chart's tooltips and the latest value current.

Those periodic points thin out as a run grows long (:func:`periodic_step`):
``log_every`` apart for the first :data:`DENSE_POINTS` of them, then twice as far
apart for the next as many, and so on, so that a run's periodic points grow with
the logarithm of its length. A soak run at 600 steps/s logged 12 points a second
with a fixed spacing: a week would have been 7 M points per metric in MLflow (6.3 GB
of sqlite, a UI that cannot draw them) and 1.3 GB of journal that ``lrctl report``
reads whole; thinned, it is ~24 000 points per metric. Changes and decisions keep
their points at every spacing: the LR curve stays exact, and each decision's mark
keeps the numbers that triggered it.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

__all__ = ["DECISION", "DENSE_POINTS", "EVENT_PREFIX", "GRAD_NORM", "LOSS", "LR_PREFIX",
           "Downsampler", "MetricSampler", "Point", "event_key", "lr_key", "periodic_step"]

LOSS = "lrctl/loss"
GRAD_NORM = "lrctl/grad_norm"
DECISION = "lrctl/decision"
EVENT_PREFIX = "lrctl/event/"
LR_PREFIX = "lrctl/lr/g"
_NOT_IN_KEY = re.compile(r"[^A-Za-z0-9_.-]")
#: (key, value, step)
Point = tuple[str, float, int]
_MAX_PENDING_DECISION_STEPS = 64


#: Periodic points at the run's first spacing (``log_every``), and at each spacing after
#: it (twice the one before): see :func:`periodic_step`.
DENSE_POINTS = 2000


def periodic_step(step: int, log_every: int) -> bool:
    """Whether ``step`` gets the periodic points: every ``log_every`` steps up to step
    ``log_every × DENSE_POINTS``, then every ``2 × log_every`` for twice as many steps,
    every ``4 × log_every`` for four times as many, ...: :data:`DENSE_POINTS` points at
    each spacing. A function of the step alone, so a restart or a replay logs the same
    steps. (With 50: every 50 steps to 100 000, every 100 to 300 000, every 200 to
    700 000, every 400 to 1 500 000.)"""
    doublings = (step // (log_every * DENSE_POINTS) + 1).bit_length() - 1 if step > 0 else 0
    return step % (log_every << doublings) == 0


def lr_key(group: int) -> str:
    return f"{LR_PREFIX}{group}"


def event_key(action: str) -> str:
    """``lrctl/event/<action>``: one chart per kind of decision (backoff, reduce, ...)."""
    return EVENT_PREFIX + (_NOT_IN_KEY.sub("_", action)[:200] or "unknown")


class MetricSampler:
    """Turns one run's observations into the metric points worth keeping.

    LR points: at the first observation, at every change (closing the old level
    at the step before it) and every ``log_every`` steps (thinned in long runs: see
    :func:`periodic_step`). Loss and grad norm: at those same periodic steps and at
    each decision step, so a decision's mark on a chart has the numbers that
    triggered it next to it.
    """

    def __init__(self, log_every: int = 50) -> None:
        if isinstance(log_every, bool) or not isinstance(log_every, int) or log_every < 1:
            raise ValueError(f"log_every must be a positive integer, but got {log_every=}")
        self.log_every = log_every
        self._reset()

    def _reset(self) -> None:
        self._lrs: tuple[float, ...] | None = None  # LRs of the previous observation
        self._step: int | None = None  # the previous observation's step
        self._lr_logged_step: int | None = None
        self._stats: tuple[int, float | None, float | None] | None = None
        self._stats_logged_step: int | None = None
        self._decision_steps: set[int] = set()  # decisions seen before their observation
        self._redo_until = -1  # steps a rewind undid: each observed one gets its points

    def rewind(self, seen_up_to: int) -> None:
        """The run resumed from an earlier checkpoint: the steps after it up to
        ``seen_up_to`` were undone, and their points in MLflow (which cannot delete them)
        are wrong. Each of those steps observed again gets its LR, loss and grad norm
        points, later than the undone ones (the later point stands)."""
        redo = max(self._redo_until, seen_up_to)  # (undone before and not redone yet too)
        self._reset()
        self._redo_until = redo

    def seed(self, step: int, lrs: Sequence[float], redo_until: int = -1) -> None:
        """A reopened run: its journal's last LR points were ``lrs`` at ``step``. The
        run's first change from them closes the old level at the step before it, as a
        change within the run does (a fresh sampler would draw a ramp from ``step``).
        ``redo_until``: a rewind's undone steps up to it still want their points."""
        self._lrs, self._step, self._lr_logged_step = tuple(map(float, lrs)), None, step
        self._redo_until = redo_until

    def observe(self, step: int, loss: float | None, grad_norm: float | None,
                lrs: Sequence[float]) -> list[Point]:
        points: list[Point] = []
        lrs_t = tuple(map(float, lrs))
        periodic = periodic_step(step, self.log_every) or step <= self._redo_until
        changed = lrs_t != self._lrs
        if changed:
            # The old LRs ran through step - 1: a hook reporting every N-th step says
            # where they changed in its unreported steps (lr_change, before this), so
            # the steps since the last observation ran on them (closed at the last
            # observed step, the chart drew a ramp across the unreported steps).
            points += self._close_level(step, len(lrs_t))
        if changed or periodic:
            points += [(lr_key(g), lr, step) for g, lr in enumerate(lrs_t)]
            self._lr_logged_step = step
        self._stats = (step, loss, grad_norm)
        if periodic or self._stats_logged_step is None or step in self._decision_steps:
            points += self._stat_points()
        if self._decision_steps:
            self._decision_steps = {s for s in self._decision_steps if s > step}
        self._lrs, self._step = lrs_t, step
        return points

    def lr_change(self, step: int, lrs: Sequence[float]) -> list[Point]:
        """The LRs changed at ``step``, a step between two observations (``every=N``: the
        hook reports what its unreported steps ran on): their points, no statistics."""
        lrs_t = tuple(map(float, lrs))
        if lrs_t == self._lrs:
            return []
        # The old LRs ran through step - 1 (unreported steps): a point there keeps the
        # chart a step curve (at the last observed step, it would draw a ramp).
        points = self._close_level(step if self._step is None else max(step, self._step + 1),
                                   len(lrs_t))
        points += [(lr_key(g), lr, step) for g, lr in enumerate(lrs_t)]
        self._lrs, self._step, self._lr_logged_step = lrs_t, step, step
        return points

    def ran(self, step: int, lrs: Sequence[float]) -> list[Point]:
        """The last observed step, ``step``, ran on ``lrs``, not on the LRs it was observed
        with (a sync hook ran it without its answer): its points again, to be logged after
        the first (where a step has two points, the later one stands); none for another
        step, or the same LRs."""
        lrs_t = tuple(map(float, lrs))
        if step != self._step or self._lrs is None or lrs_t == self._lrs or len(
                lrs_t) != len(self._lrs):
            return []
        points: list[Point] = []
        if self._lr_logged_step != step:  # (no point there: the level before went on)
            points += self._close_level(step, len(lrs_t))
        points += [(lr_key(g), lr, step) for g, lr in enumerate(lrs_t)]
        self._lrs, self._lr_logged_step = lrs_t, step
        return points

    def _close_level(self, changed_at: int, groups: int) -> list[Point]:
        """Points of the old LRs at ``changed_at - 1``, their last step, unless logged."""
        until = changed_at - 1
        if self._lrs is None or len(self._lrs) != groups or (
                self._lr_logged_step is not None and until <= self._lr_logged_step):
            return []
        return [(lr_key(g), lr, until) for g, lr in enumerate(self._lrs)]

    def finish(self) -> list[Point]:
        """The run ended: the last observed LRs and statistics, so curves reach the end."""
        if self._lrs is None or self._step is None:
            return []
        points: list[Point] = []
        if self._lr_logged_step != self._step:
            points += [(lr_key(g), lr, self._step) for g, lr in enumerate(self._lrs)]
            self._lr_logged_step = self._step
        return points + self._stat_points()

    def decision(self, step: int) -> list[Point]:
        """A decision at ``step``: the loss and grad norm of that step, once."""
        if self._stats is not None and self._stats[0] == step:
            return self._stat_points()
        if (self._stats is None or step > self._stats[0]) and (
                len(self._decision_steps) < _MAX_PENDING_DECISION_STEPS):
            self._decision_steps.add(step)  # its observation comes next
        return []

    def _stat_points(self) -> list[Point]:
        assert self._stats is not None
        step, loss, grad_norm = self._stats
        if self._stats_logged_step == step:
            return []
        self._stats_logged_step = step
        out: list[Point] = []
        if loss is not None:
            out.append((LOSS, float(loss), step))
        if grad_norm is not None:
            out.append((GRAD_NORM, float(grad_norm), step))
        return out


class Downsampler:
    """At most ``capacity`` (x, y) points of an unbounded series, evenly thinned.

    Keeps every ``stride``-th point and doubles the stride when full, so memory
    stays bounded for any run length and the kept points stay evenly spread;
    the last point seen is always kept, so a curve reaches its end.
    """

    def __init__(self, capacity: int = 4000) -> None:
        if capacity < 4:
            raise ValueError(f"capacity must be >= 4, but got {capacity=}")
        self.capacity = capacity
        self.stride = 1
        self._seen = 0
        self._xs: list[float] = []
        self._ys: list[float] = []
        self._last: tuple[float, float] | None = None

    def drop_after(self, x: float) -> None:
        """Forget the points past ``x`` (steps a resume undid)."""
        keep = [i for i, v in enumerate(self._xs) if v <= x]
        self._xs, self._ys = [self._xs[i] for i in keep], [self._ys[i] for i in keep]
        if self._last is not None and self._last[0] > x:
            self._last = None

    def add(self, x: float, y: float) -> None:
        # A second point at the step of the last one replaces it: the later one stands (a
        # correction of that step's LR, see MetricSampler.ran).
        if self._last is not None and self._last[0] == x:
            self._last = (x, y)
            return
        if self._last is None and self._xs and self._xs[-1] == x:
            self._ys[-1] = y
            return
        if self._seen % self.stride == 0:
            self._xs.append(x)
            self._ys.append(y)
            if len(self._xs) > self.capacity:
                self._xs, self._ys = self._xs[::2], self._ys[::2]
                self.stride *= 2
            self._last = None
        else:
            self._last = (x, y)
        self._seen += 1

    def __len__(self) -> int:
        return len(self._xs) + (self._last is not None)

    def points(self) -> tuple[list[float], list[float]]:
        xs, ys = list(self._xs), list(self._ys)
        if self._last is not None:
            xs.append(self._last[0])
            ys.append(self._last[1])
        return xs, ys

