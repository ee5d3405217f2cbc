"""The engine refills one Observation per stack only when no policy keeps observations."""

from __future__ import annotations

import gc
import math
import types
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

import lrctl
from lrctl.policy import Action, Engine, Observation, Policy, StepContext
from lrctl.policy._registry import available_kinds, get_policy_class

POLICIES = sorted((Path(__file__).resolve().parents[2] / "policies").glob("*.yaml"))


class _Keeper(Policy):
    """A user policy that keeps every observation it sees (its right)."""

    kind = "keeper"

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[Observation] = []

    def observe(self, obs: Observation, ctx: StepContext) -> list[Action]:
        self.seen.append(obs)
        return []

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        pass


def test_built_in_kinds_say_they_keep_no_observations() -> None:
    for kind in available_kinds():
        cls = get_policy_class(kind)
        if cls.__module__.startswith("lrctl.policy."):
            assert cls.keeps_observations is False, kind
    assert Policy.keeps_observations is True  # a user policy's default: fresh objects


@pytest.mark.parametrize("path", POLICIES, ids=[p.stem for p in POLICIES])
def test_no_shipped_policy_holds_on_to_the_reused_observation(path: Path) -> None:
    engine = lrctl.load_policy(path, [0.1], total_steps=401)
    for step in range(400):
        loss = math.nan if step == 300 else 2.0 * math.exp(-step / 200) + 0.01 * (step % 7)
        engine.observe(step, loss, 1.0 + (step % 5), **({"val_loss": loss} if step % 10 == 0
                                                        else {}))
    engine.observe(400, 1.0, val_loss=1.0)  # a metric: the full way, which refills it
    obs = engine._reused
    assert obs is not None and obs.step == 400
    holders = [r for r in gc.get_referrers(obs) if not isinstance(r, types.FrameType)]
    # The engine alone (CPython 3.11+ may name the object rather than its __dict__).
    assert len(holders) == 1 and (holders[0] is engine or holders[0] is vars(engine))


def test_a_policy_that_keeps_observations_gets_a_new_one_each_step() -> None:
    keeper = _Keeper()
    engine = Engine([get_policy_class("divergence")(), keeper], [0.1])
    for step in range(3):
        engine.observe(step, 1.0 + step, 2.0)
    assert [o.step for o in keeper.seen] == [0, 1, 2]
    assert [o.loss for o in keeper.seen] == [1.0, 2.0, 3.0]
    assert len({id(o) for o in keeper.seen}) == 3
