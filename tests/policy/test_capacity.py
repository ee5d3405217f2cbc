"""A run's policies may keep at most MAX_KEPT_VALUES values in their windows (see
lrctl.policy._capacity): each window is bounded, their number was not."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import lrctl
from lrctl.config import ConfigError
from lrctl.policy._capacity import MAX_KEPT_VALUES, kept_values

POLICIES = Path(__file__).resolve().parents[2] / "policies"


def _divergences(n: int, window: int) -> str:
    return "version: 1\npolicies:\n" + "".join(
        f"  - kind: divergence\n    name: d{i}\n    window: {window}\n" for i in range(n))


@pytest.mark.parametrize("path", sorted(POLICIES.glob("*.yaml")), ids=lambda p: p.name)
def test_the_shipped_policies_keep_a_few_thousand_values(path: Path) -> None:
    engine = lrctl.load_policy(str(path), [0.1])
    assert 0 < sum(map(kept_values, engine.policies)) <= 4096


def test_each_window_is_counted() -> None:
    engine = lrctl.load_policy(
        "version: 1\npolicies:\n  - kind: divergence\n    window: 1000\n"
        "  - kind: plateau\n    test: trend\n    patience: 600\n"
        "  - kind: earlystop\n    smoothing: trend\n    window: 300\n", [0.1])
    # two robust windows of two copies and the cooldown's pairs (10 × 2); a trend window
    # and the smoothing window (20); a trend and a robust window
    assert [kept_values(p) for p in engine.policies][:2] == [4020, 620]
    assert kept_values(engine.policies[2]) == 300 + 2 * 300


def test_windows_beyond_the_bound_are_refused_with_the_numbers() -> None:
    lrctl.load_policy(_divergences(2, 100_000), [0.1])  # 800 000: fits
    with pytest.raises(ConfigError, match=rf"up to 1200060 values .* \({MAX_KEPT_VALUES}"):
        lrctl.load_policy(_divergences(3, 100_000), [0.1])
    with pytest.raises(ConfigError, match="smaller windows"):
        lrctl.load_policy(_divergences(64, 100_000), [0.1])


def test_a_cooldown_keeps_values_too_and_is_bounded() -> None:
    """A review's find: the divergence guard keeps a (loss, grad norm) pair per observation
    of a cooldown, and ``cooldown`` had no bound: 64 guards of ``window: 4, cooldown:
    1000000000`` held 2.5 million values after one NaN, and stalled the loop 2 s a
    second re-encoding a checkpoint too large to write."""
    with pytest.raises(ConfigError, match="cooldown: must be <= 100000"):
        lrctl.load_policy("version: 1\npolicies:\n  - kind: divergence\n"
                          "    cooldown: 1000000000\n", [0.1])
    text = "version: 1\npolicies:\n" + "".join(
        f"  - kind: divergence\n    name: d{i}\n    window: 4\n    min_samples: 4\n"
        "    cooldown: 100000\n"
        for i in range(6))  # (6 × (2 × 100 000 + 4 × 4))
    with pytest.raises(ConfigError, match="up to 1200096 values"):
        lrctl.load_policy(text, [0.1])


def test_lrctl_validate_says_so_before_any_controller_refuses(tmp_path: Path) -> None:
    path = tmp_path / "greedy.yaml"
    path.write_text(_divergences(3, 100_000))
    out = subprocess.run([sys.executable, "-m", "lrctl", "validate", str(path)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 1
    assert "more than a run may" in out.stderr


def test_a_subclass_of_a_shipped_policy_is_counted() -> None:
    from lrctl.policy.divergence import Divergence

    class Mine(Divergence):  # a user's subclass, in a module of their own
        pass

    Mine.__module__ = "my_package.policies"
    assert kept_values(Mine(window=1000)) == 4020


def test_a_lone_surrogate_in_a_policy_file_is_refused() -> None:
    """``"\\ud800"`` in double quotes is a lone surrogate once read: the reload reason and
    the MLflow params that carried it could not be encoded (a review's find)."""
    with pytest.raises(ConfigError, match="lone UTF-16 surrogate"):
        lrctl.load_policy('version: 1\npolicies:\n  - kind: plateau\n'
                          '    metric: "val\\ud800"\n', [0.1])


def test_a_saved_state_brings_no_more_than_the_knobs_keep() -> None:
    """A review's find: a hello's saved state may hold a divergence guard's settling
    losses and cooldown pairs as plain lists, which nothing bounded (400 000 values a
    run, counted as 40 by the bound on runs without a hook). They are cut to what the
    knobs keep (the newest), and counted where held."""
    from lrctl.policy._capacity import held_values

    engine = lrctl.load_policy("version: 1\npolicies:\n  - kind: divergence\n", [0.1])
    guard = engine.policies[0]
    state = guard.state_dict()
    state["settling"] = [1.0] * 400_000
    state["accepted"] = {}
    state["cooldown_seen"] = [[1.0, 1.0]] * 50_000
    guard.load_state_dict(state)
    assert len(guard._after) == guard.params["min_samples"] - 1
    assert len(guard._cooldown_seen) == guard.params["cooldown"]
    assert held_values(guard) == 31 + 10


def _early_stops(*windows: int) -> str:
    return "version: 1\npolicies:\n" + "".join(
        f"  - kind: earlystop\n    name: e{i}\n    smoothing: trend\n    window: {w}\n"
        for i, w in enumerate(windows))


def test_the_values_trend_tests_judge_at_once_are_bounded() -> None:
    """An adversarial pass's find: three early stops at ``window: 100000`` (300 000 kept
    values: within MAX_KEPT_VALUES) came due at the same observation, each test a pass
    over its window, and held the controller's loop (every other run's answer) 67-134 ms
    at a time. The values the trend tests judge at one observation are bounded too: one
    test at the largest window fits."""
    from lrctl.policy._capacity import MAX_TESTED_VALUES, tested_values

    one = lrctl.load_policy(_early_stops(100_000), [0.1])
    assert sum(map(tested_values, one.policies)) == 100_000
    at_bound = lrctl.load_policy(_early_stops(100_000, MAX_TESTED_VALUES - 100_000), [0.1])
    assert sum(map(tested_values, at_bound.policies)) == MAX_TESTED_VALUES
    with pytest.raises(ConfigError, match=rf"judge up to 300000 values .* \({MAX_TESTED_VALUES}"):
        lrctl.load_policy(_early_stops(100_000, 100_000, 100_000), [0.1])
    with pytest.raises(ConfigError, match="fewer trend tests"):
        lrctl.load_policy(_early_stops(100_000, MAX_TESTED_VALUES - 100_000 + 2), [0.1])
    # A stall test's window is one too; a divergence guard's robust window is not.
    plateau = lrctl.load_policy("version: 1\npolicies:\n  - kind: plateau\n    test: stall\n"
                                "    patience: 400\n  - kind: divergence\n    window: 1000\n",
                                [0.1])
    assert [tested_values(p) for p in plateau.policies] == [400, 0]


@pytest.mark.parametrize("path", sorted(POLICIES.glob("*.yaml")), ids=lambda p: p.name)
def test_the_shipped_policies_trend_tests_are_small(path: Path) -> None:
    from lrctl.policy._capacity import tested_values

    engine = lrctl.load_policy(str(path), [0.1])
    assert sum(map(tested_values, engine.policies)) <= 400
