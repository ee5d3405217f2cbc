"""Anneal: decay the LR to the end of the run once the peak LR is found.

A run that ends at its peak LR leaves loss on the table: the last stretch of a
tuned schedule (cosine, linear decay to zero) is where much of the final loss
is won. A decay needs the run's length, which only the training script knows:
``lrctl.attach(optimizer, total_steps=N)`` (the Hugging Face and Lightning
callbacks pass the trainer's own figure), or ``total_steps`` here.

* The anneal starts at the observation at which any LR range test in the
  stack settles (the range test flags ``lr_sweep`` while it sweeps), or at step
  ``start`` if that is later; without a range test it starts at once.
* From its start step ``s`` to the end of the run ``T`` the multiplier falls
  from 1 to ``end_factor``: ``cosine`` (half a cosine wave, as torch's
  ``CosineAnnealingLR`` with ``T_max = T - s``) or ``linear``. The LR for step
  ``t + 1`` uses progress ``(t + 1 - s) / (T - s)``: step ``T``, one past the
  last of a run of ``T`` steps, would train at ``end_factor`` × the peak.
* It is a multiplier, so the divergence guard's back-offs and the plateau's
  reductions still act on top of it.
* When the run's length is unknown the anneal holds 1.0 and says so once, in a
  decision the audit trail shows (``anneal_inactive``); it starts once a
  reconnecting hook gives the length. A run that goes on past ``total_steps``
  trains at ``end_factor`` × the peak (0 by default); a run resumed with a
  larger ``total_steps`` continues the decay over the longer span.

Decisions are recorded when the anneal starts and when it reaches its end, not
at every step: the LR curve in MLflow shows the decay itself.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from ._base import Action, Observation, ReactivePolicy, StepContext
from ._params import Param
from ._registry import register_policy


@register_policy("anneal")
class Anneal(ReactivePolicy):
    priority = 40  # after the range test (its lr_sweep flag), before plateau
    keeps_observations = False
    PARAMS = (
        Param("shape", "str", "cosine", "shape of the decay", choices=("cosine", "linear")),
        Param("end_factor", "float", 0.0, "multiplier reached at the end of the run",
              ge=0, le=1),
        Param("total_steps", "int", None,
              "length of the run in steps (default: the total_steps the hook gave)",
              ge=1, optional=True),
        Param("start", "int", 0, "earliest step the anneal may start at", ge=0),
    )

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        self._scale = 1.0
        self._start: int | None = None  # the step the decay counts from
        self._done = False
        self._told_inactive = False

    def multiplier(self) -> float:
        return self._scale

    def observe(self, obs: Observation, ctx: StepContext) -> list[Action]:
        total = self.params["total_steps"] or ctx.total_steps
        if total is None:
            if self._told_inactive:
                return []
            self._told_inactive = True
            return [Action("anneal_inactive",
                           "anneal inactive: the run's length is unknown (pass total_steps= "
                           "to lrctl.attach, or set total_steps in the policy file)",
                           {"statistic": "total_steps", "value": None})]
        actions: list[Action] = []
        if self._start is None:
            if "lr_sweep" in ctx.flags or obs.step < self.params["start"]:
                return []
            self._start = obs.step
            actions.append(Action(
                "anneal_start",
                f"{self.params['shape']} anneal from step {obs.step} to the end of the run "
                f"at step {total} (multiplier 1 → {self.params['end_factor']:g})",
                {"statistic": "step", "value": obs.step, "total_steps": total,
                 "shape": self.params["shape"], "end_factor": self.params["end_factor"]}))
        # Recomputed every step, so a run whose length grows (resumed with a larger
        # total_steps) continues the decay over the longer span, even after its end.
        self._scale = self._at(obs.step + 1, total)
        if obs.step + 1 < total:
            self._done = False
        elif not self._done:
            self._done = True
            actions.append(Action(
                "anneal_done", f"the run reached its end at step {total}: multiplier "
                               f"{self._scale:.6g}",
                {"statistic": "step", "value": obs.step + 1, "threshold": total,
                 "multiplier": self._scale}))
        return actions

    def _at(self, step: int, total: int) -> float:
        assert self._start is not None
        span = total - self._start
        progress = 1.0 if span <= 0 else min(max((step - self._start) / span, 0.0), 1.0)
        end = self.params["end_factor"]
        if self.params["shape"] == "linear":
            return 1.0 - (1.0 - end) * progress
        return end + (1.0 - end) * 0.5 * (1.0 + math.cos(math.pi * progress))

    def state_dict(self) -> dict[str, Any]:
        return {"scale": self._scale, "start": self._start, "done": self._done,
                "told_inactive": self._told_inactive}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._scale = float(state["scale"])
        start = state["start"]
        self._start = None if start is None else int(start)
        self._done = bool(state["done"])
        self._told_inactive = bool(state["told_inactive"])
