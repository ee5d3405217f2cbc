"""One tracking URI's MLflow worker thread: its queue, its runs, its rounds (see
:mod:`.mlflow_sink`, whose :class:`~.mlflow_sink.MlflowShipper` starts one per URI).

mlflow is imported lazily, in the thread, when a run is shipped.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ._mlflow_limits import MAX_METRICS_PER_BATCH, PERMANENT_ERRORS
from ._mlflow_store import BACKOFF_MIN_S, StoreHealth, reason
from ._ship_state import FILES_DOWN, Experiments, RunState
from .journal import JournalError, JournalLine, RunPaths

if TYPE_CHECKING:
    from ._mlflow_run import RunShipper

__all__ = ["ClientFactory", "DoneCallback", "FilesCallback", "StateCallback", "Worker",
           "WorkerOptions"]

log = logging.getLogger("lrctl.sinks.mlflow")

_TICK_S = 0.1
ClientFactory = Callable[[str], Any]
#: ``(tracking URI, why it is unavailable or None once it answers)``.
StateCallback = Callable[[str, "str | None"], None]
#: ``(run key, why its files wait or None once they are stored)`` (see _mlflow_files).
FilesCallback = Callable[[str, "str | None"], None]
#: ``(run key, events seq shipped, refused by MLflow)``: no more work for an ended run.
DoneCallback = Callable[[str, int, bool], None]


@dataclass(frozen=True)
class WorkerOptions:
    flush_interval: float
    queue_size: int
    max_pending: int
    timeline: bool
    backoff_max: float
    client_factory: ClientFactory
    snapshot_interval: float  # seconds; see _mlflow_views (decisions files)
    on_state: StateCallback | None
    on_done: DoneCallback | None
    on_files: FilesCallback | None


class Worker(threading.Thread):
    """Ships the runs of one tracking URI."""

    def __init__(self, state_dir: Path, tracking_uri: str, options: WorkerOptions) -> None:
        super().__init__(name=f"lrctl-mlflow[{tracking_uri}]", daemon=True)
        self.state_dir = state_dir
        self.tracking_uri = tracking_uri
        self.opt = options
        self._queue: queue.Queue[tuple[str, str, JournalLine] | None] = queue.Queue(
            options.queue_size)
        self._lock = threading.Lock()
        self._attention: set[str] = set()  # runs to reconcile with their journal
        self._submitted = 0  # written by the owner thread only
        self._settled = 0  # everything submitted up to this count is acknowledged
        self._settled_cond = threading.Condition()
        self._force = threading.Event()
        self._stopping = threading.Event()
        self._runs: dict[str, RunState] = {}
        # Ended, fully shipped runs whose picture waits for a round that ships nothing: by
        # key alone, with their back-off (failures, retry at): under a load that keeps the
        # worker shipping, they can wait long, and a run's state (its meta and cursor, a
        # few tens of KiB) held for each made the shipper grow with every run that ended.
        # Read again from the run's files (its cursor, saved) when its picture is drawn.
        self._pictures: dict[str, tuple[int, float]] = {}
        self.files_down: dict[str, str] = {}  # run key -> why its files wait, as told
        self._client: Any = None
        self._experiments = Experiments()  # of this client's store
        self._outage_logged = False
        self.health = StoreHealth(tracking_uri, options.backoff_max, options.on_state)
        self._retry_at = 0.0

    @property
    def error(self) -> str | None:
        """Why MLflow is unavailable, while it is."""
        return self.health.error

    # -- owner-thread side ------------------------------------------------------
    def submit(self, run_key: str, stream: str, line: JournalLine) -> None:
        try:
            self._queue.put_nowait((run_key, stream, line))
        except queue.Full:
            with self._lock:
                self._attention.add(run_key)
        self._submitted += 1

    def nudge(self, run_key: str) -> None:
        with self._lock:
            self._attention.add(run_key)
        self._submitted += 1
        self._wake()

    def flush(self, timeout: float) -> bool:
        want = self._submitted
        self._force.set()
        self._wake()
        deadline = time.monotonic() + timeout
        with self._settled_cond:
            while self._settled < want and self.is_alive():
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._settled_cond.wait(min(left, _TICK_S))
        return self._settled >= want

    def stop(self) -> None:
        self._stopping.set()
        self._wake()

    def _wake(self) -> None:
        with contextlib.suppress(queue.Full):  # a full queue wakes the worker anyway
            self._queue.put_nowait(None)

    # -- worker thread ------------------------------------------------------------
    def run(self) -> None:
        while not self._stopping.is_set():
            seen = self._submitted
            try:
                self._loop_once()
            except Exception as exc:  # never let one bad run kill the worker of every run
                self._client = None  # opened afresh (out of descriptors, a store replaced)
                self._stopping.wait(self.health.failed(exc))
            finally:
                try:
                    self._tell_files()  # (also after a round that ended early)
                except Exception:  # a callback's failure must not end the worker
                    log.exception("lrctl: MLflow worker: a run's files state not reported")
            if self._queue.empty() and not self._pictures and not any(
                    r.has_work() or r.picture_due() or r.files_down for r in self._runs.values()):
                with self._settled_cond:
                    self._settled = seen
                    self._settled_cond.notify_all()

    def _loop_once(self) -> None:
        now = time.monotonic()
        try:
            item = self._queue.get(timeout=_TICK_S)
            for _ in range(self.opt.queue_size):
                if item is not None:
                    run_key, stream, line = item
                    self._state(run_key).offer(stream, line, self.opt.max_pending, now)
                item = self._queue.get_nowait()
        except queue.Empty:
            pass
        with self._lock:
            attention, self._attention = self._attention, set()
        for key in attention:
            for s in self._state(key).streams.values():
                s.behind = True
        force = self._force.is_set()
        self._force.clear()
        now = time.monotonic()
        if self._client is None:
            if now < self._retry_at:
                return
            try:
                self._client = self.opt.client_factory(self.tracking_uri)
                self._experiments = Experiments()
            except Exception as exc:
                self._retry_at = now + self.health.failed(exc)
                return
            self.health.ok()
        shipped = False
        for key, st in list(self._runs.items()):
            files_due = st.files_due(now)  # (its files failed, and may be tried again)
            if not st.has_work() and not files_due:
                if st.picture_due():
                    del self._runs[key]  # parked: its key alone waits (see _pictures)
                    self._pictures[key] = (st.failures, st.retry_at)
                elif st.failed or (st.cursor.get("finished") and not st.files_down):
                    del self._runs[key]  # the run ended and is fully shipped
                    if self.opt.on_done is not None:
                        self.opt.on_done(key, st.streams["events"].acked_seq, st.failed)
                continue
            due = files_due or force or any(s.behind for s in st.streams.values()) or (
                st.first_pending_at is not None
                and now - st.first_pending_at >= self.opt.flush_interval) or sum(
                len(s.pending) for s in st.streams.values()) >= MAX_METRICS_PER_BATCH
            if due and now >= st.retry_at:
                self._ship(st)
                shipped = True
        # Pictures only when this round shipped nothing, one at a time: a decision
        # waits behind one picture at most.
        for key, (failures, retry_at) in self._pictures.items() if not shipped else ():
            if now >= retry_at:
                del self._pictures[key]
                paths = RunPaths.of(self.state_dir, key)
                if not paths.root.is_dir():
                    # Its files are gone (deleted from outside, with the state dir, say):
                    # nothing to draw from or to save. Read again as new, it was shipped
                    # afresh: an MLflow run of no one's, its cursor's save failing forever.
                    log.warning("lrctl: run %s: its journal is gone (%s); its timeline "
                                "picture is not drawn", key, paths.root)
                    if self.opt.on_done is not None:
                        self.opt.on_done(key, 0, True)
                    break
                st = self._unpark(key, (failures, retry_at))
                # Drawn, or due still (backed off, its files down): the next round ends it
                # (on_done) or parks it again, as any run without lines to ship. Not drawn
                # if its files no longer say so (read as damaged: given up on, as at a first
                # read, not a KeyError that puts the whole worker down).
                if st.picture_due():
                    self._attempt(st, functools.partial(self._draw, st))
                break

    def _draw(self, st: RunState, shipper: RunShipper) -> None:
        """A parked run's picture. Its streams, read again, are first read up to the journal's
        end (nothing, as when it was parked): left "behind", a failed picture made the run
        look as if it had lines, and a shipping round with no MLflow call "succeeded":
        its back-off and the store's health reset at every try of an outage."""
        st.top_up(self.opt.max_pending)
        if not st.has_work():  # (else its lines first: shipped next round, parked again)
            shipper.draw_timeline()

    def _tell_files(self) -> None:
        """``on_files`` for each run whose files began or ended waiting (one dict
        comparison a round: nothing is told while nothing changes)."""
        now = {key: str(st.cursor[FILES_DOWN]) for key, st in self._runs.items()
               if st.files_down and not st.failed}
        told = self.files_down
        if now == told:
            return
        if self.opt.on_files is not None:
            for key in told.keys() - now.keys():
                self.opt.on_files(key, None)
            for key, why in now.items():
                if told.get(key) != why:
                    self.opt.on_files(key, why)
        self.files_down = now  # (replaced whole: status() reads it from another thread)

    def _state(self, run_key: str) -> RunState:
        st = self._runs.get(run_key)
        if st is None:
            # (a parked run back with lines to ship, resumed: it is read again, as parked
            # runs are; its resume drops its picture, drawn at its next end)
            return self._unpark(run_key, self._pictures.pop(run_key, None))
        return st

    def _unpark(self, run_key: str, parked: tuple[int, float] | None) -> RunState:
        """The run read from its files into the runs shipped, with a parked picture's
        back-off (as when it was held whole)."""
        st = self._runs[run_key] = RunState(RunPaths.of(self.state_dir, run_key))
        if parked is not None:
            st.failures, st.retry_at = parked
        return st

    def _ship(self, st: RunState) -> None:
        def ship(shipper: RunShipper) -> None:
            if (shipper.discarded_unseen(self.opt.max_pending)
                    or shipper.deleted_idle(self.opt.max_pending)):
                if st.files_down:  # (no MLflow run: no files to store)
                    st.forget_files()
                    st.save()
                return
            shipper.ensure_run()
            while True:
                st.top_up(self.opt.max_pending)
                if not shipper.ship_once() or self._stopping.is_set():
                    break
            if not st.cursor.get("finished"):
                shipper.refresh_views(catch_up=not st.files_checked)
                st.files_checked = True
            elif st.decisions_unfiled():
                # Decisions shipped after the run's end (its streams are read apart, so
                # its end can go first): into the files too, at once. They waited for
                # the next snapshot interval (the run was not refreshed once finished)
                # and a controller that stopped first left the files without them.
                shipper.refresh_views(catch_up=True)
            if st.files_due(time.monotonic()):
                shipper.retry_files()

        self._attempt(st, ship)

    def _attempt(self, st: RunState, action: Callable[[RunShipper], None]) -> None:
        """``action`` on the run's :class:`RunShipper`; MLflow's refusals and outages
        handled (given up on, or backed off from)."""
        from mlflow.exceptions import MlflowException

        from ._mlflow_run import RunShipper

        try:
            action(RunShipper(self._client, st, timeline=self.opt.timeline,
                              snapshot_interval=self.opt.snapshot_interval,
                              experiments=self._experiments,
                              files_backoff_max=self.opt.backoff_max))
        except MlflowException as exc:
            if exc.error_code in PERMANENT_ERRORS:
                self._give_up(st, exc)
            else:
                self._back_off(st, exc)
        except JournalError as exc:  # this run's damage: the others ship on
            self._give_up(st, exc, "its journal is damaged")
        except OSError as exc:
            self._back_off(st, exc)
        else:
            if st.failures:
                log.warning("lrctl: MLflow at %s is reachable again; backlog replayed",
                            self.tracking_uri)
            st.failures = 0
            self._outage_logged = False
            self.health.ok()
            if not st.has_work():
                st.first_pending_at = None

    def _back_off(self, st: RunState, exc: BaseException) -> None:
        st.failures += 1
        delay = min(self.opt.backoff_max, BACKOFF_MIN_S * 2 ** (st.failures - 1))
        st.retry_at = time.monotonic() + delay
        if not self._outage_logged:
            log.warning("lrctl: MLflow at %s failed (%s); decisions stay in the journal and "
                        "are replayed when it answers", self.tracking_uri, exc)
            self._outage_logged = True
        self.health.set_error(reason(exc))

    def _give_up(self, st: RunState, exc: BaseException,
                 why: str = "MLflow refused it") -> None:
        log.error("lrctl: run %s: %s (%s); its audit trail stays in the journal (%s) and is "
                  "no longer shipped", st.paths.run_key, why, exc, st.paths.root)
        st.cursor["failed"] = str(exc)[:2000]
        st.save()
        st.failed = True
        for s in st.streams.values():
            s.pending.clear()
