"""The journal's group commit: what a wake-up appended to the durable streams
(decisions, events) is fsynced once per file, however many lines it took, several
files at once on threads, and only then handed to MLflow's shipper; a file whose
fsync fails keeps its lines for the shipper to read from the journal later.

A mixin of :class:`~lrctl.sinks.audit.AuditSink`, whose attributes these methods use.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from .._parallel import in_parallel
from ._open_run import OpenRun
from .journal import StreamWriter, fsync_path

if TYPE_CHECKING:
    from ._held import HeldLines
    from ._syncer import Syncer
    from .base import Shipper
    from .journal import JournalLine

__all__ = ["GroupCommit"]


class GroupCommit:
    """Durable, then shipped (see the module docstring)."""

    if TYPE_CHECKING:  # what it uses of the AuditSink (for type checkers only)
        shipper: Shipper | None
        _runs: dict[str, OpenRun]
        _closing: dict[str, OpenRun]
        _restore_due: bool
        _held: HeldLines
        _syncer: Syncer
        _uncommitted: list[tuple[str, str, JournalLine, StreamWriter]]
        _unsynced_paths: dict[Path, None]

        def _reap(self) -> None: ...
        def _written(self, run_key: str, stream: str, line: JournalLine,
                     writer: StreamWriter) -> None: ...

    def commit(self) -> None:
        """Group commit: fsync every journal file appended to since the last commit, once,
        then hand its new lines to MLflow. A file whose fsync fails keeps its lines
        unshipped (the shipper reads them from the journal later) and the first such
        error is raised once the other files are committed."""
        if self._held:
            self._retry_held()
        for run_key in {item[0] for item in self._uncommitted}:
            if self._syncer.busy(run_key):  # its files first (a run's first decision)
                self._syncer.wait(run_key)
        self._reap()
        pending, self._uncommitted = self._uncommitted, []
        failed: dict[StreamWriter, OSError] = {}
        writers = [w for w in dict.fromkeys(w for *_, w in pending) if w.unsynced]
        paths, self._unsynced_paths = list(self._unsynced_paths), {}
        calls: list[Callable[[], None]] = [w.sync for w in writers]
        calls += [functools.partial(fsync_path, p) for p in paths]
        # One fsync in the loop's thread; several (runs starting, decisions of several
        # runs in one wake-up) overlap on threads: they cost about one.
        results = ([_call(calls[0])] if len(calls) == 1 else in_parallel(calls))
        path_error: OSError | None = None
        for i, result in enumerate(results):
            if result is None:
                continue
            exc = result if isinstance(result, OSError) else OSError(str(result))
            if i < len(writers):
                failed[writers[i]] = exc
            elif not isinstance(result, FileNotFoundError):  # a run dir removed: nothing to do
                self._unsynced_paths[paths[i - len(writers)]] = None  # again next commit
                path_error = path_error or exc
        if self.shipper is not None:
            for run_key, stream, line, writer in pending:
                if writer not in failed:
                    self.shipper.submit(run_key, stream, line)
            self.shipper.pass_on()
        if failed:
            raise next(iter(failed.values()))
        if path_error is not None:
            raise path_error

    def _retry_held(self) -> None:
        for run in [*self._runs.values(), *self._closing.values()]:
            for stream, writer in run.writers.items():
                for line in self._held.retry(writer):
                    self._written(run.paths.run_key, stream, line, writer)
        for key, run in list(self._closing.items()):
            if (not self._restore_due and not any(self._held.holds(w)
                                                   for w in run.writers.values())
                    and self._closing.pop(key, None) is not None):  # (a nested commit's?)
                self._close_writers(run)

    def _close_writers(self, run: OpenRun) -> None:
        if any(w in run.writers.values() for *_, w in self._uncommitted):
            self.commit()  # its lines are shipped as from any other commit
        for w in run.writers.values():
            w.close()


def _call(call: Callable[[], None]) -> Exception | None:
    try:
        call()
    except Exception as exc:
        return exc
    return None
