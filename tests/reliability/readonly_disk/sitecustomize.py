"""Fault injection for a controller process: a state dir remounted read-only.

On ``PYTHONPATH``, Python imports this at start-up. While the file named by
``$LRCTL_TEST_READONLY`` exists, removing a checkpoint (``*.ckpt`` under
``$LRCTL_TEST_READONLY_UNDER``, the state dir) fails with ``EROFS``, as it does on a
file system remounted read-only (``mount -o remount,ro``; a read-only bind mount over
the state dir while the journals stay open for writing). Mounts are not available to
the tests; this is the same system-call result. Without the variables it does nothing.
"""

from __future__ import annotations

import errno
import os
import pathlib

_FLAG = os.environ.get("LRCTL_TEST_READONLY")
_UNDER = os.environ.get("LRCTL_TEST_READONLY_UNDER")

if _FLAG and _UNDER:
    _real_unlink = pathlib.Path.unlink

    def _unlink(self, missing_ok=False):
        if (os.path.exists(_FLAG) and self.name.endswith(".ckpt")
                and os.path.abspath(self).startswith(_UNDER)):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(self))
        return _real_unlink(self, missing_ok=missing_ok)

    pathlib.Path.unlink = _unlink  # type: ignore[method-assign]
