"""The controller's tunable limits, in one place: pass your own to :class:`Server` (tests do)."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

__all__ = ["DEFAULT_SESSION_TIMEOUT", "Limits"]

DEFAULT_SESSION_TIMEOUT = 600.0  # seconds a hook-less run stays in memory


@dataclass(frozen=True)
class Limits:
    """How much the controller holds, and how often it does its periodic work."""

    save_every: int = 256  # observations between a run's hot-path checkpoints
    save_interval: float = 1.0  # seconds unsaved observations wait for a checkpoint at most
    max_connections: int = 1024
    max_remote_connections: int = 256  # TCP peers may not take the slots local hooks need
    auth_timeout_s: float = 10.0  # a TCP peer must show the token within this
    max_outbuf: int = 8 << 20  # bytes of replies a peer may leave unread before it is closed
    max_drain: int = 16 << 20  # bytes read from a hook that hung up, to apply what it sent
    housekeeping_interval: float = 1.0  # seconds between evictions and socket checks

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
                raise ValueError(f"Limits.{f.name} must be a positive number, but got "
                                 f"{f.name}={value!r}.")
