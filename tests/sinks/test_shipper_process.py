"""The MLflow shipper runs in a child process of the controller (issue #13, memory).

Real controllers ship to a real sqlite store: the controller never loads mlflow, the
runs are complete in MLflow, and a shipper killed with SIGKILL mid-run is restarted and
loses and repeats nothing. A shipper that does not stop is killed at close's deadline.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import stat
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from live_controller import LiveController, live_controller
from mlflow.tracking import MlflowClient
from sinks_helpers import assert_exactly_once, mlflow_run_id, run_info
from sqlite_store import made_sqlite_store

import lrctl
from lrctl.cli import main
from lrctl.client import request
from lrctl.sinks import AuditSettings, AuditSink
from lrctl.sinks._outbox import Outbox
from lrctl.sinks.shipper_proxy import ShipperProcess

POLICY = {"version": 1, "policies": [
    {"kind": "plateau", "metric": "loss", "patience": 5, "factor": 0.5, "cooldown": 2}]}
DEADLINE_S = 120.0


def _poll(what: str, check: Callable[[], Any]) -> Any:
    """``check()``'s first truthy answer; fails after a generous deadline (a hang)."""
    deadline = time.monotonic() + DEADLINE_S
    while True:
        got = check()
        if got:
            return got
        assert time.monotonic() < deadline, f"never happened: {what}"
        time.sleep(0.05)


def _train(steps: range, opt: torch.optim.Optimizer, ctl: lrctl.Controller) -> None:
    for _ in steps:
        ctl.step(1.0, grad_norm=1.0)  # a flat loss: the plateau rule decides now and then
        opt.step()


def _status(controller: LiveController) -> dict[str, Any]:
    return request({"t": "status"}, controller.socket, timeout=10.0)


def _finished(client: MlflowClient, state: Path, key: str) -> Callable[[], bool]:
    def check() -> bool:
        try:
            return client.get_run(mlflow_run_id(state, key)).info.status == "FINISHED"
        except (OSError, KeyError, TypeError):
            return False
    return check


def _sqlite_env(workdir: Path) -> tuple[str, dict[str, str]]:
    uri, _ = made_sqlite_store(workdir)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    return uri, env


def test_the_controller_ships_complete_runs_without_loading_mlflow(
        workdir: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    uri, env = _sqlite_env(workdir)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.ones(2))], lr=0.1)
    with live_controller(audit=True, env=env) as controller:
        monkeypatch.setenv("LRCTL_SOCKET", controller.socket)
        capsys.readouterr()
        assert main(["status", "--socket", controller.socket]) == 0
        assert ("  MLflow shipper: not started yet (it starts with the first run)\n"
                in capsys.readouterr().out)  # (no pid, size or restarts to show yet)
        keys = []
        for name in ("first", "second"):
            with lrctl.attach(opt, policy=POLICY, sync=True, spawn=False,
                              run_name=name) as ctl:
                _train(range(60), opt, ctl)
                keys.append(ctl.run_key)
                assert any(d.action == "reduce" for d in ctl.decisions)
        client = MlflowClient(uri)
        state = Path(controller.state_dir)
        for key in keys:
            _poll(f"run {key} finished in MLflow", _finished(client, state, key))
        status = _status(controller)
        assert controller.proc is not None and status["pid"] == controller.proc.pid
        shipper = status["shipper"]
        assert shipper["state"] == "running" and shipper["restarts"] == 0
        assert shipper["pid"] not in (None, status["pid"])
        assert status["mlflow_loaded"] is False  # the controller's sys.modules
        assert status["rss_kib"] > 0 and shipper["rss_kib"] > 0
        capsys.readouterr()
        assert main(["status", "--socket", controller.socket]) == 0
        out = capsys.readouterr().out
        assert "mlflow not loaded" in out
        assert f"MLflow shipper: running, pid {shipper['pid']}, " in out
        for key in keys:
            assert_exactly_once(client, mlflow_run_id(state, key), state, key, workdir)


def test_a_shipper_killed_mid_run_is_restarted_and_ships_every_decision_once(
        workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    uri, env = _sqlite_env(workdir)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.ones(2))], lr=0.1)
    with live_controller(audit=True, env=env) as controller:
        monkeypatch.setenv("LRCTL_SOCKET", controller.socket)
        client = MlflowClient(uri)
        state = Path(controller.state_dir)
        with lrctl.attach(opt, policy=POLICY, sync=True, spawn=False, run_name="k") as ctl:
            _train(range(40), opt, ctl)
            key = ctl.run_key
            assert key is not None
            _poll("some decisions in MLflow", lambda: (state / "runs").exists() and _shipped(
                client, state, key))
            first = _status(controller)["shipper"]["pid"]
            os.kill(first, signal.SIGKILL)
            _train(range(40, 120), opt, ctl)
            again = _poll("the shipper restarted", lambda: (
                lambda s: s if s["restarts"] == 1 and s["state"] == "running" else None)(
                    _status(controller)["shipper"]))
            assert again["pid"] != first
            _train(range(120, 160), opt, ctl)
        _poll(f"run {key} finished in MLflow", _finished(client, state, key))
        journal = assert_exactly_once(client, mlflow_run_id(state, key), state, key, workdir)
        assert len(journal) >= 3
        log = controller.log.read_text()
        assert log.count("exited with status") == 1, log[-3000:]  # logged once per restart


def _shipped(client: MlflowClient, state: Path, key: str) -> bool:
    try:
        return bool(client.get_metric_history(mlflow_run_id(state, key), "lrctl/decision"))
    except (OSError, KeyError, TypeError):
        return False


def test_close_kills_a_shipper_that_does_not_stop(tmp_path: Path) -> None:
    """SIGTERM must stay fast whatever MLflow does: a child that ignores ``close`` is
    killed at the deadline, and the journal keeps the run for the next controller."""
    stuck = tmp_path / "stuck-python"
    stuck.write_text(f"#!/bin/sh\nexec {sys.executable} -c "
                     "'import signal, sys; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
                     "sys.stdin.read(); signal.pause()'\n")
    stuck.chmod(stuck.stat().st_mode | stat.S_IXUSR)
    shipper = ShipperProcess(tmp_path / "state", python=str(stuck))
    sink = AuditSink(tmp_path / "state", AuditSettings(log_every=10), shipper=shipper, env={})
    sink.open_run(run_info("run-s1", tracking_uri=f"sqlite:///{tmp_path / 'm.db'}"))
    pid = _poll("the child started", lambda: shipper.status()["pid"])
    sink.close(timeout=0.3)
    assert shipper.status()["state"] == "stopped" and shipper.status()["pid"] is None
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def _deaf_python(tmp_path: Path) -> Path:
    """A stand-in for the shipper's python that never reads its input (as a stopped or
    hung child would not)."""
    deaf = tmp_path / "deaf-python"
    deaf.write_text(f"#!/bin/sh\nexec {sys.executable} -c 'import signal; signal.pause()'\n")
    deaf.chmod(deaf.stat().st_mode | stat.S_IXUSR)
    return deaf


def test_a_shipper_that_reads_nothing_never_blocks_the_caller(tmp_path: Path) -> None:
    """The controller's loop tells the child of every run and every journal that grew;
    a child that reads nothing (SIGSTOP, a hang) fills its 64 KiB pipe, and a blocking
    write would stop the loop, and with it every run's answers. Queued instead."""
    shipper = ShipperProcess(tmp_path / "state", python=str(_deaf_python(tmp_path)),
                             stall_s=3600.0)
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    done = threading.Event()

    def flood() -> None:  # ~450 KiB of attend and more lines
        for i in range(3000):
            key = f"run-{i:04d}-" + "k" * 90
            shipper.attend(key, uri)
            shipper._dirty[key] = None
            shipper.pass_on()
        done.set()

    shipper.attend("run-first", uri)  # the child starts with the first run
    try:
        _poll("the child started", lambda: shipper.status()["pid"])
        thread = threading.Thread(target=flood, daemon=True)
        thread.start()
        assert done.wait(DEADLINE_S), "attend/pass_on waited on the child's pipe"
        _poll("the writer waits on the full pipe", lambda: shipper._outbox.blocked_for > 0)
        # What waits is bounded by the runs (an attend, and at most one `more` after each),
        # not by how often the loop commits: more commits merge into the last `more`
        # queued (one more, when the writer holds all that was queued, none left to merge
        # into: the writer may take everything in one write, and block on it).
        queued = shipper._outbox.pending()
        assert queued <= 2 * 3001
        for _ in range(2):
            for i in range(1000):
                shipper._dirty[f"run-{i:04d}-" + "k" * 90] = None
                shipper.pass_on()
            assert queued <= shipper._outbox.pending() <= max(queued, 1)
    finally:
        closed = shipper.close(timeout=0.3)  # (the child killed at the deadline)
    assert closed is False


def test_a_shipper_that_reads_nothing_for_stall_s_is_killed_and_restarted(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="lrctl.sinks.mlflow")
    shipper = ShipperProcess(tmp_path / "state", python=str(_deaf_python(tmp_path)),
                             stall_s=0.5)
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    for i in range(1000):  # more than the pipe holds
        shipper.attend(f"run-{i:04d}-" + "k" * 90, uri)
    first = _poll("the child started", lambda: shipper.status()["pid"])

    def restarted() -> bool:
        shipper.pass_on()  # the controller calls it once a second (its tick)
        return shipper.restarts >= 1
    _poll("a restart", restarted)
    with pytest.raises(ProcessLookupError):
        _poll("the stalled child reaped", lambda: os.kill(first, 0) and False)
    assert any("has read nothing for" in r.getMessage() for r in caplog.records)
    assert shipper.close(timeout=0.3) is False


def test_a_stopped_shipper_whose_pipe_never_fills_is_killed_and_restarted(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The controller's notices are small: a shipper stopped (SIGSTOP) or hung for long
    never filled its pipe, so it was never found stalled, and MLflow got nothing while
    `lrctl status` said it was running (found by an adversarial pass, 75 s stopped). It
    is asked to answer a ping every ping_s; one unanswered for stall_s ends it."""
    caplog.set_level(logging.INFO, logger="lrctl.sinks.mlflow")
    shipper = ShipperProcess(tmp_path / "state", stall_s=1.0, ping_s=0.1)
    shipper.attend("run-s1", f"sqlite:///{tmp_path / 'm.db'}")
    first = _poll("the child started", lambda: shipper.status()["pid"])

    def answering() -> bool:
        shipper.pass_on()
        return shipper._ping is None and shipper._pinged_at > 0
    _poll("a ping answered", answering)  # a running child answers: never killed
    os.kill(first, signal.SIGSTOP)
    try:
        def restarted() -> bool:
            shipper.pass_on()  # the controller calls it once a second (its tick)
            return shipper.restarts >= 1
        _poll("a restart", restarted)
        assert "not reading" in shipper.status()["state"] or shipper.status()["pid"] != first
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(first, signal.SIGCONT)
    # Its pipe never filled: no write waited stall_s (the ping ended it). A write to the
    # new child may be under way at this instant, so not 0.
    assert shipper._outbox.blocked_for < shipper.stall_s
    assert any("has read nothing for" in r.getMessage() for r in caplog.records)
    second = _poll("the new child", lambda: shipper.status()["pid"] not in (None, first)
                   and shipper.status()["pid"])
    _poll("the new child answers", answering)
    assert shipper.status()["state"] == "running" and second != first
    shipper.close(timeout=1.0)


def test_the_outbox_keeps_order_and_merges_only_neighbouring_mores() -> None:
    box = Outbox()
    r, w = os.pipe()
    with os.fdopen(w, "wb") as pipe, os.fdopen(r, "rb") as out:
        box.attach(pipe)
        with box._cond:  # the writer takes nothing before it is all queued
            box.put({"op": "attend", "run": "a", "uri": "u"})
            box.more(["a"])
            box.more(["a", "b"])
            box.put({"op": "forget", "run": "b"})
            box.more(["a"])
            queued = list(box._queue)
        box.stop(timeout=DEADLINE_S)  # writes what is queued, then ends
        pipe.close()
        lines = [json.loads(line) for line in out.read().splitlines()]
    assert queued == lines == [{"op": "attend", "run": "a", "uri": "u"},
                               {"op": "more", "runs": ["a", "b"]},
                               {"op": "forget", "run": "b"},
                               {"op": "more", "runs": ["a"]}]


def test_a_shipper_that_keeps_dying_is_restarted_with_one_log_line_each(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A crash loop (here: a child that exits at once) backs off and never spams."""
    dying = tmp_path / "dying-python"
    dying.write_text("#!/bin/sh\nexit 3\n")
    dying.chmod(dying.stat().st_mode | stat.S_IXUSR)
    shipper = ShipperProcess(tmp_path / "state", python=str(dying), backoff_max=1.0)
    caplog.set_level(logging.INFO, logger="lrctl.sinks.mlflow")
    shipper.attend("run-d1", f"sqlite:///{tmp_path / 'm.db'}")
    _poll("three restarts", lambda: shipper.status()["restarts"] >= 3)
    assert shipper.close(timeout=0.5) is False  # nothing was shipped: the journal keeps it
    restarts = [r for r in caplog.records if "exited with status 3" in r.getMessage()]
    assert len(restarts) == shipper.restarts >= 3
    assert shipper.status() == {"pid": None, "state": "stopped", "restarts": shipper.restarts,
                                "rss_kib": None, "unavailable": {}, "files_down": {}}


def test_a_run_whose_hook_vanished_ends_killed_after_the_session_timeout(
        workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A training process that dies never ends its run: the controller does, once the
    hook has been gone for ``--session-timeout``, saying why; a resume reopens it."""
    uri, env = _sqlite_env(workdir)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.ones(2))], lr=0.1)
    with live_controller(audit=True, env=env, args=["--session-timeout", "1"]) as controller:
        monkeypatch.setenv("LRCTL_SOCKET", controller.socket)
        client = MlflowClient(uri)
        state = Path(controller.state_dir)
        ctl = lrctl.attach(opt, policy=POLICY, sync=True, spawn=False, run_name="gone")
        _train(range(40), opt, ctl)
        key = ctl.run_key
        assert key is not None
        saved = ctl.state_dict()
        ctl.close(end_run=False)  # disconnected without a goodbye, like a killed process

        def status() -> str | None:
            try:
                return str(client.get_run(mlflow_run_id(state, key)).info.status)
            except (OSError, KeyError, TypeError):
                return None
        _poll("the orphaned run ended KILLED", lambda: status() == "KILLED")
        run = client.get_run(mlflow_run_id(state, key))
        assert "no hook for 1 s" in run.data.tags["lrctl.end_reason"]

        with lrctl.attach(opt, policy=POLICY, sync=True, spawn=False, resume=saved) as ctl:
            assert ctl.run_key == key
            _train(range(40, 80), opt, ctl)
        _poll(f"run {key} finished in MLflow", _finished(client, state, key))
        assert "lrctl.end_reason" not in client.get_run(mlflow_run_id(state, key)).data.tags
        assert_exactly_once(client, mlflow_run_id(state, key), state, key, workdir)


def test_the_controller_names_the_run_whose_files_wait_and_ships_the_others(
        workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A run whose artifact store refuses its files (a file where its directory should
    be), beside a run on the same tracking URI whose store works: the controller's
    ``status`` and ``runs`` name the first alone, the second's files are in MLflow, and
    once the store is repaired the first's are too and the error is gone."""
    import mlflow

    uri, env = _sqlite_env(workdir)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    client = MlflowClient(uri)
    blocker = workdir / "blocker"
    blocker.write_text("x")
    bad_id = client.create_run(client.create_experiment(
        "bad", artifact_location=(blocker / "art").as_uri())).info.run_id
    good_id = client.create_run(client.create_experiment("good")).info.run_id
    with live_controller(audit=True, env=env) as controller:
        monkeypatch.setenv("LRCTL_SOCKET", controller.socket)
        mlflow.start_run(run_id=bad_id)
        bad = lrctl.attach(torch.optim.SGD([torch.nn.Parameter(torch.ones(2))], lr=0.1),
                           policy=POLICY, sync=True, spawn=False, run_name="bad")
        mlflow.end_run()
        try:
            _train(range(60), bad.optimizer, bad)
            mlflow.start_run(run_id=good_id)
            try:
                opt = torch.optim.SGD([torch.nn.Parameter(torch.ones(2))], lr=0.1)
                with lrctl.attach(opt, policy=POLICY, sync=True, spawn=False,
                                  run_name="good") as good:
                    _train(range(60), opt, good)
            finally:
                mlflow.end_run()
            waits = f"run {bad.run_key}: MLflow cannot store its files: "
            _poll("the bad run's files named", lambda: any(
                e.startswith(waits) for e in _status(controller)["errors"]))
            errors = _status(controller)["errors"]
            assert not any("MLflow unavailable" in e or good.run_key in e for e in errors)
            [row] = [r for r in request({"t": "runs"}, controller.socket)["runs"]
                     if r["run"] == bad.run_key]
            assert row["sink_error"].startswith("MLflow cannot store its files: ")
            _poll("the good run's files", lambda: "lrctl/decisions.jsonl" in {
                f.path for f in client.list_artifacts(good_id, "lrctl")})
            assert client.get_run(bad_id).data.metrics  # its metrics went all the same
            blocker.unlink()  # repaired
            _poll("the bad run's files", lambda: "lrctl/decisions.jsonl" in {
                f.path for f in client.list_artifacts(bad_id, "lrctl")})
            _poll("the error gone", lambda: not any(
                "cannot store its files" in e for e in _status(controller)["errors"]))
        finally:
            bad.close()
