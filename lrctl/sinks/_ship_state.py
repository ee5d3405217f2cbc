"""The MLflow worker's view of one run: what the journal holds, what MLflow acknowledged.

``_RunState`` is owned by one worker thread; it reads the journal and the cursor
(``cursor.json``), never MLflow, so it needs no mlflow import.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ..paths import is_run_key
from ._mlflow_store import state_dir_write_error
from .journal import (
    STREAMS,
    DamagedFile,
    JournalLine,
    RunPaths,
    atomic_write_json,
    read_json,
    read_lines,
)

__all__ = ["FILES_DOWN", "FILES_WAIT", "SHIPPED", "TIMELINE_DUE", "Experiments", "RunState",
           "ShipState", "StreamState", "files_behind", "runs_behind", "shipping",
           "unmark_shipped"]

log = logging.getLogger("lrctl.sinks")

#: Cursor key: the run ended and its timeline picture is still to be drawn.
TIMELINE_DUE = "timeline_due"
#: Cursor key: why the run's artifact store failed its files; they wait (see _mlflow_files).
FILES_DOWN = "files_down"
#: What ``lrctl runs`` and ``status`` say of a run whose files wait (see _mlflow_files).
FILES_WAIT = ("MLflow cannot store its files: {} (its metrics and decisions still ship; "
              "the files are tried again)")


#: In a run's directory: when a controller started, its journal was all in MLflow and the
#: run had ended (or it is never shipped), so later starts skip it with one ``stat``. Made
#: only by :func:`runs_behind` (no run is open then); removed by :func:`unmark_shipped`
#: before a reopened run's journal takes a line.
SHIPPED = "shipped"


def unmark_shipped(paths: RunPaths) -> None:
    """The run opens again (its journal grows): the next controller looks at it."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(paths.root / SHIPPED)


def _mark_shipped(paths: RunPaths) -> None:
    # Not fsynced: a marker lost to a crash costs one look at the run, nothing more.
    with contextlib.suppress(OSError):
        os.close(os.open(paths.root / SHIPPED, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600))


def files_behind(cursor: dict[str, Any]) -> bool:
    """A run's decisions files in MLflow lag the decisions MLflow acknowledged."""
    if cursor.get("failed") or cursor.get("finished"):
        return False
    acked = cursor.get("streams", {}).get("decisions", {}).get("offset", 0)
    return bool(acked > (cursor.get("snapshot") or {}).get("offset", 0))


def runs_behind(state_dir: Path) -> list[tuple[str, str]]:
    """``(run_key, tracking_uri)`` of every run under ``state_dir`` whose journal is ahead
    of MLflow (or whose decisions files in MLflow lag what it acknowledged, or whose
    timeline picture is still to be drawn).

    Called once, as a controller starts. A run found ended and all shipped is marked
    (:data:`SHIPPED`): the controllers after this one skip it with one ``stat``, however
    many runs the state dir has journaled (a soak test's 7 680 ended runs took 0.46 s)."""
    behind = []
    try:  # (one stat per marked run: no Path objects, no key check for those)
        keys = sorted(e.name for e in os.scandir(os.path.join(state_dir, "runs"))
                      if not os.path.exists(os.path.join(e.path, SHIPPED))
                      and is_run_key(e.name) and e.is_dir())
    except FileNotFoundError:
        return []
    for key in keys:
        paths = RunPaths.of(state_dir, key)
        try:  # (a damaged cursor would ship the run again from its start: duplicates)
            state, uri = shipping(paths)
        except DamagedFile as exc:
            log.error("run %s is not shipped to MLflow: %s; its journal is intact", key, exc)
            continue
        if state == "behind":
            behind.append((key, str(uri)))
        elif state == "shipped":
            _mark_shipped(paths)
    return behind


#: What :func:`shipping` says of a run's journal and MLflow.
ShipState = Literal["behind", "shipped", "unshipped", "journal only", "open"]


def shipping(paths: RunPaths) -> tuple[ShipState, str | None]:
    """Where a run's journal stands with MLflow, and its tracking URI (None: it has none):
    ``behind`` (lines, files or its picture still to ship), ``shipped`` (its end
    acknowledged and all its journal with it), ``unshipped`` (never to be shipped: no
    MLflow target, or no ``meta.json`` yet), ``journal only`` (MLflow refused it, or its
    cursor was damaged: never shipped again) or ``open`` (all shipped so far, not ended).
    :class:`DamagedFile` when its meta or cursor cannot be read, or holds a field of the
    wrong kind (JSON, but not what lrctl writes there)."""
    meta = read_json(paths.meta, {}, strict=True)  # (none: not a run's journal yet)
    cursor = read_json(paths.cursor, {}, strict=True)
    try:
        uri = (meta.get("mlflow") or {}).get("tracking_uri")
        if not uri:
            return "unshipped", None
        if cursor.get("failed"):
            return "journal only", str(uri)
        if _behind(paths, cursor):
            return "behind", str(uri)
    except (AttributeError, TypeError) as exc:  # JSON objects, but not of lrctl's making
        raise DamagedFile(f"{paths.meta} or {paths.cursor} is damaged (a field of the wrong "
                          f"kind: {exc})") from None
    return ("shipped" if cursor.get("finished") else "open"), str(uri)


def _behind(paths: RunPaths, cursor: dict[str, Any]) -> bool:
    if cursor.get(TIMELINE_DUE) or cursor.get(FILES_DOWN) or files_behind(cursor):
        return True
    acked = cursor.get("streams", {})
    for name in STREAMS:
        try:
            size = os.stat(paths.stream(name)).st_size
        except FileNotFoundError:
            size = 0
        if size > acked.get(name, {}).get("offset", 0):
            return True
    return False


@dataclass
class Experiments:
    """What a worker learned of its store's experiments, so that a new run does not ask
    again: ids by name, and those tagged (or found) as model training."""

    ids: dict[str, str] = field(default_factory=dict)
    marked: set[str] = field(default_factory=set)


@dataclass
class StreamState:
    acked_seq: int = 0
    acked_offset: int = 0
    loaded_seq: int = 0
    loaded_offset: int = 0
    behind: bool = True  # the journal may hold lines not in `pending`
    pending: deque[JournalLine] = field(default_factory=deque)


class RunState:
    """The worker's view of one run: its cursor and the lines not yet acknowledged."""

    def __init__(self, paths: RunPaths) -> None:
        self.paths = paths
        damaged = None
        try:  # (a damaged cursor read as empty would ship the run again: duplicates)
            self.meta: dict[str, Any] = read_json(paths.meta, {}, strict=True)
            self.cursor: dict[str, Any] = read_json(paths.cursor, {}, strict=True) or {}
        except DamagedFile as exc:
            damaged = str(exc)[:2000]  # (kept in the cursor, should it be saved)
            self.meta, self.cursor = {}, {"failed": damaged}
            log.error("run %s is not shipped to MLflow: %s; its journal is intact",
                      paths.run_key, exc)
        self.cursor.setdefault("streams", {})
        self.cursor.setdefault("params", {})
        self.cursor.setdefault("decision_ts", 0)
        self.streams: dict[str, StreamState] = {}
        for name in STREAMS:
            c = self.cursor["streams"].get(name, {"seq": 0, "offset": 0})
            self.streams[name] = StreamState(c["seq"], c["offset"], c["seq"], c["offset"])
        # refused by MLflow, or its cursor or meta damaged: journal only
        self.failed = bool(self.cursor.get("failed")) or damaged is not None
        self.first_pending_at: float | None = None
        self.failures = 0
        self.retry_at = 0.0
        # The decisions files (see _mlflow_views) are brought up to date the first time
        # a worker ships this run: a controller that stopped may have left them behind.
        self.files_checked = False
        self.files_failures = 0  # file operations failed in a row (see _mlflow_files)
        self.files_retry_at = 0.0  # the files are tried again from then on
        self.files_retrying = False  # they are being tried again (the mark still set)

    def offer(self, stream: str, line: JournalLine, max_pending: int, now: float) -> None:
        s = self.streams[stream]
        if self.failed or line.seq <= s.loaded_seq:
            return  # given up on, or already read back from the journal
        if not s.behind and line.seq == s.loaded_seq + 1 and len(s.pending) < max_pending:
            s.pending.append(line)
            s.loaded_seq, s.loaded_offset = line.seq, line.end
            if self.first_pending_at is None:
                self.first_pending_at = now
        else:
            s.behind = True  # spill: the journal has it, read it back when there is room

    def top_up(self, max_pending: int) -> None:
        for name, s in self.streams.items():
            room = max_pending - len(s.pending)
            if not s.behind or room <= 0:
                continue
            got = 0
            for line in read_lines(self.paths.stream(name), s.loaded_offset, limit=room):
                s.pending.append(line)
                s.loaded_seq, s.loaded_offset = line.seq, line.end
                got += 1
            s.behind = got >= room
            if got and self.first_pending_at is None:
                self.first_pending_at = time.monotonic()

    def decisions_unfiled(self) -> bool:
        """Decisions MLflow has that the run's decisions files do not (a run not deleted)."""
        snapshot = self.cursor.get("snapshot") or {}
        return (self.cursor.get("ended") != "DELETED"
                and self.streams["decisions"].acked_offset > int(snapshot.get("offset", 0)))

    def has_work(self) -> bool:
        return not self.failed and any(s.pending or s.behind for s in self.streams.values())

    def picture_due(self) -> bool:
        """The run ended and its timeline is still to be drawn (after any work), and its
        artifact store takes files."""
        return not self.failed and bool(self.cursor.get(TIMELINE_DUE)) and not self.files_down

    @property
    def files_down(self) -> bool:
        """The run's artifact store failed its files: they wait (see _mlflow_files)."""
        return bool(self.cursor.get(FILES_DOWN))

    def forget_files(self) -> None:
        """The run needs no files any more (its MLflow run was deleted): no mark, no
        back-off (saved with the cursor)."""
        self.cursor.pop(FILES_DOWN, None)
        self.files_failures, self.files_retry_at = 0, 0.0

    def files_due(self, now: float) -> bool:
        """The run's files wait and may be tried again now."""
        return not self.failed and self.files_down and now >= self.files_retry_at

    def files_behind(self) -> bool:
        """MLflow's decisions files lag what it acknowledged (uploaded on a schedule)."""
        return files_behind(self.cursor)

    def ack(self, stream: str, lines: Iterable[JournalLine]) -> None:
        s = self.streams[stream]
        for line in lines:
            popped = s.pending.popleft()
            assert popped is line
            s.acked_seq, s.acked_offset = line.seq, line.end
        self.cursor["streams"][stream] = {"seq": s.acked_seq, "offset": s.acked_offset}

    def restart_into(self, run_id: str, experiment_id: str, left: str) -> None:
        """Ship the whole journal again, from its first line, into MLflow run ``run_id``
        (``left`` is the run shipped to so far)."""
        self.cursor = {"run_id": run_id, "created": False, "experiment_id": experiment_id,
                       "streams": {}, "params": {}, "decision_ts": 0,
                       "left": [*self.cursor.get("left", []), left]}
        self.streams = {name: StreamState() for name in STREAMS}
        self.first_pending_at = None
        self.files_checked = False
        self.files_failures, self.files_retry_at = 0, 0.0  # (the new run's files: none down)
        self.save()

    def save(self) -> None:
        try:
            atomic_write_json(self.paths.cursor, self.cursor)
        except OSError as exc:
            raise state_dir_write_error(self.paths.cursor, exc) from exc
