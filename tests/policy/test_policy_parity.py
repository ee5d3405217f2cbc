"""Parity with torch's own schedulers, knob for knob, over >= 1 000 steps.

Convention: before any observation ``engine.lrs`` is the LR of step 0 (torch's
LR right after the scheduler is built); ``engine.observe(step=t, ...)`` returns
the LRs of step ``t + 1`` (torch's LR after ``t + 1`` calls of ``step()``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import lrctl
from lrctl.policy import Engine

REL_TOL = 1e-9
ABS_TOL = 1e-15  # for LRs that decay to (or underflow near) zero
MIN_STEPS = 1_000

SETTINGS = settings(max_examples=30, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

Lrs = Sequence[float]


def make_optimizer(base_lrs: Lrs) -> torch.optim.SGD:
    groups = [{"params": [torch.nn.Parameter(torch.zeros(1))], "lr": lr} for lr in base_lrs]
    return torch.optim.SGD(groups, lr=base_lrs[0])


def torch_lrs(opt: torch.optim.Optimizer) -> list[float]:
    return [float(g["lr"]) for g in opt.param_groups]


def assert_close(got: Lrs, want: Lrs, step: int, what: str) -> None:
    assert len(got) == len(want)
    for g, (a, b) in enumerate(zip(got, want, strict=True)):
        assert math.isclose(a, b, rel_tol=REL_TOL, abs_tol=ABS_TOL), (
            f"{what}: step {step}, group {g}: lrctl {a!r} != torch {b!r}")


def policy(*entries: dict[str, Any]) -> dict[str, Any]:
    return {"version": 1, "policies": list(entries)}


def check_schedule_parity(engine: Engine, make_sched: Callable[[torch.optim.Optimizer], Any],
                        base_lrs: Lrs, steps: int, what: str) -> None:
    opt = make_optimizer(base_lrs)
    sched = make_sched(opt)
    assert_close(engine.lrs, torch_lrs(opt), 0, what)
    for t in range(steps):
        got = engine.observe(step=t, loss=1.0)
        opt.step()
        sched.step()
        assert_close(got, torch_lrs(opt), t + 1, what)


lr_values = st.floats(min_value=1e-4, max_value=1.0)
group_lrs = st.lists(lr_values, min_size=1, max_size=3)


# -- plateau vs ReduceLROnPlateau ---------------------------------------------

@st.composite
def metric_sequences(draw: st.DrawFn) -> list[float]:
    """Plateaus, exact repeats, improvements and setbacks, >= MIN_STEPS values.

    A list of segments is drawn and replayed until the sequence is long enough,
    so that shrinking keeps working on the segment list.
    """
    start = draw(st.floats(min_value=-10.0, max_value=10.0))
    segments = draw(st.lists(
        st.tuples(st.sampled_from(["improve", "repeat", "worse", "jitter", "tiny"]),
                  st.integers(min_value=1, max_value=60),
                  st.floats(min_value=0.0, max_value=0.2)),
        min_size=1, max_size=20))
    values: list[float] = []
    x = start
    while len(values) < MIN_STEPS:
        for op, length, size in segments:
            for i in range(length):
                if op == "improve":
                    x = x - abs(x) * size - size
                elif op == "worse":
                    x = x + abs(x) * size + size
                elif op == "jitter":
                    x = x + (size if i % 2 else -size)
                elif op == "tiny":  # changes around the threshold
                    x = x - abs(x) * 1e-4 * (1 + (i % 3 - 1) * 0.5)
                values.append(x)
    return values


plateau_knobs = st.fixed_dictionaries({
    "mode": st.sampled_from(["min", "max"]),
    "threshold_mode": st.sampled_from(["rel", "abs"]),
    "threshold": st.sampled_from([0.0, 1e-4, 1e-3, 0.01, 0.1]),
    "patience": st.integers(min_value=0, max_value=30),
    "cooldown": st.integers(min_value=0, max_value=20),
    "factor": st.floats(min_value=0.05, max_value=0.95),
    "eps": st.sampled_from([0.0, 1e-12, 1e-8, 1e-6]),
})


def check_plateau_parity(knobs: dict[str, Any], base_lrs: Lrs, min_lrs: list[float],
                       metrics: list[float]) -> None:
    min_lr: float | list[float] = min_lrs[0] if len(base_lrs) == 1 else min_lrs
    engine = lrctl.load_policy(policy({"kind": "plateau", "metric": "loss",
                                       "min_lr": min_lr, **knobs}), base_lrs=base_lrs)
    opt = make_optimizer(base_lrs)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, min_lr=min_lr, **knobs)
    assert_close(engine.lrs, torch_lrs(opt), 0, "plateau")
    for t, x in enumerate(metrics):
        got = engine.observe(step=t, loss=x)
        opt.step()
        sched.step(x)
        assert_close(got, torch_lrs(opt), t + 1, "plateau")


@SETTINGS
@given(knobs=plateau_knobs, lr=lr_values, min_lr=st.sampled_from([0.0, 1e-6, 1e-4, 1e-3]),
       metrics=metric_sequences())
def test_plateau_matches_reduce_lr_on_plateau(knobs: dict[str, Any], lr: float,
                                              min_lr: float, metrics: list[float]) -> None:
    check_plateau_parity(knobs, [lr], [min_lr], metrics)


@SETTINGS
@given(knobs=plateau_knobs, lrs=st.lists(lr_values, min_size=2, max_size=4),
       floor=st.sampled_from([0.0, 1e-4, 1e-3, 0.01]), metrics=metric_sequences())
def test_plateau_matches_reduce_lr_on_plateau_multi_group(
        knobs: dict[str, Any], lrs: list[float], floor: float, metrics: list[float]) -> None:
    # min_lr proportional to each group's LR: torch's per-group rule then keeps the
    # ratios too, which is lrctl's rule. eps must not split the groups either: torch
    # applies it per group (a small group stops shrinking first), lrctl keeps the
    # ratios, so eps stays well below every group's floor (or 0 without a floor).
    knobs = {**knobs, "eps": 0.0 if floor == 0.0 else min(knobs["eps"], 1e-12)}
    check_plateau_parity(knobs, lrs, [floor * lr for lr in lrs], metrics)


def test_plateau_known_answer_table() -> None:
    """torch's own test table style: metrics in, LRs out (factor 0.5, patience 2)."""
    engine = lrctl.load_policy(policy({"kind": "plateau", "factor": 0.5, "patience": 2,
                                       "threshold": 0.0, "cooldown": 1}), base_lrs=[1.0])
    metrics = [5, 4, 4, 4, 4, 4, 4, 4, 3, 3, 3, 3, 3]
    # observe(t) -> LR of step t + 1
    # t=4: 3rd bad → reduce; t=5: cooldown swallows a bad; t=8 improves; t=11: 3rd bad
    want = [1, 1, 1, 1, .5, .5, .5, .5, .5, .5, .5, .25, .25]
    got = [engine.observe(step=t, loss=float(m))[0] for t, m in enumerate(metrics)]
    assert got == want


# -- cyclical vs CyclicLR / CosineAnnealingWarmRestarts ---------------------------

@SETTINGS
@given(mode=st.sampled_from(["triangular", "triangular2", "exp_range"]), base_lrs=group_lrs,
       span=st.floats(min_value=1.5, max_value=20.0), up=st.integers(1, 400),
       down=st.one_of(st.none(), st.integers(1, 400)),
       gamma=st.floats(min_value=0.99, max_value=1.0), explicit_base=st.booleans(),
       steps=st.integers(MIN_STEPS, 1_500))
def test_cyclical_matches_cyclic_lr(mode: str, base_lrs: list[float], span: float, up: int,
                                    down: int | None, gamma: float, explicit_base: bool,
                                    steps: int) -> None:
    max_lrs = [lr * span for lr in base_lrs]
    knobs: dict[str, Any] = {"kind": "cyclical", "mode": mode, "max_lr": max_lrs,
                             "step_size_up": up, "step_size_down": down, "gamma": gamma}
    if explicit_base:
        knobs["base_lr"] = list(base_lrs)
    engine = lrctl.load_policy(policy(knobs), base_lrs=base_lrs)

    def make(opt: torch.optim.Optimizer) -> Any:
        return torch.optim.lr_scheduler.CyclicLR(
            opt, base_lr=list(base_lrs), max_lr=max_lrs, step_size_up=up, step_size_down=down,
            mode=mode, gamma=gamma, cycle_momentum=False)

    check_schedule_parity(engine, make, base_lrs, steps, f"cyclical {mode}")


@SETTINGS
@given(base_lrs=group_lrs, t_0=st.integers(1, 300), t_mult=st.integers(1, 3),
       eta_min=st.sampled_from([0.0, 1e-6, 1e-5]), steps=st.integers(MIN_STEPS, 1_500))
def test_cyclical_cosine_matches_warm_restarts(base_lrs: list[float], t_0: int, t_mult: int,
                                               eta_min: float, steps: int) -> None:
    engine = lrctl.load_policy(policy({"kind": "cyclical", "mode": "cosine", "T_0": t_0,
                                       "T_mult": t_mult, "eta_min": eta_min}),
                               base_lrs=base_lrs)

    def make(opt: torch.optim.Optimizer) -> Any:
        return torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(
            opt, T_0=t_0, T_mult=t_mult, eta_min=eta_min)

    check_schedule_parity(engine, make, base_lrs, steps, "cyclical cosine")


# -- warmup and decay vs LinearLR / CosineAnnealingLR / ExponentialLR / StepLR -----

@SETTINGS
@given(base_lrs=group_lrs, start=st.floats(min_value=1e-3, max_value=1.0),
       warm=st.integers(1, 1_500), steps=st.integers(MIN_STEPS, 1_600))
def test_warmup_linear_matches_linear_lr(base_lrs: list[float], start: float, warm: int,
                                         steps: int) -> None:
    engine = lrctl.load_policy(policy({"kind": "warmup", "mode": "linear", "steps": warm,
                                       "start_factor": start}), base_lrs=base_lrs)

    def make(opt: torch.optim.Optimizer) -> Any:
        return torch.optim.lr_scheduler.LinearLR(opt, start_factor=start, end_factor=1.0,
                                                 total_iters=warm)

    check_schedule_parity(engine, make, base_lrs, steps, "warmup linear")


@SETTINGS
@given(base_lrs=group_lrs, t_max=st.integers(MIN_STEPS, 5_000),
       eta_min=st.sampled_from([0.0, 1e-7, 1e-5]), data=st.data())
def test_decay_cosine_matches_cosine_annealing(base_lrs: list[float], t_max: int,
                                               eta_min: float, data: st.DataObject) -> None:
    steps = data.draw(st.integers(MIN_STEPS, t_max), label="steps")  # torch swings up after T_max
    engine = lrctl.load_policy(policy({"kind": "decay", "schedule": "cosine",
                                       "total_steps": t_max, "eta_min": eta_min}),
                               base_lrs=base_lrs)

    def make(opt: torch.optim.Optimizer) -> Any:
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=t_max, eta_min=eta_min)

    check_schedule_parity(engine, make, base_lrs, steps, "decay cosine")


def test_decay_cosine_reaches_eta_min_at_t_max() -> None:
    engine = lrctl.load_policy(policy({"kind": "decay", "schedule": "cosine",
                                       "total_steps": MIN_STEPS, "eta_min": 1e-5}),
                               base_lrs=[0.1])
    make = lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(  # noqa: E731
        opt, T_max=MIN_STEPS, eta_min=1e-5)
    check_schedule_parity(engine, make, [0.1], MIN_STEPS, "decay cosine")
    assert math.isclose(engine.lrs[0], 1e-5, rel_tol=REL_TOL)


@SETTINGS
@given(base_lrs=group_lrs, gamma=st.floats(min_value=0.95, max_value=1.0),
       steps=st.integers(MIN_STEPS, 1_500))
def test_decay_exponential_matches_exponential_lr(base_lrs: list[float], gamma: float,
                                                  steps: int) -> None:
    engine = lrctl.load_policy(policy({"kind": "decay", "schedule": "exponential",
                                       "gamma": gamma}), base_lrs=base_lrs)

    def make(opt: torch.optim.Optimizer) -> Any:
        return torch.optim.lr_scheduler.ExponentialLR(opt, gamma=gamma)

    check_schedule_parity(engine, make, base_lrs, steps, "decay exponential")


@SETTINGS
@given(base_lrs=group_lrs, gamma=st.floats(min_value=0.1, max_value=1.0),
       step_size=st.integers(1, 400), steps=st.integers(MIN_STEPS, 1_500))
def test_decay_step_matches_step_lr(base_lrs: list[float], gamma: float, step_size: int,
                                    steps: int) -> None:
    engine = lrctl.load_policy(policy({"kind": "decay", "schedule": "step", "gamma": gamma,
                                       "step_size": step_size}), base_lrs=base_lrs)

    def make(opt: torch.optim.Optimizer) -> Any:
        return torch.optim.lr_scheduler.StepLR(opt, step_size=step_size, gamma=gamma)

    check_schedule_parity(engine, make, base_lrs, steps, "decay step")


@SETTINGS
@given(base_lrs=group_lrs, end=st.floats(min_value=0.0, max_value=1.0),
       total=st.integers(1, 1_500), steps=st.integers(MIN_STEPS, 1_600))
def test_decay_linear_matches_linear_lr(base_lrs: list[float], end: float, total: int,
                                        steps: int) -> None:
    engine = lrctl.load_policy(policy({"kind": "decay", "schedule": "linear",
                                       "end_factor": end, "total_steps": total}),
                               base_lrs=base_lrs)

    def make(opt: torch.optim.Optimizer) -> Any:
        return torch.optim.lr_scheduler.LinearLR(opt, start_factor=1.0, end_factor=end,
                                                 total_iters=total)

    check_schedule_parity(engine, make, base_lrs, steps, "decay linear")


@pytest.mark.parametrize(("schedule", "knobs", "want"), [
    # known answers, base LR 1.0: the LR of steps 0..6
    ("step", {"gamma": 0.5, "step_size": 2}, [1, 1, .5, .5, .25, .25, .125]),
    ("exponential", {"gamma": 0.5}, [1, .5, .25, .125, .0625, .03125, .015625]),
    ("linear", {"end_factor": 0.0, "total_steps": 4}, [1, .75, .5, .25, 0, 0, 0]),
    ("cosine", {"total_steps": 2}, [1, .5, 0, 0, 0, 0, 0]),
])
def test_decay_known_answers(schedule: str, knobs: dict[str, Any], want: list[float]) -> None:
    engine = lrctl.load_policy(policy({"kind": "decay", "schedule": schedule, **knobs}),
                               base_lrs=[1.0])
    got = [engine.lrs[0]] + [engine.observe(step=t, loss=1.0)[0] for t in range(6)]
    assert got == pytest.approx(want, rel=1e-12, abs=1e-15)
