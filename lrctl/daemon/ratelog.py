"""Log lines that an attacker (or a fault) can repeat, at most once per interval each."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

__all__ = ["RateLog"]


class RateLog:
    """``log(level, key, msg, *args)``: the first line of each ``key`` goes out; the same key
    again within ``every_s`` is counted, and the next line that goes out says how many were
    held back. Keys are a small fixed set chosen by the caller (never peer data)."""

    def __init__(self, logger: logging.Logger, every_s: float = 10.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.logger = logger
        self.every_s = every_s
        self._clock = clock
        self._quiet_until: dict[str, float] = {}
        self._held: dict[str, int] = {}

    def log(self, level: int, key: str, msg: str, *args: object,
            exc_info: BaseException | None = None) -> None:
        now = self._clock()
        if now < self._quiet_until.get(key, -1.0):
            self._held[key] = self._held.get(key, 0) + 1
            return
        self._quiet_until[key] = now + self.every_s
        held = self._held.pop(key, 0)
        if held:
            msg += " (and %d more like it in the last %g s)"
            args = (*args, held, self.every_s)
        self.logger.log(level, msg, *args, exc_info=exc_info)
