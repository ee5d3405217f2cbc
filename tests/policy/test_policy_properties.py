"""Whatever a training loop reports, the LR stays a finite number inside [min_lr, max_lr]."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import lrctl
from lrctl.policy import Engine

POLICIES = Path(__file__).resolve().parents[2] / "policies"

#: A hand-made stack with clamps that bite and the knobs most likely to overflow.
STRESS = {
    "version": 1, "min_lr": 1e-5, "max_lr": 0.5,
    "policies": [
        {"kind": "warmup", "steps": 20, "mode": "exponential", "start_factor": 1e-3},
        {"kind": "cyclical", "mode": "triangular2", "max_lr": 3.0, "step_size_up": 7},
        {"kind": "decay", "schedule": "exponential", "gamma": 0.9},
        {"kind": "divergence", "window": 8, "min_samples": 4, "cooldown": 0,
         "regrow_after": 3, "regrow_factor": 10.0, "max_backoffs": 50, "min_multiplier": 1e-9},
        # (restart_lr at the file's max_lr, the most it may be: restarts, then cuts by 100)
        {"kind": "plateau", "patience": 0, "factor": 0.01, "eps": 0.0, "restart_lr": 0.5,
         "min_lr": 1e-300},
        {"kind": "plateau", "name": "val", "metric": "val_loss", "mode": "max", "patience": 1,
         "smoothing": "mean", "smoothing_window": 3},
    ],
}
SOURCES: dict[str, Any] = {p.name: p for p in sorted(POLICIES.glob("*.yaml"))}
SOURCES["stress"] = STRESS

weird = st.sampled_from([math.nan, math.inf, -math.inf, 0.0, -0.0, -1.0, -1e300, 1e300,
                         1.7976931348623157e308, 5e-324, 1e-300])
normal = st.floats(min_value=0.05, max_value=5.0)
value = st.one_of(st.none(), normal, normal, normal, weird,
                  st.floats(allow_nan=True, allow_infinity=True))
observation = st.fixed_dictionaries({
    "gap": st.integers(min_value=1, max_value=3),
    "loss": value,
    "grad_norm": value,
    "val_loss": value,
})


def check(engine: Engine, lrs: list[float], where: str) -> None:
    for g, lr in enumerate([*lrs, *engine.lrs]):
        assert isinstance(lr, float), f"{where}, group {g}: {lr!r}"
        assert math.isfinite(lr) and lr >= 0, f"{where}, group {g}: {lr!r}"
        assert engine.min_lr <= lr <= engine.max_lr, (
            f"{where}, group {g}: {lr!r} outside [{engine.min_lr}, {engine.max_lr}]")


@pytest.mark.parametrize("name", sorted(SOURCES))
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(base_lrs=st.lists(st.floats(min_value=0.0, max_value=10.0), min_size=1, max_size=3),
       seq=st.lists(observation, max_size=300))
def test_lr_is_always_finite_nonnegative_and_clamped(name: str, base_lrs: list[float],
                                                     seq: list[dict[str, Any]]) -> None:
    engine = lrctl.load_policy(SOURCES[name], base_lrs=base_lrs)
    check(engine, engine.lrs, "before any observation")
    step = -1
    for obs in seq:
        step += obs["gap"]
        metrics = {} if obs["val_loss"] is None else {"val_loss": obs["val_loss"]}
        lrs = engine.observe(step=step, loss=obs["loss"], grad_norm=obs["grad_norm"], **metrics)
        check(engine, lrs, f"after step {step} ({obs})")
        for d in engine.last_decisions:
            for lr in (*d.old_lrs, *d.new_lrs):
                assert math.isfinite(lr) and lr >= 0, f"decision {d}"


@pytest.mark.parametrize("name", sorted(SOURCES))
def test_long_nan_storm_stays_finite(name: str) -> None:
    engine = lrctl.load_policy(SOURCES[name], base_lrs=[0.1, 1e-3])
    for t in range(2000):
        bad = [math.nan, math.inf, -math.inf, 1e308][t % 4] if t % 3 else 1.0
        lrs = engine.observe(step=t, loss=bad, grad_norm=bad, val_loss=bad)
        check(engine, lrs, f"step {t}")
