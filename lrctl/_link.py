"""The hook's connection to the controller: non-blocking I/O, handshake, replay, back-off.

Runs on the training thread, with no thread of its own: every call does a few
non-blocking syscalls and returns. Stdlib and :mod:`lrctl.wire` only.

Exact resume: the controller checkpoints each session every second (every 4 096
observations at most) and says in each reply which step it last saved (``saved_step``).
The link keeps the frames of the observations after that step (and of those it
could not send while the controller was down) in a bounded buffer. After a
reconnect, the ``welcome`` says where the (possibly restored) session stands;
the link replays the buffered frames after that step, in order, so the policies
see every observation exactly once, as if nothing had happened. Each replayed frame
says which LRs its step ran on (``u``, from :attr:`Link.used_at`): the hook's, which
the controller's decisions on the replayed steps did not change (see
:mod:`lrctl._lr_history`).

The welcome also carries the run's resume token; the link sends it in its later
hellos, so that its own reconnect may take the run over from a connection the
controller still thinks alive. Over TCP the link first sends an ``auth`` frame
with the token: the controller reads nothing large from a peer before that.
"""

from __future__ import annotations

import logging
import math
import os
import select
import socket
import time
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any

from . import paths
from .wire.compact import compact_agreed, to_json_frame
from .wire.decoder import FrameDecoder
from .wire.errors import ProtocolError
from .wire.frames import MAX_HELLO, encode
from .wire.messages import says_used, with_used
from .wire.unix import connect_unix

__all__ = ["Link"]

log = logging.getLogger("lrctl")

BUFFER_MAX = 100_000
MAX_PENDING_OUT = 4 << 20
RECV_SIZE = 1 << 16
_READABLE = select.POLLIN | select.POLLPRI | select.POLLERR | select.POLLHUP

#: How long :meth:`Link.wait` checks for the answer without sleeping before it blocks in
#: ``poll``: a sync hook's round trip is ~100 µs, and waking a thread that slept in
#: ``poll`` costs tens of µs on a VM (the training thread waits either way). Not on a
#: single CPU, where the spin would hold the core the controller needs to answer.
SPIN_S = 200e-6 if (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                    else os.cpu_count() or 1) > 1 else 0.0
RESPAWN_AFTER_S = 2.0
RESPAWN_EVERY_S = 30.0


class Link:
    """One run's connection. ``on_message`` gets every ``welcome``/``lr``/``error``."""

    def __init__(self, address: str, hello: Mapping[str, Any],
                 on_message: Callable[[dict[str, Any]], None], *,
                 warn: Callable[[str, str], None], max_backoff: float = 5.0,
                 buffer_max: int = BUFFER_MAX,
                 respawn: Callable[[bool], tuple[str, str] | None] | None = None,
                 token: str | None = None) -> None:
        self.kind, self.addr = paths.parse_address(address)
        self.address = address
        self.hello = dict(hello)  # its resume_token follows the welcomes
        # Fields that change while the run goes on (the snapshots held), refreshed before
        # each hello is sent.
        self.refresh_hello: Callable[[dict[str, Any]], None] | None = None
        # A resume from ctl.state_dict() sends the run's state in its hello; a reconnect
        # sends it again (with the frames after it: a controller that lost the run gets it
        # back exactly) only while the buffer still holds every frame after its step.
        self._session_step: int | None = None
        self.token = token  # TCP: shown in an ``auth`` frame before the hello
        self.spin_s = SPIN_S
        self.on_message = on_message
        self.warn = warn
        self.max_backoff = max_backoff
        self.buffer: deque[tuple[int, bytes]] = deque()
        self.buffer_max = buffer_max
        self.overflowed = False
        self.state = "down"  # down | handshake | up | closed
        self.welcomed = False
        self.compact = False  # the controller reads compact obs frames (its welcome says)
        self.fatal: dict[str, Any] | None = None  # a refusal we must not retry into
        self._sock: socket.socket | None = None
        self._poller = select.poll()
        # Every frame up to MAX_HELLO: a snapshot answer carries the run's whole state.
        self._decoder = FrameDecoder(MAX_HELLO)
        self._out = bytearray()
        self._backoff = 0.1
        self._next_attempt = 0.0
        # Start a new controller when the one we had is gone for good (spawn=True):
        # after RESPAWN_AFTER_S of failed reconnects, at most every RESPAWN_EVERY_S.
        self.respawn = respawn
        # The LRs a step ran on, for the frames it replays (None: the step is forgotten).
        self.used_at: Callable[[int], list[float] | None] | None = None
        self.says_used = False  # the controller reads u, the LRs a step ran on (its welcome)
        self.says_late = False  # ... and late, the steps that ran without their answer
        # Bytes of the replay under way: what may wait unsent beyond MAX_PENDING_OUT (a
        # long outage's frames go out at once; the controller reads them as it can).
        self._replaying = 0
        self._down_since: float | None = None
        self._last_respawn = -RESPAWN_EVERY_S

    @property
    def connected(self) -> bool:
        return self.state == "up"

    @property
    def idle(self) -> bool:
        """Up with nothing left to send: a :meth:`pump` could only find unsolicited frames."""
        return self.state == "up" and not self._out

    # -- connecting ----------------------------------------------------------------------
    def open(self, timeout: float) -> bool:
        """Connect and send ``hello``; the ``welcome`` is read later. False if nobody answers."""
        try:
            if self.kind == "unix":
                sock = connect_unix(self.addr, timeout)  # type: ignore[arg-type]
            else:
                sock = socket.create_connection(self.addr, timeout=timeout)  # type: ignore[arg-type]
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.setblocking(False)
        except OSError as exc:
            self._down(f"cannot connect to {self.address}: {exc.strerror or exc}")
            return False
        self._sock = sock
        self._poller = select.poll()  # a zero-timeout poll is far cheaper than a failed recv
        self._poller.register(sock, _READABLE)
        self._decoder = FrameDecoder(MAX_HELLO)
        self._out = bytearray(encode({"t": "auth", "token": self.token})
                              if self.kind == "tcp" else b"")
        if self.refresh_hello is not None:
            self.refresh_hello(self.hello)
        self._out += encode({"t": "hello", **self.hello}, MAX_HELLO)
        self.state = "handshake"
        self._flush()
        return self._sock is not None

    def _maybe_respawn(self) -> None:
        now = time.monotonic()
        if self._down_since is None:
            self._down_since = now
        if (self.respawn is None or now - self._down_since < RESPAWN_AFTER_S
                or now - self._last_respawn < RESPAWN_EVERY_S):
            return
        self._last_respawn = now
        try:
            said = self.respawn(self.welcomed)  # (welcomed: the run has a checkpoint)
        except Exception as exc:  # fail-open: keep training, keep trying to reconnect
            self.warn("respawn", f"lrctl: could not start a new controller ({exc!r})")
            return
        if said:
            self.warn(*said)
        # A controller answers within a second or so of its start: look for it soon, not
        # after the back-off reached so far (up to max_backoff).
        self._backoff = 0.1
        self._next_attempt = now + self._backoff

    def _down(self, reason: str) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        if self.state in ("up", "handshake"):
            self.warn("down", f"lrctl: lost the controller ({reason}); training continues at "
                              "the last LR and the hook reconnects in the background")
            log.info("lrctl link down: %s", reason)
        if self.state != "closed":
            self.state = "down"
        self._out.clear()
        self._replaying = 0
        self._next_attempt = time.monotonic() + self._backoff
        self._backoff = min(self._backoff * 2, self.max_backoff)

    # -- the per-step work ---------------------------------------------------------------
    def send_obs(self, step: int, frame: bytes) -> None:
        if len(self.buffer) >= self.buffer_max:
            self.buffer.popleft()
            if not self.overflowed:
                self.overflowed = True
                self.warn("overflow", f"lrctl: more than {self.buffer_max} observations were "
                                      "not acknowledged; the oldest are dropped, so decisions "
                                      "after reconnecting may differ from an uninterrupted run")
        self.buffer.append((step, frame))
        if self.state == "up":
            self._write(frame)

    def send(self, msg: Mapping[str, Any]) -> None:
        """A request on this run's connection (its answer reaches ``on_message``)."""
        if self.state == "up":
            self._write(encode(dict(msg)))

    def pump(self, expect: bool = False) -> None:
        """Reconnect when due, send what is queued, handle what arrived. Never blocks long
        (a reconnect waits at most 0.1 s for room in a busy controller's backlog).
        ``expect``: an answer has most likely come (see :meth:`_read`)."""
        if (self.state == "down" and self.fatal is None
                and time.monotonic() >= self._next_attempt and not self.open(timeout=0.1)):
            self._maybe_respawn()
        if self._sock is None:
            return
        if self._out:
            self._flush()
        self._read(expect)

    def wait(self, done: Callable[[], bool], timeout: float) -> bool:
        """Read until ``done()`` or the timeout; False on timeout or a lost connection."""
        deadline = time.monotonic() + timeout
        spin_until = time.perf_counter() + min(self.spin_s, timeout)
        while not done():
            if self._sock is None:
                return False
            if not self._out and time.perf_counter() < spin_until:
                self._read()  # non-blocking: one poll(0), a recv when something came
                continue
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            # poll, not select: select fails on descriptors >= 1024, common in big jobs
            waiter = select.poll()
            waiter.register(self._sock, _READABLE | (select.POLLOUT if self._out else 0))
            try:
                waiter.poll(left * 1000.0)
            except OSError:
                self._down("poll failed")
                return False
            self.pump()
        return True

    def reconnect_now(self, timeout: float) -> bool:
        """One attempt now, back-off or not, and the welcome awaited (at most ``timeout``):
        a controller restarted meanwhile gets the observations it has not seen, replayed.
        A socket nobody listens on fails at once."""
        if self.state != "down" or self.fatal is not None:
            return self.connected
        if self.open(timeout=min(timeout, 0.5)):
            self.wait(lambda: self.state != "handshake", timeout)
        return self.connected

    def close(self, bye: bool = True, timeout: float = 1.0) -> None:
        if self.state == "up" and bye:
            self._write(encode({"t": "bye"}))
            deadline = time.monotonic() + timeout
            waiter = select.poll()
            if self._sock is not None:
                waiter.register(self._sock, select.POLLOUT)
            while self._out and self._sock is not None and time.monotonic() < deadline:
                waiter.poll(max(deadline - time.monotonic(), 0.0) * 1000.0)
                self._flush()
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        self.state = "closed"

    # -- I/O -----------------------------------------------------------------------------
    def _write(self, frame: bytes) -> None:
        if self._out:
            self._out += frame
            if len(self._out) > max(MAX_PENDING_OUT, self._replaying):
                self._down("the controller does not read what the hook sends")
            return
        assert self._sock is not None
        try:
            sent = self._sock.send(frame)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError as exc:
            self._send_failed(exc)
            return
        if sent < len(frame):
            self._out += frame[sent:]

    def _flush(self) -> None:
        assert self._sock is not None
        try:
            sent = self._sock.send(self._out)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._send_failed(exc)
            return
        del self._out[:sent]
        if not self._out:
            self._replaying = 0  # the replay is out: the usual bound again

    def _send_failed(self, exc: OSError) -> None:
        """The controller closed the connection: read why first (a fatal ``error`` frame,
        such as ``run_taken_over``, may be waiting), then go down."""
        self._read()
        if self._sock is not None:
            self._down(str(exc.strerror or exc))

    def _read(self, expect: bool = False) -> None:
        """Handle what arrived. Runs every step, so: poll first (no exception when nothing
        came), and a short read means the socket is drained (no second ``recv``).
        ``expect``: something has most likely come (the answer to the step before), so the
        first ``recv`` goes without its poll (one system call instead of two; an empty
        socket costs an exception instead)."""
        while self._sock is not None and (expect or self._poller.poll(0)):
            expect = False
            try:
                data = self._sock.recv(RECV_SIZE)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                self._down(str(exc.strerror or exc))
                return
            if not data:
                self._down("the controller closed the connection")
                return
            try:
                messages = self._decoder.feed(data)
            except ProtocolError as exc:
                self._down(f"bad frame from the controller: {exc}")
                return
            for msg in messages:
                self._handle(msg)
            if len(data) < RECV_SIZE:
                return

    def _handle(self, msg: dict[str, Any]) -> None:
        t = msg["t"]
        if t == "welcome":
            self._welcome(msg)
        elif t == "lr":
            saved = msg.get("saved_step")
            if isinstance(saved, int):
                while self.buffer and self.buffer[0][0] <= saved:
                    self.buffer.popleft()
                if self._session_step is not None and saved > self._session_step:
                    # Checkpointed past the resumed state: a reconnect that sent it again
                    # would take the run back to it, without the frames in between.
                    self.hello.pop("session", None)
                    self._session_step = None
        elif t == "error" and msg.get("fatal"):
            if not msg.get("retry"):
                self.fatal = msg  # no reconnecting into the same refusal
            self.state = "down"  # quietly: the hook reports the refusal itself
            self._down(str(msg.get("message")))
            self.on_message(msg)
            return
        self.on_message(msg)

    def _welcome(self, msg: Mapping[str, Any]) -> None:
        last = msg.get("last_step")
        last = last if isinstance(last, int) else -1
        if "session" in self.hello:
            saved = msg.get("saved_step")
            self._session_step = saved if isinstance(saved, int) else last
        token = msg.get("resume_token")
        if isinstance(token, str):
            self.hello["resume_token"] = token
        initial = msg.get("initial_lrs")
        if (isinstance(initial, list) and len(initial) == len(self.hello["lrs"])
                and all(type(v) in (int, float) and math.isfinite(v) and v >= 0
                        for v in initial)):
            self.hello["lrs"] = list(initial)  # the run's (see LinkSide._adopt_initial)
        if self.welcomed and not msg.get("restored"):
            self.warn("lost_state", "lrctl: the controller had no saved state for this run; "
                                    "its policies start over from the observations the hook "
                                    "still holds")
        self.welcomed = True
        self.state = "up"
        self._backoff = 0.1
        self._down_since = None
        while self.buffer and self.buffer[0][0] <= last:
            self.buffer.popleft()
        agreed = compact_agreed(msg.get("compact"))
        if self.compact and not agreed:  # a controller that reads only JSON
            self.buffer = deque((step, to_json_frame(frame)) for step, frame in self.buffer)
        self.compact = agreed
        self.says_used = type(msg.get("used")) is int and msg.get("used") == 1
        self.says_late = type(msg.get("late")) is int and msg.get("late") == 1
        used_at = self.used_at
        self._replaying = 2 * sum(len(frame) for _, frame in self.buffer)  # (u grows some)
        for step, frame in self.buffer:  # replay, in order: see the module docstring
            if not self.says_used:  # (a controller from before u, of the same version)
                if says_used(frame):
                    frame = with_used(frame, None)
            elif used_at is not None and not says_used(frame):
                used = used_at(step)
                if used is not None:
                    frame = with_used(frame, used)
            self._write(frame)
            if self.state != "up":
                return
        log.info("lrctl link up at step %d (%d observation(s) replayed)", last, len(self.buffer))
