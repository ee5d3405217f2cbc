"""The plain way through the engine decides exactly as the full way, bit for bit.

``Engine.observe`` hands the usual observation to each policy's ``observe_plain``
(no Observation, no context, no multiplier or decision work), the divergence guard
tells ordinary values from spikes with its windows' screens and lets their sorted
copies fall behind, and plateau decay skips a trend test that surely says "fell".
The reference here takes none of these shortcuts: an engine with no plain observers,
whose divergence guard always runs the full rule on windows kept sorted value by value
(the code before the speed work). Both must give the same LRs, flags, decisions and
state at every step, on random streams (NaN, inf, zeros, huge values, missing
statistics, metrics) and on long runs through spikes, cooldowns, new levels,
regrowth, plateaus and window wrap-around; and after a restored state or an
operator command, the plain way must see the multipliers those changed.
"""

from __future__ import annotations

import math
import random
import struct
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import lrctl
from lrctl.policy import Engine
from lrctl.policy.divergence import Divergence
from lrctl.policy.stats import RobustWindow

POLICIES = Path(__file__).resolve().parents[2] / "policies"
SOURCES = sorted(POLICIES.glob("*.yaml"))


class _FullDivergence(Divergence):
    """The divergence guard without its shortcuts: the full rule at every observation,
    on windows kept sorted value by value (no screen)."""

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        self._loss = RobustWindow(self.params["window"])
        self._gnorm = RobustWindow(self.params["window"])

    def observe_plain(self, step: int, loss: float | None, grad_norm: float | None) -> bool:
        return False

    def observe(self, obs: Any, ctx: Any) -> list[Any]:
        return self._observe(obs, ctx)


class _AlwaysAsking(Engine):
    """The engine before its shortcuts: every multiplier asked before each observation
    (not only after a command, a reload or a restored state)."""

    def _run(self, *args: Any) -> list[float]:
        self._stale = True
        return super()._run(*args)


def _engines(source: Path, base_lrs: list[float],
             total_steps: int | None = None) -> tuple[Engine, Engine]:
    fast = lrctl.load_policy(source, base_lrs, total_steps=total_steps)
    built = lrctl.load_policy(source, base_lrs, total_steps=total_steps)
    policies = [_FullDivergence(**p.params) if type(p) is Divergence else p
                for p in built.policies]
    ref = _AlwaysAsking(policies, base_lrs, names=built.names, min_lr=built.min_lr,
                        max_lr=None if math.isinf(built.max_lr) else built.max_lr,
                        mode=built.mode, policy_sha256=built.policy_sha256,
                        total_steps=total_steps)
    ref._plain = []  # (the full way at every step)
    return fast, ref


def _bits(values: Any) -> list[bytes]:
    return [struct.pack(">d", v) for v in values]


def _same(fast: Engine, ref: Engine, got: list[float], want: list[float], step: int) -> None:
    assert _bits(got) == _bits(want), f"step {step}"
    assert [d.to_dict() for d in fast.last_decisions] == [
        d.to_dict() for d in ref.last_decisions], f"step {step}"
    assert (fast.should_skip, fast.should_stop) == (ref.should_skip, ref.should_stop)


weird = st.sampled_from([math.nan, math.inf, -math.inf, 0.0, -0.0, 1e300, 5e-324, 50.0])
normal = st.floats(min_value=0.05, max_value=5.0)
value = st.one_of(st.none(), normal, normal, normal, normal, normal, weird)


@pytest.mark.parametrize("source", SOURCES, ids=[p.stem for p in SOURCES])
@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(base_lrs=st.lists(st.floats(min_value=0.0, max_value=1.0), min_size=1, max_size=2),
       seq=st.lists(st.tuples(value, value, st.booleans()), min_size=1, max_size=400))
def test_random_streams_take_the_plain_way_to_the_same_place(
        source: Path, base_lrs: list[float],
        seq: list[tuple[float | None, float | None, bool]]) -> None:
    fast, ref = _engines(source, base_lrs)
    for step, (loss, grad, metric) in enumerate(seq):
        metrics = {"val_loss": 1.0 + step % 3} if metric and step % 7 == 0 else {}
        _same(fast, ref, fast.observe(step, loss, grad, **metrics),
              ref.observe(step, loss, grad, **metrics), step)
    assert fast.state_dict() == ref.state_dict()


def _run(fast: Engine, ref: Engine, steps: int, seed: int, start: int = 0) -> None:
    """A closed-loop toy run (the loss follows the LR): noise, loss and grad-norm spikes,
    NaN, a new level, a blow-up, a plateau, and sometimes a val_loss."""
    rng = random.Random(seed)
    level, lrs = 2.0, fast.applied_lrs
    base = lrs[0] or 1e-3
    for step in range(start, start + steps):
        rel = lrs[0] / base
        level = 0.5 + (level - 0.5) * (1.0 - 0.002 * min(rel, 30.0))
        level *= {900: 3.0, 1700: 8.0}.get(step, 1.0)
        loss = level * math.exp(rng.gauss(0.0, 0.05))
        grad = 3.0 * level * math.exp(rng.gauss(0.0, 0.3))
        if rng.random() < 0.004:
            loss *= 20.0
        if rng.random() < 0.003:
            grad *= 50.0
        if step in (1234, 1235, 2100):
            loss = math.nan
        metrics = {"val_loss": level} if step % 97 == 96 else {}
        lrs = fast.observe(step, loss, grad, **metrics)
        _same(fast, ref, lrs, ref.observe(step, loss, grad, **metrics), step)
        if step % 250 == 0:
            assert fast.state_dict() == ref.state_dict(), f"step {step}"
    assert fast.state_dict() == ref.state_dict()


@pytest.mark.parametrize("source", SOURCES, ids=[p.stem for p in SOURCES])
def test_a_long_run_takes_the_plain_way_to_the_same_place(source: Path) -> None:
    fast, ref = _engines(source, [1e-3, 2.5e-4], total_steps=2500)
    _run(fast, ref, 2500, seed=11)
    assert fast.decision_count == ref.decision_count


def test_the_plain_way_is_the_usual_one() -> None:
    """The shortcuts are taken: most observations of a quiet run never build an
    Observation (the reused one is refilled only on the full way)."""
    fast, _ = _engines(POLICIES / "default.yaml", [1e-3])
    full = 0
    run = fast._run

    def counting(*args: Any) -> list[float]:
        nonlocal full
        full += 1
        return run(*args)

    fast._run = counting  # type: ignore[method-assign]
    rng = random.Random(2)
    for step in range(3000):
        fast.observe(step, 2.0 * math.exp(-step / 1000) + rng.uniform(0, 0.1),
                     rng.lognormvariate(0.0, 0.3))
    assert full < 100


@pytest.mark.parametrize("source", SOURCES, ids=[p.stem for p in SOURCES])
def test_a_restored_state_is_seen_by_the_plain_way(source: Path) -> None:
    """A state loaded between observations (a resume, a reload) changes the policies'
    multipliers without an observation: the next one must start from them."""
    fast, ref = _engines(source, [1e-3], total_steps=3000)
    _run(fast, ref, 700, seed=5)
    saved = fast.state_dict()
    _run(fast, ref, 600, seed=6, start=700)
    current = [p.multiplier() for p in fast._reactive]
    for engine in (fast, ref):
        engine.load_state_dict(saved)
    if source.stem in ("default", "divergence"):
        assert [p.multiplier() for p in fast._reactive] != current  # (the state moved them)
    # A step that decides at once: its record holds the LRs before it, from the restored
    # multipliers (none of which the engine has asked for since).
    _same(fast, ref, fast.observe(1300, math.nan, 1.0), ref.observe(1300, math.nan, 1.0),
          1300)
    _run(fast, ref, 1000, seed=7, start=1301)


def test_an_operator_command_is_seen_by_the_plain_way() -> None:
    """A WSD decay started by a command moves the multiplier between observations."""
    spec = {"version": 1, "policies": [{"kind": "divergence"},
                                       {"kind": "wsd", "decay_steps": 50,
                                        "start_on": "operator"}]}
    fast = lrctl.load_policy(spec, [1e-2])
    built = lrctl.load_policy(spec, [1e-2])
    ref = _AlwaysAsking(built.policies, [1e-2], names=built.names,
                        policy_sha256=built.policy_sha256)
    ref._plain = []
    rng = random.Random(3)
    for step in range(300):
        if step == 121:
            assert [d.to_dict() for d in fast.command("decay", steps=40)] == [
                d.to_dict() for d in ref.command("decay", steps=40)]
        loss, grad = 1.0 + rng.uniform(0, 0.1), rng.lognormvariate(0.0, 0.2)
        if step == 121:
            loss = math.nan  # (a decision at once, its record from the moved multiplier)
        _same(fast, ref, fast.observe(step, loss, grad), ref.observe(step, loss, grad),
              step)
    assert fast.lrs[0] < 1e-2  # (the decay happened)


def test_a_subclass_that_overrides_observe_only_has_it_called() -> None:
    """The plain way is a built-in policy's own shortcut: a user's subclass that changes
    ``observe`` (and not ``observe_plain``) sees every observation through it."""
    seen: list[int] = []

    class Counting(Divergence):
        def observe(self, obs: Any, ctx: Any) -> list[Any]:
            seen.append(obs.step)
            return super().observe(obs, ctx)

    class Plain(Divergence):  # (overrides neither: keeps the shortcut)
        pass

    counting = Engine([Counting()], [0.1])
    plain = Engine([Plain()], [0.1])
    for step in range(50):
        counting.observe(step, 1.0 + 0.01 * (step % 3), 2.0)
        plain.observe(step, 1.0 + 0.01 * (step % 3), 2.0)
    assert seen == list(range(50))
    assert counting._plain == [] and len(plain._plain) == 1
