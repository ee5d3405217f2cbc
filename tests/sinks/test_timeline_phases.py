"""The timeline shows a WSD run's phases: read back from the journal a run wrote."""

from __future__ import annotations

import time
from pathlib import Path

from sinks_helpers import run_info

import lrctl
from lrctl.sinks import AuditSettings, AuditSink
from lrctl.sinks.journal import RunPaths
from lrctl.timeline import Phase, load_timeline, phase_spans, render

POLICY = {"version": 1, "policies": [
    {"kind": "wsd", "warmup_steps": 10, "start_on": "operator"},
    {"kind": "earlystop", "metric": "loss", "patience": 5}]}


def journal_a_run(state: Path) -> Path:
    """40 stable steps, an operator cooldown cancelled after 5, another that finishes,
    then a flat loss that early stopping stops: all journaled as the controller does."""
    sink = AuditSink(state, AuditSettings(log_every=1, mlflow=False))
    sink.open_run(run_info("run-wsd1", cwd=str(state)))
    engine = lrctl.load_policy(POLICY, [0.1, 0.01])

    def record(decisions: list[lrctl.Decision]) -> None:
        for d in decisions:
            sink.decision("run-wsd1", {**d.to_dict(), "wall_time": time.time()})

    for t in range(120):
        loss = 2.0 / (1 + t) if t < 100 else 1.0
        sink.observation("run-wsd1", t, loss, 1.0, engine.applied_lrs)
        engine.observe(t, loss)
        record(engine.last_decisions)
        if t == 39:
            record(engine.command("decay", steps=20))
        if t == 44:
            record(engine.command("cancel"))
        if t == 59:
            record(engine.command("decay", steps=20))
    assert engine.should_stop
    sink.close_run("run-wsd1")
    sink.close()
    return RunPaths.of(state, "run-wsd1").root


def test_phases_come_back_from_the_journal(tmp_path: Path) -> None:
    data = load_timeline(journal_a_run(tmp_path / "state"))
    assert phase_spans(data.phase_events, data.last_step) == [
        Phase("warmup", 0, 10), Phase("cooldown (operator), cancelled", 40, 45),
        Phase("cooldown (operator)", 60, 79)]
    stops = [r for r in data.phase_events if r["action"] == "stop"]
    assert len(stops) == 1 and stops[0]["kind"] == "earlystop"
    out = render(data, tmp_path / "t.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_restarted_and_an_unfinished_cooldown() -> None:
    events = [{"kind": "wsd", "action": "decay_start", "step": 9,
               "evidence": {"source": "plateau"}},
              {"kind": "wsd", "action": "decay_start", "step": 19,
               "evidence": {"source": "operator"}}]
    assert phase_spans(events, 50) == [Phase("cooldown (plateau)", 10, 20),
                                       Phase("cooldown (operator)", 20, 51)]
