"""Simulated training runs for ``lrctl bench throughput``: raw protocol clients, no torch.

A worker process drives many runs over one ``selectors`` loop. Each run does
the hello/welcome handshake like the hook, then sends observations (a loss
curve with noise) either closed-loop (the next one as soon as the answer
arrives: "unpaced") or at a fixed rate per run. Replies are counted by their
frame headers only, so the workers spend as little CPU as possible next to the
controller they measure.

With ``lifetime`` (seconds, low and high) the runs churn: each ends with ``bye``
after a random lifetime, once its last observation is answered, and a new run
takes its place at once (its hello sent without blocking the other runs; the
time to its welcome is measured too), as a cluster of short jobs would do.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import random
import selectors
import socket
import struct
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any

from ..wire.compact import COMPACT_BIT, compact_agreed, encode_obs_compact
from ..wire.decoder import FrameDecoder
from ..wire.frames import MAX_HELLO, encode
from ..wire.messages import encode_obs

__all__ = ["SimSpec", "drive"]

_HEADER = struct.Struct(">I")
_MAX_SAMPLES = 50_000


@dataclass(frozen=True)
class SimSpec:
    socket: str
    runs: int
    policy_text: str
    start_at: float  # time.time() when every worker starts sending together
    seconds: float
    rate_hz: float | None  # None: closed loop
    tag: str
    lifetime: tuple[float, float] | None = None  # churn: each run ends after U(lo, hi) s
    cwd: str | None = None  # the runs' working directory, as the hook reports it
    tracking_uri: str | None = None  # the MLflow URI the runs report
    seed: int = 0
    # Say "pace" in the hello, as the hook does when asynchronous and reporting every step
    # (rate-limited runs stand for such hooks; closed-loop ones wait for each answer).
    pace: bool = False


class _Run:
    def __init__(self, sock: socket.socket, seed: int, compact: bool) -> None:
        self.sock = sock
        self.compact = compact  # the welcome agreed to compact frames, as a hook's does
        self.step = 0
        self.sent_at = 0.0
        self.next_at = 0.0
        self.waiting = False
        self.buf = b""
        self.rng = random.Random(seed)

    def obs(self) -> bytes:
        loss = 2.0 * math.exp(-self.step / 3000) + 0.3 + 0.02 * self.rng.random()
        grad = 1.0 + 0.1 * self.rng.random()
        frame = (encode_obs_compact(self.step, loss, grad) if self.compact else None) or \
            encode_obs(self.step, loss, grad)
        self.step += 1
        return frame

    def send_next(self, now: float, period: float) -> bool:
        """Send the next observation at ``now``; the one after is due a ``period`` later
        (closed loop: 0). Returns whether this one went out late (its time had passed
        by more than a period: the schedule restarts from now)."""
        self.sent_at = now
        self.waiting = True
        self.sock.send(self.obs())
        if not period:
            return False
        self.next_at += period
        if self.next_at < now:
            self.next_at = now + period
            return True
        return False

    def replies(self, data: bytes) -> int:
        """Whole frames received (only headers are read)."""
        self.buf += data
        n = 0
        while len(self.buf) >= 4:
            size = _HEADER.unpack_from(self.buf)[0] & ~COMPACT_BIT
            if len(self.buf) < 4 + size:
                break
            self.buf = self.buf[4 + size:]
            n += 1
        return n


def _hello(spec: SimSpec, index: int) -> bytes:
    return encode({"t": "hello", "run": f"sim-{spec.tag}-{os.getpid()}-{index}",
                   "run_name": f"sim-{index}", "policy": {"text": spec.policy_text,
                                                           "source": "<bench>"},
                   "lrs": [1e-3], "groups": 1, "world_size": 1,
                   "mlflow": {"run_id": None, "tracking_uri": spec.tracking_uri},
                   "cwd": spec.cwd or os.getcwd(), "pace": spec.pace, "compact": 1},
                  MAX_HELLO)


def _connect(spec: SimSpec, index: int) -> _Run:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(30)
    sock.connect(spec.socket)
    sock.sendall(_hello(spec, index))
    decoder = FrameDecoder()
    while True:
        data = sock.recv(1 << 16)
        if not data:
            raise ConnectionError("the controller closed the connection during the handshake")
        msgs = decoder.feed(data)
        if msgs:
            if msgs[0]["t"] != "welcome":
                raise ConnectionError(f"no welcome: {msgs[0]}")
            break
    sock.setblocking(False)
    return _Run(sock, index, compact_agreed(msgs[0].get("compact")))


def drive(spec: SimSpec) -> dict[str, Any]:
    """Run ``spec.runs`` simulated runs; answered observations and their latencies (µs)."""
    if spec.pace:
        return drive_async(spec)
    runs = [_connect(spec, i) for i in range(spec.runs)]
    sel = selectors.DefaultSelector()
    for run in runs:
        sel.register(run.sock, selectors.EVENT_READ, run)
    pause = spec.start_at - time.time()
    if pause > 0:
        time.sleep(pause)
    began = time.perf_counter()
    end = began + spec.seconds
    period = 1.0 / spec.rate_hz if spec.rate_hz else 0.0
    for i, run in enumerate(runs):  # spread paced runs over one period
        run.next_at = began + period * i / len(runs)
    answered, late = 0, 0
    latencies: list[float] = []
    now = began
    while now < end:
        for run in runs:
            if not run.waiting and now >= run.next_at:
                late += run.send_next(now, period)
        timeout = 0.05
        if period:
            timeout = max(0.0, min(r.next_at for r in runs) - time.perf_counter())
        for key, _ in sel.select(timeout):
            run = key.data
            data = run.sock.recv(1 << 16)
            if not data:
                raise ConnectionError("the controller closed a connection")
            got = run.replies(data)
            now = time.perf_counter()
            if got and run.waiting:
                run.waiting = False
                answered += 1
                if len(latencies) < _MAX_SAMPLES:
                    latencies.append((now - run.sent_at) * 1e6)
        now = time.perf_counter()
    elapsed = time.perf_counter() - began
    for run in runs:
        _bye(run.sock)
    return {"answered": answered, "seconds": elapsed, "latencies_us": latencies, "late": late}


def drive_async(spec: SimSpec) -> dict[str, Any]:
    """Rate-limited runs that behave as the asynchronous hook does: each step reads the
    answer to the step before without waiting (it has come a step ago, as a rule), then
    sends its observation; nobody waits on the sockets in between, so an answer wakes
    no one. An answer not yet there is waited for, as the hook waits for it, and counted
    late. No latencies (reading them would take the wake-ups this avoids): ``waits_us``,
    each late answer's wait at the run's next step, and ``in_time``, the answers that
    were there when it came."""
    assert spec.rate_hz
    runs = [_connect(spec, i) for i in range(spec.runs)]
    pause = spec.start_at - time.time()
    if pause > 0:
        time.sleep(pause)
    began = time.perf_counter()
    end = began + spec.seconds
    period = 1.0 / spec.rate_hz
    for i, run in enumerate(runs):  # spread over one period
        run.next_at = began + period * i / len(runs)
    answered = late = in_time = waited_for = 0
    waits: list[float] = []
    now = began
    while now < end:
        run = min(runs, key=lambda r: r.next_at)
        if run.next_at > now:
            time.sleep(run.next_at - now)
        now = time.perf_counter()
        if run.waiting:
            waited = _read_answer(run, now)
            answered += 1
            if not waited:
                in_time += 1
            else:
                now = time.perf_counter()  # (a send the wait delayed may go out late)
                waited_for += 1
                if len(waits) < _MAX_SAMPLES:
                    waits.append(waited * 1e6)
        late += run.send_next(now, period)
        now = time.perf_counter()
    elapsed = time.perf_counter() - began
    for run in runs:
        if run.waiting:
            _read_answer(run, time.perf_counter())
        _bye(run.sock)
    return {"answered": answered, "seconds": elapsed, "latencies_us": [], "late": late,
            "in_time": in_time, "waited": waited_for, "waits_us": waits}


def _read_answer(run: _Run, now: float) -> float:
    """The answer to ``run``'s last observation: read at once if it is there, else waited
    for (the seconds waited, 0 when it was there)."""
    got = 0
    with contextlib.suppress(BlockingIOError):  # nothing yet
        got = run.replies(run.sock.recv(1 << 16))
    if got:
        run.waiting = False
        return 0.0
    run.sock.setblocking(True)
    run.sock.settimeout(30)
    try:
        while not got:
            data = run.sock.recv(1 << 16)
            if not data:
                raise ConnectionError("the controller closed a connection")
            got = run.replies(data)
    finally:
        run.sock.setblocking(False)
    run.waiting = False
    return max(time.perf_counter() - now, 1e-9)


def _bye(sock: socket.socket) -> None:
    try:
        sock.setblocking(True)
        sock.sendall(encode({"t": "bye"}))
    except OSError:
        pass
    sock.close()


class _ChurnRun(_Run):
    def __init__(self, sock: socket.socket, seed: int, ends_at: float,
                 compact: bool = False) -> None:
        super().__init__(sock, seed, compact)
        self.ends_at = ends_at
        self.decoder: FrameDecoder | None = None  # the handshake is under way


def drive_churn(spec: SimSpec) -> dict[str, Any]:
    """Paced runs that end after a random lifetime and are replaced by new ones."""
    assert spec.lifetime is not None and spec.rate_hz
    lo, hi = spec.lifetime
    rng = random.Random(spec.seed or os.getpid())
    sel = selectors.DefaultSelector()
    period = 1.0 / spec.rate_hz
    counter = 0
    started = ended = answered = late = 0
    latencies: list[float] = []
    handshakes: list[float] = []

    def begin(now: float, handshake: bool, lifetime: float) -> _ChurnRun:
        nonlocal counter, started
        if handshake:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(30)
            sock.connect(spec.socket)
            sock.setblocking(False)
            run = _ChurnRun(sock, counter, now + lifetime)
            run.decoder = FrameDecoder()
            run.sent_at = now
            sock.sendall(_hello(spec, counter))  # a small frame: the buffer takes it
        else:  # the first runs connect before the window, as in :func:`drive`
            base = _connect(spec, counter)
            run = _ChurnRun(base.sock, counter, now + lifetime, base.compact)
        counter += 1
        started += 1
        sel.register(run.sock, selectors.EVENT_READ, run)
        return run

    def end(run: _ChurnRun) -> None:
        nonlocal ended
        sel.unregister(run.sock)
        _bye(run.sock)
        ended += 1

    runs = [begin(0.0, False, 0.0) for _ in range(spec.runs)]
    started = 0  # the runs of the window's start are not counted as started in it
    pause = spec.start_at - time.time()
    if pause > 0:
        time.sleep(pause)
    began = time.perf_counter()
    stop = began + spec.seconds
    for i, run in enumerate(runs):  # spread over one period; lifetimes from the start
        run.next_at = began + period * i / len(runs)
        run.ends_at = began + rng.uniform(lo, hi)
    now = began
    while now < stop:
        for i, run in enumerate(runs):
            if run.decoder is not None or run.waiting:
                continue
            if now >= run.ends_at:
                end(run)
                run = runs[i] = begin(now, True, rng.uniform(lo, hi))
                continue
            if now >= run.next_at:
                late += run.send_next(now, period)
        due = [r.next_at for r in runs if r.decoder is None and not r.waiting]
        timeout = max(0.0, min(due) - time.perf_counter()) if due else 0.05
        for key, _ in sel.select(min(timeout, 0.05)):
            run = key.data
            data = run.sock.recv(1 << 16)
            if not data:
                raise ConnectionError("the controller closed a connection")
            now = time.perf_counter()
            if run.decoder is not None:
                msgs = run.decoder.feed(data)
                if msgs:
                    if msgs[0]["t"] != "welcome":
                        raise ConnectionError(f"no welcome: {msgs[0]}")
                    run.decoder = None
                    run.compact = compact_agreed(msgs[0].get("compact"))
                    handshakes.append((now - run.sent_at) * 1e6)
                    run.next_at = now
                continue
            got = run.replies(data)
            if got and run.waiting:
                run.waiting = False
                answered += 1
                if len(latencies) < _MAX_SAMPLES:
                    latencies.append((now - run.sent_at) * 1e6)
        now = time.perf_counter()
    elapsed = time.perf_counter() - began
    ended_in_window = ended
    for run in runs:  # wait for what is in flight, then end every run
        deadline = time.perf_counter() + 30
        while (run.waiting or run.decoder is not None) and time.perf_counter() < deadline:
            run.sock.setblocking(True)
            run.sock.settimeout(30)
            data = run.sock.recv(1 << 16)
            if not data:
                raise ConnectionError("the controller closed a connection")
            if run.decoder is not None:
                if run.decoder.feed(data):
                    run.decoder = None
            elif run.replies(data):
                run.waiting = False
                answered += 1
        end(run)
    return {"answered": answered, "seconds": elapsed, "latencies_us": latencies, "late": late,
            "handshakes_us": handshakes, "started": started, "ended": ended_in_window,
            "ended_total": ended,
            "max_us": max(latencies, default=float("nan"))}


def spawn(spec: SimSpec) -> subprocess.Popen[bytes]:
    """A worker process that drives ``spec``'s runs (see :func:`main`)."""
    return subprocess.Popen([sys.executable, "-m", "lrctl.bench._simrun",
                             json.dumps(dataclasses.asdict(spec))], stdout=subprocess.PIPE)


def collect(procs: list[subprocess.Popen[bytes]]) -> list[dict[str, Any]]:
    """Each worker's result, once it has ended; a failed worker is an error."""
    parts = []
    for proc in procs:
        out, _ = proc.communicate(timeout=120)
        if proc.returncode != 0:
            raise RuntimeError(f"a simulated-run worker failed (exit {proc.returncode})")
        parts.append(json.loads(out))
    return parts


def main(argv: list[str] | None = None) -> int:
    """``python -m lrctl.bench._simrun SPEC_JSON``: drive, print the result as JSON."""
    raw = json.loads((argv or sys.argv[1:])[0])
    if raw.get("lifetime") is not None:
        raw["lifetime"] = tuple(raw["lifetime"])
    spec = SimSpec(**raw)
    json.dump(drive_churn(spec) if spec.lifetime else drive(spec), sys.stdout)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
