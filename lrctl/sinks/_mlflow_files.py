"""A run's files in MLflow, kept apart from its metrics and tags.

An MLflow run's metrics, params and tags go to the tracking store; its files
(``lrctl/decisions.jsonl`` and its table, ``lrctl/policy_events.jsonl``, the policy
files, the timeline picture) go to its experiment's artifact store, which fails on
its own: an ``s3://`` artifact root on a machine without ``boto3`` or credentials,
a bucket that refuses, credentials that expire in a week-long run, a full disk
under a local ``mlruns``. Such a failure raises whatever the artifact library
raises. It used to stop the MLflow worker as a whole: no metric, decision or end of
any run on that tracking URI reached MLflow while the files could not be written.

Now a failed file operation costs the run its files only, for a while:

* the run is marked (cursor key ``files_down``: what failed and why) and logged
  once per outage (with its traceback; one such line per kind of failure every
  ``LOG_AGAIN_S`` for all runs together: a store that fails every run's files says so
  once, not once per run), and ``lrctl status`` says so;
* its metrics, decisions (points and tags), params and end go on as before;
* its file operations are skipped, and tried again with back-off (0.5 s, doubling,
  up to the worker's ``backoff_max``): every file at once, each a whole file
  rebuilt from the journal, so nothing is lost by having skipped an upload; then
  the mark is cleared (``lrctl: ... files are stored again``);
* the mark is in the cursor: a restarted controller tries again.

Until the look at what the run already held (:mod:`._mlflow_prior`, itself a file
operation) has been made, no decisions file is uploaded: it could replace the
records of a journal that shipped into the run before. Meanwhile the
``lrctl.decisions`` tag counts this journal's decisions only.

A run MLflow says is gone (``RESOURCE_DOES_NOT_EXIST``) is handled as at any call.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterator
from typing import Any

from mlflow.exceptions import MlflowException

from ._mlflow_store import BACKOFF_MIN_S, reason
from ._ship_state import FILES_DOWN, RunState

__all__ = ["LOG_AGAIN_S", "RunFiles"]

log = logging.getLogger("lrctl.sinks.mlflow")

LOG_AGAIN_S = 600.0  # one error line (with traceback) per kind of failure this often
_logged: dict[str, float] = {}  # kind of failure -> when its error line was logged


class RunFiles:
    """One run's file operations, each tried only while its artifact store takes them.

    ``probe`` is a cheap call to the tracking store (``get_run``): a file operation that
    fails while the tracking store fails too is MLflow's outage, not the artifact
    store's, and is raised for the worker's usual back-off."""

    def __init__(self, state: RunState, backoff_max: float,
                 probe: Callable[[], Any]) -> None:
        self.st = state
        self.backoff_max = backoff_max
        self.probe = probe

    def attempt(self, what: str, action: Callable[[], Any]) -> bool:
        """Run ``action``, a file operation (``what`` names it); False when the files
        are down (and not being tried again), or when it fails: the run is then marked,
        and the files wait."""
        st = self.st
        if st.files_down and not st.files_retrying:
            return False
        try:
            action()
        except Warning:  # the filters made one an error: theirs to see, as it is
            raise
        except MlflowException as exc:
            if exc.error_code == "RESOURCE_DOES_NOT_EXIST" or not self._tracking_answers():
                raise  # the run is gone, or MLflow as a whole is down: not its files
            self._failed(what, exc)
        except Exception as exc:  # what the artifact library raises: boto3, azure, OSError
            if not self._tracking_answers():
                raise
            self._failed(what, exc)
        else:
            return True
        return False

    @contextlib.contextmanager
    def retrying(self) -> Iterator[None]:
        """The files are tried again inside (the mark stays in the cursor until
        :meth:`stored`: an exception in between leaves them due, not lost)."""
        self.st.files_retrying = True
        try:
            yield
        finally:
            self.st.files_retrying = False

    def failed_while_retrying(self) -> bool:
        """A file operation failed inside :meth:`retrying` (the rest were skipped)."""
        return not self.st.files_retrying

    def stored(self) -> None:
        """Every file of the run was stored again after an outage: the mark cleared."""
        if self.st.cursor.pop(FILES_DOWN, None) is not None:
            log.warning("lrctl: run %s: its files are stored in MLflow again",
                        self.st.paths.run_key)
        self.st.files_failures = 0
        self.st.save()

    def _tracking_answers(self) -> bool:
        try:
            self.probe()
        except Exception:
            return False
        return True

    def _failed(self, what: str, exc: BaseException) -> None:
        st = self.st
        st.files_retrying = False  # (the rest of a retry is skipped: see failed_while_retrying)
        st.files_failures += 1
        delay = min(self.backoff_max, BACKOFF_MIN_S * 2 ** (st.files_failures - 1))
        st.files_retry_at = time.monotonic() + delay
        why = f"{what}: {reason(exc)}"[:500]
        if not st.files_down:  # the outage's first failure (in this process)
            uri = (st.meta.get("mlflow") or {}).get("tracking_uri")
            kind, now = f"{uri}\0{what}\0{type(exc).__name__}", time.monotonic()
            loud = now - _logged.get(kind, -math.inf) >= LOG_AGAIN_S
            if loud:
                _logged[kind] = now
            log.log(logging.ERROR if loud else logging.INFO,
                    "lrctl: run %s: MLflow could not store %s (%s); its metrics, decisions "
                    "and tags still ship, its files wait and are tried again (every %g s "
                    "at most)", st.paths.run_key, what, reason(exc), self.backoff_max,
                    exc_info=exc if loud else None)
        st.cursor[FILES_DOWN] = why
        st.save()
