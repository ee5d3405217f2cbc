"""Many short runs through one shipper (issue #18, the churn arm): the audit trail of
every run first, the timeline pictures after it, nothing kept of the runs that ended
once they are shipped, and the controller first for the CPU."""

from __future__ import annotations

import errno
import os
import shutil
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

from lrctl.sinks import AuditSettings, AuditSink, _run_files
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


class _DownAtFirstPicture(GatedClient):
    """MLflow that goes down as a whole (every call fails) at the first picture upload;
    every call tried is counted (``attempts``: when, which, of which run)."""

    def __init__(self, uri: str) -> None:
        super().__init__(uri)
        self.attempts: list[tuple[float, str, Any]] = []

    def __getattr__(self, name: str) -> Any:
        call = super().__getattr__(name)

        def counted(*args: Any, **kwargs: Any) -> Any:
            self.attempts.append((time.monotonic(), name, args[0] if args else None))
            if name == "log_artifact":
                self.down = True
            return call(*args, **kwargs)
        return counted


def test_a_parked_picture_backs_off_while_mlflow_is_down(
        workdir: Path, tmp_path: Path) -> None:
    """A parked run read again had its streams "behind": after a picture that failed in an
    outage, a shipping round with no MLflow call "succeeded", which reset the picture's
    back-off and said MLflow was available again, at every try (every 0.6 s, its failures
    back at 0 each time). Now its failures count up, as a run held whole did, and MLflow
    stays down until it answers."""
    state = tmp_path / "state"
    _journal_ended_runs(state, workdir)
    client = _DownAtFirstPicture(_sqlite(workdir))
    states: list[str | None] = []
    shipper = MlflowShipper(state, flush_interval=0.2, backoff_max=2.0, timeline=True,
                            client_factory=lambda uri: client,
                            on_state=lambda uri, why: states.append(why))
    try:
        shipper.recover()
        (worker,) = shipper._workers.values()
        deadline = time.monotonic() + 60
        # (failures 3: tries after 0.5 and 1 s of back-off, the third due 2 s later)
        while not any(failures >= 3 for failures, _ in dict(worker._pictures).values()):
            assert time.monotonic() < deadline, f"no picture backed off: {states[:6]}"
            time.sleep(0.05)
    finally:
        shipper.close(timeout=0.5)
    assert client.down
    assert states and None not in states, states  # down all along, never "available again"


def test_a_parked_run_that_cannot_be_read_again_does_not_put_the_worker_down(
        workdir: Path, tmp_path: Path) -> None:
    """The cursor of a parked run read again as damaged (here: out of descriptors, which
    ``read_json`` takes for damage) was drawn all the same: a KeyError out of the round put
    every run of the tracking URI down ("MLflow unavailable: KeyError: 'run_id'"). Now it is
    handled as at a first read, alone; its cursor is left as it was, for the next shipper."""
    state = tmp_path / "state"
    _journal_ended_runs(state, workdir)
    client = _HeldPictures(_sqlite(workdir))
    done: list[tuple[str, int, bool]] = []
    states: list[str | None] = []
    shipper = MlflowShipper(state, flush_interval=0.2, backoff_max=0.5, timeline=True,
                            client_factory=lambda uri: client,
                            on_done=lambda key, seq, failed: done.append((key, seq, failed)),
                            on_state=lambda uri, why: states.append(why))
    real, failed_once = _run_files.read_regular, []

    def flaky(path: Any, *args: Any, **kwargs: Any) -> Any:
        if Path(path).name == "cursor.json" and client.pictures.is_set() and not failed_once:
            failed_once.append(Path(path).parent.name)
            raise OSError(errno.EMFILE, "Too many open files")
        return real(path, *args, **kwargs)

    _run_files.read_regular = flaky
    try:
        shipper.recover()
        assert client.picture_waits.wait(120)  # the others parked behind it
        client.pictures.set()  # the next one read again fails
        deadline = time.monotonic() + 120
        while len(done) < len(KEYS):
            assert time.monotonic() < deadline, done
            time.sleep(0.05)
    finally:
        _run_files.read_regular = real
        client.pictures.set()
        shipper.close()
    (unread,) = failed_once
    assert states == []  # MLflow was never said to be unavailable
    assert sorted(key for key, _, _ in done) == sorted(KEYS)  # once each
    assert [key for key, _, failed in done if failed] == [unread]
    assert read_json(RunPaths.of(state, unread).cursor)[TIMELINE_DUE]  # the next one draws it
    for key in set(KEYS) - {unread}:
        assert TIMELINE_DUE not in read_json(RunPaths.of(state, key).cursor)


def test_a_parked_run_whose_journal_is_gone_is_let_go(workdir: Path, tmp_path: Path) -> None:
    """A parked run's folder deleted from outside while its picture waits: read again it
    looked new, and was shipped afresh into an MLflow run of its own, its cursor's save
    failing ever after. Now it is let go (done, as a run given up on) and no MLflow run
    is made for it; the others get their pictures."""
    state = tmp_path / "state"
    _journal_ended_runs(state, workdir)
    client = _HeldPictures(_sqlite(workdir))
    done: list[tuple[str, int, bool]] = []
    shipper = MlflowShipper(state, flush_interval=0.2, backoff_max=0.5, timeline=True,
                            client_factory=lambda uri: client,
                            on_done=lambda key, seq, failed: done.append((key, seq, failed)))
    try:
        shipper.recover()
        assert client.picture_waits.wait(120)
        (worker,) = shipper._workers.values()
        gone = next(iter(worker._pictures))
        run_ids = {key: mlflow_run_id(state, key) for key in KEYS}
        shutil.rmtree(RunPaths.of(state, gone).root)
        client.pictures.set()
        deadline = time.monotonic() + 120
        while len(done) < len(KEYS):
            assert time.monotonic() < deadline, done
            time.sleep(0.05)
    finally:
        client.pictures.set()
        shipper.close()
    assert (gone, 0, True) in done and sorted(k for k, _, _ in done) == sorted(KEYS)
    runs = client.real.search_runs([client.real.get_run(run_ids[gone]).info.experiment_id])
    assert sorted(r.info.run_id for r in runs) == sorted(run_ids.values())  # no new one
    drawn = sorted(args[0] for name, args, _ in client.calls if name == "log_artifact")
    assert drawn == sorted(run_ids[k] for k in KEYS if k != gone)


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
