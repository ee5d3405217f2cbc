"""The divergence guard's LR changes: a back-off (or the stop it escalates to), and the
regrowth after a clean interval.

A mixin of :class:`~lrctl.policy.divergence.Divergence`, whose attributes these are (see
its docstring for the rule).
"""

from __future__ import annotations

from typing import Any

from ._base import Action, StepContext
from ._divergence_attrs import GuardAttributes

__all__ = ["GuardActions"]


class GuardActions(GuardAttributes):
    """Back-off, stop and regrowth (mixed into the divergence guard)."""

    def _back_off(self, ctx: StepContext, reason: str, evidence: dict[str, Any],
                  force: bool, factor: float | None = None) -> list[Action]:
        actions: list[Action] = []
        if ctx.skip:
            actions.append(Action("skip", f"skip this optimizer step: {reason}", evidence))
        self._spikes = self._grad_spikes = 0
        self._clean = 0
        self._after = self._accepted = None  # a new incident (or a stop): nothing to give back
        self._restored = None  # (nor a rollback's verdict to wait for)
        if self._stopped:  # already asked to stop: say it once; still never raise the LR
            ctx.stop = True
            old = self._scale
            if force:
                self._scale = max(self._scale * self.params["factor"],
                                  self.params["min_multiplier"])
            if self._scale != old:  # every LR change has its record, after a stop too
                actions.append(Action(
                    "backoff", f"{reason} after the stop request: LR × {self._scale / old:.6g}",
                    {**evidence, "factor": self._scale / old, "after_stop": True,
                     "forced": force}))
            return actions
        floor = self.params["min_multiplier"]
        if self._backoffs >= self.params["max_backoffs"] or self._scale <= floor:
            self._stopped = True
            ctx.stop = True
            most = self.params["max_backoffs"]
            why = (f"{self._backoffs} back-offs in this incident (max {most})"
                   if self._backoffs >= most
                   else f"the LR multiplier is at its floor {floor:g}")
            actions.append(Action("stop", f"training keeps diverging: {why}; last: {reason}",
                                  {**evidence, "backoffs": self._backoffs}))
            return actions
        old = self._scale
        self._scale = max(self._scale * (self.params["factor"] if factor is None else factor),
                          floor)
        if self._backoffs == 0:
            self._incident = self._now
        if factor is None:  # not a harder back-off: where a give-back would return to
            self._before_incident = old
        if ctx.snapshots is not None:
            self._with_snapshots = True
        self._backoffs += 1
        self._total_backoffs += 1
        self._cooldown = self.params["cooldown"]
        actions.append(Action("backoff", f"{reason}: LR × {self._scale / old:.6g}",
                              {**evidence, "factor": self._scale / old,
                               "backoffs": self._backoffs, "forced": force}))
        return actions

    def _regrow(self) -> list[Action]:
        """``regrow_after`` clean observations in a row: the multiplier grows back."""
        self._clean = 0
        self._spikes = self._grad_spikes = 0
        ceiling = self._ceiling
        if self._scale >= ceiling:
            self._backoffs = 0
            return []
        old = self._scale
        self._scale = min(ceiling, self._scale * self.params["regrow_factor"])
        if self._scale >= ceiling:
            self._backoffs = 0
        return [Action("regrow",
                       f"{self.params['regrow_after']} observations in a row without a "
                       "spike (counted from the last spike or change of this guard's LR): "
                       f"LR × {self._scale / old:.6g} toward its pre-incident value",
                       {"statistic": "clean_observations", "value": self.params["regrow_after"],
                        "threshold": self.params["regrow_after"], "factor": self._scale / old,
                        "multiplier": self._scale})]

