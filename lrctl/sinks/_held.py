"""Journal records a failing disk refused, kept in memory and written in order later.

A full disk (``ENOSPC``), a quota or an I/O error must cost neither a run nor its
audit trail: the run goes on (its LRs never depend on the journal), and what its
journal could not take waits here, per stream, and is written, in order and
numbered then, once the disk takes writes again (each later append to that stream
waits behind it). ``error`` says what is wrong while anything waits, for
``lrctl status``. At most ``limit`` records wait per stream; past that the newest
are dropped, counted and logged (a disk full for hours must not take the memory too).
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Mapping
from typing import Any

from .journal import JournalLine, StreamWriter

__all__ = ["HeldLines"]

log = logging.getLogger("lrctl.sinks")


class HeldLines:
    """Per stream writer: the records it could not write yet (owner thread only)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.error: str | None = None  # what the disk said, while anything waits
        self.since: float | None = None  # wall time of the first refusal
        self.dropped = 0
        self._held: dict[StreamWriter, deque[dict[str, Any]]] = {}

    def __bool__(self) -> bool:
        return bool(self._held)

    def __len__(self) -> int:
        return sum(len(q) for q in self._held.values())

    def holds(self, writer: StreamWriter) -> bool:
        return writer in self._held

    def append(self, writer: StreamWriter, record: Mapping[str, Any]) -> list[JournalLine]:
        """Write ``record`` after what waits for ``writer``; the lines written now (none
        if the disk still refuses: then the record waits too)."""
        queue = self._held.get(writer)
        if queue is None:
            try:
                return [writer.append(record)]
            except OSError as exc:
                self._refused(writer, exc)
                queue = self._held[writer] = deque()
                queue.append(dict(record))
                return []
        if len(queue) >= self.limit:
            self.dropped += 1
            if self.dropped == 1 or self.dropped % 1000 == 0:
                log.error("journal %s: %d record(s) dropped, the disk still refuses writes "
                          "(%s) and %d wait in memory", writer.path, self.dropped, self.error,
                          len(queue))
            return []
        queue.append(dict(record))
        return self._drain(writer, queue)

    def retry(self, writer: StreamWriter) -> list[JournalLine]:
        """Try again to write what waits for ``writer``."""
        queue = self._held.get(writer)
        return [] if queue is None else self._drain(writer, queue)

    def writers(self) -> list[StreamWriter]:
        return list(self._held)

    def forget(self, writer: StreamWriter) -> int:
        """Give up on ``writer``'s records (shutdown with the disk still full)."""
        lost = len(self._held.pop(writer, ()))
        if not self._held:  # (not "the disk takes writes again": it never did)
            self.error = self.since = None
        return lost

    def _drain(self, writer: StreamWriter, queue: deque[dict[str, Any]]) -> list[JournalLine]:
        out = []
        while queue:
            try:
                out.append(writer.append(queue[0]))
            except OSError as exc:
                self.error = f"journal writes fail: {exc}"
                break
            queue.popleft()
        if not queue:
            del self._held[writer]
            self._settled()
        return out

    def _refused(self, writer: StreamWriter, exc: OSError) -> None:
        if self.error is None:
            self.since = time.time()
            log.error("journal %s: write failed (%s); the run goes on and its records wait "
                      "in memory until the disk takes writes again", writer.path, exc)
        self.error = f"journal writes fail: {exc}"

    def _settled(self) -> None:
        if not self._held and self.error is not None:
            log.warning("journal: the disk takes writes again; the records held since %s "
                        "are written%s", time.strftime("%H:%M:%S", time.localtime(self.since)),
                        f" ({self.dropped} were dropped)" if self.dropped else "")
            self.error, self.since = None, None
