"""Group commit: the decisions of one loop wake-up cost one journal fsync, and no frame that
tells of a decision leaves the controller before that fsync has returned.

An in-process controller with the real journal (``AuditSink``, no MLflow) on a real Unix
socket. The journal's fsync is a probe: it counts the fsyncs of each file and can hold the
one of ``decisions.jsonl`` until the test lets it go, so the test can look at the sockets
while the loop is inside it.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from daemon_helpers import Client, serving

from lrctl.daemon import Limits, Server
from lrctl.daemon.store import StateStore
from lrctl.protocol import MAX_HELLO, encode, encode_obs
from lrctl.sinks import AuditSettings, AuditSink
from lrctl.sinks.journal import RunPaths, read_lines

# Patience never runs out: the only decisions are the guard's, one per NaN loss.
POLICY = "version: 1\npolicies:\n  - kind: plateau\n    patience: 100000\n"
BURST = 8


class FsyncProbe:
    """``os.fsync`` that counts per file name and, while ``gate`` is clear, holds the
    fsync of ``decisions.jsonl`` (``entered`` says the loop is in it)."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()
        self.fail: OSError | None = None

    def __call__(self, fd: int) -> None:
        name = os.path.basename(os.readlink(f"/proc/self/fd/{fd}"))
        if name == "decisions.jsonl":
            self.entered.set()
            self.gate.wait(60)
            if self.fail is not None:
                raise self.fail
        os.fsync(fd)
        self.calls.append(name)

    def count(self, name: str = "decisions.jsonl") -> int:
        return self.calls.count(name)


@pytest.fixture
def controller() -> Iterator[tuple[Server, FsyncProbe, Path, str]]:
    root = Path(tempfile.mkdtemp(prefix="lrgc-", dir="/tmp"))  # AF_UNIX paths are short
    probe = FsyncProbe()
    sink = AuditSink(root / "state", AuditSettings(mlflow=False), fsync_fd=probe)
    try:
        # A burst is one wake-up, however slow the machine: a peer's share of a wake-up
        # (Limits.max_wake_share_s, which splits a costly burst; tests/daemon/
        # test_fairness.py) is not what these tests are about.
        limits = Limits(max_wake_share_s=60.0)
        with serving(str(root / "c.sock"), StateStore(root / "state"), sink,
                     limits=limits) as (srv, path):
            try:
                yield srv, probe, root / "state", path
            finally:
                probe.gate.set()  # a failed test must not leave the loop stuck in it
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _attach(path: str, run: str) -> Client:
    hook = Client(path)
    hook.send(encode({"t": "hello", "run": run, "run_name": run,
                      "policy": {"text": POLICY, "source": "<test>"}, "lrs": [0.1],
                      "groups": 1}, MAX_HELLO))
    assert hook.answer()["t"] == "welcome"
    return hook


def _journaled(state: Path, run: str) -> list[dict[str, Any]]:
    return [line.record for line in read_lines(RunPaths.of(state, run).stream("decisions"))]


def test_a_burst_of_decisions_is_one_fsync_and_no_reply_goes_out_before_it(
        controller: tuple[Server, FsyncProbe, Path, str]) -> None:
    _, probe, state, path = controller
    hook = _attach(path, "burst")
    probe.gate.clear()
    # One send: the loop reads the whole burst in one wake-up; each NaN loss is a decision.
    hook.send(b"".join(encode_obs(step, float("nan"), None) for step in range(BURST)))
    assert probe.entered.wait(60)  # the loop is inside the fsync of the burst's decisions
    assert len(_journaled(state, "burst")) == BURST  # written, not yet durable ...
    assert hook.nothing_received()  # ... so not one of the BURST replies has been sent
    probe.gate.set()
    replies = [hook.answer() for _ in range(BURST)]
    assert [r["s"] for r in replies] == list(range(BURST))
    assert [[(d["policy"], d["action"]) for d in r["d"]] for r in replies] == [
        [("guard", "skip")]] * BURST
    assert probe.count() == 1  # one fsync for BURST decisions


def test_an_operator_decision_is_durable_before_its_answer_and_its_push(
        controller: tuple[Server, FsyncProbe, Path, str]) -> None:
    _, probe, state, path = controller
    hook = _attach(path, "op-run")
    probe.gate.clear()
    operator = Client(path)
    operator.send(encode({"t": "set_lr", "run": "op-run", "lr": 0.05}))
    assert probe.entered.wait(60)
    assert [d["action"] for d in _journaled(state, "op-run")] == ["set_lr"]
    assert operator.nothing_received() and hook.nothing_received()
    probe.gate.set()
    answer = operator.answer()
    assert answer["t"] == "ok" and answer["decision"]["action"] == "set_lr"
    push = hook.answer()  # the run's hook applies it on its next step
    assert push["s"] == -1 and push["lrs"] == [0.05] and push["d"][0]["policy"] == "operator"
    assert probe.count() == 1


def test_a_failed_fsync_is_reported_and_the_run_goes_on(
        controller: tuple[Server, FsyncProbe, Path, str]) -> None:
    _, probe, _, path = controller
    hook = _attach(path, "full-disk")
    probe.fail = OSError(28, "No space left on device")
    hook.send(encode_obs(0, float("nan"), None))
    assert hook.answer()["d"][0]["action"] == "skip"  # fail-open, as for any sink failure
    probe.fail = None
    status = Client(path)
    status.send(encode({"t": "status"}))
    errors = status.answer()["errors"]
    assert any("commit failed" in e and "No space left" in e for e in errors), errors
    hook.send(encode_obs(1, float("nan"), None))
    assert hook.answer()["s"] == 1
    assert probe.count() == 1  # the next commit fsyncs the file again
