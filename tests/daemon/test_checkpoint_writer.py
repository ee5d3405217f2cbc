"""Hot-path checkpoints are written off the loop, and ``saved_step`` never runs ahead.

An in-process controller whose store blocks its writes until the test lets them
go: the loop must keep answering meanwhile, report the old ``saved_step`` until
the file is durable, then the new one; a run that says ``bye`` while its
checkpoint is in flight must not get its file back afterwards.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from daemon_helpers import Client, OversizeStore, serving

from lrctl.daemon import Limits, Server
from lrctl.daemon.checkpoints import Checkpoints
from lrctl.daemon.session import Session
from lrctl.daemon.store import PreparedWrite, StateStore
from lrctl.protocol import MAX_HELLO, encode, encode_obs

POLICY = "version: 1\npolicies:\n  - kind: plateau\n    patience: 5\n"
# A hot-path checkpoint every 8 observations, and none for time alone.
EVERY_8 = Limits(save_every=8, save_interval=3600.0)


class GatedStore(StateStore):
    """Writes (the loop's own, and the writer thread's part of the others) wait for
    ``gate``; ``writes`` counts the finished ones."""

    def __init__(self, state_dir: Path) -> None:
        super().__init__(state_dir)
        self.gate = threading.Event()
        self.gate.set()
        self.writes = 0
        self.writing = threading.Event()

    def write(self, key: str, data: bytes) -> None:
        self.writing.set()
        assert self.gate.wait(30)
        super().write(key, data)
        self.writes += 1

    def complete(self, prep: PreparedWrite) -> None:
        self.writing.set()
        assert self.gate.wait(30)
        super().complete(prep)
        self.writes += 1


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[Server, GatedStore, str]]:
    store = GatedStore(tmp_path / "state")
    try:
        with serving(str(tmp_path / "c.sock"), store, limits=EVERY_8) as (srv, path):
            yield srv, store, path
    finally:
        store.gate.set()


def _hello(c: Client, run: str) -> dict[str, Any]:
    c.send(encode({"t": "hello", "run": run, "run_name": run,
                   "policy": {"text": POLICY, "source": "<test>"}, "lrs": [0.1], "groups": 1},
                  MAX_HELLO))
    welcome = c.answer()
    assert welcome["t"] == "welcome", welcome
    return welcome


def _checkpointed(srv: Server, store: GatedStore, run: str) -> None:
    """Wait for a new run's first checkpoint (made durable off the loop, after the welcome)
    and for the loop to have learnt it: until then a checkpoint the hot path asks for is
    left to a later observation (one write per run at a time)."""
    deadline = time.monotonic() + 20
    while not (store.path(run).exists() and srv.checkpoints.current(run)):
        assert time.monotonic() < deadline, f"{run} was never checkpointed"
        time.sleep(0.01)  # polling on the condition


def test_the_loop_answers_while_a_checkpoint_is_written(
        served: tuple[Server, GatedStore, str]) -> None:
    srv, store, path = served
    c = Client(path)
    _hello(c, "run-a")  # checkpointed at once (a new run), off the loop
    _checkpointed(srv, store, "run-a")
    store.gate.clear()
    store.writing.clear()
    replies = []
    for t in range(20):  # step 7 asks for a checkpoint; its write hangs
        c.send(encode_obs(t, 1.0, None))
        replies.append(c.answer())
    assert store.writing.wait(10)
    assert [r["s"] for r in replies] == list(range(20))  # answered all the same
    assert {r["saved_step"] for r in replies} == {-1}  # nothing reported before it is durable
    store.gate.set()
    deadline = time.monotonic() + 20
    t = 20
    while time.monotonic() < deadline:  # the fsyncs take what the disk takes
        c.send(encode_obs(t, 1.0, None))
        reply = c.answer()
        t += 1
        if reply["saved_step"] >= 7:
            break
        time.sleep(0.01)
    assert reply["saved_step"] >= 7 and reply["saved_step"] % 8 == 7, srv.checkpoints.errors
    state = store.load("run-a")
    assert state is not None and state["engine"]["last_step"] >= reply["saved_step"]


def _write_in_flight(srv: Server, store: GatedStore, path: str, run: str,
                     steps: int) -> Client:
    """A run whose hot-path checkpoint is being written (held at the gate)."""
    c = Client(path)
    _hello(c, run)
    _checkpointed(srv, store, run)
    store.gate.clear()
    store.writing.clear()
    for t in range(steps):
        c.send(encode_obs(t, 1.0, None))
        c.answer()
    assert store.writing.wait(10)
    return c


def _loop_waits_for_writes(srv: Server) -> threading.Event:
    """Set once the loop blocks on the writes in flight (it must, before it deletes or
    writes a run's checkpoint again)."""
    waiting = threading.Event()
    writer = srv.checkpoints._writer
    wait = writer.wait

    def noting() -> None:
        waiting.set()
        wait()
    writer.wait = noting  # type: ignore[method-assign]
    return waiting


def test_bye_while_a_checkpoint_is_in_flight_leaves_no_file(
        served: tuple[Server, GatedStore, str]) -> None:
    srv, store, path = served
    other = Client(path)
    _hello(other, "run-other")
    _checkpointed(srv, store, "run-other")
    c = _write_in_flight(srv, store, path, "run-b", 8)
    c.send(encode({"t": "bye"}))
    # The removal waits behind the write on the writer thread, not on the loop: another
    # run is answered meanwhile.
    for t in range(3):
        other.send(encode_obs(t, 1.0, None))
        assert other.answer()["s"] == t
    assert "run-b" not in srv.sessions or store.writes < 3
    assert store.writes == 2  # the two first checkpoints: the one in flight is held
    store.gate.set()
    deadline = time.monotonic() + 20
    while store.writes < 3 or store.path("run-b").exists() or "run-b" in srv.sessions:
        assert time.monotonic() < deadline, (store.writes, store.path("run-b").exists())
        time.sleep(0.02)  # polling on the condition
    assert store.writes == 3  # the first checkpoints, then the one in flight at bye
    assert not store.path("run-b").exists()  # deleted after the write, not before
    assert store.load("run-b") is None


def test_an_operator_save_waits_for_the_write_in_flight(
        served: tuple[Server, GatedStore, str]) -> None:
    srv, store, path = served
    c = _write_in_flight(srv, store, path, "run-c", 12)  # kept open: its hook is still there
    op = Client(path)
    waiting = _loop_waits_for_writes(srv)
    op.send(encode({"t": "pause", "run": "run-c"}))
    assert waiting.wait(20)  # the operator's save waits for the write in flight
    store.gate.set()
    assert op.answer()["t"] == "ok"
    state = store.load("run-c")  # the operator's checkpoint is the last one written
    assert state is not None and state["engine"]["last_step"] == 11
    assert state["engine"]["mode"] == "shadow"
    c.sock.close()  # the run's hook stayed connected throughout


class FailingStore(StateStore):
    """Every write fails, as on a full or read-only disk; ``attempts`` counts them."""

    def __init__(self, state_dir: Path) -> None:
        super().__init__(state_dir)
        self.attempts = 0

    def write(self, key: str, data: bytes) -> None:
        self.attempts += 1
        raise OSError(28, "No space left on device")

    def prepare(self, key: str, data: bytes) -> PreparedWrite:
        self.attempts += 1
        raise OSError(28, "No space left on device")


def test_a_failing_disk_is_retried_at_the_save_interval_not_per_observation(
        tmp_path: Path) -> None:
    store = FailingStore(tmp_path / "state")
    with serving(str(tmp_path / "c.sock"), store, limits=EVERY_8) as (_, path):
        c = Client(path)
        c.send(encode({"t": "hello", "run": "full-disk", "run_name": "full-disk",
                       "policy": {"text": POLICY, "source": "<test>"}, "lrs": [0.1],
                       "groups": 1}, MAX_HELLO))
        assert c.answer()["t"] == "welcome"  # the opening save failed: the run goes on
        replies = []
        for step in range(200):
            c.send(encode_obs(step, 1.0, 1.0))
            replies.append(c.answer())
        answers = [r for r in replies if r["t"] == "lr"]
        assert len(answers) >= 199 and all(r["saved_step"] == -1 for r in answers)
        # The opening save and the first hot-path one; no retry per observation after it.
        assert store.attempts <= 3, store.attempts



def test_a_state_too_large_to_checkpoint_is_not_encoded_again_every_interval(
        tmp_path: Path) -> None:
    """A review's find: a state refused for its size was encoded again at every save
    interval (a second), on the loop: tens of milliseconds to seconds each time, for a
    checkpoint that could never be written. It is tried again a minute later."""
    store = OversizeStore(tmp_path / "state")
    limits = Limits(save_every=8, save_interval=0.02)
    with serving(str(tmp_path / "c.sock"), store, limits=limits) as (_, path):
        c = Client(path)
        c.send(encode({"t": "hello", "run": "too-big", "run_name": "too-big",
                       "policy": {"text": POLICY, "source": "<test>"}, "lrs": [0.1],
                       "groups": 1}, MAX_HELLO))
        assert c.answer()["t"] == "welcome"
        step, until = 0, time.monotonic() + 0.6  # 30 save intervals of observations
        while time.monotonic() < until:
            c.send(encode_obs(step, 1.0, 1.0))
            assert c.answer()["t"] in ("lr", "error")
            step += 1
        assert step > 100
    # The opening save and the first hot-path one (and the shutdown's); none per interval.
    assert store.encodes <= 4, store.encodes


def _sessions(n: int) -> dict[str, Any]:
    from lrctl.daemon.session import Session

    return {f"r{i}": Session.create(
        key=f"r{i}", run_name=f"r{i}", policy_text=POLICY, policy_source="<test>", lrs=[0.1],
        world_size=1, total_steps=None, mlflow_run_id=None, tracking_uri=None, cwd=None)
        for i in range(n)}


@pytest.mark.parametrize(("runs", "observing", "interval"),
                         [(1, 1, 1.0), (16, 16, 1.0), (32, 32, 2.0), (64, 64, 4.0),
                          (64, 8, 1.0)])
def test_many_runs_stretch_the_timed_checkpoint_interval(
        tmp_path: Path, runs: int, observing: int, interval: float) -> None:
    """Known answers: save_interval (1 s) up to timed_saves_per_s (16) runs observing,
    then runs / 16 s, so that the controller writes at most 16 timed checkpoints a
    second (64 runs checkpointed once a second each took 6-7 % of a core at 100 Hz).
    Runs held without a hook (nothing unsaved) do not stretch it."""
    from lrctl.daemon.checkpoints import Checkpoints

    store = StateStore(tmp_path / "state")
    sessions = _sessions(runs)
    limits = Limits(save_interval=1.0, timed_saves_per_s=16.0, max_saves_per_wake=1000)
    checkpoints = Checkpoints(store, sessions, limits, notify=lambda: None)
    try:
        for key in sessions:
            checkpoints.track(key)  # saved now
        t0 = time.monotonic()
        busy = dict(list(sessions.items())[:observing])
        for key, s in busy.items():
            s.unsaved = 1
            checkpoints.observed(key, s, t0)
        checkpoints.save_due(t0 + 0.5)  # none due yet; the runs observing are counted
        assert checkpoints.interval() == interval
        checkpoints.save_due(t0 + interval - 0.05)  # before the interval: none
        assert all(s.unsaved for s in busy.values())
        assert interval - 0.5 <= checkpoints.next_due - t0 <= interval  # the next look
        checkpoints.save_due(t0 + interval + 0.5)
        assert not any(s.unsaved for s in sessions.values())
    finally:
        checkpoints.stop()


def test_timed_checkpoints_are_spread_over_wakeups(tmp_path: Path) -> None:
    """After a stall every run is due at once: at most ``max_saves_per_wake`` are encoded
    in one wake-up, the rest in the next ones (their encodes in one go held every answer)."""
    from lrctl.daemon.checkpoints import Checkpoints

    store = StateStore(tmp_path / "state")
    sessions = _sessions(20)
    limits = Limits(save_interval=1.0, max_saves_per_wake=8)
    checkpoints = Checkpoints(store, sessions, limits, notify=lambda: None)
    for s in sessions.values():
        s.unsaved = 1
    now = time.monotonic() + 10.0  # every run is past its interval
    done = []
    for _ in range(3):
        assert checkpoints.next_due <= now
        checkpoints.save_due(now)
        done.append(sum(s.unsaved == 0 for s in sessions.values()))
    assert done == [8, 16, 20]
    assert checkpoints.next_due > now  # nothing due any more
    checkpoints.stop()


def test_a_removal_queued_never_takes_a_resumed_runs_new_checkpoint(tmp_path: Path) -> None:
    """A review's find: a run ended (its checkpoint's removal queued on a busy writer
    thread), then resumed from its hook's state under the same key: the new checkpoint,
    written at once, was removed by the queued job, while the loop held it current."""
    policy = "version: 1\npolicies:\n  - kind: plateau\n    patience: 3\n"

    def session() -> Session:
        return Session.create(key="k1", run_name="k1", policy_text=policy,
                              policy_source="p.yaml", lrs=[0.1])

    store = StateStore(tmp_path)
    gate = threading.Event()
    real_remove = store.remove

    def slow_remove(key: str, dir_fd: int) -> None:  # a busy writer thread
        gate.wait(10)
        real_remove(key, dir_fd)

    store.remove = slow_remove  # type: ignore[method-assign]
    sessions: dict[str, Session] = {"k1": session()}
    checkpoints = Checkpoints(store, sessions, Limits(), notify=lambda: None)
    try:
        checkpoints.save("k1")
        sessions.pop("k1")  # its goodbye, as Server._bye
        checkpoints.forget("k1")
        checkpoints.delete("k1")
        sessions["k1"] = session()  # a hello with the hook's saved state
        checkpoints.track("k1")
        threading.Timer(0.2, gate.set).start()  # (the removal finishes while save waits)
        checkpoints.save("k1")
        checkpoints._writer.wait()
        checkpoints.finished()
        assert checkpoints.current("k1") and store.load("k1") is not None
    finally:
        gate.set()
        checkpoints._writer.stop()
