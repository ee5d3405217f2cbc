"""WSD: transformers' ``get_wsd_schedule`` when the run's length is known, a cooldown an
operator starts (and cancels) mid-run, and one that a stalled loss starts.

Convention as in the parity tests: ``engine.lrs`` before any observation is the LR of
step 0; ``observe(step=t)`` returns the LR of step ``t + 1``.
"""

from __future__ import annotations

import itertools
import json
import math
import random
from pathlib import Path
from typing import Any

import pytest

import lrctl
from lrctl.config import ConfigError
from lrctl.policy import Engine

LR = 0.1


def wsd(total_steps: int | None = None, *extra: dict[str, Any], **knobs: Any) -> Engine:
    return lrctl.load_policy({"version": 1, "policies": [{"kind": "wsd", **knobs}, *extra]},
                             base_lrs=[LR], total_steps=total_steps)


def curve(engine: Engine, steps: int, start: int = 0, loss: float = 1.0) -> list[float]:
    return [engine.observe(step=t, loss=loss)[0] for t in range(start, start + steps)]


# -- parity with transformers ---------------------------------------------------------------
@pytest.mark.parametrize("shape", ["linear", "cosine", "1-sqrt"])
@pytest.mark.parametrize("warmup_shape", ["linear", "cosine", "1-sqrt"])
@pytest.mark.parametrize(("warmup", "decay", "total", "ratio"), [
    (0, 100, 1000, 0.0), (50, 200, 1000, 0.1), (10, 1, 40, 0.0), (100, 950, 1000, 0.05),
    (0, 1000, 1000, 0.0)])
def test_matches_transformers_get_wsd_schedule(shape: str, warmup_shape: str, warmup: int,
                                               decay: int, total: int, ratio: float) -> None:
    torch = pytest.importorskip("torch")
    optimization = pytest.importorskip("transformers.optimization")
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=LR)
    sched = optimization.get_wsd_schedule(
        opt, num_warmup_steps=warmup, num_decay_steps=decay, num_training_steps=total,
        warmup_type=warmup_shape, decay_type=shape, min_lr_ratio=ratio)
    engine = wsd(total, warmup_steps=warmup, warmup_shape=warmup_shape, decay_steps=decay,
                 decay_shape=shape, min_lr_ratio=ratio)
    want = [opt.param_groups[0]["lr"]]
    got = [engine.lrs[0]]
    for t in range(total + 20):  # and past the end: min_lr_ratio × the LR
        got.append(engine.observe(step=t, loss=1.0)[0])
        opt.step()
        sched.step()
        want.append(opt.param_groups[0]["lr"])
    assert got == pytest.approx(want, rel=1e-12, abs=1e-15)


def test_decay_fraction_is_of_the_hooks_total_steps() -> None:
    a = curve(wsd(1000, decay_fraction=0.2), 1000)
    b = curve(wsd(1000, decay_steps=200), 1000)
    assert a == b and a[799] == LR and a[800] < LR  # a[t]: the LR of step t + 1


def test_phase_decisions_of_a_scheduled_run() -> None:
    engine = wsd(100, warmup_steps=10, decay_steps=20)
    curve(engine, 100)
    assert [(d.step, d.action) for d in engine.decisions] == [
        (9, "warmup_done"), (80, "decay_start"), (99, "decay_done")]
    start = engine.decisions[1]
    assert start.evidence["source"] == "schedule" and start.evidence["decay_steps"] == 20
    assert start.new_lrs[0] < start.old_lrs[0] == LR


# -- the operator's cooldown ----------------------------------------------------------------
SHAPES = {"linear": lambda p: 1 - p, "1-sqrt": lambda p: 1 - math.sqrt(p),
          "cosine": lambda p: 0.5 * (1 + math.cos(math.pi * p))}


@pytest.mark.parametrize("shape", list(SHAPES))
def test_decay_now_runs_over_the_next_n_steps(shape: str) -> None:
    engine = wsd(None, start_on="operator", min_lr_ratio=0.1)
    assert curve(engine, 50) == [LR] * 50
    (decision,) = engine.command("decay", steps=8, shape=shape)
    # After the observation of step 49: steps 50 … 57 decay, step 57 is the floor.
    assert decision.step == 49 and decision.action == "decay_start"
    assert decision.evidence["source"] == "operator"
    want = [LR * (0.1 + 0.9 * SHAPES[shape](k / 8)) for k in range(1, 8)] + [LR * 0.1] * 3
    first = engine.lrs[0]  # the LR of step 50
    assert decision.new_lrs[0] == pytest.approx(first) and decision.old_lrs[0] == LR
    got = [first, *curve(engine, 9, start=50)]
    assert got == pytest.approx(want)
    assert [d.action for d in engine.decisions] == ["decay_start", "decay_done"]
    assert engine.decisions[-1].step == 56


def test_a_second_decay_restarts_from_the_current_level() -> None:
    engine = wsd(None, start_on="operator")
    curve(engine, 10)
    engine.command("decay", steps=10, shape="linear")
    curve(engine, 5, start=10)
    level = engine.lrs[0] / LR
    engine.command("decay", steps=4, shape="linear")
    got = [engine.lrs[0], *curve(engine, 4, start=15)]
    assert got == pytest.approx([LR * level * (1 - k / 4) for k in range(1, 5)] + [0.0])
    assert "restarted by an operator" in engine.decisions[-2].reason


def test_cancel_returns_to_the_stable_lr_and_stops_automatic_starts() -> None:
    rng = random.Random(0)
    flat = [1.0 + rng.gauss(0, 0.01) for _ in range(400)]
    engine = wsd(None, start_on="plateau", decay_steps=50, window=40, burn_in=0)
    for t in range(40):
        engine.observe(step=t, loss=flat[t])
    assert engine.decisions[-1].action == "decay_start"  # the flat loss stalled
    assert engine.decisions[-1].evidence["source"] == "plateau"
    curve(engine, 5, start=40)
    assert engine.lrs[0] < LR
    (cancel,) = engine.command("cancel")
    assert cancel.action == "decay_cancel" and cancel.new_lrs == (LR,)
    for t in range(45, 400):  # still flat: no new cooldown by itself
        assert engine.observe(step=t, loss=flat[t]) == [LR]
    with pytest.raises(ValueError, match="no cooldown is under way"):
        engine.command("cancel")
    engine.command("decay")  # the policy's own length (decay_steps) when --steps is left out
    assert engine.decisions[-1].evidence["decay_steps"] == 50


def test_a_cancel_keeps_a_scheduled_cooldown_that_is_still_ahead() -> None:
    engine = wsd(200, decay_steps=20)
    curve(engine, 50)
    engine.command("decay", steps=10)
    curve(engine, 5, start=50)
    engine.command("cancel")
    lrs = curve(engine, 145, start=55)  # the LRs of steps 56 … 200
    assert lrs[:125] == [LR] * 125 and lrs[125] < LR  # the schedule's cooldown from 180
    start = [d for d in engine.decisions if d.action == "decay_start"][-1]
    assert (start.step, start.evidence["source"]) == (180, "schedule")


def test_operator_errors_leave_the_state_unchanged() -> None:
    engine = wsd(None, start_on="operator", warmup_steps=10)
    curve(engine, 5)
    before = json.dumps(engine.state_dict())
    with pytest.raises(ValueError, match="warmup runs until step 10"):
        engine.command("decay", steps=5)
    curve(engine, 10, start=5)
    with pytest.raises(ValueError, match="--steps"):
        engine.command("decay")
    with pytest.raises(ValueError, match="shape must be one of"):
        engine.command("decay", steps=5, shape="exp")
    assert json.loads(before)["policies"][0]["state"]["start"] is None
    engine.command("decay", steps=2)
    curve(engine, 3, start=15)
    with pytest.raises(ValueError, match="finished at step 16"):
        engine.command("cancel")
    with pytest.raises(ValueError, match="finished"):
        engine.command("decay", steps=2)
    plain = lrctl.load_policy({"version": 1, "policies": [{"kind": "plateau"}]}, [LR])
    with pytest.raises(ValueError, match=r"exactly one policy .*here: none; a policy of "
                                         r"kind wsd takes it"):
        plain.command("decay", steps=3)


def test_state_round_trips_mid_cooldown() -> None:
    whole = wsd(None, start_on="operator")
    curve(whole, 20)
    whole.command("decay", steps=30, shape="1-sqrt")
    curve(whole, 10, start=20)
    saved = json.dumps(whole.state_dict(), allow_nan=False)
    resumed = wsd(None, start_on="operator")
    resumed.load_state_dict(json.loads(saved))
    assert resumed.lrs == whole.lrs
    assert curve(resumed, 40, start=30) == curve(whole, 40, start=30)


# -- starting on a plateau --------------------------------------------------------------------
def test_plateau_start_waits_for_a_stall_and_the_schedule_bounds_it() -> None:
    falling = [3.0 - 0.001 * t for t in range(1000)]  # steadily falling: never a stall
    engine = wsd(1000, start_on="plateau", decay_steps=100, window=100)
    for t in range(1000):
        engine.observe(step=t, loss=falling[t])
    starts = [d for d in engine.decisions if d.action == "decay_start"]
    assert [(d.step, d.evidence["source"]) for d in starts] == [(900, "schedule")]


def test_a_stall_test_start_waits_out_a_slow_fall_in_noise_and_takes_a_clear_stall() -> None:
    """``test: stall``: a real fall of 2 % per half window under noise of 30 % of the level
    is inconclusive (``trend`` starts the cooldown on it); a flat, quiet loss is shown
    stalled and starts it."""
    def first_start(test: str, noise: float, fall: float) -> int | None:
        rng = random.Random(5)
        engine = wsd(5000, start_on="plateau", decay_steps=100, window=400, threshold=0.005,
                     test=test)
        for t in range(4000):
            level = (1 - fall / 200) ** t
            engine.observe(step=t, loss=level * (1 + noise * rng.gauss(0, 1)))
        return next((d.step for d in engine.decisions if d.action == "decay_start"), None)

    assert first_start("trend", 0.3, 0.02) is not None
    assert first_start("stall", 0.3, 0.02) is None
    start = first_start("stall", 0.002, 0.0)
    assert start is not None and start < 1000


def test_a_new_loss_level_restarts_the_plateau_start_on_a_sparse_metric() -> None:
    """The guard accepts a new level at a step where ``val_loss`` is not reported: WSD
    (as plateau decay) still judges afresh, after a new burn-in."""
    rng = random.Random(1)
    div = {"kind": "divergence"}
    engine = wsd(100_000, div, start_on="plateau", metric="val_loss", window=40,
                 decay_steps=100, test="stall")
    policy = next(p for p in engine.policies if hasattr(p, "_burn_left"))
    for t in range(412):
        level = 1.0 if t < 400 else 2.0
        engine.observe(step=t, loss=level * math.exp(rng.gauss(0, 0.05)), grad_norm=1.0,
                       **({"val_loss": 1.5 * level} if t % 7 == 0 else {}))
    assert [d.step for d in engine.decisions if d.action == "backoff"] == [400]
    assert len(policy._trend) == 0 and policy._burn_left == 20


def test_spikes_flagged_by_the_guard_do_not_start_the_cooldown() -> None:
    rng = random.Random(1)
    div = {"kind": "divergence", "min_samples": 16, "window": 64}
    engine = wsd(None, div, start_on="plateau", decay_steps=50, window=64)
    for t in range(600):
        loss = 3.0 * math.exp(-t / 200) + rng.gauss(0, 0.001)
        engine.observe(step=t, loss=loss * (50 if t % 97 == 50 else 1))
    assert not [d for d in engine.decisions if d.action == "decay_start"]
    assert [d for d in engine.decisions if d.action == "backoff"]


# -- composition -------------------------------------------------------------------------------
def test_stop_after_decay_and_early_stopping_count_the_cooldown() -> None:
    engine = wsd(None, start_on="operator", stop_after_decay=True)
    curve(engine, 5)
    engine.command("decay", steps=3)
    curve(engine, 5, start=5)
    assert engine.should_stop and engine.decisions[-1].action == "stop"

    es = {"kind": "earlystop", "metric": "val_loss", "patience": 1, "after_reductions": 1}
    engine = wsd(None, es, start_on="operator")
    for t in range(5):
        engine.observe(step=t, val_loss=1.0)
    assert not engine.should_stop  # patience used up, but no LR cut yet
    engine.command("decay", steps=50)
    engine.observe(step=5, val_loss=1.0)
    assert not engine.should_stop  # the cooldown's first epoch: fresh patience
    engine.observe(step=6, val_loss=1.0)
    assert engine.should_stop
    assert engine.decisions[-1].evidence["reductions"] == 1


def test_divergence_backoffs_multiply_on_top() -> None:
    div = {"kind": "divergence", "min_samples": 8, "window": 16}
    engine = wsd(100, div, decay_steps=20, decay_shape="linear")
    lrs = [engine.observe(step=t, loss=1.0 if t != 85 else math.nan)[0] for t in range(90)]
    assert lrs[84] == pytest.approx(LR * (1 - 5 / 20))
    assert lrs[85] == pytest.approx(0.5 * LR * (1 - 6 / 20))  # backed off ×0.5


def test_unknown_length_says_so_once() -> None:
    engine = wsd(None, decay_fraction=0.1)
    assert curve(engine, 30) == [LR] * 30
    (note,) = engine.decisions
    assert note.action == "wsd_inactive" and "lrctl decay RUN --steps N" in note.reason
    assert "a stall cannot start one either" in note.reason


# -- validation ----------------------------------------------------------------------------------
@pytest.mark.parametrize(("body", "line", "key", "words"), [
    ("    decay_steps: 10\n    decay_fraction: 0.1\n", 5, "decay_fraction", "not both"),
    ("    warmup_steps: 10\n", 3, "decay_steps", "decay_steps or decay_fraction"),
    ("    decay_fraction: 1.5\n", 4, "decay_fraction", "<= 1"),
    ("    decay_steps: 10\n    decay_shape: exp\n", 5, "decay_shape", "1-sqrt"),
    ("    decay_steps: 10\n    start_on: loss\n", 5, "start_on", "plateau"),
])
def test_bad_files_name_file_line_and_key(tmp_path: Path, body: str, line: int, key: str,
                                          words: str) -> None:
    path = tmp_path / "wsd.yaml"
    path.write_text("version: 1\npolicies:\n  - kind: wsd\n" + body)
    with pytest.raises(ConfigError) as info:
        lrctl.load_policy(path, [LR])
    assert (info.value.line, info.value.key) == (line, key), str(info.value)
    assert words in info.value.message
    assert str(info.value).startswith(f"{path}:{line}: {key}: ")


def test_operator_only_needs_no_length() -> None:
    assert wsd(None, start_on="operator").lrs == [LR]


def test_a_cooldown_under_way_survives_a_hot_reload() -> None:
    old = wsd(None, start_on="operator")
    curve(old, 10)
    old.command("decay", steps=10, shape="linear")
    curve(old, 3, start=10)
    new = wsd(None, start_on="operator", min_lr_ratio=0.5)  # an edited file
    summary = new.inherit(old)
    assert summary["changed"] == ["wsd"]
    # The cooldown keeps its start, length and shape; the new floor applies from now.
    assert curve(new, 8, start=13) == pytest.approx(
        [LR * (0.5 + 0.5 * (1 - k / 10)) for k in range(5, 10)] + [LR * 0.5] * 3)


def _first_fall_then_a_slow_one(n: int, seed: int) -> list[float]:
    """A run's usual start: a fall from 2.3 to ~0.05 within 30 steps, then a slow fall."""
    rng = random.Random(seed)
    return [2.3 * math.exp(-t / 6) + 0.05 - 0.03 * t / n + rng.gauss(0, 0.01)
            for t in range(n)]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_plateau_start_never_judges_the_first_fast_fall(seed: int) -> None:
    """The trend test read a window whose older half held the run's first fast fall as
    noise, and started the cooldown at its first test (step 399 of 3 000, every seed).
    By default the first half-window of the stable phase is not judged (``burn_in``), so
    the first test comes at ``burn_in + window``; ``burn_in: 0`` is the old way."""
    losses = _first_fall_then_a_slow_one(3000, seed)
    starts = {}
    for burn_in in (None, 0):
        knobs = {} if burn_in is None else {"burn_in": burn_in}
        engine = wsd(3000, start_on="plateau", decay_fraction=0.2, window=400, **knobs)
        for t, loss in enumerate(losses):
            engine.observe(step=t, loss=loss)
        (start,) = [d for d in engine.decisions if d.action == "decay_start"]
        starts[burn_in] = start.step
    assert starts[0] == 399
    assert starts[None] >= 599


def test_the_burn_in_survives_a_restore_and_counts_after_the_warmup() -> None:
    """A flat loss: the first plateau test at warmup + burn_in + window, also when the
    state is restored half-way through the burn-in."""
    rng = random.Random(3)
    flat = [1.0 + rng.gauss(0, 0.01) for _ in range(200)]
    knobs = {"start_on": "plateau", "decay_steps": 20, "window": 40, "burn_in": 30,
             "warmup_steps": 10}
    engine = wsd(None, **knobs)
    for t in range(25):
        engine.observe(step=t, loss=flat[t])
    restored = wsd(None, **knobs)
    restored.load_state_dict(engine.state_dict())
    for t in range(25, 200):
        restored.observe(step=t, loss=flat[t])
    (start,) = [d for d in restored.decisions if d.action == "decay_start"]
    assert start.step == 10 + 30 + 40 - 1


def test_a_run_extended_during_its_scheduled_cooldown_stretches_it() -> None:
    """An adversarial pass found it: max_steps raised on a resume after the cooldown
    began (120 -> 200, at step 105) left the cooldown ending at 120 and steps 121-200 at
    LR 0. The cooldown is stretched to end at the new last step, from where it was."""
    policy = {"version": 1, "policies": [{"kind": "wsd", "decay_fraction": 0.2}]}
    first = lrctl.load_policy(policy, [LR], total_steps=120)
    lrs = [first.observe(t, 1.0, 1.0)[0] for t in range(105)]
    resumed = lrctl.load_policy(policy, [LR], total_steps=200)
    resumed.load_state_dict(first.state_dict())
    lrs += [resumed.observe(t, 1.0, 1.0)[0] for t in range(105, 200)]
    [extended] = [d for d in resumed.decisions if d.action == "decay_extended"]
    assert extended.step == 105 and extended.evidence["value"] == 200
    assert all(a >= b for a, b in itertools.pairwise(lrs[95:]))  # still falling
    assert lrs[104] - lrs[105] < lrs[103] - lrs[104]  # no jump at the extension
    assert lrs[150] > 0.1 * LR and lrs[-1] == 0.0  # the cooldown ends at the new last step
    # A cooldown already over stays over: nothing is re-planned.
    done = lrctl.load_policy(policy, [LR], total_steps=120)
    for t in range(125):
        done.observe(t, 1.0, 1.0)
    again = lrctl.load_policy(policy, [LR], total_steps=200)
    again.load_state_dict(done.state_dict())
    again.observe(125, 1.0, 1.0)
    assert not [d for d in again.decisions if d.action == "decay_extended"]


def test_confirm_starts_the_cooldown_when_the_next_test_finds_the_stall_too() -> None:
    """``confirm: 2`` (wsd.yaml's): the stall must be found by two tests in a row (one
    every window / 8 = 50 observations); a fall between them starts the count again,
    and a checkpoint between them keeps it."""
    def run(confirm: int, fall_after: int | None = None,
            checkpoint_at: int | None = None) -> int | None:
        rng = random.Random(9)
        engine = wsd(5000, start_on="plateau", decay_steps=100, window=400, threshold=0.005,
                     test="stall", confirm=confirm)
        for t in range(1400):
            level = 1.0 if fall_after is None or t <= fall_after else 0.9
            engine.observe(step=t, loss=level * (1 + 0.002 * rng.gauss(0, 1)))
            if t == checkpoint_at:
                state = engine.state_dict()
                engine = wsd(5000, start_on="plateau", decay_steps=100, window=400,
                             threshold=0.005, test="stall", confirm=confirm)
                engine.load_state_dict(state)
        return next((d.step for d in engine.decisions if d.action == "decay_start"), None)

    first = run(1)
    assert first is not None
    assert run(2) == first + 50
    assert run(2, checkpoint_at=first + 10) == first + 50
    later = run(2, fall_after=first)  # a 10 % fall right after the first finding
    assert later is None or later > first + 50


def test_confirm_known_answers_default_and_validation() -> None:
    """A flat loss (0.2 % noise), window 400: the first stall test (burn-in 200, then a
    full window) finds the stall at step 599; each further confirmation waits for the
    next test, 50 observations on. Without the key: confirm 1, the old rule. A 10 %
    fall right after the first finding starts the count again: the window must hold the
    new level before two tests find it stalled (1049). 0, negatives and non-integers
    are refused, naming the key."""
    def decisions(fall_after: int | None = None, **knobs: Any) -> list[tuple[int, str]]:
        rng = random.Random(9)
        engine = wsd(5000, start_on="plateau", decay_steps=100, window=400, threshold=0.005,
                     test="stall", **knobs)
        for t in range(1400):
            level = 1.0 if fall_after is None or t <= fall_after else 0.9
            engine.observe(step=t, loss=level * (1 + 0.002 * rng.gauss(0, 1)))
        return [(d.step, d.action) for d in engine.decisions]

    assert decisions() == decisions(confirm=1) == [(599, "decay_start"), (698, "decay_done")]
    assert decisions(confirm=2) == [(649, "decay_start"), (748, "decay_done")]
    assert decisions(confirm=3) == [(699, "decay_start"), (798, "decay_done")]
    assert decisions(fall_after=599, confirm=2) == [(1049, "decay_start"),
                                                    (1148, "decay_done")]
    for bad in (0, -1, 1.5, "two"):
        with pytest.raises(ConfigError, match="confirm"):
            wsd(5000, start_on="plateau", confirm=bad)
