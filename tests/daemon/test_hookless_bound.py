"""Runs without a hook hold at most ``Limits.max_hookless_values`` values in all.

An adversarial pass's find: a hello may carry a run's saved state, which the controller
holds as about twenty times its bytes, and a run whose peer left was held for
``--session-timeout`` (600 s): forty such hellos in 8 s took the controller to 811 MiB,
and a controller capped at 1.5 GiB died of a ``MemoryError``. Past the bound the runs
gone longest are evicted, as their session timeout would later: checkpointed, resumable.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from daemon_helpers import Client, OversizeStore, serving

from lrctl.daemon import Limits
from lrctl.daemon.store import StateStore
from lrctl.protocol import MAX_HELLO, encode, encode_obs

POLICY = "version: 1\npolicies:\n  - kind: divergence\n    window: 200\n"


def _hello(key: str) -> bytes:
    return encode({"t": "hello", "run": key, "run_name": key,
                   "policy": {"text": POLICY, "source": "<test>"}, "lrs": [0.1],
                   "groups": 1}, MAX_HELLO)


def _run_and_leave(path: str, key: str, steps: int = 150) -> None:
    """A run of ``steps`` observations (its guard then holds 2 × steps values) whose
    process vanishes without a goodbye."""
    c = Client(path)
    c.send(_hello(key))
    assert c.answer()["t"] == "welcome"
    for step in range(steps):
        c.send(encode_obs(step, 1.0 + (step % 7) / 100, 1.0))
        assert c.answer()["t"] == "lr"
    c.sock.close()


def test_the_runs_gone_longest_are_evicted_past_the_bound_and_resume(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "state")
    limits = Limits(max_hookless_values=700)  # two such runs (300 values each), not three
    with serving(str(tmp_path / "c.sock"), store, limits=limits) as (srv, path):
        for key in ("r-first", "r-second", "r-third"):
            _run_and_leave(path, key)
            _until_hookless(srv, key)
        # (The loop marks r-third without a hook, then evicts r-first: forgets it, then
        # sets its checkpoint aside. Wait for the last of those, seen from this thread.)
        _until(lambda: store.detached_path("r-first").exists(), "r-first set aside")
        assert sorted(srv.sessions) == ["r-second", "r-third"]
        c = Client(path)
        c.send(_hello("r-first"))  # a reconnect resumes it
        welcome: dict[str, Any] = c.answer()
        assert welcome["t"] == "welcome" and welcome["restored"] and welcome["last_step"] == 149
        c.sock.close()


def _until(done: Callable[[], bool], what: str) -> None:
    """Wait (30 s at most) for the serving thread to make ``done()`` true."""
    deadline = time.monotonic() + 30
    while not done():
        assert time.monotonic() < deadline, f"not seen within 30 s: {what}"
        threading.Event().wait(0.01)


def _until_hookless(srv: Any, key: str) -> None:
    # (gone from the hooked runs, and counted among the others, or evicted already)
    _until(lambda: key not in srv.conns and (key not in srv.sessions or key in srv._hookless),
           f"{key}'s hangup")



def test_a_run_whose_checkpoint_waits_for_its_retry_is_kept_not_encoded_again(
        tmp_path: Path) -> None:
    """A review's find: an eviction checkpoints the run first, and ignored the minute a
    state too large waits before it is encoded again: every disconnect over the bound
    (and every housekeeping second past the session timeout) encoded it on the loop."""
    store = OversizeStore(tmp_path / "state")
    with serving(str(tmp_path / "c.sock"), store,
                 limits=Limits(max_hookless_values=1)) as (srv, path):
        _run_and_leave(path, "r-first", steps=20)
        _until_hookless(srv, "r-first")
        before = store.encodes
        for key in ("r-second", "r-third", "r-fourth"):
            _run_and_leave(path, key, steps=20)
            _until_hookless(srv, key)
        # Each new run's own tries (its start and its hook's departure: 2); none for the
        # runs over the bound, whose only copy stays in memory.
        assert store.encodes - before <= 3 * 2, store.encodes - before
        assert sorted(srv.sessions) == ["r-first", "r-fourth", "r-second", "r-third"]


def test_a_run_whose_hello_is_being_answered_is_not_evicted(tmp_path: Path) -> None:
    """A review's find: a resume's hello is answered off the loop, and the run it resumes
    was looked up before; evicted meanwhile, its "rewound" decision (the steps the resume
    undid) was never journaled. A run with a hello in flight stays."""
    store = StateStore(tmp_path / "state")
    with serving(str(tmp_path / "c.sock"), store,
                 limits=Limits(max_hookless_values=60)) as (srv, path):  # one run of 40
        _run_and_leave(path, "r-first", steps=20)
        _until_hookless(srv, "r-first")
        assert "r-first" in srv.sessions
        srv.handshakes.pending["r-first"] = None  # (stands for its hello's job)
        try:
            _run_and_leave(path, "r-second", steps=20)
            _until_hookless(srv, "r-second")
            assert "r-first" in srv.sessions
        finally:
            del srv.handshakes.pending["r-first"]
