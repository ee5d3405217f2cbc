"""``attach(..., every="auto")``: report less often without seeing less.

On a fast CPU loop (a step of a millisecond or less) the report itself — a send
that wakes the controller, a poll and a read for its answer, the grad norm — costs
a tenth of the step. With ``every="auto"`` the hook measures what a report costs
and how long a step takes, and sends one frame every *k* steps (*k* a power of
two, 1 to 64) so that reporting costs about 1 % of the step time. Nothing is
unseen: the frame carries the losses (and the grad norms the loop passed) of
every step since the last report, and the controller feeds its policies each
step in order, exactly as if they had come one by one.

What changes is *when* a decision takes effect: a decision made from a step
inside a batch reaches the optimizer once the batch's answer has arrived — never
before the step after the report, and not awaited (a batch of 64 steps takes the
controller a few milliseconds), so up to *k* − 1 steps late and a little more (the
audit's ``lrctl/lr`` metric records each step's LR as it ran: the report says what
the held steps ran on, see :mod:`lrctl._lr_history`). Two rules keep
protection immediate:

* a step whose loss (or given grad norm) is not finite, or is the highest of the
  last ~128 steps, is reported at once, with what was pending, and its answer is
  awaited at the next optimizer step (bounded by ``timeout``) — so a spike the
  divergence guard acts on is in effect at *t* + 1, as with ``every=1``;
* the local non-finite guard checks every step's loss; a grad norm the hook
  computes itself is computed on report steps only (the norm is the expensive
  part on small CPU models), so a non-finite gradient behind a finite loss is
  caught on those steps — pass ``grad_norm=clip_grad_norm_(...)`` to have every
  step checked, at no cost.

*k* stays 1 (every step reported) where batching cannot apply: sync mode, loss
or grad norm on an accelerator (those take the no-sync staging path),
``base="loop"``, ``torch.distributed``, and steps that carry metrics or a
rollback. A schedule (warmup, cosine, WSD) then moves the LR in stairs of *k*
steps: with a schedule in the policy, keep ``every=1`` where that matters.
"""

from __future__ import annotations

import math
from collections import deque

__all__ = ["Batching"]

_INF = math.inf


class Batching:
    """The pending steps of an ``every="auto"`` run, and the *k* that keeps it cheap."""

    MAX_K = 64
    BUDGET = 0.01  # the share of the step time reporting may cost
    WINDOW = 128  # steps over which "the highest loss" is judged
    WARMUP = 32  # steps measured before k may grow
    ADAPT_EVERY = 32  # steps between re-evaluations of k
    _SMOOTH = 0.1  # EWMA weight of a new timing

    def __init__(self) -> None:
        self.k = 1
        self._fixed = False  # k no longer adapts (device values: one step per report)
        self.last_step = -1  # the newest pending step
        # The step to report stands out: its answer is awaited at the next optimizer step
        # (t + 1, as with every=1); a full batch's answer applies when it arrives.
        self.urgent = False
        self.losses: list[float] = []
        self.grads: list[float | None] = []
        self._with_grads = False  # some pending step carries a grad norm
        self._loss_above = -_INF  # report at once above these (the recent maxima)
        self._grad_above = -_INF
        # (highest loss, highest grad norm, steps) of each recent report's block
        self._blocks: deque[tuple[float, float, int]] = deque()
        self._block_steps = 0
        self._block_loss = -_INF
        self._block_grad = -_INF
        self._last_call: float | None = None  # when the last full-way step() began
        self._last_tick = -1  # and its step number
        self._interval = 0.0  # EWMA of the time per step
        self._report_cost = 0.0  # EWMA of the hook's time on a report step
        self._this_report = 0.0  # the latest report's cost so far (its answer comes later)
        self._calls = 0

    # -- which steps report ----------------------------------------------------------------
    def due(self, loss: float, grad: float | None) -> bool:
        """Report at this step: the batch is full, or the step stands out."""
        if not -_INF < loss <= self._loss_above or (  # NaN, inf or a new high
                grad is not None and not -_INF < grad <= self._grad_above):
            self.urgent = True
            return True
        return len(self.losses) + 1 >= self.k

    def hold_if_quiet(self, step: int, loss: float, grad: float | None) -> bool:
        """:meth:`due` and, when the step is not, :meth:`hold`, in one call (the hook's
        quiet way); False, having held nothing, when the step reports. The test is
        :meth:`due`'s, written out: in a training loop each call costs microseconds."""
        if (not -_INF < loss <= self._loss_above
                or (grad is not None and not -_INF < grad <= self._grad_above)
                or len(self.losses) + 1 >= self.k):
            return False
        self.hold(step, loss, grad)
        return True

    def hold(self, step: int, loss: float, grad: float | None) -> None:
        """A quiet step: its values go with the next report."""
        self.last_step = step
        self.losses.append(loss)
        self.grads.append(grad)
        if grad is not None:
            self._with_grads = True
            if grad > self._block_grad:
                self._block_grad = grad
        if loss > self._block_loss:
            self._block_loss = loss

    def take(self, loss: float | None, grad: float | None,
             ) -> tuple[list[float], list[float | None] | None]:
        """The pending steps for the report of the step with ``loss``/``grad``; the
        batch starts afresh and the recent maxima move on."""
        losses, grads = self.losses, self.grads if self._with_grads else None
        self.losses, self.grads, self._with_grads = [], [], False
        self._close_block(loss, grad, len(losses) + 1)
        return losses, grads

    def pop_last(self) -> tuple[int, float, float | None]:
        """The newest pending step (to be reported as such, with the others before it)."""
        return self.last_step, self.losses.pop(), self.grads.pop()

    def fix_k(self, k: int) -> None:
        """Report every ``k`` steps from now on, whatever the timings say."""
        self.k = k
        self._fixed = True

    def clear(self) -> None:
        """Nowhere to send them (the controller is down): the pending steps are dropped,
        as unreported steps are with ``every=1``."""
        self.losses, self.grads, self._with_grads = [], [], False

    def _close_block(self, loss: float | None, grad: float | None, steps: int) -> None:
        top_loss, top_grad = self._block_loss, self._block_grad
        if loss is not None and loss > top_loss:
            top_loss = loss
        if grad is not None and grad > top_grad:
            top_grad = grad
        self._block_loss = self._block_grad = -_INF
        blocks = self._blocks
        blocks.append((top_loss, top_grad, steps))
        self._block_steps += steps
        while self._block_steps - blocks[0][2] >= self.WINDOW:
            self._block_steps -= blocks.popleft()[2]
        # Non-finite maxima (a NaN step) must not silence the test: only finite ones count.
        self._loss_above = max((b[0] for b in blocks if b[0] < _INF), default=-_INF)
        self._grad_above = max((b[1] for b in blocks if b[1] < _INF), default=-_INF)

    # -- what reporting costs ----------------------------------------------------------------
    def tick(self, now: float, step: int) -> None:
        """A ``step()`` that takes the full way (a report, or anything unusual) began at
        ``now`` (``time.perf_counter()``) for step number ``step``;
        the quiet steps since the last such call take no time reading the clock, and
        share the time since it."""
        last, last_step = self._last_call, self._last_tick
        self._last_call, self._last_tick = now, step
        if last is None or step <= last_step:  # the first call, or a resume's new count
            return
        steps = step - last_step
        gap = (now - last) / steps
        if self._calls == 0:
            self._interval = gap
        else:  # a pause (evaluation, a checkpoint) moves the estimate by little
            self._interval += self._SMOOTH * (min(gap, 4.0 * self._interval) - self._interval)
        before = self._calls
        self._calls += steps
        if (self._calls >= self.WARMUP and self._calls // self.ADAPT_EVERY
                != before // self.ADAPT_EVERY and not self._fixed):
            self._adapt()

    def spent(self, seconds: float) -> None:
        """A report step's full-way ``step()`` took ``seconds`` (the time spent reading
        its answer, later, counts in :meth:`answer_cost`).

        A step that holds its values costs a few microseconds and reads no clock, so
        reporting costs about what a report step does. Full-way steps that do not report
        (the first steps of a run, a step called twice) are not timed: they are rare
        and unlike a quiet step, and one of them slowed by the machine once, taken as
        what a quiet step costs, left nothing of a report's cost to save, pinning
        *k* at 1 for good (no more such steps came to correct it).
        """
        self._fold_report()
        self._this_report = seconds

    def answer_cost(self, seconds: float) -> None:
        """Time spent reading the answer to the last report (the quiet step after it, the
        optimizer pre-step)."""
        self._this_report += seconds

    def _fold_report(self) -> None:
        if self._this_report > 0.0:
            cost, seconds = self._report_cost, self._this_report
            self._report_cost = seconds if cost == 0.0 else cost + self._SMOOTH * (
                seconds - cost)
            self._this_report = 0.0

    def _adapt(self) -> None:
        room = self.BUDGET * self._interval
        extra = self._report_cost
        if room <= 0.0 or extra <= room:
            k = 1
        else:
            k = min(self.MAX_K, 1 << math.ceil(math.log2(extra / room)))
        # Grow at once, shrink only on a clear change (no flapping between neighbours).
        if k > self.k or k * 4 <= self.k:
            self.k = k
