"""A connection's state, the errors that close one, and what the transport calls.

(The transport, :mod:`~lrctl.daemon.transport`, does the I/O; these are its nouns.)
"""

from __future__ import annotations

import socket
import time
from typing import Any, Protocol

from ..wire.decoder import FrameDecoder
from ..wire.errors import ProtocolError

__all__ = ["Conn", "Handler", "Refused", "Unavailable"]


class Refused(ProtocolError):
    """Input we cannot go on from: a fatal ``error`` frame, then the connection closes."""

    retry = False


class Unavailable(Refused):
    """The controller cannot serve this now (out of descriptors, a journal it cannot
    open, too busy): a fatal ``error`` with ``retry: true``; the hook trains on at its
    LRs, says why, and tries again later."""

    retry = True

    def __init__(self, message: str) -> None:
        super().__init__(message, "unavailable")


class Conn:
    __slots__ = ("authed", "closing", "compact", "dead", "decoder", "drained", "every",
                 "failed", "heard", "held", "name", "opened", "out", "paceable", "paced",
                 "parked", "partial", "pending", "remote", "run", "sock", "unread")

    def __init__(self, sock: socket.socket, authed: bool, name: str,
                 decoder: FrameDecoder) -> None:
        self.sock = sock
        self.authed = authed
        self.remote = not authed  # a TCP peer: it must show the token, and soon
        self.opened = self.heard = time.monotonic()  # heard: its last complete frame
        self.name = name
        self.decoder = decoder
        self.out = bytearray()  # sent in part: the rest waits for the socket
        self.held = bytearray()  # waits for the group commit (see Transport.hold)
        self.run: str | None = None
        self.pending = False  # its hello is being answered (see handshake.py)
        self.partial = 0  # bytes of an unfinished frame, as admission counted them
        self.closing = 0.0  # when it was told to go (or hung up its end): flush, then close
        # (restarted by each read of its last frames; see Writing.close_lingering)
        self.unread = -1  # closing: bytes its socket held unread at the last look (-1: none)
        self.failed = False  # told to go (a fatal error): nothing more it sends is handled
        self.parked = False  # hung up during its hello: out of the selector until answered
        self.dead = False  # a send failed: the peer is gone, but what it sent still counts
        self.drained = 0  # bytes read since it was found dead (Limits.max_drain at most)
        self.paceable = False  # an async hook's: may be read on a timer (see pacing.py)
        self.paced = False  # read on a timer now, out of the selector
        self.every = 1  # its hook reports every N-th step (the hello's every; pacing.py)
        self.compact = False  # its hook reads compact lr answers (lrctl.wire.compact)

    @property
    def label(self) -> str:
        return self.run or self.name


class Handler(Protocol):
    """What the transport calls; all on the loop's thread."""

    def handle(self, conn: Conn, msg: dict[str, Any]) -> None:
        """One message from an authenticated peer; raise ``ProtocolError`` to answer an
        error frame, :class:`Refused` to close the connection."""

    def disconnected(self, conn: Conn, save: bool) -> None:
        """``conn`` was closed; ``save``: checkpoint its run (its hook is gone)."""

    def commit(self) -> None:
        """Make durable what the held frames acknowledge (see :meth:`Transport.release`)."""

    def woken(self) -> None:
        """Another thread called :meth:`Transport.wake`."""

    def make_room(self, keep: str | None = None) -> int:
        """Out of file descriptors: free some by evicting runs without a hook (never
        ``keep``); how many were."""
