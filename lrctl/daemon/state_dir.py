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
checkpoints, written by name, go wherever the path leads until it is fixed.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from typing import Any

from .. import paths

__all__ = ["StateDirWatch"]

log = logging.getLogger("lrctl.daemon")


class StateDirWatch:
    def __init__(self, state_dir: str) -> None:
        self.path = state_dir
        self.recreated: dict[str, Any] | None = None  # {"count", "at"}: for status
        self.error: str | None = None  # it is gone and cannot be made again
        # Its lock, taken again (listening.py): None, or why it cannot be.
        self.relock: Callable[[], str | None] | None = None
        self._ident = self._stat()

    def _stat(self) -> tuple[int, int] | None:
        try:
            st = os.lstat(self.path)
        except OSError:
            return None
        return st.st_dev, st.st_ino

    def check(self) -> bool:
        """True when the directory was made again just now (a cheap ``lstat`` otherwise)."""
        if not self.path:
            return False
        ident = self._stat()
        if ident is not None and ident == self._ident:
            return False
        try:
            paths.ensure_private_dir(self.path)
        except OSError as exc:  # a symlink or a file planted there, someone else's
            if self.error is None:
                log.error("state dir %s is gone and cannot be made again: %s", self.path, exc)
            self.error = f"state dir {self.path}: {exc}"
            return False
        self._ident, self.error = self._stat(), None
        _reopen_logs(self.path)
        problem = self.relock() if self.relock is not None else None
        if problem is not None:
            # Another controller holds it now (started on it while it was gone): no new
            # run starts here, and status says so (the open runs go on, their files there).
            self.error = f"state dir {self.path}: {problem}"
        count = 1 + (self.recreated or {}).get("count", 0)
        self.recreated = {"count": count, "at": time.time()}
        log.warning("state dir %s was deleted (or replaced) under the controller; recreated "
                    "it (0700), with the journals of the open runs written back from their "
                    "open files and every run checkpointed again", self.path)
        return True


def _reopen_logs(state_dir: str) -> None:
    """Log files under the state dir go to a new file (born 0600, never a symlink)."""
    root = os.path.abspath(state_dir) + os.sep
    for handler in logging.getLogger("lrctl").handlers:
        if isinstance(handler, logging.FileHandler) and handler.baseFilename.startswith(root):
            try:
                os.close(paths.open_private(handler.baseFilename, os.O_WRONLY | os.O_APPEND))
            except OSError as exc:
                log.error("cannot reopen the log %s: %s", handler.baseFilename, exc)
                continue
            handler.acquire()
            try:
                old, handler.stream = handler.stream, handler._open()
                if old is not None:
                    old.close()
            finally:
                handler.release()
