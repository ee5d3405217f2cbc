"""The controller's process: lock and bind its sockets (:mod:`.listening`), detach,
log, serve until a signal.
"""

from __future__ import annotations

import logging
import os
import resource
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .. import paths
from ..sinks import Sink, build_sink
from .limits import DEFAULT_SESSION_TIMEOUT
from .listening import AlreadyServing, Listening, bind, lock_state, relock_socket, relock_state_dir
from .liveness import DEFAULT_GRACE_S, DEFAULT_STALL_S, LoopMonitor
from .logfile import PrivateLogHandler
from .server import Server
from .store import StateStore

__all__ = ["AlreadyServing", "Listening", "ServeOptions", "bind", "serve"]

log = logging.getLogger("lrctl.daemon")


@dataclass
class ServeOptions:
    socket_path: str
    state_dir: str
    tcp: tuple[str, int] | None = None
    token: str | None = None
    foreground: bool = False
    log_file: str | None = None
    watch: bool = True  # live policy editing (False: every run keeps its version)
    policies_dir: str | None = None  # validated at start and watched
    # Drop a hook-less run from memory after this long (None: never).
    session_timeout: float | None = DEFAULT_SESSION_TIMEOUT
    stall_timeout: float = DEFAULT_STALL_S  # a loop stuck this long: stack dump, exit 70
    shutdown_grace: float = DEFAULT_GRACE_S  # SIGTERM to exit at most this long (else exit 75)
    idle_exit: float | None = None  # exit once no hook has been connected this long
    # "batch": the controller runs under SCHED_BATCH, so waking it never preempts the
    # training process (async hooks on a busy machine); "normal": the OS default.
    sched: str = "normal"
    # Read fast async hooks on a timer, so that their sends wake nobody (see pacing.py);
    # False: every observation wakes the controller (--no-pacing).
    pacing: bool = True
    # Remove the journals of runs that ended this long ago, all in MLflow, hourly (see
    # upkeep.py; None: never, the default).
    keep_ended_s: float | None = None
    # Where to serve from when another controller holds state_dir (None: refuse, exit 3):
    # this socket's own directory, for a state_dir chosen by default, not given.
    state_fallback: str | None = None


def _set_sched(kind: str) -> None:
    """``--sched batch``: no wake-up preemption of whatever runs when an observation
    arrives (an unprivileged process may choose SCHED_BATCH for itself)."""
    if kind != "batch":
        return
    try:
        os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))
    except (AttributeError, OSError) as exc:
        log.warning("--sched batch: could not set SCHED_BATCH (%s); running as normal", exc)
    else:
        log.info("running under SCHED_BATCH (--sched batch)")


def serve(options: ServeOptions, sink_factory: Callable[[str], Sink] = build_sink,
          ready: Callable[[Listening], None] | None = None) -> int:
    """Run a controller until SIGTERM/SIGINT. Returns the process exit status."""
    state = paths.ensure_state_dir(options.state_dir)
    if options.policies_dir is not None and not os.path.isdir(options.policies_dir):
        raise NotADirectoryError(f"--policies {options.policies_dir}: not a directory")
    listening = bind(options)
    try:  # a failure before the loop runs leaves no socket behind (a later client would
        # read "connection refused" for "no controller")
        server, monitor = _start(options, state, listening, sink_factory, ready)
    except BaseException:
        listening.close()
        raise
    monitor.start()
    try:
        server.serve_forever()
    finally:
        # Armed until the process is gone: a non-daemon thread that hangs the
        # interpreter's exit is cut off at the end of the grace period too.
        monitor.stop_requested()
        listening.close()
    return 0



def _start(options: ServeOptions, state: Path, listening: Listening,
           sink_factory: Callable[[str], Sink],
           ready: Callable[[Listening], None] | None) -> tuple[Server, LoopMonitor]:
    """Everything between binding and the loop: the state dir's lock, detaching, the log,
    the store, the sink and the server, the stop signals."""
    state = lock_state(listening, options, state)
    started = None if options.foreground else _detach(options, state, listening)
    _setup_logging(options, state)
    for note in listening.notes:
        log.warning("%s", note)
    if listening.took_over:  # logged only now that the log exists
        log.info("took over the stale socket %s (its controller died)", options.socket_path)
    _raise_fd_limit()
    _set_sched(options.sched)
    store = StateStore(state)
    sink = sink_factory(str(state))
    listeners = [(listening.unix, True)]
    if listening.tcp is not None:
        listeners.append((listening.tcp, False))  # TCP connections authenticate first
    server = Server(listeners, store, sink, token=options.token,
                    socket_path=options.socket_path, state_dir=str(state),
                    watch=options.watch, policies_dir=options.policies_dir,
                    session_timeout=options.session_timeout, idle_exit=options.idle_exit,
                    pacing=options.pacing, keep_ended_s=options.keep_ended_s)
    server.state_watch.relock = lambda: relock_state_dir(listening, state)
    server.transport.admission.relock = lambda: relock_socket(listening)
    monitor = LoopMonitor(lambda: server.last_wake, stall_s=options.stall_timeout,
                          grace_s=options.shutdown_grace)

    def on_signal(*_: object) -> None:
        server.stop()
        monitor.on_signal()  # the stop must finish within the grace period, even if stuck

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    log.info("lrctl controller pid %d listening on %s (state in %s)", os.getpid(),
             _where(options, listening), state)
    if started is not None:  # the parent of `serve --detach` waits for this
        os.write(started, b"1")
        os.close(started)
    if ready is not None:
        ready(listening)
    return server, monitor

def _raise_fd_limit() -> None:
    """Take the hard limit on open files as our own (each run holds its connection and its
    journal files; a soft limit of 1 024 is reached at ~300 runs). What happens when even
    that runs out is in admission.py."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 1 << 16 if hard == resource.RLIM_INFINITY else min(hard, 1 << 16)
    if soft == resource.RLIM_INFINITY or soft >= want:
        return
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    except (OSError, ValueError) as exc:
        log.warning("cannot raise the open-file limit from %d: %s", soft, exc)
        return
    log.info("open-file limit raised from %d to %d", soft, want)


def _where(options: ServeOptions, listening: Listening) -> str:
    """The addresses served: the Unix socket, and the TCP one a hook gives as
    ``tcp://HOST:PORT`` (with the token in ``LRCTL_TOKEN`` or ``LRCTL_TOKEN_FILE``)."""
    if not (options.tcp and listening.tcp):
        return options.socket_path
    return (f"{options.socket_path} and tcp://{options.tcp[0]}:"
            f"{listening.tcp.getsockname()[1]}")


def _detach(options: ServeOptions, state: Path, listening: Listening) -> int:
    """Fork into the background in a new session; the parent waits until the child has
    started, reports, and exits. Returns the child's end of the pipe on which it says it
    has started (written once the server is built, just before the loop runs).

    The sockets are bound before the fork, so a refused start is reported by the
    parent's exit status; so is a start that fails after the fork (a ``--log-file`` that
    cannot be opened, say): the child exits without saying it started, and the parent
    repeats its last line of ``controller.out`` and its exit status. (Before, the parent
    said "listening" and exited 0 whatever became of the child.)
    """
    out_path = state / "controller.out"
    out = paths.open_private(out_path, os.O_WRONLY | os.O_APPEND)
    offset = os.lseek(out, 0, os.SEEK_END)
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid:
        os.close(write_end)
        os.close(out)
        code = _await_start(pid, read_end, out_path, offset)
        if code == 0:
            print(f"lrctl controller pid {pid} listening on {_where(options, listening)}; "
                  f"log: {_log_path(options, state)}")
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    os.close(read_end)
    os.setsid()
    for fd in (listening.lock_fd, listening.state_lock_fd):
        if fd >= 0:  # (none where the state directory's filesystem has no locks)
            os.pwrite(fd, paths.lock_text(os.getpid()), 0)  # the pid's line: same length
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    os.dup2(out, 1)
    os.dup2(out, 2)
    os.close(devnull)
    os.close(out)
    return write_end


#: How long ``serve --detach`` waits for its controller to start before it reports the
#: socket bound anyway (a start restores the runs checkpointed in the state directory).
DETACH_WAIT_S = 30.0


def _await_start(pid: int, fd: int, out_path: Path, offset: int) -> int:
    """The exit status ``serve --detach`` ends with: 0 once the child ``pid`` says on
    ``fd`` that it has started (or is still starting after :data:`DETACH_WAIT_S`: its
    socket is bound), else the child's own, with its last words (what it wrote to
    ``out_path`` after ``offset``) on stderr."""
    import select

    readable, _, _ = select.select([fd], [], [], DETACH_WAIT_S)
    said = os.read(fd, 1) if readable else b"still starting"
    os.close(fd)
    if said:
        return 0
    _, status = os.waitpid(pid, 0)  # it closed the pipe without a word: it has exited
    code = os.waitstatus_to_exitcode(status)
    try:
        with open(out_path, "rb") as f:
            f.seek(offset)
            lines = f.read(1 << 16).decode("utf-8", "replace").strip().splitlines()
    except OSError:
        lines = []
    print(lines[-1] if lines else f"lrctl serve: the controller (pid {pid}) exited with "
          f"status {code} before it started; see {out_path}", file=sys.stderr)
    return code if code > 0 else 1


def _log_path(options: ServeOptions, state: Path) -> str:
    return options.log_file or str(state / "controller.log")


def _setup_logging(options: ServeOptions, state: Path) -> None:
    root = logging.getLogger("lrctl")
    root.setLevel(logging.INFO)
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    log_path = _log_path(options, state)
    handler: logging.Handler = PrivateLogHandler(log_path)  # 0600, no symlink, rotated
    handler.setFormatter(fmt)
    root.addHandler(handler)
    if options.foreground:
        stream = logging.StreamHandler(sys.stderr)
        stream.setFormatter(fmt)
        root.addHandler(stream)
