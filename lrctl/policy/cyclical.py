"""Cyclical learning rates and warm restarts.

* ``triangular``, ``triangular2``, ``exp_range``: torch ``CyclicLR`` (momentum
  cycling is left to the optimizer).
* ``cosine``: torch ``CosineAnnealingWarmRestarts`` (``T_0``, ``T_mult``, ``eta_min``).

Both are absolute schedules: ``base_lr``/``max_lr``/``eta_min`` are learning
rates, one number or one per param group, and ``base_lr`` defaults to each
group's initial LR. Restart-on-plateau lives in the ``plateau`` policy
(``restart_lr``), because it reacts to a metric rather than following the step.
"""

from __future__ import annotations

import math
from typing import Any

from ._base import Action
from ._params import Param, ParamError
from ._registry import register_policy
from ._schedule import Schedule, per_group

_CYCLIC = ("triangular", "triangular2", "exp_range")


@register_policy("cyclical")
class Cyclical(Schedule):
    PARAMS = (
        Param("mode", "str", "triangular", "cycle shape", choices=(*_CYCLIC, "cosine")),
        Param("base_lr", "float_or_list", None, "cyclic: lower LR (default: initial LR)",
              ge=0, optional=True),
        Param("max_lr", "float_or_list", None, "cyclic: upper LR", gt=0, optional=True),
        Param("step_size_up", "int", 2000, "cyclic: steps from base_lr to max_lr", ge=1),
        Param("step_size_down", "int", None, "cyclic: steps back down (default: step_size_up)",
              ge=1, optional=True),
        Param("gamma", "float", 1.0, "exp_range: decay per step of the amplitude", gt=0, le=1),
        Param("T_0", "int", None, "cosine: steps of the first cycle", ge=1, optional=True),
        Param("T_mult", "int", 1, "cosine: cycle length multiplier after each restart", ge=1),
        Param("eta_min", "float_or_list", 0.0, "cosine: lowest LR", ge=0),
    )

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        if self.params["mode"] == "cosine":
            if self.params["T_0"] is None:
                raise ParamError("T_0", "required by mode 'cosine'")
        elif self.params["max_lr"] is None:
            raise ParamError("max_lr", f"required by mode {self.params['mode']!r}")
        up = float(self.params["step_size_up"])
        down = self.params["step_size_down"]
        self._total = up + (float(down) if down is not None else up)
        self._ratio = up / self._total

    def lr(self, step: int, group: int, initial_lr: float) -> float:
        """The absolute learning rate of ``group`` at ``step``."""
        p = self.params
        if p["mode"] == "cosine":
            eta_min = per_group(p["eta_min"], group, 0.0)
            t_cur, t_i = self._cosine_position(step)
            return eta_min + (initial_lr - eta_min) * (1.0 + math.cos(math.pi * t_cur / t_i)) / 2
        base = per_group(p["base_lr"], group, initial_lr)
        peak = per_group(p["max_lr"], group, initial_lr)
        cycle = math.floor(1 + step / self._total)
        x = 1.0 + step / self._total - cycle
        scale = x / self._ratio if x <= self._ratio else (x - 1) / (self._ratio - 1)
        height = (peak - base) * scale
        if p["mode"] == "triangular":
            return base + height
        if p["mode"] == "triangular2":
            return base + height * 0.5 ** (cycle - 1)  # underflows to 0, never overflows
        return base + height * p["gamma"] ** step

    def factor(self, step: int, group: int, initial_lr: float) -> float:
        if initial_lr == 0.0:
            return 1.0
        return self.lr(step, group, initial_lr) / initial_lr

    def _cosine_position(self, step: int) -> tuple[int, int]:
        """(steps into the current cycle, length of the current cycle)."""
        t_0: int = self.params["T_0"]
        t_mult: int = self.params["T_mult"]
        if t_mult == 1:
            return step % t_0, t_0
        t_cur, t_i = step, t_0
        while t_cur >= t_i:  # O(log step): cycles grow geometrically
            t_cur -= t_i
            t_i *= t_mult
        return t_cur, t_i

    def events(self, next_step: int) -> list[Action]:
        return self.events_between(next_step, next_step)

    def events_between(self, since: int, next_step: int) -> list[Action]:
        """The newest restart at a step from ``since`` to ``next_step`` (with every=N, one
        report may span a restart)."""
        if self.params["mode"] != "cosine":
            return []
        t_cur, t_i = self._cosine_position(next_step)
        begun = next_step - t_cur  # the step that began the current cycle
        if begun == 0 or begun < since:
            return []
        return [Action("restart", f"warm restart: new cosine cycle of {t_i} steps",
                       {"statistic": "step", "value": begun, "threshold": begun,
                        "window": t_i})]

