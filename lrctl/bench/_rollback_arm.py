"""The ``lrctl+rollback`` arm: the ``lrctl`` arm with host snapshots, so the divergence
guard may roll the run back (see :mod:`lrctl._rollback`).

In process the rollback is carried out at the step that decides it (lag 0): the
runner's loop skips that step's update, the weights and optimizer state return to
the snapshot, and the step counter moves on (the batches in between are skipped).
"""

from __future__ import annotations

from typing import Any

import torch

from .._snapshots import SnapshotRing
from .arms import LrctlController

__all__ = ["KEEP", "SNAPSHOT_EVERY", "RollbackController"]

SNAPSHOT_EVERY = 10
KEEP = 4


class RollbackController(LrctlController):
    def __init__(self, optimizer: torch.optim.Optimizer, policy: Any, steps: int,
                 every: int = SNAPSHOT_EVERY, keep: int = KEEP) -> None:
        super().__init__(optimizer, policy, steps)
        self.every = every
        self.ring = SnapshotRing(optimizer, keep)
        self.engine.enable_snapshots(every, keep, lag=0)
        self.rollbacks: list[tuple[int, int]] = []  # (step, snapshot step)

    def before_step(self, step: int) -> None:
        super().before_step(step)
        if step % self.every == 0:
            self.ring.take(step)  # the weights before this step's update

    def after_backward(self, step: int, loss: float, grad_norm: float) -> bool:
        skip = super().after_backward(step, loss, grad_norm)
        to = self.engine.rollback_to
        if to is None:
            return skip
        snap = self.ring.newest_at_or_before(to)
        if snap is None:  # the book and the ring follow one rule: cannot happen
            raise RuntimeError(f"no snapshot at or before step {to}")
        self.ring.restore(snap)
        self.ring.drop_after(snap.step)
        self.rollbacks.append((step, snap.step))
        for group, lr in zip(self.optimizer.param_groups, self.engine.applied_lrs,
                             strict=True):
            group["lr"] = lr
        return True  # this step's gradients are of the weights thrown away
