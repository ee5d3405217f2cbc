"""Which run journals may go, and how one goes: the rules of ``lrctl prune``.

A run's journal (``<state dir>/runs/<run key>/``) outlives the run: ``lrctl runs --all``,
``decisions`` and ``report`` read it, and MLflow catches up from it. It may be removed
(:func:`examine`) only once all of these hold:

* the run ended: its journal's last event is its ``end`` (a goodbye, or an eviction);
* no checkpoint of it is left, in ``runs/`` or set aside in ``runs/.detached/``: it can
  no longer be resumed from this state directory;
* MLflow has all of it (:func:`~lrctl.sinks._ship_state.shipping`, the rule by which a
  controller's start marks a run shipped), or it never had an MLflow target. A journal
  MLflow refused (``journal only``) is the only full record of its run: kept;
* nothing was written to it for the period asked (the newest ``mtime`` of its files);
* its ``meta.json``, cursor and events read (a damaged one is kept);
* it is a directory with a run key's name, never a symlink; and no controller holds the
  run (see :func:`move_runs`).

Removal is crash-safe: the directory is renamed, in one step, to a name no run key can
have (``.pruning-<key>``: :data:`MOVED`), the ``runs`` directory fsynced, and only then
deleted; a prune that stops half-way leaves a hidden directory that no reader takes
for a run and the next prune finishes (:func:`remove_moved`). Nothing is followed
through a symlink: ``runs`` is opened ``O_NOFOLLOW`` and everything is done relative
to it.

Only the process that owns the state directory moves a journal: a controller serving
from it, asked over its socket (``t: prune``, at most :data:`MAX_RUNS_PER_REQUEST`
runs a request, on its loop, where no run opens meanwhile), or, with none running,
``lrctl prune`` itself under :func:`gate`, which a controller's start waits for.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import stat
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from .. import paths
from ..sinks._ship_state import SHIPPED, shipping
from ..sinks.journal import DamagedFile, JournalError, RunPaths, last_line
from .store import checkpoint_places

__all__ = ["DAMAGED", "FAILED", "GATE", "MAX_RUNS_PER_REQUEST", "MOVED", "RECENT", "WHY_KEPT",
           "Kept", "Prunable", "controller_holds", "examine", "gate", "move_runs", "moved_dirs",
           "open_runs", "remove_moved", "run_dirs", "tree_size"]

#: The prefix of a journal directory moved aside to be deleted (no run key starts with ".").
MOVED = ".pruning-"
#: In a state directory: held by ``lrctl prune`` while it moves journals with no controller
#: running; a controller's start waits for it before it takes the directory's lock.
GATE = "prune.lock"
#: Runs one ``prune`` request may name: the controller looks at them on its loop.
MAX_RUNS_PER_REQUEST = 64

# Why a run's journal is kept (the ``kept`` of a request's answer).
HELD = "held"  # a controller holds the run (open, ending, or a hello for it)
RESUMABLE = "resumable"  # a checkpoint of it is on disk
OPEN = "open"  # its journal does not end with its end
BEHIND = "behind"  # MLflow does not have all of it yet
JOURNAL_ONLY = "journal only"  # MLflow refused it (or its cursor was damaged): never will
RECENT = "recent"  # written to within the period
DAMAGED = "damaged"
NOT_A_RUN = "not a run"  # no meta.json, or not a directory
GONE = "gone"  # removed (or moved) by someone else meanwhile
FAILED = "failed"  # it could not be moved aside
#: Each reason, as ``lrctl prune`` says it.
WHY_KEPT = {HELD: "held by a controller", RESUMABLE: "resumable (a checkpoint)",
            OPEN: "not ended", BEHIND: "not all in MLflow yet",
            JOURNAL_ONLY: "refused by MLflow (their journal is their only record)",
            RECENT: "written to within the period", DAMAGED: "damaged",
            NOT_A_RUN: "not a run's journal", GONE: "gone meanwhile",
            FAILED: "not movable"}


@dataclass(frozen=True)
class Prunable:
    """A run whose journal may go: its key, when it ended, when it was last written."""

    run: str
    ended_at: float
    last_write: float


@dataclass(frozen=True)
class Kept:
    """Why a run's journal stays (one of the reasons above), and what was wrong with it."""

    reason: str
    detail: str = ""


class JournalHolder(Protocol):
    """What a controller's sink says about a run's journal (see ``Sink.hold_journal``)."""

    def hold_journal(self, run_key: str) -> bool: ...

    def release_journal(self, run_key: str) -> None: ...


def open_runs(state_dir: str | os.PathLike[str]) -> int:
    """A descriptor of ``state_dir/runs``, never through a symlink (``OSError``, ``ELOOP``
    or ``ENOTDIR``, for one; ``FileNotFoundError`` when there is none)."""
    return os.open(Path(state_dir) / "runs",
                   os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)


def run_dirs(runs_fd: int) -> list[str]:
    """The run keys with a directory (not a symlink) in ``runs``, sorted."""
    return sorted(e.name for e in os.scandir(runs_fd)
                  if paths.is_run_key(e.name) and e.is_dir(follow_symlinks=False))


def moved_dirs(runs_fd: int) -> list[str]:
    """The directories a prune moved aside and has not deleted yet (never a symlink)."""
    return sorted(e.name for e in os.scandir(runs_fd)
                  if e.name.startswith(MOVED) and paths.is_run_key(e.name[len(MOVED):])
                  and e.is_dir(follow_symlinks=False))


def examine(state_dir: str | os.PathLike[str], key: str, cutoff: float) -> Prunable | Kept:
    """Whether ``key``'s journal may go (see the module docstring), not written to since
    ``cutoff`` (``time.time()`` seconds). Reads only."""
    run = RunPaths.of(state_dir, key)
    try:
        if not stat.S_ISDIR(os.lstat(run.root).st_mode):
            return Kept(NOT_A_RUN)
    except FileNotFoundError:
        return Kept(GONE)
    if _checkpointed(Path(state_dir), key):
        return Kept(RESUMABLE)
    try:
        written = _last_write(run.root)
    except FileNotFoundError:
        return Kept(GONE)
    except OSError as exc:
        return Kept(DAMAGED, f"{run.root}: {exc.strerror or exc}")
    if written is None:
        return Kept(NOT_A_RUN)
    if written > cutoff:
        return Kept(RECENT)
    try:
        end = last_line(run.stream("events"))
        state, _ = shipping(run)
    except (DamagedFile, JournalError, OSError) as exc:
        return Kept(DAMAGED, str(exc))
    if end is None or end.record.get("event") != "end":
        return Kept(OPEN)
    if state == "journal only":
        return Kept(JOURNAL_ONLY)
    if state not in ("shipped", "unshipped"):
        return Kept(BEHIND)
    ended = end.record.get("wall_time")
    return Prunable(key, float(ended) if isinstance(ended, int | float) else written, written)


def _checkpointed(state_dir: Path, key: str) -> bool:
    """Anything at the name of one of ``key``'s checkpoints, set aside or not, in either
    format (a damaged one too: the controller says what is wrong with it)."""
    return any(os.path.lexists(path) for pair in checkpoint_places(state_dir / "runs", key)
               for path in pair)


def _last_write(root: Path) -> float | None:
    """The newest ``mtime`` of the files and folders in a run's directory (the shipped
    mark aside: a controller's start makes it, nothing is written); None without a
    ``meta.json`` (a directory no journal was begun in)."""
    newest, meta = None, False
    with os.scandir(root) as entries:
        for entry in entries:
            if entry.name == SHIPPED:
                continue
            meta = meta or entry.name == "meta.json"
            mtime = entry.stat(follow_symlinks=False).st_mtime
            newest = mtime if newest is None else max(newest, mtime)
    return newest if meta else None


def move_runs(state_dir: str | os.PathLike[str], keys: list[str], cutoff: float, *,
              held: Callable[[str], bool] = lambda key: False,
              sink: JournalHolder | None = None) -> tuple[list[Prunable], dict[str, Kept]]:
    """Move aside (see :data:`MOVED`) the journals of ``keys`` that may go now: each
    looked at again (:func:`examine`) while ``held(key)`` is false and ``sink`` (a
    controller's) holds it away from the run's opening. Not fsynced: the caller fsyncs
    ``runs`` before it deletes any (a rename lost to a crash leaves the run whole)."""
    moved: list[Prunable] = []
    kept: dict[str, Kept] = {}
    runs_fd = open_runs(state_dir)
    try:
        for key in keys:
            if not paths.is_run_key(key):
                kept[key] = Kept(NOT_A_RUN)
                continue
            if held(key) or (sink is not None and not sink.hold_journal(key)):
                kept[key] = Kept(HELD)
                continue
            try:
                found = examine(state_dir, key, cutoff)
                if isinstance(found, Prunable):
                    found = _move(runs_fd, key) or found
            finally:
                if sink is not None:
                    sink.release_journal(key)
            if isinstance(found, Prunable):
                moved.append(found)
            else:
                kept[key] = found
    finally:
        os.close(runs_fd)
    return moved, kept


def _move(runs_fd: int, key: str) -> Kept | None:
    """Rename ``runs/key`` to its :data:`MOVED` name, if it is still a directory (not a
    symlink put there since it was looked at) and that name is free; why not, if not."""
    try:
        if not stat.S_ISDIR(os.stat(key, dir_fd=runs_fd, follow_symlinks=False).st_mode):
            return Kept(GONE)
        there = _mode(MOVED + key, runs_fd)
        if there is not None:  # an interrupted prune's: the next one finishes it
            return Kept(FAILED, f"{MOVED}{key} is in the way " + (
                "(the next prune removes it)" if stat.S_ISDIR(there) else
                "(not a directory a prune moved aside: remove it by hand)"))
        os.rename(key, MOVED + key, src_dir_fd=runs_fd, dst_dir_fd=runs_fd)
    except FileNotFoundError:
        return Kept(GONE)
    except OSError as exc:
        return Kept(FAILED, f"cannot move it aside: {exc}")
    return None


def _mode(name: str, dir_fd: int) -> int | None:
    """The ``st_mode`` of ``name`` (a symlink's own), None if there is nothing there."""
    try:
        return os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode
    except FileNotFoundError:
        return None


def tree_size(runs_fd: int, name: str) -> int:
    """Bytes in the files under ``runs/name`` (symlinks not followed)."""
    total = 0
    with contextlib.suppress(FileNotFoundError):
        for _, _, files, fd in os.fwalk(name, dir_fd=runs_fd, follow_symlinks=False):
            for file in files:
                with contextlib.suppress(FileNotFoundError):
                    total += os.stat(file, dir_fd=fd, follow_symlinks=False).st_size
    return total


def remove_moved(runs_fd: int, name: str) -> int:
    """Delete a directory moved aside (:func:`moved_dirs`), never following a symlink (one
    is unlinked, never entered); its files' bytes. ``OSError`` when it cannot be (what is
    left stays hidden, for the next prune to finish); one already gone is 0."""
    if not name.startswith(MOVED):
        raise ValueError(f"not a directory moved aside by a prune: {name!r}")
    size = 0
    for _, dirs, files, fd in os.fwalk(name, topdown=False, dir_fd=runs_fd,
                                       follow_symlinks=False):
        for entry in (*files, *dirs):  # (a symlink to a directory is among the dirs)
            with contextlib.suppress(FileNotFoundError):
                st = os.stat(entry, dir_fd=fd, follow_symlinks=False)
                if stat.S_ISDIR(st.st_mode):
                    os.rmdir(entry, dir_fd=fd)
                else:
                    os.unlink(entry, dir_fd=fd)
                    size += st.st_size
    try:
        os.rmdir(name, dir_fd=runs_fd)
    except FileNotFoundError:
        return 0
    return size


@contextlib.contextmanager
def gate(state_dir: str | os.PathLike[str], wait_s: float,
         on_wait: Callable[[], None] | None = None) -> Iterator[str | None]:
    """Hold ``state_dir``'s :data:`GATE`, waiting up to ``wait_s`` for whoever holds it
    (``on_wait`` is called once if it has to wait); yields None once held, else why it
    is not (held past ``wait_s``, or it cannot be locked: its filesystem has no locks,
    or the file cannot be made)."""
    try:
        fd = paths.open_private(Path(state_dir) / GATE, os.O_RDWR)
    except OSError as exc:
        yield f"cannot open {Path(state_dir) / GATE}: {exc}"
        return
    try:
        deadline = time.monotonic() + wait_s
        why: str | None = None
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if on_wait is not None:
                    on_wait()
                    on_wait = None
                if time.monotonic() >= deadline:
                    why = (f"{Path(state_dir) / GATE} was held for over {wait_s:g} s (an "
                           "'lrctl prune' at work)")
                    break
                time.sleep(0.02)  # (flock has no timeout of its own)
            except OSError as exc:
                why = f"cannot lock {Path(state_dir) / GATE}: {exc}"
                break
        yield why
    finally:
        os.close(fd)  # (the lock goes with it)


def controller_holds(state_dir: str | os.PathLike[str]) -> bool:
    """Whether a controller serves from ``state_dir`` now (it holds ``controller.lock``
    for its life). Asked under :func:`gate`, so that none takes it meanwhile; a lock
    that cannot be tried (a filesystem without locks) counts as held."""
    try:
        fd = os.open(Path(state_dir) / paths.STATE_LOCK,
                     os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return True  # (EWOULDBLOCK: a controller's; anything else: cannot tell)
    finally:
        os.close(fd)  # (a lock taken here goes with it)
    return False
