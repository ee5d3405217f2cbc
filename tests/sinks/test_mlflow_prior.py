"""An MLflow run that another journal shipped into first keeps that journal's decisions.

The decisions files are whole files uploaded from the journal; a run continued from
another controller's state directory ships a journal that begins there. Its first
upload now keeps what the MLflow run held before (see ``lrctl.sinks._mlflow_prior``):
looked at once, at the cost of one listing when there is nothing, kept beside the
journal so that a re-ship uploads the same bytes. Real sqlite stores.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

import pytest
from mlflow.tracking import MlflowClient
from sinks_helpers import (
    FAST,
    GatedClient,
    close_for_good,
    decision,
    download,
    drive,
    run_info,
)

import lrctl.timeline
from lrctl.sinks import AuditSink
from lrctl.sinks.journal import RunPaths, atomic_write_json, read_json, read_lines
from lrctl.sinks.mlflow_sink import MlflowShipper

JSONL = "lrctl/decisions.jsonl"


def sqlite_uri(cwd: Path) -> str:
    return f"sqlite:///{cwd / 'mlflow.db'}"


def _sink(state: Path, client: Any, settings: Any = FAST) -> AuditSink:
    shipper = MlflowShipper(state, flush_interval=0.2, backoff_max=0.2,
                            snapshot_interval=3600.0, client_factory=lambda uri: client)
    return AuditSink(state, settings, shipper=shipper, env={})


def _ship(state: Path, client: Any, uri: str, run_id: str, steps: range, *,
          settings: Any = FAST, end: bool = True) -> None:
    """One controller's part of the run: its own journal, into MLflow run ``run_id``."""
    sink = _sink(state, client, settings)
    sink.open_run(run_info("m1", cwd=str(state.parent), tracking_uri=uri,
                           mlflow_run_id=run_id))
    drive(sink, "m1", steps, [0.1, 0.01], every=10)
    if end:
        sink.close_run("m1")
    assert sink.flush(60)
    close_for_good(sink)  # (the next part's sink ships alone, as after a restart)


def _journal(state: Path) -> list[dict[str, Any]]:
    return [line.record for line in read_lines(RunPaths.of(state, "m1").stream("decisions"))]


def _uploaded(client: MlflowClient, run_id: str, tmp: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in download(client, run_id, JSONL, tmp).splitlines()]


def _calls(client: GatedClient, name: str) -> int:
    return sum(1 for called, _, _ in client.calls if called == name)


def test_a_run_with_nothing_before_costs_one_listing(workdir: Path, tmp_path: Path) -> None:
    uri = sqlite_uri(workdir)
    client = GatedClient(uri)
    run_id = client.real.create_run(client.real.create_experiment("script")).info.run_id
    state = tmp_path / "state"
    _ship(state, client, uri, run_id, range(100), end=False)  # many flushes, one run
    _ship(state, client, uri, run_id, range(100, 200))  # its controller restarted
    assert _calls(client, "list_artifacts") == 1
    assert _calls(client, "download_artifacts") == 0
    assert _uploaded(client.real, run_id, tmp_path) == _journal(state)
    assert not list(RunPaths.of(state, "m1").root.glob("prior-*"))


def test_the_second_journal_keeps_the_first_ones_records_once_and_reships_the_same(
        workdir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    uri = sqlite_uri(workdir)
    real = MlflowClient(uri)
    run_id = real.create_run(real.create_experiment("script")).info.run_id
    first, second = tmp_path / "a" / "state", tmp_path / "b" / "state"
    _ship(first, GatedClient(uri), uri, run_id, range(50), end=False)
    before = _journal(first)
    assert _uploaded(real, run_id, tmp_path / "d1") == before and len(before) == 5
    # The file as something else left it: a torn line, bytes that are no text, a list,
    # a decision whose step is no number.
    lines = download(real, run_id, JSONL, tmp_path / "d2").encode().splitlines()
    damaged = tmp_path / "damaged" / "decisions.jsonl"
    damaged.parent.mkdir()
    damaged.write_bytes(b"\n".join([*lines[:2], b'{"seq": 3, "step', b"[1, 2]",
                                    b'{"step": "x"}', *lines[2:],
                                    b"\xff\xfe", b""]))
    real.log_artifact(run_id, str(damaged), "lrctl")

    drawn: list[lrctl.timeline.TimelineData] = []
    render = lrctl.timeline.render
    monkeypatch.setattr(lrctl.timeline, "render",
                        lambda data, *a, **k: drawn.append(data) or render(data, *a, **k))
    flaky = _Flaky(uri, fail=2)  # MLflow fails twice while the run is looked at: retried
    caplog.set_level(logging.INFO, logger="lrctl.sinks.mlflow")
    _ship(second, flaky, uri, run_id, range(50, 120),
          settings=dataclasses.replace(FAST, timeline=True))
    after = _journal(second)
    assert _uploaded(real, run_id, tmp_path / "d3") == before + after
    table = json.loads(download(real, run_id, "lrctl/decisions_table.json", tmp_path / "d4"))
    assert [row[0] for row in table["data"]] == [r["step"] for r in before + after]
    assert real.get_run(run_id).data.tags["lrctl.decisions"] == str(len(before + after))
    assert [r.message for r in caplog.records].count(
        "lrctl: run m1: 4 line(s) of lrctl/decisions.jsonl in MLflow run "
        f"{run_id} are not lrctl records; the 5 that are were kept") == 1
    assert flaky.failed == 2 and _calls(flaky, "download_artifacts") == 2  # the two files
    # The picture: both journals' decisions marked, MLflow's points before the second's.
    assert [d["step"] for d in drawn[-1].decisions] == [r["step"] for r in before + after]
    assert drawn[-1].loss.points()[0][0] == 0

    # Uploaded again from an old snapshot offset (a crash before the cursor was saved):
    # the same bytes, from the prior records kept beside the journal, not looked up again.
    data = download(real, run_id, JSONL, tmp_path / "d5")
    paths = RunPaths.of(second, "m1")
    [kept] = paths.root.glob("prior-*-decisions.jsonl")
    assert kept.stat().st_mode & 0o777 == 0o600
    cursor = read_json(paths.cursor)
    cursor["snapshot"] = {"offset": 0, "at": 0.0}
    cursor.pop("finished")
    atomic_write_json(paths.cursor, cursor)
    again = GatedClient(uri)
    sink = _sink(second, again)
    assert sink.flush(60)
    sink.close()
    assert len(again.uploads(JSONL)) == 1
    assert download(real, run_id, JSONL, tmp_path / "d6") == data
    assert _calls(again, "list_artifacts") == _calls(again, "download_artifacts") == 0


def test_a_journal_that_shipped_there_before_is_told_apart(workdir: Path,
                                                           tmp_path: Path) -> None:
    """Its cursor lost after it uploaded: the MLflow run is looked at again, and what is
    this journal's own is not taken for another's (no record twice)."""
    uri = sqlite_uri(workdir)
    real = MlflowClient(uri)
    run_id = real.create_run(real.create_experiment("script")).info.run_id
    state = tmp_path / "state"
    _ship(state, GatedClient(uri), uri, run_id, range(60))
    RunPaths.of(state, "m1").cursor.unlink()
    sink = _sink(state, GatedClient(uri))  # replays the journal whole, on its own
    assert sink.flush(60)
    sink.close()
    assert _uploaded(real, run_id, tmp_path) == _journal(state)
    assert real.get_run(run_id).data.tags["lrctl.decisions"] == "6"


class _Flaky(GatedClient):
    """A client whose ``download_artifacts`` fails ``fail`` times, as a server that is
    down does."""

    def __init__(self, uri: str, fail: int) -> None:
        super().__init__(uri)
        self.fail = fail
        self.failed = 0

    def __getattr__(self, name: str) -> Any:
        call = super().__getattr__(name)
        if name != "download_artifacts":
            return call

        def flaky(*args: Any, **kwargs: Any) -> Any:
            if self.failed < self.fail:
                self.failed += 1
                raise OSError("connection refused (test)")
            return call(*args, **kwargs)
        return flaky


def test_prior_decisions_come_first_in_the_description(workdir: Path, tmp_path: Path) -> None:
    uri = sqlite_uri(workdir)
    real = MlflowClient(uri)
    run_id = real.create_run(real.create_experiment("script")).info.run_id
    first, second = tmp_path / "a" / "state", tmp_path / "b" / "state"
    sink = _sink(first, GatedClient(uri))
    sink.open_run(run_info("m1", cwd=str(workdir), tracking_uri=uri, mlflow_run_id=run_id))
    sink.decision("m1", decision(5, [0.1, 0.01], [0.05, 0.005], reason="before the move"))
    assert sink.flush(60)
    sink.close()
    sink = _sink(second, GatedClient(uri))
    sink.open_run(run_info("m1", cwd=str(workdir), tracking_uri=uri, mlflow_run_id=run_id))
    sink.decision("m1", decision(9, [0.05, 0.005], [0.025, 0.0025], reason="after the move"))
    sink.close_run("m1")
    assert sink.flush(60)
    sink.close()
    note = real.get_run(run_id).data.tags["mlflow.note.content"]
    assert " · 2 decisions: 2 reduce · " in note.splitlines()[0]
    rows = [line for line in note.splitlines() if line.startswith("| ") and "move" in line]
    assert rows == ["| 9 | plateau | reduce | 0.05 → 0.025 | after the move |",
                    "| 5 | plateau | reduce | 0.1 → 0.05 | before the move |"]
