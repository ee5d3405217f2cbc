"""Where the controller listens and keeps its state, and the checks that keep them private.

Defaults follow the XDG conventions, each overridable by an environment
variable so tests (and users) can inject their own:

* socket: ``$LRCTL_SOCKET``, else ``$XDG_RUNTIME_DIR/lrctl/lrctl.sock``, else
  ``/tmp/lrctl-<uid>/lrctl.sock``;
* state: ``$LRCTL_STATE_DIR``, else ``$XDG_STATE_HOME/lrctl``, else
  ``~/.local/state/lrctl``: it belongs to the socket of the first controller that
  served from it by default (the default socket's), a controller on any other socket
  keeps its state in ``sockets/<name>-<hash>`` inside it (a state directory serves one
  controller: it restores the runs it finds there; see :func:`state_dir`).

A Unix socket is private only if its directory is: the directory must belong to
us and be writable by nobody else, or another user could swap the socket for
their own and read our runs' statistics (or feed us LRs).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import stat
import warnings
from collections.abc import Mapping
from pathlib import Path

__all__ = [
    "OWNER_FILE",
    "STATE_LOCK",
    "UNIX_PATH_MAX",
    "claim_state_dir",
    "default_socket",
    "ensure_private_dir",
    "ensure_state_dir",
    "lock_fields",
    "lock_text",
    "own_state_dir",
    "parse_address",
    "runtime_dir",
    "state_dir",
    "state_dir_socket",
    "state_dirs",
    "state_owner",
]

# sun_path is 108 bytes on Linux, including the terminating NUL.
UNIX_PATH_MAX = 107


def runtime_dir(env: Mapping[str, str] | None = None) -> Path:
    env = os.environ if env is None else env
    xdg = env.get("XDG_RUNTIME_DIR")
    if xdg and os.path.isdir(xdg):
        return Path(xdg) / "lrctl"
    return Path("/tmp") / f"lrctl-{os.getuid()}"


def default_socket(env: Mapping[str, str] | None = None) -> str:
    env = os.environ if env is None else env
    return env.get("LRCTL_SOCKET") or str(runtime_dir(env) / "lrctl.sock")


#: Inside the default state directory: those of controllers on other sockets.
SOCKETS_DIR = "sockets"


def state_dir(env: Mapping[str, str] | None = None, socket: str | None = None) -> Path:
    """The state directory of the controller on ``socket`` (``None``: the default
    socket's). A state directory serves one controller: it restores the runs it finds
    there, so two sharing one would each end the other's, at once or taking turns. The
    shared directory (``$LRCTL_STATE_DIR``, …) belongs to the socket recorded in it
    (:data:`OWNER_FILE`, written by the first controller that served from it by
    default), and until one is, to the default socket; a controller on any other
    socket, or one that once found the shared directory held (see
    ``lrctl.daemon.listening``), uses :func:`own_state_dir`. A TCP address names no Unix
    socket: the shared directory."""
    env = os.environ if env is None else env
    base = _state_base(env)
    if socket is None or socket.startswith("tcp://"):
        return base
    real = os.path.realpath(socket)
    own = own_state_dir(socket, env)
    if os.path.isdir(own):  # it found the shared one held once: its own, from then on
        return own
    owner = state_owner(base)
    if owner is not None:
        return base if owner == real else own
    return own if real != os.path.realpath(default_socket(env)) else base


#: In the shared state directory: the real path of the socket whose controller it serves.
OWNER_FILE = "socket"


def state_owner(base: str | os.PathLike[str]) -> str | None:
    """The socket the shared state directory ``base`` belongs to, or None (not yet
    claimed, or unreadable: a file that is not ours is not trusted)."""
    try:
        fd = os.open(Path(base) / OWNER_FILE, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.getuid():
            return None
        text = os.read(fd, 4096).decode("utf-8", "surrogateescape").strip()
    except OSError:
        return None
    finally:
        os.close(fd)
    return text or None


def claim_state_dir(base: str | os.PathLike[str], socket: str) -> None:
    """Record ``socket`` as the owner of the shared state directory ``base`` (atomic,
    0600): from now on a controller on another socket serves from its own."""
    final = Path(base) / OWNER_FILE
    tmp = final.with_name(f".{OWNER_FILE}.{os.getpid()}.tmp")
    fd = open_private(tmp, os.O_WRONLY | os.O_TRUNC)
    try:
        os.write(fd, (os.path.realpath(socket) + "\n").encode("utf-8", "surrogateescape"))
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, final)


def own_state_dir(socket: str, env: Mapping[str, str] | None = None) -> Path:
    """``sockets/<name>-<hash>`` inside the shared state directory: the state directory
    of the controller on the Unix socket ``socket`` alone (the hash is of its real path)."""
    real = os.path.realpath(socket)
    name = re.sub(r"[^A-Za-z0-9._-]", "_", os.path.basename(real).removesuffix(".sock"))
    digest = hashlib.sha256(real.encode("utf-8", "surrogateescape")).hexdigest()[:12]
    return _state_base(env) / SOCKETS_DIR / f"{name.lstrip('.')[:40] or 'socket'}-{digest}"


def _state_base(env: Mapping[str, str] | None) -> Path:
    env = os.environ if env is None else env
    # Absolute: a relative LRCTL_STATE_DIR named the same directory as the absolute path a
    # controller reports, and 'lrctl runs --all' listed its runs twice.
    if env.get("LRCTL_STATE_DIR"):
        return Path(os.path.abspath(env["LRCTL_STATE_DIR"]))
    if env.get("XDG_STATE_HOME"):
        return Path(os.path.abspath(env["XDG_STATE_HOME"])) / "lrctl"
    return Path.home() / ".local" / "state" / "lrctl"


#: In a state directory: the lock its controller holds for its life (see lrctl.daemon.listening).
STATE_LOCK = "controller.lock"


def lock_text(pid: int, socket: str | None = None) -> bytes:
    """A lock file's text: the holder's pid on a line of fixed length (16 bytes, so that a
    controller that forks into the background rewrites it in place), then its socket."""
    text = f"{pid}".ljust(15) + "\n" + ("" if socket is None else socket + "\n")
    return text.encode("utf-8", "surrogateescape")


def lock_fields(data: bytes) -> tuple[str, str | None]:
    """``(pid, socket)`` from :func:`lock_text`'s bytes (an older lock: the pid alone)."""
    lines = data.decode("utf-8", "surrogateescape").split("\n")
    socket = lines[1].strip() if len(lines) > 1 else ""
    return lines[0].strip(), socket or None


def state_dir_socket(state: str | os.PathLike[str]) -> str | None:
    """The socket of the controller that serves (or last served) from ``state``, from
    its lock file; None if it does not say."""
    try:
        fd = os.open(Path(state) / STATE_LOCK, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        return lock_fields(os.read(fd, 4096))[1]
    except OSError:
        return None
    finally:
        os.close(fd)


def state_dirs(env: Mapping[str, str] | None = None) -> list[Path]:
    """The shared state directory, then those of controllers on other sockets (the
    places a run's files may be, for the CLI verbs that read them)."""
    base = state_dir(env)
    others = base / SOCKETS_DIR
    try:
        found = sorted(p for p in others.iterdir() if p.is_dir() and not p.is_symlink())
    except OSError:
        found = []
    return [base, *found]


def ensure_state_dir(path: str | os.PathLike[str]) -> Path:
    """:func:`ensure_private_dir` for a state directory; for one inside the shared
    directory's ``sockets/``, the shared directory and ``sockets/`` are checked too (one
    another user could write to would let them swap ``sockets/`` for their own)."""
    p = Path(path)
    if p.parent.name == SOCKETS_DIR:
        ensure_private_dir(p.parent.parent)
        ensure_private_dir(p.parent)
    return ensure_private_dir(p)


#: A run key: safe as a file name and an MLflow name. No "/" and no leading "." means no
#: path traversal ("a..b" is a plain file name). Checked with ``fullmatch`` (``$`` would
#: let a trailing newline through).
_RUN_KEY = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}")
RUN_KEY_MAX = 96


def is_run_key(key: object) -> bool:
    """True for a string that may name a run (its files, its MLflow run)."""
    return isinstance(key, str) and _RUN_KEY.fullmatch(key) is not None


def ensure_private_dir(path: str | os.PathLike[str], *, quiet: bool = False) -> Path:
    """Create ``path`` (mode 0700, and 0700 any missing parent it creates) if missing;
    refuse one that is not safely ours. One readable by others is made 0700, with a
    warning. ``quiet``: a directory inside one already checked private (a run's, in the
    state directory), which no other user can reach: made 0700 without a word even
    when group- or world-writable (an earlier lrctl made run directories with the
    umask's mode, 0775 under umask 002).

    Raises :class:`PermissionError` naming the path and what is wrong with it.
    """
    p = Path(path)
    missing = []  # created here 0700 too (mkdir's parents would get the umask's mode)
    parent = p.parent
    while parent != parent.parent and not os.path.lexists(parent):
        missing.append(parent)
        parent = parent.parent
    for d in reversed(missing):
        with contextlib.suppress(FileExistsError):  # made meanwhile: fine
            d.mkdir(mode=0o700)
    with contextlib.suppress(FileExistsError):  # a file there: reported just below
        p.mkdir(mode=0o700, exist_ok=True)
    st = os.lstat(p)
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
        raise PermissionError(f"{p} is not a directory (a symlink or a file); refusing to use it")
    if st.st_uid != os.getuid():
        raise PermissionError(
            f"{p} belongs to uid {st.st_uid}, not to us (uid {os.getuid()}); refusing to use it")
    if quiet and st.st_mode & 0o077:
        os.chmod(p, 0o700)
        return p
    if st.st_mode & 0o022:
        raise PermissionError(
            f"{p} is writable by other users (mode {stat.S_IMODE(st.st_mode):04o}), so "
            f"another user could replace what lrctl keeps there; make it private ('chmod "
            f"700 {p}', if it is yours alone) or choose another ('mkdir -m 700 DIR')")
    if st.st_mode & 0o077:  # readable by others: logs and checkpoints would leak
        os.chmod(p, 0o700)
        warnings.warn(f"{p} was readable by other users (mode "
                      f"{stat.S_IMODE(st.st_mode):04o}); lrctl made it 0700", RuntimeWarning,
                      stacklevel=2)
    return p


def open_private(path: str | os.PathLike[str], flags: int) -> int:
    """Open (creating 0600) a file in a directory already checked private; never through
    a symlink, and never anything but a regular file. Returns the descriptor."""
    try:
        fd = os.open(path, flags | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        if exc.errno == errno.ELOOP:  # O_NOFOLLOW met a symlink
            raise PermissionError(f"{path} is a symlink; refusing to write through it "
                                  "(remove it, or choose another path)") from None
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise PermissionError(f"{path} is not a regular file; refusing to use it")
        if stat.S_IMODE(st.st_mode) & 0o077:
            os.fchmod(fd, 0o600)
    except BaseException:
        os.close(fd)
        raise
    return fd


def open_regular(path: str | os.PathLike[str], *, follow: bool = False) -> int:
    """A descriptor to read a regular file, opened without blocking: a FIFO or a device
    at the path (which an ``open`` would wait on for ever) is refused with ``OSError``
    (``EINVAL``), as is a symlink unless ``follow`` (``ELOOP``)."""
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | (0 if follow else os.O_NOFOLLOW)
    fd = os.open(path, flags)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file", str(path))
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_regular(path: str | os.PathLike[str], limit: int, *, follow: bool = False) -> bytes:
    """Up to ``limit`` bytes of a regular file, never blocking: a FIFO or a device at the
    path (which an ``open`` would wait on for ever) is refused with ``OSError``, as is a
    symlink unless ``follow``."""
    fd = open_regular(path, follow=follow)
    try:
        chunks, left = [], limit
        while left > 0 and (chunk := os.read(fd, min(left, 1 << 20))):
            chunks.append(chunk)
            left -= len(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def parse_address(address: str) -> tuple[str, str | tuple[str, int]]:
    """``("unix", path)`` or ``("tcp", (host, port))`` from a socket argument.

    ``tcp://HOST:PORT`` (or ``tcp://PORT`` for 127.0.0.1) is TCP; anything else is
    a Unix socket path, which must fit in ``sun_path``.
    """
    if address.startswith("tcp://"):
        return "tcp", parse_host_port(address[len("tcp://"):])
    if len(os.fsencode(address)) > UNIX_PATH_MAX:
        raise ValueError(f"socket path is {len(os.fsencode(address))} bytes, over the "
                         f"{UNIX_PATH_MAX}-byte limit of Unix sockets: {address} (choose a "
                         "shorter one: --socket, socket=..., or LRCTL_SOCKET)")
    return "unix", address


def parse_host_port(text: str) -> tuple[str, int]:
    """``HOST:PORT`` or ``PORT`` (host 127.0.0.1: nothing is exposed unless asked)."""
    host, sep, port = text.rpartition(":")
    if not sep:
        host, port = "127.0.0.1", text
    host = host.strip("[]") or "127.0.0.1"
    if not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"expected HOST:PORT with a port in 0-65535, but got {text!r}")
    return host, int(port)
