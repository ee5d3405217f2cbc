"""Early stopping: Keras' and Lightning's rule on per-epoch metrics, the trend test on
noisy per-step ones, and "decay first, then give up".

Parity: the same metric sequences go to the engine (one observation per epoch, at
step = epoch) and to reference versions of Keras' ``EarlyStopping`` (written here
from its documented semantics: ``monitor_op(current - min_delta, best)`` with the
sign of ``min_delta`` following the mode, ``wait`` counted before the comparison, a
baseline that must also be beaten for ``wait`` to restart, no stop at epoch 0) and
to Lightning's own ``EarlyStopping`` (installed: its check runs on a stub trainer).
The stop epoch and the best value must agree.
"""

from __future__ import annotations

import math
import random
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import lrctl
from lrctl.config import ConfigError
from lrctl.policy import Engine

SETTINGS = settings(max_examples=200, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])


def earlystop(*extra: dict[str, Any], **knobs: Any) -> Engine:
    return lrctl.load_policy(
        {"version": 1, "policies": [*extra, {"kind": "earlystop", **knobs}]}, base_lrs=[0.1])


def stop_epoch(engine: Engine, values: list[float], metric: str = "val_loss") -> int | None:
    """Feed one value per epoch; the epoch at which the engine asked to stop."""
    for epoch, v in enumerate(values):
        engine.observe(step=epoch, **{metric: v})
        if engine.should_stop:
            return epoch
    return None


class KerasReference:
    """Keras ``EarlyStopping.on_epoch_end``, as its documentation and source define it."""

    def __init__(self, min_delta: float, patience: int, mode: str,
                 baseline: float | None = None, start_from_epoch: int = 0) -> None:
        self.less = mode == "min"
        self.min_delta = -abs(min_delta) if self.less else abs(min_delta)
        self.patience, self.baseline, self.start = patience, baseline, start_from_epoch
        self.best = math.inf if self.less else -math.inf
        self.best_epoch: int | None = None
        self.wait = 0

    def _improves(self, value: float, reference: float) -> bool:
        shifted = value - self.min_delta
        return shifted < reference if self.less else shifted > reference

    def on_epoch_end(self, epoch: int, current: float) -> bool:
        if epoch < self.start:
            return False
        self.wait += 1
        if self._improves(current, self.best):
            self.best, self.best_epoch = current, epoch
            if self.baseline is None or self._improves(current, self.baseline):
                self.wait = 0
            return False
        return self.wait >= self.patience and epoch > 0


def keras_stop(values: list[float], **knobs: Any) -> tuple[int | None, KerasReference]:
    ref = KerasReference(**knobs)
    for epoch, v in enumerate(values):
        if ref.on_epoch_end(epoch, v):
            return epoch, ref
    return None, ref


# -- known answers ----------------------------------------------------------------------
# (values, knobs, stop epoch, best, best epoch, wait at the stop)
TABLE: list[tuple[list[float], dict[str, Any], int | None, float, int, int]] = [
    ([1.0, 0.9, 0.95, 0.96, 0.97], {"patience": 2}, 3, 0.9, 1, 2),
    ([1.0, 0.9, 0.95, 0.96, 0.97], {"patience": 3}, 4, 0.9, 1, 3),
    ([1.0, 0.9, 0.95, 0.85, 0.97, 0.99], {"patience": 2}, 5, 0.85, 3, 2),
    # patience 0: the first value that does not improve stops (never the first value)
    ([1.0, 1.0], {"patience": 0}, 1, 1.0, 0, 1),
    # min_delta: 0.9 → 0.87 is a fall of 0.03 < 0.05: not an improvement
    ([1.0, 0.9, 0.87, 0.86], {"patience": 2, "min_delta": 0.05}, 3, 0.9, 1, 2),
    # baseline 0.5 never beaten: improvements move best, but wait keeps counting
    ([0.9, 0.8, 0.7, 0.75], {"patience": 2, "baseline": 0.5}, 3, 0.7, 2, 4),
    ([0.9, 0.8, 0.7, 0.75], {"patience": 2}, None, 0.7, 2, 1),
    # max mode (an accuracy)
    ([0.5, 0.6, 0.58, 0.59, 0.6], {"patience": 3, "mode": "max", "metric": "val_acc"},
     4, 0.6, 1, 3),
    # start_after: epochs before step 2 are ignored
    ([0.1, 0.1, 1.0, 1.1, 1.2], {"patience": 2, "start_after": 2}, 4, 1.0, 2, 2),
]


@pytest.mark.parametrize(("values", "knobs", "stop", "best", "best_step", "wait"), TABLE)
def test_known_answers(values: list[float], knobs: dict[str, Any], stop: int | None,
                       best: float, best_step: int, wait: int) -> None:
    metric = knobs.get("metric", "val_loss")
    engine = earlystop(**knobs)
    assert stop_epoch(engine, values, metric) == stop
    policy = engine.policies[0]
    assert policy.state_dict()["best_step"] == best_step
    if stop is None:
        assert not [d for d in engine.decisions if d.action == "stop"]
        return
    (decision,) = [d for d in engine.decisions if d.action == "stop"]
    assert decision.step == stop and decision.kind == "earlystop"
    ev = decision.evidence
    assert (ev["best"], ev["best_step"], ev["wait"], ev["patience"]) == (
        pytest.approx(best), best_step, wait, knobs["patience"])
    assert ev["statistic"] == metric and ev["value"] == values[stop]
    assert f"(step {best_step})" in decision.reason
    assert decision.old_lrs == decision.new_lrs == (0.1,)  # stopping never moves the LR


def test_the_stop_is_final_and_said_once() -> None:
    engine = earlystop(patience=1)
    assert stop_epoch(engine, [1.0, 1.0, 1.0]) == 1
    for epoch in range(2, 10):
        engine.observe(step=epoch, val_loss=0.1)  # a late improvement does not undo it
    assert engine.should_stop
    assert [d.action for d in engine.decisions] == ["stop"]


# -- parity -----------------------------------------------------------------------------
values_st = st.lists(st.floats(0.0, 2.0, allow_nan=False).map(lambda x: round(x, 2)),
                     min_size=1, max_size=40)


@SETTINGS
@given(values=values_st, patience=st.integers(0, 6), mode=st.sampled_from(["min", "max"]),
       min_delta=st.sampled_from([0.0, 0.01, 0.1]),
       baseline=st.sampled_from([None, 0.5, 1.5]), start=st.integers(0, 4))
def test_parity_with_keras(values: list[float], patience: int, mode: str, min_delta: float,
                           baseline: float | None, start: int) -> None:
    want, ref = keras_stop(values, min_delta=min_delta, patience=patience, mode=mode,
                           baseline=baseline, start_from_epoch=start)
    engine = earlystop(patience=patience, mode=mode, min_delta=min_delta, baseline=baseline,
                       start_after=start)
    assert stop_epoch(engine, values) == want
    state = engine.policies[0].state_dict()
    assert state["best_step"] == ref.best_epoch
    if want is not None:
        (decision,) = [d for d in engine.decisions if d.action == "stop"]
        assert decision.evidence["best"] == ref.best
        assert decision.evidence["wait"] == ref.wait


def lightning_stop(values: list[float], **knobs: Any) -> tuple[int | None, Any]:
    """Lightning's own ``EarlyStopping`` check, epoch by epoch, on a stub trainer."""
    torch = pytest.importorskip("torch")
    callbacks = pytest.importorskip("lightning.pytorch.callbacks")
    es = callbacks.EarlyStopping(monitor="val_loss", check_finite=False, **knobs)
    trainer = SimpleNamespace(fast_dev_run=False, should_stop=False, current_epoch=0,
                              callback_metrics={},
                              strategy=SimpleNamespace(
                                  reduce_boolean_decision=lambda d, all=True: d))
    for epoch, v in enumerate(values):
        trainer.current_epoch = epoch
        trainer.callback_metrics = {"val_loss": torch.tensor(v, dtype=torch.float64)}
        es._run_early_stopping_check(trainer)
        if trainer.should_stop:
            return epoch, es
    return None, es


@SETTINGS
@given(values=values_st, patience=st.integers(0, 6), mode=st.sampled_from(["min", "max"]),
       min_delta=st.sampled_from([0.0, 0.01, 0.1]))
def test_parity_with_lightning(values: list[float], patience: int, mode: str,
                               min_delta: float) -> None:
    want, es = lightning_stop(values, patience=patience, mode=mode, min_delta=min_delta)
    engine = earlystop(patience=patience, mode=mode, min_delta=min_delta)
    assert stop_epoch(engine, values) == want
    if want is not None:
        (decision,) = [d for d in engine.decisions if d.action == "stop"]
        assert decision.evidence["best"] == float(es.best_score)
        assert decision.evidence["wait"] == es.wait_count


def test_lightning_reference_is_live() -> None:
    """The stub drives Lightning's real check: a plateau stops it after `patience`."""
    assert lightning_stop([1.0, 0.5, 0.5, 0.5], patience=2)[0] == 3


# -- decay first, then give up --------------------------------------------------------------
PLATEAU = {"kind": "plateau", "metric": "val_loss", "patience": 1, "factor": 0.5}


@pytest.mark.parametrize(("after", "stop", "reductions"), [(0, 2, 0), (1, 4, 1), (2, 6, 2)])
def test_after_reductions_waits_for_plateau_cuts(after: int, stop: int,
                                                 reductions: int) -> None:
    # A flat val_loss: plateau (patience 1) cuts the LR at epochs 2, 4, 6 …; each cut
    # gives the lower LR `patience` (2) fresh epochs before the stop.
    engine = earlystop(PLATEAU, patience=2, after_reductions=after)
    assert stop_epoch(engine, [1.0] * 20) == stop
    (decision,) = [d for d in engine.decisions if d.action == "stop"]
    assert decision.evidence["reductions"] == reductions
    # plateau acts first in the stop's own epoch too; that cut is not counted
    assert [d.step for d in engine.decisions if d.action == "reduce"] == [2, 4, 6][:after + 1]


def test_an_improvement_resets_the_reductions() -> None:
    engine = earlystop(PLATEAU, patience=2, after_reductions=2)
    values = [1.0, 1.0, 1.0, 1.0, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5]
    # Cuts at 2 (one), improvement at 4 (reset), cuts at 6 and 8, then 2 more epochs.
    assert stop_epoch(engine, values) == 10
    assert [d.step for d in engine.decisions if d.action == "reduce"] == [2, 6, 8, 10]


# -- noisy per-step metrics --------------------------------------------------------------------
def noisy_falling(n: int, seed: int, outlier_at: int | None = None) -> list[float]:
    """A per-step loss that falls 3e-4 a step under noise of σ 0.1: a fall of 0.12 per
    400 steps, clear to a test of the means, not to a record of the single best value."""
    rng = random.Random(seed)
    out = [3.0 - 3e-4 * t + rng.gauss(0, 0.1) for t in range(n)]
    if outlier_at is not None:
        out[outlier_at] = 1e4
    return out


def run_loss(engine: Engine, losses: list[float]) -> int | None:
    for t, loss in enumerate(losses):
        engine.observe(step=t, loss=loss)
        if engine.should_stop:
            return t
    return None


TREND = {"metric": "loss", "smoothing": "trend", "window": 400, "patience": 400}


def test_trend_does_not_stop_a_falling_noisy_loss_where_the_best_sample_rule_does() -> None:
    seeds = range(10)
    assert [run_loss(earlystop(**TREND), noisy_falling(4000, s)) for s in seeds] == [None] * 10
    # Keras' rule, same patience, same losses: the best single sample is a low outlier
    # that the falling loss takes hundreds of steps to beat.
    best_rule = [run_loss(earlystop(metric="loss", patience=400), noisy_falling(4000, s))
                 for s in seeds]
    assert sum(stop is not None for stop in best_rule) >= 5, best_rule


@pytest.mark.parametrize("seed", range(3))
def test_one_bad_sample_does_not_stop_a_run(seed: int) -> None:
    losses = noisy_falling(4000, seed, outlier_at=2000)
    assert run_loss(earlystop(**TREND), losses) is None
    # Unclipped, that one sample holds the newer half's mean up for 200 observations
    # and the stall verdicts that follow stop the run.
    assert run_loss(earlystop(**TREND, outlier_z=1e9), losses) == 2399


@pytest.mark.parametrize("seed", range(3))
def test_trend_stops_a_flat_noisy_loss_after_patience(seed: int) -> None:
    rng = random.Random(seed)
    losses = [1.0 + rng.gauss(0, 0.1) for _ in range(3000)]
    engine = earlystop(**TREND)
    stop = run_loss(engine, losses)
    # The first test comes when the window is full (observation 400), then one every 50;
    # the patience (400 observations without a significant fall) is used up by then.
    assert stop is not None and 399 <= stop <= 399 + 3 * 50
    (decision,) = [d for d in engine.decisions if d.action == "stop"]
    assert decision.evidence["smoothing"] == "trend" and decision.evidence["wait"] >= 400
    assert decision.evidence["verdict"] in ("flat", "rose")
    assert decision.evidence["best"] == pytest.approx(1.0, abs=0.05)


def test_spikes_flagged_by_the_divergence_guard_do_not_count() -> None:
    div = {"kind": "divergence", "min_samples": 8, "window": 32}
    losses = [1.0 / (1 + t) for t in range(40)]
    losses[30] = 500.0  # a spike: not "no improvement" for the loss rule
    engine = earlystop(div, metric="loss", patience=0)
    assert run_loss(engine, losses) is None
    assert any(d.action == "backoff" for d in engine.decisions)


# -- validation --------------------------------------------------------------------------------
def test_restore_best_is_refused_with_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "es.yaml"
    path.write_text("version: 1\npolicies:\n  - kind: earlystop\n    patience: 3\n"
                    "    restore_best: true\n")
    with pytest.raises(ConfigError) as info:
        lrctl.load_policy(path, [0.1])
    assert str(info.value).startswith(f"{path}:5: restore_best: is not supported")
    assert "best_step" in str(info.value)
    path.write_text("version: 1\npolicies:\n  - kind: earlystop\n    restore_best: false\n")
    assert lrctl.load_policy(path, [0.1]).policies[0].kind == "earlystop"


@pytest.mark.parametrize(("line", "key", "words"), [
    ("    patience: -1\n", "patience", ">= 0"),
    ("    min_delta: -0.1\n", "min_delta", ">= 0"),
    ("    smoothing: ema\n", "smoothing", "none, trend"),
    ("    window: 4\n", "window", ">= 8"),
    ("    mode: auto\n", "mode", "min, max"),
])
def test_bad_knobs_name_file_line_and_key(tmp_path: Path, line: str, key: str,
                                          words: str) -> None:
    path = tmp_path / "es.yaml"
    path.write_text("version: 1\npolicies:\n  - kind: earlystop\n" + line)
    with pytest.raises(ConfigError) as info:
        lrctl.load_policy(path, [0.1])
    assert (info.value.line, info.value.key) == (4, key) and words in info.value.message
