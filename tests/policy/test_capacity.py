"""A run's policies may keep at most MAX_KEPT_VALUES values in their windows (see
lrctl.policy._capacity): each window is bounded, their number was not."""

from __future__ import annotations

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
    # two robust windows of two copies; a trend window and the smoothing window (20);
    # a trend and a robust window
    assert [kept_values(p) for p in engine.policies][:2] == [4000, 620]
    assert kept_values(engine.policies[2]) == 300 + 2 * 300


def test_windows_beyond_the_bound_are_refused_with_the_numbers() -> None:
    lrctl.load_policy(_divergences(2, 100_000), [0.1])  # 800 000: fits
    with pytest.raises(ConfigError, match=rf"up to 1200000 values .* \({MAX_KEPT_VALUES}"):
        lrctl.load_policy(_divergences(3, 100_000), [0.1])
    with pytest.raises(ConfigError, match="smaller windows"):
        lrctl.load_policy(_divergences(64, 100_000), [0.1])
