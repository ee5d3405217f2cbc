"""The state dir, checked once a second: deleted (or replaced) under a running controller,
it is made again.

The runs never depend on it for their LRs, but the journal, the checkpoints and the
log live there. When the directory at ``state_dir`` is gone, or is another one, it
is created again private (0700), the controller's log file is reopened, and the
server has every open run's journal written back from the files it still holds
open and every run checkpointed again. The log and ``lrctl status`` say so.

A symlink, a file or a directory that is not ours in its place is refused and
reported (``error``), and not made again; meanwhile no new run starts (its hello is
refused retryably: the hook trains on and tries again), so no new run's files go
through it. The open runs' journals stay in the files the controller holds open; their
checkpoints are refused until it is fixed (the store compares the path with the state
dir it holds open: see StateStore._not_ours).

Another controller started on the path while it was gone (it made the directory and
took its lock first) owns it: this one creates nothing there from then on — no
journal written back, no checkpoint, no set-aside move, its log not reopened there
(``foreign``, which the store heeds), no run folder (a hello that would open one, a
new run or a resumed job with an MLflow run of its own, is refused retryably) — and
says so in ``lrctl status`` and on stderr; its open runs go on from memory, their LRs
exact.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from typing import Any

from .. import paths
from .held_dir import HeldDir
from .logfile import PrivateLogHandler

__all__ = ["StateDirWatch"]

log = logging.getLogger("lrctl.daemon")


class StateDirWatch:
    def __init__(self, state_dir: str) -> None:
        self.path = state_dir
        self.recreated: dict[str, Any] | None = None  # {"count", "at"}: for status
        self.error: str | None = None  # it is gone and cannot be made again
        # Another controller locked it after it was made again: why (nothing is written
        # there; see StateStore.foreign), or None.
        self.foreign: str | None = None
        # Its lock, taken again (listening.py): None, or why it cannot be.
        self.relock: Callable[[], str | None] | None = None
        self._held = HeldDir(state_dir) if state_dir else None

    def close(self) -> None:
        """Let the directory go (the controller stops)."""
        if self._held is not None:
            self._held.close()

    def check(self) -> bool:
        """True when the directory was made again just now, ours (a cheap ``lstat`` and
        ``fstat`` otherwise)."""
        if self._held is None or self._held.same():
            return False
        try:
            paths.ensure_private_dir(self.path)
        except OSError as exc:  # a symlink or a file planted there, someone else's
            if self.error is None:
                log.error("state dir %s is gone and cannot be made again: %s", self.path, exc)
            self.error = f"state dir {self.path}: {exc}"
            return False
        self._held.reopen()
        self.error = self.foreign = None
        problem = self.relock() if self.relock is not None else None
        if problem is not None:
            # Another controller holds it now (started on it while it was gone): no new
            # run starts here, and status says so; nothing of ours is written there (the
            # open runs go on from memory, their journals in the files held open).
            self.error = self.foreign = f"state dir {self.path}: {problem}"
            log.error("the state dir %s was deleted and another controller took it: this "
                      "one writes nothing there (no checkpoint, journal or log); its open "
                      "runs go on from memory", self.path)
            return False
        _reopen_logs(self.path)
        count = 1 + (self.recreated or {}).get("count", 0)
        self.recreated = {"count": count, "at": time.time()}
        log.warning("state dir %s was deleted (or replaced) under the controller; recreated "
                    "it (0700), with the journals of the open runs written back from their "
                    "open files and every run checkpointed again", self.path)
        return True


def _reopen_logs(state_dir: str) -> None:
    """Log files under the state dir go to a new file (born 0600, never a symlink: see
    logfile.py)."""
    root = os.path.abspath(state_dir) + os.sep
    for handler in logging.getLogger("lrctl").handlers:
        if isinstance(handler, PrivateLogHandler) and handler.baseFilename.startswith(root):
            handler.acquire()
            try:
                try:
                    stream = handler._open()
                except OSError as exc:
                    log.error("cannot reopen the log %s: %s", handler.baseFilename, exc)
                    continue
                old, handler.stream = handler.stream, stream
                if old is not None:
                    old.close()
            finally:
                handler.release()
