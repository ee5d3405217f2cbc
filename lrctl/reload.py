"""Watch policy files and hand validated new versions to the controller.

Editors save in many ways: a burst of writes, a temp file renamed over the
original (atomic save), a swap or backup file beside it, delete then recreate,
or an edit of the target of a symlink. The watcher observes the *directories*
holding each file and its resolved target, matches events on the exact paths,
and waits for a quiet period (``debounce_s``) before reading, so each of those
ends in one reload of the final content. A file whose content hash did not
change is not reloaded; a deleted file is reported and the current policy keeps
running until the file returns.

The watcher never touches controller state: it calls ``on_change`` from its own
thread with a :class:`ReloadEvent`, and the controller hands that to the thread
that owns its sessions.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer

from .config import MAX_BYTES, ConfigError, PolicyFile, parse_text

__all__ = ["PolicyWatcher", "ReloadEvent", "read_policy_file"]

DEFAULT_DEBOUNCE_S = 0.15


@dataclass(frozen=True)
class ReloadEvent:
    """What a watched file now holds.

    ``status`` is ``"changed"`` (``policy`` is the validated new version),
    ``"invalid"`` (``error`` reads ``file:line: key: message``; keep the old
    policy) or ``"missing"`` (the file is gone; keep the old policy).
    """

    path: str
    status: str
    policy: PolicyFile | None = None
    error: str | None = None
    sha256: str | None = None
    forced: bool = False


def read_policy_file(path: str) -> ReloadEvent:
    """Read and validate ``path`` now."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_BYTES + 1)
    except FileNotFoundError:
        return ReloadEvent(path, "missing", error=f"{path}: file not found")
    except OSError as exc:
        return ReloadEvent(path, "invalid", error=f"{path}: cannot read: {exc.strerror or exc}")
    sha = hashlib.sha256(data).hexdigest()
    if len(data) > MAX_BYTES:
        return ReloadEvent(path, "invalid", error=f"{path}: file larger than {MAX_BYTES} bytes",
                           sha256=sha)
    try:
        policy = parse_text(data.decode("utf-8"), path)
    except UnicodeDecodeError as exc:
        return ReloadEvent(path, "invalid", error=f"{path}: not UTF-8 text ({exc.reason})",
                           sha256=sha)
    except ConfigError as exc:
        return ReloadEvent(path, "invalid", error=str(exc), sha256=sha)
    return ReloadEvent(path, "changed", policy=policy, sha256=policy.sha256)


class _Handler(FileSystemEventHandler):
    def __init__(self, watcher: PolicyWatcher) -> None:
        self._watcher = watcher

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.event_type in ("opened", "closed_no_write"):
            return
        for raw in (event.src_path, event.dest_path):
            if raw:
                self._watcher._touched(os.fsdecode(raw))


class PolicyWatcher:
    """Debounced, validated reloads of a set of policy files.

    ``on_change(event)`` runs on the watcher's thread; it must hand the event
    to the controller's owner thread and return quickly.
    """

    def __init__(self, on_change: Callable[[ReloadEvent], None], *,
                 debounce_s: float = DEFAULT_DEBOUNCE_S,
                 observer_factory: Callable[[], Any] = Observer) -> None:
        self._on_change = on_change
        self._debounce_s = debounce_s
        self._observer = observer_factory()
        self._handler = _Handler(self)
        self._lock = threading.Condition()
        self._files: dict[str, dict[str, Any]] = {}  # watched path -> its bookkeeping
        self._dir_watches: dict[str, Any] = {}  # directory -> ObservedWatch
        self._due: dict[str, tuple[float, bool]] = {}  # path -> (deadline, forced)
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="lrctl-reload", daemon=False)

    # -- lifecycle -----------------------------------------------------------
    def start(self) -> None:
        self._observer.start()
        self._thread.start()

    def stop(self) -> None:
        with self._lock:
            self._stopping = True
            self._lock.notify_all()
        if self._thread.is_alive():
            self._thread.join()
        self._observer.stop()
        if self._observer.is_alive():
            self._observer.join()

    def __enter__(self) -> PolicyWatcher:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- what to watch --------------------------------------------------------
    def watch(self, path: str, sha256: str | None = None) -> None:
        """Watch ``path`` (its version in use has ``sha256``, if known)."""
        path = os.path.abspath(path)
        with self._lock:
            entry = self._files.setdefault(path, {"refs": 0, "sha256": sha256, "dirs": set()})
            entry["refs"] += 1
            if sha256 is not None:
                entry["sha256"] = sha256
            self._refresh_dirs(path, entry)

    def unwatch(self, path: str) -> None:
        path = os.path.abspath(path)
        with self._lock:
            entry = self._files.get(path)
            if entry is None:
                return
            entry["refs"] -= 1
            if entry["refs"] <= 0:
                del self._files[path]
                self._due.pop(path, None)
                self._drop_unused_dirs()

    def watched(self) -> list[str]:
        with self._lock:
            return sorted(self._files)

    def poke(self, path: str) -> None:
        """Reload ``path`` now, even if its content did not change (``lrctl reload``)."""
        path = os.path.abspath(path)
        with self._lock:
            if path in self._files:
                self._due[path] = (time.monotonic(), True)
                self._lock.notify_all()

    # -- internals ------------------------------------------------------------
    def _refresh_dirs(self, path: str, entry: dict[str, Any]) -> None:
        """Watch the file's directory and its resolved target's (symlinks)."""
        wanted = {os.path.dirname(path), os.path.dirname(os.path.realpath(path))}
        entry["dirs"] = wanted
        entry["real"] = os.path.realpath(path)
        for d in wanted:
            if d not in self._dir_watches and os.path.isdir(d):
                self._dir_watches[d] = self._observer.schedule(self._handler, d, recursive=False)
        self._drop_unused_dirs()

    def _drop_unused_dirs(self) -> None:
        used = set().union(*(e["dirs"] for e in self._files.values())) if self._files else set()
        for d in list(self._dir_watches):
            if d not in used:
                with contextlib.suppress(KeyError, OSError):
                    self._observer.unschedule(self._dir_watches.pop(d))

    def _touched(self, event_path: str) -> None:
        event_path = os.path.abspath(event_path)
        with self._lock:
            deadline = time.monotonic() + self._debounce_s
            for path, entry in self._files.items():
                if event_path in (path, entry.get("real")):
                    forced = self._due.get(path, (0.0, False))[1]
                    self._due[path] = (deadline, forced)
                    self._lock.notify_all()

    def _run(self) -> None:
        while True:
            with self._lock:
                while not self._stopping:
                    now = time.monotonic()
                    ready = [p for p, (t, _) in self._due.items() if t <= now]
                    if ready:
                        break
                    wait = min((t for t, _ in self._due.values()), default=now + 3600) - now
                    self._lock.wait(timeout=max(wait, 0.001))
                if self._stopping:
                    return
                batch = [(p, self._due.pop(p)[1]) for p in ready]
            for path, forced in batch:
                self._reload(path, forced)

    def _reload(self, path: str, forced: bool) -> None:
        event = read_policy_file(path)
        with self._lock:
            entry = self._files.get(path)
            if entry is None:
                return
            self._refresh_dirs(path, entry)  # a symlink may now point elsewhere
            if not forced and event.sha256 is not None and event.sha256 == entry["sha256"]:
                return  # same bytes as the version in use: nothing to do
            if event.sha256 is not None:
                entry["sha256"] = event.sha256
        if forced:
            event = ReloadEvent(event.path, event.status, event.policy, event.error,
                                event.sha256, forced=True)
        self._on_change(event)
