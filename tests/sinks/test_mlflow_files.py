"""An artifact store that fails costs a run its files for a while, nobody their metrics.

Before: an experiment whose artifact store could not be written (an ``s3://`` root
on a machine without boto3; here also a file where its directory should be) stopped
the MLflow worker as a whole. Not one metric of any run on that tracking URI was
shipped, and MLflow was reported "unavailable". Now the run's metrics, decisions
and tags ship; its files wait, are tried again with back-off, and are uploaded whole
once the store takes them (see ``lrctl.sinks._mlflow_files``). Real sqlite stores.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
import threading
from pathlib import Path
from typing import Any

import pytest
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import TEMPORARILY_UNAVAILABLE
from mlflow.tracking import MlflowClient
from sinks_helpers import FAST, close_for_good, download, drive, journal_decisions, run_info

import lrctl.sinks._mlflow_files
from lrctl.sinks import AuditSink
from lrctl.sinks._ship_state import FILES_DOWN
from lrctl.sinks.journal import RunPaths, read_json
from lrctl.sinks.mlflow_sink import MlflowShipper
from lrctl.sinks.sampling import LOSS

JSONL = "lrctl/decisions.jsonl"


@pytest.fixture(autouse=True)
def _nothing_logged_yet(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test's failures are the first of their kind (their error line is not held
    back by an earlier test's in this process)."""
    monkeypatch.setattr(lrctl.sinks._mlflow_files, "_logged", {})


class _Told:
    """What ``on_files`` was told, in order, with a condition to wait on."""

    def __init__(self) -> None:
        self.told: list[tuple[str, str | None]] = []
        self.cond = threading.Condition()

    def __call__(self, key: str, why: str | None) -> None:
        with self.cond:
            self.told.append((key, why))
            self.cond.notify_all()


@dataclasses.dataclass
class _Store:
    """A sqlite store with an experiment whose artifact store refuses every file (a file
    where its directory should be) until :meth:`repair`."""

    uri: str
    client: MlflowClient
    blocker: Path

    def experiment(self, name: str) -> str:
        return str(self.client.create_experiment(
            name, artifact_location=(self.blocker / "art").as_uri()))

    def repair(self) -> None:
        self.blocker.unlink()


def _refusing_store(workdir: Path, tmp_path: Path,
                    client_type: type[MlflowClient] = MlflowClient) -> _Store:
    uri = f"sqlite:///{workdir / 'mlflow.db'}"
    blocker = tmp_path / "blocker"
    blocker.write_text("not a directory\n")
    return _Store(uri, client_type(uri), blocker)


def _artifacts(client: MlflowClient, run_id: str) -> set[str]:
    out, todo = set(), [""]
    while todo:
        for f in client.list_artifacts(run_id, todo.pop() or None):
            (todo.append if f.is_dir else out.add)(f.path)
    return out


@pytest.mark.parametrize("store", ["a file where its directory should be", "s3 without boto3"])
def test_a_run_whose_artifact_store_fails_ships_its_metrics_and_later_its_files(
        store: str, workdir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    if store == "s3 without boto3" and importlib.util.find_spec("boto3") is not None:
        pytest.skip("boto3 is installed: an s3 root would try the network")
    refusing = _refusing_store(workdir, tmp_path)
    uri, client = refusing.uri, refusing.client
    bad_run = client.create_run(refusing.experiment("bad") if store.startswith("a file")
                                else client.create_experiment("bad", "s3://no-bucket/a"))
    good_run = client.create_run(client.create_experiment("good"))
    state = tmp_path / "state"
    told = _Told()
    shipper = MlflowShipper(state, flush_interval=0.2, backoff_max=0.3, timeline=False,
                            snapshot_interval=3600.0, on_files=told)
    sink = AuditSink(state, FAST, shipper=shipper, env={})
    caplog.set_level(logging.INFO, logger="lrctl.sinks.mlflow")
    try:
        for key, run in (("bad", bad_run), ("good", good_run)):
            sink.open_run(run_info(key, cwd=str(workdir), tracking_uri=uri,
                                   mlflow_run_id=run.info.run_id))
            drive(sink, key, range(100), [0.1, 0.01], every=10)
            sink.close_run(key)
        assert not sink.flush(3)  # the bad run's files wait (at most 0.3 s apart)

        # The good run lost nothing; the bad one everything but its files.
        decisions = journal_decisions(state, "bad")
        assert len(decisions) == 10
        for run in (bad_run, good_run):
            data = client.get_run(run.info.run_id).data
            assert data.tags["lrctl.decisions"] == "10"
            assert len(client.get_metric_history(run.info.run_id, "lrctl/decision")) == 10
            assert len(client.get_metric_history(run.info.run_id, LOSS)) >= 10  # (log_every=10)
            assert data.params["lrctl.policy"] == "policies/default.yaml"
        assert json.loads(download(client, good_run.info.run_id, JSONL, tmp_path / "g")
                          .splitlines()[0]) == journal_decisions(state, "good")[0]
        cursor = read_json(RunPaths.of(state, "bad").cursor)
        why = "NotADirectoryError" if store.startswith("a file") else "ModuleNotFoundError"
        assert why in cursor[FILES_DOWN]
        assert FILES_DOWN not in read_json(RunPaths.of(state, "good").cursor)
        errors = [r for r in caplog.records if "could not store" in r.getMessage()]
        assert len(errors) == 1 and errors[0].exc_info is not None  # once per outage
        # Said of the bad run alone (not of its tracking URI, where the good one ships).
        with told.cond:  # (again when the failing file, and so the reason, changes)
            assert {key for key, _ in told.told} == {"bad"}
            assert all(why in str(said) for _, said in told.told)
        errors = sink.run_errors()
        assert list(errors) == ["bad"] and errors["bad"].startswith(
            "MLflow cannot store its files: ")

        if store == "s3 without boto3":
            return  # nothing here can make an s3 store work
        refusing.repair()  # every file goes up, whole
        assert sink.flush(60)
        bad_id = bad_run.info.run_id
        assert [json.loads(line) for line in download(
            client, bad_id, JSONL, tmp_path / "b").splitlines()] == decisions
        table = json.loads(download(client, bad_id, "lrctl/decisions_table.json",
                                    tmp_path / "t"))
        assert [row[0] for row in table["data"]] == [d["step"] for d in decisions]
        assert {"lrctl/policy.yaml", "lrctl/policy_events.jsonl"} <= _artifacts(client, bad_id)
        assert FILES_DOWN not in read_json(RunPaths.of(state, "bad").cursor)
        assert any("its files are stored in MLflow again" in r.getMessage()
                   for r in caplog.records)
        with told.cond:
            assert told.cond.wait_for(lambda: told.told[-1] == ("bad", None), 10)
        assert sink.run_errors() == {}
    finally:
        sink.close()


def test_files_that_wait_are_tried_again_after_a_restart(
        workdir: Path, tmp_path: Path) -> None:
    """The mark is in the cursor: a controller that stopped while the files waited
    uploads them once the store takes them."""
    refusing = _refusing_store(workdir, tmp_path)
    uri, client = refusing.uri, refusing.client
    run = client.create_run(refusing.experiment("bad"))
    state = tmp_path / "state"

    def sink_of() -> tuple[AuditSink, MlflowShipper]:
        shipper = MlflowShipper(state, flush_interval=0.2, backoff_max=0.3, timeline=False,
                                snapshot_interval=3600.0)
        return AuditSink(state, FAST, shipper=shipper, env={}), shipper

    sink, _ = sink_of()
    sink.open_run(run_info("r", cwd=str(workdir), tracking_uri=uri,
                           mlflow_run_id=run.info.run_id))
    drive(sink, "r", range(50), [0.1], every=10)
    sink.close_run("r")
    assert not sink.flush(2)
    close_for_good(sink)  # (the restarted one ships alone)
    assert FILES_DOWN in read_json(RunPaths.of(state, "r").cursor)
    refusing.repair()
    sink, shipper = sink_of()
    try:
        assert shipper.recover() == ["r"]
        assert sink.flush(60)
    finally:
        sink.close()
    uploaded = download(client, run.info.run_id, JSONL, tmp_path / "d").splitlines()
    assert [json.loads(line) for line in uploaded] == journal_decisions(state, "r")
    assert FILES_DOWN not in read_json(RunPaths.of(state, "r").cursor)


class _FailsOnce(MlflowClient):
    """A real client whose next ``get_run`` fails once ``armed`` (MLflow busy)."""

    armed = False

    def get_run(self, run_id: str) -> Any:
        if self.armed:
            self.armed = False
            raise MlflowException("database is locked (test)", TEMPORARILY_UNAVAILABLE)
        return super().get_run(run_id)


def test_a_retry_that_mlflow_interrupts_leaves_the_files_due_not_lost(
        workdir: Path, tmp_path: Path) -> None:
    """The tracking store fails in the middle of the files' retry: the mark stays (in
    the cursor too), and the next retry stores every file."""
    refusing = _refusing_store(workdir, tmp_path, _FailsOnce)
    uri, client = refusing.uri, refusing.client
    assert isinstance(client, _FailsOnce)
    run = client.create_run(refusing.experiment("bad"))
    state = tmp_path / "state"
    shipper = MlflowShipper(state, flush_interval=0.2, backoff_max=0.3, timeline=False,
                            snapshot_interval=3600.0, client_factory=lambda u: client)
    sink = AuditSink(state, FAST, shipper=shipper, env={})
    try:
        sink.open_run(run_info("r", cwd=str(workdir), tracking_uri=uri,
                               mlflow_run_id=run.info.run_id))
        drive(sink, "r", range(50), [0.1], every=10)
        sink.close_run("r")
        assert not sink.flush(2)
        client.armed = True  # the retry's first look at the run fails
        refusing.repair()
        assert sink.flush(60)
    finally:
        sink.close()
    assert not client.armed  # (it did fail once)
    assert {"lrctl/decisions.jsonl", "lrctl/policy.yaml", "lrctl/policy_events.jsonl",
            "lrctl/decisions_table.json"} <= _artifacts(client, run.info.run_id)
    assert FILES_DOWN not in read_json(RunPaths.of(state, "r").cursor)


def test_a_discarded_run_whose_files_wait_is_let_go(workdir: Path, tmp_path: Path) -> None:
    """A run lrctl made in MLflow, discarded before its first step (its MLflow run
    deleted) while its files were down: it needs no files, and is let go (before: held,
    and its worker never settled)."""
    refusing = _refusing_store(workdir, tmp_path)
    uri = refusing.uri
    refusing.experiment("lrctl")
    state = tmp_path / "state"
    done: list[tuple[Any, ...]] = []
    let_go = threading.Event()
    shipper = MlflowShipper(state, flush_interval=0.2, backoff_max=0.3, timeline=False,
                            on_done=lambda *a: done.append(a) or let_go.set())
    sink = AuditSink(state, FAST, shipper=shipper, env={})
    try:
        sink.open_run(run_info("d", cwd=str(workdir), tracking_uri=uri))
        assert not sink.flush(2)  # its policy file waits
        assert FILES_DOWN in read_json(RunPaths.of(state, "d").cursor)
        sink.discard_run("d")
        assert sink.flush(30)
        assert let_go.wait(30)  # (at the worker's next round)
    finally:
        sink.close()
    cursor = read_json(RunPaths.of(state, "d").cursor)
    assert cursor["ended"] == "DELETED" and FILES_DOWN not in cursor
    assert [key for key, *_ in done] == ["d"]
