"""Many short runs through one shipper (issue #18, the churn arm): the audit trail of
every run first, the timeline pictures after it, nothing kept of the runs that ended
once they are shipped, and the controller first for the CPU."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Any

from mlflow.tracking import MlflowClient
from sinks_helpers import (
    FAST,
    GatedClient,
    assert_exactly_once,
    drive,
    mlflow_run_id,
    run_info,
)

from lrctl.sinks import AuditSettings, AuditSink
from lrctl.sinks._ship_state import TIMELINE_DUE, runs_behind
from lrctl.sinks.journal import RunPaths, read_json
from lrctl.sinks.mlflow_sink import MlflowShipper
from lrctl.sinks.shipper_proc import NICE
from lrctl.sinks.shipper_proxy import ShipperProcess

JOURNAL_ONLY = AuditSettings(log_every=10, mlflow=False)
KEYS = ("c1", "c2", "c3", "c4")


def _sqlite(workdir: Path) -> str:
    return f"sqlite:///{workdir / 'mlflow.db'}"


def _journal_ended_runs(state: Path, workdir: Path) -> None:
    """Runs journaled and ended by a controller whose MLflow was off: a backlog."""
    sink = AuditSink(state, JOURNAL_ONLY, env={"MLFLOW_TRACKING_URI": _sqlite(workdir)})
    for key in KEYS:
        sink.open_run(run_info(key, cwd=str(workdir)))
        drive(sink, key, range(120), [0.1, 0.01], every=29)
        sink.close_run(key)
    sink.close()


def _timeline_uploads(client: GatedClient) -> list[int]:
    return [i for i, (name, args, _) in enumerate(client.calls)
            if name == "log_artifact" and str(args[1]).endswith("timeline.png")]


def test_pictures_are_drawn_once_every_runs_audit_trail_is_in_mlflow(
        workdir: Path, tmp_path: Path) -> None:
    state = tmp_path / "state"
    _journal_ended_runs(state, workdir)
    client = GatedClient(_sqlite(workdir))
    opened = threading.Event()

    def factory(uri: str) -> Any:
        opened.wait(30)  # every run attended before the worker looks at any
        return client

    shipper = MlflowShipper(state, flush_interval=0.2, backoff_max=0.5, timeline=True,
                            client_factory=factory)
    assert sorted(shipper.recover()) == sorted(KEYS)
    opened.set()
    assert shipper.flush(120)
    shipper.close()

    ended = [i for i, (name, _, _) in enumerate(client.calls) if name == "set_terminated"]
    pictures = _timeline_uploads(client)
    assert len(ended) == len(pictures) == len(KEYS)
    # Before, each run's picture (a few hundred ms of CPU) came before its end, and
    # every other run's decisions waited behind it.
    assert max(ended) < min(pictures)
    for key in KEYS:
        run_id = mlflow_run_id(state, key)
        assert_exactly_once(client.real, run_id, state, key, tmp_path / key)
        artifacts = {a.path for a in client.real.list_artifacts(run_id, "lrctl")}
        assert "lrctl/timeline.png" in artifacts
        assert TIMELINE_DUE not in read_json(RunPaths.of(state, key).cursor)


class _NoUploads(GatedClient):
    """MLflow that takes everything but files (``log_artifact`` fails, as a full disk
    under the artifact store would)."""

    def __getattr__(self, name: str) -> Any:
        if name == "log_artifact":
            def fail(*args: Any, **kwargs: Any) -> Any:
                raise OSError("no space left on device (test)")
            return fail
        return super().__getattr__(name)


def test_a_picture_still_due_when_the_shipper_stops_is_drawn_by_the_next_one(
        workdir: Path, tmp_path: Path) -> None:
    state = tmp_path / "state"
    _journal_ended_runs(state, workdir)
    first = MlflowShipper(state, flush_interval=0.2, backoff_max=0.2, timeline=True,
                          client_factory=lambda uri: _NoUploads(uri))
    first.recover()
    deadline = time.monotonic() + 120
    while not all(read_json(RunPaths.of(state, k).cursor, {}).get("finished") for k in KEYS):
        assert time.monotonic() < deadline, "the runs were never shipped"
        time.sleep(0.05)
    assert not first.flush(0.5)  # the pictures are still to come
    first.close(timeout=0.2)
    for key in KEYS:
        assert read_json(RunPaths.of(state, key).cursor)[TIMELINE_DUE]
        assert MlflowClient(_sqlite(workdir)).get_run(
            mlflow_run_id(state, key)).info.status == "FINISHED"
    assert sorted(k for k, _ in runs_behind(state)) == sorted(KEYS)  # for the next one

    client = GatedClient(_sqlite(workdir))
    second = MlflowShipper(state, flush_interval=0.2, backoff_max=0.2, timeline=True,
                           client_factory=lambda uri: client)
    assert sorted(second.recover()) == sorted(KEYS)
    assert second.flush(120)
    second.close()
    assert len(_timeline_uploads(client)) == len(KEYS)
    assert not [c for c in client.calls if c[0] in ("log_batch", "set_terminated")]
    assert runs_behind(state) == []
    for key in KEYS:
        assert_exactly_once(client.real, mlflow_run_id(state, key), state, key, tmp_path / key)


class _HeldPictures(GatedClient):
    """MLflow whose file uploads (``log_artifact``: the pictures) wait for ``pictures``."""

    def __init__(self, uri: str) -> None:
        super().__init__(uri)
        self.pictures = threading.Event()
        self.picture_waits = threading.Event()

    def __getattr__(self, name: str) -> Any:
        call = super().__getattr__(name)
        if name != "log_artifact":
            return call

        def held(*args: Any, **kwargs: Any) -> Any:
            self.picture_waits.set()
            assert self.pictures.wait(60)
            return call(*args, **kwargs)
        return held


def test_ended_runs_whose_picture_waits_are_held_by_their_key_alone(
        workdir: Path, tmp_path: Path) -> None:
    """Under a load that keeps the worker shipping, pictures wait (a round that ships
    nothing draws one): a run kept whole meanwhile (its meta and cursor) made a busy
    shipper grow by every run that ended (~20 KiB each in the churn bench). The runs
    behind the picture being drawn wait as keys, are read again when their turn comes,
    and each gets its picture once."""
    state = tmp_path / "state"
    _journal_ended_runs(state, workdir)
    client = _HeldPictures(_sqlite(workdir))
    shipper = MlflowShipper(state, flush_interval=0.2, backoff_max=0.5, timeline=True,
                            client_factory=lambda uri: client)
    try:
        assert sorted(shipper.recover()) == sorted(KEYS)
        assert client.picture_waits.wait(120)  # the first picture, every run shipped
        (worker,) = shipper._workers.values()
        drawn = list(worker._runs)  # (the worker waits in the upload: nothing moves)
        assert len(drawn) == 1 and sorted([*drawn, *worker._pictures]) == sorted(KEYS)
        client.pictures.set()
        assert shipper.flush(120)
        assert not worker._pictures
        deadline = time.monotonic() + 60
        while worker._runs:  # the last one drawn is let go at the round after its picture
            assert time.monotonic() < deadline, f"{list(worker._runs)} still held"
            time.sleep(0.05)
    finally:
        client.pictures.set()
        shipper.close()
    assert sorted(args[0] for name, args, _ in client.calls if name == "log_artifact") == \
        sorted(mlflow_run_id(state, key) for key in KEYS)  # each picture once
    for key in KEYS:
        assert TIMELINE_DUE not in read_json(RunPaths.of(state, key).cursor)
        assert_exactly_once(client.real, mlflow_run_id(state, key), state, key, tmp_path / key)


def test_the_controllers_shipper_forgets_runs_that_ended_once_they_are_shipped(
        workdir: Path, tmp_path: Path) -> None:
    state = tmp_path / "state"
    shipper = ShipperProcess(state, flush_interval=0.2, timeline=False, backoff_max=0.5)
    sink = AuditSink(state, FAST, shipper=shipper, env={"MLFLOW_TRACKING_URI": _sqlite(workdir)})
    try:
        for key in (*KEYS, "open"):
            sink.open_run(run_info(key, cwd=str(workdir)))
            drive(sink, key, range(80), [0.1, 0.01], every=19)
        for key in KEYS:
            sink.close_run(key)
        assert sink.flush(120)
        deadline = time.monotonic() + 60
        while shipper.routes() > 1:  # the child says so just after it acknowledged
            assert time.monotonic() < deadline, f"{shipper.routes()} runs still routed"
            time.sleep(0.05)

        # An ended run that comes back is routed (and shipped) again, then forgotten.
        sink.open_run(run_info("c1", cwd=str(workdir)))
        assert shipper.routes() == 2
        drive(sink, "c1", range(80, 160), [0.025, 0.0025], every=19)
        sink.close_run("c1")
        sink.close_run("open")
        assert sink.flush(120)
        while shipper.routes():
            assert time.monotonic() < deadline + 60, f"{shipper.routes()} runs still routed"
            time.sleep(0.05)
    finally:
        sink.close()
    client = MlflowClient(_sqlite(workdir))
    for key in (*KEYS, "open"):
        assert_exactly_once(client, mlflow_run_id(state, key), state, key, tmp_path / key)
        assert client.get_run(mlflow_run_id(state, key)).info.status == "FINISHED"


def test_the_shipper_yields_the_cpu_to_the_controller(workdir: Path, tmp_path: Path) -> None:
    shipper = ShipperProcess(tmp_path / "state", flush_interval=0.2, timeline=False)
    try:
        shipper.attend("y1", _sqlite(workdir))  # the child starts with the first run
        deadline = time.monotonic() + 60
        while shipper.status()["pid"] is None:
            assert time.monotonic() < deadline, "the shipper never started"
            time.sleep(0.05)
        pid, want = shipper.status()["pid"], min(19, os.nice(0) + NICE)
        while True:  # the child lowers its priority first thing, before it loads mlflow
            with open(f"/proc/{pid}/stat") as f:
                nice = int(f.read().rsplit(")", 1)[1].split()[16])
            if nice == want:
                break
            assert time.monotonic() < deadline, f"the shipper's nice is {nice}, not {want}"
            time.sleep(0.05)
    finally:
        shipper.close(timeout=5.0)
