"""Durable, atomic per-run checkpoints of controller sessions.

A checkpoint is written to a temporary file, fsynced, renamed over the old one
and the directory fsynced, so a crash leaves either the old or the new file,
never half of one. The body carries its own sha256: a file damaged on disk is
moved aside and reported, never loaded into a policy.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import itertools
import json
import logging
import math
import os
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .._parallel import in_parallel
from ..paths import ensure_private_dir, is_run_key, read_regular
from ._packed import pack, unpack
from .held_dir import HeldDir

__all__ = ["FORMAT", "PreparedWrite", "StateStore", "checkpoint_places"]

# Format 2 packs long float lists (see _packed), in ``<key>.ckpt``: a controller of an
# earlier version reads only ``<key>.json`` (format 1) and would take a format-2 file it
# found there for a damaged one. Format-1 files are still read; a run's next checkpoint
# replaces its ``.json``.
FORMAT = 2
_READABLE = (1, 2)
SUFFIX = ".ckpt"
LEGACY_SUFFIX = ".json"
DETACHED = ".detached"  # (not a run key: those start with a letter or digit)
MAX_STATE_BYTES = 16 << 20
_TMP_IDS = itertools.count()  # temporary files of prepared writes: one name each

log = logging.getLogger("lrctl.daemon")


def checkpoint_places(runs_dir: Path, key: str) -> list[tuple[Path, Path]]:
    """Where ``key``'s checkpoint can be, in either format: (where a start restores it,
    where it is set aside in ``runs/.detached/``). The one rule ``lrctl runs --all`` and
    ``lrctl prune`` look by too."""
    return [(runs_dir / f"{key}{suffix}", runs_dir / DETACHED / f"{key}{suffix}")
            for suffix in (SUFFIX, LEGACY_SUFFIX)]


def _write_all(fd: int, data: bytes) -> None:
    """All of ``data`` to ``fd``; a disk that takes part of it and then no more raises
    (``ENOSPC``) here, so that no short file is ever renamed over a good checkpoint."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _canonical(state: Any) -> bytes:
    return json.dumps(state, sort_keys=True, separators=(",", ":"),
                      allow_nan=False).encode("utf-8")


@dataclass(frozen=True)
class PreparedWrite:
    """A checkpoint written but not yet durable nor in place (see :meth:`StateStore.prepare`);
    it owns its two descriptors until :meth:`StateStore.complete` or ``discard``."""

    key: str
    tmp: Path
    final: Path
    fd: int
    dir_fd: int


class StateStore:
    """Checkpoints under ``<state_dir>/runs/<run key>.ckpt`` (``.json``: an earlier
    version's, read until replaced)."""

    def __init__(self, state_dir: str | os.PathLike[str]) -> None:
        self.dir = Path(state_dir) / "runs"
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        # Checkpoints of runs evicted without their hook (a training process killed): a
        # start does not restore them; a hello for one brings it back (see load).
        self.detached_dir = self.dir / DETACHED
        # Why the state dir is not this controller's to write now (another one started on
        # it after it was deleted: see state_dir.py), or None. Nothing is written, moved
        # or removed there meanwhile: the open runs go on from memory.
        self.foreign: str | None = None
        # The state dir this store began in, held open: a runs/ deleted and made again in
        # it is still ours; a state dir made again (by another controller, say) is not
        # until the controller made it again itself (refresh).
        self._held = HeldDir(self.dir.parent)

    def refresh(self) -> None:
        """The checkpoint directory was made again by this controller: write there now."""
        self._held.reopen()

    def close(self) -> None:
        """Let the checkpoint directory go (the controller stops); nothing is written after."""
        self._held.close()

    def _not_ours(self) -> str | None:
        """Why nothing may be written into the checkpoint directory now, or None: another
        controller's (:attr:`foreign`), or not the directory this store began with (the
        state dir deleted, and perhaps made again by another controller, before the
        once-a-second check of it: see state_dir.py, then :meth:`refresh`)."""
        if self.foreign is not None:
            return self.foreign
        if not self._held.same():
            return f"{self.dir.parent} is gone or was made again (the state dir deleted)"
        return None

    @property
    def writable(self) -> bool:
        """Whether checkpoints may be written, moved or removed here now."""
        return self._not_ours() is None

    def _ours(self) -> None:
        """Raise (an ``OSError``, which the checkpoints' callers handle) when nothing may be
        written here now (see :meth:`_not_ours`)."""
        why = self._not_ours()
        if why is not None:
            raise OSError(errno.EBUSY, f"not written: {why}")

    def path(self, key: str) -> Path:
        if not is_run_key(key):
            raise ValueError(f"bad run key {key!r}")
        return self.dir / f"{key}{SUFFIX}"

    def legacy_path(self, key: str) -> Path:
        """Where an earlier version kept ``key``'s checkpoint (format 1)."""
        return self.path(key).with_suffix(LEGACY_SUFFIX)

    def detached_path(self, key: str) -> Path:
        return self.detached_dir / self.path(key).name

    def _set_aside(self, key: str) -> list[tuple[Path, Path]]:
        """(where a start restores it, where it is set aside) for either format."""
        self.path(key)  # (checks the key)
        return checkpoint_places(self.dir, key)

    def detach(self, key: str) -> None:
        """Move an evicted run's checkpoint (current: no write in flight) out of what a
        start restores; it is kept ``Limits.detached_keep_s`` from now. Not fsynced: a
        rename lost in a crash leaves it where a start restores it, and the next eviction
        moves it again; so does a failure here."""
        if self._not_ours() is not None:
            return  # (another controller's directory: its own start restores what is there)
        try:
            ensure_private_dir(self.detached_dir, quiet=True)  # (never through a symlink)
            for kept, aside in self._set_aside(key):
                with contextlib.suppress(FileNotFoundError):
                    os.replace(kept, aside)
                    os.utime(aside)
        except OSError as exc:
            log.error("cannot set run %s's checkpoint aside (%s): the next start restores "
                      "it", key, exc)

    def reattach(self, key: str) -> None:
        """A run set aside is back (its hook's hello): its checkpoint returns among those a
        start restores, unless a newer one is there already (then the old one goes)."""
        if self._not_ours() is not None:
            return
        for kept, aside in self._set_aside(key):
            with contextlib.suppress(OSError):  # (none set aside: the usual case)
                if os.path.lexists(kept):
                    os.unlink(aside)
                else:
                    os.replace(aside, kept)

    def prune_detached(self, keep_s: float, now: float | None = None) -> int:
        """Remove the checkpoints of runs detached (untouched) for over ``keep_s`` seconds;
        how many. A run whose hook comes back after that starts afresh."""
        now = time.time() if now is None else now
        if self._not_ours() is not None:
            return 0
        try:  # its entries, never through a symlink planted at its name
            fd = os.open(self.detached_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        except FileNotFoundError:
            return 0
        removed = 0
        try:
            for entry in list(os.scandir(fd)):
                with contextlib.suppress(OSError):
                    st = entry.stat(follow_symlinks=False)
                    if now - st.st_mtime > keep_s:
                        os.unlink(entry.name, dir_fd=fd)
                        removed += 1
        finally:
            os.close(fd)
        return removed

    def _unlink_all(self, key: str) -> bool:
        """Remove ``key``'s checkpoint, in any place; whether there was one (never one
        while the state dir is another controller's)."""
        if self._not_ours() is not None:
            return False
        gone = False
        for path in (p for pair in self._set_aside(key) for p in pair):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
                gone = True
        return gone

    def save(self, key: str, state: dict[str, Any]) -> None:
        self.write(key, self.encode(state))

    @staticmethod
    def encode(state: dict[str, Any]) -> bytes:
        """A checkpoint file's bytes. Line 1: format and checksum; line 2: the body the
        checksum covers. Raises ``ValueError`` for a state JSON cannot hold."""
        body = _canonical(pack(state))
        doc = json.dumps({"format": FORMAT, "sha256": hashlib.sha256(body).hexdigest()},
                         separators=(",", ":")).encode("utf-8")
        data = doc + b"\n" + body + b"\n"
        if len(data) > MAX_STATE_BYTES:  # what read_file refuses is never written
            raise ValueError(f"the run's state takes {len(data)} bytes, more than a "
                             f"checkpoint may hold ({MAX_STATE_BYTES}): its policies keep too "
                             "much (smaller windows, or fewer policies)")
        return data

    def write(self, key: str, data: bytes) -> None:
        """Replace ``key``'s checkpoint with :meth:`encode`'s ``data``, durably (fsync of
        the file and of the directory), at once."""
        self._replace(key, data)
        self._fsync_dir()

    def prepare(self, key: str, data: bytes) -> PreparedWrite:
        """The part of :meth:`write` that takes descriptors, on the caller's (the loop's)
        thread: ``data`` written to a new temporary file, which and the directory stay
        open. :meth:`complete` (on the writer thread) does the fsyncs, the rename and
        closes both, so that thread never opens a descriptor: running out of them is
        met on the loop, which has a spare one and knows what to refuse."""
        self._ours()
        final = self.path(key)
        tmp = final.with_name(f".{final.name}.{os.getpid()}.{next(_TMP_IDS)}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        dir_fd = -1
        try:
            _write_all(fd, data)
            dir_fd = os.open(self.dir, os.O_RDONLY | os.O_CLOEXEC)
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        return PreparedWrite(key, tmp, final, fd, dir_fd)

    def complete(self, prep: PreparedWrite) -> None:
        """Finish :meth:`prepare`'s write durably (on the writer thread); its descriptors
        are closed whatever happens, and a failed write leaves no temporary file."""
        try:
            try:
                os.fsync(prep.fd)
            finally:
                os.close(prep.fd)
            self._ours()  # (prepared before another controller took the directory)
            os.replace(prep.tmp, prep.final)
            with contextlib.suppress(FileNotFoundError):  # an earlier version's, replaced
                self.legacy_path(prep.key).unlink()
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(prep.tmp)
            os.close(prep.dir_fd)
            raise
        try:
            os.fsync(prep.dir_fd)
        finally:
            os.close(prep.dir_fd)

    @staticmethod
    def discard(prep: PreparedWrite) -> None:
        """A prepared write that will not be completed (a shutdown took it back)."""
        for fd in (prep.fd, prep.dir_fd):
            with contextlib.suppress(OSError):
                os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(prep.tmp)

    def open_dir(self) -> int:
        """A descriptor of the checkpoint directory, for :meth:`remove` on another thread."""
        self._ours()
        return os.open(self.dir, os.O_RDONLY | os.O_CLOEXEC)

    def remove(self, key: str, dir_fd: int) -> None:
        """:meth:`delete` with the directory's descriptor from :meth:`open_dir`, which
        is closed here."""
        try:
            if self._unlink_all(key):
                os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    def write_many(self, items: Mapping[str, bytes],
                   deadline: float = math.inf) -> tuple[list[str], dict[str, Exception]]:
        """Several checkpoints at once (a shutdown with many runs): each written, fsynced
        and renamed into place on a pool of threads, so that the fsyncs and renames
        overlap (one by one, a thousand took seconds), then the directory is fsynced once.
        One not done by ``deadline`` (``time.monotonic()``) is left out: its old
        checkpoint stands. Returns the keys written and the failures."""
        keys = list(items)
        results = in_parallel([functools.partial(self._replace, k, items[k]) for k in keys],
                              deadline, workers=32)
        done = [k for k, r in zip(keys, results, strict=True) if r is None]
        errors = {k: r for k, r in zip(keys, results, strict=True) if isinstance(r, Exception)}
        if done:
            try:
                self._fsync_dir()
            except OSError as exc:
                errors.update(dict.fromkeys(done, exc))
                done = []
        return done, errors

    def _replace(self, key: str, data: bytes) -> None:
        """``data`` written and fsynced beside ``key``'s checkpoint, then renamed over it."""
        self._ours()
        final = self.path(key)
        tmp = final.with_name(f".{final.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            try:
                _write_all(fd, data)  # (one write() may take part of it: a full disk)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, final)
            with contextlib.suppress(FileNotFoundError):  # an earlier version's, replaced
                self.legacy_path(key).unlink()
        except BaseException:
            # Names differ per thread: a failed attempt must not leave its file behind.
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

    def delete(self, key: str) -> None:
        if self._unlink_all(key):
            self._fsync_dir()

    def load(self, key: str) -> dict[str, Any] | None:
        """One run's checkpoint (a run evicted after its idle timeout that came back: its
        checkpoint is moved back among those a start restores)."""
        self.reattach(key)
        path = self.path(key)
        if not path.is_file():
            path = self.legacy_path(key)
            if not path.is_file():
                return None
        try:
            return self.read_file(path)
        except (OSError, ValueError) as exc:
            log.error("checkpoint %s is unusable (%s); moved aside as .corrupt", path, exc)
            with contextlib.suppress(OSError):
                os.replace(path, path.with_suffix(".corrupt"))
            return None

    def load_all(self) -> Iterator[tuple[str, dict[str, Any]]]:
        """Every valid checkpoint; damaged ones are renamed ``*.corrupt`` and logged. Called
        once, at the start, under the state dir's lock: the temporary files a crash left
        mid-write (up to a checkpoint's size each) are removed first."""
        for tmp in self.dir.glob(f".*{SUFFIX}.*.tmp"):
            with contextlib.suppress(OSError):
                tmp.unlink()
                log.info("removed %s, a checkpoint write a crash left unfinished", tmp.name)
        paths = {p.stem: p for p in self.dir.glob(f"*{LEGACY_SUFFIX}")}
        paths.update({p.stem: p for p in self.dir.glob(f"*{SUFFIX}")})  # these first
        for key, path in sorted(paths.items()):
            try:
                state = self.read_file(path)
            except (OSError, ValueError) as exc:
                log.error("checkpoint %s is unusable (%s); moved aside as .corrupt", path, exc)
                with contextlib.suppress(OSError):
                    os.replace(path, path.with_suffix(".corrupt"))
                continue
            yield key, state

    @staticmethod
    def read_file(path: Path) -> dict[str, Any]:
        """A checkpoint file's state, checked (format, checksum); ``ValueError`` if not.
        Only a regular file is read (``OSError`` otherwise): a FIFO or a symlink at a
        checkpoint's name must not hang or redirect the controller's start."""
        data = read_regular(path, MAX_STATE_BYTES + 1)
        if len(data) > MAX_STATE_BYTES:
            raise ValueError(f"larger than {MAX_STATE_BYTES} bytes")
        head, sep, rest = data.partition(b"\n")
        if not sep or not rest.endswith(b"\n"):
            raise ValueError("truncated")
        body = rest[:-1]
        meta = json.loads(head)
        if not isinstance(meta, dict) or meta.get("format") not in _READABLE:
            raise ValueError(f"unknown checkpoint format {meta!r:.80}")
        if hashlib.sha256(body).hexdigest() != meta.get("sha256"):
            raise ValueError("checksum mismatch")
        state = json.loads(body, object_hook=unpack) if meta["format"] >= 2 else json.loads(body)
        if not isinstance(state, dict):
            raise ValueError("body is not an object")
        return state

    def _fsync_dir(self) -> None:
        fd = os.open(self.dir, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
