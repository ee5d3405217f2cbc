"""When the LRs the controller decided reach the optimizer: exactly at step *t + 1*
for a decision made from step *t* (an optimizer pre-step hook applies what has
arrived, waiting at most ``timeout`` for the answer due), the same LRs on every
rank under ``torch.distributed``, and the loop's own LRs given back after each
step in ``base="loop"`` mode.

A mixin of :class:`~lrctl.hook.Controller`, whose attributes these methods use.
"""

from __future__ import annotations

from time import perf_counter
from typing import TYPE_CHECKING, Any

from ._lr_history import LRHistory
from ._torchutil import scaler_enabled

if TYPE_CHECKING:
    from ._batching import Batching
    from ._dist import Distributed
    from ._guard import StepGuard
    from ._link import Link
    from ._rollback import Rollbacks
    from ._staging import DeviceStaging
    from ._writer import LRWriter

__all__ = ["Applying"]


class Applying:
    """The decided LRs, in (see the module docstring)."""

    if TYPE_CHECKING:  # what it uses of the Controller (for type checkers only)
        sync: bool
        every: int
        timeout: float
        scaler: Any
        late_waits: int
        should_stop: bool
        should_skip: bool
        _initial: list[float]
        _target: list[float]
        _writer: LRWriter
        _history: LRHistory
        _history_cap: int
        _applied: LRHistory | None
        _frozen: int
        _calls_without_step: int
        _intervals_with_extra: int
        _excused: bool
        _last_scale: float | None
        _last_stepped: int
        _step: int
        _reported: int
        _prev_reported: int
        _sent: int
        _acked: int
        _held: dict[int, list[float]]
        _late: bool
        _after_order: bool
        _got_error: bool
        _staging: DeviceStaging
        _dist: Distributed
        _urgent_steps: tuple[int, int]
        _batch: Batching | None
        _rollbacks: Rollbacks | None
        _link: Link | None
        _guard: StepGuard

        def _drain_staged(self, block: bool) -> None: ...
        def _pump(self, expect: bool = False) -> None: ...
        def _warn(self, key: str, message: str) -> None: ...

    def _pre_step(self, *_: Any) -> None:
        """Optimizer pre-step hook: the LRs this optimizer step uses into the groups.

        After a report whose LRs ``step()`` settled (see ``Reporting._finalize``: the loop
        calls ``step()`` first and the answer due was in) it reads nothing: those LRs went
        out with the report, and what lands now (a push from ``lrctl set-lr``, a reload)
        applies a step later. Otherwise it reads the socket only while an answer
        is awaited and not all that this step may use is in (the answer due:
        :meth:`_await_due` waits for it where the step needs it), while CUDA-staged
        statistics wait to be sent, and while something is left to send or the link is
        down. The answer to the step just reported is for the next optimizer step, which
        the next ``step()`` reads.
        """
        writer = self._writer
        if (self._acked >= self._reported and not self._held and self._applied is None
                and not self._staging.used and self._target is self._history.last
                and writer.settled_on is self._target
                and writer.groups is writer.optimizer.param_groups):
            # The usual step: nothing awaited, held or new, and every group's ``lr`` is
            # still the very float the writer left there (LRWriter.apply's first test,
            # written out: before every optimizer step, where Python pays a microsecond
            # or two for each cold function it enters).
            groups, written = writer.groups, writer.written
            if len(groups) == len(written):
                for group, lr in zip(groups, written):  # noqa: B905 (no keyword: it costs)
                    if group["lr"] is not lr:
                        break
                else:
                    return
        try:
            if self._link is not None and (self._acked < self._reported
                                           or (self._staging.used and self._staging)):
                if self._frozen == self._step - 1 and not self._after_order:
                    # Its LRs went out with its report (see Reporting._finalize): nothing
                    # is read now (what comes applies a step later).
                    if self._staging.used and self._staging:
                        self._drain_staged(block=False)
                    self._writer.apply(self._target)
                    if self._applied is not None:
                        self._note_loop_applied()
                    return
                if (not self._staging.used and self._link.idle
                        and self._acked >= self._due_step()):
                    self._late = False  # caught up: exact t+1 again (as _await_due says)
                    if self._held:
                        self._promote()
                    self._writer.apply(self._target)
                    if self._target is not self._history.last:
                        self._note_applied()
                    if self._applied is not None:
                        self._note_loop_applied()
                    return
                began = perf_counter()
                self._pump()
                self._await_due()
                if self._batch is not None:  # reading the answer is part of a report's cost
                    self._batch.answer_cost(perf_counter() - began)
            if self._held:
                self._promote()
            self._writer.apply(self._target)  # (_apply, one call less: it runs every step)
            if self._target is not self._history.last:
                self._note_applied()
            if self._applied is not None:
                self._note_loop_applied()
        except Warning:  # the loop's filters made one of ours an error: as it is
            raise
        except Exception as exc:
            self._warn("internal", f"lrctl: hook error ({exc!r}); training continues at the "
                                   "last LR")

    def _usable_step(self) -> int:
        """The newest step whose answer may set the LRs of the next optimizer step.

        Async: the optimizer step of step ``t`` uses the answer to ``t - 1`` (a decision
        made from step ``t`` takes effect at ``t + 1``, exactly: never earlier, so a
        seeded run is reproducible). When the loop calls ``step()`` before
        ``optimizer.step()``, step ``t``'s call has counted ``t + 1`` steps. Sync: the
        answer to ``t`` applies at once (that is what the loop waited for).
        """
        if self.sync:
            return self._step - 1
        return self._step - 1 if self._after_order else self._step - 2

    def _due_step(self) -> int:
        """The newest reported step whose answer the next optimizer step uses (-1: none):
        the last report, or the one before it when the last is for a later step."""
        return (self._reported if self._reported <= self._usable_step()
                else self._prev_reported)

    def _await_due(self) -> None:
        """Async: wait (at most ``timeout``) for the answer the next optimizer step needs.

        It has almost always arrived (a whole forward and backward pass has passed since
        it was asked); on CUDA statistics are read a step late by design, so no wait.
        """
        link = self._link
        if self.sync or self._staging.used or link is None or not link.connected:
            return
        due = self._due_step()
        if due < 0 or self._acked >= due:
            self._late = False  # caught up: exact t+1 again
            return
        if self._batch is not None and due not in self._urgent_steps:
            return  # every="auto": a full batch's answer applies when it arrives
        if self._late:
            return  # a wait already timed out: no step waits again until answers catch up
        self._got_error = False
        if not link.wait(lambda: self._acked >= due or self._got_error, self.timeout) \
                and not self._got_error and link.connected:
            self._late = True
            self.late_waits += 1
            self._warn("slow", f"lrctl: the decision for step {due} did not arrive within "
                               f"{self.timeout:g} s; continuing at the last LR (decisions "
                               "apply as they arrive until the controller catches up)")

    def _promote(self) -> None:
        """Held answers whose optimizer step has come become the target."""
        limit = self._usable_step()
        ready = [s for s in self._held if s <= limit]
        if ready:
            target = self._held[max(ready)]
            if target != self._target:  # the same LRs keep their list: nothing to rewrite
                self._target = target
            for s in ready:
                del self._held[s]

    def _apply(self) -> None:
        self._writer.apply(self._target)
        if self._target is not self._history.last:
            self._note_applied()

    def _note_applied(self) -> None:
        """The audit's history (see :mod:`lrctl._lr_history`): the optimizer step about to
        run (the one after the last counted, or that one itself while the loop calls
        ``step()`` before ``optimizer.step()``) uses :attr:`_target`. What no replay or
        pending batch can need any more is dropped now and then."""
        history = self._history
        history.note(self._next_optimizer_step(), self._target)
        if len(history) >= self._history_cap:
            keep = self._step - 1
            link, batch = self._link, self._batch
            if link is not None and link.buffer:
                keep = min(keep, link.buffer[0][0])
            if batch is not None and batch.losses:
                keep = min(keep, batch.last_step - len(batch.losses) + 1)
            elif batch is None and self.every > 1:  # every=N: the next report's gu
                keep = min(keep, self._reported + 1, self._sent + 1)
            staged = self._staging.oldest  # CUDA: reports still to be sent
            if staged is not None:
                keep = min(keep, staged)
            history.forget_before(keep)
            self._history_cap = max(history.PRUNE_AT, 2 * len(history))

    def _note_loop_applied(self) -> None:
        """``base="loop"``: what the optimizer step about to run uses, in the loop's terms;
        what no ``every=N`` report can need any more is dropped now and then."""
        applied = self._applied
        assert applied is not None
        applied.note(self._next_optimizer_step(), list(self._writer.applied))
        if len(applied) >= 2 * LRHistory.PRUNE_AT:  # (a report carries MAX_PRIOR at most)
            applied.forget_before(max(min(self._step - 1, self._reported + 1),
                                      self._step - LRHistory.PRUNE_AT))

    def _next_optimizer_step(self) -> int:
        """The number of the optimizer step to run next (the step just counted, while the
        loop calls ``step()`` before ``optimizer.step()``)."""
        return self._step if self._after_order else self._step - 1

    def _used_at(self, step: int) -> list[float] | None:
        """The LRs optimizer step ``step`` ran on; None for one that has not run yet (its
        LRs may still change before it does) or that the history no longer holds."""
        upcoming = self._next_optimizer_step()
        guard = getattr(self, "_guard", None)  # (none yet while attach connects)
        if step > upcoming or (step == upcoming and (
                self._after_order or guard is None or guard.stepped <= self._last_stepped)):
            return None  # (the loop's last optimizer step since step() counted it: run)
        return self._history.at(step)

    def _after_step(self) -> None:
        """Loop mode, after every optimizer step: the loop gets its own LRs back."""
        try:
            self._writer.restore()
        except Warning:  # the loop's filters made one of ours an error: as it is
            raise
        except Exception as exc:
            self._warn("internal", f"lrctl: hook error ({exc!r}); training continues")

    def _count_calls(self) -> None:
        """Notice a loop that calls ``step()`` per micro-batch (gradient accumulation)."""
        # 0: the guard never saw a step (a wrapper such as accelerate's steps the inner
        # optimizer directly), so no evidence either way.
        stepped = self._guard.stepped if getattr(self, "_guard", None) else 0
        skipped = self._scaler_skipped()  # (reads the scale every call: the last one kept)
        if stepped == self._last_stepped and stepped > 0 and not self._excused and not skipped:
            self._calls_without_step += 1
            if self._calls_without_step >= 3:
                self._warn_accumulation()
        else:
            self._interval_ended()
        self._last_stepped = stepped

    def _scaler_skipped(self) -> bool:
        """Whether the GradScaler may have skipped the optimizer step since the last
        ``step()`` (an overflow between ``every=N`` reports, which no grad norm showed): its
        scale fell (a CPU scaler's, read here); a CUDA scaler's is not read (a host sync):
        any step counts as one it may have skipped."""
        scaler = self.scaler
        if scaler is None or not scaler_enabled(scaler):
            return False
        scale = getattr(scaler, "_scale", None)
        if scale is None:
            return False
        if not getattr(scale, "is_cpu", True):
            return True
        value = float(scale)
        before, self._last_scale = self._last_scale, value
        return before is not None and value < before

    def _interval_ended(self) -> None:
        """The optimizer stepped since the last ``step()``: an interval between optimizer
        steps ended. Extra calls in three such intervals in a row (two micro-batches,
        nanoGPT's default) say the same as three in one."""
        if self._calls_without_step:
            self._intervals_with_extra += 1
            if self._intervals_with_extra >= 3:
                self._warn_accumulation()
        else:
            self._intervals_with_extra = 0
        self._calls_without_step = 0

    def _warn_accumulation(self) -> None:
        self._warn("accumulation", "lrctl: ctl.step() was called several times between "
                                   "optimizer steps; each call counts one step. With "
                                   "gradient accumulation, call it once per optimizer step, "
                                   "after the last micro-batch's backward(), with the mean "
                                   "micro-batch loss")

    def _broadcast(self) -> None:
        """Rank 0's LRs and flags to every rank, on a CPU group: identical LRs every step.
        With them the run's initial LRs, which the welcome may have told rank 0 only (a
        resume by run key): ``base="loop"`` scales by the controller's LR over them. And
        whether any rank's guard skips this step: a rank whose own loss is NaN skips it,
        and so must every other (its gradients, all-reduced, are NaN there too, where
        every=N computes no norm to see it; a rank that stepped alone would leave the
        replicas apart)."""
        try:
            rollback = self._rollbacks.wire() if self._rollbacks is not None else []
            values, anyone_skips = self._dist.share(
                [*self._target, *self._initial, float(self.should_skip),
                 float(self.should_stop), *rollback], self._guard.skips_next)
        except Exception as exc:
            self._warn("broadcast", f"lrctl: LR broadcast failed ({exc!r}); LRs unchanged")
            return
        n = len(self._target)
        self._target = values[:n]
        initial = values[n:2 * n]
        if initial != self._initial:
            self._initial = initial
            self._writer.initial = list(initial)
        n *= 2
        self.should_skip = values[n] > 0 or anyone_skips
        if anyone_skips:
            self._guard.veto()  # (a no-op where the loop calls step() after stepping)
        self.should_stop = values[n + 1] > 0
        if self._rollbacks is not None:
            self._rollbacks.agree(values[n + 2], values[n + 3])
        self._apply()
