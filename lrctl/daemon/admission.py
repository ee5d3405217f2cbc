"""Who gets a connection, and who keeps it: the listeners, the caps, eviction, fd exhaustion.

A controller must stay reachable for the runs it serves, a new hook and an
operator's ``lrctl status`` whatever strangers or broken clients do. The rules,
all here:

* **Caps.** At most ``Limits.max_connections`` connections, of which at most
  ``Limits.max_remote_connections`` over TCP. At a cap, the oldest peer that has
  no run (it never said hello: idle, half a frame, an operator's finished request)
  is closed to make room; only when every slot holds a run is the newcomer refused,
  with an ``unavailable`` error it may retry.
* **Quiet peers.** A peer without a run that has not completed a frame for
  ``Limits.quiet_timeout_s`` is closed (Unix and TCP alike; over TCP it has not shown
  its token either).
* **Memory.** Unfinished frames of peers without a run, and what such peers sent after
  a hello not yet answered (held as bytes, undecoded, until the welcome: up to
  ``Limits.max_early_bytes`` each), may hold ``Limits.max_partial_bytes`` in all; past
  that the oldest such peer is closed (300 peers each holding all but the last byte of
  a 1 MiB hello cannot take 300 MiB, nor 1 024 peers with slow hellos 1 MiB each).
* **File descriptors.** ``accept()`` failing with EMFILE/ENFILE first closes the
  oldest peer without a run; with none, it spends its one spare descriptor to accept
  each waiting connection and answer it ``unavailable`` (why, and that the hook trains
  on and retries) and closes it, so the listener does not stay readable and spin the
  loop. Without a spare it stops polling the listener for ``Limits.accept_pause_s``.
  Repeated log lines are rate-limited.

The Unix socket file is watched too: a removed one is bound again.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import selectors
import socket
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from .. import paths
from ..wire.frames import encode
from .limits import Limits
from .ratelog import RateLog

if TYPE_CHECKING:
    from .transport import Conn, Transport

__all__ = ["Admission", "bind_unix", "file_id"]

log = logging.getLogger("lrctl.daemon")

_OUT_OF_FDS = (errno.EMFILE, errno.ENFILE)
_REFUSE_PER_WAKEUP = 256  # connections answered 'unavailable' in one go when out of fds


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


def _spare_fd() -> int | None:
    try:
        return os.open(os.devnull, os.O_RDONLY)
    except OSError:
        return None


class Admission:
    """The listeners of ``transport`` and its admission rules (see the module docstring)."""

    def __init__(self, transport: Transport, listeners: list[tuple[socket.socket, bool]],
                 limits: Limits, socket_path: str = "",
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.transport = transport
        self.limits = limits
        self.socket_path = socket_path
        self.rlog = RateLog(log)
        self._clock = clock
        self.listeners: dict[socket.socket, bool] = {}  # -> trusted (Unix) or token first
        self._paused: dict[socket.socket, bool] = {}
        self.resume_at = float("inf")  # when paused listeners are polled again
        self._partial: dict[Conn, None] = {}  # peers without a run holding half a frame
        self._partial_bytes = 0
        self._spare = _spare_fd()  # spent to answer a connection when out of descriptors
        self._unix: socket.socket | None = None
        self._unix_id: tuple[int, int] | None = None
        # The socket's lock, taken again after its file was removed (see listening.py); False:
        # another controller holds it now.
        self.relock: Callable[[], bool] | None = None
        for sock, authed in listeners:
            sock.setblocking(False)
            self.listeners[sock] = authed
            self._poll(sock, authed)
            if sock.family == socket.AF_UNIX and self._unix is None and socket_path:
                self._unix = sock
                self._unix_id = file_id(socket_path)

    @property
    def unreachable(self) -> bool:
        """No new connection can reach this controller: its socket file was replaced, or
        another controller serves the path now (see :meth:`_check_socket`), and it has no
        TCP listener."""
        return (self._unix is None and self._unix_id is not None
                and all(sock.family == socket.AF_UNIX for sock in self.listeners))

    def _poll(self, sock: socket.socket, authed: bool) -> None:
        self.transport.sel.register(sock, selectors.EVENT_READ, ("listen", authed))

    # -- accepting -----------------------------------------------------------------------
    def accept(self, listener: socket.socket, authed: bool) -> None:
        while True:
            try:
                sock, addr = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in _OUT_OF_FDS:
                    self._out_of_fds(listener, authed)
                else:
                    self.rlog.log(logging.WARNING, "accept", "accept failed: %s", exc)
                return
            self._admit(sock, authed, str(addr) if addr else "unix")

    def _admit(self, sock: socket.socket, authed: bool, name: str) -> None:
        if self._make_room(authed):
            self.transport.open_conn(sock, authed, name)
        else:
            self._refuse(sock, f"the controller is at its connection limit ("
                               f"{self.transport.nconns} open, each serving a run)")

    def _make_room(self, authed: bool) -> bool:
        """Room for one more connection, closing the oldest peer without a run if need be."""
        t = self.transport
        if not authed and t.nremote >= self.limits.max_remote_connections:
            victim = self._oldest_without_run(remote=True)
            if victim is None:
                return False
            self._evict(victim, "TCP connection limit reached")
        if t.nconns >= self.limits.max_connections:
            victim = self._oldest_without_run()
            if victim is None:
                return False
            self._evict(victim, "connection limit reached")
        return True

    def _out_of_fds(self, listener: socket.socket, authed: bool) -> None:
        """``accept()`` failed for want of a descriptor (Linux says so even with nobody
        waiting). Spend the spare one to see who waits: close the oldest peer without a
        run to make room for it, or answer it ``unavailable`` and close it."""
        t = self.transport
        for _ in range(_REFUSE_PER_WAKEUP):
            if self._spare is None:
                break
            os.close(self._spare)
            try:
                sock, addr = listener.accept()
            except OSError:
                self._spare = _spare_fd()
                return  # nobody waiting (or still no descriptor: the spare is back)
            victim = self._oldest_without_run(remote=not authed)
            if victim is not None:
                self._evict(victim, "out of file descriptors")
                self._admit(sock, authed, str(addr) if addr else "unix")
            elif t.handler.make_room():  # runs without a hook held descriptors: evicted
                self._admit(sock, authed, str(addr) if addr else "unix")
            else:
                self.rlog.log(logging.ERROR, "fds", "out of file descriptors with %d "
                              "connections open: new runs are refused until some end (raise "
                              "'ulimit -n')", t.nconns)
                self._refuse(sock, f"the controller is out of file descriptors ({t.nconns} "
                                   "connections open; raise 'ulimit -n' for it)")
            self._spare = _spare_fd()
        self._pause()

    def _pause(self) -> None:
        """Stop polling the listeners for a while (out of descriptors, no spare)."""
        for sock, authed in self.listeners.items():
            if sock not in self._paused:
                with contextlib.suppress(KeyError, ValueError):
                    self.transport.sel.unregister(sock)
                self._paused[sock] = authed
        self.resume_at = self._clock() + self.limits.accept_pause_s

    def tick(self, now: float) -> None:
        """Poll paused listeners again once due (the loop calls this when ``resume_at``)."""
        if now < self.resume_at:
            return
        self.resume_at = float("inf")
        if self._spare is None:
            self._spare = _spare_fd()
        paused, self._paused = self._paused, {}
        for sock, authed in paused.items():
            if sock.fileno() >= 0:
                self._poll(sock, authed)

    def _refuse(self, sock: socket.socket, why: str) -> None:
        """Answer a connection we cannot serve with a retryable ``unavailable``, then close."""
        self.rlog.log(logging.WARNING, "refused", "refusing a connection: %s", why)
        with contextlib.suppress(OSError), sock:
            sock.setblocking(False)
            sock.send(encode({"t": "error", "code": "unavailable", "fatal": True, "retry": True,
                              "message": f"{why}; training continues at its current LRs "
                                         "and the hook retries"}))

    # -- who keeps a connection ------------------------------------------------------------
    def _oldest_without_run(self, remote: bool = False) -> Conn | None:
        candidates = [c for c in self.transport.connections()
                      if c.run is None and not c.pending and (c.remote or not remote)]
        return min(candidates, key=lambda c: c.opened, default=None)

    def _evict(self, conn: Conn, why: str) -> None:
        self.rlog.log(logging.WARNING, "evict", "closing %s, which has no run: %s", conn.name,
                      why)
        self.transport.close_conn(conn, save=False)

    def note_partial(self, conn: Conn) -> None:
        """After a read by ``conn`` without a run: account for its unfinished frame and what
        it sent after a hello not yet answered (held undecoded until the welcome), and close
        the oldest such peers while they hold more than ``Limits.max_partial_bytes``."""
        now = conn.decoder.buffered if conn.run is None and conn.sock.fileno() >= 0 else 0
        self._partial_bytes += now - conn.partial
        conn.partial = now
        if now:
            self._partial[conn] = None
        else:
            self._partial.pop(conn, None)
        while self._partial_bytes > self.limits.max_partial_bytes and self._partial:
            victim = min(self._partial, key=lambda c: c.opened)
            self._evict(victim, f"unfinished frames of peers without a run exceed "
                                f"{self.limits.max_partial_bytes} bytes")

    def forget(self, conn: Conn) -> None:
        """``conn`` was closed."""
        self._partial_bytes -= conn.partial
        conn.partial = 0
        self._partial.pop(conn, None)

    def housekeeping(self, now: float) -> None:
        """Close quiet peers without a run; bind the socket file again if it was removed."""
        limit = self.limits.quiet_timeout_s
        # (A peer whose messages wait for their share is not quiet: it is not read meanwhile.)
        for conn in [c for c in self.transport.connections()
                     if c.run is None and not c.pending and not c.decoder.has_frame
                     and now - c.heard > limit]:
            self.rlog.log(logging.WARNING, "quiet", "closing %s: no %s within %g s",
                          conn.name, "hello" if conn.authed else "token", limit)
            self.transport.close_conn(conn, save=False)
        self._check_socket()

    def _check_socket(self) -> None:
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
        try:
            # Its directory may have gone with it (XDG_RUNTIME_DIR removed at logout), and
            # with it the socket's lock file: make both again before binding.
            paths.ensure_private_dir(os.path.dirname(self.socket_path))
            if self.relock is not None and not self.relock():
                log.error("socket %s was removed, and another controller serves it now: new "
                          "runs go to that one; the runs connected here go on",
                          self.socket_path)
                self._unix = None  # say it once
                return
            sock = bind_unix(self.socket_path)
        except OSError as exc:
            self.rlog.log(logging.ERROR, "rebind", "socket %s was removed and cannot be bound "
                          "again: %s", self.socket_path, exc)
            return
        log.warning("socket %s was removed; bound it again", self.socket_path)
        sock.setblocking(False)
        self._drop_listener(self._unix)
        self.listeners[sock] = True
        if self._paused:
            self._paused[sock] = True
        else:
            self._poll(sock, True)
        self._unix = sock
        self._unix_id = file_id(self.socket_path)

    def _drop_listener(self, sock: socket.socket) -> None:
        with contextlib.suppress(KeyError, ValueError):
            self.transport.sel.unregister(sock)
        self.listeners.pop(sock, None)
        self._paused.pop(sock, None)
        sock.close()

    def close(self) -> None:
        for sock in list(self.listeners):
            self._drop_listener(sock)
        if self._spare is not None:
            os.close(self._spare)
            self._spare = None
