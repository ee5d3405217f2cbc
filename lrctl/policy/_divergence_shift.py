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
#: Losses of a probe ``max_shift`` × above the skipped cooldown's that end it early.
PROBE_RISES = 3


class LevelShift:
    """A cooldown's end: re-baseline on a new level, or cut harder (mixed into the
    divergence guard)."""

    params: Mapping[str, Any]
    _loss: RobustWindow
    _gnorm: RobustWindow
    _cooldown_seen: list[tuple[float | None, float | None]]
    _cooldown_spikes: int
    _cooldown: int
    _escalation: int
    _probe_ref: float | None
    _probe_high: int
    _level_shift: bool
    _rollback: Callable[[StepContext, str, dict[str, Any], float], list[Action] | None]
    _back_off: Callable[..., list[Action]]

    def _end_cooldown(self) -> dict[str, Any] | None:
        """Judge a cooldown that was mostly 'spikes'; evidence when it is still divergence.

        Within ``max_shift`` × the old median loss, the run moved to a new level (a
        harder data mix, a changed objective) rather than blowing up: judge what
        follows against that level, not the old one; a run that keeps climbing still
        spikes against the new baseline and backs off again. Further above, the back-off
        may not have taken (an LR set ×100 by mistake) — or the data changed. Only steps
        trained at the backed-off LR can tell (a cooldown's spike steps were skipped, and
        its losses show the weights of the spike, whatever the LR): the first such
        cooldown is followed by a *probe* of ``min_samples`` observations (at least the
        cooldown's), trained at that LR (nothing skipped). When the median loss of the
        probe's newer half is :data:`LOSS_CONFIRMS` × above the cooldown's — or
        :data:`PROBE_RISES` of its losses went ``max_shift`` × above it, which ends the
        probe early — training at that LR drives the loss up: the back-off did not take,
        and the caller backs off again, harder, at most :data:`MAX_ESCALATIONS` times in
        a row, each judged against the cooldown before it. A loss that holds its level or
        falls shows a stable optimizer on new data: the level is accepted
        (``level_shift``), so a harder data mix costs one back-off (regrown later), never
        a hidden decay; a loss that climbs on from there spikes against the new baseline
        (the window moved to it, its spread kept: :func:`_moved`) and is backed off as
        any other. A grad-norm level
        counts only while the loss is up too (:data:`LOSS_CONFIRMS` ×): the grad norm
        moves to new levels for benign reasons (layers unfrozen, a loss term switched
        on).
        """
        seen, self._cooldown_seen = self._cooldown_seen, []
        spikes, self._cooldown_spikes = self._cooldown_spikes, 0
        reference, self._probe_ref = self._probe_ref, None
        if 2 * spikes <= len(seen):
            self._escalation = 0
            return None
        losses = [v for v, _ in seen if v is not None]
        gnorms = [g for _, g in seen if g is not None]
        shift = self._shift(losses, gnorms)
        if shift is not None and self._escalation < MAX_ESCALATIONS:
            level = _median(losses)  # (a shift needs the loss up: losses is not empty)
            if reference is None:
                # Not judged yet: probe, training at the backed-off LR.
                self._probe_ref = level
                self._probe_high = 0
                self._cooldown = max(len(seen), self.params["min_samples"])
                return None
            newer = _median(losses[len(losses) // 2:])
            if self._rose(reference, newer):  # training at this LR drives the loss up
                self._probe_ref, self._probe_high = level, 0
                return {**shift, **self._levels(reference, newer)}
        self._escalation = 0
        self._loss.load(_moved(self._loss.values(), losses))
        self._gnorm.load(_moved(self._gnorm.values(), gnorms))
        self._level_shift = True
        return None

    def _probe_rising(self, loss: float | None) -> dict[str, Any] | None:
        """In a probe: evidence once :data:`PROBE_RISES` losses went ``max_shift`` × above
        the skipped cooldown's median (the LR is still far too high: the probe ends
        early); else None."""
        reference = self._probe_ref
        if loss is None or reference is None or self._escalation >= MAX_ESCALATIONS:
            return None
        limit = self.params["max_shift"]
        if self.params["loss_scale"] == "linear":
            high = reference > 0 and loss > limit * reference
        else:
            high = loss - reference > math.log(limit)
        self._probe_high += high
        if self._probe_high < PROBE_RISES:
            return None
        losses = [v for v, _ in self._cooldown_seen if v is not None]
        level = self._level(losses, self._loss, True, self.params["loss_scale"] == "linear")
        self._cooldown, self._cooldown_seen, self._cooldown_spikes = 0, [], 0
        self._probe_ref, self._probe_high = _median(losses), 0  # the next cooldown's reference
        if level is None:
            return None
        log_ratio, new, old = level
        return {"statistic": "loss_level", "value": new, "median": old,
                "ratio": math.exp(log_ratio), "threshold": limit, "window": "probe",
                **self._levels(reference, loss)}

    def _rose(self, reference: float, level: float) -> bool:
        """Whether ``level`` sits :data:`LOSS_CONFIRMS` × above ``reference`` (judged
        losses: logs, or the losses themselves on the linear scale)."""
        if self.params["loss_scale"] == "linear":
            return reference > 0 and level > LOSS_CONFIRMS * reference
        return level - reference > math.log(LOSS_CONFIRMS)

    def _levels(self, reference: float, level: float) -> dict[str, float]:
        """The medians the verdict "did not take" compared, in the loss's own units."""
        if self.params["loss_scale"] == "linear":
            return {"loss_before": reference, "loss_after": level}
        return {"loss_before": math.exp(reference), "loss_after": math.exp(level)}

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
                  f"(more than max_shift {self.params['max_shift']:g}×) and training at the "
                  f"backed-off LR drove it up further (median {still['loss_before']:.6g} → "
                  f"{still['loss_after']:.6g}): the back-off did not take")
        evidence = {**still, "escalation": self._escalation}
        rolled = self._rollback(ctx, reason, evidence, self.params["rollback_factor"])
        if rolled is not None:
            return rolled
        return self._back_off(ctx, reason, evidence, force=False, factor=factor)


def _moved(window: list[float], seen: list[float]) -> list[float]:
    """A window re-baselined on the level ``seen`` sits at: its values moved by the
    difference of the medians (the level changed, not the noise around it), then ``seen``.
    Detection stays armed, with the spread it learned, so a loss that climbs on from the
    new level is a spike at once."""
    if not seen or not window:
        return window + seen
    delta = _median(seen) - _median(window)
    return [v + delta for v in window] + seen


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else 0.5 * (ordered[mid - 1] + ordered[mid])
