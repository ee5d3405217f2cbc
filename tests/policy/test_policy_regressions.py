"""Regressions found in review: long runs, a stopped guard, settings that never arm."""

from __future__ import annotations

import math

import pytest

import lrctl
from lrctl.config import ConfigError


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
