"""Connections: frame, authenticate, send, close; the loop's wake-up; group commit.

The transport owns the selector and every connection (who gets and keeps one is
:mod:`~lrctl.daemon.admission`'s job). Complete messages go to a :class:`Handler`
(the server), decoded one at a time within the peer's share of a wake-up (see
:meth:`Transport._take`); a message that breaks the protocol earns an ``error`` frame, and
input we cannot go on from (a broken frame, a refused hello, a wrong token) a
fatal one and a closed connection. Nothing a peer sends can disturb the loop or
the other connections, and the loop never blocks on a peer: a reply it cannot
take now waits in its connection's buffer (bounded by ``Limits.max_outbuf``),
and a peer told to go, or that ended its input, gets ``Limits.linger_s`` to read its
last frames, counted again from each read of them (one that reads them all, slowly,
gets them all).

A TCP peer shows its token first: until it has, its frames may be at most
``Limits.max_unauthed_frame`` bytes and only the first is decoded, so a stranger
cannot make the controller parse a megabyte of JSON. A hook sends an ``auth``
frame with the token, then its hello (which may be up to ``MAX_HELLO``).

Group commit: :meth:`Transport.hold` (called when the journal took a record that
is not durable yet) makes every frame sent from then on wait in its connection's
``held`` buffer; :meth:`Transport.release`, once per loop wake-up, first calls
:meth:`Handler.commit` (one fsync per journal file) and only then sends what was
held. So no reply that carries a decision leaves before the decision is on disk,
and frames on a connection keep their order.

Paced reading (:mod:`~lrctl.daemon.pacing`): a fast async hook's connection leaves the
selector and is read on a timer, so that its sends wake nobody. :meth:`select` waits
until the next look is due on the selector's own descriptor with ``select()``, to the
microsecond (``epoll`` counts whole milliseconds), so any other peer still wakes it;
:meth:`serve` then reads the connections due.
"""

from __future__ import annotations

import contextlib
import hmac
import logging
import math
import selectors
import socket
import time
from collections.abc import Callable, Mapping
from typing import Any

from ..wire.decoder import FrameDecoder
from ..wire.errors import ProtocolError
from ..wire.frames import MAX_FRAME, MAX_HELLO
from .admission import Admission, bind_unix
from .conn import Conn, Handler, Refused, Unavailable
from .limits import Limits
from .paced_reading import PacedReading
from .pacing import Pacing
from .ratelog import RateLog
from .writing import Writing

__all__ = ["Conn", "Handler", "Refused", "Transport", "Unavailable", "bind_unix"]

log = logging.getLogger("lrctl.daemon")


class Transport(Writing, PacedReading):
    """Every socket of one controller; ``listeners`` are bound, listening sockets, each with
    whether its peers are trusted (Unix) or must show ``token`` first (TCP)."""

    def __init__(self, listeners: list[tuple[socket.socket, bool]], handler: Handler, *,
                 limits: Limits, token: str | None = None, socket_path: str = "",
                 pacing: bool = True) -> None:
        self.sel = selectors.DefaultSelector()
        self._sel_fd = self.sel.fileno() if hasattr(self.sel, "fileno") else -1
        self.handler = handler
        self.limits = limits
        self.token = token.encode("utf-8") if token else None
        self.socket_path = socket_path
        self.nconns = 0
        self.nremote = 0
        self._conns: dict[Conn, None] = {}
        self._backlogged: dict[Conn, None] = {}  # peers with messages for the next wake-up
        self._share = self.limits.max_wake_share_s  # a busy peer's, this wake-up (see serve)
        self.rlog = RateLog(log)
        self._reading: Conn | None = None  # the connection whose batch is being handled
        self._holding = False
        self._held: list[Conn] = []
        # Other threads (the policy watcher, the checkpoint writer) wake the loop here.
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self.sel.register(self._wake_r, selectors.EVENT_READ, ("wake", None))
        self.admission = Admission(self, listeners, limits, socket_path)
        self.pacing = Pacing(limits.pace_interval_s, limits.pace_after) if pacing else None

    # -- the loop ----------------------------------------------------------------------
    def select(self, timeout: float) -> list[tuple[selectors.SelectorKey, int]]:
        # Messages left over from the last wake-up (see _take): no sleeping on them.
        if self._backlogged:
            return self.sel.select(timeout=0)
        if self.pacing is not None and self.pacing.next_due - time.monotonic() < timeout:
            return self._until_look()
        return self.sel.select(timeout=timeout)

    def serve(self, ready: list[tuple[selectors.SelectorKey, int]]) -> None:
        """Accept, read and write what :meth:`select` found ready; then the next share of
        what peers sent before this wake-up and is still waiting (see :meth:`_take`)."""
        carried = list(self._backlogged)
        # Each busy peer's share of this wake-up (see Limits.wake_busy_s).
        busy = len(ready) + len(carried)
        limits = self.limits
        self._share = (limits.max_wake_share_s if busy <= 1 else
                       max(limits.min_wake_share_s,
                           min(limits.max_wake_share_s, limits.wake_busy_s / busy)))
        for key, mask in ready:
            kind, arg = key.data
            if kind == "listen":
                self.admission.accept(key.fileobj, arg)  # type: ignore[arg-type]
            elif kind == "wake":
                with contextlib.suppress(OSError):
                    while self._wake_r.recv(4096):
                        pass
                self.handler.woken()
            elif mask & selectors.EVENT_READ and self._read(arg):
                if mask & selectors.EVENT_WRITE:
                    self._flush(arg)
            elif mask & selectors.EVENT_WRITE:
                self._flush(arg)
        for conn in carried:
            if conn in self._backlogged:
                self._serve_backlog(conn)
        if self.pacing is not None and self.pacing.next_due < math.inf:
            self._serve_paced()

    def _serve_backlog(self, conn: Conn) -> None:
        del self._backlogged[conn]
        if conn.sock.fileno() < 0 or conn.failed:
            return
        self._take(conn)
        if (conn.run is None or conn.partial) and conn.sock.fileno() >= 0:
            self.admission.note_partial(conn)  # what it holds now, handled in part
        if conn.dead:
            self._hung_up(conn)
        elif conn.closing and not conn.decoder.has_frame and conn.sock.fileno() >= 0:
            self._close_after(conn)  # its end came while these waited (see _close_after)

    def wake(self) -> None:
        """Wake the loop (from another thread)."""
        with contextlib.suppress(OSError):  # full: the loop is awake already
            self._wake_w.send(b"\0")

    def connections(self) -> list[Conn]:
        return list(self._conns)

    def open_conn(self, sock: socket.socket, authed: bool, name: str) -> Conn:
        """A new connection (admission accepted it)."""
        sock.setblocking(False)
        # Its first message is decoded alone (the token, else a hello or an operator's
        # request): what a hook sends after its hello waits undecoded until the welcome.
        decoder = FrameDecoder(MAX_FRAME, gated=True, first_limit=MAX_HELLO if authed
                               else self.limits.max_unauthed_frame,
                               max_containers=self.limits.max_frame_containers)
        conn = Conn(sock, authed, name, decoder)
        self._conns[conn] = None
        self.nconns += 1
        self.nremote += conn.remote
        self.sel.register(sock, selectors.EVENT_READ, ("conn", conn))
        return conn

    def housekeeping(self, now: float) -> None:
        """Close peers that outstayed their welcome (see admission) or their linger."""
        self.admission.housekeeping(now)
        self.close_lingering(now)

    def close(self) -> None:
        """Close every connection, the wake-up and the listeners (the loop has ended)."""
        self.sel.unregister(self._wake_r)
        self._wake_r.close()
        self._wake_w.close()
        for conn in self.connections():
            self.close_conn(conn, save=False)
        self.admission.close()
        self.sel.close()

    # -- group commit ------------------------------------------------------------------
    def hold(self) -> None:
        """From now until :meth:`release`, frames wait instead of going out."""
        self._holding = True

    def release(self) -> None:
        """Commit (:meth:`Handler.commit`), then send the frames held meanwhile."""
        while self._holding:  # a send that finds its peer gone may hold again
            self._holding = False
            self.handler.commit()
            # Take every held frame before sending any: a frame held while these go out
            # (a hook that hung up had more in its buffer) waits for the next commit.
            frames = [(conn, bytes(conn.held)) for conn in self._held]
            self._held = []
            for conn, _ in frames:
                conn.held.clear()
            for conn, frame in frames:
                if conn.sock.fileno() >= 0:
                    self._send_frame(conn, frame)

    # -- reading -----------------------------------------------------------------------
    def _read(self, conn: Conn) -> bool:
        """Read and handle what arrived; False when the connection was closed."""
        if conn.decoder.has_frame:  # handle what it sent before reading more (see _take)
            return True
        try:
            data = conn.sock.recv(1 << 16)
        except (BlockingIOError, InterruptedError):
            return True
        except OSError:
            data = b""
        if not data or (conn.dead and not self._drain(conn, data)):
            if conn.pending or conn.out or conn.held:  # answer what it asked first
                self._close_after(conn)
                return conn.sock.fileno() >= 0
            self.close_conn(conn)
            return False
        conn.decoder.push(data)
        if conn.pending and conn.decoder.buffered > self.limits.max_early_bytes:
            self.fail(conn, "bad_message", f"more than {self.limits.max_early_bytes} bytes "
                      "sent before the welcome")
            return conn.sock.fileno() >= 0
        count = self._take(conn)
        if conn.sock.fileno() < 0:
            return False
        if conn.run is None or conn.partial:
            self.admission.note_partial(conn)
            if count:
                conn.heard = time.monotonic()
        if conn.paceable and self.pacing is not None and conn.sock.fileno() >= 0:
            self._heard(conn, count)
        if conn.dead:
            self._hung_up(conn)
            return False
        return conn.sock.fileno() >= 0

    def _drain(self, conn: Conn, data: bytes) -> bool:
        """``data`` came from a peer found dead: False past ``max_drain`` bytes."""
        conn.drained += len(data)
        if conn.drained <= self.limits.max_drain:
            return True
        log.warning("closing %s: it hung up and its last frames run past %d bytes",
                    conn.label, self.limits.max_drain)
        return False

    def _take(self, conn: Conn) -> int:
        """Decode and handle ``conn``'s whole frames one at a time, while its share of this
        wake-up lasts (at most ``Limits.max_messages_per_wake``): the first always, each
        later one only while the share lasts, decoding included (3 000 frames of 19 bytes
        fit in one read, and a 64 KiB frame of JSON takes milliseconds to decode). What is
        left stays undecoded for the next wake-up (its socket is not read meanwhile).
        A reply that cannot be sent marks ``conn`` dead, and the rest are still applied (a
        hook that hung up right after sending is gone when we answer: what it sent before
        is applied, and checkpointed when it is closed). Returns how many were handled."""
        previous, self._reading = self._reading, conn  # an operator's push may land here
        decoder = conn.decoder
        until = time.monotonic() + self._share
        budget = self.limits.max_messages_per_wake
        count = 0
        try:
            while not conn.failed and conn.sock.fileno() >= 0:
                if count and (count >= budget or time.monotonic() > until):
                    if decoder.has_frame:  # spent: the rest wait for the next wake-up
                        self._backlogged[conn] = None
                    break
                try:
                    msg = decoder.next()
                except ProtocolError as exc:
                    self.fail(conn, exc.code, str(exc))
                    break
                except Exception as exc:  # (MemoryError, a bug): this peer's, not the loop's
                    self.rlog.log(logging.ERROR, f"decode:{type(exc).__name__}",
                                  "could not decode a peer's frame", exc_info=exc)
                    self.fail(conn, "internal", f"controller error: {exc!r:.200}")
                    break
                if msg is None:
                    break
                count += 1
                if not conn.authed:
                    if not self._authenticate(conn, msg):
                        break
                    if msg["t"] == "auth":  # only now is anything after it decoded: the
                        decoder.open_gate(MAX_HELLO, 1)  # next one alone (a hello)
                        continue
                try:
                    self.handler.handle(conn, msg)
                except Exception as exc:
                    self._answer(conn, exc, msg.get("t"))
                if decoder.gated and not conn.pending:  # its first message is handled
                    decoder.open_gate(MAX_FRAME)
        finally:
            self._reading = previous
        return count

    def call(self, conn: Conn, what: str, action: Callable[[], None]) -> None:
        """Run ``action`` for ``conn`` outside a read (a hello answered off the loop), its
        errors answered as a message's would be."""
        previous, self._reading = self._reading, conn
        try:
            action()
        except Exception as exc:
            self._answer(conn, exc, what)
        finally:
            self._reading = previous
        if conn.dead and conn.sock.fileno() >= 0:
            self._hung_up(conn)

    def resume(self, conn: Conn) -> None:
        """``conn``'s hello was answered: handle what it sent meanwhile, then go on."""
        conn.pending = False
        if conn.sock.fileno() < 0 or conn.failed:
            return
        conn.decoder.open_gate(MAX_FRAME)
        self.admission.note_partial(conn)
        self._take(conn)
        if conn.parked and conn.sock.fileno() >= 0:  # it hung up while we parsed
            self._close_after(conn)

    def _answer(self, conn: Conn, exc: Exception, what: object) -> None:
        if isinstance(exc, Refused):
            self.fail(conn, exc.code, str(exc), retry=exc.retry)
        elif isinstance(exc, ProtocolError):
            self.send(conn, {"t": "error", "code": exc.code, "message": str(exc),
                             "fatal": False})
        else:  # a bug (or a plugin's) must not end every run, nor fill the log
            self.rlog.log(logging.ERROR, f"internal:{type(exc).__name__}",
                          "internal error handling a %r message", what, exc_info=exc)
            self.send(conn, {"t": "error", "code": "internal",
                             "message": f"controller error: {exc!r}", "fatal": False})

    def _authenticate(self, conn: Conn, msg: Mapping[str, Any]) -> bool:
        given = msg.get("token")
        if (self.token is not None and isinstance(given, str)
                and hmac.compare_digest(given.encode("utf-8", "surrogatepass"), self.token)):
            conn.authed = True
            return True
        self.fail(conn, "unauthorized",
                  "a valid token is required on TCP (set LRCTL_TOKEN or LRCTL_TOKEN_FILE)")
        return False

    def _hung_up(self, conn: Conn) -> None:
        """A reply could not be sent: the hook closed its end, often right after its last
        observations and its ``bye`` (``ctl.close()`` does not wait for answers). What it
        sent is in our receive buffer, and it can send no more: it is read and applied
        like any peer's messages, a wake-up's share at a time (see :meth:`_take`; up
        to ``max_drain`` bytes), and the connection closes at its end (:meth:`_read`), so
        that the run ends (or stays resumable) exactly as the hook left it, while the
        other peers are served as usual."""
        if conn.sock.fileno() < 0:
            return
        conn.out.clear()  # nothing more goes out
        if conn.paced:
            self._unpace(conn)  # the selector sees its end of input
        elif not conn.parked:
            self.sel.modify(conn.sock, selectors.EVENT_READ, ("conn", conn))

    def finish_hung_up(self, until: float) -> None:
        """At shutdown: apply, whole, what peers that hung up still had waiting (their
        last observations, their ``bye``), until ``until`` (``time.monotonic()``): the
        shares of :meth:`_hung_up` no longer matter when no one else will be served."""
        for conn in [c for c in self._conns if c.dead]:
            while conn.sock.fileno() >= 0 and time.monotonic() < until:
                if conn.decoder.has_frame:
                    if conn in self._backlogged:
                        del self._backlogged[conn]
                    self._take(conn)
                    continue
                try:
                    more = conn.sock.recv(1, socket.MSG_PEEK)
                except (BlockingIOError, InterruptedError):
                    break  # all it sent is applied
                except OSError:
                    more = b""
                self._read(conn)  # its end of input closes it
                if not more:
                    break
        self.release()

    def still_open(self, conn: Conn) -> bool:
        """Whether ``conn``'s peer is still there: what it sent is handled first (up to
        ``max_drain`` bytes), and a peer that hung up (or was told to go) is closed."""
        until = time.monotonic() + 10 * self.limits.max_wake_share_s
        for _ in range(self.limits.max_drain >> 16):
            if conn.sock.fileno() < 0 or conn.closing:  # (a dead one: read to its end)
                break
            if conn.decoder.has_frame:  # read before what is still in the socket: first
                if time.monotonic() > until:
                    return True  # too much to apply now: still open, as far as we know
                self._backlogged.pop(conn, None)
                self._take(conn)
                continue
            try:
                more = conn.sock.recv(1, socket.MSG_PEEK)
            except (BlockingIOError, InterruptedError):
                return True  # all it sent is handled, and it has not hung up
            except OSError:
                more = b""
            if not more:  # it hung up: what it sent was handled, and now it is gone
                self._read(conn)
                break
            self._read(conn)
        if conn.sock.fileno() >= 0 and (conn.closing or conn.dead):
            self.close_conn(conn)
        return conn.sock.fileno() >= 0
