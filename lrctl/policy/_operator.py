"""What sits above the policies in the engine: an operator's manual LR and the LRs held in
shadow mode.

One meaning of shadow on every path (the controller, ``load_policy`` in-process,
``replay``): the policies keep observing and record what they would do, and the
LRs hold at those in effect when shadow mode began (the initial LRs for a run
that starts in shadow). A manual LR (``lrctl set-lr``) overrides both, for a
number of steps or until cleared; its end is recorded as a ``release_lr``
decision at the step after which it ends. Everything here is in the engine's
``state_dict``, so it survives a checkpoint and a hot reload.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from ._base import Policy
from ._decision import Decision

__all__ = ["OPERATOR", "SET_LR_JUMP", "OperatorControls", "OperatorVerbs", "finite_lrs"]

OPERATOR = "operator"  # the policy name of the decisions made here
#: A manual LR more than this many times both group 0's initial LR and its LR now is
#: refused unless forced (``lrctl set-lr --force``): a typo's exponent is a factor of 1e6.
SET_LR_JUMP = 100.0
#: Said after the reason of a decision whose LR change an operator's manual LR kept
#: from the optimizer (its evidence says ``overridden: true``).
OVERRIDDEN = ("; its LR change is not applied: an operator's manual LR is in force "
              "(lrctl set-lr; the policies' LRs apply again once it ends)")


def not_applied(reason: str, evidence: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """A decision's reason and evidence, recorded as what it is under a manual LR:
    decided, not applied."""
    return reason + OVERRIDDEN, {**evidence, "overridden": True}


class OperatorControls:
    """The manual LR (``override``, through step ``until`` or until cleared) and the
    shadow-mode hold (``hold``). ``None`` each when not in force."""

    __slots__ = ("hold", "override", "until")

    def __init__(self) -> None:
        self.override: tuple[float, ...] | None = None
        self.until: int | None = None
        self.hold: tuple[float, ...] | None = None

    def applied(self, lrs: Sequence[float]) -> list[float]:
        """The LRs for the optimizer, given the policies' ``lrs``."""
        if self.override is not None:
            return list(self.override)
        if self.hold is not None:
            return list(self.hold)
        return list(lrs)

    def set_override(self, lrs: Sequence[float], until: int | None) -> None:
        self.override, self.until = tuple(float(x) for x in lrs), until

    def clear_override(self) -> None:
        self.override = self.until = None

    def overrides(self, step: int, same_step: bool = False) -> bool:
        """Whether LRs decided at ``step`` are kept from the optimizer: a manual LR is in
        force for the step they would apply to (one that ends at ``step`` is not)."""
        return self.override is not None and not self.expires_after(step, same_step)

    def expires_after(self, step: int, same_step: bool = False) -> bool:
        """The override ends once ``step`` is observed: it was held through ``until``.
        ``same_step``: the LRs answered to an observation apply to that step's own
        optimizer step (a sync hook), not to the next one, so the answer to ``until``
        itself still holds it."""
        return self.until is not None and step + 1 > self.until + same_step

    def state_dict(self) -> dict[str, Any]:
        return {"override": None if self.override is None else list(self.override),
                "until": self.until,
                "hold": None if self.hold is None else list(self.hold)}

    def load_state_dict(self, state: Mapping[str, Any] | None) -> None:
        state = state or {}
        self.override = finite_lrs(state.get("override"))
        until = state.get("until")
        if until is not None and (isinstance(until, bool) or not isinstance(until, int)):
            raise ValueError(f"until must be a step or null, but got {until!r:.40}")
        self.until = None if self.override is None else until
        self.hold = finite_lrs(state.get("hold"))


class OperatorVerbs:
    """The engine's mode and the operator's verbs (mixed into
    :class:`~lrctl.policy.Engine`, whose attributes these are)."""

    operator: OperatorControls
    initial_lrs: tuple[float, ...]
    min_lr: float
    max_lr: float
    last_step: int | None
    policy_sha256: str
    decision_count: int
    _mode: str
    _decisions: deque[Decision]

    policies: list[Policy]
    names: list[str]
    _order: list[int]
    _lrs: tuple[float, ...]
    _stale: bool
    _lrs_multiplier: float | None
    _compute: Callable[[int], list[float]]

    if TYPE_CHECKING:  # what it uses of the Engine (for type checkers only)
        @property
        def applied_lrs(self) -> list[float]: ...  # the engine's property
        def request_rollback(self, to: int | None = None) -> tuple[int, int]: ...  # Snapshotting's
        @property
        def same_step_answers(self) -> bool: ...  # the arbiter's property

    @property
    def mode(self) -> str:
        """``active``, or ``shadow``: the policies decide, the LRs hold (see :meth:`set_mode`)."""
        return self._mode

    @mode.setter
    def mode(self, mode: str) -> None:
        self.set_mode(mode)

    def set_mode(self, mode: str, holding: Sequence[float] | None = None) -> None:
        """Enter or leave shadow mode. Entering holds ``holding`` (default: the LRs in
        effect now) unless already holding; leaving releases the hold."""
        if mode not in ("active", "shadow"):
            raise ValueError(f"mode must be 'active' or 'shadow', but got {mode=}")
        if mode == "shadow":
            if self.operator.hold is None:
                self.operator.hold = tuple(self.applied_lrs if holding is None else holding)
        else:
            self.operator.hold = None
        self._mode = mode

    # -- the operator's verbs ------------------------------------------------------------
    def set_lr(self, lr: float, steps: int | None = None, force: bool = False) -> Decision:
        """A manual LR for group 0 (the other groups keep their initial ratio to it), for
        ``steps`` steps after the last observed one, or until :meth:`clear_lr`.
        ``ValueError``, with nothing changed, for an LR a group cannot take, and (unless
        ``force``) for one more than :data:`SET_LR_JUMP` times both group 0's initial LR
        and its LR now: a typo's exponent (1e3 for 1e-3) where the file sets no max_lr."""
        initial = self.initial_lrs
        ratios = [g / initial[0] if initial[0] > 0 else 1.0 for g in initial]
        before = self.applied_lrs
        last = -1 if self.last_step is None else self.last_step
        until = None if steps is None else last + steps
        lrs = [lr * r for r in ratios]
        for i, (value, ratio) in enumerate(zip(lrs, ratios, strict=True)):
            if not math.isfinite(value):  # (nothing changes: the operator is told why)
                raise ValueError(f"an LR of {lr:g} would make group {i}'s {value} (it keeps "
                                 f"its ratio {ratio:g} to group 0): give a smaller LR")
            if not self.min_lr <= value <= self.max_lr:  # the file's bounds bind us all
                which = f"group {i}'s LR would be {value:g} (its ratio {ratio:g} to group " \
                        "0); " if i else ""
                raise ValueError(f"an LR of {lr:g} is outside the policy file's bounds: "
                                 f"{which}min_lr {self.min_lr:g}, max_lr {self.max_lr:g}")
        # Group 0's initial and current LR; where both are 0 (a frozen group 0: every
        # group then takes the LR), any group's.
        reference = max(initial[0], before[0]) or max(*initial, *before)
        if not force and reference > 0 and lr > SET_LR_JUMP * reference:
            which = ("the run's initial LR and its LR now" if max(initial[0], before[0]) > 0
                     else "every group's initial and current LR")
            raise ValueError(f"an LR of {lr:g} is more than {SET_LR_JUMP:g}x {which} (at "
                             f"most {reference:g}); if you mean it, pass --force (force=True)")
        self.operator.set_override(lrs, until)
        held = "until cleared" if steps is None else f"for {steps} steps (through step {until})"
        return self._operator_decision("set_lr", before, f"manual LR {lr:g} set by an "
                                       f"operator, held {held}", {"lr": lr, "steps": steps})

    def clear_lr(self) -> Decision:
        """Release the manual LR; ``ValueError`` when none is set (no decision to record)."""
        if self.operator.override is None:
            raise ValueError("no manual LR is set (lrctl set-lr RUN LR sets one)")
        before = self.applied_lrs
        self.operator.clear_override()
        return self._operator_decision("release_lr", before,
                                       "manual override cleared by an operator", {})

    def pause(self) -> Decision:
        """Shadow mode by an operator: the policies observe and record, the LRs hold."""
        before = self.applied_lrs
        self.set_mode("shadow")
        return self._operator_decision(
            "pause", before, "paused by an operator: policies observe and record, LRs hold",
            {"mode": "shadow"})

    def resume(self) -> Decision:
        before = self.applied_lrs
        self.set_mode("active")
        return self._operator_decision("resume", before,
                                       "resumed by an operator: policies act again",
                                       {"mode": "active"})

    def rollback(self, to: int | None, lag: int) -> Decision:
        """An operator's rollback: the hook restores its newest snapshot at or before
        ``to`` (default: its newest) at its next step, ``lag`` steps after the last
        observed one. ``ValueError`` when it holds none (nothing changes then)."""
        target, now = self.request_rollback(to)
        lrs = self.applied_lrs
        return self._operator_decision(
            "rollback", lrs, f"rollback to the snapshot of step {target} requested by an "
            f"operator{'' if to is None else f' (at or before step {to})'}",
            {"snapshot_step": target, "requested": to, "incident_step": now,
             "steps_lost": now + lag - target})  # at most (see rolled_back)

    def command(self, name: str, **args: Any) -> list[Decision]:
        """An operator command for the one policy of the stack that takes it (``decay``,
        ``cancel``: ``kind: wsd``), effective from the step after the last observed one.

        The policy's state changes (and with it :meth:`state_dict`), so the command
        survives a checkpoint; every path (controller, in-process) decides the same
        LRs from it. ``ValueError`` when no policy, or more than one, takes ``name``, or
        when the policy cannot do it now; nothing changes then.
        """
        takers = [i for i in self._order if name in self.policies[i].COMMANDS]
        if len(takers) != 1:
            which = ", ".join(self.names[i] for i in takers) or "none"
            from ._registry import available_kinds, get_policy_class  # (the error path only)

            kinds = [k for k in available_kinds() if name in get_policy_class(k).COMMANDS]
            raise ValueError(f"{name!r} needs exactly one policy that takes it in the stack "
                             f"(here: {which}; a policy of kind {' or '.join(kinds) or '?'} "
                             "takes it)")
        i = takers[0]
        step = -1 if self.last_step is None else self.last_step
        before = list(self._lrs)
        actions = self.policies[i].command(name, args, step)
        self._stale = True
        self._lrs = tuple(self._compute(step + 1))
        self._lrs_multiplier = None
        # Under a manual LR the command changes the policies' LRs, not the optimizer's:
        # recorded so, as an observation's decisions are (see LRArbiter._decisions_of).
        # Its LRs reach the optimizer with the answer to the next observation: judged as a
        # decision made there (a manual LR ending at that step leaves them in force).
        overridden = (self.operator.overrides(step + 1, self.same_step_answers)
                      and tuple(before) != self._lrs)
        decisions = []
        for a in actions:
            reason, evidence = (not_applied(a.reason, a.evidence) if overridden
                                and a.action not in ("skip", "stop") else (a.reason, a.evidence))
            decisions.append(Decision(
                step=max(step, 0), policy=self.names[i], kind=self.policies[i].kind,
                action=a.action, old_lrs=tuple(before), new_lrs=tuple(self._lrs),
                reason=reason, evidence=evidence, policy_sha256=self.policy_sha256,
                shadow=self.mode == "shadow"))
        self._decisions.extend(decisions)
        self.decision_count += len(decisions)
        return decisions

    def _operator_decision(self, action: str, before: Sequence[float], reason: str,
                           evidence: Mapping[str, Any], step: int | None = None) -> Decision:
        last = -1 if self.last_step is None else self.last_step
        decision = Decision(
            step=max(last if step is None else step, 0), policy=OPERATOR, kind=OPERATOR,
            action=action, old_lrs=tuple(before), new_lrs=tuple(self.applied_lrs),
            reason=reason, evidence=dict(evidence), policy_sha256=self.policy_sha256)
        if step is None:  # a verb (an expiry is recorded with its observation's decisions)
            self._decisions.append(decision)
            self.decision_count += 1
        return decision


def finite_lrs(value: Any) -> tuple[float, ...] | None:
    """LRs from a state (which may come from a user's checkpoint): finite numbers >= 0."""
    if value is None:
        return None
    if not isinstance(value, (list, tuple)) or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v < math.inf
            for v in value):
        raise ValueError(f"expected a list of finite LRs >= 0, but got {value!r:.80}")
    return tuple(float(v) for v in value)
