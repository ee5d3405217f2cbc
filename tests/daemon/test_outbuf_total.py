"""Replies that peers leave unread are bounded for all peers together, not only each peer's
(``Limits.max_outbuf_total``): many peers that never read, each under ``max_outbuf``,
could otherwise hold the controller's memory without bound. Past the total the peer with
the most unread is closed, and a peer that reads is served on. Real sockets, the real
transport; the replies are large so that a few requests fill the buffers."""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Callable, Iterator

import pytest

from lrctl.daemon.conn import Conn
from lrctl.daemon.limits import Limits
from lrctl.daemon.transport import Transport
from lrctl.wire.decoder import FrameDecoder
from lrctl.wire.frames import encode

REPLY = 60_000  # bytes of padding per reply (a frame may be up to 64 KiB)
MiB = 1 << 20
DEADLINE_S = 30.0


class _Padded:
    """Answers each message with a ~60 KB frame."""

    def __init__(self) -> None:
        self.transport: Transport | None = None
        self.handled: dict[str, int] = {}

    def handle(self, conn: Conn, msg: dict) -> None:
        assert self.transport is not None
        self.handled[conn.name] = self.handled.get(conn.name, 0) + 1
        self.transport.send(conn, {"t": "lr", "s": msg["s"], "pad": "x" * REPLY})

    def disconnected(self, conn: Conn, save: bool) -> None:
        pass

    def commit(self) -> None:
        pass

    def woken(self) -> None:
        pass


@pytest.fixture
def transport() -> Iterator[tuple[Transport, _Padded]]:
    handler = _Padded()
    t = Transport([], handler, limits=Limits(max_outbuf=4 * MiB, max_outbuf_total=5 * MiB))
    handler.transport = t
    yield t, handler
    t.close()


def _peer(t: Transport, name: str) -> tuple[Conn, socket.socket]:
    ours, theirs = socket.socketpair()
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)  # replies wait in conn.out
    conn = t.open_conn(ours, True, name)
    conn.run = name
    return conn, theirs


def _ask(theirs: socket.socket, first: int, n: int) -> None:
    theirs.sendall(b"".join(encode({"t": "obs", "s": s}) for s in range(first, first + n)))


def _serve_until(t: Transport, done: Callable[[], bool]) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while not done():
        assert time.monotonic() < deadline, "timed out"
        t.serve(t.select(0.01))
        t.release()


def _unread(t: Transport) -> int:
    return sum(len(c.out) for c in t.connections())


def test_past_the_total_the_peer_with_the_most_unread_is_closed(
        transport: tuple[Transport, _Padded]) -> None:
    t, handler = transport
    big, big_them = _peer(t, "big")
    small, small_them = _peer(t, "small")
    reader, reader_them = _peer(t, "reader")
    assert reader.sock.fileno() >= 0
    # Each under its own 4 MiB, together over 5 MiB: 3.4 MB and 2.6 MB unread.
    _ask(big_them, 0, 56)
    _serve_until(t, lambda: len(big.out) >= 3 * MiB)
    assert big.sock.fileno() >= 0 and _unread(t) < 5 * MiB
    _ask(small_them, 0, 44)
    _serve_until(t, lambda: handler.handled.get("small") == 44)
    assert big.sock.fileno() < 0, "the peer with the most unread was not closed"
    assert small.sock.fileno() >= 0 and big not in t.connections()
    assert _unread(t) <= 5 * MiB
    # A peer that reads is answered throughout.
    decoder = FrameDecoder(1 << 17)
    got: list[dict] = []
    _ask(reader_them, 0, 3)
    reader_them.setblocking(False)

    def read() -> bool:
        with contextlib.suppress(BlockingIOError):
            got.extend(decoder.feed(reader_them.recv(1 << 20)))
        return len(got) == 3

    _serve_until(t, read)
    assert [m["s"] for m in got] == [0, 1, 2]
    for s in (big_them, small_them, reader_them):
        s.close()


def test_peers_within_the_total_are_left_alone(transport: tuple[Transport, _Padded]) -> None:
    t, handler = transport
    peers = [_peer(t, f"p{i}") for i in range(3)]
    for _, them in peers:
        _ask(them, 0, 25)  # 1.5 MB each, 4.5 MB in all: under 5 MiB
    _serve_until(t, lambda: all(handler.handled.get(f"p{i}") == 25 for i in range(3)))
    assert _unread(t) > 4 * MiB  # (they did leave it unread)
    assert all(c.sock.fileno() >= 0 for c, _ in peers)
    for _, them in peers:
        them.close()
