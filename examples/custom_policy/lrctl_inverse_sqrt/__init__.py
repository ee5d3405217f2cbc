"""``kind: inverse_sqrt``: linear warmup, then LR ∝ 1/√step ("Attention Is All You Need").

A schedule is a pure function of the step (no state, no I/O), so it needs only
``factor``; lrctl multiplies it with the other schedules' factors and applies
the reactive policies (divergence back-off, plateau decay) on top.
"""

from __future__ import annotations

import math

from lrctl.policy import Action, Param, Schedule

__all__ = ["InverseSqrt"]


class InverseSqrt(Schedule):
    """Factor ``(t + 1) / warmup`` during warmup, then ``sqrt(warmup / (t + 1))``."""

    kind = "inverse_sqrt"
    PARAMS = (
        Param("warmup", "int", 100, "steps of linear warmup; the factor peaks at 1 there",
              ge=1),
    )

    def factor(self, step: int, group: int, initial_lr: float) -> float:
        warmup: int = self.params["warmup"]
        t = step + 1
        return t / warmup if t < warmup else math.sqrt(warmup / t)

    def events(self, next_step: int) -> list[Action]:
        # One decision record in the audit trail marks the turn from warmup to decay.
        if next_step + 1 == self.params["warmup"]:
            return [Action("warmup_done", f"warmup ends at step {next_step}; 1/sqrt decay "
                                          "from here", {"statistic": "step",
                                                        "value": next_step,
                                                        "threshold": self.params["warmup"]})]
        return []
