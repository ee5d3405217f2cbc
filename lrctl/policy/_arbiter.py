"""From the policies' multipliers and schedule factors to the LRs: product, clamp, guard;
and the records of what the policies did, with the LRs without and with it.

The LR of group ``g`` for step ``t + 1`` is ``initial_lr[g] × Π reactive multipliers
× Π schedule factors(t + 1)``, multiplied in exactly that order (in floating point the
order is part of the result: replays and checkpoints depend on every bit), clamped
to ``[min_lr, max_lr]``. A product that is no usable LR (``inf`` or NaN: a multiplier
or a factor overflowed; negative: a bug) never reaches the optimizer: it is held or
clamped (:meth:`LRArbiter._unusable_lr`), and the engine records when that starts and
when it ends (:meth:`LRArbiter._unusable_record`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from ._base import Action, Observation, Policy
from ._decision import Decision
from ._operator import OVERRIDDEN, not_applied

if TYPE_CHECKING:
    from ._operator import OperatorControls

__all__ = ["OVERRIDDEN", "REPLAYED", "Factors", "LRArbiter"]

#: Said after the reason of a skip a sync hook could not carry out: the step had run
#: before the controller saw it (its evidence says ``advisory`` and ``already_ran``).
REPLAYED = ("; advisory: the hook reported this step after it had run (it replayed the "
            "steps it ran while the controller was unreachable), so it was not skipped")

#: Each group's schedule factors at one step, in file order; ``None``: no schedules.
Factors = Sequence[Sequence[float]] | None


class LRArbiter:
    """The engine's LR arithmetic (a mixin of :class:`~lrctl.policy.Engine`).

    Uses the engine's ``initial_lrs``, ``min_lr``, ``max_lr``, ``mode``,
    ``policy_sha256``, its reactive policies and schedules, and ``_lrs`` (the LRs
    last decided, once there are some).
    """

    initial_lrs: tuple[float, ...]
    min_lr: float
    max_lr: float
    mode: str
    policy_sha256: str
    policies: list[Policy]
    names: list[str]
    skips_enforced: bool
    steps_ran: bool
    already_ran: bool
    answers_same_step: bool
    operator: OperatorControls
    _reactive: list[Policy]
    _schedules: list[Policy]
    _lrs: Sequence[float]
    #: The policies' LR is unusable now (held or clamped, and recorded as such).
    _unusable = False
    #: :meth:`_lrs_from` met an unusable LR since the flag was last cleared.
    _saw_unusable = False

    @property
    def same_step_answers(self) -> bool:
        """The LRs answered to an observation apply to that step's own optimizer step: a
        sync hook's, unless it reports each step after it ran (then the next step's)."""
        return self.answers_same_step and not self.steps_ran

    def _compute(self, step: int) -> list[float]:
        return self._lrs_from(self._multiplier(), self._schedule_factors(step))

    def _multiplier(self) -> float:
        multiplier = 1.0
        for p in self._reactive:
            multiplier *= p.multiplier()
        return multiplier

    def _schedule_factors(self, step: int) -> Factors:
        """Each group's schedule factors at ``step``, in file order (``None``: no schedules,
        so that a stack without any does no work for them)."""
        if not self._schedules:
            return None
        return [[p.factor(step, g, initial) for p in self._schedules]
                for g, initial in enumerate(self.initial_lrs)]

    def _products(self, multiplier: float, factors: Factors) -> list[float]:
        """``initial × multiplier × each factor`` per group, in that order, unclamped."""
        if factors is None:
            return [initial * multiplier for initial in self.initial_lrs]
        out = []
        for initial, group_factors in zip(self.initial_lrs, factors):  # noqa: B905 (hot)
            lr = initial * multiplier
            for f in group_factors:
                lr *= f
            out.append(lr)
        return out

    def _lrs_from(self, multiplier: float, factors: Factors) -> list[float]:
        lrs = self._products(multiplier, factors)
        lo, hi = self.min_lr, self.max_lr
        for g, lr in enumerate(lrs):
            if not _usable(lr):
                self._saw_unusable = True
                lr = self._unusable_lr(g, lr, getattr(self, "_lrs", None))
            lrs[g] = min(max(lr, lo), hi)
        return lrs

    def _unusable_lr(self, g: int, lr: float, previous: Sequence[float] | None) -> float:
        """What a non-finite or negative LR becomes (a policy's product overflowed, or a
        bug): never the optimizer's problem. +inf clamps to ``max_lr`` when one is set;
        otherwise, and for NaN, the group's last LR holds; a negative LR clamps to
        ``min_lr``. The engine records when this starts and when it ends."""
        if lr < 0:
            return self.min_lr
        if lr == math.inf and math.isfinite(self.max_lr):
            return self.max_lr
        return previous[g] if previous is not None else self.initial_lrs[g]

    def _unusable_record(self, step: int, multiplier: float, factors: Factors,
                         before: Sequence[float], after: Sequence[float]) -> Decision | None:
        """A ``guard`` ``clamp`` decision when the policies' LR became unusable, and a
        ``clamp_released`` one when it is usable again: every LR change has a record."""
        bad = {g: lr for g, lr in enumerate(self._products(multiplier, factors))
               if not _usable(lr)}
        was = self._unusable
        self._unusable = bool(bad)
        if bool(bad) == was:
            return None
        evidence: dict[str, Any]
        if bad:
            g, value = next(iter(bad.items()))
            clamped = value == math.inf and math.isfinite(self.max_lr)
            reason = (f"the policies' LR for group {g} is {value} (a multiplier or schedule "
                      f"factor overflowed): {'clamped to max_lr' if clamped else 'held'} at "
                      f"{after[g]:.6g} until it is usable again")
            action, evidence = "clamp", {"groups": sorted(bad), "value": value,
                                         "multiplier": multiplier}
        else:
            reason = "the policies' LR is usable again"
            action, evidence = "clamp_released", {"multiplier": multiplier}
        return Decision(step=step, policy="guard", kind="guard", action=action,
                        old_lrs=tuple(before), new_lrs=tuple(after), reason=reason,
                        evidence=evidence, policy_sha256=self.policy_sha256,
                        shadow=self.mode == "shadow")

    # -- the records of an observation's actions ---------------------------------
    def _nonfinite_skip(self, obs: Observation, multiplier: float,
                        factors: Factors) -> Decision:
        lrs = tuple(self._lrs_from(multiplier, factors))
        return Decision(
            step=obs.step, policy="guard", kind="guard", action="skip", old_lrs=lrs,
            new_lrs=lrs, reason=f"non-finite statistics (loss {obs.loss}, grad norm "
                                f"{obs.grad_norm}): the optimizer step is skipped",
            evidence={"statistic": "nonfinite", "loss": obs.loss, "grad_norm": obs.grad_norm},
            policy_sha256=self.policy_sha256, shadow=self.mode == "shadow")

    def _decisions_of(self, i: int, actions: list[Action], obs: Observation,
                      before_multiplier: float, multiplier: float,
                      factors: Factors) -> list[Decision]:
        """The records of what policy ``i`` did at ``obs``: the LRs for the next step
        without (``before_multiplier``) and with (``multiplier``) its actions."""
        policy = self.policies[i]
        before = tuple(self._lrs_from(before_multiplier, factors))
        after = tuple(self._lrs_from(multiplier, factors))
        # (a manual LR that ends at this step leaves these LRs in force)
        overridden = self.operator.overrides(obs.step, self.same_step_answers) and before != after
        out = []
        for action in actions:
            moved = action.action not in ("skip", "stop")
            reason, evidence = action.reason, action.evidence
            if moved and overridden:  # recorded as what it is: decided, not applied
                reason, evidence = not_applied(reason, evidence)
            if action.action == "skip" and self.steps_ran:
                reason += ("; advisory: ctl.step() runs after optimizer.step(), so this step "
                           "had already run (call it before optimizer.step() to have such "
                           "steps skipped)")
                evidence = {**evidence, "advisory": True}
            elif action.action == "skip" and not _nonfinite(obs.loss, obs.grad_norm):
                if not self.skips_enforced:
                    reason += ("; advisory: the hook is async, so this step had already run "
                               "(attach(..., sync=True) carries such skips out)")
                    evidence = {**evidence, "advisory": True}
                elif self.already_ran:
                    reason += REPLAYED
                    evidence = {**evidence, "advisory": True, "already_ran": True}
            out.append(Decision(
                step=obs.step,
                policy=self.names[i],
                kind=policy.kind,
                action=action.action,
                old_lrs=before,
                new_lrs=after if moved else before,
                reason=reason,
                evidence=evidence,
                policy_sha256=self.policy_sha256,
                shadow=self.mode == "shadow",
            ))
        return out


def _nonfinite(loss: float | None, grad: float | None) -> bool:
    return ((loss is not None and not math.isfinite(loss))
            or (grad is not None and not math.isfinite(grad)))


def _usable(lr: float) -> bool:
    """Finite and not negative (``-0.0`` is usable). One chained comparison: it is false
    for NaN, ±inf and negatives alike, and runs for every group at every step."""
    return 0.0 <= lr < math.inf
