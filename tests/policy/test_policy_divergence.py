"""The divergence guard: NaN/inf and spikes back off at once; noise does not."""

from __future__ import annotations

import math
import random
from pathlib import Path
from typing import Any

import pytest

import lrctl
from lrctl.config import ConfigError
from lrctl.policy import Decision, Engine

BASE_LR = 0.1
POLICIES = Path(__file__).resolve().parents[2] / "policies"


def guard(**knobs: Any) -> Engine:
    return lrctl.load_policy({"version": 1, "policies": [{"kind": "divergence", **knobs}]},
                             base_lrs=[BASE_LR])


def realistic(seed: int, steps: int) -> list[tuple[float, float]]:
    """(loss, grad_norm) of a healthy run: decreasing, multiplicative log-normal noise."""
    rng = random.Random(seed)
    out = []
    for t in range(steps):
        loss = (2.0 * math.exp(-t / 3000) + 0.3) * math.exp(rng.gauss(0.0, 0.05))
        gnorm = (0.8 + 2.0 * math.exp(-t / 1500)) * math.exp(rng.gauss(0.0, 0.15))
        out.append((loss, gnorm))
    return out


def feed(engine: Engine, series: list[tuple[float, float]], start: int = 0) -> None:
    for t, (loss, gnorm) in enumerate(series, start=start):
        engine.observe(step=t, loss=loss, grad_norm=gnorm)


def only(decisions: list[Decision], action: str) -> Decision:
    found = [d for d in decisions if d.action == action]
    assert len(found) == 1, f"expected one {action!r} in {[d.action for d in decisions]}"
    return found[0]


K = 60  # the incident step: well after detection arms (min_samples 32)


@pytest.mark.parametrize(("statistic", "value"), [
    ("loss", math.nan), ("loss", math.inf), ("loss", -math.inf),
    ("grad_norm", math.nan), ("grad_norm", math.inf),
])
def test_nonfinite_backs_off_and_skips_at_that_step(statistic: str, value: float) -> None:
    engine = guard()
    series = realistic(0, K)
    feed(engine, series)
    before = engine.lrs
    loss, gnorm = realistic(0, K + 1)[K]
    obs = {"loss": loss, "grad_norm": gnorm, statistic: value}
    after = engine.observe(step=K, **obs)
    back = only(engine.last_decisions, "backoff")
    assert back.step == K
    assert back.old_lrs == tuple(before)
    assert after == pytest.approx([before[0] * 0.5], rel=1e-12)
    assert list(back.new_lrs) == after
    skip = only(engine.last_decisions, "skip")
    assert skip.step == K and skip.new_lrs == skip.old_lrs
    assert engine.should_skip
    engine.observe(step=K + 1, loss=loss, grad_norm=gnorm)
    assert not engine.should_skip  # that step only


def test_nan_at_step_zero_backs_off_without_history() -> None:
    engine = guard(factor=0.25)
    assert engine.observe(step=0, loss=math.nan) == pytest.approx([BASE_LR * 0.25])
    assert engine.should_skip
    assert [d.action for d in engine.last_decisions] == ["skip", "backoff"]


def test_nan_without_skip_nonfinite_backs_off_and_the_engine_guard_skips() -> None:
    """A non-finite step is never applied: without the divergence guard's skip, the
    engine's own guard records the skip (the hook refuses the step locally)."""
    engine = guard(skip_nonfinite=False)
    engine.observe(step=0, loss=math.nan)
    assert engine.should_skip
    assert [(d.policy, d.action) for d in engine.last_decisions] == [
        ("divergence", "backoff"), ("guard", "skip")]


def test_a_non_finite_step_is_skipped_whatever_the_policies() -> None:
    engine = lrctl.load_policy({"version": 1, "policies": [{"kind": "plateau"}]}, [0.1])
    engine.observe(step=0, loss=1.0, grad_norm=math.inf)
    assert engine.should_skip
    (decision,) = engine.last_decisions
    assert (decision.policy, decision.action) == ("guard", "skip")
    assert decision.new_lrs == decision.old_lrs == (0.1,)
    engine.observe(step=1, loss=1.0, grad_norm=1.0)
    assert not engine.should_skip


@pytest.mark.parametrize("statistic", ["loss", "grad_norm"])
def test_fifty_fold_spike_backs_off_at_that_step(statistic: str) -> None:
    engine = guard()
    series = realistic(1, K + 1)
    feed(engine, series[:K])
    before = engine.lrs
    loss, gnorm = series[K]
    obs = {"loss": loss, "grad_norm": gnorm}
    obs[statistic] *= 50
    after = engine.observe(step=K, **obs)
    back = only(engine.last_decisions, "backoff")
    assert back.step == K
    assert back.evidence["statistic"] == statistic
    assert back.evidence["value"] == pytest.approx(obs[statistic])
    assert after == pytest.approx([before[0] * 0.5], rel=1e-12)
    assert not engine.should_skip  # a finite spike is applied, only the LR backs off


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_healthy_noisy_run_never_backs_off(seed: int) -> None:
    engine = guard()  # the default knobs
    feed(engine, realistic(seed, 10_000))
    assert [d for d in engine.decisions if d.action != "regrow"] == []
    assert engine.lrs == [BASE_LR]


@pytest.mark.parametrize("seed", [0, 1])
def test_healthy_noisy_run_under_shipped_guard_file(seed: int) -> None:
    engine = lrctl.load_policy(POLICIES / "divergence.yaml", base_lrs=[BASE_LR])
    feed(engine, realistic(seed, 10_000))
    assert engine.decisions == []


def test_regrows_after_clean_interval_toward_one_and_no_further() -> None:
    engine = guard(regrow_after=50, regrow_factor=2.0, factor=0.5)
    feed(engine, realistic(2, K))
    engine.observe(step=K, loss=math.nan)
    engine.observe(step=K + 1, loss=math.nan)  # non-finite backs off even in cooldown
    assert engine.lrs == pytest.approx([BASE_LR * 0.25])
    clean = realistic(3, 200)
    lrs_by_step: dict[int, float] = {}
    for i, (loss, gnorm) in enumerate(clean):
        t = K + 2 + i
        lrs_by_step[t + 1] = engine.observe(step=t, loss=loss, grad_norm=gnorm)[0]
    regrows = [d for d in engine.decisions if d.action == "regrow"]
    # clean observation n after the last back-off is step K + 1 + n
    assert [d.step for d in regrows] == [K + 1 + 50, K + 1 + 100]
    for d in regrows:
        assert d.new_lrs[0] / d.old_lrs[0] == pytest.approx(2.0)
        assert d.evidence["factor"] == pytest.approx(2.0)
    assert lrs_by_step[K + 1 + 50] == pytest.approx(BASE_LR * 0.25)
    assert lrs_by_step[K + 2 + 50] == pytest.approx(BASE_LR * 0.5)
    assert lrs_by_step[K + 2 + 100] == pytest.approx(BASE_LR)
    assert max(lrs_by_step.values()) == pytest.approx(BASE_LR)  # never above the original


def test_partial_regrowth_stops_at_one() -> None:
    engine = guard(regrow_after=10, regrow_factor=3.0, factor=0.5)
    feed(engine, realistic(4, 40))
    engine.observe(step=40, loss=math.nan)
    feed(engine, realistic(5, 30), start=41)
    regrow = only(engine.decisions, "regrow")
    assert regrow.new_lrs[0] == pytest.approx(BASE_LR)  # ×2 to 1.0, not ×3 past it
    assert regrow.evidence["factor"] == pytest.approx(2.0)


def test_repeated_divergence_escalates_to_stop_after_max_backoffs() -> None:
    engine = guard(max_backoffs=3, factor=0.5)
    feed(engine, realistic(6, K))
    for i in range(3):
        engine.observe(step=K + i, loss=math.nan)
        assert not engine.should_stop
        assert only(engine.last_decisions, "backoff").step == K + i
    before = engine.lrs
    engine.observe(step=K + 3, loss=math.nan)
    stop = only(engine.last_decisions, "stop")
    assert stop.step == K + 3
    assert stop.new_lrs == stop.old_lrs == tuple(before)  # stopping does not move the LR
    assert engine.should_stop
    assert engine.lrs == pytest.approx([BASE_LR * 0.125])


def test_every_lr_change_after_a_stop_has_its_record() -> None:
    """A run told to stop that goes on: each further NaN still halves the LR, and says so."""
    engine = guard(max_backoffs=1, factor=0.5, min_multiplier=0.01)
    engine.observe(step=0, loss=math.nan)  # back-off
    engine.observe(step=1, loss=math.nan)  # stop
    assert engine.should_stop
    for step in (2, 3):
        before = engine.lrs
        engine.observe(step=step, loss=math.nan)
        backoff = only(engine.last_decisions, "backoff")
        assert backoff.old_lrs == tuple(before)
        assert backoff.new_lrs == pytest.approx((before[0] * 0.5,))
        assert backoff.evidence["after_stop"] is True
    changes = [d for d in engine.decisions if d.new_lrs != d.old_lrs]
    lrs = [BASE_LR] + [d.new_lrs[0] for d in changes]
    assert lrs[-1] == pytest.approx(engine.lrs[0])  # the records account for every change


def test_async_spike_skips_are_recorded_as_advisory() -> None:
    """An async hook hears the verdict after the step ran: the record must not claim a skip
    happened. Non-finite steps are skipped by the hook's own guard either way."""
    engine = guard(skip_spikes=True, tolerance=5)
    engine.skips_enforced = False
    feed(engine, realistic(3, K))
    engine.observe(step=K, loss=50.0, grad_norm=1.0)
    skip = only(engine.last_decisions, "skip")
    assert skip.evidence["advisory"] is True and "advisory" in skip.reason
    engine.observe(step=K + 1, loss=math.nan)
    nan_skip = only(engine.last_decisions, "skip")
    assert "advisory" not in nan_skip.evidence and "advisory" not in nan_skip.reason


def test_back_off_to_the_multiplier_floor_escalates_to_stop() -> None:
    engine = guard(factor=0.5, min_multiplier=0.3, max_backoffs=100)
    engine.observe(step=0, loss=math.nan)
    engine.observe(step=1, loss=math.nan)
    assert engine.lrs == pytest.approx([BASE_LR * 0.3])  # 0.25 is below the floor
    assert engine.last_decisions[-1].evidence["factor"] == pytest.approx(0.6)
    assert not engine.should_stop
    engine.observe(step=2, loss=math.nan)
    assert engine.should_stop
    assert engine.lrs == pytest.approx([BASE_LR * 0.3])


def test_spike_does_not_pollute_statistics() -> None:
    """A second identical spike after the cooldown is still a spike."""
    cooldown = 10
    engine = guard(cooldown=cooldown, regrow_after=1000)
    series = realistic(7, 200)
    spike_steps = [K, K + cooldown + 5]
    for t, (loss, gnorm) in enumerate(series):
        if t in spike_steps:
            loss = 50 * 2.3  # the same spike twice: 50× the run's loss level
        engine.observe(step=t, loss=loss, grad_norm=gnorm)
    backoffs = [d for d in engine.decisions if d.action == "backoff"]
    assert [d.step for d in backoffs] == spike_steps
    assert engine.lrs == pytest.approx([BASE_LR * 0.25])


def test_spike_within_cooldown_does_not_back_off_again() -> None:
    engine = guard(cooldown=10)
    series = realistic(8, 100)
    for t, (loss, gnorm) in enumerate(series):
        if t in (K, K + 3):
            loss *= 50
        engine.observe(step=t, loss=loss, grad_norm=gnorm)
    assert [d.step for d in engine.decisions if d.action == "backoff"] == [K]


def test_tolerance_lets_spikes_pass_before_backing_off() -> None:
    engine = guard(tolerance=1, cooldown=0)
    series = realistic(9, 100)
    for t, (loss, gnorm) in enumerate(series):
        if t in (K, K + 5):
            loss *= 50
        engine.observe(step=t, loss=loss, grad_norm=gnorm)
    assert [d.step for d in engine.decisions if d.action == "backoff"] == [K + 5]


def test_grad_norm_floor_lets_ordinary_swings_pass_and_still_catches_blowups() -> None:
    """A 3× grad-norm swing is ordinary in LM training; a 100× one is not."""
    smooth = [(1.0, 1.0 * (1.01 if t % 2 else 0.99)) for t in range(K)]
    for floor, swing, backs in [(None, 3.0, True), (0.2, 3.0, False), (0.2, 100.0, True)]:
        knobs = {} if floor is None else {"grad_norm_min_sigma": floor}
        engine = guard(**knobs)
        feed(engine, smooth)
        engine.observe(step=K, loss=1.0, grad_norm=swing)
        assert any(d.action == "backoff" for d in engine.last_decisions) is backs, (floor, swing)


def test_a_regrow_says_it_counts_observations_from_the_last_spike() -> None:
    """A tolerated spike after the back-off changes no LR but restarts the count: the
    regrowth comes ``regrow_after`` observations after it, and its reason says so."""
    engine = guard(grad_norm_tolerance=1, regrow_after=50)
    for t, (loss, gnorm) in enumerate(realistic(5, 200)):
        engine.observe(step=t, loss=loss * (50 if t == K else 1),
                       grad_norm=gnorm * (100 if t == K + 10 else 1))
    moved = [(d.step, d.action) for d in engine.decisions if d.new_lrs != d.old_lrs]
    assert moved == [(K, "backoff"), (K + 60, "regrow")]  # not K + 50: a spike at K + 10
    regrow = only(engine.decisions, "regrow")
    assert regrow.reason.startswith(
        "50 observations in a row without a spike (counted from the last spike or change "
        "of this guard's LR): LR × 2")


def test_grad_norm_tolerance_skips_a_lone_grad_norm_spike_and_backs_off_at_the_next() -> None:
    """One grad-norm spike with an ordinary loss is one sample: skipped and flagged, no
    back-off. A second before ``regrow_after`` clean observations backs off; a loss
    spike is never tolerated by it; after a clean interval the count starts again."""
    engine = guard(grad_norm_tolerance=1, skip_spikes=True, regrow_after=50)
    series = realistic(11, 400)
    hits = {K: "grad", K + 20: "grad", K + 200: "grad", K + 300: "loss"}
    skipped = []
    for t, (loss, gnorm) in enumerate(series):
        if hits.get(t) == "grad":
            gnorm *= 100
        elif hits.get(t) == "loss":
            loss *= 50
        engine.observe(step=t, loss=loss, grad_norm=gnorm)
        skipped += [t] if engine.should_skip else []
    backs = [(d.step, d.evidence["statistic"]) for d in engine.decisions
             if d.action == "backoff"]
    assert backs == [(K + 20, "grad_norm"), (K + 300, "loss")]
    assert skipped == sorted(hits)
    tolerated = next(d for d in engine.decisions if d.step == K)
    assert tolerated.action == "skip" and "tolerated, 1 of 1" in tolerated.reason
    # K + 200 came after a clean interval (and the regrowth): tolerated again.
    assert [d.action for d in engine.decisions if d.step == K + 200] == ["skip"]


def test_loss_confirm_skips_a_lone_loss_spike_and_backs_off_on_two_in_a_row() -> None:
    """``loss_confirm: 2`` (every shipped file's): one bad batch is no divergence: a lone
    loss spike is flagged and skipped, not cut; two in a row back off at the second; a
    clean observation between two spikes starts the count again; a NaN still backs off
    at once; a checkpoint taken between the two spikes keeps the count."""
    engine = guard(loss_confirm=2, skip_spikes=True, regrow_after=10_000)
    hits = {K: 50.0, K + 20: 50.0, K + 22: 50.0, K + 40: 50.0, K + 41: 50.0,
            K + 100: math.nan}
    skipped = []
    for t, (loss, gnorm) in enumerate(realistic(12, 200)):
        engine.observe(step=t, loss=loss * hits.get(t, 1.0), grad_norm=gnorm)
        skipped += [t] if engine.should_skip else []
    backs = [(d.step, d.evidence["statistic"]) for d in engine.decisions
             if d.action == "backoff"]
    assert backs == [(K + 41, "loss"), (K + 100, "loss")]
    assert skipped == sorted(hits)
    lone = [d for d in engine.decisions if d.step in (K, K + 20, K + 22, K + 40)]
    assert [d.action for d in lone] == ["skip"] * 4
    assert all("not confirmed: 1 of 2 in a row" in d.reason for d in lone)

    # The count survives a checkpoint between the two spikes of a pair.
    first, second = guard(loss_confirm=2), guard(loss_confirm=2)
    series = realistic(13, K + 2)
    for t, (loss, gnorm) in enumerate(series[:K + 1]):
        first.observe(step=t, loss=loss * (50.0 if t == K else 1.0), grad_norm=gnorm)
    second.load_state_dict(first.state_dict())
    loss, gnorm = series[K + 1]
    second.observe(step=K + 1, loss=loss * 50.0, grad_norm=gnorm)
    assert [d.action for d in second.decisions] == ["backoff"]


def test_loss_confirm_one_is_the_old_rule_and_zero_is_refused() -> None:
    engine = guard()
    for t, (loss, gnorm) in enumerate(realistic(14, K + 5)):
        engine.observe(step=t, loss=loss * (50.0 if t == K else 1.0), grad_norm=gnorm)
    assert [(d.step, d.action) for d in engine.decisions] == [(K, "backoff")]
    for bad in (0, -1, 1.5, "two"):
        with pytest.raises(ConfigError, match="loss_confirm"):
            guard(loss_confirm=bad)
