"""Regressions found in review: long runs, a stopped guard, settings that never arm."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

import lrctl
from lrctl.config import ConfigError, load_policy
from lrctl.policy._params import MAX_MEAN_WINDOW, MAX_WINDOW


def test_triangular2_runs_for_millions_of_steps() -> None:
    engine = lrctl.load_policy({"version": 1, "policies": [
        {"kind": "cyclical", "mode": "triangular2", "max_lr": 0.2, "step_size_up": 500}]},
        [0.1])
    # step 1 023 999 starts cycle 1025, where 2.0 ** 1024 overflows a float
    for step in (1_023_998, 1_023_999, 1_024_500, 5_000_000):
        lrs = engine.observe(step=step, loss=1.0)
        assert math.isfinite(lrs[0]) and lrs[0] == pytest.approx(0.1)


def test_a_stopped_guard_never_regrows_and_still_backs_off_on_nan() -> None:
    engine = lrctl.load_policy({"version": 1, "policies": [
        {"kind": "divergence", "max_backoffs": 2, "regrow_after": 50}]}, [0.1])
    for step in range(3):
        engine.observe(step=step, loss=math.nan)
    assert engine.should_stop and engine.lrs == [0.025]
    for step in range(3, 1000):  # the loop ignored should_stop and went on
        engine.observe(step=step, loss=1.0)
    assert engine.lrs == [0.025]  # no regrowth toward the LR that diverged
    engine.observe(step=1000, loss=math.nan)
    assert engine.lrs == [0.0125]
    assert [d.action for d in engine.decisions].count("stop") == 1


def test_min_samples_above_window_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="min_samples: must be <= window"):
        lrctl.load_policy("version: 1\npolicies:\n  - kind: divergence\n    window: 16\n",
                          [0.1])


def _first_fall_then_a_slow_one(n: int, seed: int = 0) -> list[float]:
    """A run's usual start: a fall from 2.3 to ~0.05 within 30 steps (a curve no line
    fits), then a slow, steady fall with noise."""
    import random

    rng = random.Random(seed)
    return [2.3 * math.exp(-t / 6) + 0.05 - 0.03 * t / n + rng.gauss(0, 0.01)
            for t in range(n)]


@pytest.mark.parametrize("burn_in", [None, 0])
def test_the_first_fast_fall_of_a_run_is_not_read_as_noise(burn_in: int | None) -> None:
    """From a newcomer's run of the README loop: the trend test judged the first window,
    whose older half holds the run's first fast fall, and called a threefold fall of the
    mean "not significant" (its residuals around a line were that curve). By default
    the first half-window is not judged (``burn_in``); ``burn_in: 0`` is the old way."""
    spec = {"kind": "plateau", "test": "trend", "patience": 400, "factor": 0.5,
            "threshold": 1e-3}
    if burn_in is not None:
        spec["burn_in"] = burn_in
    engine = lrctl.load_policy({"version": 1, "policies": [spec]}, [0.1])
    for step, loss in enumerate(_first_fall_then_a_slow_one(1000)):
        engine.observe(step=step, loss=loss)
    if burn_in is None:
        assert engine.decisions == [] and engine.lrs == [0.1]
    else:
        (cut,) = engine.decisions
        assert cut.step == 399 and "did not fall significantly" in cut.reason


def test_burn_in_delays_the_first_plateau_test_and_survives_a_restore() -> None:
    """A flat loss: the first reduction comes at burn_in + patience observations, also
    when the state is saved and restored in the middle of the burn-in."""
    spec = {"kind": "plateau", "test": "trend", "patience": 64, "factor": 0.5,
            "burn_in": 40}
    flat = [1.0 + 0.01 * math.sin(1.7 * t) for t in range(200)]
    engine = lrctl.load_policy({"version": 1, "policies": [spec]}, [0.1])
    for step in range(20):
        engine.observe(step=step, loss=flat[step])
    restored = lrctl.load_policy({"version": 1, "policies": [spec]}, [0.1])
    restored.load_state_dict(engine.state_dict())
    for step in range(20, 200):
        restored.observe(step=step, loss=flat[step])
    assert restored.decisions[0].step == 40 + 64 - 1
    with pytest.raises(ConfigError, match="burn_in"):
        lrctl.load_policy({"version": 1, "policies": [{**spec, "burn_in": -1}]}, [0.1])


@pytest.mark.parametrize(("kind", "knob", "most", "extra"), [
    ("plateau", "smoothing_window", MAX_MEAN_WINDOW, {"smoothing": "mean"}),
    ("rangetest", "smoothing_window", MAX_MEAN_WINDOW, {}),
    ("divergence", "window", MAX_WINDOW, {}),
    ("earlystop", "window", MAX_WINDOW, {}),
    ("wsd", "window", MAX_WINDOW, {"start_on": "plateau", "decay_steps": 100}),
])
def test_a_window_is_bounded(kind: str, knob: str, most: int, extra: dict) -> None:
    """A window of 1e8 observations was accepted: a run's memory, its checkpoint and the
    loop's work per observation grew without bound (one peer's batched observations
    under a mean over 1e8 then stalled every other run)."""
    load_policy({"version": 1, "policies": [{"kind": kind, knob: most, **extra}]}, [0.1])
    with pytest.raises(ConfigError, match=rf"{knob}: must be <= {most}, but got {most + 1}"):
        load_policy({"version": 1, "policies": [{"kind": kind, knob: most + 1, **extra}]},
                    [0.1])


def test_a_shipped_policy_goes_by_name_from_any_directory(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A newcomer's find: ``policy="policies/rangetest.yaml"`` worked only from the
    repository's root, ``policy="rangetest"`` nowhere, and nothing said where the
    shipped files are."""
    from lrctl._defaults import POLICIES
    from lrctl._sources import policy_payload

    monkeypatch.chdir(tmp_path)
    for name in ("rangetest", "rangetest.yaml"):
        text, source = policy_payload(name)
        assert source == str(POLICIES / "rangetest.yaml")
        assert text == (POLICIES / "rangetest.yaml").read_text()
        assert load_policy(name, [0.1]).state_dict() == load_policy(
            POLICIES / "rangetest.yaml", [0.1]).state_dict()
    (tmp_path / "rangetest.yaml").write_text("version: 1\npolicies:\n  - kind: plateau\n")
    assert policy_payload("rangetest.yaml")[1] == str(tmp_path / "rangetest.yaml")  # yours
    with pytest.raises(FileNotFoundError, match=r'policy="rangetest" \(one of .*wsd'):
        policy_payload("policies/rangetest.yaml")
    with pytest.raises(ConfigError, match=r"cannot read: .*shipped policies go by name"):
        load_policy("policies/nosuch.yaml", [0.1])
