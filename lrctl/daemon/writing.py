"""The transport's writing side: replies framed and sent without ever blocking the loop
(what a peer cannot take now waits in its connection's buffer, bounded by
``Limits.max_outbuf``; past that the peer is dropped, and past ``Limits.max_outbuf_total``
for all peers together the one with the most unread), held for the group commit,
and connections closed after their last frames (``Limits.linger_s`` without one read).

A mixin of :class:`~lrctl.daemon.transport.Transport`, whose attributes these are.
"""

from __future__ import annotations

import fcntl
import logging
import selectors
import socket
import struct
import termios
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from ..wire.errors import ProtocolError
from ..wire.frames import MAX_FRAME, encode
from .conn import Conn, Handler
from .limits import Limits

if TYPE_CHECKING:
    from collections.abc import Callable

    from .admission import Admission
    from .pacing import Pacing
    from .ratelog import RateLog

__all__ = ["Writing"]

log = logging.getLogger("lrctl.daemon")


class Writing:
    """Sending and closing (see the module docstring)."""

    limits: Limits
    sel: selectors.BaseSelector
    handler: Handler
    admission: Admission
    _conns: dict[Conn, None]
    _backlogged: dict[Conn, None]
    pacing: Pacing | None
    _unpace: Callable[[Conn], None]

    if TYPE_CHECKING:  # what it uses of the Transport (for type checkers only)
        nconns: int
        nremote: int
        rlog: RateLog
        _reading: Conn | None
        _holding: bool
        _held: list[Conn]

        def release(self) -> None: ...
        def _hung_up(self, conn: Conn) -> None: ...

    def send(self, conn: Conn, msg: Mapping[str, Any], limit: int = MAX_FRAME) -> None:
        if conn.dead:
            return
        self.send_frame(conn, self.encoded(msg, limit))

    @staticmethod
    def encoded(msg: Mapping[str, Any], limit: int = MAX_FRAME) -> bytes:
        """``msg`` as a frame (its decisions slimmed to fit ``limit``; an error frame for
        a message that cannot be encoded)."""
        try:
            return encode(msg, limit)
        except ProtocolError:
            return encode(_slim(msg), limit)
        except ValueError as exc:  # a non-finite float slipped through: a bug, not a crash
            log.error("cannot encode a %s frame: %s", msg.get("t"), exc)
            return encode({"t": "error", "code": "internal", "message": str(exc),
                           "fatal": False})

    def send_frame(self, conn: Conn, frame: bytes) -> None:
        if conn.dead:
            return
        if self._holding:
            if not conn.held:
                self._held.append(conn)
            conn.held += frame
            return
        self._send_frame(conn, frame)

    def _send_frame(self, conn: Conn, frame: bytes) -> None:
        if conn.dead:
            return
        before = len(conn.out)
        if before:
            conn.out += frame
        else:
            try:
                sent = conn.sock.send(frame)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError:
                conn.dead = True
                if self._reading is not conn:
                    self._hung_up(conn)
                return
            if sent and conn.closing:
                conn.closing = time.monotonic()  # it reads: its linger starts again
            if sent < len(frame):
                conn.out += frame[sent:]
                self._want_write(conn)
        if len(conn.out) > self.limits.max_outbuf:
            self.rlog.log(logging.WARNING, "outbuf", "closing %s: it does not read its "
                          "replies (%d bytes waiting)", conn.label, len(conn.out))
            self.close_conn(conn)
        elif len(conn.out) >> 16 > before >> 16:  # 64 KiB more unread: all peers' in bounds?
            self._bound_unread()

    def _bound_unread(self) -> None:
        """Close the peers with the most unread replies until all peers' together are
        within ``Limits.max_outbuf_total``. Counted each time a peer's pass another 64 KiB
        (a sum over the peers, not on every send), so the total may run past the cap by
        less than 64 KiB a peer: 64 MiB at 1 024 peers."""
        total = sum(len(c.out) for c in self._conns)
        while total > self.limits.max_outbuf_total:
            worst = max(self._conns, key=lambda c: len(c.out))
            self.rlog.log(logging.WARNING, "outbuf_total", "closing %s: it does not read its "
                          "replies (%d bytes waiting; %d for all peers, over the %d allowed)",
                          worst.label, len(worst.out), total, self.limits.max_outbuf_total)
            total -= len(worst.out)
            worst.out.clear()
            self.close_conn(worst)

    def _want_write(self, conn: Conn) -> None:
        if conn.parked or conn.sock.fileno() < 0:
            return
        if conn.paced:  # a reply it cannot take now: wait for it in the selector
            self._unpace(conn)
        events = selectors.EVENT_WRITE if conn.closing else (
            selectors.EVENT_READ | selectors.EVENT_WRITE)
        self.sel.modify(conn.sock, events, ("conn", conn))

    def _flush(self, conn: Conn) -> None:
        if conn.sock.fileno() < 0:
            return
        try:
            sent = conn.sock.send(conn.out)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            conn.dead = True
            self._hung_up(conn)
            return
        del conn.out[:sent]
        if sent and conn.closing:
            # A peer that ended its input and reads its replies, slowly (a loaded machine),
            # is not cut off: its linger bounds a wait without progress.
            conn.closing = time.monotonic()
        if not conn.out:
            if conn.closing and not conn.held:
                self.close_conn(conn)
                return
            if not conn.closing:
                self.sel.modify(conn.sock, selectors.EVENT_READ, ("conn", conn))

    def fail(self, conn: Conn, code: str, message: str, retry: bool = False) -> None:
        """A fatal error frame, then close: for input we cannot go on from. Never blocks:
        the frame waits in ``conn``'s buffer, for at most ``Limits.linger_s`` unread."""
        self.rlog.log(logging.WARNING, f"fail:{code}", "closing %s: %s", conn.label, message)
        if conn.sock.fileno() < 0:
            return
        if conn.held:
            self.release()  # what it was answered goes first, durable as ever
        conn.pending = False
        conn.failed = True
        error = {"t": "error", "code": code, "message": message, "fatal": True}
        if retry:
            error["retry"] = True
        self._close_after(conn, encode(error))

    def close_lingering(self, now: float) -> None:
        """Close the peers told to go (or that ended their input) whose last frames have
        waited ``Limits.linger_s`` without a read: a peer reading them, however slowly,
        keeps its linger from running out (what its socket holds unread shrank since the
        last look; a send that went through counts too, see _flush)."""
        for conn in [c for c in self._conns if c.closing and not c.pending
                     and not c.decoder.has_frame]:
            unread = _unread(conn.sock)
            if 0 <= unread < conn.unread:
                conn.closing = now  # it read some since the last look
            conn.unread = unread
            if now - conn.closing > self.limits.linger_s:
                self.close_conn(conn)

    def _close_after(self, conn: Conn, frame: bytes = b"") -> None:
        """Stop reading ``conn``; close it once ``frame`` and what it was owed went out."""
        conn.closing = conn.closing or time.monotonic()
        self._unpace(conn)
        if conn.sock.fileno() < 0 or conn.dead:
            self.close_conn(conn)
            return
        if conn.pending:  # its hello is being answered: out of the selector until then
            if not conn.parked:
                conn.parked = True
                self.sel.unregister(conn.sock)
            return
        if frame:
            conn.out += frame
        if conn.failed:  # told to go: nothing more it sent is handled
            conn.decoder.discard()
            self._backlogged.pop(conn, None)
        elif conn.decoder.has_frame:  # what it sent before its end is handled first: then
            return  # this again
        if not conn.out and not conn.held:
            self.close_conn(conn)
            return
        if conn.out:
            self._flush(conn)
        if conn.sock.fileno() < 0:
            return
        if conn.parked:
            conn.parked = False
            self.sel.register(conn.sock, selectors.EVENT_WRITE, ("conn", conn))
        else:
            self.sel.modify(conn.sock, selectors.EVENT_WRITE, ("conn", conn))

    def close_conn(self, conn: Conn, save: bool = True) -> None:
        if conn.sock.fileno() < 0:
            return
        if not (conn.parked or conn.paced):
            self.sel.unregister(conn.sock)
        if self.pacing is not None:
            self.pacing.forget(conn)
        conn.sock.close()
        conn.held.clear()
        conn.decoder.discard()
        self._backlogged.pop(conn, None)
        self._conns.pop(conn, None)
        self.nconns -= 1
        self.nremote -= conn.remote
        self.admission.forget(conn)
        self.handler.disconnected(conn, save)


def _slim(msg: Mapping[str, Any]) -> dict[str, Any]:
    """A frame too large to send: drop the decisions' evidence, which is what grows."""
    out = dict(msg)
    if "d" in out:
        out["d"] = [{**d, "evidence": {"truncated": True}} for d in out["d"]]
    return out


def _unread(sock: socket.socket) -> int:
    """Bytes sent on ``sock`` that its peer has not read yet (``SIOCOUTQ``: on a Unix
    socket what waits in the peer's queue, on TCP what is unsent or unacknowledged),
    or -1 where that cannot be told."""
    try:
        return int(struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ,
                                                  b"\0\0\0\0"))[0])
    except (OSError, ValueError):
        return -1
