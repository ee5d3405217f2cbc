"""Sessions built off the event loop: a hello's policy parsed on a worker thread, on a budget.

Building a session parses its policy text (PyYAML is pure Python: a hostile
64 KB text took a second) and, on a resume, rebuilds its state. Done on the loop,
ten such hellos stalled every run for ten seconds. So the loop hands the work
(:class:`BuildJob`) to one worker thread and goes on serving; the worker parses
under :func:`~lrctl.config.parse_deadline` (``budget_s``), which gives up with a
clear ``ConfigError`` rather than run on, puts the finished job on :attr:`done`
and wakes the loop, which answers the hello.

Smaller policy texts go first, so a hook's usual few-KB file does not wait behind
an attacker's 64 KB ones; at most ``max_pending`` jobs wait at once, holding hellos of
at most ``max_bytes`` in all (a waiting hello is held decoded, and a run's state in it
can take twenty times its bytes: 1 024 hellos of 1 MiB would be gigabytes); more are
refused, retryably. The worker touches nothing the loop owns: a job's inputs are
immutable and its session is new until the loop adopts it.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..config import parse_deadline
from .transport import Unavailable

if TYPE_CHECKING:
    from .hello import Hello
    from .session import Session
    from .transport import Conn

__all__ = ["BuildJob", "SessionBuilder"]


@dataclass(eq=False)
class BuildJob:
    """One hello whose session is being built: from the hook's saved state (``from_hook``),
    else from the run's checkpoint on disk, else new."""

    conn: Conn
    hello: Hello
    takeover: bool  # it showed the resume token of a run connected elsewhere
    size: int = 0  # bytes of the hello's frame
    # The run's checkpoint on disk is an ended run's, being removed: never restored.
    ended: bool = False
    submitted: float = field(default_factory=time.monotonic)
    started: float | None = None  # when the worker took it
    parsed: bool = False  # its policy is parsed: what is left (opening its files) is I/O
    # The built session and whether it was restored, or why it could not be built.
    result: tuple[Session, bool] | Exception | None = None
    # A session resumed from the hook's state under a policy edited since: the reload's
    # decision, published once the hook has joined.
    reloaded: dict[str, Any] | None = None
    # From the hook's state: how far the run on disk had got, and its decisions after the
    # state's step (a run evicted from memory; see handshake._rewound).
    prior: tuple[int, list[dict[str, Any]]] | None = None
    # The hook's saved state is the one the run on disk was last resumed from (its hook
    # reconnecting after an eviction): restored from disk, as it went on from it.
    adopted: bool = False
    held: bool = False  # the run is in memory (its checkpoint on disk may be older)


class SessionBuilder:
    """One worker thread that runs ``build(job)`` for each submitted job, on a budget."""

    def __init__(self, build: Callable[[BuildJob], tuple[Session, bool]], *, budget_s: float,
                 max_pending: int, max_bytes: int, notify: Callable[[], None]) -> None:
        self.build = build
        self.budget_s = budget_s
        self.max_pending = max_pending
        self.max_bytes = max_bytes
        self._queued_bytes = 0  # the submitted, unfinished jobs' hellos (loop's count)
        self.notify = notify
        self.done: queue.SimpleQueue[BuildJob] = queue.SimpleQueue()
        self._jobs: queue.PriorityQueue[tuple[int, int, BuildJob | None]] = (
            queue.PriorityQueue())
        self._order = itertools.count()
        self._queued = 0  # submitted, not yet finished (loop's count)
        self._thread: threading.Thread | None = None

    def submit(self, job: BuildJob) -> None:
        """Queue ``job``; :class:`Unavailable` when too many are waiting."""
        if self._queued >= self.max_pending:
            raise Unavailable(f"the controller is answering {self._queued} other hellos")
        if self._queued and self._queued_bytes + job.size > self.max_bytes:
            raise Unavailable(f"the controller is answering other hellos of "
                              f"{self._queued_bytes} bytes in all")
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="lrctl-hellos",
                                            daemon=True)
            self._thread.start()
        self._queued += 1
        self._queued_bytes += job.size
        self._jobs.put((len(job.hello.policy_text), next(self._order), job))

    def finished(self) -> list[BuildJob]:
        """The jobs done since the last call (on the loop's thread)."""
        out = []
        while True:
            try:
                out.append(self.done.get_nowait())
            except queue.Empty:
                self._queued -= len(out)
                self._queued_bytes -= sum(job.size for job in out)
                return out

    def stop(self) -> None:
        """End the worker once it is done with the job it is on, without waiting for that
        (a shutdown does not wait for a parse; the daemon thread's result is dropped)."""
        if self._thread is not None:
            self._jobs.put((-1, -1, None))
            self._thread = None

    def _run(self) -> None:
        while True:
            *_, job = self._jobs.get()
            if job is None:
                return
            job.started = time.monotonic()
            result: Any
            try:
                with parse_deadline(self.budget_s):
                    result = self.build(job)
            except OSError as exc:
                # Out of descriptors (a file to read, a module to import): not this hello's
                # fault, so the hook is told to try again later, not of an internal error.
                result = exc if exc.errno not in (errno.EMFILE, errno.ENFILE) else \
                    Unavailable(f"out of file descriptors ({exc.strerror}); try again later")
            except Exception as exc:  # the loop answers it: a refusal, or an internal error
                result = exc
            job.result = result
            self.done.put(job)
            with contextlib.suppress(OSError):
                self.notify()
