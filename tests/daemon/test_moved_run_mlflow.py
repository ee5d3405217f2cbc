"""A training run that continues into the same MLflow run from another controller state
directory keeps every decision in that run's artifacts.

A job resumed on another node (``ctl.state_dict()`` in its checkpoint, the MLflow run
resumed with ``mlflow.start_run(run_id=...)``) talks to a controller whose journal of the
run begins at the resume. ``lrctl/decisions.jsonl`` and ``lrctl/decisions_table.json``
are whole files uploaded from the journal, so that controller's uploads replaced the
first one's: the decisions made before the move vanished from the MLflow UI (the metrics
stayed), and the description and the timeline counted only the second part. Two real
``lrctl serve`` processes, each with its own socket and state directory, and a real
sqlite store.
"""

from __future__ import annotations

import gc
import json
import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlflow
import pytest
import torch
from daemon_helpers import POLICIES, ControllerProc, until
from mlflow.tracking import MlflowClient
from mlflow.utils.file_utils import local_file_uri_to_path
from sqlite_store import made_sqlite_store

import lrctl
from lrctl.sinks.journal import RunPaths, atomic_write_json, read_json, read_lines

POLICY = str(POLICIES / "default.yaml")
FIRST_SPIKES, SECOND_SPIKES = (60, 100), (170, 230)  # each: a skip and a back-off


@pytest.fixture
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[MlflowClient]:
    """A sqlite store made here, from a working directory of the test's own (where
    MLflow puts the default experiment's artifacts); the script's run ended at the end."""
    monkeypatch.chdir(tmp_path)
    uri, client = made_sqlite_store(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    try:
        yield client
    finally:
        while mlflow.active_run() is not None:
            mlflow.end_run()


def _controller(root: Path, controllers: list[ControllerProc],
                extra: list[str] | None = None) -> ControllerProc:
    root.mkdir(mode=0o700)
    proc = ControllerProc(str(root / "c.sock"), str(root / "state"), extra=extra, audit=True)
    controllers.append(proc)  # (killed at the end whatever happens)
    return proc.start()


def _first_part(first: ControllerProc, name: str) -> tuple[str, lrctl.Controller]:
    """The job's first 120 steps (two spikes) on ``first``, in a new MLflow run of the
    script's: that run's id, and the hook (still attached)."""
    run_id = mlflow.start_run(run_name=name).info.run_id
    ctl = lrctl.attach(torch.optim.SGD([torch.nn.Parameter(torch.ones(2))], lr=0.1),
                       policy=POLICY, sync=True, spawn=False, socket=first.socket)
    _train(ctl, range(120), FIRST_SPIKES)
    return run_id, ctl


def _resumed_on(root: Path, controllers: list[ControllerProc], run_id: str,
                state: dict[str, Any]) -> tuple[ControllerProc, lrctl.Controller]:
    """The job resumed on "another node": another controller, another state directory,
    the same MLflow run."""
    proc = _controller(root, controllers)
    mlflow.start_run(run_id=run_id)
    ctl = lrctl.attach(torch.optim.SGD([torch.nn.Parameter(torch.ones(2))], lr=0.1),
                       policy=POLICY, sync=True, spawn=False, socket=proc.socket, resume=state)
    return proc, ctl


def _train(ctl: lrctl.Controller, steps: range, spikes: tuple[int, ...]) -> None:
    """Each spike lasts two steps: default.yaml's guard (loss_confirm: 2) skips the first
    and backs off at the second."""
    for t in steps:
        loss = 2.0 / (1 + t / 50) + 0.01 * (t * 7919 % 13) / 13
        spiked = t in spikes or t - 1 in spikes
        ctl.step(loss * 40 if spiked else loss, grad_norm=1.0)


def _artifact(client: MlflowClient, run_id: str, path: str) -> bytes:
    """The artifact's bytes as the store holds them (b"" while there is none)."""
    root = Path(local_file_uri_to_path(client.get_run(run_id).info.artifact_uri))
    try:
        return (root / path).read_bytes()
    except FileNotFoundError:
        return b""


def _shipped(paths: RunPaths) -> bool:
    """The run's end is in MLflow, and its decisions files are up to date."""
    cursor = read_json(paths.cursor, {})
    return bool(cursor.get("finished")) and cursor.get("snapshot", {}).get(
        "offset") == paths.stream("decisions").stat().st_size


def _records(data: bytes) -> list[dict[str, Any]]:
    return [json.loads(line) for line in data.splitlines()]


def _journal(proc: ControllerProc, key: str, stream: str = "decisions") -> list[dict[str, Any]]:
    return [line.record for line in read_lines(RunPaths.of(proc.state_dir, key).stream(stream))]


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # (lrctl's warnings of the spikes)
def test_a_run_continued_from_another_state_dir_keeps_every_decision_in_mlflow(
        store: MlflowClient, short_dir: Path, controllers: list[ControllerProc]) -> None:
    first = _controller(short_dir / "a", controllers)
    run_id, ctl = _first_part(first, "moved")
    key, state = ctl.run_key, ctl.state_dict()
    ctl.close(end_run=False)  # the node goes away with the job: the run goes on elsewhere
    before = _journal(first, key)
    assert [(r["step"], r["action"]) for r in before] == [
        (60, "skip"), (61, "skip"), (61, "backoff"), (100, "skip"), (101, "skip"),
        (101, "backoff")]
    until(lambda: _records(_artifact(store, run_id, "lrctl/decisions.jsonl")) == before,
           "the first controller's decisions in MLflow")
    first.stop()
    mlflow.end_run()

    # Resumed on "another node": another controller, another state directory.
    second, ctl = _resumed_on(short_dir / "b", controllers, run_id, state)
    assert ctl.run_key == key
    _train(ctl, range(120, 260), SECOND_SPIKES)
    ctl.close()
    mlflow.end_run()
    after = _journal(second, key)
    assert [(r["step"], r["action"]) for r in after] == [
        (170, "skip"), (171, "skip"), (171, "backoff"), (230, "skip"), (231, "skip"),
        (231, "backoff")]
    everything = before + after

    paths = RunPaths.of(second.state_dir, key)
    until(lambda: _shipped(paths), "the second controller to ship the run's end")
    assert _records(_artifact(store, run_id, "lrctl/decisions.jsonl")) == everything
    table = json.loads(_artifact(store, run_id, "lrctl/decisions_table.json"))["data"]
    # Each decision exactly once, in step order, in the file, the table and the metrics.
    steps = [r["step"] for r in everything]
    assert steps == sorted(steps)
    assert [(row[0], row[2]) for row in table] == [(r["step"], r["action"]) for r in everything]
    history = store.get_metric_history(run_id, "lrctl/decision")
    assert sorted(m.step for m in history) == steps
    # The policy events of both, the count and the description.
    events = _records(_artifact(store, run_id, "lrctl/policy_events.jsonl"))
    assert events == _journal(first, key, "events") + _journal(second, key, "events")
    tags = store.get_run(run_id).data.tags
    assert tags["lrctl.decisions"] == "12"
    assert "12 decisions: 8 skip, 4 backoff" in tags["mlflow.note.content"]
    assert "| 61 | divergence | backoff |" in tags["mlflow.note.content"]
    # (and the picture, drawn from both: checked by the sink tests)
    snapshot = {path: _artifact(store, run_id, path) for path in
                ("lrctl/decisions.jsonl", "lrctl/decisions_table.json",
                 "lrctl/policy_events.jsonl")}
    second.stop()

    # A crash after MLflow acknowledged all this, before the cursor said so: the second
    # controller's cursor as it was right after it found the run. Everything is shipped
    # again (the MLflow run looked at again: what is this journal's is told apart), and
    # MLflow ends up the same, byte for byte.
    cursor = read_json(paths.cursor)
    atomic_write_json(paths.cursor, {k: cursor[k] for k in (
        "run_id", "created", "experiment_id", "kind_checked")} | {
        "streams": {}, "params": {}, "decision_ts": 0})
    second.start()
    until(lambda: _shipped(paths), "the replay")
    second.stop()
    for path, data in snapshot.items():
        assert _artifact(store, run_id, path) == data, path
    assert sorted(m.step for m in store.get_metric_history(run_id, "lrctl/decision")) == steps
    tags = store.get_run(run_id).data.tags
    assert tags["lrctl.decisions"] == "12"
    assert "12 decisions: 8 skip, 4 backoff" in tags["mlflow.note.content"]
    # And through MLflow's own client, as a reader of the run would.
    local = store.download_artifacts(run_id, "lrctl/decisions.jsonl", str(short_dir))
    gc.collect()  # (ends the artifact repository's threads)
    assert _records(Path(local).read_bytes()) == everything


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # (lrctl's warnings of the spikes)
def test_the_first_controller_leaves_a_run_continued_elsewhere_alone(
        store: MlflowClient, short_dir: Path, controllers: list[ControllerProc]) -> None:
    """The node's job vanished without closing its run (no goodbye), and its controller
    still holds the run when the job resumes elsewhere: when it ends the run as orphaned
    (its session timeout), after the second controller shipped into the MLflow run, it
    replaced that run's files with its own part and set the run KILLED while it trained
    on. Now it sees the other journal's tag and leaves the run's files and end to it."""
    first = _controller(short_dir / "a", controllers, ["--session-timeout", "2"])
    run_id, ctl = _first_part(first, "moved-twice")
    key, state = ctl.run_key, ctl.state_dict()
    before = _journal(first, key)
    until(lambda: _records(_artifact(store, run_id, "lrctl/decisions.jsonl")) == before,
           "the first controller's decisions in MLflow")
    assert first.proc is not None
    os.kill(first.proc.pid, signal.SIGSTOP)  # (its session timeout held until the end)
    try:
        assert ctl._link is not None
        ctl._link.close(bye=False)  # the node's process is gone: no goodbye
        mlflow.end_run()
        second, ctl = _resumed_on(short_dir / "b", controllers, run_id, state)
        _train(ctl, range(120, 260), SECOND_SPIKES)
        everything = before + _journal(second, key)
        until(lambda: _records(_artifact(store, run_id, "lrctl/decisions.jsonl"))
               == everything, "the second controller's files")
    finally:
        os.kill(first.proc.pid, signal.SIGCONT)
    first_paths = RunPaths.of(first.state_dir, key)
    until(lambda: read_json(first_paths.cursor, {}).get("finished"),
           "the first controller to end its part as orphaned")
    assert read_json(first_paths.cursor)["superseded"]
    assert _records(_artifact(store, run_id, "lrctl/decisions.jsonl")) == everything
    assert store.get_run(run_id).info.status == "RUNNING"  # the job trains on elsewhere
    assert "lrctl.end_reason" not in store.get_run(run_id).data.tags
    ctl.close()
    mlflow.end_run()
    paths = RunPaths.of(second.state_dir, key)
    until(lambda: _shipped(paths), "the second controller to ship the run's end")
    assert _records(_artifact(store, run_id, "lrctl/decisions.jsonl")) == everything
    tags = store.get_run(run_id).data.tags
    assert tags["lrctl.decisions"] == "12"
    assert "12 decisions: 8 skip, 4 backoff" in tags["mlflow.note.content"]
    assert store.get_run(run_id).info.status == "FINISHED"
