"""Connections: accept, frame, authenticate, send; the loop's wake-up; the socket's upkeep.

The transport owns the selector and every connection. Complete messages go to a
:class:`Handler` (the server); a message that breaks the protocol earns an
``error`` frame, and input we cannot go on from (a broken frame, a refused hello,
a wrong token) a fatal one and a closed connection. Nothing a peer sends can
disturb the loop or the other connections.

Group commit: :meth:`Transport.hold` (called when the journal took a record that
is not durable yet) makes every frame sent from then on wait in its connection's
``held`` buffer; :meth:`Transport.release`, once per loop wake-up, first calls
:meth:`Handler.commit` (one fsync per journal file) and only then sends what was
held. So no reply that carries a decision leaves before the decision is on disk,
and frames on a connection keep their order.
"""

from __future__ import annotations

import contextlib
import hmac
import logging
import os
import selectors
import socket
import time
from collections.abc import Mapping
from typing import Any, Protocol

from ..protocol import MAX_FRAME, MAX_HELLO, FrameDecoder, ProtocolError, encode
from .limits import Limits

__all__ = ["Conn", "Handler", "Refused", "Transport", "bind_unix"]

log = logging.getLogger("lrctl.daemon")


class Refused(ProtocolError):
    """Input we cannot go on from: a fatal ``error`` frame, then the connection closes."""


class Conn:
    __slots__ = ("authed", "dead", "decoder", "eof", "held", "name", "opened", "out", "remote",
                 "run", "sock")

    def __init__(self, sock: socket.socket, authed: bool, name: str) -> None:
        self.sock = sock
        self.authed = authed
        self.remote = not authed  # a TCP peer: it must show the token, and soon
        self.opened = time.monotonic()
        self.name = name
        self.decoder = FrameDecoder(MAX_FRAME, first_limit=MAX_HELLO)
        self.out = bytearray()  # sent in part: the rest waits for the socket
        self.held = bytearray()  # waits for the group commit (see Transport.hold)
        self.run: str | None = None
        self.eof = False  # the peer half-closed: flush the replies, then close
        self.dead = False  # a send failed: the peer is gone, but what it sent still counts

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


def bind_unix(path: str) -> socket.socket:
    """A listening Unix socket at ``path``, born 0600 (no window where others can connect)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        sock.bind(path)
        os.chmod(path, 0o600)
        sock.listen(128)
    except BaseException:
        sock.close()
        raise
    finally:
        os.umask(old)
    return sock


def file_id(path: str) -> tuple[int, int] | None:
    try:
        st = os.lstat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


class Transport:
    """Every socket of one controller; ``listeners`` are bound, listening sockets, each with
    whether its peers are trusted (Unix) or must show ``token`` first (TCP)."""

    def __init__(self, listeners: list[tuple[socket.socket, bool]], handler: Handler, *,
                 limits: Limits, token: str | None = None, socket_path: str = "") -> None:
        self.sel = selectors.DefaultSelector()
        self.handler = handler
        self.limits = limits
        self.token = token.encode("utf-8") if token else None
        self.socket_path = socket_path
        self.listeners = [sock for sock, _ in listeners]
        self.nconns = 0
        self._nremote = 0
        self._reading: Conn | None = None  # the connection whose batch is being handled
        self._holding = False
        self._held: list[Conn] = []
        self._unix: socket.socket | None = None
        self._unix_id: tuple[int, int] | None = None
        for sock, authed in listeners:
            sock.setblocking(False)
            self.sel.register(sock, selectors.EVENT_READ, ("listen", authed))
            if sock.family == socket.AF_UNIX and self._unix is None and socket_path:
                self._unix = sock
                self._unix_id = file_id(socket_path)
        # Other threads (the policy watcher, the checkpoint writer) wake the loop here.
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self.sel.register(self._wake_r, selectors.EVENT_READ, ("wake", None))

    # -- the loop ----------------------------------------------------------------------
    def select(self, timeout: float) -> list[tuple[selectors.SelectorKey, int]]:
        return self.sel.select(timeout=timeout)

    def serve(self, ready: list[tuple[selectors.SelectorKey, int]]) -> None:
        """Accept, read and write what :meth:`select` found ready."""
        for key, mask in ready:
            kind, arg = key.data
            if kind == "listen":
                self._accept(key.fileobj, arg)  # type: ignore[arg-type]
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

    def wake(self) -> None:
        """Wake the loop (from another thread)."""
        with contextlib.suppress(OSError):  # full: the loop is awake already
            self._wake_w.send(b"\0")

    def connections(self) -> list[Conn]:
        return [k.data[1] for k in list(self.sel.get_map().values()) if k.data[0] == "conn"]

    def close(self) -> None:
        """Close every connection, the wake-up and the listeners (the loop has ended)."""
        self.sel.unregister(self._wake_r)
        self._wake_r.close()
        self._wake_w.close()
        for conn in self.connections():
            self.close_conn(conn, save=False)
        for sock in self.listeners:
            with contextlib.suppress(KeyError, ValueError):
                self.sel.unregister(sock)
            sock.close()
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
    def _accept(self, listener: socket.socket, authed: bool) -> None:
        while True:
            try:
                sock, addr = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.warning("accept failed: %s", exc)
                return
            if self.nconns >= self.limits.max_connections or (
                    not authed and self._nremote >= self.limits.max_remote_connections):
                log.warning("refusing a connection: %d open (%d over TCP)", self.nconns,
                            self._nremote)
                sock.close()
                continue
            sock.setblocking(False)
            conn = Conn(sock, authed, str(addr) if addr else "unix")
            self.nconns += 1
            self._nremote += conn.remote
            self.sel.register(sock, selectors.EVENT_READ, ("conn", conn))

    def _read(self, conn: Conn) -> bool:
        """Read and handle what arrived; False when the connection was closed."""
        try:
            data = conn.sock.recv(1 << 16)
        except (BlockingIOError, InterruptedError):
            return True
        except OSError:
            data = b""
        if not data:
            if conn.out or conn.held:  # answer what it asked before it hung up its end
                conn.eof = True
                self.sel.modify(conn.sock, selectors.EVENT_WRITE, ("conn", conn))
                return True
            self.close_conn(conn)
            return False
        try:
            messages = conn.decoder.feed(data)
        except ProtocolError as exc:
            self.fail(conn, exc.code, str(exc))
            return False
        self._handle(conn, messages)
        if conn.dead:
            self._hung_up(conn)
            return False
        return conn.sock.fileno() >= 0

    def _handle(self, conn: Conn, messages: list[dict[str, Any]]) -> None:
        """Dispatch ``messages``; a reply that cannot be sent marks ``conn`` dead, and the
        rest are still applied (a hook that hung up right after sending is gone when we
        answer: what it sent before is applied, and checkpointed when it is closed)."""
        previous, self._reading = self._reading, conn  # an operator's push may land here
        try:
            for msg in messages:
                if conn.sock.fileno() < 0:
                    return
                try:
                    if conn.authed or self._authenticate(conn, msg):
                        self.handler.handle(conn, msg)
                except Refused as exc:
                    self.fail(conn, exc.code, str(exc))
                except ProtocolError as exc:
                    self.send(conn, {"t": "error", "code": exc.code, "message": str(exc),
                                     "fatal": False})
                except Exception as exc:  # a bug (or a plugin's) must not end every run
                    log.exception("internal error handling a %r message", msg.get("t"))
                    self.send(conn, {"t": "error", "code": "internal",
                                     "message": f"controller error: {exc!r}", "fatal": False})
        finally:
            self._reading = previous

    def _authenticate(self, conn: Conn, msg: Mapping[str, Any]) -> bool:
        given = msg.get("token")
        if (self.token is not None and isinstance(given, str)
                and hmac.compare_digest(given.encode("utf-8"), self.token)):
            conn.authed = True
            return True
        self.fail(conn, "unauthorized",
                  "a valid token is required on TCP (set LRCTL_TOKEN or LRCTL_TOKEN_FILE)")
        return False

    def _hung_up(self, conn: Conn) -> None:
        """A reply could not be sent: the hook closed its end, often right after its last
        observations and its ``bye`` (``ctl.close()`` does not wait for answers). What it
        sent is all in our receive buffer: apply it, up to ``max_drain`` bytes, then
        close, so that the run ends (or stays resumable) exactly as the hook left it."""
        budget = self.limits.max_drain
        while budget > 0 and conn.sock.fileno() >= 0:
            try:
                data = conn.sock.recv(1 << 16)
            except OSError:  # nothing more (or a reset): done
                break
            if not data:
                break
            budget -= len(data)
            try:
                messages = conn.decoder.feed(data)
            except ProtocolError as exc:
                log.warning("closing %s: %s", conn.label, exc)
                break
            self._handle(conn, messages)
        self.close_conn(conn)

    # -- writing -----------------------------------------------------------------------
    def send(self, conn: Conn, msg: Mapping[str, Any], limit: int = MAX_FRAME) -> None:
        if conn.dead:
            return
        try:
            frame = encode(msg, limit)
        except ProtocolError:
            frame = encode(_slim(msg), limit)
        except ValueError as exc:  # a non-finite float slipped through: a bug, not a crash
            log.error("cannot encode a %s frame: %s", msg.get("t"), exc)
            frame = encode({"t": "error", "code": "internal", "message": str(exc),
                            "fatal": False})
        self.send_frame(conn, frame)

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
        if conn.out:
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
            if sent < len(frame):
                conn.out += frame[sent:]
                self.sel.modify(conn.sock, selectors.EVENT_READ | selectors.EVENT_WRITE,
                                ("conn", conn))
        if len(conn.out) > self.limits.max_outbuf:
            log.warning("closing %s: it does not read its replies", conn.label)
            self.close_conn(conn)

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
        if not conn.out:
            if conn.eof:
                self.close_conn(conn)
                return
            self.sel.modify(conn.sock, selectors.EVENT_READ, ("conn", conn))

    def fail(self, conn: Conn, code: str, message: str) -> None:
        """An error frame, best effort, then close: for input we cannot go on from."""
        log.warning("closing %s: %s", conn.label, message)
        if conn.held:
            self.release()  # what it was answered goes first, durable as ever
        try:
            conn.sock.setblocking(True)
            conn.sock.settimeout(0.5)
            conn.sock.sendall(bytes(conn.out) + encode(
                {"t": "error", "code": code, "message": message, "fatal": True}))
        except OSError:
            pass
        self.close_conn(conn)

    def close_conn(self, conn: Conn, save: bool = True) -> None:
        if conn.sock.fileno() < 0:
            return
        self.sel.unregister(conn.sock)
        conn.sock.close()
        conn.held.clear()
        self.nconns -= 1
        self._nremote -= conn.remote
        self.handler.disconnected(conn, save)

    # -- housekeeping ------------------------------------------------------------------
    def drop_unauthenticated(self) -> None:
        """A TCP peer that has not shown the token within ``auth_timeout_s`` is closed, so
        that idle strangers cannot hold connection slots the local hooks need."""
        now = time.monotonic()
        limit = self.limits.auth_timeout_s
        for conn in [c for c in self.connections() if not c.authed and now - c.opened > limit]:
            log.warning("closing %s: no token within %g s", conn.name, limit)
            self.close_conn(conn, save=False)

    def check_socket(self) -> None:
        """Bind the socket file again if someone removed it; connections stay as they are."""
        if self._unix is None or self._unix_id is None:
            return
        now = file_id(self.socket_path)
        if now == self._unix_id:
            return
        if now is not None:
            log.error("%s was replaced by another file; not touching it. New runs cannot "
                      "reach this controller; existing ones go on", self.socket_path)
            self._unix_id = now  # say it once
            self._unix = None
            return
        log.warning("socket %s was removed; binding it again", self.socket_path)
        try:
            sock = bind_unix(self.socket_path)
        except OSError as exc:
            log.error("cannot bind %s again: %s", self.socket_path, exc)
            return
        sock.setblocking(False)
        with contextlib.suppress(KeyError, ValueError):
            self.sel.unregister(self._unix)
        self._unix.close()
        self.listeners = [s for s in self.listeners if s is not self._unix] + [sock]
        self.sel.register(sock, selectors.EVENT_READ, ("listen", True))
        self._unix = sock
        self._unix_id = file_id(self.socket_path)


def _slim(msg: Mapping[str, Any]) -> dict[str, Any]:
    """A frame too large to send: drop the decisions' evidence, which is what grows."""
    out = dict(msg)
    if "d" in out:
        out["d"] = [{**d, "evidence": {"truncated": True}} for d in out["d"]]
    return out
