"""Opening an MLflow tracking store, once, from the shipper process, before shipping.

MLflow creates a sqlite store's tables on first use, in many steps (``create_all``,
then every alembic migration), not in one transaction: a process killed in between
(a controller's ``kill -9`` ends its shipper at once) leaves a half-migrated database
that MLflow refuses for good. So a sqlite store that does not exist yet is built
under a temporary name next to it and linked into place only when complete (a
link, not a rename: a store that appeared meanwhile is never replaced); a kill
leaves at most a temporary file, which the next attempt removes.

Any store is then checked with one cheap call, so that a store MLflow cannot open
(corrupt, half-migrated by an older version, unwritable, out of file descriptors)
fails here, once per attempt, with a reason, not in the middle of a batch.

:class:`StoreHealth` is a worker's account of its store while it is unavailable: the
back-off, the log (bounded) and the reason reported.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import unquote

__all__ = ["BACKOFF_MIN_S", "LOG_EVERY_S", "StateDirWriteError", "StoreHealth", "open_store",
           "reason", "unavailable"]

log = logging.getLogger("lrctl.sinks.mlflow")

_TMP = ".lrctl-new-"
BACKOFF_MIN_S = 0.5
LOG_EVERY_S = 10.0  # at most one line per URI this often while MLflow stays unavailable


def open_store(tracking_uri: str) -> Any:
    """An ``MlflowClient`` on ``tracking_uri`` whose store is created and answers."""
    from mlflow.tracking import MlflowClient

    path = _sqlite_path(tracking_uri)
    try:
        if path is not None:
            _remove_stale(path)
            if not _has_data(path):
                _create_sqlite(path)
        client = MlflowClient(tracking_uri=tracking_uri)
        client.search_experiments(max_results=1)
    except BaseException:
        _forget_engine(tracking_uri)  # a repaired file must be opened afresh next time
        raise
    return client


class StateDirWriteError(OSError):
    """The shipper could not write its own file in the state dir (a run's cursor): a full
    or read-only disk there, not MLflow's fault, though shipping waits for it too."""


_STATE_DIR = "the state dir refuses"  # how such a reason starts (see unavailable())


def state_dir_write_error(path: Path, exc: OSError) -> StateDirWriteError:
    return StateDirWriteError(exc.errno, f"{_STATE_DIR} {path.name} ({path}): "
                                         f"{exc.strerror or exc}")


def unavailable(why: str) -> str:
    """How ``status`` and ``runs`` say that MLflow gets nothing, and why: a state dir the
    shipper cannot write to is named as such (before: "MLflow unavailable: OSError:
    [Errno 28] No space left on device (sqlite:///...)" for a full disk under the state
    dir, the MLflow store's own disk fine)."""
    if why.startswith(_STATE_DIR):
        return f"MLflow shipping waits: {why} (MLflow itself is not at fault)"
    return f"MLflow unavailable: {why}"


#: Lines of SQLAlchemy's that say how an error was raised, not what it is.
_NOT_THE_CAUSE = ("(raised as a result of", "(Background on this error")


def reason(exc: BaseException) -> str:
    """One line saying why: the exception's first line that says what went wrong (not
    SQLAlchemy's "raised as a result of Query-invoked autoflush" preamble, which a full
    disk under MLflow's sqlite store was reported as), without SQL or stack, and the root
    of its chain of causes where that line does not say it already."""
    if isinstance(exc, StateDirWriteError):
        return exc.strerror or str(exc)
    first = _first_line(exc)
    root, depth = exc, 0
    while root.__cause__ is not None and depth < 8:  # (explicit causes: `raise ... from`)
        root, depth = root.__cause__, depth + 1
    said = f"{type(exc).__name__}: {first[:300]}" if first else type(exc).__name__
    cause = _first_line(root) if root is not exc else ""
    if cause and cause not in first:
        said += f" ({type(root).__name__}: {cause[:200]})"
    return said


def _first_line(exc: BaseException) -> str:
    for line in str(exc).strip().splitlines():
        line = line.strip()
        if line and not line.startswith(_NOT_THE_CAUSE):
            return line
    return ""


def _sqlite_path(uri: str) -> Path | None:
    if not uri.startswith("sqlite:///"):
        return None
    # What follows the third slash: "sqlite:////abs/path" is /abs/path (urlparse would
    # say //abs/path, which errors then showed).
    path = unquote(uri[len("sqlite:///"):].split("?", 1)[0])
    return None if path in ("", ":memory:") else Path(path)


def _has_data(path: Path) -> bool:
    try:
        return path.stat().st_size > 0
    except FileNotFoundError:
        return False


def _create_sqlite(path: Path) -> None:
    """Build a new sqlite store at ``path`` all at once (see the module's note)."""
    from mlflow.tracking import MlflowClient

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}{_TMP}{os.getpid()}")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    tmp_uri = f"sqlite:///{tmp}"
    try:
        MlflowClient(tracking_uri=tmp_uri).search_experiments(max_results=1)
        if _has_data(path):
            return  # another process made it meanwhile: theirs stands
        with contextlib.suppress(FileNotFoundError):
            path.unlink()  # an empty file: nothing in it to keep
        with contextlib.suppress(FileExistsError):
            os.link(tmp, path)
    finally:
        # Its engine too, built or not: MLflow caches it by URI before the tables are
        # made, so an attempt that failed half-way (a disk full mid-migration) left
        # pooled connections to the file unlinked here, and every later attempt of this
        # process (the same name) went on through them ("table ... already exists",
        # "attempt to write a readonly database") until the shipper restarted.
        _forget_engine(tmp_uri)
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def _remove_stale(path: Path) -> None:
    """Temporary stores (and their sqlite journals) of attempts that were killed."""
    with contextlib.suppress(OSError):
        for stale in path.parent.glob(f"{path.name}{_TMP}*"):
            pid = stale.name[len(path.name) + len(_TMP):].split("-", 1)[0]
            if not (pid.isdigit() and _alive(int(pid))):
                with contextlib.suppress(OSError):
                    stale.unlink()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _forget_engine(uri: str) -> None:
    """Drop MLflow's cached engine (and its pooled connections) for ``uri``."""
    with contextlib.suppress(Exception):
        from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

        with SqlAlchemyStore._engine_map_lock:
            engine = SqlAlchemyStore._engine_map.pop(uri, None)
        if engine is not None:
            engine.dispose()


class StoreHealth:
    """Whether one tracking URI's store can be used, as its worker finds out.

    A store that cannot be used at all is retried with exponential back-off up to
    ``backoff_max``, logged with one traceback and then one line at most every
    :data:`LOG_EVERY_S` seconds, and reported through ``on_state(uri, why)`` until it
    answers again (``on_state(uri, None)``)."""

    def __init__(self, uri: str, backoff_max: float,
                 on_state: Callable[[str, str | None], None] | None) -> None:
        self.uri = uri
        self.backoff_max = backoff_max
        self.on_state = on_state
        self.error: str | None = None  # why MLflow is unavailable, while it is
        self.failures = 0  # of the store, in a row
        self._quiet_until = 0.0  # no one-line report before this (rate limit)
        self._traced = False  # this outage's one traceback was logged

    def failed(self, exc: BaseException) -> float:
        """MLflow cannot be used at all: report, log (boundedly), and say how long to wait."""
        self.failures += 1
        delay = min(self.backoff_max, BACKOFF_MIN_S * 2 ** (self.failures - 1))
        why = reason(exc)
        now = time.monotonic()
        if not self._traced:
            log.error("lrctl: MLflow unavailable at %s: %s; decisions stay in the journal, "
                      "retrying with back-off (up to %g s)", self.uri, why,
                      self.backoff_max, exc_info=exc)
            self._traced, self._quiet_until = True, now + LOG_EVERY_S
        elif now >= self._quiet_until:
            log.warning("lrctl: MLflow still unavailable at %s: %s (%d failed attempt(s); "
                        "next in %.1f s)", self.uri, why, self.failures, delay)
            self._quiet_until = now + LOG_EVERY_S
        self.set_error(why)
        return delay

    def ok(self) -> None:
        if self.failures:
            log.warning("lrctl: MLflow at %s is available again after %d failed attempt(s)",
                        self.uri, self.failures)
        self.failures, self._traced = 0, False
        self.set_error(None)

    def set_error(self, why: str | None) -> None:
        if why != self.error:
            self.error = why
            if self.on_state is not None:
                self.on_state(self.uri, why)
