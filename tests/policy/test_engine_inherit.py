"""Engine.inherit: what a hot reload keeps, resets, adds and drops."""

from __future__ import annotations

import pytest

import lrctl

BASE = """version: 1
policies:
  - kind: divergence
  - kind: plateau
    patience: 3
    factor: 0.5
"""


def run(engine: lrctl.Engine, steps: range, loss: float = 1.0) -> None:
    for t in steps:
        engine.observe(step=t, loss=loss)


def test_unchanged_policies_keep_their_state_and_multiplier() -> None:
    old = lrctl.load_policy(BASE, [0.1])
    run(old, range(10))  # constant loss: plateau halves the LR twice
    assert old.lrs == [0.025]
    new = lrctl.load_policy(BASE.replace("patience: 3", "patience: 4"), [0.1])
    summary = new.inherit(old)
    assert summary == {"kept": ["divergence"], "changed": ["plateau"], "added": [],
                       "removed": [], "reset": []}
    assert new.lrs == [0.025]
    assert new.last_step == 9
    assert new.decision_count == old.decision_count == 2
    with pytest.raises(lrctl.policy.ObservationError):
        new.observe(step=9, loss=1.0)  # the step counter carried over too


def test_counters_continue_exactly() -> None:
    uninterrupted = lrctl.load_policy(BASE, [0.1])
    run(uninterrupted, range(20))
    first = lrctl.load_policy(BASE, [0.1])
    run(first, range(7))
    second = lrctl.load_policy(BASE, [0.1])
    second.inherit(first)
    run(second, range(7, 20))
    assert second.lrs == uninterrupted.lrs
    assert [d.to_dict() for d in second.decisions] == [
        d.to_dict() for d in uninterrupted.decisions]


def test_added_policy_starts_fresh_and_removed_one_drops_its_multiplier() -> None:
    old = lrctl.load_policy(BASE, [0.1])
    run(old, range(10))
    new = lrctl.load_policy("version: 1\npolicies:\n  - kind: divergence\n"
                            "  - kind: warmup\n    steps: 10\n", [0.1])
    summary = new.inherit(old)
    assert summary["added"] == ["warmup"] and summary["removed"] == ["plateau"]
    # warmup counts absolute steps: step 10 is past a 10-step warmup
    assert new.lrs == [0.1]


def test_group_count_cannot_change() -> None:
    old = lrctl.load_policy(BASE, [0.1])
    new = lrctl.load_policy(BASE, [0.1, 0.01])
    with pytest.raises(ValueError, match="param groups"):
        new.inherit(old)
