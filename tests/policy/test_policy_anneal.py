"""The anneal: a decay to the end of the run that waits for the range test.

Known answers come from torch's own schedulers: once started at step ``s``, a
cosine anneal is ``CosineAnnealingLR(T_max = T - s, eta_min = end_factor × lr)``
and a linear one is ``LinearLR(1 → end_factor over T - s)``.
"""

from __future__ import annotations

import itertools
import json
import math
from typing import Any

import pytest
import torch

import lrctl
from lrctl.config import ConfigError
from lrctl.policy import Engine

LR = 0.1


def anneal(total_steps: int | None = None, **knobs: Any) -> Engine:
    return lrctl.load_policy({"version": 1, "policies": [{"kind": "anneal", **knobs}]},
                             base_lrs=[LR], total_steps=total_steps)


def torch_curve(make: Any, steps: int) -> list[float]:
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=LR)
    sched = make(opt)
    out = []
    for _ in range(steps):
        opt.step()
        sched.step()
        out.append(opt.param_groups[0]["lr"])
    return out


@pytest.mark.parametrize("total", [1, 2, 7, 600, 1500])
@pytest.mark.parametrize("end", [0.0, 0.05])
def test_cosine_matches_torch_cosine_annealing(total: int, end: float) -> None:
    engine = anneal(total, end_factor=end)
    got = [engine.observe(step=t, loss=1.0)[0] for t in range(total)]
    want = torch_curve(lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(
        o, T_max=total, eta_min=end * LR), total)
    assert got == pytest.approx(want, rel=1e-9, abs=1e-15)


@pytest.mark.parametrize("total", [3, 1000])
def test_linear_matches_torch_linear_lr(total: int) -> None:
    engine = anneal(total, shape="linear", end_factor=0.1)
    got = [engine.observe(step=t, loss=1.0)[0] for t in range(total)]
    want = torch_curve(lambda o: torch.optim.lr_scheduler.LinearLR(
        o, start_factor=1.0, end_factor=0.1, total_iters=total), total)
    assert got == pytest.approx(want, rel=1e-9, abs=1e-15)


def test_holds_past_the_end_and_records_start_and_end_once() -> None:
    engine = anneal(10, end_factor=0.2)
    for t in range(30):
        engine.observe(step=t, loss=1.0)
    assert engine.lrs == pytest.approx([0.2 * LR])
    actions = [(d.step, d.action) for d in engine.decisions]
    assert actions == [(0, "anneal_start"), (9, "anneal_done")]
    start = engine.decisions[0]
    assert start.evidence["total_steps"] == 10 and "cosine" in start.reason


def test_policy_file_total_steps_wins_over_the_hooks() -> None:
    engine = lrctl.load_policy(
        {"version": 1, "policies": [{"kind": "anneal", "total_steps": 4}]}, [LR],
        total_steps=1000)
    for t in range(4):
        engine.observe(step=t, loss=1.0)
    assert engine.lrs == [0.0]


def test_unknown_run_length_holds_and_says_so_once() -> None:
    engine = anneal(None)
    for t in range(50):
        assert engine.observe(step=t, loss=1.0) == [LR]
    assert [d.action for d in engine.decisions] == ["anneal_inactive"]
    assert "total_steps" in engine.decisions[0].reason


def test_waits_for_the_range_test_then_anneals_from_its_settled_lr() -> None:
    total = 200
    engine = lrctl.load_policy({"version": 1, "policies": [
        {"kind": "rangetest", "start_factor": 0.01, "growth": 1.2, "min_steps": 3,
         "smoothing_window": 2, "rise": 0.05, "settle": 0.5},
        {"kind": "anneal", "shape": "linear"},
    ]}, [LR], total_steps=total)
    lrs = []
    for t in range(total):
        loss = 1.0 / (1 + t) if t < 20 else 2.0  # falls, then turns up: the sweep ends
        lrs.append(engine.observe(step=t, loss=loss)[0])
    done = next(d for d in engine.decisions if d.action == "range_test_done")
    start = next(d for d in engine.decisions if d.action == "anneal_start")
    assert start.step == done.step > 15
    assert all(b > a for a, b in itertools.pairwise(lrs[:done.step]))
    settled = done.new_lrs[0]
    span = total - start.step
    for t in range(start.step, total):  # lrs[t] is the LR of step t + 1
        want = settled * (1.0 - (t + 1 - start.step) / span)
        assert lrs[t] == pytest.approx(want, rel=1e-9, abs=1e-15)


def test_back_offs_multiply_on_top_of_the_anneal() -> None:
    engine = lrctl.load_policy({"version": 1, "policies": [
        {"kind": "anneal"}, {"kind": "divergence", "regrow_after": 10_000}]}, [LR],
        total_steps=100)
    for t in range(50):
        engine.observe(step=t, loss=1.0 + 0.01 * (t % 3), grad_norm=1.0)
    before = engine.lrs[0]
    engine.observe(step=50, loss=math.nan, grad_norm=1.0)
    cosine = 0.5 * (1 + math.cos(math.pi * 51 / 100))
    assert engine.lrs[0] == pytest.approx(LR * cosine * 0.5, rel=1e-12)
    assert engine.lrs[0] < before


def test_state_and_reload_keep_the_start_step() -> None:
    engine = anneal(100, start=10)
    for t in range(40):
        engine.observe(step=t, loss=1.0)
    resumed = anneal(100, start=10)
    resumed.load_state_dict(json.loads(json.dumps(engine.state_dict())))
    reloaded = anneal(None, start=10)  # the reloaded engine learns the length from the old
    reloaded.inherit(engine)
    assert reloaded.total_steps == 100
    for t in range(40, 100):
        want = engine.observe(step=t, loss=1.0)
        assert resumed.observe(step=t, loss=1.0) == want
        assert reloaded.observe(step=t, loss=1.0) == want
    assert engine.lrs == [0.0]


@pytest.mark.parametrize("bad", [0, -5, 2.5, True, "100"])
def test_engine_rejects_a_bad_total_steps(bad: Any) -> None:
    with pytest.raises((ValueError, ConfigError), match="total_steps"):
        anneal(bad)


def test_a_longer_run_continues_the_decay_even_after_its_end() -> None:
    engine = anneal(10)
    for t in range(15):
        engine.observe(step=t, loss=1.0)
    assert engine.lrs == [0.0]
    engine.total_steps = 40  # a resumed run with a raised max_steps
    lr = engine.observe(step=15, loss=1.0)[0]
    assert lr == pytest.approx(LR * 0.5 * (1 + math.cos(math.pi * 16 / 40)), rel=1e-12)
    for t in range(16, 40):
        engine.observe(step=t, loss=1.0)
    assert [d.action for d in engine.decisions].count("anneal_done") == 2
    assert engine.lrs == [0.0]
