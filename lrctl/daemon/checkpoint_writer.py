"""The checkpoint writer: a thread of its own that finishes checkpoint writes in order."""

from __future__ import annotations

import contextlib
import functools
import os
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .store import PreparedWrite, StateStore

__all__ = ["CheckpointWriter"]


class CheckpointWriter:
    """Finishes checkpoint writes on a thread of its own, in the order submitted, so that
    their fsyncs (milliseconds each on a busy disk, two per checkpoint) never stall the
    loop.

    The loop encodes the state (:meth:`StateStore.encode`). For a run's start and end it
    also opens what the job needs (:meth:`StateStore.prepare`, :meth:`StateStore.open_dir`),
    and the job only fsyncs, renames, unlinks and closes; a hot-path checkpoint is
    written whole here (two short-lived descriptors). Each finished job goes on :attr:`done`
    as ``(key, token, error)``, then ``notify`` (the loop's wake-up) is called: only the
    loop touches sessions.
    """

    def __init__(self, store: StateStore, notify: Callable[[], None]) -> None:
        self.store = store
        self.notify = notify
        self.done: queue.SimpleQueue[tuple[str, Any, Exception | None]] = queue.SimpleQueue()
        self._jobs: queue.SimpleQueue[_Job | threading.Event | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    def submit_write(self, key: str, data: bytes, token: Any) -> None:
        """Write ``key``'s checkpoint whole (:meth:`StateStore.write`): the hot path's,
        whose file creation (it can wait on a busy filesystem) stays off the loop too."""
        self._put(_Job(key, functools.partial(self.store.write, key, data), token, _nothing))

    def submit(self, key: str, prep: PreparedWrite, token: Any) -> None:
        """Complete the prepared write ``prep`` of ``key``'s checkpoint."""
        self._put(_Job(key, functools.partial(self.store.complete, prep), token,
                       functools.partial(self.store.discard, prep)))

    def submit_remove(self, key: str, dir_fd: int, token: Any) -> None:
        """Remove ``key``'s checkpoint once the writes submitted before are done."""
        self._put(_Job(key, functools.partial(self.store.remove, key, dir_fd), token,
                       functools.partial(os.close, dir_fd)))

    def _put(self, job: _Job) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="lrctl-checkpoints",
                                            daemon=True)
            self._thread.start()
        self._jobs.put(job)

    def wait(self) -> None:
        """Return once every job submitted so far is finished (and on :attr:`done`)."""
        if self._thread is not None:
            finished = threading.Event()
            self._jobs.put(finished)
            finished.wait()

    def stop(self) -> None:
        """Finish what was submitted, then end the thread."""
        if self._thread is not None:
            self._jobs.put(None)
            self._thread.join()
            self._thread = None

    def cancel(self) -> list[tuple[str, Any]]:
        """Take back the jobs not started yet (a shutdown writes every checkpoint at once,
        in parallel, from the latest state; a removal is left undone, harmlessly: the
        run's checkpoint stays); returns their ``(key, token)``."""
        dropped: list[tuple[str, Any]] = []
        while True:
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                return dropped
            if isinstance(job, threading.Event):
                job.set()
            elif job is not None:
                with contextlib.suppress(OSError):
                    job.discard()
                dropped.append((job.key, job.token))

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            if isinstance(job, threading.Event):
                job.set()
                continue
            error: Exception | None = None
            try:
                job.run()
            except Exception as exc:  # reported to the loop, which logs it; the thread goes on
                error = exc
            self.done.put((job.key, job.token, error))
            with contextlib.suppress(OSError):
                self.notify()


def _nothing() -> None:
    pass


@dataclass(frozen=True)
class _Job:
    key: str
    run: Callable[[], None]
    token: Any
    discard: Callable[[], None]  # what the job owns, let go unfinished
