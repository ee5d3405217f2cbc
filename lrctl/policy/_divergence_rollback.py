"""The divergence guard's last resort: roll back to a snapshot taken before the incident.

A mixin of :class:`~lrctl.policy.divergence.Divergence`, whose attributes these are
(see its docstring for when a rollback is decided). Its state is kept only for a
run with snapshots, so every other run's state stays as it was.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ._base import Action, StepContext
from ._divergence_attrs import GuardAttributes

__all__ = ["RollbackEscalation"]


class RollbackEscalation(GuardAttributes):
    """Rollback decisions and their state (mixed into the divergence guard)."""

    def _rollback(self, ctx: StepContext, reason: str, evidence: dict[str, Any],
                  factor: float) -> list[Action] | None:
        """Roll back to the newest snapshot before the incident, with the LR × ``factor``;
        None (the caller backs off as without snapshots) when there is no such snapshot,
        rollbacks are off, or a back-off would stop the run anyway."""
        book = ctx.snapshots
        most = self.params["max_rollbacks"]
        if (book is None or most == 0 or self._stopped or self._incident < 0
                or self._backoffs >= self.params["max_backoffs"]
                or self._scale <= self.params["min_multiplier"]):
            return None
        target = book.newest_at_or_before(self._incident - 1, self._now)
        if target is None:
            return None
        actions: list[Action] = []
        if ctx.skip:
            actions.append(Action("skip", f"skip this optimizer step: {reason}", evidence))
        record = {**evidence, "incident_step": self._incident, "snapshot_step": target,
                  "steps_lost": self._now + book.lag + 1 - target,
                  "rollbacks": self._rollbacks}
        if self._rollbacks >= most:
            self._stopped = True
            ctx.stop = True
            actions.append(Action("stop", f"training keeps diverging after {most} "
                                  f"rollback(s): {reason}", record))
            return actions
        old = self._scale
        self._scale = max(self._scale * factor, self.params["min_multiplier"])
        self._rollbacks += 1
        self._backoffs += 1
        self._total_backoffs += 1
        # The restored model starts a fresh cooldown: what it shows next is judged anew.
        self._cooldown = self.params["cooldown"]
        self._cooldown_seen, self._cooldown_spikes = [], 0
        self._escalation = self._spikes = self._clean = self._nonfinite_run = 0
        ctx.rollback = target
        self._discard_until = self._now + book.lag
        # What needed a rollback was no passing spike: the LR does not regrow past the cut.
        self._ceiling = self._scale
        record.update(factor=self._scale / old, backoffs=self._backoffs,
                      rollbacks=self._rollbacks)
        actions.append(Action(
            "rollback", f"{reason}: roll back to the snapshot of step {target} (before the "
                        f"incident at step {self._incident}; {record['steps_lost']} steps "
                        f"lost), LR × {self._scale / old:.6g}", record))
        return actions

    def _rollback_state(self) -> dict[str, Any]:
        if not self._with_snapshots:
            return {}
        return {"rollback": {"rollbacks": self._rollbacks, "incident": self._incident,
                             "nonfinite_run": self._nonfinite_run, "ceiling": self._ceiling,
                             "discard_until": self._discard_until}}

    def _load_rollback_state(self, state: Mapping[str, Any]) -> None:
        rollback = state.get("rollback") or {}
        self._with_snapshots = bool(rollback)
        self._rollbacks = int(rollback.get("rollbacks", 0))
        self._incident = int(rollback.get("incident", -1))
        self._nonfinite_run = int(rollback.get("nonfinite_run", 0))
        self._ceiling = float(rollback.get("ceiling", 1.0))
        self._discard_until = int(rollback.get("discard_until", -1))
