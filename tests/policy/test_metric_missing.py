"""A policy whose metric the loop never reports says so, once (``metric_missing``),
instead of staying silently unarmed for the whole run; the LR is never touched by it."""

from __future__ import annotations

import pytest

import lrctl
from lrctl.policy._metric_watch import MISSING_AFTER

EARLYSTOP = "version: 1\npolicies:\n  - kind: earlystop\n"
PLATEAU = "version: 1\npolicies:\n  - kind: plateau\n    metric: val_loss\n"


def _notices(engine: lrctl.Engine) -> list[lrctl.Decision]:
    return [d for d in engine.decisions if d.action == "metric_missing"]


@pytest.mark.parametrize("text", [EARLYSTOP, PLATEAU])
def test_a_metric_reported_under_another_name_is_named_once(text: str) -> None:
    engine = lrctl.load_policy(text, [0.1])
    for step in range(3 * MISSING_AFTER):
        metrics = {"eval_loss": 1.0} if step % 100 == 0 else {}
        assert engine.observe(step, 1.0, **metrics) == [0.1]
    notices = _notices(engine)
    assert [d.step for d in notices] == [MISSING_AFTER - 1]
    assert notices[0].old_lrs == notices[0].new_lrs == (0.1,)
    assert "no val_loss in the first 2000 observations" in notices[0].reason
    assert "eval_loss" in notices[0].reason and notices[0].evidence["reported"] == ["eval_loss"]


@pytest.mark.parametrize("text", [EARLYSTOP, PLATEAU])
def test_a_plain_run_without_metrics_is_told_at_the_same_step(text: str) -> None:
    """No metrics at all: the plain observation path counts as the full one does."""
    engine = lrctl.load_policy(text, [0.1])
    for step in range(MISSING_AFTER + 10):
        engine.observe(step, 1.0, 1.0)
    assert [d.step for d in _notices(engine)] == [MISSING_AFTER - 1]
    assert "the loop reported no metric" in _notices(engine)[0].reason


@pytest.mark.parametrize("text", [EARLYSTOP, PLATEAU])
def test_a_metric_that_comes_means_no_notice(text: str) -> None:
    engine = lrctl.load_policy(text, [0.1])
    for step in range(MISSING_AFTER + 500):
        engine.observe(step, 1.0, **({"val_loss": 1.0} if step == 1500 else {}))
    assert _notices(engine) == []


def test_the_count_survives_a_checkpoint() -> None:
    engine = lrctl.load_policy(EARLYSTOP, [0.1])
    for step in range(MISSING_AFTER - 5):
        engine.observe(step, 1.0)
    resumed = lrctl.load_policy(EARLYSTOP, [0.1])
    resumed.load_state_dict(engine.state_dict())
    for step in range(MISSING_AFTER - 5, MISSING_AFTER + 5):
        resumed.observe(step, 1.0)
    assert [d.step for d in _notices(resumed)] == [MISSING_AFTER - 1]


def test_the_loss_is_never_missing() -> None:
    engine = lrctl.load_policy("version: 1\npolicies:\n  - kind: plateau\n", [0.1])
    for step in range(MISSING_AFTER + 10):
        engine.observe(step, 1.0)
    assert _notices(engine) == []
