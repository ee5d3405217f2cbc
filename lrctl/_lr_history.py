"""Which LRs each optimizer step ran on, as the hook applied them: for the audit.

The controller records ``lrctl/lr/g{i}`` at step *s* as the LRs the optimizer used
there. Live, it knows them: an async hook applies the answer to step *s* − 1 at step
*s*. Where the hook did otherwise, only the hook knows what ran, and this history
says it:

* a replay (the controller restarted, or answered no one for a while): the
  observations the hook buffered meanwhile ran on the LRs it had, not on the
  decisions the controller makes as it replays them; each replayed frame carries
  its step's LRs (``u``);
* ``every="auto"``: the steps held for a batch ran on whatever had arrived by
  then; the report carries theirs (``pu``).

A change is kept from the optimizer step it first applied to; steps before the
oldest observation the hook may still have to replay are forgotten.
"""

from __future__ import annotations

from bisect import bisect_right
from collections import deque

__all__ = ["LRHistory"]


class LRHistory:
    """``(first step, LRs)`` per change, oldest first."""

    PRUNE_AT = 256  # changes kept before the ones no replay can need are dropped

    def __init__(self, step: int, lrs: list[float]) -> None:
        self._steps: deque[int] = deque([step])
        self._lrs: deque[list[float]] = deque([lrs])
        self.last = lrs  # the latest LRs noted (the hook compares identity first)

    def __len__(self) -> int:
        return len(self._steps)

    @property
    def oldest(self) -> int:
        """The first step it holds the LRs of."""
        return self._steps[0]

    @property
    def newest(self) -> int:
        """The first step of the latest LRs: every step from it on ran (or runs) on them."""
        return self._steps[-1]

    def note(self, step: int, lrs: list[float]) -> None:
        """Optimizer step ``step`` runs on ``lrs`` (noted again when it changes before the
        step runs: the later note wins)."""
        self.last = lrs
        steps, values = self._steps, self._lrs
        if lrs == values[-1]:
            return
        if step <= steps[-1]:  # the same step's LRs changed again before it ran
            steps.pop()
            values.pop()
            if values and lrs == values[-1]:
                return  # back to what ran before it: no change at all
        steps.append(step)
        values.append(lrs)

    def at(self, step: int) -> list[float] | None:
        """The LRs optimizer step ``step`` ran on; None if that is forgotten."""
        i = bisect_right(self._steps, step) - 1
        return self._lrs[i] if i >= 0 else None

    def runs(self, first: int, end: int) -> list[tuple[int, list[float]]] | None:
        """The LRs of steps ``first`` to ``end - 1``, as ``(count, LRs)`` runs in step
        order, in one pass; None if ``first`` is forgotten."""
        i = bisect_right(self._steps, first) - 1
        if i < 0 or end <= first:
            return None
        steps, values = self._steps, self._lrs
        out: list[tuple[int, list[float]]] = []
        at = first
        while at < end:
            stop = steps[i + 1] if i + 1 < len(steps) else end
            if stop > at:
                out.append((min(stop, end) - at, values[i]))
                at = min(stop, end)
            i += 1
        return out

    def forget_before(self, step: int) -> None:
        """Keep only what steps ``>= step`` need (the change in force at ``step`` on)."""
        steps, values = self._steps, self._lrs
        while len(steps) > 1 and steps[1] <= step:
            steps.popleft()
            values.popleft()
