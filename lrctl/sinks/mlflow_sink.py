"""Ships journal lines to MLflow from background threads, batched and replayable.

The journal is the source of truth; MLflow is a replica that may lag. Each
tracking URI gets one worker thread (a dead server must not hold up runs that
log elsewhere) fed by a bounded queue. When the queue is full, or MLflow is
down for long, lines are not kept in memory: the run is marked *behind* and
the worker reads its backlog back from the journal, from the cursor on.

Idempotence: the cursor (``cursor.json``) advances only after MLflow has
acknowledged a batch, and everything sent is a pure function of the journal
and the cursor: metric points keep the timestamp journaled with them (MLflow
drops a repeated ``(key, timestamp, step, value)``), the decisions artifact is
the journal's ``decisions.jsonl`` re-uploaded whole (after the records the MLflow run
held before this journal, kept beside it: see ``_mlflow_prior``), tags and params are
set to the same values. A batch re-sent after a crash thus changes nothing.

Store trouble: the worker opens its store once, before shipping anything
(:func:`~lrctl.sinks._mlflow_store.open_store`: a new sqlite store is built whole,
so a kill cannot leave it half-migrated). A store that cannot be opened, or an
unexpected error, puts the worker's URI down: retried with exponential back-off up
to ``backoff_max``, logged with one traceback and then one line at most every
:data:`LOG_EVERY_S` seconds, and reported (``on_state``) as "MLflow unavailable:
<reason>" until it answers again. The journal keeps everything meanwhile.

mlflow is imported here, lazily, in the worker threads only.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..policy._decision import record_ratio
from ._mlflow_store import BACKOFF_MIN_S, LOG_EVERY_S, StoreHealth, open_store, reason
from ._ship_state import FILES_DOWN, FILES_WAIT, Experiments, RunState, runs_behind
from .journal import JournalLine, RunPaths

if TYPE_CHECKING:
    from ._mlflow_run import RunShipper

__all__ = ["LOG_EVERY_S", "MlflowShipper", "decision_ratio"]

decision_ratio = record_ratio  # the old name

log = logging.getLogger("lrctl.sinks.mlflow")

MAX_METRICS_PER_BATCH = 1000  # MLflow's log_batch limit (entities in all)
MAX_PARAMS_TAGS_PER_BATCH = 100
MAX_TAG_CHARS = 5000
_TICK_S = 0.1
#: MLflow error codes that retrying cannot fix (a deleted run, a refused value).
PERMANENT_ERRORS = frozenset({"INVALID_PARAMETER_VALUE", "RESOURCE_DOES_NOT_EXIST",
                              "INVALID_STATE", "PERMISSION_DENIED"})
ClientFactory = Callable[[str], Any]
#: ``(tracking URI, why it is unavailable or None once it answers)``.
StateCallback = Callable[[str, "str | None"], None]
#: ``(run key, why its files wait or None once they are stored)`` (see _mlflow_files).
FilesCallback = Callable[[str, "str | None"], None]
#: ``(run key, events seq shipped, refused by MLflow)``: no more work for an ended run.
DoneCallback = Callable[[str, int, bool], None]


def _default_client(tracking_uri: str) -> Any:
    return open_store(tracking_uri)


class MlflowShipper:
    """Routes each run's journal lines to the worker of its tracking URI.

    All methods are called from the controller's owner thread and never wait on
    MLflow, except :meth:`flush` and :meth:`close`, which wait at most ``timeout``.
    """

    def __init__(self, state_dir: str | os.PathLike[str], *, flush_interval: float = 1.0,
                 queue_size: int = 10_000, max_pending: int = 20_000, timeline: bool = True,
                 backoff_max: float = 30.0, client_factory: ClientFactory | None = None,
                 snapshot_interval: float = 60.0,
                 on_state: StateCallback | None = None,
                 on_done: DoneCallback | None = None,
                 on_files: FilesCallback | None = None) -> None:
        if not 0 < flush_interval <= 2.0:
            raise ValueError(f"flush_interval must be in (0, 2] seconds, but got {flush_interval=}")
        if queue_size < 1 or max_pending < 1:
            raise ValueError(f"queue_size and max_pending must be >= 1, but got "
                             f"{queue_size=}, {max_pending=}")
        self.state_dir = Path(state_dir)
        self._options = _Options(flush_interval, queue_size, max_pending, timeline, backoff_max,
                                 client_factory or _default_client, snapshot_interval,
                                 on_state, on_done, on_files)
        self._workers: dict[str, _Worker] = {}
        self._route: dict[str, _Worker] = {}
        # One HTTP call must not retry for minutes inside the worker: lrctl retries
        # from the journal itself. setdefault leaves a user's own choice alone.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")

    def attend(self, run_key: str, tracking_uri: str) -> None:
        """Route ``run_key`` to its URI's worker and have it catch up with the journal."""
        worker = self._workers.get(tracking_uri)
        if worker is None:
            worker = self._workers[tracking_uri] = _Worker(self.state_dir, tracking_uri,
                                                           self._options)
            worker.start()
        self._route[run_key] = worker
        worker.nudge(run_key)

    def forget(self, run_key: str) -> None:
        """The run ended and is shipped (the controller heard ``on_done``): drop its route."""
        self._route.pop(run_key, None)

    def submit(self, run_key: str, stream: str, line: JournalLine) -> None:
        worker = self._route.get(run_key)
        if worker is None:
            raise KeyError(f"run {run_key!r} is not attended; call attend() first")
        worker.submit(run_key, stream, line)

    def catch_up(self, run_key: str) -> None:
        """The journal of ``run_key`` grew: read it from where this shipper is (the
        shipper process is told which runs grew, not the lines)."""
        worker = self._route.get(run_key)
        if worker is not None:
            worker.nudge(run_key)

    def recover(self) -> list[str]:
        """Attend every run under the state dir whose journal is ahead of MLflow
        (or whose decisions files in MLflow lag what it acknowledged)."""
        behind = runs_behind(self.state_dir)
        for key, uri in behind:
            self.attend(key, uri)
        return [key for key, _ in behind]

    def pass_on(self) -> None:
        """Nothing to do: :meth:`submit` hands each line to its worker at once."""

    def status(self) -> dict[str, Any]:
        return {"pid": os.getpid(), "state": "in-process", "restarts": 0,
                "unavailable": {uri: w.error for uri, w in list(self._workers.items())
                                if w.error},
                "files_down": {k: why for w in list(self._workers.values())
                               for k, why in dict(w.files_down).items()}}

    def run_errors(self) -> dict[str, str]:
        """``run key -> "MLflow unavailable: <reason>"`` for the runs whose MLflow is down,
        and :data:`FILES_WAIT` for those whose files wait for their artifact store."""
        out = {key: FILES_WAIT.format(why) for w in list(self._workers.values())
               for key, why in dict(w.files_down).items()}
        return out | {key: f"MLflow unavailable: {w.error}"
                      for key, w in list(self._route.items()) if w.error}

    def flush(self, timeout: float = 10.0) -> bool:
        """Ship everything submitted so far; True if MLflow acknowledged it all in time."""
        deadline = time.monotonic() + timeout
        return all([w.flush(max(0.0, deadline - time.monotonic()))
                    for w in list(self._workers.values())])

    def close(self, timeout: float = 1.0) -> bool:
        """Flush and stop the workers within ``timeout`` in all; the rest stays in the journal.

        The workers are daemon threads: one stuck in a hung MLflow call is left behind
        rather than holding the controller's exit (the next controller ships its backlog).
        """
        deadline = time.monotonic() + timeout
        done = self.flush(timeout)
        for w in self._workers.values():
            w.stop()
        for w in self._workers.values():
            w.join(timeout=max(0.0, deadline - time.monotonic()))
        self._workers.clear()
        self._route.clear()
        return done


@dataclass(frozen=True)
class _Options:
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


class _Worker(threading.Thread):
    """Ships the runs of one tracking URI."""

    def __init__(self, state_dir: Path, tracking_uri: str, options: _Options) -> None:
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
            if self._queue.empty() and not any(r.has_work() or r.picture_due() or r.files_down
                                               for r in self._runs.values()):
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
        shipped, pictures = False, []
        for key, st in list(self._runs.items()):
            files_due = st.files_due(now)  # (its files failed, and may be tried again)
            if not st.has_work() and not files_due:
                if st.picture_due():
                    pictures.append(st)
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
        for st in pictures if not shipped else ():
            if now >= st.retry_at:
                self._attempt(st, lambda shipper: shipper.draw_timeline())
                break

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
            st = self._runs[run_key] = RunState(RunPaths.of(self.state_dir, run_key))
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

    def _give_up(self, st: RunState, exc: BaseException) -> None:
        log.error("lrctl: MLflow refused run %s (%s); its audit trail stays in the journal "
                  "(%s) and is no longer shipped", st.paths.run_key, exc, st.paths.root)
        st.cursor["failed"] = str(exc)[:2000]
        st.save()
        st.failed = True
        for s in st.streams.values():
            s.pending.clear()
