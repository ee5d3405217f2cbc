"""The engine's and the divergence guard's shortcuts give bit-identical results.

``Engine.update`` asks each reactive policy for its multiplier once per
observation and again only after its own ``observe``; ``RobustWindow`` computes
its quantiles once per change. A reference engine that asks every policy before
and after every ``observe`` (as the engine used to) and the quantiles computed
one by one must agree with them bit for bit, on every stack and stream.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import lrctl
from lrctl.policy import Engine
from lrctl.policy._base import SCHEDULE, Action, Observation, Policy, StepContext
from lrctl.policy._decision import Decision
from lrctl.policy.stats import RobustWindow

POLICIES = Path(__file__).resolve().parents[2] / "policies"


class _Creeper(Policy):
    """Changes its multiplier without ever saying so (like a range test's sweep),
    sometimes to a new float object of the same value, sometimes to -0.0."""

    kind = "creeper"

    def __init__(self) -> None:
        super().__init__()
        self._m = 1.0
        self._n = 0

    def multiplier(self) -> float:
        return self._m

    def observe(self, obs: Observation, ctx: StepContext) -> list[Action]:
        self._n += 1
        if self._n % 7 == 0:
            self._m = float(str(self._m))  # same value, another object
        elif self._n % 11 == 0:
            self._m = -0.0 if self._m == 0.0 else 0.0
        elif self._n % 13 == 0:
            self._m = 1.0
        else:
            self._m *= 1.01
        if self._n % 17 == 0:
            return [Action("nudge", "a silent change, then a said one", {"n": self._n})]
        return []

    def state_dict(self) -> dict[str, Any]:
        return {"m": self._m, "n": self._n}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._m, self._n = state["m"], state["n"]


class _Reference(Engine):
    """``Engine.update`` as it was: every multiplier asked before and after each policy."""

    def update(self, step: int, loss: float | None, grad_norm: float | None,
               metrics: Mapping[str, float]) -> list[float]:
        obs = self._make_observation(step, loss, grad_norm, metrics)
        ctx = StepContext(initial_lrs=self.initial_lrs, total_steps=self.total_steps)
        new_decisions: list[Decision] = []
        factors = self._schedule_factors(obs.step + 1)
        for i in self._order:
            policy = self.policies[i]
            multiplier = self._multiplier()
            actions = policy.observe(obs, ctx)
            if not actions:
                continue
            before = self._lrs_from(multiplier, factors)
            after = self._lrs_from(self._multiplier(), factors)
            for action in actions:
                moved = action.action not in ("skip", "stop")
                new_decisions.append(Decision(
                    step=obs.step, policy=self.names[i], kind=policy.kind,
                    action=action.action, old_lrs=tuple(before),
                    new_lrs=tuple(after if moved else before), reason=action.reason,
                    evidence=action.evidence, policy_sha256=self.policy_sha256,
                    shadow=self.mode == "shadow"))
        self.last_step = obs.step
        self.should_skip = ctx.skip
        self.should_stop = self.should_stop or (ctx.stop and self.mode == "active")
        self._saw_unusable = False
        lrs = self._lrs_from(self._multiplier(), factors)
        if self._unusable or self._saw_unusable:  # the clamp record, as Engine.update
            record = self._unusable_record(obs.step, self._multiplier(), factors, self._lrs,
                                           lrs)
            if record is not None:
                new_decisions.append(record)
        self._lrs = lrs
        self._decisions.extend(new_decisions)
        self.decision_count += len(new_decisions)
        self.last_decisions = new_decisions
        return self.applied_lrs


def _bits(values: Any) -> list[bytes]:
    return [struct.pack(">d", v) for v in values]


def _pair(source: Any, base_lrs: list[float], creeper: bool) -> tuple[Engine, Engine]:
    engines = []
    for cls in (Engine, _Reference):
        built = lrctl.load_policy(source, base_lrs)
        policies = list(built.policies) + ([_Creeper()] if creeper else [])
        names = list(built.names) + (["creeper"] if creeper else [])
        engine = cls(policies, base_lrs, names=names, min_lr=built.min_lr,
                     max_lr=None if math.isinf(built.max_lr) else built.max_lr,
                     mode=built.mode, policy_sha256=built.policy_sha256)
        engines.append(engine)
    return engines[0], engines[1]


SOURCES = sorted(str(p) for p in POLICIES.glob("*.yaml"))
weird = st.sampled_from([math.nan, math.inf, -math.inf, 0.0, -0.0, 1e300, 5e-324, 50.0])
normal = st.floats(min_value=0.05, max_value=5.0)
value = st.one_of(st.none(), normal, normal, normal, normal, weird)


@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize("creeper", [False, True])
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(base_lrs=st.lists(st.floats(min_value=0.0, max_value=1.0), min_size=1, max_size=3),
       seq=st.lists(st.tuples(value, value), min_size=1, max_size=400))
def test_update_is_bit_identical_to_asking_every_multiplier(
        source: str, creeper: bool, base_lrs: list[float],
        seq: list[tuple[float | None, float | None]]) -> None:
    fast, ref = _pair(source, base_lrs, creeper)
    for step, (loss, grad) in enumerate(seq):
        got = fast.update(step, loss, grad, {})
        want = ref.update(step, loss, grad, {})
        assert _bits(got) == _bits(want), f"step {step}"
        assert [d.to_dict() for d in fast.last_decisions] == [
            d.to_dict() for d in ref.last_decisions], f"step {step}"
        assert (fast.should_skip, fast.should_stop) == (ref.should_skip, ref.should_stop)
    assert fast.state_dict() == ref.state_dict()


def test_the_creeper_does_move_the_lr_silently() -> None:
    fast, _ = _pair(str(POLICIES / "plateau.yaml"), [0.1], True)
    seen = {tuple(_bits(fast.observe(s, 1.0))) for s in range(40)}
    assert len(seen) > 5
    assert _Creeper.role != SCHEDULE


# -- RobustWindow -----------------------------------------------------------------------------
def _quantiles(window: RobustWindow) -> tuple[float, float]:
    return window._quantile(0.5), (window._quantile(0.75) - window._quantile(0.25)) / 1.349


floats = st.one_of(st.floats(allow_nan=False, allow_infinity=False),
                   st.floats(min_value=-10, max_value=10), st.sampled_from([0.0, -0.0, 5e-324]))


@settings(max_examples=200, deadline=None)
@given(size=st.integers(1, 20),
       ops=st.lists(st.one_of(st.tuples(st.just("add"), floats),
                              st.tuples(st.just("load"), st.lists(floats, max_size=30))),
                    min_size=1, max_size=80))
def test_window_stats_are_the_quantiles_bit_for_bit(
        size: int, ops: list[tuple[str, Any]]) -> None:
    window = RobustWindow(size)
    for op, arg in ops:
        if op == "add":
            window.add(arg)
        else:
            window.load(arg)
        if not len(window):
            with pytest.raises(IndexError):
                window.stats()
            continue
        want = _quantiles(window)
        assert _bits(window.stats()) == _bits(want)
        assert _bits([window.median(), window.sigma()]) == _bits(want)
        assert _bits(window.stats()) == _bits(want)  # the cached answer too
