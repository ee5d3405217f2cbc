"""The quiet way through ``ctl.step()``: a step between reports (``every=N``), or one
``every="auto"`` only adds to its pending batch, with finite host values and nothing
to send, changes exactly what the full way (:meth:`Reporting._step_fully
<lrctl._hook_report.Reporting._step_fully>`) would, and no more: no frame, no read
unless an answer is due. In a training loop Python pays for every cold object and
call, so this path reads a few attributes and returns.

A mixin of :class:`~lrctl.hook.Controller`, whose attributes these methods use.
"""

from __future__ import annotations

import math
from time import perf_counter
from typing import TYPE_CHECKING, Any

from ._batching import Batching

if TYPE_CHECKING:
    from ._guard import StepGuard
    from ._link import Link
    from ._staging import DeviceStaging

__all__ = ["QuietSteps"]

_INF = math.inf


class QuietSteps:
    """Steps that report nothing (see the module docstring)."""

    if TYPE_CHECKING:  # what it uses of the Controller (for type checkers only)
        every: int
        scaler: Any
        should_skip: bool
        rolled_back: int | None
        _step: int
        _acked: int
        _reported: int
        _held: dict[int, list[float]]
        _batch: Batching | None
        _link: Link | None
        _guard: StepGuard
        _staging: DeviceStaging
        _metrics: dict[str, Any]
        _quiet_allowed: bool
        _order_known: bool
        _last_stepped: int
        _excused: bool
        _calls_without_step: int
        _intervals_with_extra: int
        _unreported_loss: Any
        _unreported_grad: Any

        def _interval_ended(self) -> None: ...
        def _promote(self) -> None: ...
        def _apply(self) -> None: ...

    def _quietly(self, batch: Batching | None, loss: float, grad_norm: float | None) -> bool:
        """A step that reports nothing: with ``every=N`` one between reports with finite
        host values, with ``every="auto"`` one that only joins the pending batch (nothing
        standing out). It changes exactly what :meth:`_step_fully` and the apply after it
        would, and no more. False, having changed nothing, for any other step.

        In a training loop Python pays for every cold object and call (about a
        microsecond each), so the test and the usual bookkeeping are written out here
        in one call. What cannot change after ``attach`` (sync, rollbacks,
        ``base="loop"``, ranks, the pre-step hook until :meth:`close`) is
        :attr:`_quiet_allowed`, decided once; every="auto"'s clock is left to the next
        full-way step. An answer still awaited is read as the full way reads it
        (:meth:`_quiet_answer`).
        """
        if batch is None and (not self._step % self.every or not -_INF < loss < _INF
                              or (grad_norm is not None and not -_INF < grad_norm < _INF)):
            return False
        link = self._link
        guard = self._guard
        stepped = guard.stepped
        if not (self._quiet_allowed and link is not None and link.fatal is None
                and link.idle and not self._metrics and self.scaler is None
                and self._order_known and not (self._staging.used and self._staging)
                and not (stepped == self._last_stepped and stepped > 0 and not self._excused)):
            return False
        if batch is None:
            self._unreported_loss, self._unreported_grad = loss, grad_norm
        elif not batch.hold_if_quiet(self._step, loss, grad_norm):
            return False
        self._step += 1
        self.should_skip = False
        if self._calls_without_step or self._intervals_with_extra:
            self._interval_ended()  # _count_calls: the optimizer stepped since
        self._last_stepped = stepped
        guard.clear()  # a verdict whose optimizer step never came (as _guard_step)
        self.rolled_back = None
        self._excused = False
        if self._acked < self._reported or self._held:
            self._quiet_answer()
        return True

    def _quiet_answer(self) -> None:
        """The quiet step after a report: read the answer now, as the full way does, so
        that ``should_stop``, ``should_skip`` and ``lr`` after step() are the same either
        way. With nothing awaited or held, the LRs are left to the optimizer's pre-step
        hook, which checks them before every step anyway."""
        if self._acked < self._reported:
            assert self._link is not None  # _quietly: the link is up
            began = perf_counter()
            self._link.pump(True)  # it has most likely come (a step has passed)
            if self._batch is not None:  # reading the answer is part of a report's cost
                self._batch.answer_cost(perf_counter() - began)
            self._excused = self.should_skip  # as _step_fully sets it, after its read
        if self._held:
            self._promote()
        self._apply()
