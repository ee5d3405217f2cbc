"""Connecting to a controller's Unix socket with a deadline that waits out a full backlog.

A Unix socket with a timeout is non-blocking underneath, and on Linux a non-blocking
``connect`` to a listener whose backlog is full fails at once with ``EAGAIN`` (TCP's
waits). A controller busy with a burst of connections has a full backlog for a moment:
``lrctl status`` then failed, a hook called the controller gone, and the start-up probe
took a live socket for a stale one. Here the connect blocks in the kernel, bounded by
``SO_SNDTIMEO`` (which a Unix ``connect`` waits under), and a backlog still full at the
deadline is a :class:`TimeoutError` that says so.
"""

from __future__ import annotations

import errno
import math
import socket
import struct

__all__ = ["connect_unix"]


def _timeval(seconds: float) -> bytes:
    """A ``struct timeval``; 0 means "no limit" to the kernel."""
    whole = math.floor(seconds)
    return struct.pack("@ll", whole, int((seconds - whole) * 1e6))


def connect_unix(path: str, timeout: float) -> socket.socket:
    """A socket connected to ``path`` within ``timeout`` seconds, left with that timeout.

    Raises ``OSError`` as ``connect`` does (nobody listens: ``ConnectionRefusedError``
    or ``FileNotFoundError``), and :class:`TimeoutError` when the listener's backlog stays
    full for ``timeout`` seconds."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        # (at least 1 us: a zero SO_SNDTIMEO would wait for ever)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, _timeval(max(timeout, 1e-6)))
        sock.settimeout(None)  # blocking: the kernel waits for room in the backlog
        try:
            sock.connect(path)
        except BlockingIOError as exc:  # still full when SO_SNDTIMEO ran out
            raise TimeoutError(errno.ETIMEDOUT, f"the listener at {path} took no new "
                               f"connection for {timeout:g} s (its backlog is full)") from exc
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, _timeval(0.0))  # as it was
        sock.settimeout(timeout)
    except BaseException:
        sock.close()
        raise
    return sock
