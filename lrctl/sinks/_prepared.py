"""A new run's files opened off the owner thread (:func:`prepare_open`), and the runs so
opened until the owner thread claims them (:class:`Preparations`).

Opening a run makes its directories, writes its policy text and ``meta.json``, opens
its three journal files and reads them back: a dozen filesystem calls, each a
fraction of a millisecond on an idle disk but several, tens under load, while other
threads fsync (a directory operation waits for the filesystem's journal). A new
run's hello is answered off the loop anyway (its policy is parsed on the hello
worker), so the worker does this too
(:meth:`~lrctl.sinks.audit.AuditSink.prepare_run`) and the loop only registers the
result. A hello that is not answered after all discards its preparation, and one no
hello claimed within :data:`PREPARED_TTL_S` is discarded by the sink's tick.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ._open_run import OpenRun, current_policy, load_high_water, save_policy
from ._ship_state import unmark_shipped
from .base import RunInfo
from .journal import (
    STREAMS,
    DamagedFile,
    RunPaths,
    StreamWriter,
    atomic_write_json,
    private_dirs,
    read_json,
)
from .sampling import MetricSampler
from .tracking import run_target

__all__ = ["PREPARED_TTL_S", "Preparations", "PreparedRun", "prepare_open"]

PREPARED_TTL_S = 60.0


@dataclass(eq=False)
class PreparedRun:
    """A run whose files :func:`prepare_open` made and opened, not yet registered."""

    info: RunInfo
    run: OpenRun
    policy_file: str  # the sha256 its policy text is kept under
    follow: dict[str, Any] | None  # the MLflow run it now follows, if it moved
    last_event: str | None  # the kind of its journal's last event (None: a new run)
    # Its new files and directories opened for the syncer's fsyncs; those that could not
    # be opened (out of descriptors) are left to the next group commit.
    sync_fds: list[int]
    unsynced: list[Path]
    created: bool  # its directory is new: made by this preparation
    made: float = field(default_factory=time.monotonic)

    def discard(self, remove_dir: bool = True) -> None:
        """Close what it opened; a directory it made and nothing wrote to since goes too
        (``remove_dir``: the caller knows no one else uses it now)."""
        for writer in self.run.writers.values():
            writer.close(sync=False)
        close_all(self.sync_fds)
        self.sync_fds = []
        if remove_dir and self.created and all(w.seq == 0 for w in self.run.writers.values()):
            shutil.rmtree(self.run.paths.root, ignore_errors=True)


def close_all(fds: list[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


def prepare_open(state_dir: Path, info: RunInfo, *, env: Mapping[str, str], experiment: str,
                 log_every: int, fsync_fd: Callable[[int], None]) -> PreparedRun:
    """The file work of opening ``info``'s run: nothing here is fsynced (the syncer does
    that, off the loop, before any reply acknowledges the run's first records)."""
    paths = RunPaths.of(state_dir, info.run_key)
    created = not paths.root.exists()
    if not created:  # (made durable with the run's directory, before its records are)
        unmark_shipped(paths)
    private_dirs(paths.policies)
    writers: dict[str, StreamWriter] = {}
    fds: list[int] = []
    try:
        try:
            old = read_json(paths.meta, {}, strict=True) or {}
        except DamagedFile as exc:  # its MLflow run is unknown: the journal alone from now
            old = {}
            _journal_only(paths, f"{exc}; its MLflow run is not known")
        policy_file = save_policy(paths, info, sync=False)
        target, follow = run_target(old.get("mlflow"), info, env, experiment)
        meta = {**asdict(info), "params": dict(info.params), "mlflow": target,
                "created": old.get("created", time.time()), "opened": time.time()}
        del meta["policy_text"]  # kept once per version under policies/
        atomic_write_json(paths.meta, meta, sync=False)
        sha, version, last_event = current_policy(paths)
        for name in STREAMS:  # the durable streams are fsynced by commit(), not per line
            writers[name] = StreamWriter(paths.stream(name), fsync=False, fsync_fd=fsync_fd)
        run = OpenRun(paths, writers, MetricSampler(log_every), sha, version, meta=meta)
        run.policy_texts[policy_file] = info.policy_text
        load_high_water(run)
        unsynced: list[Path] = []
        for path in (paths.meta, paths.policy_file(policy_file), paths.policies, paths.root,
                     paths.root.parent):
            try:
                fds.append(os.open(path, os.O_RDONLY | os.O_CLOEXEC))
            except OSError:
                unsynced.append(path)
    except BaseException:  # half-way (out of descriptors, a damaged journal): undone
        for writer in writers.values():
            writer.close(sync=False)
        close_all(fds)
        if created:
            shutil.rmtree(paths.root, ignore_errors=True)
        raise
    return PreparedRun(info, run, policy_file, follow, last_event, fds, unsynced, created)



class Preparations:
    """Runs opened by :func:`prepare_open` on a worker, by run key, until claimed.

    The lock guards the map only: the worker prepares outside it, so the owner thread
    never waits on file work. A key being prepared, or whose unclaimed directory is being
    removed, is *busy*: no second preparation of it starts meanwhile. :meth:`invalidate`
    (the state dir was made anew) and :meth:`clear` (shutdown) drop what is prepared and
    what is being prepared when it is done."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._runs: dict[str, PreparedRun] = {}
        self._busy: set[str] = set()
        self._generation = 0  # raised by invalidate(): older preparations are dropped
        self._closed = False

    def make(self, info: RunInfo, busy: Callable[[str], bool],
             prepare: Callable[[RunInfo], PreparedRun]) -> None:
        """(Worker thread) ``prepare(info)`` unless its run is prepared or busy already,
        or ``busy(run_key)`` (open, or ending, on the owner thread: it opens there)."""
        key = info.run_key
        with self._lock:
            if self._closed or key in self._runs or key in self._busy or busy(key):
                return
            self._busy.add(key)
            generation = self._generation
        try:
            prepared = prepare(info)
        finally:
            with self._lock:
                self._busy.discard(key)
        with self._lock:
            stale = self._closed or generation != self._generation
            if not stale:
                self._runs[key] = prepared
        if stale:
            prepared.discard(remove_dir=self._closed)

    def hold(self, key: str, busy: Callable[[str], bool]) -> bool:
        """(Owner thread) Keep ``key`` from being prepared while its directory is moved
        away (``lrctl prune``): False, and nothing held, when it is prepared or being
        prepared already, or ``busy(key)``; else it is busy until :meth:`release`."""
        with self._lock:
            if self._closed or key in self._runs or key in self._busy or busy(key):
                return False
            self._busy.add(key)
        return True

    def release(self, key: str) -> None:
        """Let :meth:`hold`'s ``key`` be prepared again."""
        with self._lock:
            self._busy.discard(key)

    def take(self, info: RunInfo) -> PreparedRun | None:
        """The run prepared for ``info``, if any (one prepared for another ``info`` of the
        same key is discarded: the hello that asked for it changed)."""
        if not self._runs:
            return None
        with self._lock:
            prepared = self._runs.pop(info.run_key, None)
        if prepared is not None and prepared.info != info:
            prepared.discard(remove_dir=False)  # the caller opens the run there now
            return None
        return prepared

    def discard(self, info: RunInfo) -> None:
        """The run prepared for this very ``info`` (its hello was not answered), if any;
        its run key is busy until its directory is gone."""
        if not self._runs:
            return
        key = info.run_key
        with self._lock:
            prepared = self._runs.get(key)
            if prepared is None or prepared.info is not info:
                return
            del self._runs[key]
            self._busy.add(key)
        try:
            prepared.discard()
        finally:
            with self._lock:
                self._busy.discard(key)

    def expire(self, ttl_s: float = PREPARED_TTL_S) -> None:
        """Discard what no hello claimed within ``ttl_s``."""
        if not self._runs:
            return
        cutoff = time.monotonic() - ttl_s
        with self._lock:
            old = [p.info for p in self._runs.values() if p.made < cutoff]
        for info in old:
            self.discard(info)

    def invalidate(self) -> None:
        """The state dir was deleted and made again: every preparation, made or under
        way, is of files that are gone; drop them (their hellos open anew)."""
        with self._lock:
            self._generation += 1
            stale, self._runs = list(self._runs.values()), {}
        for prepared in stale:
            prepared.discard(remove_dir=False)

    def clear(self) -> None:
        """Shutdown: discard every preparation; one under way is discarded when done."""
        with self._lock:
            self._closed = True
            stale, self._runs = list(self._runs.values()), {}
        for prepared in stale:
            prepared.discard()


def _journal_only(paths: RunPaths, why: str) -> None:
    """Mark the run's cursor failed (see ``RunState.failed``): it is not shipped to MLflow
    (a new MLflow run would start mid-history, or the old one get duplicates)."""
    try:
        cursor = read_json(paths.cursor, {}, strict=True) or {}
    except DamagedFile:
        cursor = {}
    if not cursor.get("failed"):
        logging.getLogger("lrctl.sinks").error(
            "run %s is no longer shipped to MLflow: %s; its journal is intact",
            paths.run_key, why)
        atomic_write_json(paths.cursor, {**cursor, "failed": why[:2000]}, sync=False)
