"""The durable, append-only journal of one run, and how to read it back.

Layout of ``<state_dir>/runs/<run_key>/``::

    meta.json           the run's RunInfo and where its MLflow records go (atomic rewrite)
    decisions.jsonl     one decision per line (fsynced by the sink's ``commit()``)
    events.jsonl        policy versions, reloads and the run's end (fsynced likewise)
    metrics.jsonl       sampled metric points (flushed per line, fsynced at close)
    policies/<sha>.yaml every policy text the run used
    cursor.json         what MLflow has acknowledged, per stream (written by the shipper)

Every line of a stream carries ``seq`` (1, 2, ... per stream), so a reader that
remembers ``(seq, byte offset)`` of the last line it handled can resume exactly
there after a crash: that is what makes replay into MLflow idempotent.

The writer is used from the controller's owner thread only; readers (the MLflow
worker, the CLI) only ever read complete lines, so a line being appended is
simply not seen yet.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from .._parallel import NOT_DONE, in_parallel
from ..paths import is_run_key, open_regular
from ._run_files import (
    DamagedFile,
    atomic_write_json,
    atomic_write_text,
    fsync_path,
    open_append,
    open_new,
    private_dirs,
    read_json,
)

__all__ = [
    "DISCARDED",
    "STREAMS",
    "DamagedFile",
    "JournalError",
    "JournalLine",
    "RunPaths",
    "StreamWriter",
    "atomic_write_json",
    "atomic_write_text",
    "check_run_key",
    "discarded_end",
    "find_run_paths",
    "fsync_path",
    "last_line",
    "list_run_keys",
    "private_dirs",
    "read_json",
    "read_lines",
    "sync_all",
    "tail_records",
]

#: The streams of a run, in the order the shipper acknowledges them.
STREAMS = ("metrics", "decisions", "events")
# The ``outcome`` of the ``end`` event of a run that ended before its first observation
# (see AuditSink.discard_run): no MLflow run, not listed by ``lrctl runs --all``.
DISCARDED = "discarded"
_TAIL_CHUNK = 64 * 1024


class JournalError(RuntimeError):
    """A journal file is unreadable in a way that replay cannot repair."""


def check_run_key(run_key: str) -> str:
    """``run_key`` names a directory: refuse anything that could escape the state dir."""
    if not is_run_key(run_key):
        raise ValueError(
            "run_key must be 1-96 letters, digits or ._- starting with a letter or digit, "
            f"but got {run_key!r}")
    return run_key


@dataclass(frozen=True)
class RunPaths:
    """The files of one run's journal directory."""

    root: Path

    @classmethod
    def of(cls, state_dir: str | os.PathLike[str], run_key: str) -> RunPaths:
        return cls(Path(state_dir) / "runs" / check_run_key(run_key))

    @property
    def run_key(self) -> str:
        return self.root.name

    @property
    def meta(self) -> Path:
        return self.root / "meta.json"

    @property
    def cursor(self) -> Path:
        return self.root / "cursor.json"

    @property
    def policies(self) -> Path:
        return self.root / "policies"

    def stream(self, name: str) -> Path:
        if name not in STREAMS:
            raise ValueError(f"unknown journal stream {name!r}; expected one of {STREAMS}")
        return self.root / f"{name}.jsonl"

    def policy_file(self, sha256: str) -> Path:
        if not re.fullmatch(r"[0-9a-f]{64}", sha256):
            raise ValueError(f"policy sha256 must be 64 hex digits, but got {sha256!r}")
        return self.policies / f"{sha256}.yaml"


def find_run_paths(run_key: str, roots: Sequence[str | os.PathLike[str]]) -> RunPaths:
    """``run_key``'s files in the first of ``roots`` (state directories) that has them;
    the first root's when none has (yet)."""
    for root in roots:
        found = RunPaths.of(root, run_key)
        if found.meta.exists():
            return found
    return RunPaths.of(roots[0], run_key)


def list_run_keys(state_dir: str | os.PathLike[str]) -> list[str]:
    """Run keys with a journal under ``state_dir``, sorted."""
    runs = Path(state_dir) / "runs"
    try:
        entries = list(os.scandir(runs))
    except FileNotFoundError:
        return []
    return sorted(e.name for e in entries
                  if e.is_dir() and is_run_key(e.name) and os.path.exists(
                      os.path.join(e.path, "meta.json")))


@dataclass(frozen=True)
class JournalLine:
    seq: int
    end: int  # byte offset just after this line: where a reader resumes
    record: dict[str, Any]


def open_stream(path: Path) -> IO[bytes]:
    """A stream's file, to read: a regular file only, never through a symlink, never
    blocking (a FIFO planted at its name would hang the reader for ever): anything else
    is a :class:`JournalError`. ``FileNotFoundError`` when there is none."""
    try:
        return os.fdopen(open_regular(path), "rb")
    except FileNotFoundError:
        raise
    except OSError as exc:
        if exc.errno in (errno.EINVAL, errno.ELOOP):
            raise JournalError(f"{path}: not a regular file") from None
        raise


def read_lines(path: Path, offset: int = 0, limit: int | None = None) -> Iterator[JournalLine]:
    """Complete lines of a stream from byte ``offset`` on (at most ``limit``)."""
    try:
        f = open_stream(path)
    except FileNotFoundError:
        return
    try:
        f.seek(offset)
        pos = offset
        for count, raw in enumerate(f, start=1):
            if not raw.endswith(b"\n"):
                return  # being appended, or torn by a crash: not part of the journal yet
            pos += len(raw)
            try:
                record = json.loads(raw)
                seq = int(record["seq"])
            except (ValueError, KeyError, TypeError) as exc:
                raise JournalError(f"{path}: bad line ending at byte {pos}: {exc}") from exc
            yield JournalLine(seq, pos, record)
            if limit is not None and count >= limit:
                return
    finally:
        f.close()


def discarded_end(paths: RunPaths) -> JournalLine | None:
    """The ``end`` event of a run discarded before its first step, if that is the last
    thing its journal says (a key resumed after it is a run again)."""
    end = last_line(paths.stream("events"))
    if end is None or end.record.get("event") != "end" or end.record.get(
            "outcome") != DISCARDED:
        return None
    return end


def last_line(path: Path) -> JournalLine | None:
    """The last complete line of a stream, reading only the file's tail."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return None
    start = max(0, size - _TAIL_CHUNK)
    while True:
        with open_stream(path) as f:
            f.seek(start)
            chunk = f.read(size - start)
        end = chunk.rfind(b"\n")
        if end < 0:
            if start == 0:
                return None
            start = max(0, start - _TAIL_CHUNK)
            continue
        begin = chunk.rfind(b"\n", 0, end) + 1
        if begin == 0 and start > 0:
            start = max(0, start - _TAIL_CHUNK)  # the last line is longer than the chunk
            continue
        try:
            record = json.loads(chunk[begin:end + 1])
            return JournalLine(int(record["seq"]), start + end + 1, record)
        except (ValueError, KeyError, TypeError) as exc:  # (a line no writer of ours wrote)
            raise JournalError(f"{path}: bad last line: {exc}") from exc


def tail_records(path: Path, max_bytes: int = 1 << 18) -> list[dict[str, Any]]:
    """The complete lines within the last ``max_bytes`` of a stream, oldest first."""
    try:
        with open_stream(path) as f:
            size = f.seek(0, os.SEEK_END)
            start = max(0, size - max_bytes)
            f.seek(start)
            chunk = f.read(size - start)
    except FileNotFoundError:
        return []
    lines = chunk.split(b"\n")
    if start > 0:
        lines = lines[1:]  # the first is cut
    out = []
    for line in lines[:-1]:  # the last: after the final newline (empty, or torn)
        with contextlib.suppress(ValueError):
            record = json.loads(line)
            if isinstance(record, dict):
                out.append(record)
    return out


class StreamWriter:
    """Appends numbered JSON lines to one stream.

    Opening repairs a crash: a torn last line (no newline) is cut off, since it
    was never reported durable, and numbering continues after the last whole line.
    An append is all or nothing: a write the disk refuses part of (``ENOSPC``) is cut
    back to the last whole line before the error is raised (or, if even that fails,
    before the next append), and its ``seq`` is not taken; so a full disk never leaves
    half a line, a line twice or a ``seq`` twice.
    ``fsync`` says whether each append is fsynced; ``fsync_fd`` is what fsyncs a file
    descriptor (``os.fsync``; tests count or gate it).
    """

    def __init__(self, path: Path, *, fsync: bool,
                 fsync_fd: Callable[[int], None] = os.fsync) -> None:
        self.path = path
        self.fsync = fsync
        self._fsync_fd = fsync_fd
        self.unsynced = 0  # lines appended since the last fsync
        private_dirs(path.parent)
        # Unbuffered: a buffered writer keeps what a full disk refused and writes it
        # later, in front of the next line. Readable: a deleted file is written back from
        # it. Private (0600), and never through a symlink: a link planted in the run's
        # directory would have had its target cut and appended to.
        self._file: IO[bytes] = open_append(path)
        last = last_line(path)
        if os.fstat(self._file.fileno()).st_size != (last.end if last else 0):
            os.ftruncate(self._file.fileno(), last.end if last else 0)
        self.seq = last.seq if last else 0
        self.offset = last.end if last else 0
        self._torn = False  # a failed write may have left bytes after ``offset``

    def append(self, record: Mapping[str, Any], *, durable: bool | None = None) -> JournalLine:
        """Write ``record`` with the next ``seq``; fsync if the stream (or ``durable``) says so."""
        seq = self.seq + 1
        line = {"seq": seq, **record}
        data = (json.dumps(line, separators=(",", ":"), allow_nan=False) + "\n").encode()
        self._write(data)
        self.seq = seq
        self.offset += len(data)
        self.unsynced += 1
        if self.fsync if durable is None else durable:
            self.sync()
        return JournalLine(seq, self.offset, line)

    def _write(self, data: bytes) -> None:
        """Append ``data`` whole, or raise with the file cut back to ``offset``."""
        if self._torn:
            self._cut_back()
        view, done = memoryview(data), 0
        try:
            while done < len(data):
                n = self._file.write(view[done:])
                if not n:
                    raise OSError(errno.EIO, f"short write to {self.path}")
                done += n
        except OSError:
            self._torn = True
            with contextlib.suppress(OSError):
                self._cut_back()
            raise

    def _cut_back(self) -> None:
        os.ftruncate(self._file.fileno(), self.offset)
        self._torn = False

    def restore_file(self) -> bool:
        """If the file was deleted (or replaced) under us, write it back, whole, from the
        descriptor we still hold, and append there from now on. True if it was."""
        held = os.fstat(self._file.fileno())
        try:
            st = os.stat(self.path)
            if (st.st_dev, st.st_ino) == (held.st_dev, held.st_ino):
                return False
        except FileNotFoundError:
            pass
        private_dirs(self.path.parent)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        try:
            with open_new(tmp) as out:
                pos = 0
                while pos < self.offset:
                    chunk = os.pread(self._file.fileno(), min(1 << 20, self.offset - pos), pos)
                    if not chunk:
                        break
                    out.write(chunk)
                    pos += len(chunk)
                out.flush()
                self._fsync_fd(out.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink()  # (a full disk: the part written would only hold the space)
            raise
        old, self._file = self._file, open_append(self.path)
        old.close()
        self.unsynced, self._torn = 0, False
        return True

    def sync(self) -> None:
        """fsync what was appended since the last one (nothing to do: no fsync)."""
        if self.unsynced and not self._file.closed:
            self._fsync_fd(self._file.fileno())
            self.unsynced = 0

    def dup_fd(self) -> int:
        """A descriptor of the open file for another thread to fsync and close (see
        :mod:`lrctl.sinks._syncer`); appends after it are not covered by that fsync."""
        return os.dup(self._file.fileno())

    def close(self, sync: bool = True) -> None:
        """Close, fsynced unless ``sync`` is False (a shutdown past its deadline)."""
        if not self._file.closed:
            if sync:
                self.sync()
            self._file.close()


def sync_all(writers: Iterable[StreamWriter],
             deadline: float = math.inf) -> tuple[list[OSError], int]:
    """fsync many streams at once (a shutdown with many runs): the fsyncs overlap. A stream
    not synced by ``deadline`` (``time.monotonic()``) is left to the OS to write back.
    Returns the failures and how many streams were left."""
    pending = [w for w in writers if w.unsynced]
    results = in_parallel([w.sync for w in pending], deadline)
    return [r for r in results if isinstance(r, OSError)], results.count(NOT_DONE)
