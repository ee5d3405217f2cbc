"""Classic decay schedules: step, exponential, linear and cosine.

Closed forms of torch's ``StepLR``, ``ExponentialLR``, ``LinearLR`` and
``CosineAnnealingLR``, counted from ``start`` (so a decay can begin where a
warmup ends). Unlike torch's ``CosineAnnealingLR``, which swings back up after
``total_steps``, the cosine and linear schedules hold their final value.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

from ._params import Param, ParamError
from ._registry import register_policy
from ._schedule import Schedule, per_group


@register_policy("decay")
class Decay(Schedule):
    PARAMS = (
        Param("schedule", "str", "cosine", "shape of the decay",
              choices=("step", "exponential", "linear", "cosine")),
        Param("start", "int", 0, "first step of the decay (factor 1 before it)", ge=0),
        Param("step_size", "int", None, "step: steps between multiplications by gamma",
              ge=1, optional=True),
        Param("gamma", "float", None, "step / exponential: multiplicative factor",
              gt=0, le=1, optional=True),
        Param("total_steps", "int", None, "linear / cosine: length of the decay (torch T_max)",
              ge=1, optional=True),
        Param("end_factor", "float", 0.0, "linear: factor reached after total_steps", ge=0, le=1),
        Param("eta_min", "float_or_list", 0.0, "cosine: LR reached after total_steps", ge=0),
    )

    _NEEDS: ClassVar[dict[str, tuple[str, ...]]] = {
        "step": ("step_size", "gamma"),
        "exponential": ("gamma",),
        "linear": ("total_steps",),
        "cosine": ("total_steps",),
    }

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        for key in self._NEEDS[self.params["schedule"]]:
            if self.params[key] is None:
                raise ParamError(key, f"required by schedule {self.params['schedule']!r}")

    def factor(self, step: int, group: int, initial_lr: float) -> float:
        p = self.params
        t = max(0, step - p["start"])
        schedule = p["schedule"]
        if schedule == "step":
            return float(p["gamma"] ** (t // p["step_size"]))
        if schedule == "exponential":
            return float(p["gamma"] ** t)
        progress = min(t, p["total_steps"]) / p["total_steps"]
        if schedule == "linear":
            return 1.0 + (p["end_factor"] - 1.0) * progress
        if initial_lr == 0.0:
            return 1.0
        eta_min = per_group(p["eta_min"], group, 0.0)
        lr = eta_min + (initial_lr - eta_min) * (1.0 + math.cos(math.pi * progress)) / 2.0
        return lr / initial_lr
