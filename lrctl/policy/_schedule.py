"""Shared base for schedules: stateless functions of the step."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ._base import SCHEDULE, Action, Observation, Policy, StepContext


class Schedule(Policy):
    """A policy whose learning-rate factor is a pure function of the step.

    Schedules have no state beyond their knobs, so a resumed run recomputes
    exactly the same factors. Subclasses may report phase events (a warmup that
    completes, a warm restart) from :meth:`events`.
    """

    role = SCHEDULE
    keeps_observations = False

    def observe(self, obs: Observation, ctx: StepContext) -> list[Action]:
        # The engine asks for the LR of the *next* step, so phase events are
        # reported when that step begins a new phase, or by the first observation after
        # it when the steps in between were not reported (every=N).
        next_step = obs.step + 1
        prev = ctx.prev_step
        if prev is None or prev + 2 >= next_step:
            return self.events(next_step)
        return self.events_between(prev + 2, next_step)

    def events(self, next_step: int) -> list[Action]:
        """The events of the phase that step ``next_step`` begins."""
        return []

    def events_between(self, since: int, next_step: int) -> list[Action]:
        """The events of the phases begun by the steps ``since`` to ``next_step``
        (``since < next_step``: the steps in between were not observed). By default,
        ``next_step``'s only."""
        return self.events(next_step)

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state:
            raise ValueError(f"{self.kind}: unexpected state keys {sorted(state)}")


def per_group(value: float | list[float] | None, group: int, fallback: float) -> float:
    """A knob given as one number or a list of one number per param group."""
    if value is None:
        return fallback
    if isinstance(value, list):
        if group >= len(value):
            raise ValueError(
                f"a per-group list has {len(value)} entries but the optimizer has more groups"
            )
        return value[group]
    return value
