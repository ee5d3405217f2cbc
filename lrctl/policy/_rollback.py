"""Which snapshots the training process holds, as the policies see it.

A hook attached with ``snapshot_every=N, keep=K`` copies the model and optimizer at
every step that is a multiple of ``N`` (the state *before* that step's optimizer
update) and keeps the newest ``K``; a rollback to snapshot ``S`` drops the ones after
``S``. :class:`SnapshotBook` follows the same rule from the observed step numbers
alone, so a policy can ask "the newest snapshot before step ``i``" without a round
trip to the hook, and a replay of a journal decides the same rollbacks.

``lag``: the steps between a decision at step ``t`` and the restore in the training
process (an async hook hears the answer to ``t`` during step ``t + 1`` and restores
at ``t + 2``; in process it is 0). Snapshots the hook takes in that window may evict
the oldest ones before the restore, so those are not offered; and the hook takes no
snapshots in ``(t, t + lag]`` after a rollback decided at ``t`` (the weights there
are the ones being thrown away), nor does the book count any.

Stdlib only: it lives in the policy package and is part of the engine's state.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from ._base import StepContext

__all__ = ["ASYNC_LAG", "SnapshotBook", "Snapshotting"]

#: The lag of a hook that is not in sync mode (see the module docstring).
ASYNC_LAG = 2


class SnapshotBook:
    """The snapshot steps the hook holds (the newest ``keep`` multiples of ``every``)."""

    def __init__(self, every: int, keep: int, lag: int = ASYNC_LAG) -> None:
        for name, value, lo in (("every", every, 1), ("keep", keep, 1), ("lag", lag, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < lo:
                raise ValueError(f"{name} must be an integer >= {lo}, but got {value!r}")
        self.every = every
        self.keep = keep
        self.lag = lag
        self.steps: list[int] = []
        self._next = 0  # the next multiple of ``every`` not yet counted
        self._blocked_until = -1  # no snapshots counted up to here (after a rollback)

    def advance(self, step: int) -> None:
        """The hook has reached ``step``: count the snapshots it took up to there."""
        if step < self._next:
            return
        every = self.every
        first = max(self._next, (self._blocked_until // every + 1) * every)
        last = step // every * every
        if first <= last:
            # Only the newest ``keep`` can still be held: no loop over a long gap.
            start = max(first, last - (self.keep - 1) * every)
            self.steps.extend(range(start, last + 1, every))
            del self.steps[:-self.keep]
        self._next = last + every

    def newest_at_or_before(self, step: int, now: int) -> int | None:
        """The newest snapshot at or before ``step`` that the hook still holds when it
        carries out a rollback decided at ``now`` (``None``: none)."""
        due = self._due(now)
        usable = self.steps[max(0, len(self.steps) + due - self.keep):]
        found = [s for s in usable if s <= step]
        return found[-1] if found else None

    def held_by_hook(self, steps: Iterable[int]) -> None:
        """The hook says which snapshots it holds (its hello): they replace the count, so
        a process resumed from a checkpoint is offered none of its predecessor's."""
        self.steps = sorted(set(steps))[-self.keep:]
        if self.steps:  # a replay of frames it held is not counted again
            self._next = max(self._next, self.steps[-1] + self.every)

    def rolled_back(self, to: int, now: int) -> None:
        """A rollback to ``to`` decided at ``now``: later snapshots are gone."""
        self.steps = [s for s in self.steps if s <= to]
        self._blocked_until = now + self.lag

    def _due(self, now: int) -> int:
        """Snapshots the hook takes in ``(now, now + lag]``."""
        if self.lag == 0:
            return 0
        return (now + self.lag) // self.every - now // self.every

    # -- state ----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"every": self.every, "keep": self.keep, "lag": self.lag,
                "steps": list(self.steps), "next": self._next,
                "blocked_until": self._blocked_until}

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> SnapshotBook:
        book = cls(int(state["every"]), int(state["keep"]), int(state["lag"]))
        book.steps = [int(s) for s in state["steps"]][-book.keep:]
        book._next = int(state["next"])
        book._blocked_until = int(state["blocked_until"])
        return book


class Snapshotting:
    """The engine's side of rollbacks (a mixin of :class:`~lrctl.policy.Engine`)."""

    snapshots: SnapshotBook | None
    last_step: int | None
    _ctx: StepContext

    def enable_snapshots(self, every: int, keep: int, lag: int = 0) -> None:
        """The training process keeps a snapshot every ``every`` steps, the newest
        ``keep`` of them, and carries out a rollback ``lag`` steps after the observation
        that decides it (0 in process; see :mod:`lrctl.policy._rollback`). From then on
        the divergence guard may roll back (its ``max_rollbacks``). A book with the same
        ``every`` and ``keep`` (a reconnect) is kept as it is."""
        book = self.snapshots
        if book is None or (book.every, book.keep, book.lag) != (every, keep, lag):
            book = SnapshotBook(every, keep, lag)
            if self.last_step is not None:
                book.advance(self.last_step)
        self.snapshots = self._ctx.snapshots = book

    def restored(self, step: int) -> None:
        """The training process restored a snapshot before step ``step`` (whose update it
        skipped): step ``step + 1``'s loss is the restored weights' own. The divergence
        guard compares it with the broken run's (a change of data, or a blow-up)."""
        for policy in self.policies:  # type: ignore[attr-defined]
            note = getattr(policy, "restored_at", None)
            if note is not None:
                note(step)

    def disable_snapshots(self) -> None:
        """The training process keeps no snapshots (any more): no rollback."""
        self.snapshots = self._ctx.snapshots = None

    def request_rollback(self, to: int | None = None) -> tuple[int, int]:
        """An operator's rollback to the newest snapshot at or before ``to`` (default: the
        last observed step): ``(snapshot step, last step)``. ``ValueError`` when the
        training process holds none (nothing changes then)."""
        book = self.snapshots
        if book is None:
            raise ValueError("the run's hook keeps no snapshots (attach(..., "
                             "snapshot_every=N))")
        now = -1 if self.last_step is None else self.last_step
        target = book.newest_at_or_before(now if to is None else min(to, now), now)
        if target is None:
            raise ValueError(f"no snapshot at or before step {now if to is None else to} "
                             f"(held: {book.steps or 'none'})")
        book.rolled_back(target, now)
        return target, now
