"""The controller's claim on its socket and state directory: locks, binding, and taking
them again when someone removes them.

Start-up is race-safe: the controller holds an exclusive ``flock`` on
``<socket>.lock`` for its whole life. A second ``serve`` on the same socket
fails to take the lock and exits non-zero, naming the pid that holds it; a
socket file left by a controller that died (``kill -9``) is unlinked and taken
over, since holding the lock proves nobody else serves it (and a controller that
still answers there, its lock file removed, is not). It holds ``controller.lock``
in its state directory too: two controllers on one state directory would each
restore the other's runs from their checkpoints, and end them (and their MLflow
runs) when no hook came, so the second one refuses.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import socket
import stat
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from .. import paths
from .admission import bind_unix
from .retention import gate

if TYPE_CHECKING:
    from .process import ServeOptions

__all__ = ["AlreadyServing", "Listening", "bind", "lock_state", "relock_socket",
           "relock_state_dir", "take_lock"]

log = logging.getLogger("lrctl.daemon")


class AlreadyServing(RuntimeError):
    """Another live controller holds the socket."""


class Listening:
    """The bound sockets and the locks that make them (and the state directory) ours;
    ``close`` releases all."""

    def __init__(self, unix: socket.socket, lock_fd: int, path: str,
                 tcp: socket.socket | None) -> None:
        self.unix = unix
        self.tcp = tcp
        self.lock_fd = lock_fd
        self.state_lock_fd = -1  # the state directory's (see lock_state_dir)
        self.owns_state = False  # the shared state directory names this socket its owner
        self.notes: list[str] = []  # warnings for the log, once it is open
        self.path = path
        self.took_over = False  # a stale socket of a dead controller was replaced

    def holds_socket(self) -> bool:
        """Whether the socket's lock file is still the one this controller locked."""
        try:
            held, there = os.fstat(self.lock_fd), os.lstat(self.path + ".lock")
        except OSError:
            return False
        return (held.st_dev, held.st_ino) == (there.st_dev, there.st_ino)

    def release_state_lock(self) -> None:
        if self.state_lock_fd >= 0:
            os.close(self.state_lock_fd)
            self.state_lock_fd = -1

    def close(self) -> None:
        for sock in (self.unix, self.tcp):
            if sock is not None:
                sock.close()
        if self.holds_socket():  # else another controller serves it now: not ours to remove
            with contextlib.suppress(OSError):
                os.unlink(self.path)
        os.close(self.lock_fd)
        self.release_state_lock()


#: How long a controller's start waits for an ``lrctl prune`` that holds its state
#: directory's gate (it holds it while it moves at most a request's worth of journals).
GATE_WAIT_S = 10.0

#: flock errors of a filesystem that has no locks (NFS mounted nolock, Lustre without
#: -o flock): the controller goes on unlocked, and says so.
_NO_LOCKS = {errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP}


def take_lock(path: str | Path, socket_path: str | None = None) -> int | str | None:
    """An exclusive ``flock`` on ``path`` (created 0600, never through a symlink), our pid
    (and ``socket_path``) written in it (see ``paths.lock_text``): its descriptor, the
    pid of the process that holds it, or ``None`` where the filesystem has no locks."""
    fd = paths.open_private(path, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = paths.lock_fields(os.pread(fd, 4096, 0))[0] or "?"
        os.close(fd)
        return holder
    except OSError as exc:
        os.close(fd)
        if exc.errno in _NO_LOCKS:
            return None
        raise
    except BaseException:
        os.close(fd)
        raise
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, paths.lock_text(os.getpid(), socket_path), 0)
    except BaseException:
        os.close(fd)
        raise
    return fd


def lock_state_dir(listening: Listening, state: Path,
                   gate_wait_s: float = GATE_WAIT_S) -> None:
    """Take ``state``'s ``controller.lock`` for ``listening``'s life, or raise
    :class:`AlreadyServing` naming the controller that uses the directory. First, an
    ``lrctl prune`` moving journals there with no controller running is waited for (up
    to ``gate_wait_s``; see :func:`~lrctl.daemon.retention.gate`): the directory is not
    taken from under it, and this controller does not go elsewhere for finding it held."""
    def waiting() -> None:  # (before the log is open: stderr, where serve's output goes)
        print(f"lrctl serve: waiting for an 'lrctl prune' at work in {state} (up to "
              f"{gate_wait_s:g} s)", file=sys.stderr, flush=True)

    with gate(state, gate_wait_s, waiting) as why:
        if why is not None:  # (held past the wait, or no locks there: said, not fatal)
            listening.notes.append(f"{why}: started without waiting for it")
        taken = take_lock(state / paths.STATE_LOCK, listening.path)
    if isinstance(taken, str):
        raise AlreadyServing(f"another controller (pid {taken}) already uses the state "
                             f"directory {state}; give this one its own --state-dir (or "
                             "LRCTL_STATE_DIR), or stop that one first")
    if taken is None:
        listening.notes.append(f"the state directory {state} cannot be locked (its "
                               "filesystem has no locks): make sure no other controller "
                               "uses it")
        return
    listening.state_lock_fd = taken


def lock_state(listening: Listening, options: ServeOptions, state: Path) -> Path:
    """The state directory this controller serves from, locked: ``state``, or, when
    another controller holds it and it was not given (``--state-dir``),
    ``options.state_fallback`` (this socket's own; see ``lrctl.paths.state_dir``)."""
    fallback = options.state_fallback
    try:
        lock_state_dir(listening, state)
    except AlreadyServing as exc:
        if fallback is None:
            raise
        why = exc.args[0].split(";")[0]
    else:
        if fallback is None or Path(fallback) == state:
            return state
        # The shared directory, by default: it becomes this socket's, unless another
        # socket claimed it since this controller looked (then it is that one's).
        owner = paths.state_owner(state)
        if owner is None:
            paths.claim_state_dir(state, options.socket_path)
        if owner is None or owner == os.path.realpath(options.socket_path):
            listening.owns_state = True
            return state
        listening.release_state_lock()
        why = f"the state directory {state} belongs to the controller on {owner}"
    own = paths.ensure_state_dir(fallback)
    lock_state_dir(listening, own)
    listening.notes.append(f"{why}: this controller keeps its state in {own} instead (its "
                           "socket's own, from now on)")
    return own


def relock_state_dir(listening: Listening, state: Path) -> str | None:
    """The state directory was deleted and made again (see ``StateDirWatch``): its lock
    (and, in the shared directory, the owner file naming this socket) went with it, so
    take the new one's (and write it again). Why not, when it cannot (another
    controller started on it meanwhile)."""
    listening.release_state_lock()
    try:  # (on the loop: a prune in a directory made anew just now is not waited for long)
        lock_state_dir(listening, state, gate_wait_s=0.5)
        if listening.owns_state:  # its owner file went too: else another socket's
            paths.claim_state_dir(state, listening.path)  # controller would claim it
    except (AlreadyServing, OSError) as exc:
        log.error("cannot lock the recreated state dir: %s", exc)
        return f"cannot lock it again: {exc}"
    return None


def relock_socket(listening: Listening) -> bool:
    """The socket file was removed (see ``Admission._check_socket``), perhaps with its
    directory and so its lock file: take the lock of the file there now. False when
    another controller holds it (it serves the socket now: leave it be)."""
    if listening.holds_socket():
        return True
    taken = take_lock(listening.path + ".lock")
    if isinstance(taken, str):
        return False
    if taken is not None:  # (None: a filesystem without locks, as at the start)
        os.close(listening.lock_fd)
        listening.lock_fd = taken
    return True


def bind(options: ServeOptions) -> Listening:
    """Check the directories, take the lock, bind the sockets (0600)."""
    path = options.socket_path
    paths.parse_address(path)  # checks the sun_path length
    paths.ensure_private_dir(Path(path).parent)
    # Never through a symlink (a planted <socket>.lock -> ~/.bashrc would be truncated).
    lock_fd = take_lock(path + ".lock")
    if isinstance(lock_fd, str):
        raise AlreadyServing(f"another controller (pid {lock_fd}) is already serving on "
                             f"{path}; stop it first or choose another --socket")
    if lock_fd is None:
        raise OSError(f"cannot lock {path}.lock (its filesystem has no locks); choose a "
                      "--socket on a local filesystem")
    try:
        if os.path.lexists(path):
            if not _is_socket(path):
                raise FileExistsError(f"{path} exists and is not a socket; refusing to "
                                      "replace it")
            pid = _answering_pid(path)
            if pid is not None:  # its lock file was removed, not its controller
                with contextlib.suppress(OSError):  # the one made just now: nobody's
                    os.unlink(path + ".lock")
                raise AlreadyServing(f"a controller (pid {pid}) answers on {path}, though its "
                                     "lock file was removed; stop it first (lrctl stop "
                                     f"--socket {path}) or choose another --socket")
            os.unlink(path)  # stale: its controller died without cleaning up
            stale = True
        else:
            stale = False
        unix = bind_unix(path)
        try:
            tcp = _bind_tcp(options) if options.tcp else None
        except BaseException:
            unix.close()
            with contextlib.suppress(OSError):
                os.unlink(path)  # bound just now: ours (no socket is left behind)
            raise
    except BaseException:
        os.close(lock_fd)
        raise
    listening = Listening(unix, lock_fd, path, tcp)
    listening.took_over = stale
    return listening


def _bind_tcp(options: ServeOptions) -> socket.socket:
    if not options.token:
        raise ValueError("--tcp needs a token: pass --token-file FILE or set LRCTL_TOKEN")
    assert options.tcp is not None
    host, port = options.tcp
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(128)
    return sock


def _answering_pid(path: str) -> str | None:
    """The pid of the controller answering on the Unix socket ``path`` ("?" for something
    that accepts connections but does not say), or None when nothing does."""
    from ..wire.operator import ControllerError, request
    from ..wire.unix import connect_unix

    try:
        return str(request({"t": "status"}, path, timeout=2.0).get("pid", "?"))
    except ControllerError:
        return "?"
    except TimeoutError:
        return "?"  # a listener whose backlog stayed full: alive, and busy
    except (OSError, ValueError):
        try:
            connect_unix(path, 1.0).close()
        except TimeoutError:
            return "?"
        except OSError:
            return None
        return "?"


def _is_socket(path: str) -> bool:
    return stat.S_ISSOCK(os.lstat(path).st_mode)
