"""Durable, atomic per-run checkpoints of controller sessions.

A checkpoint is written to a temporary file, fsynced, renamed over the old one
and the directory fsynced, so a crash leaves either the old or the new file,
never half of one. The body carries its own sha256: a file damaged on disk is
moved aside and reported, never loaded into a policy.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import queue
import threading
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from .._parallel import in_parallel
from ..paths import is_run_key

__all__ = ["FORMAT", "CheckpointWriter", "StateStore"]

FORMAT = 1
MAX_STATE_BYTES = 16 << 20

log = logging.getLogger("lrctl.daemon")


def _canonical(state: Any) -> bytes:
    return json.dumps(state, sort_keys=True, separators=(",", ":"),
                      allow_nan=False).encode("utf-8")


class StateStore:
    """Checkpoints under ``<state_dir>/runs/<run key>.json``."""

    def __init__(self, state_dir: str | os.PathLike[str]) -> None:
        self.dir = Path(state_dir) / "runs"
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)

    def path(self, key: str) -> Path:
        if not is_run_key(key):
            raise ValueError(f"bad run key {key!r}")
        return self.dir / f"{key}.json"

    def save(self, key: str, state: dict[str, Any]) -> None:
        self.write(key, self.encode(state))

    @staticmethod
    def encode(state: dict[str, Any]) -> bytes:
        """A checkpoint file's bytes. Line 1: format and checksum; line 2: the body the
        checksum covers. Raises ``ValueError`` for a state JSON cannot hold."""
        body = _canonical(state)
        doc = json.dumps({"format": FORMAT, "sha256": hashlib.sha256(body).hexdigest()},
                         separators=(",", ":")).encode("utf-8")
        return doc + b"\n" + body + b"\n"

    def write(self, key: str, data: bytes) -> None:
        """Replace ``key``'s checkpoint with :meth:`encode`'s ``data``, durably (fsync of
        the file and of the directory). Safe from one thread other than the loop's."""
        self._replace(key, data)
        self._fsync_dir()

    def write_many(self, items: Mapping[str, bytes],
                   deadline: float = math.inf) -> tuple[list[str], dict[str, Exception]]:
        """Several checkpoints at once (a shutdown with many runs): each written, fsynced
        and renamed into place on a pool of threads, so that the fsyncs and renames
        overlap (one by one, a thousand took seconds), then the directory is fsynced once.
        One not done by ``deadline`` (``time.monotonic()``) is left out: its old
        checkpoint stands. Returns the keys written and the failures."""
        keys = list(items)
        results = in_parallel([lambda k=k: self._replace(k, items[k]) for k in keys],
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
        final = self.path(key)
        tmp = final.with_name(f".{final.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            try:
                os.write(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, final)
        except BaseException:
            # Names differ per thread: a failed attempt must not leave its file behind.
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

    def delete(self, key: str) -> None:
        try:
            self.path(key).unlink()
        except FileNotFoundError:
            return
        self._fsync_dir()

    def load(self, key: str) -> dict[str, Any] | None:
        """One run's checkpoint (a run evicted after its idle timeout that came back)."""
        path = self.path(key)
        if not path.is_file():
            return None
        try:
            return self._read(path)
        except (OSError, ValueError) as exc:
            log.error("checkpoint %s is unusable (%s); moved aside as .corrupt", path, exc)
            with contextlib.suppress(OSError):
                os.replace(path, path.with_suffix(".corrupt"))
            return None

    def load_all(self) -> Iterator[tuple[str, dict[str, Any]]]:
        """Every valid checkpoint; damaged ones are renamed ``*.corrupt`` and logged."""
        for path in sorted(self.dir.glob("*.json")):
            key = path.stem
            try:
                state = self._read(path)
            except (OSError, ValueError) as exc:
                log.error("checkpoint %s is unusable (%s); moved aside as .corrupt", path, exc)
                with contextlib.suppress(OSError):
                    os.replace(path, path.with_suffix(".corrupt"))
                continue
            yield key, state

    @staticmethod
    def _read(path: Path) -> dict[str, Any]:
        with open(path, "rb") as f:
            data = f.read(MAX_STATE_BYTES + 1)
        if len(data) > MAX_STATE_BYTES:
            raise ValueError(f"larger than {MAX_STATE_BYTES} bytes")
        head, sep, rest = data.partition(b"\n")
        if not sep or not rest.endswith(b"\n"):
            raise ValueError("truncated")
        body = rest[:-1]
        meta = json.loads(head)
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise ValueError(f"unknown checkpoint format {meta!r:.80}")
        if hashlib.sha256(body).hexdigest() != meta.get("sha256"):
            raise ValueError("checksum mismatch")
        state = json.loads(body)
        if not isinstance(state, dict):
            raise ValueError("body is not an object")
        return state

    def _fsync_dir(self) -> None:
        fd = os.open(self.dir, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class CheckpointWriter:
    """Writes checkpoints on a thread of its own, in the order submitted, so that their
    fsyncs (milliseconds each on a busy disk, two per checkpoint) never stall the loop.

    The loop encodes the state (:meth:`StateStore.encode`) and submits the bytes; each
    finished write goes on :attr:`done` as ``(key, token, error)``, then ``notify`` (the
    loop's wake-up) is called: only the loop touches sessions.
    """

    def __init__(self, store: StateStore, notify: Callable[[], None]) -> None:
        self.store = store
        self.notify = notify
        self.done: queue.SimpleQueue[tuple[str, Any, Exception | None]] = queue.SimpleQueue()
        self._jobs: queue.SimpleQueue[tuple[str, bytes, Any] | threading.Event | None] = (
            queue.SimpleQueue())
        self._thread: threading.Thread | None = None

    def submit(self, key: str, data: bytes, token: Any) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="lrctl-checkpoints",
                                            daemon=True)
            self._thread.start()
        self._jobs.put((key, data, token))

    def wait(self) -> None:
        """Return once every write submitted so far is finished (and on :attr:`done`)."""
        if self._thread is not None:
            finished = threading.Event()
            self._jobs.put(finished)
            finished.wait()

    def stop(self) -> None:
        """Finish what was submitted, then end the thread."""
        if self._thread is not None:
            self._jobs.put(None)
            self._thread.join()
            self._thread = None

    def cancel(self) -> list[tuple[str, Any]]:
        """Take back the writes not started yet (a shutdown writes them all at once, in
        parallel, from the latest state); returns their ``(key, token)``."""
        dropped = []
        while True:
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                return dropped
            if isinstance(job, threading.Event):
                job.set()
            elif job is not None:
                dropped.append((job[0], job[2]))

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            if isinstance(job, threading.Event):
                job.set()
                continue
            key, data, token = job
            error: Exception | None = None
            try:
                self.store.write(key, data)
            except Exception as exc:  # reported to the loop, which logs it; the thread goes on
                error = exc
            self.done.put((key, token, error))
            with contextlib.suppress(OSError):
                self.notify()
