"""The controller's side of the MLflow shipper process.

:class:`ShipperProcess` has the interface :class:`~lrctl.sinks.audit.AuditSink` uses
(:class:`~lrctl.sinks.base.Shipper`) and forwards it to a child process,
``python -m lrctl.sinks.shipper_proc`` (see there for the protocol), so that the
controller never imports mlflow (about 200 MiB resident) nor runs it on its GIL.

The child is told which runs to attend and which journals grew, once per commit;
it reads the lines from the journal, from its cursor. Those messages go through an
:class:`~lrctl.sinks._outbox.Outbox`, whose own thread writes them: the controller's
loop never waits on the child's pipe, which fills when the child stops reading
(stopped, hung, starved). A child that has read nothing for ``stall_s`` seconds
while a write waited is killed, and restarted like one that died; so is one that has not
answered a ``ping`` (sent every ``ping_s`` seconds) for ``stall_s``: the controller's
notices are small, and a stopped child's pipe may never fill. A supervisor thread reads the
child's answers and log, and restarts it with back-off when it dies; the new child
is told every run again and catches up from the cursors, so nothing is lost (a
batch re-sent after a crash changes nothing in MLflow, see
:mod:`~lrctl.sinks.mlflow_sink`). The supervisor only starts and reads processes;
the routing table it replays is shared with the owner thread under one lock.

A run leaves the routing table once it has ended and the child says it shipped the
run's end (``{"done": KEY, "events_seq": N}`` with N at or past the end's line): a
controller serving many short runs in turn keeps only the runs that are open or
still being shipped.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from ._mlflow_store import unavailable
from ._outbox import Outbox
from ._ship_state import FILES_WAIT
from .journal import JournalLine

__all__ = ["ShipperProcess", "rss_kib"]

log = logging.getLogger("lrctl.sinks.mlflow")

_RESTART_MIN_S = 0.5
#: A child that has read nothing this long while a write to it waited is killed.
STALL_S = 60.0
#: ... and said to be not reading (``lrctl status``) after this long.
#: How often the child is asked to answer (a child that answers nothing is stalled too).
PING_S = 10.0
_NOT_READING_S = 5.0
_PACKAGE_ROOT = str(Path(__file__).resolve().parents[2])


#: What marks a line the child wrote outside the protocol as trouble, not chatter.
_TROUBLE_WORDS = ("Traceback", "Error", "ERROR", "Exception")


def _log_stray(raw: bytes) -> None:
    """Log a line of the shipper child's stdout that is not one of its JSON messages.

    Such lines are mlflow's own prints to stdout (the protocol's channel): at the end of
    a run tracked to a server, "🏃 View run NAME at: URL" and "🧪 View experiment at:
    URL". That is normal output, logged at INFO as text; a line that looks like an
    error (a traceback, an exception's name) stays at ERROR.
    """
    text = raw.decode("utf-8", errors="replace").strip()
    if not text:
        return
    # (a run name or URL is the user's: no control character reaches the log as it is)
    text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text[:400])
    level = logging.ERROR if any(w in text for w in _TROUBLE_WORDS) else logging.INFO
    log.log(level, "lrctl: the MLflow shipper wrote: %.200s", text)


def rss_kib(pid: int | str = "self") -> int | None:
    """Resident memory of a process (``VmRSS`` of /proc/PID/status), in KiB."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


@dataclass
class _Route:
    uri: str
    end_seq: int | None = None  # events seq of the run's end, once passed on


class ShipperProcess:
    """Ships journals to MLflow from a child process; restarts it if it dies.

    The child starts with the first run attended. :meth:`flush` and :meth:`close`
    wait at most their ``timeout``; :meth:`close` then kills a child that has not
    exited: what it did not ship stays in the journal for the next controller.
    """

    def __init__(self, state_dir: str | os.PathLike[str], *, flush_interval: float = 1.0,
                 queue_size: int = 10_000, timeline: bool = True,
                 backoff_max: float = 30.0, python: str = sys.executable,
                 stall_s: float = STALL_S, ping_s: float = PING_S) -> None:
        if not 0 < flush_interval <= 2.0:
            raise ValueError(f"flush_interval must be in (0, 2] seconds, but got {flush_interval=}")
        if queue_size < 1:
            raise ValueError(f"queue_size must be >= 1, but got {queue_size=}")
        self.state_dir = Path(state_dir)
        self.backoff_max = backoff_max
        self.stall_s = stall_s
        self.ping_s = ping_s
        self._argv = [python, "-m", "lrctl.sinks.shipper_proc", "--state-dir",
                      str(self.state_dir), "--flush-interval", repr(flush_interval),
                      "--queue-size", str(queue_size), "--backoff-max", repr(backoff_max)]
        if not timeline:
            self._argv.append("--no-timeline")
        self._cond = threading.Condition()  # guards everything below
        self._routes: dict[str, _Route] = {}  # replayed to a new child
        self._proc: subprocess.Popen[bytes] | None = None
        self._generation = 0  # +1 per child started and per child gone
        self._acks: dict[int, bool] = {}
        self._closed: bool | None = None  # the child's answer to close
        self._unavailable: dict[str, str] = {}  # tracking URI -> why, as the child says
        self._files_down: dict[str, str] = {}  # run key -> why its files wait (the child's)
        self._next_id = 0
        self._state = "not started"
        self.restarts = 0
        self._dirty: dict[str, None] = {}  # owner thread only: runs whose journal grew
        self._stop = threading.Event()
        self._supervisor: threading.Thread | None = None
        self._outbox = Outbox()
        self._stall_killed: int | None = None  # pid of the child killed for not reading
        # The ping the child has not answered yet: (its generation, id, when sent); and
        # when the last one was sent (owner thread).
        self._ping: tuple[int, int, float] | None = None
        self._pinged_at = 0.0

    # -- the Shipper interface (owner thread) -------------------------------------------
    def attend(self, run_key: str, tracking_uri: str) -> None:
        with self._cond:
            self._routes[run_key] = _Route(tracking_uri)  # (re)opened: not ended
            self._send({"op": "attend", "run": run_key, "uri": tracking_uri})
        self._start()

    def submit(self, run_key: str, stream: str, line: JournalLine) -> None:
        if run_key not in self._routes:
            raise KeyError(f"run {run_key!r} is not attended; call attend() first")
        self._dirty[run_key] = None
        if stream == "events" and line.record.get("event") == "end":
            self._ended(run_key, line.seq)

    def catch_up(self, run_key: str) -> None:
        """Have the child read ``run_key``'s journal again from where it got to (its files
        were written back into a state dir made again: what it read meanwhile found no
        file, and nothing else would tell it of the lines it missed)."""
        if run_key in self._routes:
            self._dirty[run_key] = None

    def pass_on(self) -> None:
        if self._dirty:
            runs, self._dirty = list(self._dirty), {}
            self._outbox.more(runs)
        if self._outbox.blocked_for > self.stall_s:
            self._end_stalled(self._outbox.blocked_for)
        self._check_pings(time.monotonic())

    def recover(self) -> list[str]:
        from ._ship_state import runs_behind
        from .journal import JournalError, RunPaths, last_line

        behind = runs_behind(self.state_dir)
        for key, uri in behind:
            self.attend(key, uri)
            try:
                last = last_line(RunPaths.of(self.state_dir, key).stream("events"))
            except (OSError, JournalError):
                continue  # the child reads it and says what is wrong
            if last is not None and last.record.get("event") == "end":
                self._ended(key, last.seq)  # ended under an earlier controller
        return [key for key, _ in behind]

    def flush(self, timeout: float = 10.0) -> bool:
        """True once the child says MLflow acknowledged everything passed on so far.
        A child that dies meanwhile is asked again once restarted, within ``timeout``."""
        deadline = time.monotonic() + timeout
        self.pass_on()
        if self._supervisor is None:
            return True  # no run attended: nothing to ship
        with self._cond:
            while not self._stop.is_set():
                if not self._cond.wait_for(lambda: self._proc is not None or self._stop.is_set(),
                                           max(0.0, deadline - time.monotonic())):
                    return False
                generation, ident = self._generation, self._next_id
                self._next_id += 1
                self._send({"op": "flush", "id": ident,
                            "timeout": max(0.0, deadline - time.monotonic())})
                self._cond.wait_for(
                    lambda ident=ident, generation=generation:  # type: ignore[misc]
                    ident in self._acks or self._generation != generation,
                    max(0.0, deadline - time.monotonic()))
                if ident in self._acks:
                    return self._acks.pop(ident)
                if time.monotonic() >= deadline:
                    return False
        return False

    def close(self, timeout: float = 1.0) -> bool:
        """Ask the child to ship for most of ``timeout``, then end it, killing it at the
        deadline. True if it shipped everything."""
        deadline = time.monotonic() + timeout
        self.pass_on()
        self._stop.set()
        with self._cond:
            proc = self._proc
            self._send({"op": "close", "timeout": 0.8 * timeout})
        if proc is not None:
            try:
                proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("lrctl: the MLflow shipper (pid %d) did not stop in %.1f s; "
                            "killed it (the journal keeps what it had not shipped)",
                            proc.pid, timeout)
                proc.kill()
                proc.wait()
        if self._supervisor is not None:  # it sees the child's end of output, then stops
            self._supervisor.join(max(0.1, deadline - time.monotonic()))
        self._outbox.stop()
        with self._cond:
            self._state = "stopped"
            return bool(self._closed) if proc is not None else not self._routes

    def status(self) -> dict[str, Any]:
        with self._cond:
            pid = self._proc.pid if self._proc is not None else None
            state = self._state
            silent = max(self._outbox.blocked_for, time.monotonic() - self._ping[2]
                         if self._ping is not None and self._ping[0] == self._generation
                         else 0.0)
            if state == "running" and silent > _NOT_READING_S:
                state = f"not reading its input for {silent:.0f} s"
            return {"pid": pid, "state": state, "restarts": self.restarts,
                    "rss_kib": rss_kib(pid) if pid is not None else None,
                    "unavailable": dict(self._unavailable),
                    "files_down": dict(self._files_down)}

    def run_errors(self) -> dict[str, str]:
        """``run key -> "MLflow unavailable: <reason>"`` for the runs whose MLflow is down,
        and :data:`FILES_WAIT` for those whose files wait for their artifact store."""
        with self._cond:
            out = {key: FILES_WAIT.format(why) for key, why in self._files_down.items()}
            return out | {key: unavailable(self._unavailable[route.uri])
                          for key, route in self._routes.items()
                          if route.uri in self._unavailable}

    def routes(self) -> int:
        """How many runs the child is told of (open, or ended but not yet shipped)."""
        with self._cond:
            return len(self._routes)

    # -- internals ------------------------------------------------------------------------
    def _ended(self, run_key: str, seq: int) -> None:
        """The run's end (events line ``seq``) is passed on: once the child says it
        shipped it, the run is forgotten."""
        with self._cond:
            route = self._routes.get(run_key)
            if route is not None:
                route.end_seq = seq

    def _send(self, msg: dict[str, Any]) -> None:
        """Queue one line for the child (never waits). Lost if it is dead: the next
        child is told every run and reads each journal from its cursor."""
        self._outbox.put(msg)

    def _check_pings(self, now: float) -> None:
        """Ask the child to answer every ``ping_s``; one that has not answered for
        ``stall_s`` is stalled (:meth:`_end_stalled`)."""
        with self._cond:
            proc = self._proc
            if proc is None:
                return
            generation, ping = self._generation, self._ping
            if ping is not None and ping[0] == generation:
                waited = now - ping[2]
                if waited <= self.stall_s:
                    return
            elif now - self._pinged_at >= self.ping_s:
                self._ping = (generation, self._next_id, now)
                self._pinged_at = now
                self._send({"op": "ping", "id": self._next_id})
                self._next_id += 1
                return
            else:
                return
        self._end_stalled(waited, proc)

    def _end_stalled(self, silent_s: float, proc: subprocess.Popen[bytes] | None = None) -> None:
        """The child (``proc``: the one that did not answer; default: the current one) has
        read nothing for ``stall_s`` while a write waited, or answered no ping: kill it (a
        stopped process too); the supervisor restarts it, and the new child catches up from
        the cursors."""
        if proc is None:
            with self._cond:
                proc = self._proc
        if proc is None or proc.pid == self._stall_killed or proc.poll() is not None:
            return
        self._stall_killed = proc.pid
        log.warning("lrctl: the MLflow shipper (pid %d) has read nothing for %.0f s; "
                    "killing it (a new one catches up from the journal)", proc.pid, silent_s)
        with contextlib.suppress(OSError):
            proc.kill()

    def _start(self) -> None:
        if self._supervisor is None and not self._stop.is_set():
            self._supervisor = threading.Thread(target=self._supervise, daemon=True,
                                                name="lrctl-shipper-supervisor")
            self._supervisor.start()

    def _supervise(self) -> None:
        quick_deaths = 0
        while not self._stop.is_set():
            started = time.monotonic()
            proc = self._spawn()
            if proc is not None:
                assert proc.stdout is not None
                self._read(proc.stdout)
                code = proc.wait()
                self._outbox.detach()
                with self._cond, contextlib.suppress(OSError):
                    assert proc.stdin is not None
                    proc.stdin.close()
            with self._cond:
                self._proc = None
                self._generation += 1
                self._cond.notify_all()
                if self._stop.is_set():
                    break
                self._state = "restarting"
                self.restarts += 1
            lived = time.monotonic() - started
            quick_deaths = 0 if lived > self.backoff_max else quick_deaths + 1
            delay = 0.0 if quick_deaths <= 1 else min(
                self.backoff_max, _RESTART_MIN_S * 2 ** (quick_deaths - 2))
            log.warning("lrctl: the MLflow shipper %s; restarting it in %.1f s (the journal "
                        "keeps what it had not shipped)",
                        f"(pid {proc.pid}) exited with status {code}" if proc is not None
                        else "could not start", delay)
            self._stop.wait(delay)

    def _spawn(self) -> subprocess.Popen[bytes] | None:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (_PACKAGE_ROOT, env.get("PYTHONPATH")) if p)
        with self._cond:
            if self._stop.is_set():
                return None
            try:
                proc = subprocess.Popen(self._argv, stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, env=env, close_fds=True)
            except OSError as exc:
                log.error("lrctl: cannot start the MLflow shipper: %s", exc)
                return None
            self._proc = proc
            assert proc.stdin is not None
            self._outbox.attach(proc.stdin)
            self._generation += 1
            self._state = "running"
            self._unavailable.clear()  # the new child says again what it finds
            self._files_down.clear()
            for key, route in self._routes.items():  # a new child: every run, from its cursor
                self._send({"op": "attend", "run": key, "uri": route.uri})
            self._cond.notify_all()
        log.info("lrctl: MLflow shipper started, pid %d", proc.pid)
        return proc

    def _read(self, stdout: IO[bytes]) -> None:
        for raw in stdout:
            try:
                msg = json.loads(raw)
            except ValueError:  # (undecodable bytes too: UnicodeDecodeError is one)
                msg = None
            if not isinstance(msg, dict):
                _log_stray(raw)
                continue
            if "log" in msg:
                log.log(int(msg["log"]), "%s", msg.get("msg", ""))
                continue
            told = next(((k, table) for k, table in (("files", self._files_down),
                                                     ("mlflow", self._unavailable)) if k in msg),
                        None)
            if told is not None:  # a run's files, or a tracking URI: why it fails, or None
                with self._cond:
                    name, table = str(msg[told[0]]), told[1]
                    if msg.get("error"):
                        table[name] = str(msg["error"])[:500]
                    else:
                        table.pop(name, None)
                continue
            with self._cond:
                if "done" in msg:
                    self._done(str(msg["done"]), int(msg.get("events_seq", 0)),
                               bool(msg.get("failed")))
                elif "ack" in msg:
                    self._acks[int(msg["ack"])] = bool(msg.get("ok"))
                elif "pong" in msg:
                    if self._ping is not None and self._ping[1] == msg["pong"]:
                        self._ping = None
                elif "closed" in msg:
                    self._closed = bool(msg["closed"])
                self._cond.notify_all()
        stdout.close()

    def _done(self, run_key: str, events_seq: int, failed: bool) -> None:
        """The child shipped ``run_key`` up to ``events_seq`` of its events and has no
        more work for it (or MLflow refused the run for good): forget the run if that
        covers its end (under the lock). A report from before a resume, or from before
        the end was passed on, covers nothing."""
        route = self._routes.get(run_key)
        if route is None or route.end_seq is None or not (failed or events_seq >= route.end_seq):
            return
        del self._routes[run_key]
        self._files_down.pop(run_key, None)
        self._send({"op": "forget", "run": run_key})
