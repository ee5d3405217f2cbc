"""A Unix listener with a full backlog is busy, not gone (the CI failure of stop 47:
``lrctl status`` against a controller taking a burst of connections raised
``BlockingIOError`` at once, because a Unix socket with a timeout is non-blocking and
Linux answers such a connect with EAGAIN where TCP would wait)."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from lrctl.daemon.listening import _answering_pid
from lrctl.wire.operator import request
from lrctl.wire.unix import connect_unix


@pytest.fixture
def full_listener(short_dir: Path) -> Iterator[tuple[str, socket.socket, list[socket.socket]]]:
    """A listener that accepts nothing, its backlog filled by non-blocking connects."""
    path = str(short_dir / "busy.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(0)
    queued: list[socket.socket] = []
    try:
        while True:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.setblocking(False)
            try:
                s.connect(path)
            except BlockingIOError:
                s.close()
                break
            queued.append(s)
        yield path, listener, queued
    finally:
        for s in queued:
            s.close()
        listener.close()


def test_a_backlog_full_until_the_deadline_is_a_timeout_that_says_so(
        full_listener: tuple[str, socket.socket, list[socket.socket]]) -> None:
    path, _, queued = full_listener
    assert queued  # the kernel took some before it was full
    with pytest.raises(TimeoutError, match="backlog is full"):
        request({"t": "status"}, path, timeout=0.2)


def test_a_connect_waits_for_room_in_the_backlog(
        full_listener: tuple[str, socket.socket, list[socket.socket]]) -> None:
    path, listener, queued = full_listener
    got: list[object] = []

    def connect() -> None:
        try:
            got.append(connect_unix(path, 30.0))
        except OSError as exc:
            got.append(exc)

    waiter = threading.Thread(target=connect)
    waiter.start()
    accepted = []
    listener.settimeout(30.0)
    for _ in range(len(queued) + 1):  # make room one at a time: the last is the waiter's
        accepted.append(listener.accept()[0])
    waiter.join()
    for conn in accepted:
        conn.close()
    sock = got[0]
    assert isinstance(sock, socket.socket), sock
    assert sock.gettimeout() == 30.0  # left with the caller's timeout
    sock.close()


def test_the_start_up_probe_takes_a_full_backlog_for_a_live_controller(
        full_listener: tuple[str, socket.socket, list[socket.socket]]) -> None:
    """Else a controller whose lock file was removed would have its socket unlinked
    and a second controller would serve the same path."""
    path, _, _ = full_listener
    assert _answering_pid(path) == "?"


def test_nobody_listening_is_still_refused_at_once(short_dir: Path) -> None:
    path = str(short_dir / "gone.sock")
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(path)
    dead.close()  # the file stays, nothing listens
    with pytest.raises(ConnectionRefusedError):
        connect_unix(path, 30.0)
    assert _answering_pid(path) is None


def test_a_signal_during_the_wait_is_not_taken_for_a_connection(
        full_listener: tuple[str, socket.socket, list[socket.socket]]) -> None:
    """A review's find: a signal with a Python handler (a timer, a DataLoader's SIGCHLD)
    ended the kernel's wait with EINTR, and CPython took the unconnected socket for a
    connected one: it came back early, and its first send failed with ENOTCONN."""
    import signal

    path, _, _ = full_listener
    rang: list[int] = []
    old = signal.signal(signal.SIGALRM, lambda signum, frame: rang.append(signum))
    signal.setitimer(signal.ITIMER_REAL, 0.05, 0.05)  # again and again, through the wait
    try:
        with pytest.raises(TimeoutError, match="backlog is full"):
            connect_unix(path, 0.5)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    assert rang  # the signals did come during the wait
