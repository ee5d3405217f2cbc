"""Watch policy files and hand validated new versions to the controller.

Editors save in many ways: a burst of writes, a temp file renamed over the
original (atomic save), a swap or backup file beside it, delete then recreate,
or an edit of the target of a symlink. The watcher observes the *directories*
holding each file and its resolved target, matches events on the exact paths,
and waits for a quiet period (``debounce_s``) before reading, so each of those
ends in one reload of the final content. A file whose content hash did not
change is not reloaded; a deleted file is reported and the current policy keeps
running until the file returns.

A directory can be replaced under a watch (``rm -rf`` and ``mkdir``, moved away, a
release symlink such as ``current -> v2`` swapped): its watch then follows the old
directory, or nothing. Every :data:`CHECK_S` the watcher checks that each watched
directory is still the one it watches (device and inode, through symlinks; its watch
still running) and that each file resolves to the same place; where not, it watches
anew and reads the files there again (one reload where their content changed).

The kernel is asked only for events that can change what a watched name holds (a
file created, deleted, moved, or closed after a write): reads and appends through a
held descriptor (a training log beside the policy) wake nothing. The same check stats
each watched file: a change no event announced (a descriptor not yet closed, an
overflowed queue, a network file system) is read within a check.

The watcher never touches controller state: it calls ``on_change`` from its own
thread with a :class:`ReloadEvent`, and the controller hands that to the thread
that owns its sessions.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

from watchdog.events import (
    DirCreatedEvent,
    DirDeletedEvent,
    DirMovedEvent,
    FileClosedEvent,
    FileCreatedEvent,
    FileDeletedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers import Observer

from ._policy_read import ReloadEvent, read_policy_file
from ._watched import changed_since_check, dir_identity, resolve, stat_signature

__all__ = ["PolicyWatcher", "ReloadEvent", "read_policy_file"]

log = logging.getLogger("lrctl.reload")

DEFAULT_DEBOUNCE_S = 0.15
#: A file written without pause (a log-like writer, an edit loop) is still read this
#: long after its first write: the debounce waits for quiet, not for ever.
MAX_DEBOUNCE_S = 2.0
#: A file is read again no sooner than this many times its last read took, after it:
#: parsing, which shares the interpreter with the controller's loop, takes at most a
#: tenth of its time however often a file that parses slowly is rewritten.
READ_SPACING = 9.0
DRAIN_S = 0.05  # the longest the watcher's thread takes events before it looks at reads due
CHECK_S = 1.0  # between checks that the watched directories are still those watched
#: The directory events asked of the kernel (see the module's docstring).
WATCHED_EVENTS = (FileCreatedEvent, DirCreatedEvent, FileDeletedEvent, DirDeletedEvent,
                  FileMovedEvent, DirMovedEvent, FileClosedEvent)


class _Handler(FileSystemEventHandler):
    """Runs on watchdog's dispatcher thread, which holds the observer's lock: it
    only puts the paths on the watcher's inbox and never takes a lock of ours."""

    def __init__(self, inbox: queue.SimpleQueue[str | None]) -> None:
        self._inbox = inbox

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.event_type in ("opened", "closed_no_write"):
            return
        for raw in (event.src_path, event.dest_path):
            if raw:
                self._inbox.put(os.fsdecode(raw))


class PolicyWatcher:
    """Debounced, validated reloads of a set of policy files.

    ``on_change(event)`` runs on the watcher's thread; it must hand the event
    to the controller's owner thread and return quickly.

    Locking, so that no two threads can wait on each other: watchdog's
    dispatcher holds the observer's lock while it calls our handler, so the
    handler takes no lock at all (it feeds :attr:`_inbox`, a lock-free queue
    drained by the watcher's thread). Our bookkeeping is guarded by ``_lock``,
    which is never held while calling into the observer or ``on_change``;
    calls into the observer (schedule/unschedule) are serialised by
    ``_observer_lock``, which the dispatcher never takes. The only nesting is
    ``_observer_lock`` then ``_lock``, briefly, to read the wanted directories.
    """

    def __init__(self, on_change: Callable[[ReloadEvent], None], *,
                 debounce_s: float = DEFAULT_DEBOUNCE_S,
                 observer_factory: Callable[[], Any] = Observer) -> None:
        self._on_change = on_change
        self._debounce_s = debounce_s
        self._observer = observer_factory()
        self._inbox: queue.SimpleQueue[str | None] = queue.SimpleQueue()  # None: wake up
        self._handler = _Handler(self._inbox)
        self._lock = threading.Lock()
        self._observer_lock = threading.Lock()
        self._files: dict[str, dict[str, Any]] = {}  # watched path -> its bookkeeping
        # directory -> (ObservedWatch, its (st_dev, st_ino) when scheduled) (_observer_lock)
        self._dir_watches: dict[str, tuple[Any, tuple[int, int] | None]] = {}
        self._next_check = time.monotonic() + CHECK_S
        self._due: dict[str, tuple[float, bool]] = {}  # path -> (deadline, forced)
        self._burst: dict[str, float] = {}  # path -> its first write since it was read
        self._not_before: dict[str, float] = {}  # path -> when it may be read again
        self._stopping = False
        # A daemon thread: a hung read (a policy path on a dead network mount) must
        # not keep a controller that was told to stop from exiting.
        self._thread = threading.Thread(target=self._run, name="lrctl-reload", daemon=True)

    # -- lifecycle -----------------------------------------------------------
    def start(self) -> None:
        self._observer.start()
        self._thread.start()

    def stop(self, timeout: float | None = None) -> bool:
        """Stop both threads; with ``timeout``, wait at most that long for each.

        Returns False when a thread is still running (it is a daemon thread, so
        it does not keep the process alive).
        """
        with self._lock:
            self._stopping = True
        self._inbox.put(None)
        if self._thread.is_alive():
            self._thread.join(timeout)
        self._observer.stop()
        if self._observer.is_alive():
            self._observer.join(timeout)
        return not (self._thread.is_alive() or self._observer.is_alive())

    def __enter__(self) -> PolicyWatcher:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- what to watch --------------------------------------------------------
    def watch(self, path: str, sha256: str | None = None) -> None:
        """Watch ``path`` for a run whose version in use has ``sha256``, if known.

        Several runs may watch one file; each call takes a reference that
        :meth:`unwatch` gives back.

        Raises OSError when the directory cannot be watched (the inotify limit).
        """
        path = os.path.abspath(path)
        with self._lock:
            entry = self._files.get(path)
            if entry is None:
                entry = self._files[path] = {"refs": 0, "sha256": sha256, "dirs": set(),
                                             "since": time.time()}
                if sha256 is not None:
                    # Read once: a run back from its checkpoint (evicted, or a restart) may
                    # have missed edits while nothing watched the file; the same bytes as
                    # its version are nothing to deliver.
                    self._due.setdefault(path, (time.monotonic() + self._debounce_s, False))
            entry["refs"] += 1
            if sha256 is not None and sha256 != entry["sha256"]:
                # Another run already watches this file and the watcher last saw other
                # bytes: one of them runs a version that is not on disk (the file changed
                # between a hook's read and its hello). Read it again and deliver it
                # whatever it holds; the controller skips runs already on that version.
                entry["sha256"] = None
                self._due[path] = (time.monotonic() + self._debounce_s, False)
            resolve(path, entry)
        self._inbox.put(None)
        try:
            self._sync_observer()
        except OSError:
            with contextlib.suppress(OSError):
                self.unwatch(path)
            raise

    def unwatch(self, path: str) -> None:
        path = os.path.abspath(path)
        with self._lock:
            entry = self._files.get(path)
            if entry is None:
                return
            entry["refs"] -= 1
            if entry["refs"] > 0:
                return
            del self._files[path]
            self._due.pop(path, None)
            self._burst.pop(path, None)
            self._not_before.pop(path, None)
        self._sync_observer()

    def watched(self) -> list[str]:
        with self._lock:
            return sorted(self._files)

    def poke(self, path: str) -> None:
        """Reload ``path`` now, even if its content did not change (``lrctl reload``)."""
        path = os.path.abspath(path)
        with self._lock:
            if path not in self._files:
                return
            self._due[path] = (time.monotonic(), True)
        self._inbox.put(None)

    # -- internals ------------------------------------------------------------
    def _sync_observer(self) -> None:
        """Make the observer watch exactly the directories the watched files need."""
        with self._observer_lock:
            with self._lock:
                wanted = set().union(*(e["dirs"] for e in self._files.values()))
            for d in list(self._dir_watches):
                if d not in wanted:
                    with contextlib.suppress(KeyError, OSError):
                        self._observer.unschedule(self._dir_watches.pop(d)[0])
            for d in sorted(wanted - self._dir_watches.keys()):
                ident = dir_identity(d)
                if ident is not None:
                    self._dir_watches[d] = (self._observer.schedule(
                        self._handler, d, recursive=False, event_filter=WATCHED_EVENTS), ident)

    def _check_dirs(self) -> None:
        """Watch anew the directories replaced since they were watched (or made since
        they were wanted), and read their files again; follow moved symlinks. The file
        system is asked with no lock held: a path on a hung mount must not stall the
        loop thread's ``watch``/``unwatch`` behind it."""
        with self._lock:
            paths = list(self._files)
        reals = {p: os.path.realpath(p) for p in paths}
        wall = time.time()
        stats = {p: stat_signature(p) for p in paths}
        now = time.monotonic()
        with self._lock:
            moved = [p for p, real in reals.items()
                     if p in self._files and resolve(p, self._files[p], real)]
            for p, sig in stats.items():
                entry = self._files.get(p)
                if entry is None or not changed_since_check(entry, sig, wall):
                    continue
                if p not in self._due:  # (one due reads these bytes too: not put off)
                    self._debounce(p, now)
            wanted = set().union(*(e["dirs"] for e in self._files.values()))
        with self._observer_lock:
            watched = dict(self._dir_watches)
        idents = {d: dir_identity(d) for d in wanted | watched.keys()}
        alive = self._live_watches()
        renewed = set()
        with self._observer_lock:
            for d, (watch, ident) in list(self._dir_watches.items()):
                if d in idents and (idents[d] != ident
                                    or (alive is not None and watch not in alive)):
                    del self._dir_watches[d]
                    renewed.add(d)
                    with contextlib.suppress(KeyError, OSError):
                        self._observer.unschedule(watch)
            renewed |= {d for d in wanted - self._dir_watches.keys()
                        if idents.get(d) is not None}
        if not (renewed or moved):
            return
        with contextlib.suppress(OSError):  # (the inotify limit: tried again next check)
            self._sync_observer()
        deadline = time.monotonic() + self._debounce_s
        with self._lock:
            for path, entry in self._files.items():
                if path in moved or entry["dirs"] & renewed:
                    self._due.setdefault(path, (deadline, False))

    def _live_watches(self) -> set[Any] | None:
        """The watches whose emitter thread still runs (watchdog ends it when its directory
        is deleted, and a directory made again may reuse the inode); None when the
        observer does not say."""
        emitters = getattr(self._observer, "emitters", None)
        if emitters is None:
            return None
        return {e.watch for e in list(emitters) if e.is_alive()}

    def _touched(self, event_paths: set[str]) -> None:
        """Watched files (or their symlinks' targets) changed: one pass over the watched
        files, however many events (a storm of a thousand neighbours' events is a lookup
        each, not a scan of every watched file each)."""
        now = time.monotonic()
        with self._lock:
            named: dict[str, list[str]] = {}
            for path, entry in self._files.items():
                for name in {path, entry.get("real") or path}:
                    named.setdefault(name, []).append(path)
            for event_path in event_paths:
                for path in named.get(os.path.abspath(event_path), ()):
                    self._debounce(path, now)

    def _debounce(self, path: str, now: float) -> None:
        """Read ``path`` once it has been quiet a while (``_lock`` held)."""
        forced = self._due.get(path, (0.0, False))[1]
        first = self._burst.setdefault(path, now)
        self._due[path] = (max(min(now + self._debounce_s, first + MAX_DEBOUNCE_S),
                               self._not_before.get(path, 0.0)), forced)

    def _run(self) -> None:
        while True:
            with self._lock:
                if self._stopping:
                    return
                now = time.monotonic()
                ready = [p for p, (t, _) in self._due.items() if t <= now]
                batch = [(p, self._due.pop(p)[1]) for p in ready]
                for p in ready:
                    self._burst.pop(p, None)
                wait = min((t for t, _ in self._due.values()), default=now + 3600) - now
                check = now >= self._next_check and bool(self._files)
                if now >= self._next_check:
                    self._next_check = now + CHECK_S
                wait = min(wait, self._next_check - now)
            if check:
                try:
                    self._check_dirs()
                except Exception:  # (the thread must live on: status says it watches)
                    log.exception("lrctl: checking the watched policy directories failed")
            for path, forced in batch:
                try:
                    self._reload(path, forced)
                except Exception:  # (the thread must live on: every other file is watched)
                    log.exception("lrctl: reloading %s failed", path)
            if batch or check:
                continue  # new events (or the check's reads) may be due: look again first
            try:
                item: str | None = self._inbox.get(timeout=max(wait, 0.001))
            except queue.Empty:
                continue
            # Drain the burst, each path once, for DRAIN_S at most: a storm that fills the
            # inbox as fast as it drains must not keep due reads and checks waiting.
            touched: set[str] = set()
            until = time.monotonic() + DRAIN_S
            while True:
                if item is not None:
                    touched.add(item)
                if time.monotonic() > until:
                    break
                try:
                    item = self._inbox.get_nowait()
                except queue.Empty:
                    break
            self._touched(touched)

    def _reload(self, path: str, forced: bool) -> None:
        with self._lock:
            entry = self._files.get(path)
            if entry is None:
                return
            # A file read again unchanged (a check's look after a write) is not parsed.
            known = None if forced or entry.get("unread") else entry["sha256"]
        began = time.monotonic()
        event = read_policy_file(path, unless=known)
        with self._lock:
            entry = self._files.get(path)
            if entry is None:
                return
            now = time.monotonic()
            self._not_before[path] = now + READ_SPACING * (now - began)
            moved = resolve(path, entry)  # a symlink may now point elsewhere
            # A file still gone, or still unreadable for the same reason, is nothing new
            # (the check's read after the delete's); one readable again is news, whatever
            # it holds (the controller was told it went).
            unread = entry.get("unread")
            entry["unread"] = event.error if event.sha256 is None else None
            if event.sha256 is None:
                same = unread == event.error
            elif event.status == "unchanged":  # (a watch() since the read has its own due)
                same = True
            else:
                same = unread is None and event.sha256 == entry["sha256"]
            if event.sha256 is not None and event.status != "unchanged":
                entry["sha256"] = event.sha256
        if moved:
            with contextlib.suppress(OSError):  # the old directories keep working
                self._sync_observer()
        if same and not forced:
            return  # same bytes as the version in use: nothing to do
        if forced:
            event = ReloadEvent(event.path, event.status, event.policy, event.error,
                                event.sha256, forced=True)
        self._on_change(event)
