"""What a controller removes of its state directory: asked by ``lrctl prune``, the
journals of runs that ended long ago (:func:`move_aside`); on its own, looked for
hourly (``Limits.prune_interval_s``):

* The checkpoints of runs set aside after their hook vanished, once untouched for
  ``Limits.detached_keep_s`` (30 days): always.
* With ``lrctl serve --keep-ended-days N`` (off by default: an audit trail is never
  thrown away unasked), the journals of runs that ended over N days ago, by
  :mod:`~lrctl.daemon.retention`'s rule, as ``lrctl prune --older-than N`` would. The
  runs are looked at on the loop, a slice of :data:`SWEEP_SLICE` a housekeeping tick
  (so that no hook waits long for its answer, however many runs the state directory
  remembers), each moved aside there, where none of them opens meanwhile; the moved
  directories are deleted on a thread of their own once the sweep is done (a daemon
  thread: one cut short by the controller's exit leaves hidden directories that the
  next sweep, or ``lrctl prune``, finishes).
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from typing import TYPE_CHECKING

from .retention import Kept, Prunable, move_runs, moved_dirs, open_runs, remove_moved, run_dirs

if TYPE_CHECKING:
    from .server import Server

__all__ = ["SWEEP_SLICE", "Upkeep", "move_aside"]

log = logging.getLogger("lrctl.daemon")

#: Runs whose journals a housekeeping tick looks at during a sweep.
SWEEP_SLICE = 32


class Upkeep:
    """The hourly removals of ``server``'s state directory; ``keep_ended_s``: how long
    the journals of ended runs are kept (None: for ever)."""

    def __init__(self, server: Server, keep_ended_s: float | None = None) -> None:
        self.server = server
        self.keep_ended_s = keep_ended_s
        self._due = 0.0  # (the first housekeeping tick looks)
        self._sweep: list[str] = []  # run keys still to look at, in this sweep
        self._remover: threading.Thread | None = None

    def tick(self, now: float) -> None:
        """From the loop's housekeeping (``now``: ``time.monotonic()``)."""
        if now >= self._due:
            self._due = now + self.server.limits.prune_interval_s
            self._prune_detached()
            if self.keep_ended_s is not None and not self._sweep:
                self._start_sweep()
        if self._sweep:
            self._sweep_slice()

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

    def _start_sweep(self) -> None:
        server = self.server
        if not server.state_dir or not server.store.writable:
            return  # (no state dir; or another controller's now: nothing of ours to do)
        try:
            runs_fd = open_runs(server.state_dir)
        except FileNotFoundError:
            return
        except OSError as exc:  # a symlink at runs, say: never followed
            log.error("--keep-ended-days: cannot look at %s/runs: %s", server.state_dir, exc)
            return
        try:
            self._sweep = run_dirs(runs_fd)
        finally:
            os.close(runs_fd)

    def _sweep_slice(self) -> None:
        server = self.server
        keys, self._sweep = self._sweep[:SWEEP_SLICE], self._sweep[SWEEP_SLICE:]
        if self.keep_ended_s is None or not server.store.writable:
            self._sweep = []  # (another controller's now: nothing of ours to do)
            return
        try:
            move_aside(server, keys, time.time() - self.keep_ended_s)
        except OSError as exc:
            log.error("--keep-ended-days: %s; the next sweep tries again", exc)
            self._sweep = []
            return
        except Exception:  # (on the loop: one run's odd files must not end the controller)
            log.exception("--keep-ended-days: the sweep failed; the next one tries again")
            self._sweep = []
            return
        if not self._sweep and (self._remover is None or not self._remover.is_alive()):
            self._remover = threading.Thread(target=_remove, name="lrctl-prune", daemon=True,
                                             args=(server.state_dir, self.keep_ended_s))
            self._remover.start()


def move_aside(server: Server, keys: list[str],
               cutoff: float) -> tuple[list[Prunable], dict[str, Kept]]:
    """:func:`~lrctl.daemon.retention.move_runs` in ``server``'s state directory, on its
    loop: never a run it holds (in memory, or a hello for it being answered), nor one its
    sink has open, is ending or is preparing (and none is prepared meanwhile)."""
    return move_runs(server.state_dir, keys, cutoff, sink=server.sink,
                     held=lambda key: key in server.sessions or key in server.handshakes.pending)


def _remove(state_dir: str, keep_ended_s: float) -> None:
    """(Its own thread) Delete what the sweep moved aside (and what an interrupted prune
    left), after making the renames durable."""
    try:
        runs_fd = open_runs(state_dir)
    except OSError:
        return  # (gone: nothing to delete there)
    removed = size = 0
    try:
        names = moved_dirs(runs_fd)
        if names:
            os.fsync(runs_fd)
        for name in names:
            try:
                size += remove_moved(runs_fd, name)
                removed += 1
            except OSError as exc:
                log.error("--keep-ended-days: cannot remove %s/runs/%s: %s (tried again at "
                          "the next sweep)", state_dir, name, exc)
    finally:
        with contextlib.suppress(OSError):
            os.close(runs_fd)
    if removed:
        log.info("removed the journals of %d run(s) that ended over %g days ago, all in "
                 "MLflow (%d bytes; --keep-ended-days)", removed, keep_ended_s / 86400, size)
