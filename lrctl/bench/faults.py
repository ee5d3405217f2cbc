"""Faults the recovery suite injects, and where in the training step each one acts."""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["BURST_STEPS", "FAULTS", "Fault"]

BURST_STEPS = 5

#: Fault kinds: what each does from step ``at`` on.
FAULTS = {
    "lr_x100": "the LR in the optimizer is ×100 for the rest of the run",
    "grad_x1e4": "one gradient ×1e4",
    "nan_grad": "one step's gradients are NaN",
    "nan_loss": "one step's loss is NaN (and so are its gradients)",
    "burst_x100": f"{BURST_STEPS} consecutive gradients ×100",
}


@dataclass(frozen=True)
class Fault:
    kind: str
    at: int

    def __post_init__(self) -> None:
        if self.kind not in FAULTS:
            raise ValueError(f"unknown fault {self.kind!r} (known: {', '.join(FAULTS)})")

    def lr_scale(self, step: int) -> float:
        """Factor on the LR the driver set (a mis-set LR the driver cannot see directly)."""
        return 100.0 if self.kind == "lr_x100" and step >= self.at else 1.0

    def grad_scale(self, step: int) -> float:
        """Factor on the gradients after backward (NaN poisons them)."""
        if self.kind == "grad_x1e4" and step == self.at:
            return 1e4
        if self.kind == "burst_x100" and self.at <= step < self.at + BURST_STEPS:
            return 100.0
        if self.kind == "nan_grad" and step == self.at:
            return math.nan
        return 1.0

    def poisons_loss(self, step: int) -> bool:
        return self.kind == "nan_loss" and step == self.at
