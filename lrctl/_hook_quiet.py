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

    def _held_quietly(self, batch: Batching, loss: float, grad_norm: float | None) -> bool:
        """``every="auto"``: a quiet step (host floats, nothing standing out, nothing
        to send) only joins the pending batch. False, having changed nothing, for any
        other step (see :meth:`_quiet`)."""
        if not self._quiet() or not batch.hold_if_quiet(self._step, loss, grad_norm):
            return False
        self._quiet_step()
        return True

    def _passed_quietly(self, loss: float, grad_norm: float | None) -> bool:
        """``every=N``: a step between reports, with finite host values and nothing to
        send, only counts (see :meth:`_quiet`); False, having changed nothing, for any
        other step."""
        if (not self._step % self.every or not -_INF < loss < _INF
                or (grad_norm is not None and not -_INF < grad_norm < _INF)
                or not self._quiet()):
            return False
        self._unreported_loss, self._unreported_grad = loss, grad_norm
        self._quiet_step()
        return True

    def _quiet(self) -> bool:
        """Whether this step may take the quiet way: it has exactly the effects
        :meth:`_step_fully` and the apply after it have on such a step, but in a training
        loop Python pays for every cold object and call, so it reads a few attributes,
        and leaves every="auto"'s clock to the next full-way step. An answer still
        awaited is read as the full way reads it (:meth:`_quiet_step`). What cannot
        change after ``attach`` (sync, rollbacks, ``base="loop"``, ranks, the pre-step
        hook until :meth:`close`) is :attr:`_quiet_allowed`, decided once."""
        link = self._link
        stepped = self._guard.stepped
        return (self._quiet_allowed and link is not None and link.fatal is None
                and link.idle and not self._metrics and self.scaler is None
                and self._order_known and not (self._staging.used and self._staging)
                and not (stepped == self._last_stepped and stepped > 0 and not self._excused))

    def _quiet_step(self) -> None:
        """A quiet step's bookkeeping: what :meth:`_step_fully` and the apply after it
        would have changed. With nothing awaited or held, the LRs are left to the
        optimizer's pre-step hook, which checks them before every step anyway."""
        self._step += 1
        self.should_skip = False
        if self._calls_without_step or self._intervals_with_extra:
            self._interval_ended()  # _count_calls: the optimizer stepped since
        self._last_stepped = self._guard.stepped
        self._guard.clear()  # a verdict whose optimizer step never came (as _guard_step)
        self.rolled_back = None
        self._excused = False
        if self._acked < self._reported or self._held:
            # The step after a report: read the answer now, as the full way does, so that
            # ``should_stop``, ``should_skip`` and ``lr`` after step() are the same either way.
            if self._acked < self._reported:
                assert self._link is not None  # _quiet: the link is up
                began = perf_counter()
                self._link.pump(True)  # it has most likely come (a step has passed)
                if self._batch is not None:  # reading the answer is part of a report's cost
                    self._batch.answer_cost(perf_counter() - began)
                self._excused = self.should_skip  # as _step_fully sets it, after its read
            if self._held:
                self._promote()
            self._apply()
