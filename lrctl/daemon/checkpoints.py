"""When each run is checkpointed, and on which thread.

A session is checkpointed when it starts, after ``Limits.save_every``
observations or :meth:`Checkpoints.interval` seconds with unsaved ones
(``Limits.save_interval``, stretched so that all runs together take at most
``Limits.timed_saves_per_s`` timed checkpoints a second), on operator
commands, when its hook disconnects, and at shutdown. Every reply tells the hook
the last checkpointed step (``saved_step``), so the hook keeps just the
observations after it and can replay them after a crash.

The checkpoints the hot path asks for (:meth:`Checkpoints.observed`,
:meth:`Checkpoints.save_due`) are encoded on the loop and written, with their fsyncs,
by a :class:`~lrctl.daemon.checkpoint_writer.CheckpointWriter` thread; a new run's first one
(:meth:`Checkpoints.start`) is written to a temporary file on the loop and made
durable (fsyncs, rename) by that thread, and an ended run's checkpoint is removed by
it (:meth:`Checkpoints.delete`), after the run's writes in flight: the loop opens the
descriptors of these two, so that a run's start or end cannot take the descriptor the
loop was counting on (its spare one, when they run out). ``saved_step`` advances when
the loop learns that the file is durable (:meth:`Checkpoints.finished`). The rarer
saves (:meth:`Checkpoints.save`: an operator command, a reload, a disconnect,
eviction, shutdown) are written at once, after any write of the same run still in
flight. A checkpoint that cannot be written is logged and kept in
:attr:`Checkpoints.errors` (shown by ``runs``/``status``); the run goes on from memory.
"""

from __future__ import annotations

import logging
import math
import queue
import time
from collections.abc import Callable, Container, Mapping

from ..sinks.journal import JournalError, RunPaths, last_line
from .checkpoint_writer import CheckpointWriter
from .limits import Limits
from .session import Session
from .store import StateStore

__all__ = ["Checkpoints"]

log = logging.getLogger("lrctl.daemon")

_REMOVAL = object()  # the token of a removal job
_OVERSIZE_RETRY_S = 60.0  # a state too large to checkpoint is encoded again this much later


class Checkpoints:
    """The checkpoint schedule of the runs in ``sessions`` (the server's registry).

    ``notify`` wakes the loop when the writer thread finishes a write; the loop then
    calls :meth:`finished`.
    """

    def __init__(self, store: StateStore, sessions: Mapping[str, Session], limits: Limits,
                 notify: Callable[[], None]) -> None:
        self.store = store
        self.sessions = sessions
        self.limits = limits
        self.errors: dict[str, str] = {}  # run key -> why its last checkpoint failed
        # No session can be due for a time-based checkpoint before this (see save_due).
        self.next_due = 0.0
        self._last_save: dict[str, float] = {}
        self._saving: dict[str, int] = {}  # run key -> unsaved count its write in flight holds
        # Run key -> its removals in flight: a checkpoint found on disk meanwhile is an
        # ended run's, never to be restored (see Handshakes.hello).
        self.removing: dict[str, int] = {}
        # Run key -> why its ended run's checkpoint could not be removed (a file system
        # remounted read-only, say): removed again from housekeeping until it goes, and
        # never restored meanwhile. Left on disk, the next controller's start restored the
        # ended run from it (a `resume` after its `end`, its MLflow run RUNNING again).
        self.unremoved: dict[str, str] = {}
        self._writer = CheckpointWriter(store, notify)
        self._unsaved_runs = 0  # runs with observations to checkpoint, as of save_due

    def track(self, key: str) -> None:
        """``key`` joined the registry with its state on disk (restored)."""
        self._last_save[key] = time.monotonic()

    def forget(self, key: str) -> None:
        """``key`` left the registry (ended or evicted)."""
        self._last_save.pop(key, None)
        self.errors.pop(key, None)
        self._saving.pop(key, None)  # a new run of that key may checkpoint at once

    def current(self, key: str) -> bool:
        """Whether ``key``'s checkpoint on disk holds all it observed (none in flight)."""
        session = self.sessions[key]
        return (key not in self._saving and key not in self.errors and not session.unsaved
                and session.saved_step == session.last_step)

    def retry_waits(self, key: str, now: float) -> bool:
        """Whether ``key``'s checkpoint failed and its retry is not due yet (a state too
        large waits a minute: each try is an encode on the loop)."""
        return key in self.errors and now < self._last_save.get(key, 0.0)

    def save(self, key: str) -> None:
        """Checkpoint ``key`` now, after its write in flight if any."""
        self._settle(key)
        session = self.sessions[key]
        try:
            self.store.save(key, session.to_state())
        except (OSError, ValueError) as exc:
            self._failed(key, exc)
            return
        if self.errors.pop(key, None) is not None:
            log.info("run %s checkpointed again", key)
        session.saved_step = session.last_step
        session.unsaved = 0
        self._last_save[key] = time.monotonic()

    def changed(self, key: str) -> None:
        """``key``'s state changed off the hot path (a reload): checkpointed off the loop,
        now or, with a write in flight, by the timed checkpoint after it (as an
        observation's change is; the decision is in the journal already)."""
        session = self.sessions[key]
        session.unsaved += 1
        if key in self._saving:
            self.next_due = min(self.next_due, self._last_save.get(key, 0.0) + self.interval())
        else:
            self._save_soon(key)

    def start(self, key: str) -> None:
        """A new run's first checkpoint, made durable off the loop (see the module
        docstring)."""
        self._save_soon(key, prepare=True)

    def delete(self, key: str) -> None:
        """Remove ``key``'s checkpoint (the run ended) on the writer thread, after its
        writes in flight."""
        if not self.store.writable:  # (another controller's directory: nothing of ours)
            return
        try:
            dir_fd = self.store.open_dir()
        except OSError:  # out of descriptors, say: here and now, after the writes in flight
            self._writer.wait()
            self.finished()
            self.removing[key] = self.removing.get(key, 0) + 1
            error: Exception | None = None
            try:
                self.store.delete(key)
            except OSError as exc:
                error = exc
            self._removed(key, error)
            return
        self.removing[key] = self.removing.get(key, 0) + 1
        self._writer.submit_remove(key, dir_fd, _REMOVAL)

    def interval(self) -> float:
        """Seconds a run's unsaved observations wait for their timed checkpoint at most:
        ``Limits.save_interval``, or longer with many runs observing (those held without
        a hook do not count), so that they take at most ``Limits.timed_saves_per_s``
        checkpoints a second between them."""
        limits = self.limits
        return max(limits.save_interval, self._unsaved_runs / limits.timed_saves_per_s)

    def observed(self, key: str, session: Session, now: float) -> None:
        """After each observation of ``session`` (the hot path)."""
        if session.unsaved >= self.limits.save_every and (
                key not in self.errors  # a failing disk: retry at save_interval
                or now - self._last_save.get(key, 0.0) >= self.limits.save_interval):
            self._save_soon(key)
        elif session.unsaved == 1:  # it has something to checkpoint again
            self.next_due = min(self.next_due,
                                self._last_save.get(key, 0.0) + self.interval())

    def save_due(self, now: float) -> None:
        """Checkpoint the sessions with observations unsaved for :meth:`interval` seconds.

        The loop calls this only from :attr:`next_due` on: the earliest time any session
        could be due, kept here and lowered by :meth:`observed` when a session gets its
        first unsaved observation (the only way one becomes due). At most
        ``Limits.max_saves_per_wake`` per call: the others are due at the next wake-up.
        """
        interval = self.interval()
        budget = self.limits.max_saves_per_wake
        next_at = math.inf
        unsaved_runs = 0
        for key, session in self.sessions.items():
            unsaved_runs += bool(session.unsaved) or key in self._saving
            if session.unsaved and key not in self._saving:  # in flight: see finished()
                if now - self._last_save.get(key, 0.0) >= interval:
                    if budget <= 0:  # the next wake-up goes on from here
                        next_at = now
                        continue
                    budget -= 1
                    self._save_soon(key)
                if session.unsaved and key not in self._saving:  # failed: try again later
                    next_at = min(next_at, self._last_save.get(key, 0.0) + interval)
        self._unsaved_runs = unsaved_runs
        self.next_due = next_at

    def finished(self) -> None:
        """Apply the writer's finished checkpoints (on the loop's thread)."""
        while True:
            try:
                key, token, error = self._writer.done.get_nowait()
            except queue.Empty:
                return
            if token is _REMOVAL:
                self._removed(key, error)
                continue
            session, step = token
            held = self._saving.pop(key, 0)
            if key not in self.sessions or self.sessions[key] is not session:
                continue  # the run ended (or was replaced) meanwhile
            if error is not None:
                self._failed(key, error)
                session.unsaved += held  # still to be checkpointed
            else:
                if self.errors.pop(key, None) is not None:
                    log.info("run %s checkpointed again", key)
                session.saved_step = max(session.saved_step, step)
            if session.unsaved:
                self.next_due = min(self.next_due, self._last_save.get(key, 0.0)
                                    + self.interval())

    def stop(self) -> None:
        """Let the writer finish the write it is on, and apply it; the writes it had not
        started are left to :meth:`save_all`."""
        removals: list[str] = []
        for key, token in self._writer.cancel():
            if token is _REMOVAL:
                removals.append(key)
                continue
            session: Session = token[0]
            held = self._saving.pop(key, 0)
            if self.sessions.get(key) is session:
                session.unsaved += held  # still to be checkpointed
        self._writer.stop()
        self.finished()
        for key in removals + [k for k in self.unremoved if k not in removals
                               and k not in self.sessions]:
            # An ended run must not come back at the next start (one failed before: a last try).
            error: Exception | None = None
            try:
                if key not in self.sessions:
                    self.store.delete(key)
            except OSError as exc:
                error = exc
            self._removed(key, error)

    def ended(self, key: str) -> bool:
        """Whether ``key``'s checkpoint on disk, if any, is an ended run's (being removed,
        or its removal failed and waits to be tried again): never to be restored."""
        return key in self.removing or key in self.unremoved

    def retry_removals(self) -> None:
        """From housekeeping: remove again the checkpoints of ended runs whose removal
        failed. A run of that key served meanwhile owns the file now: it stays."""
        for key in list(self.unremoved):
            if key in self.sessions:
                del self.unremoved[key]
            elif key not in self.removing:
                self.delete(key)

    def _removed(self, key: str, error: Exception | None) -> None:
        left = self.removing.pop(key, 1) - 1
        if left:
            self.removing[key] = left
        if error is not None:
            if key not in self.unremoved:  # once, not at every retry
                log.error("cannot remove the checkpoint of ended run %s: %s; tried again "
                          "every second until it goes (the run is not restored from it)",
                          key, error)
            if key not in self.sessions:
                self.unremoved[key] = str(error)
        elif self.unremoved.pop(key, None) is not None:
            log.info("the checkpoint of ended run %s is removed now", key)

    def save_all(self, hooked: Container[str], deadline: float) -> int:
        """Shutdown (after :meth:`stop`): checkpoint the runs with something unsaved, their
        fsyncs overlapping. First, all those whose hook is gone (this is their only copy);
        then, until ``deadline``, those in ``hooked``, whose hooks keep every observation
        after ``saved_step`` and replay them when they reconnect. Returns how many were
        written."""
        gone: dict[str, bytes] = {}
        kept: dict[str, bytes] = {}
        for key, session in self.sessions.items():
            if session.unsaved or key in self.errors:
                try:
                    data = self.store.encode(session.to_state())
                except ValueError as exc:
                    self._failed(key, exc)
                    continue
                (kept if key in hooked else gone)[key] = data
        written = 0
        for items, until in ((gone, math.inf), (kept, deadline)):
            done, errors = self.store.write_many(items, until)
            for key, error in errors.items():
                self._failed(key, error)
            for key in done:
                session = self.sessions[key]
                session.saved_step = session.last_step
                session.unsaved = 0
                self.errors.pop(key, None)
            written += len(done)
        return written

    def _settle(self, key: str) -> None:
        # After the write in flight, never before it; and after a removal queued (a run
        # ended, then resumed from its hook's state), which would take the new file away.
        if key in self._saving or key in self.removing:
            self._writer.wait()
            self.finished()

    def _save_soon(self, key: str, prepare: bool = False) -> None:
        """Checkpoint ``key`` on the writer thread: the loop encodes the state (``prepare``:
        and writes it to a temporary file), the thread writes (or just fsyncs) it and
        renames it into place, and :meth:`finished` advances ``saved_step`` only once the
        file is durable. One write per run at a time."""
        if key in self._saving:
            return  # its observations since then wait for the next checkpoint
        session = self.sessions[key]
        token = (session, session.last_step)
        try:
            data = self.store.encode(session.to_state())
            if prepare:  # the descriptors taken here, where running out of them is handled
                self._writer.submit(key, self.store.prepare(key, data), token)
            else:
                self._writer.submit_write(key, data, token)
        except (OSError, ValueError) as exc:
            self._failed(key, exc)
            return
        self._saving[key] = session.unsaved
        session.unsaved = 0
        self._last_save[key] = time.monotonic()

    def _failed(self, key: str, exc: Exception) -> None:
        if key not in self.errors:  # once per outage, not once per step
            log.error("cannot checkpoint run %s: %s; the run goes on from memory, "
                      "a controller restart would lose it", key, exc)
        self.errors[key] = str(exc)
        # Retry at save_interval, not per step; a state too large (ValueError: encoding it
        # is the cost, tens of milliseconds on the loop) a minute later.
        self._last_save[key] = time.monotonic() + (_OVERSIZE_RETRY_S
                                                   if isinstance(exc, ValueError) else 0.0)


def ended_after_checkpoint(state_dir: str, key: str, checkpoint_step: int) -> bool:
    """Whether ``key``'s journal says its hook ended the run (a goodbye) at or after
    ``checkpoint_step``, the step its checkpoint holds: the checkpoint is then one whose
    removal failed (a file system read-only at the run's end), and the run is not
    restored from it (the caller removes it again)."""
    try:
        end = last_line(RunPaths.of(state_dir, key).stream("events"))
    except (OSError, ValueError, JournalError):
        return False
    if end is None or end.record.get("event") != "end" or "outcome" in end.record:
        return False  # (an eviction's end: its run resumes from the checkpoint)
    last = end.record.get("last_step")
    if not isinstance(last, int) or checkpoint_step > last:
        return False
    log.warning("run %s ended at step %d after its checkpoint (step %d) was written: "
                "not restored; its checkpoint is removed", key, last, checkpoint_step)
    return True
