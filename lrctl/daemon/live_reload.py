"""Live policy editing: watched files → validated new versions applied to the runs using them.

One :class:`~lrctl.reload.PolicyWatcher` watches every file a session runs (and
``--policies DIR``). Its thread only puts events on a queue and wakes the loop; the
loop applies them at once (:meth:`LiveReload.drain`), not at the next observation,
so the new LRs are pushed to the hook as an ``lr`` frame with ``s = -1``.

Each run's reload is journaled before its hook hears of it (a policy copy and a
journal line, an fsync or two), so a file that many runs share is applied a slice of
loop time at a time (:data:`RELOAD_SLICE_S`), each slice followed by a pause as long,
in which the loop serves what the other runs send: one edit of a file 100 runs used
held every run's answers for most of a second, and an edit storm kept them waiting.
Versions apply in the order they came; a valid version supersedes the runs still
waiting for an older one, which go straight to it.
"""

from __future__ import annotations

import logging
import os
import queue
import time
from collections import deque
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from ..config import ConfigError
from ..reload import DEFAULT_DEBOUNCE_S, PolicyWatcher, ReloadEvent, read_policy_file
from .session import Session

__all__ = ["LiveReload", "Publish"]

log = logging.getLogger("lrctl.daemon")

#: Journal a decision made off the hot path, checkpoint its run and push it to its hook;
#: the flag says it is a reload (the sink records the new policy version).
Publish = Callable[[Session, dict[str, Any], bool], None]
#: Loop time one wake-up spends applying new versions; the runs left wait for the next.
RELOAD_SLICE_S = 0.01


class LiveReload:
    """Watches the policy files of the runs in ``sessions`` and applies their edits.

    ``save`` checkpoints a run; ``wake`` wakes the loop (from the watcher's thread).
    With ``watch=False`` nothing is watched, and only :meth:`reload_now` applies edits.
    """

    def __init__(self, sessions: Mapping[str, Session], *, publish: Publish,
                 save: Callable[[str], None], wake: Callable[[], None], watch: bool = True,
                 debounce_s: float = DEFAULT_DEBOUNCE_S) -> None:
        self.sessions = sessions
        self._publish = publish
        self._save = save
        self._wake = wake
        self.watcher = PolicyWatcher(self._on_event, debounce_s=debounce_s) if watch else None
        self._events: queue.SimpleQueue[ReloadEvent] = queue.SimpleQueue()
        # Versions being applied, in order: (event, its file, the keys still to take it).
        self._fanout: deque[tuple[ReloadEvent, str, deque[str]]] = deque()
        self.resume_at = 0.0  # when the next slice may begin (monotonic)
        self._watched: dict[str, str] = {}  # run key -> the path it is watched under
        self.library: dict[str, str | None] = {}  # --policies files -> their error, if any

    def start(self) -> None:
        if self.watcher is not None:
            self.watcher.start()

    def stop(self) -> None:
        if self.watcher is not None and not self.watcher.stop(timeout=1.0):
            log.warning("the policy watcher did not stop within 1 s; leaving it behind")

    def watching(self) -> list[str]:
        return [] if self.watcher is None else self.watcher.watched()

    def errors(self) -> list[str]:
        return [f"policies: {e}" for e in self.library.values() if e]

    def catch_up(self) -> None:
        """Read every watched file once (after a restart: edits made while we were down;
        the same bytes are a no-op)."""
        for path in sorted(set(self._watched.values())):
            self._events.put(read_policy_file(path))

    def _on_event(self, event: ReloadEvent) -> None:
        """Runs on the watcher's thread: hand the event over and wake the loop, nothing else."""
        self._events.put(event)
        self._wake()

    @property
    def applying(self) -> bool:
        """Some runs still wait for a version handed over (see the module docstring)."""
        return bool(self._fanout)

    def drain(self) -> None:
        """Take the events handed over so far, and apply them (on the loop's thread) for
        up to :data:`RELOAD_SLICE_S` unless a pause is on (:attr:`resume_at`: the loop
        calls again then)."""
        while True:
            try:
                event = self._events.get_nowait()
            except queue.Empty:
                break
            self._queue(event)
        began = time.monotonic()
        if began < self.resume_at:
            return
        fanout = self._fanout
        while fanout:
            event, path, keys = fanout[0]
            while keys:
                session = self.sessions.get(keys.popleft())
                if session is not None and session.watch_path == path:
                    self._apply_one(event, path, session)
                    now = time.monotonic()
                    if now - began >= RELOAD_SLICE_S and (keys or len(fanout) > 1):
                        self.resume_at = now + (now - began)  # the others' turn
                        return
            fanout.popleft()

    def _queue(self, event: ReloadEvent) -> None:
        """A version handed over: said once, then applied run by run by :meth:`drain`."""
        path = os.path.normpath(event.path)
        targets = self._announce(event, path, [
            s for s in self.sessions.values() if s.watch_path == path])
        if not targets:
            return
        # The runs still waiting for an older version of the file take this one instead,
        # first (so that a storm of edits cannot keep the same runs waiting): a valid
        # version overtakes any, an invalid one only the invalid (the runs must take the
        # valid version before they record this one's rejection).
        waiting: list[str] = []
        for older, older_path, keys in self._fanout:
            if older_path == path and (event.policy is not None or older.policy is None):
                waiting += keys
                keys.clear()
        first = set(waiting)
        waiting += (s.key for s in targets if s.key not in first)
        self._fanout.append((event, path, deque(waiting)))

    def _taken(self, path: str, keys: set[str]) -> None:
        """``keys`` took the file's version now (``lrctl reload``): the older versions still
        being applied must not reach them after it."""
        for _, older_path, waiting in self._fanout:
            if older_path == path and keys.intersection(waiting):
                kept = [k for k in waiting if k not in keys]
                waiting.clear()
                waiting.extend(kept)

    # -- which files are watched ---------------------------------------------------------
    def sync_watch(self, session: Session) -> None:
        """Watch the session's file under the right path (or none when pinned)."""
        want = session.watch_path
        have = self._watched.get(session.key)
        if want == have or self.watcher is None:
            return
        self.unwatch(session.key)
        if want is not None:
            try:
                self.watcher.watch(want, session.info.policy_sha256)
            except OSError as exc:  # e.g. the inotify watch limit: run on, unwatched
                session.reload_error = f"cannot watch {want}: {exc.strerror or exc}"
                log.error("run %s: %s", session.key, session.reload_error)
                return
            self._watched[session.key] = want

    def unwatch(self, key: str) -> None:
        path = self._watched.pop(key, None)
        if path is not None and self.watcher is not None:
            self.watcher.unwatch(path)

    def load_library(self, directory: str) -> None:
        """Validate every policy in ``--policies DIR`` now, and watch them."""
        files = sorted(p for p in Path(directory).iterdir()
                       if p.suffix in (".yaml", ".yml") and p.is_file())
        for path in files:
            event = read_policy_file(str(path.resolve()))
            self.library[event.path] = event.error
            if event.error:
                log.error("policy %s", event.error)
            if self.watcher is not None:
                try:
                    self.watcher.watch(event.path, event.sha256)
                except OSError as exc:
                    log.error("cannot watch policy %s: %s", event.path, exc.strerror or exc)
        log.info("validated %d policy file(s) in %s, %d invalid", len(files), directory,
                 sum(1 for path in files if self.library.get(str(path.resolve()))))

    # -- applying a new version ----------------------------------------------------------
    def apply(self, event: ReloadEvent, only: list[Session]) -> list[dict[str, Any]]:
        """Apply a file's version to ``only`` now, all of them; their decisions."""
        path = os.path.normpath(event.path)
        self._taken(path, {s.key for s in only})
        out = []
        for session in self._announce(event, path, only):
            decision = self._apply_one(event, path, session)
            if decision is not None:
                out.append(decision)
        return out

    def _announce(self, event: ReloadEvent, path: str,
                  targets: list[Session]) -> list[Session]:
        """Note and log a version of ``path`` for ``targets``; the sessions to apply it to
        (none for a file gone missing: they keep their policy until it returns)."""
        if path in self.library:
            self.library[path] = event.error
        if event.status == "missing":
            log.warning("%s; %d run(s) keep their current policy until it returns",
                        event.error, len(targets))
            return []
        if event.status == "invalid":
            log.error("reload rejected, %d run(s) keep the old version: %s", len(targets),
                      event.error)
        return targets

    def _apply_one(self, event: ReloadEvent, path: str,
                   session: Session) -> dict[str, Any] | None:
        """One session takes a version (or records why it cannot); its decision, None when
        it already runs that version."""
        if event.policy is not None:
            if not event.forced and event.policy.sha256 == session.info.policy_sha256:
                # Already running this version (restored after the edit, or a broken
                # edit put back as it was): the file validates again, so the error
                # shown by runs/status is over.
                if session.reload_error is not None:
                    session.reload_error = None
                    log.info("run %s: %s validates again (the version running)",
                             session.key, path)
                    self._save(session.key)
                return None
            try:
                decision = session.reload(event.policy, event.forced)
            except Exception as exc:  # (never the watcher's end: see reload.PolicyWatcher)
                log.error("run %s cannot take %s: %s", session.key, path,
                          exc if isinstance(exc, (ConfigError, ValueError)) else repr(exc))
                decision = session.reload_failed(str(exc), event.sha256)
            else:
                log.info("run %s: %s", session.key, decision["reason"])
        else:
            decision = session.reload_failed(event.error or "invalid", event.sha256)
        self.sync_watch(session)  # the new version may say watch: false
        self._publish(session, decision, True)
        return decision

    def reload_now(self, sessions: list[Session]) -> tuple[list[dict[str, Any]], list[str]]:
        """Read the files of ``sessions`` now and apply them even if unchanged (``lrctl
        reload``): their decisions, and the files that are missing."""
        by_path: dict[str, list[Session]] = {}
        for s in sessions:
            by_path.setdefault(s.watch_path or "", []).append(s)
        decisions: list[dict[str, Any]] = []
        problems: list[str] = []
        for path, group in sorted(by_path.items()):
            event = read_policy_file(path)
            if event.status == "missing":
                problems.append(event.error or path)
            event = ReloadEvent(event.path, event.status, event.policy, event.error,
                                event.sha256, forced=True)
            decisions += self.apply(event, only=group)
        return decisions, problems
