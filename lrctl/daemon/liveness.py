"""A hung controller must be loud and must end: the loop's heartbeat, checked by a second thread.

The event loop stamps the time on every wake-up (at least every poll interval,
a quarter of a second, when it is healthy). :class:`LoopMonitor` runs a small
daemon thread that reads that stamp. Two things end the process from it:

* **A stalled loop.** No wake-up for ``stall_s`` seconds while serving: the loop
  is stuck (a deadlock, a hung call). The monitor logs a stack dump of every
  thread, so the cause can be read from the controller's log, and exits with
  :data:`EXIT_STALLED`. The hooks see the controller gone; with ``spawn=True``
  they start a new one, which restores every run from its checkpoint.
* **A shutdown that does not finish.** Once SIGTERM/SIGINT asked the loop to
  stop, it has ``grace_s`` seconds to checkpoint and close, interpreter exit
  included (a stuck non-daemon thread would otherwise hold the process). Past
  that the monitor logs the stacks and exits with :data:`EXIT_SHUTDOWN_OVERRUN`.
  What was not checkpointed comes back from the previous checkpoint and the
  hooks' replay of the observations after it; decisions are journalled durably
  before they are sent, so none is lost.

A second SIGTERM/SIGINT exits at once (for a person pressing Ctrl-C again).

A pause of the whole process (SIGSTOP, Ctrl-Z then ``fg``, a suspended batch job, ``docker
pause``) stops the monitor too: it sees that its own looks came far apart while the
process used next to no CPU time, and gives the loop a fresh ``stall_s`` from the resume
(and moves a shutdown's deadline by the pause) instead of calling a healthy loop stuck.
(It killed such a controller with status 70.) Looks far apart while the process was busy
are no pause: a loop that holds the interpreter in a long call is judged as usual.

The monitor only reads a float and the clock; it never touches controller state.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
import time
import traceback
from collections.abc import Callable

__all__ = ["EXIT_SHUTDOWN_OVERRUN", "EXIT_STALLED", "LoopMonitor", "thread_stacks"]

log = logging.getLogger("lrctl.daemon")

EXIT_STALLED = 70  # EX_SOFTWARE: the event loop stopped turning
EXIT_SHUTDOWN_OVERRUN = 75  # EX_TEMPFAIL: asked to stop, could not finish in time
DEFAULT_STALL_S = 30.0
DEFAULT_GRACE_S = 5.0
PAUSED_CPU = 0.1  # looks far apart with less CPU time used than this share: a pause


def thread_stacks() -> str:
    """Every thread's current stack, named, as text (for the log)."""
    names = {t.ident: t.name for t in threading.enumerate()}
    parts = []
    for ident, frame in sys._current_frames().items():
        stack = "".join(traceback.format_stack(frame))
        parts.append(f"--- thread {names.get(ident, '?')} ({ident}):\n{stack}")
    return "\n".join(parts)


class LoopMonitor:
    """Ends the process when the loop stalls, or when a requested stop overruns.

    ``last_wake`` returns the loop's latest ``time.monotonic()`` stamp.
    ``exit`` is :func:`os._exit` outside tests.
    """

    def __init__(self, last_wake: Callable[[], float], *, stall_s: float = DEFAULT_STALL_S,
                 grace_s: float = DEFAULT_GRACE_S, exit: Callable[[int], None] = os._exit,
                 clock: Callable[[], float] = time.monotonic,
                 cpu_clock: Callable[[], float] = time.process_time) -> None:
        if not stall_s > 0:
            raise ValueError(f"stall_s must be positive, but got {stall_s=}")
        if not grace_s > 0:
            raise ValueError(f"grace_s must be positive, but got {grace_s=}")
        self._last_wake = last_wake
        self.stall_s = stall_s
        self.grace_s = grace_s
        self._exit = exit
        self._clock = clock
        self._cpu_clock = cpu_clock
        self._last_cpu = 0.0
        self._stop_deadline: float | None = None
        self.period = min(1.0, stall_s / 4, grace_s / 4)  # between looks
        # Looks further apart than this: the process (monitor included) was paused.
        self._pause_gap = 2 * self.period + 1.0
        self._last_look: float | None = None
        self._resumed = -float("inf")  # the end of the latest such pause
        self._signals = 0
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="lrctl-liveness", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        """Stop watching (the process is about to exit cleanly, or a test is over)."""
        self._done.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join()

    def stop_requested(self) -> None:
        """The loop was asked to stop: from now it has ``grace_s`` to finish."""
        if self._stop_deadline is None:
            self._stop_deadline = self._clock() + self.grace_s

    def on_signal(self) -> None:
        """SIGTERM/SIGINT (call from the handler): arm the grace period; a second one exits."""
        self._signals += 1
        if self._signals > 1:
            log.warning("second stop signal: exiting now, without waiting for the shutdown")
            _flush_logs()
            self._exit(EXIT_SHUTDOWN_OVERRUN)
            return
        self.stop_requested()

    def check(self) -> int | None:
        """One look: the exit status to end with, or None while all is well."""
        now, cpu = self._clock(), self._cpu_clock()
        last, self._last_look = self._last_look, now
        used, self._last_cpu = cpu - self._last_cpu, cpu
        if last is not None and now - last > self._pause_gap and used < PAUSED_CPU * (
                now - last):
            self._resumed = now
            if self._stop_deadline is not None:
                self._stop_deadline += now - last
            log.warning("the controller was paused for %.1f s (SIGSTOP, a suspended job?): "
                        "the event loop is judged from now", now - last)
        if self._stop_deadline is not None:
            if now <= self._stop_deadline:
                return None
            log.error("shutdown did not finish within %.1f s of the stop request; exiting "
                      "anyway (runs resume from their last checkpoint). Threads:\n%s",
                      self.grace_s, thread_stacks())
            return EXIT_SHUTDOWN_OVERRUN
        quiet = now - max(self._last_wake(), self._resumed)
        if quiet <= self.stall_s:
            return None
        log.error("the event loop has not turned for %.1f s (limit %.1f s): the controller "
                  "is stuck and exits so that a new one can take over. Threads:\n%s",
                  quiet, self.stall_s, thread_stacks())
        return EXIT_STALLED

    def _run(self) -> None:
        while not self._done.wait(self.period):
            status = self.check()
            if status is not None:
                _flush_logs()
                self._exit(status)
                return


def _flush_logs() -> None:
    for handler in logging.getLogger("lrctl").handlers:
        with contextlib.suppress(Exception):  # exiting anyway: a broken handler must not stop it
            handler.flush()
