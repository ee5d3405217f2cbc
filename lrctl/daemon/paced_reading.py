"""The transport's side of paced reading (the schedule is :mod:`.pacing`'s): taking a
connection out of the selector and back, waiting for the next look, reading the
connections due. A mixin of :class:`~lrctl.daemon.transport.Transport`, whose
attributes these are.
"""

from __future__ import annotations

import select
import selectors
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .conn import Conn
    from .pacing import Pacing

__all__ = ["PacedReading"]


class PacedReading:
    """See the module docstring."""

    sel: selectors.BaseSelector
    pacing: Pacing | None
    _sel_fd: int
    _read: Callable[[Conn], bool]

    def _until_look(self) -> list[tuple[selectors.SelectorKey, int]]:
        """Wait until the next look is due, awake to every other peer: epoll counts whole
        milliseconds, ``select()`` microseconds, and the epoll descriptor itself turns
        readable when any of its sockets does. Then what is ready."""
        assert self.pacing is not None
        wait = self.pacing.next_due - time.monotonic()
        if wait > 0:
            try:
                select.select([self._sel_fd], [], [], wait)
            except ValueError:  # a descriptor past select()'s limit: epoll, in ms
                return self.sel.select(timeout=wait)
        return self.sel.select(timeout=0)

    def _serve_paced(self) -> None:
        assert self.pacing is not None
        now = time.monotonic()
        read, idle, leaving = self.pacing.due(now)
        for conn in read:
            if conn.paced and conn.sock.fileno() >= 0:
                self._read(conn)
        for conn in idle:
            if conn.paced:
                self._unpace(conn)
        for conn in leaving:  # every=N: its next report is due soon (see pacing.py)
            if not conn.paced and self._may_pace(conn):
                self.sel.unregister(conn.sock)
                self.pacing.pace(conn, now)
        self.pacing.reschedule()

    @staticmethod
    def _may_pace(conn: Conn) -> bool:
        """Nothing waits to go out to it, nor is it closing, parked, dead or in its hello:
        it may leave the selector."""
        return conn.sock.fileno() >= 0 and not (conn.out or conn.closing or conn.parked
                                                 or conn.dead or conn.failed or conn.pending)

    def _heard(self, conn: Conn, count: int) -> None:
        """``conn`` (an async hook's) sent ``count`` messages: pace it, or no longer."""
        assert self.pacing is not None
        now = time.monotonic()
        if self.pacing.heard(conn, now, count):
            if not conn.paced and self._may_pace(conn):
                self.sel.unregister(conn.sock)
                self.pacing.pace(conn, now)
        elif conn.paced:
            self._unpace(conn)

    def _unpace(self, conn: Conn) -> None:
        """Back to the selector: read as its frames come."""
        if not conn.paced:
            return
        assert self.pacing is not None
        self.pacing.unpace(conn)
        if conn.sock.fileno() >= 0:
            self.sel.register(conn.sock, selectors.EVENT_READ | (
                selectors.EVENT_WRITE if conn.out else 0), ("conn", conn))
