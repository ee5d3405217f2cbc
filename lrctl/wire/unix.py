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
import time

__all__ = ["connect_unix"]

_MAX_WAIT_S = 1e9  # (a struct timeval holds it; inf or 2**63 would not)


def _timeval(seconds: float) -> bytes:
    """A ``struct timeval``; 0 means "no limit" to the kernel."""
    whole = math.floor(seconds)
    return struct.pack("@ll", whole, int((seconds - whole) * 1e6))


def connect_unix(path: str, timeout: float) -> socket.socket:
    """A socket connected to ``path`` within ``timeout`` seconds, left with that timeout.

    Raises ``OSError`` as ``connect`` does (nobody listens: ``ConnectionRefusedError``
    or ``FileNotFoundError``), and :class:`TimeoutError` when the listener's backlog stays
    full for ``timeout`` seconds. (The wait is Linux's; elsewhere a full backlog may be
    refused at once, as before.)"""
    deadline = time.monotonic() + timeout
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(None)  # blocking: the kernel waits for room in the backlog
        while True:
            # (at least 1 us: a zero SO_SNDTIMEO would wait for ever)
            left = min(max(deadline - time.monotonic(), 1e-6), _MAX_WAIT_S)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, _timeval(left))
            try:
                sock.connect(path)
            except BlockingIOError as exc:  # still full when SO_SNDTIMEO ran out
                raise TimeoutError(errno.ETIMEDOUT, f"the listener at {path} took no new "
                                   f"connection for {timeout:g} s (its backlog is full)"
                                   ) from exc
            if _connected(sock):
                break
            # A signal ended the wait (EINTR), and CPython, polling the socket for the
            # connect's end, took the hang-up of a socket that never connected for success.
            if time.monotonic() >= deadline:
                raise TimeoutError(errno.ETIMEDOUT, f"the listener at {path} took no new "
                                   f"connection for {timeout:g} s (its backlog is full)")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, _timeval(0.0))  # as it was
        sock.settimeout(timeout)
    except BaseException:
        sock.close()
        raise
    return sock


def _connected(sock: socket.socket) -> bool:
    try:
        sock.getpeername()
    except OSError as exc:
        if exc.errno == errno.ENOTCONN:
            return False
        raise
    return True
