"""The divergence guard's judgment at the end of a cooldown: a new level, or a back-off
that did not take — and, after harder back-offs that changed nothing, the LR given back.

A mixin of :class:`~lrctl.policy.divergence.Divergence`, whose attributes these are (see
its docstring for the rule). It runs once per cooldown, never on the usual path.
"""

from __future__ import annotations

import math
from typing import Any

from ._base import Action, Observation, StepContext
from ._divergence_attrs import GuardAttributes
from .stats import RobustWindow

__all__ = ["LOSS_CONFIRMS", "MAX_ESCALATIONS", "LevelShift", "median"]

#: Harder back-offs in a row (×factor² each) before a high loss level is accepted.
MAX_ESCALATIONS = 3
#: How far the loss must be up for a high grad-norm level to count as divergence; and how
#: far it must have come down through the harder back-offs for them to count as working.
LOSS_CONFIRMS = 1.5


class LevelShift(GuardAttributes):
    """A cooldown's end: re-baseline on a new level, cut harder, or give the LR back
    (mixed into the divergence guard)."""

    def _end_cooldown(self) -> dict[str, Any] | None:
        """Judge a cooldown that was mostly 'spikes'; evidence when it is still divergence.

        Within ``max_shift`` × the old median loss, the run moved to a new level (a
        harder data mix, a changed objective) rather than blowing up: judge what
        follows against that level, not the old one — the window moves to it with the
        spread it learned (:func:`_moved`), so detection stays armed and a loss that
        climbs on spikes again at once. Further above (an LR set ×100 by mistake) the
        back-off did not take, and the caller backs off again, harder, at most
        :data:`MAX_ESCALATIONS` times in a row: the skipped steps of a cooldown cannot
        tell a blow-up from new data, and a blow-up must be cut fast. Then the level is
        accepted. If the loss stayed within :data:`LOSS_CONFIRMS` × of the first
        cooldown's level through all those cuts (a blow-up climbs on, or comes down as
        the cuts take), the LR did not cause it: the level is the data's (a change to
        harder data). :meth:`_settle` watches ``min_samples`` more losses at the cut LR
        (a model wrecked by a too-high LR recovers in them), and if they held that level
        too, :meth:`_give_back` returns the LR to its value before the incident, so a
        change of data costs a few dozen steps, not a hidden ×1/128 decay. A grad-norm
        level counts only while the loss is up too (:data:`LOSS_CONFIRMS` ×): the grad
        norm moves to new levels for benign reasons (layers unfrozen, a loss term
        switched on).
        """
        seen, self._cooldown_seen = self._cooldown_seen, []
        spikes, self._cooldown_spikes = self._cooldown_spikes, 0
        if 2 * spikes <= len(seen):
            self._escalation = 0
            self._incident_level = self._restored = None
            return None
        losses = [v for v, _ in seen if v is not None]
        gnorms = [g for _, g in seen if g is not None]
        shift = self._shift(losses, gnorms)
        restored = self._restored_shows_it(losses, shift)
        if restored is not None:  # the data, not the weights: accept the level, LR back
            self._incident_level, self._escalation = None, 0
            self._data_after_rollback = restored
            shift = None
        if shift is not None:  # the level the broken run sits at (a rollback compares)
            self._cooldown_level = median(losses)
        if shift is not None and self._escalation == 0:
            self._incident_level = median(losses)  # the level the cuts must move
            self._level_held = True
        elif (shift is not None and self._incident_level is not None
              and not self._near(self._incident_level, median(losses))):
            self._level_held = False  # the cuts moved it (down, or it blew up further)
        if shift is not None and self._escalation < MAX_ESCALATIONS:
            return shift
        if shift is not None and self._incident_level is not None:
            # Harder back-offs did not bring the level within max_shift: watch what the
            # model does at the cut LR before saying whether they were needed.
            self._after = []
            self._accepted = shift
        else:
            self._incident_level = None
        self._escalation = 0
        # The level moved to is the cooldown's newer half's: a burst that ended within
        # the cooldown is over, and its values are no level to judge what follows by.
        self._loss.load(_moved(self._loss.values(), losses[len(losses) // 2:]))
        self._gnorm.load(_moved(self._gnorm.values(), gnorms[len(gnorms) // 2:]))
        self._level_shift = True
        return None

    def _settle(self, loss: float) -> list[Action] | None:
        """After a level accepted through harder back-offs: take one more judged loss;
        after ``min_samples`` of them, give the LR back if the loss stayed within
        :data:`LOSS_CONFIRMS` × of the first cooldown's level through every cut and these
        (the cuts changed nothing); else keep the cut (it is regrown as usual)."""
        after = self._after
        assert after is not None
        after.append(loss)
        if len(after) < self.params["min_samples"]:
            return None
        first, shift = self._incident_level, self._accepted
        self._after = self._accepted = self._incident_level = None
        assert first is not None and shift is not None
        level = median(after)
        if not (self._level_held and self._near(first, level)):
            return None
        return self._give_back({**shift, **self._levels(first, level),
                                "window": len(after)})

    def _near(self, before: float, after: float) -> bool:
        """Whether the judged loss ``after`` is within :data:`LOSS_CONFIRMS` × of
        ``before``, either way."""
        if self.params["loss_scale"] == "linear":
            return before / LOSS_CONFIRMS <= after <= before * LOSS_CONFIRMS
        return abs(after - before) <= math.log(LOSS_CONFIRMS)

    def _levels(self, before: float, after: float) -> dict[str, float]:
        """The two medians compared, in the loss's own units."""
        if self.params["loss_scale"] == "linear":
            return {"loss_before": before, "loss_after": after}
        return {"loss_before": math.exp(before), "loss_after": math.exp(after)}

    def _give_back(self, evidence: dict[str, Any]) -> list[Action]:
        """Harder back-offs (or a rollback) left the loss where it was: return the LR to
        its value before the back-off that began the incident (see :meth:`_end_cooldown`)."""
        old = self._scale
        target = min(self._before_incident, self._ceiling)
        self._backoffs = 0
        self._spikes = self._grad_spikes = 0
        self._clean = 0
        if target <= old:
            return []
        self._scale = target
        before, after = evidence["loss_before"], evidence["loss_after"]
        old_level = (f"the {evidence['statistic'].removesuffix('_level')} was "
                     f"{evidence['ratio']:.3g}× its old median {evidence['median']:.6g}")
        if "snapshot_step" in evidence:
            why = (f"the weights restored from the snapshot of step {evidence['snapshot_step']} "
                   f"showed the broken run's loss (their first {evidence['first_loss']:.6g}; "
                   f"median {after:.6g} over the {evidence['window']} observations after "
                   f"the rollback, the broken run's {before:.6g}; {old_level}): the rise "
                   f"came with the data, not the weights")
        else:
            why = (f"the loss stayed at its new level through {MAX_ESCALATIONS} harder "
                   f"back-offs and {evidence['window']} observations at the cut LR (median "
                   f"{before:.6g} → {after:.6g}; {old_level}): the LR did not cause it")
        return [Action(
            "regrow",
            f"{why} (a change of data); LR × {target / old:.6g}, back to its value before "
            f"the incident",
            {**evidence, "factor": target / old, "multiplier": target,
             "level_accepted": True})]

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
        new, old = median(values), window.median()
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
        rolled = self._rollback(ctx, reason, evidence, self.params["rollback_factor"],
                                level=self._cooldown_level)
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
    delta = median(seen) - median(window)
    return [v + delta for v in window] + seen


def median(values: list[float]) -> float:
    """The median of ``values`` (not empty)."""
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else 0.5 * (ordered[mid - 1] + ordered[mid])
