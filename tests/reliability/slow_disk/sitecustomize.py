"""Fault injection for a controller process: a disk that turns slow.

On ``PYTHONPATH``, Python imports this at start-up. Once the file named by
``$LRCTL_TEST_SLOW_DISK`` exists, every ``os.fsync`` takes ``$LRCTL_TEST_SLOW_FSYNC_S``
(default 10 ms) longer, as on a busy disk or network storage; ``inf``: every fsync
hangs for as long as the file exists (a stuck disk). Without the variable it does
nothing.
"""

from __future__ import annotations

import math
import os
import time

_FLAG = os.environ.get("LRCTL_TEST_SLOW_DISK")

if _FLAG:
    _DELAY = float(os.environ.get("LRCTL_TEST_SLOW_FSYNC_S", "0.01"))
    _real_fsync = os.fsync

    def _slow_fsync(fd: int) -> None:
        if os.path.exists(_FLAG):  # type: ignore[arg-type]
            if math.isinf(_DELAY):
                while os.path.exists(_FLAG):  # type: ignore[arg-type]
                    time.sleep(0.005)
            else:
                time.sleep(_DELAY)
        _real_fsync(fd)

    os.fsync = _slow_fsync
