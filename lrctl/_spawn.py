"""Starting a controller for the hook when none answers (Unix sockets only)."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
import warnings

from . import paths
from ._link import Link
from ._version import __version__

__all__ = ["SPAWNED_IDLE_EXIT_S", "respawn", "spawn_and_open", "spawned", "start_controller",
           "versioned_socket"]

log = logging.getLogger("lrctl")

#: A controller that attach() started exits after this long with no hook connected.
SPAWNED_IDLE_EXIT_S = 600
#: The controllers this process started (kept so their handles outlive the caller's frame).
spawned: list[subprocess.Popen[bytes]] = []


def start_controller(address: str) -> subprocess.Popen[bytes]:
    """Start ``lrctl serve`` on ``address`` in its own session, logging to the state dir.

    Two runs may start one at once: the loser's controller exits (the socket's lock
    is taken) and both connect to the winner.
    """
    state = paths.ensure_private_dir(paths.state_dir())
    fd = paths.open_private(state / "controller.out", os.O_WRONLY | os.O_APPEND)
    with os.fdopen(fd, "ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "lrctl", "serve", "--socket", address,
             "--state-dir", str(state), "--idle-exit", str(SPAWNED_IDLE_EXIT_S)],
            stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True, close_fds=True)
    spawned.append(proc)
    log.info("lrctl: started a controller (pid %d) on %s", proc.pid, address)
    return proc


def versioned_socket(address: str) -> str:
    """Where this version's own controller listens when another holds ``address``."""
    base = address[:-5] if address.endswith(".sock") else address
    return f"{base}-{__version__}.sock"


def respawn(address: str) -> None:
    """The controller this run used is gone: start another (it restores the sessions)."""
    start_controller(address)
    warnings.warn(f"lrctl: the controller on {address} did not come back; started a new one",
                  RuntimeWarning, stacklevel=2)


def spawn_and_open(link: Link, timeout: float) -> bool:
    """Start a controller and wait until it answers."""
    proc = start_controller(link.address)
    deadline = time.monotonic() + timeout
    delay = 0.02
    while time.monotonic() < deadline:
        if link.open(timeout=1.0):
            return True
        proc.poll()
        time.sleep(delay)
        delay = min(delay * 1.5, 0.25)
    return False
