"""The run description and table rows, without MLflow (pure functions)."""

from __future__ import annotations

import json

import pytest
from sinks_helpers import decision

from lrctl.sinks.run_views import (
    MAX_NOTE_CHARS,
    RECENT,
    TABLE_COLUMNS,
    RunSummary,
    decision_row,
    runs_view_link,
)


def test_a_row_has_the_table_columns_and_blanks_for_non_finite_lrs() -> None:
    rec = decision(41, [0.1, 0.01], [0.05, 0.005], reason="loss flat")
    assert dict(zip(TABLE_COLUMNS, decision_row(rec), strict=True)) == {
        "step": 41, "policy": "plateau", "action": "reduce", "old_lr": 0.1, "new_lr": 0.05,
        "reason": "loss flat"}
    nan = decision(7, ["nan"], [0.05], policy="operator", action="set_lr")
    assert decision_row(nan)[3:5] == [None, 0.05]
    json.dumps(decision_row(nan), allow_nan=False)  # a strict JSON table cell


def test_a_shadow_decision_says_it_was_not_applied_and_charts_no_change() -> None:
    """Decided while the run was paused (shadow mode), a back-off showed in the table,
    the description and the lrctl/event/backoff chart as 0.01 -> 0.005, an LR change that
    never happened: only decisions.jsonl said shadow (found by an adversarial pass)."""
    from lrctl.policy._decision import record_ratio

    rec = {**decision(210, [0.01], [0.005], policy="divergence", action="backoff",
                      reason="loss spike"), "shadow": True}
    row = dict(zip(TABLE_COLUMNS, decision_row(rec), strict=True))
    assert row["reason"] == "shadow mode, not applied: loss spike"
    assert record_ratio(rec) == 1.0 and record_ratio({**rec, "shadow": False}) == 0.5
    summary = RunSummary()
    summary.add_decision(1, rec)
    assert "shadow mode, not applied" in summary.markdown("1")


def test_counts_and_latest_rows_fold_each_decision_once() -> None:
    summary = RunSummary()
    for seq in range(1, 31):
        action = "backoff" if seq % 3 == 0 else "skip"
        assert summary.add_decision(seq, decision(seq * 10, [0.1], [0.05], action=action))
    assert not summary.add_decision(30, decision(300, [0.1], [0.05]))  # replayed: counted once
    assert not summary.add_decision(5, decision(50, [0.1], [0.05]))
    assert summary.counts == {"backoff": 10, "skip": 20} and summary.total == 30
    assert [r[0] for r in summary.recent] == [s * 10 for s in range(31 - RECENT, 31)]
    assert RunSummary.from_json(json.loads(json.dumps(summary.to_json()))) == summary


def test_markdown_names_the_policy_counts_actions_and_lists_newest_first() -> None:
    summary = RunSummary()
    summary.set_policy("/home/me/policies/plateau.yaml", "ab" * 32, 2)
    summary.add_decision(1, decision(100, [0.1], [0.05], reason="loss flat for 25 steps"))
    summary.add_decision(2, decision(150, [0.05], [0.2], policy="operator", action="set_lr",
                                     reason="manual LR 0.2 set by an operator"))
    summary.add_decision(3, decision(200, [0.2], [0.1], reason="loss flat again"))
    text = summary.markdown("7")
    lines = text.splitlines()
    assert lines[0] == ("**lrctl** · policy `plateau.yaml` v2, sha256 `abababababab` · "
                        "3 decisions: 2 reduce, 1 set\\_lr · [training runs of this experiment]"
                        "(#/experiments/7/runs?workflowType=machine_learning)")
    assert summary.markdown().splitlines()[0].endswith("1 set\\_lr")  # no experiment, no link
    rows = [line for line in lines if line.startswith("| 1") or line.startswith("| 2")]
    assert rows == ["| 200 | plateau | reduce | 0.2 → 0.1 | loss flat again |",
                    "| 150 | operator | set\\_lr | 0.05 → 0.2 | manual LR 0.2 set by an operator |",
                    "| 100 | plateau | reduce | 0.1 → 0.05 | loss flat for 25 steps |"]
    assert runs_view_link("7") == "#/experiments/7/runs?workflowType=machine_learning"


def test_markup_in_a_reason_cannot_break_the_table() -> None:
    summary = RunSummary()
    summary.add_decision(1, decision(3, [0.1], [0.05], reason="a | b\nc *d* `e` <script>"))
    [row] = [line for line in summary.markdown().splitlines() if line.startswith("| 3 ")]
    assert row.endswith("| a \\| b c \\*d\\* \\`e\\` \\<script\\> |")
    assert row.count(" | ") == 4  # five cells, the escaped pipe is not a border


@pytest.mark.parametrize(("reason", "policy", "all_rows"), [
    ("loss flat", "plateau", True),
    ("_" * 400, "plateau", False),  # clipped to 160 characters, each escaped: 320
    ("r", "p" * 500, False),  # a long policy name in the YAML file
])
def test_markdown_fits_in_a_tag_by_dropping_the_oldest_rows(reason: str, policy: str,
                                                            all_rows: bool) -> None:
    summary = RunSummary()
    summary.set_policy("p.yaml", "c" * 64, 1)
    for seq in range(1, 100):
        summary.add_decision(seq, decision(seq, [0.1], [0.05], reason=reason, policy=policy))
    text = summary.markdown("1")
    assert len(text) <= MAX_NOTE_CHARS
    assert "| 99 | " in text  # the newest row always stays
    assert "99 decisions: 99 reduce" in text.splitlines()[0]
    shown = sum(line.startswith("| ") and not line.startswith("| step") for line in
                text.splitlines())
    assert shown == RECENT if all_rows else 0 < shown < RECENT
    assert f"Latest {shown} of 99, newest first." in text


def test_a_run_without_decisions_promises_no_artifacts_it_has_not() -> None:
    """A newcomer's find: a run with 0 decisions said "Every decision: artifacts
    lrctl/decisions_table.json ..." that did not exist (they come with the first)."""
    summary = RunSummary()
    summary.set_policy("/p/default.yaml", "cd" * 32, 1)
    text = summary.markdown("7")
    assert "No decisions yet." in text and "Every decision:" not in text
    assert text.splitlines()[-1].startswith("The decisions will be listed here")
    summary.add_decision(1, decision(100, [0.1], [0.05]))
    assert "Every decision: artifacts" in summary.markdown("7")
