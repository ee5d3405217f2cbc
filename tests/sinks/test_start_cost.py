"""A controller's start looks at the runs that may still have something to ship, not at
every run ever journaled; a run reopened since is looked at again. Real shipper
processes, a real ``mlflow server``."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from sinks_helpers import FAST, MlflowServer, drive, mlflow_run_id, run_info

from lrctl.sinks import AuditSink, _ship_state
from lrctl.sinks.journal import RunPaths


def _counting_reads(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """The files ``runs_behind`` reads (meta, cursor), as it reads them."""
    read: list[Path] = []
    real = _ship_state.read_json

    def counted(path: Path, *args: object, **kwargs: object) -> object:
        read.append(Path(path))
        return real(path, *args, **kwargs)  # type: ignore[arg-type]
    monkeypatch.setattr(_ship_state, "read_json", counted)
    return read


def test_runs_that_ended_shipped_cost_a_start_no_reads(
        mlflow_server: MlflowServer, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A soak test's find: 7 680 ended runs took a start 0.46 s (meta, cursor and three
    journal files each, every start). The first start after their end marks them; the
    next reads nothing of them."""
    state = tmp_path / "state"
    sink = AuditSink(state, FAST, env={})
    for key in ("done-a", "done-b", "open-c"):
        sink.open_run(run_info(key, tracking_uri=mlflow_server.uri))
        drive(sink, key, range(0, 30), [0.1, 0.01])
    sink.close_run("done-a")
    sink.close_run("done-b")
    assert sink.flush(60)
    sink.close()  # open-c stays open: a job that comes back

    AuditSink(state, FAST, env={}).close()  # the start after their end: marked
    read = _counting_reads(monkeypatch)
    AuditSink(state, FAST, env={}).close()
    assert {p.parent.name for p in read} == {"open-c"}, read


def test_a_marked_run_reopened_and_journaled_unshipped_is_shipped_by_the_next_start(
        mlflow_server: MlflowServer, tmp_path: Path) -> None:
    """The mark never hides a run that has lines to ship: a resumed run whose controller
    journaled without shipping (here, no MLflow at all) is shipped by the next start."""
    state = tmp_path / "state"
    sink = AuditSink(state, FAST, env={})
    sink.open_run(run_info("back", tracking_uri=mlflow_server.uri))
    lrs = drive(sink, "back", range(0, 30), [0.1, 0.01])
    sink.close_run("back")
    assert sink.flush(60)
    sink.close()
    AuditSink(state, FAST, env={}).close()  # marked
    assert (RunPaths.of(state, "back").root / _ship_state.SHIPPED).exists()

    journal_only = AuditSink(state, dataclasses.replace(FAST, mlflow=False), env={})
    journal_only.open_run(run_info("back", tracking_uri=mlflow_server.uri))
    drive(journal_only, "back", range(30, 60), lrs)
    journal_only.close_run("back")
    journal_only.close()

    sink = AuditSink(state, FAST, env={})
    assert sink.flush(60)
    sink.close()
    history = MlflowClient(mlflow_server.uri).get_metric_history(
        mlflow_run_id(state, "back"), "lrctl/loss")
    assert max(m.step for m in history) == 59
