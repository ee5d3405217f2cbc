"""After a controller crash the hook replays observations and the engine re-makes
their decisions: the journal must keep each decision once."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from sinks_helpers import run_info

from lrctl.sinks.audit import AuditSettings, AuditSink
from lrctl.sinks.journal import RunPaths

JOURNAL_ONLY = AuditSettings(log_every=1, mlflow=False)


def decision(step: int, action: str = "reduce") -> dict[str, object]:
    return {"step": step, "policy": "plateau", "kind": "plateau", "action": action,
            "old_lrs": [0.1], "new_lrs": [0.05], "reason": "test", "evidence": {}}


def journal(state: Path, key: str, stream: str) -> list[dict[str, object]]:
    path = RunPaths.of(state, key).stream(stream)
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_replayed_decisions_and_observations_are_journaled_once(tmp_path: Path) -> None:
    state = tmp_path / "state"
    info = run_info("run-a")
    first = AuditSink(state, JOURNAL_ONLY)
    first.open_run(info)
    for step in range(6):
        first.observation("run-a", step, 1.0, 1.0, [0.1])
    first.decision("run-a", decision(4))
    first.decision("run-a", decision(5, "skip"))
    first.close()  # the controller dies here; its checkpoint was at step 2

    second = AuditSink(state, JOURNAL_ONLY)
    second.open_run(info)
    for step in range(3, 8):  # the hook replays 3..5, then goes on
        second.observation("run-a", step, 1.0, 1.0, [0.1])
    second.decision("run-a", decision(4))
    second.decision("run-a", decision(5, "skip"))
    second.decision("run-a", decision(5, "backoff"))  # new at an already-seen step
    second.decision("run-a", decision(7))
    second.close()

    got = [(r["step"], r["action"]) for r in journal(state, "run-a", "decisions")]
    assert got == [(4, "reduce"), (5, "skip"), (5, "backoff"), (7, "reduce")]
    steps = sorted({p[2] for line in journal(state, "run-a", "metrics") for p in line["points"]})
    assert steps == list(range(8))


def test_reloads_at_one_step_are_each_journaled_once(tmp_path: Path) -> None:
    """Three reloads between two observations (the second and third of the same file: a
    watcher's and an operator's, say) are three decisions, as the hook was told; a
    controller restarted that hands the journal the same records at that step again (a
    replay) adds none."""
    state = tmp_path / "state"
    for _ in range(2):  # the second life replays the first's
        sink = AuditSink(state, JOURNAL_ONLY)
        sink.open_run(run_info("run-b"))
        for sha in ("aaa", "bbb", "bbb"):
            sink.decision("run-b", {**decision(3, "reload"), "policy": "reload",
                                    "evidence": {"old_sha256": "x", "new_sha256": sha}})
        sink.close()
    got = [r["evidence"]["new_sha256"] for r in journal(state, "run-b", "decisions")]
    assert got == ["aaa", "bbb", "bbb"]


def test_operator_actions_between_two_observations_are_each_journaled(
        tmp_path: Path) -> None:
    """A set-lr of 0.05 then of 0.02, a pause, a resume and a pause again, all at one
    step: each is a decision of its own (before, each after the first of its action was
    dropped as its replay), and a restarted controller's replay of the step's policy
    decision before them adds nothing."""
    state = tmp_path / "state"
    ops = [("set_lr", [0.05]), ("set_lr", [0.02]), ("pause", [0.02]), ("resume", [0.02]),
           ("pause", [0.02])]
    sink = AuditSink(state, JOURNAL_ONLY)
    sink.open_run(run_info("run-c"))
    sink.decision("run-c", decision(3))
    for action, lrs in ops:
        sink.decision("run-c", {**decision(3, action), "policy": "operator", "new_lrs": lrs})
    sink.close()
    again = AuditSink(state, JOURNAL_ONLY)
    again.open_run(run_info("run-c"))
    again.decision("run-c", decision(3))  # replayed: the observation's own decision
    again.decision("run-c", {**decision(3, "set_lr"), "policy": "operator",
                             "new_lrs": [0.01]})  # a new action at that step
    again.close()
    got = [(r["action"], r["new_lrs"]) for r in journal(state, "run-c", "decisions")]
    assert got == [("reduce", [0.05]), *((a, lrs) for a, lrs in ops), ("set_lr", [0.01])]


def test_a_correction_of_the_last_steps_lrs_is_journaled_later_and_not_as_a_replay(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A sync hook's late step (it ran without its answer): its LR points again, in a
    metrics line of a later time than the first even within one millisecond (MLflow keeps
    a step's latest value by time), and the hook's ``not_applied`` record journaled beside
    the decisions it amends, not taken for a replay of them."""
    state = tmp_path / "state"
    sink = AuditSink(state, AuditSettings(log_every=50, mlflow=False))
    sink.open_run(run_info("run-a"))
    now = time.time()
    monkeypatch.setattr(time, "time", lambda: now)  # every line in one millisecond
    for step in range(6):
        sink.observation("run-a", step, 1.0, 1.0, [0.1] if step < 5 else [0.05])
    sink.decision("run-a", decision(5, "skip"))
    sink.decision("run-a", decision(5, "backoff"))
    sink.lr_ran("run-a", 4, [0.2])  # not the last observed step: nothing
    sink.lr_ran("run-a", 5, [0.1])
    sink.decision("run-a", {**decision(5, "not_applied"), "policy": "hook", "kind": "hook",
                            "old_lrs": [0.05], "new_lrs": [0.05]})
    sink.close()
    lines = journal(state, "run-a", "metrics")
    fives = [(line["ts"], p[1]) for line in lines for p in line["points"]
             if p[0] == "lrctl/lr/g0" and p[2] == 5]
    assert [v for _, v in fives] == [0.05, 0.1] and fives[0][0] < fives[1][0]
    assert not any(p[2] == 4 and p[1] == 0.2 for line in lines for p in line["points"])
    actions = [(d["step"], d["action"]) for d in journal(state, "run-a", "decisions")]
    assert actions == [(5, "skip"), (5, "backoff"), (5, "not_applied")]
