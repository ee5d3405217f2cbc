"""The divergence guard's state: what a checkpoint keeps, and how a resume restores it.

A mixin of :class:`~lrctl.policy.divergence.Divergence`, whose attributes these are. Keys
that only some runs need are written only when set, so every other run's state stays as
it was.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ._divergence_attrs import GuardAttributes

__all__ = ["GuardState"]


class GuardState(GuardAttributes):
    """``state_dict`` and ``load_state_dict`` (mixed into the divergence guard)."""

    def state_dict(self) -> dict[str, Any]:
        return {
            "scale": self._scale,
            "loss_window": self._loss.values(),
            "grad_norm_window": self._gnorm.values(),
            "spikes": self._spikes,
            **({"grad_spikes": self._grad_spikes} if self._grad_spikes else {}),
            **({"loss_run": self._loss_run} if self._loss_run else {}),
            "backoffs": self._backoffs,
            "cooldown": self._cooldown,
            "cooldown_seen": [list(pair) for pair in self._cooldown_seen],
            "cooldown_spikes": self._cooldown_spikes,
            "clean": self._clean,
            "total_backoffs": self._total_backoffs,
            "stopped": self._stopped,
            "escalation": self._escalation,
            **({"incident_level": self._incident_level, "level_held": self._level_held}
               if self._incident_level is not None else {}),
            **({"settling": list(self._after), "accepted": dict(self._accepted or {})}
               if self._after is not None else {}),
            **({"before_incident": self._before_incident}
               if self._before_incident != 1.0 else {}),
            # (only once said: the state of every other run is as it was)
            **({"told_nonpositive": True} if self._told_nonpositive else {}),
            **self._rollback_state(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._scale = float(state["scale"])
        self._loss.load([float(v) for v in state["loss_window"]])
        self._gnorm.load([float(v) for v in state["grad_norm_window"]])
        self._spikes = int(state["spikes"])
        self._grad_spikes = int(state.get("grad_spikes", 0))
        self._loss_run = int(state.get("loss_run", 0))
        self._backoffs = int(state["backoffs"])
        self._cooldown = int(state["cooldown"])
        # A cooldown keeps at most `cooldown` pairs and a settling fewer than `min_samples`
        # losses: no more are taken from a saved state (a peer's, in a hello, or one of
        # before a reload that lowered them), the newest.
        seen = list(state["cooldown_seen"])[-self.params["cooldown"]:] if self.params[
            "cooldown"] else []
        self._cooldown_seen = [(None if a is None else float(a), None if b is None else float(b))
                               for a, b in seen]
        self._cooldown_spikes = int(state["cooldown_spikes"])
        self._clean = int(state["clean"])
        self._total_backoffs = int(state["total_backoffs"])
        self._stopped = bool(state["stopped"])
        self._escalation = int(state.get("escalation", 0))
        level = state.get("incident_level")
        self._incident_level = None if level is None else float(level)
        self._level_held = bool(state.get("level_held", False))
        self._before_incident = float(state.get("before_incident", 1.0))
        after = state.get("settling")
        self._after = None if after is None else [
            float(v) for v in list(after)[-(self.params["min_samples"] - 1):]]  # (>= 4)
        self._accepted = None if after is None else dict(state["accepted"])
        self._told_nonpositive = bool(state.get("told_nonpositive", False))
        self._load_rollback_state(state)

