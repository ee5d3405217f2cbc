"""Policies compose: warmup with plateau, divergence before plateau, ratios, clamps, records."""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import random
from pathlib import Path
from typing import Any

import pytest
import torch

import lrctl
from lrctl.policy import Decision, Engine

POLICIES = Path(__file__).resolve().parents[2] / "policies"


def stack(*entries: dict[str, Any], **top: Any) -> dict[str, Any]:
    return {"version": 1, **top, "policies": list(entries)}


def warm(step: int, steps: int, start: float) -> float:
    return 1.0 if step >= steps else start + (1.0 - start) * step / steps


def test_warmup_then_plateau_reductions_multiply() -> None:
    """pytorch#68978: a warmup ramp and plateau reductions in one stack."""
    engine = lrctl.load_policy(stack(
        {"kind": "warmup", "steps": 10, "start_factor": 0.1},
        {"kind": "plateau", "patience": 2, "factor": 0.5, "threshold": 0.0},
    ), base_lrs=[0.1])
    assert engine.lrs == pytest.approx([0.1 * 0.1])
    for t in range(30):
        got = engine.observe(step=t, loss=1.0)  # a flat loss: every 3rd bad step reduces
        want = 0.1 * warm(t + 1, 10, 0.1) * 0.5 ** (t // 3)
        assert got == pytest.approx([want], rel=1e-12), f"step {t + 1}"
    reduces = [d.step for d in engine.decisions if d.action == "reduce"]
    assert reduces == list(range(3, 30, 3))
    assert [d.step for d in engine.decisions if d.action == "warmup_done"] == [9]


def staircase_with_spikes(spike_blocks: set[int], blocks: int = 40) -> list[float]:
    """A loss that improves by 1 % every 6th step (5 repeats in between) plus, in the
    given blocks, one extra ×50 spike step."""
    values: list[float] = []
    for b in range(blocks):
        level = 1.0 * 0.99 ** b
        block = [level] * 6
        if b in spike_blocks:
            block.insert(3, level * 50)
        values.extend(block)
    return values


def test_divergence_keeps_plateau_from_counting_spikes() -> None:
    """pytorch#30873: after a spike torch's ReduceLROnPlateau cuts the LR, lrctl does not."""
    metrics = staircase_with_spikes({10, 20, 30})
    knobs = {"patience": 5, "factor": 0.5, "threshold": 1e-4}
    engine = lrctl.load_policy(stack({"kind": "divergence"}, {"kind": "plateau", **knobs}),
                               base_lrs=[0.1])
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, **knobs)
    torch_cuts = 0
    spikes = [t for t, x in enumerate(metrics) if x > 2]
    for t, x in enumerate(metrics):
        engine.observe(step=t, loss=x)
        before = opt.param_groups[0]["lr"]
        sched.step(x)
        torch_cuts += opt.param_groups[0]["lr"] < before
    assert torch_cuts == 3  # torch counts each spike as a 6th bad step and cuts
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1 * 0.5 ** 3)
    assert [d for d in engine.decisions if d.kind == "plateau"] == []
    assert [d.step for d in engine.decisions if d.action == "backoff"] == spikes


def test_without_divergence_plateau_counts_spikes_like_torch() -> None:
    """The same table without the guard: plateau cuts where torch does."""
    metrics = staircase_with_spikes({10, 20, 30})
    engine = lrctl.load_policy(stack({"kind": "plateau", "patience": 5, "factor": 0.5}),
                               base_lrs=[0.1])
    for t, x in enumerate(metrics):
        engine.observe(step=t, loss=x)
    assert len([d for d in engine.decisions if d.action == "reduce"]) == 3


@pytest.mark.parametrize("name", ["default.yaml", "divergence.yaml", "plateau.yaml"])
def test_per_group_ratios_are_kept(name: str) -> None:
    base = [0.1, 0.01, 0.003]
    engine = lrctl.load_policy(POLICIES / name, base_lrs=base)
    rng = random.Random(11)
    moved = False
    for t in range(3000):
        loss = (1.0 + 2.0 * math.exp(-t / 300)) * math.exp(rng.gauss(0, 0.05))
        if t % 500 == 250:
            loss *= 100
        if t % 700 == 600:
            loss = math.nan
        metrics = {"val_loss": 1.0 + 1 / (1 + t // 50)} if t % 50 == 0 else {}
        lrs = engine.observe(step=t, loss=loss, grad_norm=rng.uniform(0.5, 1.5), **metrics)
        moved = moved or lrs[0] != base[0]
        for g in range(1, len(base)):
            assert lrs[g] / lrs[0] == pytest.approx(base[g] / base[0], rel=1e-12), f"step {t}"
    assert moved


def test_min_and_max_lr_clamp_known_answers() -> None:
    engine = lrctl.load_policy(stack({"kind": "decay", "schedule": "exponential", "gamma": 0.5},
                                     min_lr=0.01, max_lr=0.3), base_lrs=[1.0, 0.1])
    got = [engine.lrs] + [engine.observe(step=t, loss=1.0) for t in range(8)]
    want = [[0.3, 0.1], [0.3, 0.05], [0.25, 0.025], [0.125, 0.0125], [0.0625, 0.01],
            [0.03125, 0.01], [0.015625, 0.01], [0.01, 0.01], [0.01, 0.01]]
    assert got == want


def test_clamp_holds_against_reactive_policies() -> None:
    engine = lrctl.load_policy(stack({"kind": "divergence", "min_multiplier": 1e-3},
                                     min_lr=0.02), base_lrs=[0.05])
    for t in range(4):
        lrs = engine.observe(step=t, loss=math.nan)
        assert lrs == [max(0.05 * 0.5 ** (t + 1), 0.02)]


def test_clamp_holds_against_cyclical_peaks() -> None:
    engine = lrctl.load_policy(stack({"kind": "cyclical", "max_lr": 1.0, "step_size_up": 5},
                                     max_lr=0.5), base_lrs=[0.1])
    lrs = [engine.observe(step=t, loss=1.0)[0] for t in range(20)]
    assert max(lrs) == 0.5
    assert lrs[1] == pytest.approx(0.1 + 0.9 * 2 / 5)  # step 2, below the clamp: untouched


# -- decision records -------------------------------------------------------------

def _scenario_reduce() -> Engine:
    e = lrctl.load_policy(stack({"kind": "plateau", "patience": 1, "factor": 0.3}), [0.1, 0.2])
    for t in range(4):
        e.observe(step=t, loss=1.0)
    return e


def _scenario_backoff_skip_stop() -> Engine:
    e = lrctl.load_policy(stack({"kind": "divergence", "factor": 0.4, "max_backoffs": 2,
                                 "regrow_after": 1000}), [0.1, 0.2])
    rng = random.Random(3)
    for t in range(40):
        e.observe(step=t, loss=math.exp(rng.gauss(0, 0.05)), grad_norm=1.0)
    e.observe(step=40, loss=80.0, grad_norm=1.0)  # spike: backoff
    e.observe(step=41, loss=math.nan)  # skip + backoff
    e.observe(step=42, loss=math.inf)  # skip + stop
    return e


def _scenario_regrow() -> Engine:
    e = lrctl.load_policy(stack({"kind": "divergence", "regrow_after": 5,
                                 "regrow_factor": 1.5}), [0.1, 0.2])
    e.observe(step=0, loss=math.nan)
    for t in range(1, 9):  # one regrowth (at step 5): the next would be capped at 1.0
        e.observe(step=t, loss=1.0)
    return e


def _scenario_schedule_events() -> Engine:
    e = lrctl.load_policy(stack({"kind": "warmup", "steps": 3},
                                {"kind": "cyclical", "mode": "cosine", "T_0": 4}), [0.1, 0.2])
    for t in range(10):
        e.observe(step=t, loss=1.0)
    return e


SCENARIOS = {
    "reduce": (_scenario_reduce, {"reduce": 0.3}),
    "backoff_skip_stop": (_scenario_backoff_skip_stop, {"backoff": 0.4}),
    "regrow": (_scenario_regrow, {"backoff": 0.5, "regrow": 1.5}),
    "schedule_events": (_scenario_schedule_events, {}),
}
EXPECTED_ACTIONS = {
    "reduce": {"reduce"},
    "backoff_skip_stop": {"backoff", "skip", "stop"},
    "regrow": {"backoff", "skip", "regrow"},
    "schedule_events": {"warmup_done", "restart"},
}


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_decision_records_explain_themselves(scenario: str) -> None:
    make, factors = SCENARIOS[scenario]
    engine = make()
    decisions = engine.decisions
    assert {d.action for d in decisions} == EXPECTED_ACTIONS[scenario]
    for d in decisions:
        where = f"{d.action} at step {d.step}"
        assert isinstance(d.reason, str) and d.reason.strip(), where
        for key in ("statistic", "value", "threshold"):
            assert key in d.evidence, f"{where}: evidence lacks {key!r}: {dict(d.evidence)}"
        assert len(d.old_lrs) == len(d.new_lrs) == 2, where
        if d.action in factors:
            want = factors[d.action]
            for old, new in zip(d.old_lrs, d.new_lrs, strict=True):
                assert new / old == pytest.approx(want, rel=1e-12), where
            assert d.evidence["factor"] == pytest.approx(want, rel=1e-12), where
        else:
            assert d.new_lrs == d.old_lrs, f"{where} does not move the LR"
        # strict JSON (NaN evidence included) and back
        encoded = json.dumps(d.to_dict(), allow_nan=False)
        assert Decision.from_dict(json.loads(encoded)).new_lrs == d.new_lrs


def test_decision_records_carry_the_file_sha256(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text("version: 1\npolicies:\n  - kind: plateau\n    patience: 0\n")
    engine = lrctl.load_policy(path, base_lrs=[0.1])
    engine.observe(step=0, loss=1.0)
    engine.observe(step=1, loss=1.0)
    (d,) = engine.decisions
    assert d.policy_sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert (d.policy, d.kind, d.step) == ("plateau", "plateau", 1)


def test_decision_old_and_new_lrs_are_for_the_next_step() -> None:
    """Under a warmup the record compares like with like: both are step t + 1's LRs."""
    engine = lrctl.load_policy(stack({"kind": "warmup", "steps": 100, "start_factor": 0.5},
                                     {"kind": "divergence"}), base_lrs=[1.0])
    for t in range(10):
        engine.observe(step=t, loss=1.0)
    engine.observe(step=10, loss=math.nan)
    back = next(d for d in engine.decisions if d.action == "backoff")
    assert back.old_lrs[0] == pytest.approx(warm(11, 100, 0.5))
    assert back.new_lrs[0] == pytest.approx(warm(11, 100, 0.5) * 0.5)
    assert list(back.new_lrs) == engine.lrs


@pytest.mark.parametrize(("max_lr", "held"), [(1.0, 1.0), (None, 1e-3)])
def test_an_overflowing_schedule_is_clamped_and_recorded(max_lr: float | None,
                                                         held: float) -> None:
    """Two schedules whose product overflows to inf: the LR is clamped to max_lr (or, with
    no max_lr, held), never silently 0, and the clamp and its release are decisions."""
    policy: dict = {"version": 1, "policies": [
        {"kind": "cyclical", "base_lr": 1e-3, "max_lr": 1e300, "step_size_up": 10},
        {"kind": "cyclical", "name": "again", "base_lr": 1e-3, "max_lr": 1e300,
         "step_size_up": 10}]}
    if max_lr is not None:
        policy["max_lr"] = max_lr
    engine = lrctl.load_policy(policy, base_lrs=[1e-3])
    lrs = [engine.observe(t, 1.0)[0] for t in range(25)]
    assert all(lr == held for lr in lrs[:18]), lrs
    actions = [(d.step, d.policy, d.action) for d in engine.decisions]
    assert actions[0] == (0, "guard", "clamp")
    assert ("guard", "clamp_released") in {(p, a) for _, p, a in actions}
    clamp = engine.decisions[0]
    assert clamp.evidence["value"] == math.inf and "overflowed" in clamp.reason
    changes = [d for d in engine.decisions if d.new_lrs != d.old_lrs]
    for before, after in itertools.pairwise(lrs):
        if before != after:  # every LR change is accounted for by a record
            assert any(d.new_lrs[0] == after for d in changes), (before, after)


def test_phase_events_between_reports_are_recorded_at_the_next_one() -> None:
    """An adversarial pass found it: with every=N, warmup_done and warm restarts whose
    step fell between two reports were never recorded. The report after the step
    records them (once), with the step that began the phase; every=1 is unchanged."""
    policy = {"version": 1, "policies": [
        {"kind": "warmup", "steps": 10},
        {"kind": "cyclical", "mode": "cosine", "T_0": 16, "T_mult": 1}]}

    def events(steps: range) -> list[tuple[int, str, int]]:
        engine = lrctl.load_policy(policy, [0.1])
        for t in steps:
            engine.observe(t, 1.0, 1.0)
        return [(d.step, d.action, d.evidence["value"]) for d in engine.decisions]

    assert events(range(0, 50)) == [(9, "warmup_done", 10), (15, "restart", 16),
                                    (31, "restart", 32), (47, "restart", 48)]
    assert events(range(0, 50, 4)) == [(12, "warmup_done", 10), (16, "restart", 16),
                                       (32, "restart", 32), (48, "restart", 48)]
    assert events(range(0, 50, 7)) == [(14, "warmup_done", 10), (21, "restart", 16),
                                       (35, "restart", 32), (49, "restart", 48)]


def test_wsd_warmup_done_between_reports_is_recorded() -> None:
    policy = {"version": 1, "policies": [{"kind": "wsd", "warmup_steps": 10,
                                          "total_steps": 100, "decay_fraction": 0.2}]}
    for stride, step in ((1, 9), (4, 12), (7, 14)):
        engine = lrctl.load_policy(policy, [0.1])
        for t in range(0, 60, stride):
            engine.observe(t, 1.0, 1.0)
        done = [(d.step, d.evidence["value"]) for d in engine.decisions
                if d.action == "warmup_done"]
        assert done == [(step, 10)], stride
