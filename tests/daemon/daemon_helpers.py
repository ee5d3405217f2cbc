"""Helpers shared by the daemon tests: a real controller process, an in-process one on a
real socket with a raw client, and test curves."""

from __future__ import annotations

import contextlib
import resource
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from live_controller import wait_until_serving

import lrctl
from lrctl.daemon import Limits, Server
from lrctl.daemon.store import StateStore
from lrctl.protocol import FrameDecoder
from lrctl.sinks import NullSink, Sink

REPO = Path(__file__).resolve().parents[2]
POLICIES = REPO / "policies"


class ControllerProc:
    """One ``lrctl serve --foreground`` process; restartable on the same socket and state."""

    def __init__(self, socket_path: str, state_dir: str, extra: list[str] | None = None,
                 env: dict[str, str] | None = None, audit: bool = False,
                 nofile: int | None = None) -> None:
        self.audit = audit  # False: --no-audit (no journal, no MLflow)
        self.nofile = nofile  # its open-file limit, soft and hard ('ulimit -n')
        self.socket = socket_path
        self.state_dir = state_dir
        self.extra = list(extra or [])
        self.env = env
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = Path(state_dir).parent / "serve.out"

    def start(self, wait: bool = True) -> ControllerProc:
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "lrctl", "serve", "--foreground",
                 *([] if self.audit else ["--no-audit"]),
                 "--socket", self.socket, "--state-dir", self.state_dir, *self.extra],
                stdout=out, stderr=subprocess.STDOUT, env=self.env, cwd=REPO,
                preexec_fn=None if self.nofile is None else self._limit_files)
        if wait:
            self.wait_ready()
        return self

    def _limit_files(self) -> None:  # in the child, before exec
        assert self.nofile is not None
        resource.setrlimit(resource.RLIMIT_NOFILE, (self.nofile, self.nofile))

    def wait_ready(self) -> None:
        assert self.proc is not None
        wait_until_serving(self.proc, self.socket, self.log)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> int:
        """SIGTERM and wait: the clean shutdown path."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode

    def ensure_dead(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def until(what: Callable[[], Any], why: str, deadline_s: float = 300.0) -> Any:
    """``what()``'s first truthy answer, looked at every 0.1 s; fails after ``deadline_s``
    (a hang), saying what it waited for. Generous: under load (3 busy loops on 2 cores) a
    controller's MLflow shipper took 40 s and more to import MLflow and ship."""
    deadline = time.monotonic() + deadline_s
    while not (got := what()):
        assert time.monotonic() < deadline, f"timed out waiting for {why}"
        threading.Event().wait(0.1)
    return got


def train(name: str, steps: int) -> lrctl.Controller:
    """A sync hook (never spawning a controller) on a run named ``name``, after ``steps``
    steps of SGD on two weights, its loss ``2 / (t + 1)``: the ``lrctl.Controller``."""
    import torch  # (here: the helpers' other users need none)

    opt = torch.optim.SGD([torch.nn.Parameter(torch.ones(2))], lr=0.1)
    ctl = lrctl.attach(opt, sync=True, spawn=False, run_name=name)
    for t in range(steps):
        ctl.step(2.0 / (t + 1), grad_norm=1.0)
        opt.step()
    return ctl


def losses(n: int, seed: int = 0, spikes: tuple[int, ...] = ()) -> list[float]:
    """A deterministic, noisy, decaying loss curve with optional spikes and a NaN."""
    import random

    rng = random.Random(seed)
    out = []
    for t in range(n):
        loss = 2.0 / (1 + t / 50) + rng.random() * 0.05
        if t in spikes:
            loss = float("nan") if t % 2 else loss * 40
        out.append(loss)
    return out


class QuietHandler:
    """A transport handler with nothing to do but ``handle`` (subclasses answer): the
    transport's side alone, in process, with real sockets."""

    def handle(self, conn: Any, msg: dict[str, Any]) -> None:
        raise NotImplementedError

    def disconnected(self, conn: Any, save: bool) -> None:
        pass

    def commit(self) -> None:
        pass

    def woken(self) -> None:
        pass


def serve_until(transport: Any, done: Callable[[], bool], deadline_s: float = 30.0) -> None:
    """Turn an in-process transport's loop (wake-ups, then the group commit) until
    ``done()``."""
    deadline = time.monotonic() + deadline_s
    while not done():
        assert time.monotonic() < deadline, "timed out"
        transport.serve(transport.select(0.01))
        transport.release()


def read_frames(transport: Any, sock: socket.socket, n: int) -> list[dict[str, Any]]:
    """Serve ``transport`` until ``n`` frames have come to the peer's end ``sock``."""
    decoder, got = FrameDecoder(1 << 17), []
    sock.setblocking(False)

    def read() -> bool:
        with contextlib.suppress(BlockingIOError):
            got.extend(decoder.feed(sock.recv(1 << 20)))
        return len(got) >= n

    serve_until(transport, read)
    return got


class Client:
    """A raw protocol client on a Unix socket: frames out, decoded messages in."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(10)
        self.sock.connect(path)
        self.decoder = FrameDecoder(1 << 22)
        self.pending: list[dict[str, Any]] = []

    def send(self, frame: bytes) -> None:
        self.sock.sendall(frame)

    def answer(self) -> dict[str, Any]:
        while not self.pending:
            data = self.sock.recv(1 << 16)
            assert data, "the controller closed the connection"
            self.pending += self.decoder.feed(data)
        return self.pending.pop(0)

    def nothing_received(self) -> bool:
        """True if no byte has arrived (without waiting for one)."""
        timeout = self.sock.gettimeout()
        self.sock.setblocking(False)
        try:
            data = self.sock.recv(1, socket.MSG_PEEK)
        except BlockingIOError:
            return not self.pending
        finally:
            self.sock.settimeout(timeout)
        assert data, "the controller closed the connection"
        return False


@contextlib.contextmanager
def serving(path: str, store: StateStore, sink: Sink | None = None,
            limits: Limits | None = None) -> Iterator[tuple[Server, str]]:
    """An in-process controller on ``store`` listening at ``path``, its loop on a thread;
    stopped on exit."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(8)
    srv = Server([(listener, True)], store, sink or NullSink(), socket_path=path, watch=False,
                 limits=limits)
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll": 0.05}, daemon=True)
    thread.start()
    try:
        yield srv, path
    finally:
        srv.stop()
        thread.join(30)
        assert not thread.is_alive()


class OversizeStore(StateStore):
    """Every state is too large to checkpoint; ``encodes`` counts the (costly) tries."""

    def __init__(self, state_dir: Path) -> None:
        super().__init__(state_dir)
        self.encodes = 0

    def encode(self, state: dict[str, Any]) -> bytes:  # type: ignore[override]
        self.encodes += 1
        raise ValueError("the run's state takes 20000000 bytes, more than a checkpoint "
                         "may hold")
