"""A file that many runs share is applied a slice of loop time at a time.

An adversarial pass's find: each run's reload is journaled and checkpointed on the loop
(an fsync or two, 5-8 ms), and one edit of a file 100 runs used held every other run's
answers for most of a second (a sync hook on another file failed open in an edit storm).
In-process controller, real sockets; recording a reload made slow on purpose.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NamedTuple

from daemon_helpers import Client, serving, until

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
        self.versions: list[tuple[str, str | None]] = []  # (run, the version it took)
        self.first = threading.Event()

    def policy_changed(self, run_key: str, info: Any, record: Any) -> None:
        self.first.set()
        time.sleep(0.03)
        self.saved.append(run_key)
        self.versions.append((run_key, record["evidence"].get("new_sha256")))


def _hello(key: str, source: str, text: str) -> bytes:
    return encode({"t": "hello", "run": key, "run_name": key,
                   "policy": {"text": text, "source": source}, "lrs": [0.1], "groups": 1},
                  MAX_HELLO)


def _join(path: str, key: str, source: Path) -> Client:
    c = Client(path)
    c.send(_hello(key, str(source), source.read_text()))
    assert c.answer()["t"] == "welcome"
    return c


class FanOut(NamedTuple):
    srv: Any
    path: str
    sink: SlowSink
    runs: list[Client]
    shared: Path


@contextmanager
def _fanning_out(tmp_path: Path, *others: Path) -> Iterator[FanOut]:
    """RUNS runs on one file (and one run on each of ``others``), V2 of it handed over
    and its fan-out under way (the first run's reload being recorded)."""
    shared = tmp_path / "shared.yaml"
    shared.write_text(V1)
    sink = SlowSink()
    with serving(str(tmp_path / "c.sock"), StateStore(tmp_path / "state"),
                 sink) as (srv, path):
        runs = [_join(path, f"r-run{i:02d}", shared) for i in range(RUNS)]
        runs += [_join(path, f"r-other{i}", other) for i, other in enumerate(others)]
        shared.write_text(V2)
        srv.live._on_event(read_policy_file(str(shared)))  # (the watcher's own call)
        assert sink.first.wait(30)
        yield FanOut(srv, path, sink, runs, shared)


def test_other_runs_are_answered_while_a_shared_file_is_applied(tmp_path: Path) -> None:
    other = tmp_path / "other.yaml"
    other.write_text(V1)
    with _fanning_out(tmp_path, other) as (srv, _, sink, runs, _):
        *runs, probe = runs
        probe.send(encode_obs(0, 1.0, 1.0))  # sent while the first run's reload is saved
        assert probe.answer()["t"] == "lr"
        done_before_answer = len(sink.saved)
        for c in runs:  # every run gets its push, in the end
            assert c.answer()["t"] == "lr"
        assert len(sink.saved) == RUNS
        store = srv.checkpoints.store  # and each is checkpointed (off the loop)
        until(lambda: all((store.load(f"r-run{i:02d}") or {}).get("policy_text") == V2
                          for i in range(RUNS)), "every run's reload checkpointed")
        # Answered between two slices: not after every run's reload (old: all 12 first).
        assert done_before_answer < RUNS // 2, done_before_answer


def test_a_newer_version_supersedes_the_runs_still_waiting_for_an_older_one(
        tmp_path: Path) -> None:
    with _fanning_out(tmp_path) as (srv, _path, sink, runs, shared):
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


def _versions(srv: Any) -> list[str]:
    return [s.policy.text for s in srv.sessions.values()]


def test_runs_overtaken_by_a_newer_version_take_it_first_and_rejections_do_not_pile_up(
        tmp_path: Path) -> None:
    """A review's finds: each new version restarted from the first run, so an edit storm
    kept the last runs waiting for ever; and invalid versions never overtook each other
    (twelve bad saves: 144 rejections, applied for seconds after the last)."""
    import hashlib

    with _fanning_out(tmp_path) as (srv, _path, sink, runs, shared):
        shared.write_text(V3)
        srv.live._on_event(read_policy_file(str(shared)))
        v3 = hashlib.sha256(V3.encode()).hexdigest()
        for c in runs:  # each run's pushes, up to V3's
            while c.answer()["d"][0]["evidence"]["new_sha256"] != v3:
                pass
        took = list(sink.versions)
        first_v3 = next(i for i, (_, sha) in enumerate(took) if sha == v3)
        had_v2 = {k for k, _ in took[:first_v3]}
        v3_order = [k for k, sha in took if sha == v3]
        # the runs V2 had not reached take V3 before those that had V2 already
        assert set(v3_order[:RUNS - len(had_v2)]) == {f"r-run{i:02d}" for i in range(
            RUNS)} - had_v2, (had_v2, v3_order)
        before = len(sink.saved)
        for bad in range(6):  # invalid saves in a row: each overtakes the last
            shared.write_text(f"version: 1\npolicies: [{bad}\n")
            srv.live._on_event(read_policy_file(str(shared)))
        for c in runs:  # every run records a rejection, in the end
            while not any(d["action"] == "reload_failed" for d in c.answer()["d"]):
                pass
        assert len(sink.saved) - before < 3 * RUNS, len(sink.saved) - before


def test_lrctl_reload_in_the_midst_of_a_fan_out_is_not_undone(tmp_path: Path) -> None:
    """A review's find: the version still being applied reached the runs that ``lrctl
    reload`` had just moved to a newer one (11 of 12 ended on the older)."""
    from lrctl.client import request

    with _fanning_out(tmp_path) as (srv, path, _sink, runs, shared):
        shared.write_text(V3)
        answer = request({"t": "reload"}, path, timeout=30)  # (not through the watcher)
        assert answer.get("ok", True), answer
        for c in runs:  # the pushes: V3 for each, after a V2 for some
            got: list[str] = []
            while not got or not got[-1].endswith(("factor 0.25 → 0.125)",
                                                    "factor 0.5 → 0.125)")):
                got += [d["reason"] for d in c.answer()["d"]]
        until(lambda: not srv.live.applying, "the fan-out's end")
        assert _versions(srv).count(V3) == RUNS, _versions(srv)
