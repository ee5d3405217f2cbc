"""Lines for the MLflow shipper child, written by a thread of their own.

The controller's event loop tells the shipper child, once per commit, which journals
grew. A write to the child's stdin blocks once its pipe (64 KiB) is full: a child that
is stopped (``SIGSTOP``), hung, or starved of CPU stops reading, and a loop that wrote
itself would stop with it, every run's answers with it. So the loop only queues
(:meth:`Outbox.put`, :meth:`Outbox.more`); a writer thread does the writes, and only it
can wait on the pipe.

The queue stays small whatever the child does: ``more`` messages (the only frequent
ones) merge into the queue's last message when that is a ``more`` too, so a child that
reads nothing for an hour finds one ``more`` per ``attend``/``forget`` queued
meanwhile, with every run that grew. The order of the messages is kept.

:attr:`Outbox.blocked_for` says how long the writer has waited on the pipe, so the
owner can end a child that reads nothing (see
:class:`~lrctl.sinks.shipper_proxy.ShipperProcess`).
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from typing import IO, Any

__all__ = ["Outbox"]


def _line(msg: dict[str, Any]) -> bytes:
    return (json.dumps(msg, separators=(",", ":")) + "\n").encode()


class Outbox:
    """See the module docstring. Thread-safe; the writer thread starts with the first
    pipe attached and ends at :meth:`stop`."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._queue: list[dict[str, Any]] = []
        self._pipe: IO[bytes] | None = None
        self._stopped = False
        self._writing_since: float | None = None  # a write under way began then
        self._thread: threading.Thread | None = None

    def attach(self, pipe: IO[bytes]) -> None:
        """A new child's stdin: what was queued for the previous child is dropped (the
        owner tells a new child every run again, after this)."""
        with self._cond:
            self._pipe = pipe
            self._queue.clear()
            if self._thread is None and not self._stopped:
                self._thread = threading.Thread(target=self._run, daemon=True,
                                                name="lrctl-shipper-writer")
                self._thread.start()

    def detach(self) -> None:
        """The child is gone: nothing more is written to it."""
        with self._cond:
            self._pipe = None
            self._queue.clear()

    def put(self, msg: dict[str, Any]) -> None:
        """Queue ``msg`` for the child (dropped when there is none: the next one is told
        every run)."""
        with self._cond:
            if self._pipe is None or self._stopped:
                return
            self._queue.append(msg)
            self._cond.notify()

    def more(self, runs: list[str]) -> None:
        """Queue ``{"op": "more", "runs": runs}``, merged into the last queued message
        if that is a ``more`` too."""
        with self._cond:
            if self._pipe is None or self._stopped:
                return
            last = self._queue[-1] if self._queue else None
            if last is not None and last["op"] == "more":
                last["runs"] = list(dict.fromkeys([*last["runs"], *runs]))
            else:
                self._queue.append({"op": "more", "runs": list(runs)})
                self._cond.notify()

    @property
    def blocked_for(self) -> float:
        """Seconds the writer has waited on the child's pipe so far (0: not waiting)."""
        since = self._writing_since
        return 0.0 if since is None else time.monotonic() - since

    def pending(self) -> int:
        """Messages queued, not yet written."""
        with self._cond:
            return len(self._queue)

    def stop(self, timeout: float = 0.0) -> None:
        """Write what is queued (for at most ``timeout`` seconds), then end the writer."""
        with self._cond:
            self._stopped = True
            self._cond.notify()
        thread = self._thread
        if thread is not None and timeout > 0:
            thread.join(timeout)

    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._queue or self._stopped)
                if not self._queue:
                    return  # stopped, all written
                pipe, batch = self._pipe, self._queue
                self._queue = []
                self._writing_since = time.monotonic()
            # The child gone (OSError, or ValueError on a closed pipe): the next one is
            # told every run.
            try:
                with contextlib.suppress(OSError, ValueError):
                    if pipe is not None:
                        pipe.write(b"".join(_line(msg) for msg in batch))
                        pipe.flush()
            finally:
                self._writing_since = None
