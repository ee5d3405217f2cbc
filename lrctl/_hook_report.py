"""What the hook reports at each step: the local non-finite guard's verdict, the
statistics (computed, unscaled, staged off the device without a host sync), and
the ``obs`` frame, waiting for its answer in sync mode. The steps between reports
take a short way (:mod:`lrctl._hook_quiet`).

A mixin of :class:`~lrctl.hook.Controller`, whose attributes these methods use.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from time import perf_counter
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from ._batching import Batching
from ._hook_used import MAX_USED
from ._lr_history import LRHistory
from ._torchutil import (
    on_device,
    scaler_enabled,
    to_float,
    total_grad_norm,
    unscaled_norm,
)
from .wire.compact import encode_obs_compact
from .wire.messages import encode_obs

if TYPE_CHECKING:
    from ._guard import StepGuard
    from ._link import Link
    from ._rollback import Rollbacks
    from ._staging import DeviceStaging
    from ._writer import LRWriter

__all__ = ["Reporting"]

_NO_METRICS: Mapping[str, Any] = MappingProxyType({})


class Reporting:
    """The statistics of a step, out (see the module docstring)."""

    if TYPE_CHECKING:  # what it uses of the Controller (for type checkers only)
        optimizer: Any
        sync: bool
        every: int
        timeout: float
        scaler: Any
        overflows: int
        late_waits: int
        should_skip: bool
        rolled_back: int | None
        _target: list[float]
        _writer: LRWriter
        _history: LRHistory
        _applied: LRHistory | None
        _frozen: int
        _excused: bool
        _step: int
        _compute_grad_norm: bool
        _reported: int
        _prev_reported: int
        _sent: int
        _unreported_loss: Any
        _unreported_grad: Any
        _acked: int
        _held: dict[int, list[float]]
        _late: bool
        _unanswered: list[int]
        _after_order: bool
        _said_ran: bool
        _metrics: dict[str, Any]
        _got_error: bool
        _staging: DeviceStaging
        _urgent_steps: tuple[int, int]
        _batch: Batching | None
        _rollbacks: Rollbacks | None
        _restored_unreported: int | None
        _link: Link | None
        _guard: StepGuard
        _order_known: bool
        _after_order_expected: bool

        def _apply(self) -> None: ...
        def _count_calls(self) -> None: ...
        def _due_step(self) -> int: ...
        def _next_optimizer_step(self) -> int: ...
        def _promote(self) -> None: ...
        def _used_at(self, step: int) -> list[float] | None: ...
        def _used_for(self, t: int) -> list[float] | None: ...
        def _link_says_used(self) -> bool: ...
        def _tell_late(self) -> None: ...
        def _gap_changes(self, first: int, end: int) -> list[tuple[int, list[float]]] | None: ...
        def _runs_of_used(self, first: int, end: int, history: LRHistory | None = None,
                          ) -> list[tuple[int, list[float]]] | None: ...
        def _warn(self, key: str, message: str) -> None: ...

    def _step_fully(self, batch: Batching | None, loss: Any, grad_norm: Any,
                    scaler: Any) -> None:
        """Every step the quiet way does not take: see :meth:`step`."""
        t = self._step
        began = 0.0
        if batch is not None:
            began = perf_counter()
            batch.tick(began, t)
        self._step = t + 1
        self.should_skip = False
        if scaler is not None:
            self.scaler = scaler
        self._count_calls()
        if self._writer.loop_mode:
            self._apply()  # read the LR the loop set for this step: it is reported
        overflows = self.overflows
        loss, grad_norm, reporting = self._guard_step(t, loss, grad_norm)
        self.rolled_back = self._rollbacks.step(t) if self._rollbacks else None
        if self.rolled_back is not None:  # this step's gradients are of the old weights
            self._restored_unreported = self.rolled_back
            self.should_skip = True
            self._guard.veto()
            reporting = True
        link = self._link
        if not reporting and batch is None:  # every=N: the run's last step, reported at close
            self._unreported_loss, self._unreported_grad = loss, grad_norm
        if link is None or link.fatal is not None:
            if batch is not None:
                batch.clear()  # unreported, as any step is while the link is down
        else:
            final = reporting and not self.sync and not self._after_order
            if final:
                self._finalize(t)  # this step's LRs, before they go out with its report
            if reporting:
                self._report(t, loss, grad_norm)
            elif batch is not None:
                batch.hold(t, loss, grad_norm)
            # Between reports with every answer in, there is nothing to read: such
            # steps cost next to nothing, so every=N divides the hook's cost by N.
            if not final and (self._acked < self._reported or not link.idle
                              or (self._staging.used and self._staging)):
                # The answer to the report before this one has most likely come (a step
                # has passed since it was sent): read it without polling first.
                self._pump(reporting and self._acked < self._prev_reported)
            if self.sync and self._reported == t:
                self._wait_for(t)
                if (self._acked < t and not self._after_order and link.says_late
                        and link.connected):
                    # Its optimizer step runs without its answer (a skip cannot reach it,
                    # nor the LRs decided for it): the controller is told (see _tell_late).
                    self._unanswered.append(t)
        # A step the loop may rightly not take (a scaler overflow, should_skip).
        self._excused = self.should_skip or self.overflows != overflows
        if batch is not None and reporting:
            batch.spent(perf_counter() - began)

    def _grad_norm(self) -> Any:
        """The gradients' norm, computed here; None when there are none, or when torch
        cannot compute it for these gradients (the loss is still reported and judged)."""
        try:
            return total_grad_norm(self.optimizer, wide=scaler_enabled(self.scaler))
        except Warning:  # the loop's filters made one an error: theirs to see, as it is
            raise
        except (TypeError, NotImplementedError) as exc:  # these gradients never will be
            self._compute_grad_norm = False  # (not tried at every step)
            self._warn("grad-norm", f"lrctl: the gradients' norm cannot be computed ({exc!r:.200}"
                                    "); steps are reported with their loss alone (pass "
                                    "grad_norm= to step() where the loop has one)")
        except Exception as exc:  # this step's (out of memory, say): the next one tries again
            self._warn("grad-norm-step", f"lrctl: the gradients' norm could not be computed "
                                         f"({exc!r:.200}); such steps are reported with their "
                                         "loss alone")
        return None

    def _finalize(self, t: int) -> None:
        """The LRs of optimizer step ``t`` (the loop's next), settled before its report
        says them (``u``) where nothing is left to wait for: what has come is read, and
        when the answer due at ``t`` is in (it almost always is: a forward and backward
        pass have passed since it was asked), or will not be awaited (``every="auto"``'s
        full batch, a late or lost controller), nothing read after the report changes
        them (:attr:`_frozen`; what lands later applies a step later). When it is still
        on its way, the report goes without them, at once, and the pre-step hook awaits
        the answer as it always did (a step shorter than the controller's round trip
        must not wait for it before sending); the controller then records the LRs it
        decided, which the hook applies exactly then."""
        link = self._link
        assert link is not None
        if self._acked < self._reported or not link.idle or (
                self._staging.used and self._staging):
            # The answer to the last report has most likely come (a step has passed since
            # it was sent): read it without polling first.
            self._pump(self._acked < self._reported)
        if self._held:
            self._promote()
        due = self._due_step()
        if (self._acked >= due or self._late or not link.connected or self._staging.used
                or (self._batch is not None and due not in self._urgent_steps)):
            self._frozen = t

    def _guard_step(self, t: int, loss: Any, grad_norm: Any) -> tuple[Any, Any, bool]:
        """The local non-finite guard (see :mod:`lrctl._guard`); returns the statistics
        to report, as floats where they are on the host, and whether this step reports."""
        guard = self._guard
        guard.clear()  # a verdict whose optimizer step never came (the loop skipped it)
        if not self._order_known:
            self._order_known = True
            # The optimizer has stepped already: the loop calls step() after it, unless a
            # backward has run since (that step was a checkpoint loader's, a burn-in's).
            renewed = guard.grads_renewed()  # (and the guard stops watching the gradients)
            if guard.stepped and not renewed:
                guard.enabled = False
                self._after_order = True
                if not self._after_order_expected:
                    self._warn("order", "lrctl: ctl.step() runs after optimizer.step(), so "
                               "a NaN/inf step has already reached the weights when the hook "
                               "sees it; call ctl.step(loss) after backward() and before "
                               "optimizer.step() to have such steps skipped")
        batch = self._batch
        if batch is None:
            reporting = t % self.every == 0 or bool(self._metrics)
        else:
            if type(loss) is not float and loss is not None and not on_device(loss):
                loss = to_float(loss)  # a CPU tensor: read once, to judge the step
            reporting = self._batch_due(batch, loss, grad_norm)
        if grad_norm is None and self._compute_grad_norm and reporting:
            grad_norm = self._grad_norm()
            if grad_norm is None and self._compute_grad_norm:
                self._warn("no-grad", "lrctl: ctl.step() found no gradients (call it after "
                                      "loss.backward()); the grad norm is not reported")
            elif self.scaler is not None:
                grad_norm = unscaled_norm(self.scaler, self.optimizer, grad_norm)
        host = ((loss is None or type(loss) is float)
                and (grad_norm is None or type(grad_norm) is float))
        if not host and (on_device(loss) or on_device(grad_norm)) and not self.sync:
            if not scaler_enabled(self.scaler):  # an enabled scaler skips such steps
                guard.check_on_device(loss, grad_norm)  # no host sync on CUDA
            return loss, grad_norm, reporting
        if not host:
            loss, grad_norm = to_float(loss), to_float(grad_norm)
        if self.scaler is not None and scaler_enabled(self.scaler):
            # The scaler skips non-finite steps itself, and must:
            bad = not all(v is None or math.isfinite(v) for v in (loss, grad_norm))
            self.should_skip = self.should_skip or bad  # its unscale state is per step
            # every=N: reported too (an overflow is counted, a non-finite loss judged, and
            # the step the scaler skips is not taken for gradient accumulation)
            reporting = reporting or bad
        elif guard.check(loss, grad_norm):
            self.should_skip = True
            # every=N: a step between reports, too, so that the policies see it (the
            # divergence guard backs off) and the skip is recorded as a decision.
            reporting = True
        return loss, grad_norm, reporting

    def _batch_due(self, batch: Batching, loss: Any, grad_norm: Any) -> bool:
        """``every="auto"``: does this step report, or wait for the batch's report?"""
        if grad_norm is not None and type(grad_norm) is not float and not on_device(grad_norm):
            grad_norm = to_float(grad_norm)
        if type(loss) is float and (grad_norm is None or type(grad_norm) is float):
            if self._metrics or self._restored_unreported is not None:
                return True
            return batch.due(loss, grad_norm)
        if on_device(loss) or on_device(grad_norm):
            # Device values take the no-sync staging path, one step per report: what is
            # pending goes now, as the report of its own last step.
            batch.fix_k(1)
            self._flush_pending()
        return True

    def _flush_pending(self) -> None:
        """Report the pending steps of an ``every="auto"`` batch (at close, or before a
        step that cannot join it)."""
        batch = self._batch
        if batch is None or not batch.losses or self._link is None:
            return
        t, loss, grad = batch.pop_last()
        self._send(t, loss, grad, _NO_METRICS)

    def _report_last_step(self) -> None:
        """A run that ends between two ``every=N`` reports: its last step is reported,
        with its loss and the grad norm the loop passed (none is computed: the gradients
        may be gone), so that what the policies' schedules did up to the run's end (a WSD
        cooldown's ``decay_done`` on the last step) is decided and recorded."""
        last = self._step - 1
        if self.every <= 1 or self._batch is not None or last <= self._reported:
            return
        values = []
        for value in (self._unreported_loss, self._unreported_grad):
            try:
                values.append(to_float(value))
            except (TypeError, ValueError, RuntimeError):
                values.append(None)  # the step is still reported, without that value
        self._unreported_loss = self._unreported_grad = None
        self._send(last, values[0], values[1], _NO_METRICS)

    def _report(self, t: int, loss: Any, grad_norm: Any) -> None:
        if grad_norm is None and self._compute_grad_norm:
            grad_norm = total_grad_norm(self.optimizer)
        metrics: Mapping[str, Any] = _NO_METRICS  # no allocation on the usual step
        if self._metrics:
            metrics, self._metrics = self._metrics, {}
        if (loss is None or type(loss) is float) and (grad_norm is None
                                                      or type(grad_norm) is float):
            self._send(t, loss, grad_norm, metrics)
            return
        loss_dev, grad_dev = on_device(loss), on_device(grad_norm)
        if (loss_dev or grad_dev) and not self.sync:
            self._stage(t, loss, grad_norm, (loss_dev, grad_dev), metrics)
            return
        self._send(t, to_float(loss), to_float(grad_norm), metrics)

    def _send(self, t: int, loss: float | None, grad: float | None,
              metrics: Mapping[str, Any], end: bool = False) -> None:
        assert self._link is not None
        if self._unanswered:  # (only after a wait for an answer ran out: a stall)
            self._tell_late()
        clean = {k: float(to_float(v) or 0.0) for k, v in metrics.items()} if metrics else None
        overflow = False
        if grad is not None and not math.isfinite(grad) and scaler_enabled(self.scaler):
            # The scaler skips this step and lowers its scale: normal in fp16 training.
            overflow, grad = True, None
            self.overflows += 1
        prior: list[float] | None = None
        prior_grads: list[float | None] | None = None
        prior_used: list[tuple[int, list[float]]] | None = None
        batch = self._batch
        if batch is not None:  # every="auto": the steps held since the last report
            prior, prior_grads = batch.take(loss, grad)
            if prior and self._link_says_used() and len(self._target) <= MAX_USED:
                # what they ran on: an answer may have come in their midst
                prior_used = self._runs_of_used(t - len(prior), t)
            if batch.urgent:
                batch.urgent = False
                self._urgent_steps = (self._urgent_steps[1], t)
        link = self._link
        used = self._used_for(t) if loss is not None or grad is not None else None
        # every=N: what the unreported steps since the last report ran on, where it changed
        # (since the last one sent: a CUDA-staged report moved _reported when it was staged)
        gap = (self._gap_changes(self._sent + 1, t) if batch is None and self.every > 1
               and t > self._sent + 1 else None)
        # ctl.step() after optimizer.step(): said once a connection (its hello, or here)
        ran = self._after_order and not self._said_ran
        if (link.compact and clean is None and not overflow and not gap
                and not end and not ran and self._restored_unreported is None
                and not self._writer.loop_mode):
            # plain, or a batch of held steps: see wire.compact
            frame = encode_obs_compact(t, loss, grad, used, prior, prior_grads, prior_used)
            if frame is not None:
                self._prev_reported, self._reported = self._reported, t
                self._sent = t
                link.send_obs(t, frame)
                return
        try:
            frame = encode_obs(t, loss, grad, clean, overflow=overflow,
                               base=self._writer.base if self._writer.loop_mode else None,
                               restored=self._restored_unreported, prior=prior,
                               prior_grads=prior_grads, prior_used=prior_used, used=used,
                               gap_used=gap,
                               # reported after the loop's step t - 1 (see report()):
                               # they measured the weights of that step
                               metrics_step=t - 1 if clean else None, end=end,
                               ran=ran)
            self._restored_unreported = None
        except ValueError as exc:  # e.g. too many metrics for one frame
            self._warn("encode", f"lrctl: step {t} not reported: {exc}")
            return
        self._prev_reported, self._reported = self._reported, t
        self._sent = t
        self._said_ran = self._said_ran or ran
        link.send_obs(t, frame)

    def _pump(self, expect: bool = False) -> None:
        if self._staging:
            self._drain_staged(block=False)
        assert self._link is not None
        self._link.pump(expect)

    def _wait_for(self, t: int) -> None:
        """Sync: wait (at most ``timeout``) for the answer to step ``t``. After a wait that
        timed out, no step waits until the answer to the step before has come: a hung
        controller costs one wait, not one per step (as async's :meth:`_await_due`)."""
        assert self._link is not None
        if self._late:
            if self._acked < self._prev_reported:
                return
            self._late = False  # it answers again
        self._got_error = False
        ok = self._link.wait(lambda: self._acked >= t or self._got_error, self.timeout)
        if not ok and not self._got_error and self._link.state != "down":
            self._late = True
            self.late_waits += 1
            self._warn("slow", f"lrctl: no decision within {self.timeout:g} s (sync mode); "
                               "continuing at the last LR, without waiting again until the "
                               "controller answers")

    def _stage(self, t: int, loss: Any, grad: Any, on_dev: tuple[bool, bool],
               metrics: Mapping[str, Any]) -> None:
        """CUDA, async: copy the statistics to the host without a sync; sent when ready."""
        self._staging.stage(t, loss, grad, on_dev, metrics, self._send_staged)
        self._prev_reported, self._reported = self._reported, t

    def _send_staged(self, t: int, loss: float | None, grad: float | None,
                     metrics: Mapping[str, Any]) -> None:
        if self._link is not None:
            self._send(t, loss, grad, metrics)

    def _drain_staged(self, block: bool) -> None:
        self._staging.drain(self._send_staged, block)
