"""Warmup: ramp each group's learning rate up to its initial value.

Composes with everything else (torch's ``ReduceLROnPlateau`` cannot be chained
with a warmup scheduler: pytorch#68978): the warmup factor multiplies the other
schedules' factors, and reactive multipliers apply on top.
"""

from __future__ import annotations

import math

from ._base import Action
from ._params import Param
from ._registry import register_policy
from ._schedule import Schedule


@register_policy("warmup")
class Warmup(Schedule):
    """``linear`` matches torch ``LinearLR(start_factor, end_factor=1.0, total_iters=steps)``."""

    PARAMS = (
        Param("steps", "int", 100, "warmup length in steps", ge=1),
        Param("mode", "str", "linear", "shape of the ramp",
              choices=("linear", "cosine", "exponential")),
        Param("start_factor", "float", 0.01, "factor on the initial LR at step 0", gt=0, le=1),
    )

    def factor(self, step: int, group: int, initial_lr: float) -> float:
        steps: int = self.params["steps"]
        start: float = self.params["start_factor"]
        if step >= steps:
            return 1.0
        progress = step / steps
        mode = self.params["mode"]
        if mode == "linear":
            return start + (1.0 - start) * progress
        if mode == "cosine":
            return start + (1.0 - start) * (1.0 - math.cos(math.pi * progress)) / 2.0
        return float(start ** (1.0 - progress))  # exponential: geometric ramp

    def events(self, next_step: int) -> list[Action]:
        return self.events_between(next_step, next_step)

    def events_between(self, since: int, next_step: int) -> list[Action]:
        steps: int = self.params["steps"]
        if since <= steps <= next_step:
            return [Action("warmup_done", f"warmup complete after {steps} steps",
                           {"statistic": "step", "value": steps, "threshold": steps})]
        return []
