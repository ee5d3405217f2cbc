"""The controller's log file: private, never through a symlink, and bounded.

A controller left running for weeks writes a few hundred bytes a run (its start, its
end, each decision's one line), more in an incident. The file is rotated at
:data:`MAX_BYTES`, keeping :data:`BACKUPS` older ones (``controller.log.1`` the newest
of them), so the log takes at most ``(BACKUPS + 1) × MAX_BYTES`` of the state dir's disk.
Every file it opens (the first, each one after a rotation, the one a state dir made
again gets) is born 0600 and refused through a symlink, as every file lrctl writes.
"""

from __future__ import annotations

import logging.handlers
import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from io import TextIOWrapper

from .. import paths

__all__ = ["BACKUPS", "MAX_BYTES", "PrivateLogHandler"]

MAX_BYTES = 16 << 20  # rotate past this size ...
BACKUPS = 3  # ... keeping this many older files


class PrivateLogHandler(logging.handlers.RotatingFileHandler):
    """A :class:`~logging.handlers.RotatingFileHandler` whose files are private."""

    def __init__(self, path: str, max_bytes: int = MAX_BYTES, backups: int = BACKUPS) -> None:
        super().__init__(path, maxBytes=max_bytes, backupCount=backups, encoding="utf-8")

    def _open(self) -> TextIOWrapper:
        fd = paths.open_private(self.baseFilename, os.O_WRONLY | os.O_APPEND)
        return os.fdopen(fd, "a", encoding=self.encoding, errors=self.errors)
