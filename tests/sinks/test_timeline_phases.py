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


def test_non_finite_points_are_drawn_on_a_log_scaled_axis() -> None:
    # A loss that blew up before its NaN (the usual way) puts the axis on a log scale;
    # the markers were plotted at y = 0 there, off the axis: the legend said
    # "non-finite" and the picture showed none.
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lrctl.sinks.sampling import Downsampler
    from lrctl.timeline import _series

    series = Downsampler()
    for x, y in [(0, 2.0), (1, 1.0), (2, 1e6), (3, float("nan")), (4, float("inf"))]:
        series.add(x, y)
    fig, ax = plt.subplots()
    try:
        _series(ax, series, "loss", "tab:blue")
        assert ax.get_yscale() == "log"
        [marks] = [line for line in ax.get_lines() if line.get_label() == "non-finite"]
        fig.canvas.draw()
        shown = marks.get_transform().transform(marks.get_xydata())
        box = ax.get_window_extent()
        assert len(shown) == 2
        for px, py in shown:
            assert box.x0 <= px <= box.x1 and box.y0 <= py <= box.y1
    finally:
        plt.close(fig)
