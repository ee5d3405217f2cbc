"""The divergence guard's judgment at the end of a cooldown: a new level, or a back-off
that did not take.

A mixin of :class:`~lrctl.policy.divergence.Divergence`, whose attributes these are (see
its docstring for the rule). It runs once per cooldown, never on the usual path.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

from ._base import Action, Observation, StepContext
from .stats import RobustWindow

__all__ = ["LOSS_CONFIRMS", "MAX_ESCALATIONS", "LevelShift"]

#: Harder back-offs in a row (×factor² each) before a high loss level is accepted.
MAX_ESCALATIONS = 3
#: How far the loss must be up for a high grad-norm level to count as divergence.
LOSS_CONFIRMS = 1.5


class LevelShift:
    """A cooldown's end: re-baseline on a new level, or cut harder (mixed into the
    divergence guard)."""

    params: Mapping[str, Any]
    _loss: RobustWindow
    _gnorm: RobustWindow
    _cooldown_seen: list[tuple[float | None, float | None]]
    _cooldown_spikes: int
    _escalation: int
    _rollback: Callable[[StepContext, str, dict[str, Any], float], list[Action] | None]
    _back_off: Callable[..., list[Action]]

    def _end_cooldown(self) -> dict[str, Any] | None:
        """Judge a cooldown that was mostly 'spikes'; evidence when it is still divergence.

        Within ``max_shift`` × the old median loss, the run moved to a new level (a
        harder data mix, a changed objective) rather than blowing up: judge what
        follows against that level, not the old one; a run that keeps climbing still
        spikes against the new baseline and backs off again. Further above (an LR set
        ×100 by mistake) the back-off did not take, and the caller backs off again,
        at most :data:`MAX_ESCALATIONS` times in a row; then the new level is
        accepted, so a harder data mix that stays costs LR (regrown later) but never
        stops the run. A grad-norm level counts only while the loss is up too
        (:data:`LOSS_CONFIRMS` ×): the grad norm moves to new levels for benign
        reasons (layers unfrozen, a loss term switched on).
        """
        seen, self._cooldown_seen = self._cooldown_seen, []
        spikes, self._cooldown_spikes = self._cooldown_spikes, 0
        if 2 * spikes <= len(seen):
            self._escalation = 0
            return None
        losses = [v for v, _ in seen if v is not None]
        gnorms = [g for _, g in seen if g is not None]
        shift = self._shift(losses, gnorms)
        if shift is not None and self._escalation < MAX_ESCALATIONS:
            return shift
        self._escalation = 0
        self._loss.load(losses)
        self._gnorm.load(gnorms)
        return None

    def _shift(self, losses: list[float], gnorms: list[float]) -> dict[str, Any] | None:
        """Evidence when the cooldown's median loss (or grad norm, with the loss up too)
        sits over ``max_shift`` × the old median."""
        if self.params["max_shift"] is None:
            return None
        limit = math.log(self.params["max_shift"])
        loss = self._level(losses, self._loss, self.params["watch_loss"],
                           self.params["loss_scale"] == "linear")
        grad = self._level(gnorms, self._gnorm, self.params["watch_grad_norm"], False)
        if loss is not None and loss[0] > limit:
            name, (log_ratio, new, old) = "loss", loss
        elif (grad is not None and grad[0] > limit and loss is not None
              and loss[0] > math.log(LOSS_CONFIRMS)):
            name, (log_ratio, new, old) = "grad_norm", grad
        else:
            return None
        return {"statistic": f"{name}_level", "value": new, "median": old,
                "ratio": math.exp(log_ratio), "threshold": self.params["max_shift"],
                "window": self.params["cooldown"]}

    @staticmethod
    def _level(values: list[float], window: RobustWindow, watched: bool,
               linear: bool) -> tuple[float, float, float] | None:
        """(log ratio, new median, old median) of the cooldown's values against the window."""
        if not watched or not values or not len(window):
            return None
        new, old = _median(values), window.median()
        if not linear:
            return new - old, math.exp(new), math.exp(old)
        if old <= 0 or new <= 0:
            return None
        return math.log(new / old), new, old

    def _escalate(self, obs: Observation, ctx: StepContext, evidence: dict[str, Any] | None,
                  still: dict[str, Any]) -> list[Action]:
        """The cooldown ended with the run still far above its old level: cut harder."""
        if evidence is not None:
            ctx.flags.add("spike")
        self._escalation += 1
        factor = self.params["factor"] ** 2
        what = still["statistic"].removesuffix("_level")
        reason = (f"{what} stayed {still['ratio']:.3g}× above its median {still['median']:.6g} "
                  f"through the cooldown (more than max_shift {self.params['max_shift']:g}×): "
                  f"the back-off did not take")
        evidence = {**still, "escalation": self._escalation}
        rolled = self._rollback(ctx, reason, evidence, self.params["rollback_factor"])
        if rolled is not None:
            return rolled
        return self._back_off(ctx, reason, evidence, force=False, factor=factor)


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else 0.5 * (ordered[mid - 1] + ordered[mid])
