"""The divergence guard's last resort: roll back to a snapshot taken before the incident.

A mixin of :class:`~lrctl.policy.divergence.Divergence`, whose attributes these are
(see its docstring for when a rollback is decided). Its state is kept only for a
run with snapshots, so every other run's state stays as it was.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from ._base import Action, StepContext
from ._divergence_attrs import GuardAttributes
from ._divergence_shift import median

__all__ = ["RollbackEscalation"]


class RollbackEscalation(GuardAttributes):
    """Rollback decisions and their state (mixed into the divergence guard)."""

    def _rollback(self, ctx: StepContext, reason: str, evidence: dict[str, Any],
                  factor: float, level: float | None = None) -> list[Action] | None:
        """Roll back to the newest snapshot before the incident, with the LR × ``factor``;
        None (the caller backs off as without snapshots) when there is no such snapshot,
        rollbacks are off, or a back-off would stop the run anyway. ``level``: the judged
        median loss the broken run sat at (a back-off that did not take), for
        :meth:`_restored_shows_it` to compare the restored weights' loss with."""
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
                  # (at most: a sync hook restores a step sooner; rolled_back says)
                  "steps_lost": self._now + book.lag - target,
                  "rollbacks": self._rollbacks}
        if self._rollbacks >= most:
            self._stopped = True
            ctx.stop = True
            actions.append(Action("stop", f"training keeps diverging after {most} "
                                  f"rollback(s): {reason}", record))
            return actions
        old = self._scale
        self._scale = max(self._scale * factor, self.params["min_multiplier"])
        # In process (lag 0) the restore is at this step; a hook says when it restored.
        self._restored = None if level is None else {
            "level": level, "snapshot_step": target, "ceiling": self._ceiling, "first": None,
            "at": self._now if book.lag == 0 else None}
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
                        f"incident at step {self._incident}; up to {record['steps_lost']} "
                        f"steps lost), LR × {self._scale / old:.6g}", record))
        return actions

    def restored_at(self, step: int) -> None:
        """The hook restored the snapshot before step ``step`` (see Engine.restored)."""
        if self._restored is not None and self._restored["at"] is None:
            self._restored["at"] = step

    def _note_restored(self, step: int, loss: float | None) -> None:
        """The loss of step ``at + 1``, the restored weights' own (no update at the new LR
        has reached them yet). Any other step's is not theirs: a restore not yet carried
        out (an async hook's lag), one step after it (sync), a step not reported
        (``every=N``): then nothing is concluded (see :meth:`_restored_shows_it`)."""
        restored = self._restored
        assert restored is not None
        at = restored["at"]
        if at is None or step != at + 1 or restored["first"] is not None or loss is None:
            return
        if self.params["loss_scale"] == "linear":
            restored["first"] = loss
        elif loss > 0:
            restored["first"] = math.log(loss)

    def _restored_shows_it(self, losses: list[float], shift: dict[str, Any] | None,
                           ) -> dict[str, Any] | None:
        """The first cooldown after a rollback ended (``losses``: its judged losses;
        ``shift``: its evidence of a level still over ``max_shift`` ×, or None): evidence
        that the rise came with the data, not the weights, else None. The restored
        snapshot's weights are from before the incident; if their own first loss is
        already a spike by the window's test, and the cooldown's median loss is within
        ``LOSS_CONFIRMS`` × of the level the broken run sat at, what the rollback undid
        did not cause the rise. A blow-up from a too-high LR starts again from the old
        level (the first loss, on the restored weights, is ordinary); a snapshot that was
        itself damaged is the rare case this cannot tell from new data."""
        restored, self._restored = self._restored, None
        if restored is None or shift is None or restored["first"] is None or not losses:
            return None
        first, level = restored["first"], restored["level"]
        if self._judge(first, None) is None or not self._near(level, median(losses)):
            return None
        self._ceiling = max(self._ceiling, restored["ceiling"])  # no rollback was needed
        return {**shift, **self._levels(level, median(losses)), "window": len(losses),
                "snapshot_step": restored["snapshot_step"], "first_loss": self._levels(
                    first, first)["loss_after"]}

    def _rollback_state(self) -> dict[str, Any]:
        if not self._with_snapshots:
            return {}
        return {"rollback": {"rollbacks": self._rollbacks, "incident": self._incident,
                             "nonfinite_run": self._nonfinite_run, "ceiling": self._ceiling,
                             "discard_until": self._discard_until,
                             **({"restored": dict(self._restored)}
                                if self._restored is not None else {})}}

    def _load_rollback_state(self, state: Mapping[str, Any]) -> None:
        rollback = state.get("rollback") or {}
        self._with_snapshots = bool(rollback)
        self._rollbacks = int(rollback.get("rollbacks", 0))
        self._incident = int(rollback.get("incident", -1))
        self._nonfinite_run = int(rollback.get("nonfinite_run", 0))
        self._ceiling = float(rollback.get("ceiling", 1.0))
        self._discard_until = int(rollback.get("discard_until", -1))
        restored = rollback.get("restored")
        self._restored = None if restored is None else {
            "level": float(restored["level"]), "snapshot_step": int(restored["snapshot_step"]),
            "ceiling": float(restored["ceiling"]),
            "first": None if restored["first"] is None else float(restored["first"]),
            "at": None if restored.get("at") is None else int(restored["at"])}
