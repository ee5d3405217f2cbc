"""The engine's state: its ``state_dict`` (checkpoints, the hook's saved state) and the
hot reload that carries one engine's run over to another's policies.

A mixin of :class:`~lrctl.policy.Engine`, whose attributes these methods use.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from ._operator import finite_lrs as _finite_lrs
from ._rollback import SnapshotBook

if TYPE_CHECKING:
    from collections import deque

    from ._base import Policy, StepContext
    from ._decision import Decision
    from ._engine import Engine
    from ._operator import OperatorControls

__all__ = ["STATE_VERSION", "EngineState"]

STATE_VERSION = 1


class EngineState:
    """State out and in, and the hot reload (see the module docstring)."""

    if TYPE_CHECKING:  # what it uses of the Engine (for type checkers only)
        initial_lrs: tuple[float, ...]
        total_steps: int | None
        policies: list[Policy]
        names: list[str]
        policy_sha256: str
        last_step: int | None
        should_stop: bool
        decision_count: int
        snapshots: SnapshotBook | None
        operator: OperatorControls
        _mode: str
        _stale: bool
        _unusable: bool
        _lrs: tuple[float, ...]
        _lrs_multiplier: float | None
        _decisions: deque[Decision]
        _ctx: StepContext
        mode: str  # (a property of OperatorVerbs, with its setter)

        def _compute(self, step: int) -> list[float]: ...

    # -- hot reload ----------------------------------------------------------------
    def inherit(self, old: Engine) -> dict[str, list[str]]:
        """Continue ``old``'s run with this engine's policies (a hot reload).

        Policies are matched by ``(name, kind)``. A match keeps its state —
        counters, rolling statistics, its current multiplier — even when its
        knobs changed; a new policy starts fresh; a removed one is dropped with
        its multiplier. The step counter, stop flag and decision count carry
        over. Returns which policies were kept, changed, added, removed or reset
        (kept in name but with a state the new knobs could not take).
        """
        if len(old.initial_lrs) != len(self.initial_lrs):
            raise ValueError("a reload cannot change the number of param groups")
        self.initial_lrs = old.initial_lrs
        if self.total_steps is None:
            self.total_steps = old.total_steps
        previous = {(n, p.kind): p for n, p in zip(old.names, old.policies, strict=True)}
        summary: dict[str, list[str]] = {"kept": [], "changed": [], "added": [],
                                         "removed": [], "reset": []}
        for name, policy in zip(self.names, self.policies, strict=True):
            before = previous.pop((name, policy.kind), None)
            if before is None:
                summary["added"].append(name)
                continue
            try:
                policy.load_state_dict(before.state_dict())
            except (KeyError, TypeError, ValueError):
                summary["reset"].append(name)
                continue
            summary["changed" if policy.params != before.params else "kept"].append(name)
        summary["removed"] = [name for name, _ in previous]
        self.last_step = old.last_step
        self.should_stop = old.should_stop
        self.decision_count = old.decision_count
        self.snapshots = self._ctx.snapshots = old.snapshots
        self._decisions = old._decisions
        self._unusable = old._unusable
        self.operator = old.operator  # the manual LR and the hold stay in force
        step = 0 if old.last_step is None else old.last_step + 1
        self._lrs = tuple(self._compute(step))
        self._lrs_multiplier = None
        self._stale = True
        return summary

    # -- state -------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        state = self._state()
        if self.snapshots is not None:  # only then: the state of other runs is unchanged
            state["snapshots"] = self.snapshots.state_dict()
        return state

    def _state(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "initial_lrs": list(self.initial_lrs),
            "last_step": self.last_step,
            "lrs": list(self._lrs),
            "mode": self.mode,
            "operator": self.operator.state_dict(),
            "should_stop": self.should_stop,
            "decision_count": self.decision_count,
            "unusable": self._unusable,
            "policy_sha256": self.policy_sha256,
            "policies": [
                {"name": n, "kind": p.kind, "state": p.state_dict()}
                for n, p in zip(self.names, self.policies, strict=True)
            ],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"unsupported engine state version {state.get('version')!r}")
        if list(state["initial_lrs"]) != list(self.initial_lrs):
            raise ValueError(
                f"state is for initial LRs {state['initial_lrs']}, not {list(self.initial_lrs)}")
        saved = {(p["name"], p["kind"]): p["state"] for p in state["policies"]}
        mine = {(n, p.kind) for n, p in zip(self.names, self.policies, strict=True)}
        if set(saved) != mine:
            raise ValueError(f"state is for policies {sorted(saved)}, not {sorted(mine)}")
        self._stale = True  # the policies' multipliers are asked again at the next step
        for name, policy in zip(self.names, self.policies, strict=True):
            policy.load_state_dict(saved[(name, policy.kind)])
        self.last_step = state["last_step"]
        if state["mode"] not in ("active", "shadow"):
            raise ValueError(f"unknown mode {state['mode']!r}")
        self._mode = state["mode"]
        if "operator" in state:
            self.operator.load_state_dict(state["operator"])
            groups = len(self.initial_lrs)
            if any(lrs is not None and len(lrs) != groups
                   for lrs in (self.operator.override, self.operator.hold)):
                raise ValueError(f"operator LRs are not {groups} per group")
        else:  # a state from before the operator moved here: shadow held the initial LRs
            self.operator.load_state_dict(
                {"hold": list(self.initial_lrs) if self._mode == "shadow" else None})
        self.should_stop = bool(state["should_stop"])
        self.decision_count = int(state["decision_count"])
        self._unusable = bool(state.get("unusable", False))
        lrs = _finite_lrs(state["lrs"])  # (from a checkpoint, or a hook's saved session)
        if lrs is None or len(lrs) != len(self.initial_lrs):
            raise ValueError(f"state holds LRs {state['lrs']!r:.80}, not "
                             f"{len(self.initial_lrs)} (one per group)")
        self._lrs = lrs
        self._lrs_multiplier = None
        book = state.get("snapshots")
        self.snapshots = self._ctx.snapshots = (
            None if book is None else SnapshotBook.from_state(book))
