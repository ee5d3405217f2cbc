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

import logging
import os
import time
from pathlib import Path
from typing import Any

from ..policy._decision import record_ratio
from ._mlflow_limits import (  # (their old home: imported from here by name)
    MAX_METRICS_PER_BATCH,
    MAX_PARAMS_TAGS_PER_BATCH,
    MAX_TAG_CHARS,
    PERMANENT_ERRORS,
)
from ._mlflow_store import LOG_EVERY_S, open_store, unavailable
from ._mlflow_worker import (
    ClientFactory,
    DoneCallback,
    FilesCallback,
    StateCallback,
    Worker,
    WorkerOptions,
)
from ._ship_state import FILES_WAIT, runs_behind
from .journal import JournalLine

__all__ = ["LOG_EVERY_S", "MAX_METRICS_PER_BATCH", "MAX_PARAMS_TAGS_PER_BATCH",
           "MAX_TAG_CHARS", "PERMANENT_ERRORS", "MlflowShipper", "decision_ratio"]

decision_ratio = record_ratio  # the old name

log = logging.getLogger("lrctl.sinks.mlflow")



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
        self._options = WorkerOptions(flush_interval, queue_size, max_pending, timeline,
                                      backoff_max, client_factory or _default_client,
                                      snapshot_interval, on_state, on_done, on_files)
        self._workers: dict[str, Worker] = {}
        self._route: dict[str, Worker] = {}
        # One HTTP call must not retry for minutes inside the worker: lrctl retries
        # from the journal itself. setdefault leaves a user's own choice alone.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")

    def attend(self, run_key: str, tracking_uri: str) -> None:
        """Route ``run_key`` to its URI's worker and have it catch up with the journal."""
        worker = self._workers.get(tracking_uri)
        if worker is None:
            worker = self._workers[tracking_uri] = Worker(self.state_dir, tracking_uri,
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
        return out | {key: unavailable(w.error)
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
