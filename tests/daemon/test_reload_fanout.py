"""A file that many runs share is applied a slice of loop time at a time.

An adversarial pass's find: each run's reload is journaled and checkpointed on the loop
(an fsync or two, 5-8 ms), and one edit of a file 100 runs used held every other run's
answers for most of a second (a sync hook on another file failed open in an edit storm).
In-process controller, real sockets; recording a reload made slow on purpose.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

from daemon_helpers import Client, serving

from lrctl.daemon.store import StateStore
from lrctl.protocol import MAX_HELLO, encode, encode_obs
from lrctl.reload import read_policy_file
from lrctl.sinks import NullSink

RUNS = 12
V1 = "version: 1\npolicies:\n  - kind: divergence\n    factor: 0.5\n"
V2 = "version: 1\npolicies:\n  - kind: divergence\n    factor: 0.25\n"
V3 = "version: 1\npolicies:\n  - kind: divergence\n    factor: 0.125\n"


class SlowSink(NullSink):
    """Recording a run's new policy version takes 30 ms (a slow disk's fsyncs); each is
    noted."""

    def __init__(self) -> None:
        super().__init__()
        self.saved: list[str] = []
        self.first = threading.Event()

    def policy_changed(self, run_key: str, info: Any, record: Any) -> None:
        self.first.set()
        time.sleep(0.03)
        self.saved.append(run_key)


def _hello(key: str, source: str, text: str) -> bytes:
    return encode({"t": "hello", "run": key, "run_name": key,
                   "policy": {"text": text, "source": source}, "lrs": [0.1], "groups": 1},
                  MAX_HELLO)


def _join(path: str, key: str, source: Path) -> Client:
    c = Client(path)
    c.send(_hello(key, str(source), source.read_text()))
    assert c.answer()["t"] == "welcome"
    return c


def test_other_runs_are_answered_while_a_shared_file_is_applied(tmp_path: Path) -> None:
    shared, other = tmp_path / "shared.yaml", tmp_path / "other.yaml"
    shared.write_text(V1)
    other.write_text(V1)
    sink = SlowSink()
    with serving(str(tmp_path / "c.sock"), StateStore(tmp_path / "state"),
                 sink) as (srv, path):
        runs = [_join(path, f"r-run{i:02d}", shared) for i in range(RUNS)]
        probe = _join(path, "r-probe", other)
        shared.write_text(V2)
        srv.live._on_event(read_policy_file(str(shared)))  # (the watcher's own call)
        assert sink.first.wait(30)
        probe.send(encode_obs(0, 1.0, 1.0))  # sent while the first run's reload is saved
        assert probe.answer()["t"] == "lr"
        done_before_answer = len(sink.saved)
        for c in runs:  # every run gets its push, in the end
            assert c.answer()["t"] == "lr"
        assert len(sink.saved) == RUNS
        # Answered between two slices: not after every run's reload (old: all 12 first).
        assert done_before_answer < RUNS // 2, done_before_answer


def test_a_newer_version_supersedes_the_runs_still_waiting_for_an_older_one(
        tmp_path: Path) -> None:
    shared = tmp_path / "shared.yaml"
    shared.write_text(V1)
    sink = SlowSink()
    with serving(str(tmp_path / "c.sock"), StateStore(tmp_path / "state"),
                 sink) as (srv, path):
        runs = [_join(path, f"r-run{i:02d}", shared) for i in range(RUNS)]
        shared.write_text(V2)
        srv.live._on_event(read_policy_file(str(shared)))
        assert sink.first.wait(30)
        shared.write_text(V3)
        srv.live._on_event(read_policy_file(str(shared)))  # while V2 is being applied
        pushes = {}
        for i, c in enumerate(runs):
            got: list[str] = []
            while not got or not got[-1].endswith(("factor 0.5 → 0.125)",
                                                    "factor 0.25 → 0.125)")):
                msg = c.answer()
                assert msg["t"] == "lr"
                got += [d["reason"] for d in msg["d"]]
            pushes[i] = got
        # Every run ends on V3; those V2 had not reached yet go straight to it.
        straight = [i for i, got in pushes.items() if len(got) == 1]
        assert straight and len(straight) < RUNS, pushes
        assert all(len(got) <= 2 for got in pushes.values()), pushes
        assert len(sink.saved) < 2 * RUNS
