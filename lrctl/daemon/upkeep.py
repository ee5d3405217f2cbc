"""What a controller removes of its state directory: on its own, looked for hourly
(``Limits.prune_interval_s``), the checkpoints of runs set aside after their hook
vanished, once untouched for ``Limits.detached_keep_s`` (30 days); and, asked by
``lrctl prune``, the journals of runs that ended long ago (:func:`move_aside`).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from .retention import Kept, Prunable, move_runs

if TYPE_CHECKING:
    from .server import Server

__all__ = ["Upkeep", "move_aside"]

log = logging.getLogger("lrctl.daemon")


class Upkeep:
    """The hourly removals of ``server``'s state directory."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self._due = 0.0  # (the first housekeeping tick looks)

    def tick(self, now: float) -> None:
        """From the loop's housekeeping (``now``: ``time.monotonic()``)."""
        if now >= self._due:
            self._due = now + self.server.limits.prune_interval_s
            self._prune_detached()

    def _prune_detached(self) -> None:
        """Forget the runs evicted without their hook longer ago than ``detached_keep_s``."""
        limits = self.server.limits
        try:
            removed = self.server.store.prune_detached(limits.detached_keep_s)
        except OSError as exc:  # (the state dir gone: its check says so)
            log.error("cannot prune the checkpoints of detached runs: %s", exc)
            return
        if removed:
            log.info("removed %d checkpoint(s) of runs evicted without their hook over %.0f "
                     "days ago (their journals stay)", removed, limits.detached_keep_s / 86400)


def move_aside(server: Server, keys: list[str],
               cutoff: float) -> tuple[list[Prunable], dict[str, Kept]]:
    """:func:`~lrctl.daemon.retention.move_runs` in ``server``'s state directory, on its
    loop: never a run it holds (in memory, or a hello for it being answered), nor one its
    sink has open, is ending or is preparing (and none is prepared meanwhile)."""
    return move_runs(server.state_dir, keys, cutoff, sink=server.sink,
                     held=lambda key: key in server.sessions or key in server.handshakes.pending)
