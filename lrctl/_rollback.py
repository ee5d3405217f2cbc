"""The hook's side of rollback-and-skip: take snapshots, carry out rollback decisions.

``attach(..., snapshot_every=N, keep=K)`` keeps the newest ``K`` snapshots, one every
``N`` steps (see :mod:`lrctl._snapshots`), and says so in its hello; the controller's
policies may then decide a ``rollback`` to one of them (see
:mod:`lrctl.policy._rollback`). ``on_snapshot=save_fn, on_rollback=load_fn`` hand the
work to the user's own checkpointing instead: ``save_fn(step)`` at each snapshot step,
``load_fn(step)`` to restore the one of that step.

Semantics:

* A snapshot of step ``t`` is the state before step ``t``'s optimizer update.
* A rollback decision names the newest snapshot at or before some step; the hook
  restores the newest it holds there at the start of its next ``ctl.step()`` (between
  steps, never inside an optimizer step), skips that step's optimizer update (its
  gradients came from the weights being thrown away) and drops the newer snapshots.
  The step counter keeps moving forward: the batches in between are skipped, not
  replayed. ``ctl.rolled_back`` holds the restored step until the next ``ctl.step()``.
* No snapshot is taken in the ``lag`` steps after the step a rollback was decided
  at (the policies count on it; see :class:`~lrctl.policy._rollback.SnapshotBook`).
* Under DDP rank 0 hears the decision and broadcasts it with the LRs; every rank
  restores the same step at the same ``ctl.step()``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ._snapshots import SnapshotRing
from .policy._rollback import ASYNC_LAG

__all__ = ["Rollbacks"]

Warn = Callable[[str, str], None]


class Rollbacks:
    """Snapshots and pending rollbacks of one hook."""

    def __init__(self, every: int, keep: int, ring: SnapshotRing | None,
                 on_snapshot: Callable[[int], Any] | None,
                 on_rollback: Callable[[int], Any] | None, warn: Warn) -> None:
        self.every = every
        self.keep = keep
        self.ring = ring
        self.on_snapshot = on_snapshot
        self.on_rollback = on_rollback
        self.warn = warn
        self._user_steps: list[int] = []  # callback mode: the steps handed to on_snapshot
        self.requested: tuple[int, int] | None = None  # (snapshot step, decided at): rank 0
        self.due: tuple[int, int] | None = None  # to carry out at the next step
        self._decided_at = -(1 << 62)
        self.count = 0  # rollbacks carried out

    @classmethod
    def create(cls, optimizer: Any, snapshot_every: int | None, keep: int, model: Any,
               on_snapshot: Callable[[int], Any] | None,
               on_rollback: Callable[[int], Any] | None, warn: Warn) -> Rollbacks | None:
        """Checked options; None when snapshots are off (the default)."""
        if (on_snapshot is None) != (on_rollback is None):
            raise ValueError("on_snapshot and on_rollback go together (one saves what the "
                             "other loads), but got only one of them")
        if snapshot_every is None:
            if on_snapshot is not None or model is not None:
                raise ValueError("on_snapshot/on_rollback and model= need snapshot_every=N")
            return None
        for name, value in (("snapshot_every", snapshot_every), ("keep", keep)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, but got {value!r}")
        for name, fn in (("on_snapshot", on_snapshot), ("on_rollback", on_rollback)):
            if fn is not None and not callable(fn):
                raise TypeError(f"{name} must be callable, but got {type(fn).__name__}")
        ring = None if on_snapshot is not None else SnapshotRing(optimizer, keep, model)
        return cls(snapshot_every, keep, ring, on_snapshot, on_rollback, warn)

    @property
    def steps(self) -> list[int]:
        """The snapshot steps held now, oldest first."""
        return self.ring.steps if self.ring is not None else list(self._user_steps)

    def hello(self) -> dict[str, Any]:
        """The hello's ``snapshots``: the rule, and the steps held when it is sent (a
        process resumed from a checkpoint holds none of its predecessor's)."""
        return {"every": self.every, "keep": self.keep, "held": self.steps[-4096:]}

    # -- decisions ---------------------------------------------------------------------
    def on_decision(self, decision: dict[str, Any], distributed: bool) -> None:
        """A ``rollback`` decision from the controller (rank 0)."""
        evidence = decision.get("evidence")
        to = evidence.get("snapshot_step") if isinstance(evidence, dict) else None
        at = decision.get("step")
        if not isinstance(to, int) or not isinstance(at, int) or decision.get("shadow"):
            return
        self.requested = (to, at)
        if not distributed:
            self.due, self.requested = self.requested, None

    def wire(self) -> list[float]:
        """Rank 0's pending rollback, for the broadcast with the LRs."""
        req, self.requested = self.requested, None
        return [float(req[0]), float(req[1])] if req is not None else [-1.0, -1.0]

    def agree(self, to: float, at: float) -> None:
        """Every rank: what rank 0 broadcast."""
        if to >= 0:
            self.due = (int(to), int(at))

    # -- the step ----------------------------------------------------------------------
    def step(self, t: int) -> int | None:
        """At the start of step ``t``: carry out a due rollback (the restored step) or
        take the step's snapshot."""
        restored = None
        if self.due is not None:
            (to, at), self.due = self.due, None
            self._decided_at = max(self._decided_at, at)
            restored = self._restore(to)
        if t % self.every == 0 and not self._decided_at < t <= self._decided_at + ASYNC_LAG:
            self._take(t)
        return restored

    def _take(self, t: int) -> None:
        if self.ring is not None:
            self.ring.take(t)
            return
        assert self.on_snapshot is not None
        self.on_snapshot(t)
        self._user_steps.append(t)
        del self._user_steps[:-self.keep]

    def _restore(self, to: int) -> int | None:
        held = [s for s in self.steps if s <= to]
        if not held:
            self.warn("rollback-none", f"lrctl: a rollback to the snapshot of step {to} was "
                                       f"decided, but this process holds none at or before "
                                       f"it (held: {self.steps}); training continues")
            return None
        if self.ring is not None:
            ring = self.ring
            usable = [s.step for s in ring.ring if s.step <= to and ring.fits(s)]
            if not usable:
                self.warn("rollback-unfit", f"lrctl: a rollback to the snapshot of step {to} "
                                            "was decided, but the snapshots held (steps "
                                            f"{held}) predate a change of the optimizer's "
                                            "parameters (add_param_group): none can restore "
                                            "them; training continues")
                return None
            if usable[-1] != held[-1]:  # said here: the older-snapshot warning would not
                self.warn("rollback-unfit", f"lrctl: rolling back to the snapshot of step "
                                            f"{usable[-1]}; those of steps "
                                            f"{[s for s in held if s > usable[-1]]} predate a "
                                            "change of the optimizer's parameters "
                                            "(add_param_group)")
                to = usable[-1]
            held = usable
        step = held[-1]
        if step != to:
            self.warn("rollback-older", f"lrctl: rolling back to the snapshot of step {step}; "
                                        f"the one of step {to} was no longer held")
        if self.ring is not None:
            snap = self.ring.newest_at_or_before(step)
            assert snap is not None
            self.ring.restore(snap)
            self.ring.drop_after(step)
        else:
            assert self.on_rollback is not None
            self.on_rollback(step)
            self._user_steps = [s for s in self._user_steps if s <= step]
        self.count += 1
        return step
