"""A run's start and end made durable off the owner thread: the audit sink's side of
:mod:`~lrctl.sinks._syncer`.

A mixin of :class:`~lrctl.sinks.audit.AuditSink`, whose attributes these are. The
owner thread opens (or duplicates) every descriptor a job needs, takes the run's
uncommitted lines out of the group commit into the job, and ships them once the job
is done (:meth:`RunSync._reap`, from every commit and tick); see the syncer's
docstring for why and what still waits.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from ._syncer import Syncer, SyncJob
from .base import Shipper
from .journal import JournalLine, StreamWriter

if TYPE_CHECKING:
    from ._open_run import OpenRun

__all__ = ["RunSync"]

log = logging.getLogger("lrctl.sinks")


class RunSync:
    """Hands a run's fsyncs to the syncer (see the module docstring)."""

    _syncer: Syncer
    _uncommitted: list[tuple[str, str, JournalLine, StreamWriter]]
    _unsynced_paths: dict[Path, None]
    shipper: Shipper | None
    commit: Callable[[], None]  # the host's group commit (AuditSink.commit)

    def _start_sync(self, run: OpenRun, fds: list[int]) -> None:
        """A run just opened: its files, directories and first lines made durable by the
        syncer (``fds``: its new files and directories, opened by the preparation; those
        it could not open wait for the next group commit, on this thread, as before)."""
        self._hand_over(run, SyncJob(run.paths.run_key, list(fds)), close=False)

    def _hand_over(self, run: OpenRun, job: SyncJob, *, close: bool) -> None:
        """Give ``job`` the run's unsynced streams (a duplicate descriptor each) and their
        uncommitted lines, and submit it; ``close``: the run ended, its writers close
        here without an fsync of their own. A stream whose descriptor cannot be
        duplicated stays with the group commit (or, closing, is fsynced here)."""
        mine = set(run.writers.values())
        for writer in mine:
            if not writer.unsynced:
                continue
            try:
                job.fds.append(writer.dup_fd())
            except OSError:
                continue
            writer.unsynced = 0  # the job's now
            keep = []
            for item in self._uncommitted:
                if item[3] is writer:
                    job.lines.append(item[:3])
                else:
                    keep.append(item)
            self._uncommitted = keep
        if close:
            if any(w in mine for *_, w in self._uncommitted):
                self.commit()  # what could not be handed over
            for w in mine:
                w.close(sync=w.unsynced > 0)
        if job.fds:
            self._syncer.submit(job)
        else:
            self._ship(job.lines)

    def _reap(self) -> None:
        """Ship the lines of the syncer's finished jobs (on this thread)."""
        for job in self._syncer.finished():
            if job.errors:
                log.error("run %s: cannot fsync its journal: %s; its last lines stay "
                          "unshipped until the next start", job.run_key, job.errors[0])
                continue
            self._ship(job.lines)
        if self.shipper is not None:
            self.shipper.pass_on()

    def _ship(self, lines: list[tuple[str, str, JournalLine]]) -> None:
        if self.shipper is not None:
            for run_key, stream, line in lines:
                self.shipper.submit(run_key, stream, line)
