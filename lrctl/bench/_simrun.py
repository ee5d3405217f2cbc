"""Simulated training runs for ``lrctl bench throughput``: raw protocol clients, no torch.

A worker process drives many runs over one ``selectors`` loop. Each run does
the hello/welcome handshake like the hook, then sends observations (a loss
curve with noise) either closed-loop (the next one as soon as the answer
arrives: "unpaced") or at a fixed rate per run. Replies are counted by their
frame headers only, so the workers spend as little CPU as possible next to the
controller they measure.
"""

from __future__ import annotations

import math
import os
import random
import selectors
import socket
import struct
import time
from dataclasses import dataclass
from typing import Any

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


class _Run:
    def __init__(self, sock: socket.socket, seed: int) -> None:
        self.sock = sock
        self.step = 0
        self.sent_at = 0.0
        self.next_at = 0.0
        self.waiting = False
        self.buf = b""
        self.rng = random.Random(seed)

    def obs(self) -> bytes:
        loss = 2.0 * math.exp(-self.step / 3000) + 0.3 + 0.02 * self.rng.random()
        frame = encode_obs(self.step, loss, 1.0 + 0.1 * self.rng.random())
        self.step += 1
        return frame

    def replies(self, data: bytes) -> int:
        """Whole frames received (only headers are read)."""
        self.buf += data
        n = 0
        while len(self.buf) >= 4:
            (size,) = _HEADER.unpack_from(self.buf)
            if len(self.buf) < 4 + size:
                break
            self.buf = self.buf[4 + size:]
            n += 1
        return n


def _connect(spec: SimSpec, index: int) -> _Run:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(30)
    sock.connect(spec.socket)
    hello = {"t": "hello", "run": f"sim-{spec.tag}-{os.getpid()}-{index}",
             "run_name": f"sim-{index}", "policy": {"text": spec.policy_text,
                                                     "source": "<bench>"},
             "lrs": [1e-3], "groups": 1, "world_size": 1,
             "mlflow": {"run_id": None, "tracking_uri": None}, "cwd": os.getcwd()}
    sock.sendall(encode(hello, MAX_HELLO))
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
    return _Run(sock, index)


def drive(spec: SimSpec) -> dict[str, Any]:
    """Run ``spec.runs`` simulated runs; answered observations and their latencies (µs)."""
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
                run.sent_at = now
                run.waiting = True
                run.sock.send(run.obs())
                if period:
                    run.next_at += period
                    if run.next_at < now:
                        late += 1
                        run.next_at = now + period
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
        try:
            run.sock.setblocking(True)
            run.sock.sendall(encode({"t": "bye"}))
        except OSError:
            pass
        run.sock.close()
    return {"answered": answered, "seconds": elapsed, "latencies_us": latencies, "late": late}


def main(argv: list[str] | None = None) -> int:
    """``python -m lrctl.bench._simrun SPEC_JSON``: drive, print the result as JSON."""
    import json
    import sys

    spec = SimSpec(**json.loads((argv or sys.argv[1:])[0]))
    json.dump(drive(spec), sys.stdout)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
