"""fsyncs that no reply waits for, off the controller's loop: a run's start and its end.

A new run's journal directory, meta and policy files and its opening events, and an
ended run's last lines, must reach the disk, but no hook waits for them: a run's
welcome carries no decision, and a ``bye`` has no answer. Done on the loop, their
fsyncs (a directory's costs a filesystem journal commit: milliseconds, tens under
load) held every other run's answer. So the owner thread opens the descriptors
(cheap, and where running out of them is handled) and hands them to one
:class:`Syncer` thread, which fsyncs and closes them (it never opens one) and then
reports the job done; the owner ships the job's lines to MLflow once it is
(:meth:`Syncer.finished`). A group commit that acknowledges a line of a run with a
job still in flight waits for that job first (:meth:`Syncer.wait`), so a decision is
still answered only once its run's files are durable.
"""

from __future__ import annotations

import contextlib
import math
import os
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from .._parallel import in_parallel
from .journal import JournalLine

__all__ = ["SyncJob", "Syncer"]


@dataclass(eq=False)
class SyncJob:
    """Descriptors to fsync then close (the job owns them), and the journal lines that
    are durable once it is done: ``(run key, stream, line)``."""

    run_key: str
    fds: list[int]
    lines: list[tuple[str, str, JournalLine]] = field(default_factory=list)
    errors: list[OSError] = field(default_factory=list)
    done: threading.Event = field(default_factory=threading.Event)


class Syncer:
    """One thread that fsyncs and closes the descriptors of each submitted job, in order.

    ``fsync_fd`` is what fsyncs a descriptor (``os.fsync``; tests gate it).
    """

    def __init__(self, fsync_fd: Callable[[int], None] = os.fsync) -> None:
        self._fsync_fd = fsync_fd
        self._jobs: queue.SimpleQueue[SyncJob | None] = queue.SimpleQueue()
        self._pending: dict[str, list[SyncJob]] = {}  # owner thread: run key -> its jobs
        self._order: list[SyncJob] = []  # owner thread: submitted, not yet finished
        self._thread: threading.Thread | None = None

    def submit(self, job: SyncJob) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="lrctl-syncer",
                                            daemon=True)
            self._thread.start()
        self._pending.setdefault(job.run_key, []).append(job)
        self._order.append(job)
        self._jobs.put(job)

    def busy(self, run_key: str) -> bool:
        """Whether ``run_key`` has a job in flight (owner thread)."""
        return run_key in self._pending

    def wait(self, run_key: str | None = None, deadline: float = math.inf) -> None:
        """Block until ``run_key``'s jobs (all jobs: None) are done, or ``deadline``
        (``time.monotonic()``); then collect them with :meth:`finished`."""
        jobs = self._order if run_key is None else self._pending.get(run_key, [])
        for job in list(jobs):
            left = deadline - time.monotonic()
            if left <= 0 or not job.done.wait(None if left == math.inf else left):
                return

    def stop(self) -> None:
        """Let the thread end once the jobs submitted are done (without waiting for it:
        a shutdown past its deadline leaves the rest to the OS)."""
        if self._thread is not None:
            self._jobs.put(None)
            self._thread = None

    def finished(self) -> list[SyncJob]:
        """The jobs done, in the order submitted, up to the first one still in flight
        (owner thread); their lines are durable unless the job has ``errors``."""
        out = []
        while self._order and self._order[0].done.is_set():
            job = self._order.pop(0)
            jobs = self._pending[job.run_key]
            jobs.remove(job)
            if not jobs:
                del self._pending[job.run_key]
            out.append(job)
        return out

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            try:
                calls = [lambda fd=fd: self._sync_close(fd) for fd in job.fds]
                # A run's files and directories together: their fsyncs overlap.
                results = [calls[0]()] if len(calls) == 1 else in_parallel(calls)
                job.errors = [r for r in results if isinstance(r, OSError)]
            except Exception as exc:  # reported with the job; the thread goes on
                job.errors = [OSError(str(exc))]
            finally:
                job.done.set()

    def _sync_close(self, fd: int) -> OSError | None:
        try:
            self._fsync_fd(fd)
        except OSError as exc:
            return exc
        finally:
            with contextlib.suppress(OSError):
                os.close(fd)
        return None
