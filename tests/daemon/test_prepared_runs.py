"""A new run's files are opened on the hello worker's thread, not on the controller's loop.

Opening a run is a dozen filesystem calls (directories, its policy text, ``meta.json``,
three journal files read back), milliseconds each on a busy disk; a loop that did them
stalled every other run. ``AuditSink.prepare_run`` does them on the thread that parses
the hello; ``open_run`` on the loop then only registers the run. These tests hold that
to its promises with the real journal on real files, and an in-process controller on a
real socket:

* a run prepared off the loop journals exactly what a run opened on it does;
* ``open_run`` does no file work for a prepared run (the preparation is all it uses);
* a hello that is not answered after all (refused, retryably, on a slow disk) discards what
  was prepared: no descriptor stays open, no empty run directory stays behind;
* a run the sink has open is never prepared a second time; a preparation for another
  ``RunInfo`` of the same key is dropped; unclaimed ones expire.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from daemon_helpers import Client, serving

import lrctl.sinks._prepared as prepared_module
import lrctl.sinks.audit as audit_module
from lrctl.daemon.limits import Limits
from lrctl.daemon.store import StateStore
from lrctl.protocol import MAX_HELLO, encode
from lrctl.sinks import AuditSettings, AuditSink, RunInfo
from lrctl.sinks.journal import RunPaths, read_lines

POLICY = "version: 1\npolicies:\n  - kind: plateau\n    patience: 100000\n"
NO_MLFLOW = AuditSettings(mlflow=False)


def _info(key: str, **kw: Any) -> RunInfo:
    fields: dict[str, Any] = {
        "run_name": f"name-{key}", "policy_source": "<test>", "policy_text": POLICY,
        "policy_sha256": hashlib.sha256(POLICY.encode()).hexdigest(), "group_count": 1}
    fields.update(kw)
    return RunInfo(run_key=key, **fields)


def _on_thread(fn: Any, *args: Any) -> None:
    """``fn(*args)`` on another thread, as the hello worker calls it; its error re-raised."""
    errors: list[BaseException] = []

    def run() -> None:
        try:
            fn(*args)
        except BaseException as exc:  # handed to the test's thread
            errors.append(exc)

    t = threading.Thread(target=run)
    t.start()
    t.join(30)
    assert not t.is_alive()
    if errors:
        raise errors[0]


def _open_fds(sink: AuditSink) -> int:
    """This process's descriptors once ``sink``'s syncer has closed those it was given."""
    sink._syncer.wait()
    return len(os.listdir("/proc/self/fd"))


def _records(state: Path, key: str, stream: str) -> list[dict[str, Any]]:
    out = []
    for line in read_lines(RunPaths.of(state, key).stream(stream)):
        rec = dict(line.record)
        for clock in ("wall_time", "ts"):
            rec.pop(clock, None)
        out.append(rec)
    return out


def _drive(sink: AuditSink, key: str) -> None:
    for step in range(120):
        sink.observation(key, step, 1.0 / (step + 1), 0.5, [0.1])
        if step % 40 == 39:
            sink.decision(key, {"step": step, "policy": "plateau", "action": "reduce",
                                "old_lrs": [0.1], "new_lrs": [0.05], "reason": "flat",
                                "evidence": {"window": 10}})
            sink.commit()
    sink.close_run(key)


@pytest.fixture
def root() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="lrprep-", dir="/tmp"))  # AF_UNIX paths are short
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def test_a_run_prepared_off_the_loop_journals_what_one_opened_on_it_does(
        root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    info = _info("same")
    plain = AuditSink(root / "plain", NO_MLFLOW)
    plain.open_run(info)
    _drive(plain, "same")
    plain.close()

    sink = AuditSink(root / "prepared", NO_MLFLOW)
    _on_thread(sink.prepare_run, info)
    paths = RunPaths.of(root / "prepared", "same")
    assert paths.meta.exists() and paths.policy_file(info.policy_sha256).exists()

    def no_file_work(*_: Any, **__: Any) -> None:
        raise AssertionError("open_run opened the run's files again")

    monkeypatch.setattr(audit_module, "prepare_open", no_file_work)
    sink.open_run(info)  # the loop's part: registration only
    _drive(sink, "same")
    sink.close()

    for stream in ("events", "decisions", "metrics"):
        assert _records(root / "prepared", "same", stream) == _records(
            root / "plain", "same", stream), stream
    assert [r["event"] for r in _records(root / "prepared", "same", "events")] == [
        "policy", "end"]


def test_a_discarded_preparation_closes_its_files_and_removes_the_directory_it_made(
        root: Path) -> None:
    sink = AuditSink(root / "state", NO_MLFLOW)
    before = _open_fds(sink)
    info = _info("gone")
    _on_thread(sink.prepare_run, info)
    assert _open_fds(sink) > before  # its journal files and the syncer's descriptors
    run_dir = RunPaths.of(root / "state", "gone").root
    assert run_dir.is_dir()

    sink.discard_prepared(_info("gone"))  # an equal RunInfo of another hello: not its own
    assert run_dir.is_dir()
    sink.discard_prepared(info)
    assert _open_fds(sink) == before
    assert not run_dir.exists()
    sink.close()


def test_an_open_run_is_not_prepared_again_and_a_changed_hello_is_not_reused(
        root: Path) -> None:
    sink = AuditSink(root / "state", NO_MLFLOW)
    sink.open_run(_info("live"))
    before = _open_fds(sink)
    _on_thread(sink.prepare_run, _info("live"))  # open on the loop: left to the loop
    assert _open_fds(sink) == before

    _on_thread(sink.prepare_run, _info("changed", run_name="first"))
    sink.open_run(_info("changed", run_name="second"))  # another hello's info: prepared anew
    meta = RunPaths.of(root / "state", "changed").meta.read_text()
    assert '"run_name":"second"' in meta.replace(" ", "")
    sink.close_run("changed")
    sink.close_run("live")
    sink.close()
    assert _open_fds(sink) < before


def test_a_preparation_no_hello_claims_expires(root: Path) -> None:
    sink = AuditSink(root / "state", NO_MLFLOW)
    before = _open_fds(sink)
    _on_thread(sink.prepare_run, _info("late"))
    sink._prepared.expire(ttl_s=60.0)  # young: kept
    assert _open_fds(sink) > before
    sink._prepared.expire(ttl_s=0.0)
    assert _open_fds(sink) == before
    assert not RunPaths.of(root / "state", "late").root.exists()
    sink.close()


def test_no_preparation_of_a_run_starts_while_its_unclaimed_directory_is_removed(
        root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sink = AuditSink(root / "state", NO_MLFLOW)
    first = _info("raced")
    _on_thread(sink.prepare_run, first)
    removing, go_on = threading.Event(), threading.Event()
    real_rmtree = prepared_module.shutil.rmtree

    def slow_rmtree(path: Any, **kw: Any) -> None:
        removing.set()
        assert go_on.wait(30)
        real_rmtree(path, **kw)

    monkeypatch.setattr(prepared_module.shutil, "rmtree", slow_rmtree)
    discarding = threading.Thread(target=sink.discard_prepared, args=(first,))
    discarding.start()
    assert removing.wait(30)
    _on_thread(sink.prepare_run, _info("raced"))  # the hook's next hello, meanwhile
    go_on.set()
    discarding.join(30)
    assert not sink._prepared._runs  # it was left to the loop's open_run
    sink.open_run(_info("raced"))
    sink.decision("raced", {"step": 1, "policy": "plateau", "action": "reduce",
                            "old_lrs": [0.1], "new_lrs": [0.05], "reason": "flat",
                            "evidence": {}})
    sink.commit()
    assert [r["step"] for r in _records(root / "state", "raced", "decisions")] == [1]
    sink.close()


def test_a_preparation_that_fails_half_way_leaves_nothing_open_or_behind(
        root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sink = AuditSink(root / "state", NO_MLFLOW)
    before = _open_fds(sink)

    def damaged(run: Any) -> None:
        raise ValueError("a damaged journal")

    monkeypatch.setattr(prepared_module, "load_high_water", damaged)
    with pytest.raises(ValueError):
        _on_thread(sink.prepare_run, _info("half"))
    assert _open_fds(sink) == before
    assert not RunPaths.of(root / "state", "half").root.exists()
    sink.close()


def test_preparations_of_a_deleted_state_dir_or_after_shutdown_are_dropped(root: Path) -> None:
    sink = AuditSink(root / "state", NO_MLFLOW)
    before = _open_fds(sink)
    _on_thread(sink.prepare_run, _info("old"))
    shutil.rmtree(root / "state" / "runs")
    sink.restore()  # the controller saw the state dir go and made it again
    assert not sink._prepared._runs and _open_fds(sink) == before
    sink.close()
    _on_thread(sink.prepare_run, _info("late"))  # a hello worker still running at shutdown
    assert not sink._prepared._runs
    assert not RunPaths.of(root / "state", "late").root.exists()


def test_a_run_held_for_a_prune_is_not_prepared_and_a_run_in_use_is_not_held(
        root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``lrctl prune`` moves a run's journal on the loop while the sink holds the run: the
    hello worker prepares no such run meanwhile, and a run prepared, being prepared, open
    or ending is never held."""
    sink = AuditSink(root / "state", NO_MLFLOW)
    run_dir = RunPaths.of(root / "state", "k").root
    assert sink.hold_journal("k")
    _on_thread(sink.prepare_run, _info("k"))  # a hello for it, meanwhile
    assert not run_dir.exists() and not sink._prepared._runs
    sink.release_journal("k")
    _on_thread(sink.prepare_run, _info("k"))
    assert run_dir.is_dir() and not sink.hold_journal("k")  # prepared, not yet claimed
    sink.open_run(_info("k"))
    assert not sink.hold_journal("k")  # open
    sink.close_run("k")
    assert sink.flush()
    assert sink.hold_journal("k")  # ended, its files closed: none of the sink's business
    sink.release_journal("k")

    started, go = threading.Event(), threading.Event()
    real = sink._prepare

    def slow(info: RunInfo) -> Any:
        started.set()
        assert go.wait(30)
        return real(info)
    monkeypatch.setattr(sink, "_prepare", slow)
    worker = threading.Thread(target=sink.prepare_run, args=(_info("k2"),))
    worker.start()
    try:
        assert started.wait(30)
        assert not sink.hold_journal("k2")  # being prepared
    finally:
        go.set()
        worker.join(30)
    sink.close()


class _GatedPrepare(AuditSink):
    """The real sink; ``prepare_run`` notes its thread, then waits for ``gate``."""

    def __init__(self, state: Path) -> None:
        super().__init__(state, NO_MLFLOW)
        self.threads: list[str] = []
        self.prepared = threading.Event()
        self.gate = threading.Event()
        self.gate.set()

    def prepare_run(self, info: RunInfo) -> None:
        self.threads.append(threading.current_thread().name)
        super().prepare_run(info)
        self.prepared.set()
        assert self.gate.wait(30)


def _hello(run: str) -> bytes:
    return encode({"t": "hello", "run": run, "run_name": run,
                   "policy": {"text": POLICY, "source": "<test>"}, "lrs": [0.1],
                   "groups": 1}, MAX_HELLO)


def test_the_controller_prepares_on_the_hello_thread_and_discards_for_a_refused_hello(
        root: Path) -> None:
    sink = _GatedPrepare(root / "state")
    limits = Limits(hello_budget_s=0.2, housekeeping_interval=0.05)
    with serving(str(root / "c.sock"), StateStore(root / "state"), sink, limits) as (srv, path):
        hook = Client(path)
        hook.send(_hello("welcomed"))
        assert hook.answer()["t"] == "welcome"
        assert sink.threads == ["lrctl-hellos"]
        assert "welcomed" in sink._runs and not sink._prepared._runs

        sink.gate.clear()
        sink.prepared.clear()
        slow = Client(path)
        slow.send(_hello("slow"))
        assert sink.prepared.wait(30)  # its files are open, its welcome not yet sent
        run_dir = RunPaths.of(root / "state", "slow").root
        assert run_dir.is_dir()
        # The worker is held (a slow disk, past the policy's parse) for ten budgets: the
        # loop refuses the hello, retryably (not as a bad policy) ...
        refusal = slow.answer()
        assert refusal["t"] == "error" and refusal["fatal"] and refusal.get("retry"), refusal
        sink.gate.set()
        # ... and discards its preparation once the worker hands the job back.
        deadline = time.monotonic() + 30
        while (sink._prepared._runs or run_dir.exists()) and time.monotonic() < deadline:
            probe = Client(path)  # a round trip: the loop has handled what came before
            probe.send(encode({"t": "status"}))
            assert probe.answer()["t"] == "status"
            probe.sock.close()
        assert not sink._prepared._runs
        assert not run_dir.exists()
        assert "slow" not in sink._runs and "slow" not in srv.sessions
        slow.sock.close()
        hook.sock.close()
