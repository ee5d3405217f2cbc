"""Starting a controller for the hook when none answers (Unix sockets only)."""

from __future__ import annotations

import hashlib
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from . import paths
from ._link import Link
from ._version import __version__

__all__ = ["SPAWNED_IDLE_EXIT_S", "Controller", "respawn", "served", "spawn_and_open", "spawned",
           "start_controller", "versioned_socket"]

log = logging.getLogger("lrctl")

#: A controller that attach() started exits after this long with no hook connected.
SPAWNED_IDLE_EXIT_S = 600
#: After the controller a hook started exits because another holds the socket, how long
#: that one may still take to answer.
EXITED_GRACE_S = 10.0
#: ``lrctl serve``'s exit status when another controller holds the socket or state dir.
ANOTHER_SERVES = 3


class Controller(subprocess.Popen[bytes]):
    """A controller this process started. It outlives the process by design (it exits
    ``SPAWNED_IDLE_EXIT_S`` after its last hook left), so a handle dropped while it still
    runs says nothing: ``Popen`` would warn (``ResourceWarning: subprocess N is still
    running``, at every exit of a training script run under ``-X dev`` or ``-W error``)
    and keep it for reaping, which a process that lives on has no use for."""

    def __del__(self, *args: Any, **kwargs: Any) -> None:
        try:
            running = self.returncode is None and self.poll() is None
        except Exception:  # (at interpreter shutdown, os may be half gone)
            return
        if not running:
            super().__del__(*args, **kwargs)


#: The controllers this process started (kept so their handles outlive the caller's frame).
spawned: list[Controller] = []
#: The last controller :func:`respawn` started on each socket, its log and where its
#: output begins (the next respawn says how it ended, if it failed).
_respawned: dict[str, tuple[Controller, Path, int]] = {}


def start_controller(address: str) -> Controller:
    """Start ``lrctl serve`` on ``address`` in its own session, logging to the state dir.

    Two runs may start one at once: the loser's controller exits (the socket's lock
    is taken) and both connect to the winner.
    """
    return _start(address)[0]


def spawned_env() -> dict[str, str]:
    """The environment of a controller a hook starts: this script's, less its MLflow store.

    A controller's own ``MLFLOW_TRACKING_URI`` is the store of the runs whose scripts
    name none (an operator's choice for ``lrctl serve``); the hook sends its script's
    anyway. Inherited, it had the next scripts' runs, for the ten minutes the controller
    stays, land in this script's store instead of their own default."""
    env = dict(os.environ)
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


def _start(address: str) -> tuple[Controller, Path, int]:
    """:func:`start_controller`, with its log file and where this start's output begins."""
    state = paths.ensure_state_dir(paths.state_dir(socket=address))
    log_path = state / "controller.out"
    fd = paths.open_private(log_path, os.O_WRONLY | os.O_APPEND)
    with os.fdopen(fd, "ab") as out:
        offset = out.seek(0, os.SEEK_END)
        proc = Controller(
            # No --state-dir: the controller derives it as above, and serves from its
            # socket's own when another controller holds that one (lrctl.paths.state_dir).
            [sys.executable, "-m", "lrctl", "serve", "--socket", address,
             "--idle-exit", str(SPAWNED_IDLE_EXIT_S)],
            stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True, close_fds=True, env=spawned_env())
    for earlier in spawned:
        earlier.poll()  # one that exited is reaped (no zombie per respawn attempt)
    spawned.append(proc)
    log.info("lrctl: started a controller (pid %d) on %s", proc.pid, address)
    return proc, log_path, offset


def versioned_socket(address: str) -> str:
    """Where this version's own controller listens when another holds ``address``: beside
    it, named after it, or, where that name is past the Unix limit, in the runtime
    directory, named after a hash of it."""
    base = address[:-5] if address.endswith(".sock") else address
    named = f"{base}-{__version__}.sock"
    if len(os.fsencode(named)) <= paths.UNIX_PATH_MAX:
        return named
    digest = hashlib.sha256(os.fsencode(address)).hexdigest()[:12]
    return str(paths.runtime_dir() / f"lrctl-{digest}-{__version__}.sock")


def served(address: str) -> None:
    """A controller on ``address`` welcomed the run: whatever ends the one :func:`respawn`
    started there later is no failure to start (say, a crash after hours of serving)."""
    _respawned.pop(address, None)


def respawn(address: str, resumable: bool) -> tuple[str, str]:
    """No controller answers on ``address`` (the one this run used is gone, or none ever
    started): start one (it restores the sessions). ``resumable``: a controller has
    served the run (it goes on from its checkpoint), else it starts once one answers.
    Returns the kind of warning and its text: ``respawn-failed`` when the controller
    started last time exited with an error (its last words are in the text)."""
    failed = ""
    earlier = _respawned.get(address)
    if earlier is not None:
        before, before_log, before_offset = earlier
        if before.poll() not in (None, 0, ANOTHER_SERVES):
            said = _last_line(before_log, before_offset)
            failed = (f"the one started before (pid {before.pid}) exited with status "
                      f"{before.returncode}" + (f": {said}" if said else "") + "; ")
    proc, log_path, offset = _start(address)
    _respawned[address] = (proc, log_path, offset)
    then = ("the run goes on from its checkpoint once it answers" if resumable
            else "the run starts once it answers")
    return ("respawn-failed" if failed else "respawn",
            f"lrctl: no controller has answered on {address} for a while; {failed}started one "
            f"(pid {proc.pid}, its output in {log_path}): {then}")


def spawn_and_open(link: Link, timeout: float) -> str | None:
    """Start a controller and wait until it answers (at most ``timeout``); None once it
    does, else why not. A controller that exits because another holds the socket (status
    3: another run started one at the same moment) stops the wait soon: that one took
    the socket's lock just before binding, so a few seconds (``EXITED_GRACE_S``) are
    ample. One that exits otherwise (bad configuration, a crash) stops it at once: no
    one else is starting. The exited one's last output is in the reason."""
    try:
        proc, log_path, offset = _start(link.address)
    except OSError as exc:  # the state dir is not safely ours, or cannot be made: fail open
        return f"no controller could be started: {exc}"
    deadline = time.monotonic() + timeout
    delay = 0.02
    while time.monotonic() < deadline:
        if link.open(timeout=1.0):
            return None
        if proc.poll() is not None:
            if proc.returncode != ANOTHER_SERVES:
                if link.open(timeout=1.0):  # (one more look: someone else's may be up)
                    return None
                break
            deadline = min(deadline, time.monotonic() + EXITED_GRACE_S)
        time.sleep(delay)
        delay = min(delay * 1.5, 0.25)
    if proc.returncode is None:
        return f"the controller it started (pid {proc.pid}) did not answer within {timeout:g} s"
    said = _last_line(log_path, offset)
    return (f"the controller it started (pid {proc.pid}) exited with status "
            f"{proc.returncode}" + (f": {said} (its output: {log_path})" if said
                                    else f" (see {log_path})"))


def _last_line(path: Path, offset: int) -> str:
    """The last non-empty line written to ``path`` after ``offset`` (at most 4 KiB read)."""
    try:
        with open(path, "rb") as f:
            end = f.seek(0, os.SEEK_END)
            f.seek(max(offset, end - 4096))
            text = f.read().decode("utf-8", "replace")
    except OSError:
        return ""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1][:500] if lines else ""
