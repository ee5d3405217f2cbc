"""The controller's event loop: one thread owns every session, socket and the sink.

A ``selectors`` loop multiplexes all connections without threads, so session
state has exactly one owner and needs no locks. The server keeps the registry of
runs (sessions, their hooks' connections, when each was last heard), its lifecycle
and dispatch (hello, observation, bye, housekeeping); its collaborators each own one job:

* :mod:`~lrctl.daemon.transport`: connections, framing, authentication, the wake-up,
  and holding replies for the group commit; :mod:`~lrctl.daemon.admission`: the
  listeners, who gets a connection and who keeps one (caps, eviction, fd exhaustion);
* :mod:`~lrctl.daemon.handshake`: the ``hello`` (typed by :mod:`~lrctl.daemon.hello`):
  which session it joins, built off the loop, and who may take a run over;
* :mod:`~lrctl.daemon.observing`: an observation in, its answer out (the hot path);
* :mod:`~lrctl.daemon.operator`: the operator verbs;
* :mod:`~lrctl.daemon.live_reload`: watched policy files applied to running sessions;
* :mod:`~lrctl.daemon.checkpoints`: when each run is checkpointed, and by which thread;
* :mod:`~lrctl.daemon.guarded_sink`: the journal/MLflow sink, whose failures never
  end the loop;
* :mod:`~lrctl.daemon.upkeep`: the hourly removals (detached checkpoints past their
  time; with ``--keep-ended-days``, the journals of runs ended long ago), and the
  journals ``lrctl prune`` asks it to move aside.

Durability of decisions (group commit): a decision goes to the sink (the journal)
as it is made; every frame sent after it in the same loop wake-up is held, and at
the end of the wake-up the sink commits once (one fsync per journal file) before
the held frames go out. A hook is told of a decision only once it is durable.

Housekeeping, once a second: a session with no hook for ``session_timeout``
seconds is checkpointed and dropped from memory (a late reconnect restores it
from disk), quiet peers without a run are closed, hellos that take too long are
refused, and a socket file that was removed is bound again.
"""

from __future__ import annotations

import errno
import logging
import socket
import time
from typing import Any

from .. import paths
from ..policy import available_kinds
from ..policy._capacity import held_values
from ..reload import DEFAULT_DEBOUNCE_S
from ..sinks import Sink
from ..wire.errors import ProtocolError
from ..wire.frames import MAX_HELLO
from . import operator
from .checkpoints import Checkpoints, ended_after_checkpoint
from .guarded_sink import GuardedSink
from .handshake import Handshakes
from .limits import DEFAULT_SESSION_TIMEOUT, Limits
from .live_reload import LiveReload
from .observing import Observing
from .session import Session
from .state_dir import StateDirWatch
from .store import StateStore
from .transport import Conn, Transport, Unavailable
from .upkeep import Upkeep

#: How long a ``runs`` answer may be sent again to another asker (see Server._runs_frame).
RUNS_FRESH_S = 0.25

__all__ = ["Server"]

log = logging.getLogger("lrctl.daemon")

#: Runs without a hook evicted at once when the controller runs out of descriptors.
ROOM_RUNS = 64

class Server(Observing):
    """Serve until :meth:`stop`; ``listeners`` are bound, listening sockets, each with
    whether its peers are trusted (Unix) or must show ``token`` first (TCP)."""

    def __init__(self, listeners: list[tuple[socket.socket, bool]], store: StateStore,
                 sink: Sink, *, token: str | None = None, socket_path: str = "",
                 state_dir: str = "", watch: bool = True, policies_dir: str | None = None,
                 session_timeout: float | None = DEFAULT_SESSION_TIMEOUT,
                 debounce_s: float = DEFAULT_DEBOUNCE_S,
                 idle_exit: float | None = None, limits: Limits | None = None,
                 pacing: bool = True, keep_ended_s: float | None = None) -> None:
        self.limits = limits or Limits()
        self._runs_cache: tuple[float, tuple[int, int, int], bytes] | None = None
        self.decided = 0
        # Every policy kind is imported now, not at the first hello: by then peers may
        # hold every file descriptor, and a module cannot be imported without one.
        available_kinds()
        self.store = store
        self.state_dir = state_dir
        self.session_timeout = session_timeout
        self.idle_exit = idle_exit
        self.sessions: dict[str, Session] = {}
        self.conns: dict[str, Conn] = {}  # run key -> its hook's connection
        self._last_seen: dict[str, float] = {}  # run key -> when its hook was last heard
        self._hookless: dict[str, int] = {}  # run key -> values its policies held, hook gone
        self.started = time.monotonic()
        self._stopping = False
        self._no_hook_since = self.started  # when the last hook left (or the start)
        self._housekeeping_at = 0.0
        self.upkeep = Upkeep(self, keep_ended_s)  # the hourly removals
        # The loop's clock, read once per wake-up.
        self._now = self.started
        self.transport = Transport(listeners, self, limits=self.limits, token=token,
                                   socket_path=socket_path, pacing=pacing)
        self.sink = GuardedSink(sink, on_record=self.transport.hold)
        self.checkpoints = Checkpoints(store, self.sessions, self.limits,
                                       self.transport.wake)
        self.live = LiveReload(self.sessions, publish=self.publish,
                               save=self.checkpoints.save, wake=self.transport.wake,
                               watch=watch, debounce_s=debounce_s)
        self.handshakes = Handshakes(self)
        self.state_watch = StateDirWatch(state_dir)
        if policies_dir is not None:
            self.live.load_library(policies_dir)
        self._restore()

    # -- lifecycle ---------------------------------------------------------------------
    def _restore(self) -> None:
        for key, state in self.store.load_all():
            try:
                session = Session.restore(state)
                if self.state_dir and ended_after_checkpoint(self.state_dir, key,
                                                             session.last_step):
                    self.checkpoints.unremoved[key] = "left from before the run's end"
                    continue  # (its removal is tried again: Checkpoints.retry_removals)
                self.adopt(key, session)
            except Exception as exc:  # one run's state never stops the controller's start
                log.error("cannot restore run %s: %s; its checkpoint is left in place", key,
                          exc if isinstance(exc, (ValueError, KeyError, TypeError))
                          else repr(exc))
                continue
            log.info("restored run %s at step %d (policy %s)", key, session.last_step,
                     session.info.policy_sha256[:12])
        self.live.catch_up()  # edits made while the controller was down

    def adopt(self, key: str, session: Session) -> None:
        """A restored session joins the registry (at start, when an evicted run returns, or
        a resume from the hook's saved state replaces what was here). :class:`Unavailable`
        when its journal cannot be opened (out of file descriptors, say): it stays on disk."""
        self.open_records(session)
        if key in self.sessions:
            self.live.unwatch(key)
        self.sessions[key] = session
        self.checkpoints.track(key)
        self._last_seen[key] = time.monotonic()
        self.live.sync_watch(session)

    def start(self, session: Session) -> None:
        """A new run joins the registry: its records, first checkpoint (durable off the
        loop: the welcome says ``saved_step`` -1 until a checkpoint is) and watch."""
        key = session.key
        self.open_records(session)
        self.sessions[key] = session
        self.checkpoints.start(key)  # made durable off the loop
        self.live.sync_watch(session)
        log.info("run %s started (%d group(s), policy %s%s)", key,
                 len(session.engine.initial_lrs), session.info.policy_source,
                 "" if session.watch_path else ", not watched")

    def open_records(self, session: Session) -> None:
        """Open (or reopen) the session's records with its current :class:`RunInfo`. Out
        of file descriptors, runs without a hook make room first (see :meth:`make_room`)."""
        error = self.sink.open_run(session.info)
        if (isinstance(error, OSError) and error.errno in (errno.EMFILE, errno.ENFILE)
                and self.make_room(session.key)):
            error = self.sink.open_run(session.info)
        if error is not None:  # a run whose decisions cannot be journaled is not served
            raise Unavailable(f"cannot journal run {session.key}: {error}")

    def make_room(self, keep: str | None = None) -> int:
        """Out of file descriptors: evict the runs without a hook, the longest gone first
        (up to ``ROOM_RUNS``; each holds its journal files), as their session timeout
        would later. Their state stays on disk and a reconnect resumes them: runs
        opened and abandoned by one peer cannot keep every new run out."""
        gone = sorted((k for k in self.sessions if k not in self.conns and k != keep),
                      key=lambda k: self._last_seen.get(k, 0.0))[:ROOM_RUNS]
        evicted = sum(self._evict(k, "the controller ran out of file descriptors and "
                                     "evicted runs without a hook") for k in gone)
        if evicted:
            log.warning("out of file descriptors: evicted %d run(s) without a hook (their "
                        "state stays on disk; a reconnect resumes them)", evicted)
        return evicted

    def _bound_hookless(self, key: str, session: Session) -> None:
        """``key`` has no hook now: while the runs without one hold more than
        ``Limits.max_hookless_values`` values, evict the longest gone (as their session
        timeout would later: their state stays on disk, a reconnect resumes them)."""
        held = self._hookless
        held[key] = sum(map(held_values, session.engine.policies))
        for k in [k for k in held if k not in self.sessions or k in self.conns]:
            del held[k]  # (evicted, ended or rejoined since)
        total = sum(held.values())
        budget = self.limits.max_hookless_values
        for k in sorted(held, key=lambda k: self._last_seen.get(k, 0.0)):
            if total <= budget:
                break
            if self._evict(k, "the runs without a hook held more values than the "
                              f"controller keeps for them ({budget})"):
                total -= held.pop(k)
                log.warning("run %s evicted: the runs without a hook held more than %d "
                            "values; its state stays on disk and a reconnect resumes it",
                            k, budget)

    def heard(self, key: str) -> None:
        """``key``'s hook was heard from (a hello)."""
        self._last_seen[key] = time.monotonic()

    def stop(self) -> None:
        """Ask the loop to finish (safe from a signal handler: it wakes the loop, which
        would otherwise sleep out its poll interval)."""
        self._stopping = True
        self.transport.wake()

    @property
    def last_wake(self) -> float:
        """``time.monotonic()`` at the loop's latest wake-up (its heartbeat; see liveness)."""
        return self._now

    def serve_forever(self, poll: float = 0.25) -> None:
        self.live.start()
        self._now = time.monotonic()
        try:
            self.woken()
            self.transport.release()
            live = self.live
            while not self._stopping:
                ready = self.transport.select(poll if not live.applying else min(
                    poll, max(0.0, live.resume_at - time.monotonic())))
                self._now = time.monotonic()
                self.transport.serve(ready)
                if live.applying and self._now >= live.resume_at:
                    live.drain()  # a file many runs share: its next slice of runs
                self.transport.release()  # the group commit, then the replies it holds
                now = time.monotonic()
                if now >= self.checkpoints.next_due:
                    self.checkpoints.save_due(now)
                if now >= self.transport.admission.resume_at:
                    self.transport.admission.tick(now)
                if now >= self._housekeeping_at:
                    self._housekeeping_at = now + self.limits.housekeeping_interval
                    self.sink.tick()
                    if (self.sink.failing("restore") and self.state_watch.foreign is None
                            and self.state_watch.error is None):  # (deleted on a full disk)
                        self.sink.restore()
                    self.checkpoints.retry_removals()
                    if self.state_watch.check():
                        self._state_dir_recreated()
                    self.store.foreign = self.state_watch.foreign
                    self.upkeep.tick(now)
                    self._evict_idle()
                    self._exit_if_idle()
                    self.handshakes.expire(now)
                    self.transport.housekeeping(now)
        finally:
            self._shutdown()

    def _shutdown(self) -> None:
        """Stop within about two seconds however many runs and whatever MLflow's state: the
        journal is committed and every run whose hook is gone checkpointed; runs with a
        hook are checkpointed for up to ``Limits.shutdown_budget_s`` (their hooks replay
        the rest), and MLflow gets what time is left (the next start ships the rest)."""
        # What hooks that hung up had sent and the loop had not applied yet (a share a
        # wake-up: see Transport._hung_up) is applied first: it may end their runs.
        self.transport.finish_hung_up(time.monotonic() + self.limits.shutdown_budget_s)
        deadline = time.monotonic() + self.limits.shutdown_budget_s
        self.handshakes.stop()
        self.live.stop()
        self.checkpoints.stop()
        # A hook that hung up replays nothing: its run is saved first, as one with no hook.
        hooked = {key for key, conn in self.conns.items() if not conn.dead}
        saved = self.checkpoints.save_all(hooked=hooked, deadline=deadline)
        self.transport.close()
        self.sink.close()
        self.store.close()
        self.state_watch.close()
        log.info("controller stopped; %d run(s) held, %d checkpoint(s) written at shutdown "
                 "(the others were up to date)", len(self.sessions), saved)

    # -- the transport's handler ---------------------------------------------------------
    def handle(self, conn: Conn, msg: dict[str, Any]) -> None:
        t = msg["t"]
        if t == "obs":
            self._obs(conn, msg)
        elif t == "hello":
            self.handshakes.hello(conn, msg)
        elif t == "bye":
            self._bye(conn)
        elif t == "late":
            self._late(conn, msg)
        elif t == "snapshot":
            self._snapshot(conn)
        elif t == "runs":
            self.transport.send_frame(conn, self._runs_frame())
        elif t in operator.OPERATOR_TYPES:
            reply = operator.answer(self, t, msg)
            self._runs_cache = None  # (a change an operator made shows at once)
            self.transport.send(conn, reply, MAX_HELLO)
        else:
            raise ProtocolError(f"unknown message type {t!r:.40}", "bad_message")

    def disconnected(self, conn: Conn, save: bool) -> None:
        self.handshakes.dropped(conn)
        if conn.run is not None and self.conns.get(conn.run) is conn:
            del self.conns[conn.run]
            session = self.sessions.get(conn.run)
            if save and session is not None:
                self.checkpoints.save(conn.run)  # the hook is gone: not only in memory
                log.info("run %s: its hook went without a goodbye after step %s; the run is "
                         "held (a reconnect resumes it)", conn.run, session.last_step)
                self._bound_hookless(conn.run, session)

    def commit(self) -> None:
        self.sink.commit()

    def woken(self) -> None:
        self.checkpoints.finished()
        self.live.drain()
        self.handshakes.finished()

    def _runs_frame(self) -> bytes:
        """The ``runs`` answer, a table of every run held: built at most every
        :data:`RUNS_FRESH_S` while the runs, their connections and decisions stay the same
        (a step or an LR between decisions may be that much older; with 300 runs one
        table takes 20-35 ms, and many peers asking at once starved the training runs of
        the loop's time)."""
        now = time.monotonic()
        key = (len(self.sessions), len(self.conns), self.decided)
        cached = self._runs_cache
        if cached is None or cached[1] != key or now - cached[0] > RUNS_FRESH_S:
            frame = self.transport.encoded(operator.answer(self, "runs", {}), MAX_HELLO)
            self._runs_cache = cached = (now, key, frame)
        return cached[2]

    def publish(self, session: Session, decision: dict[str, Any],
                reloaded: bool = False) -> None:
        """A decision made off the hot path (an operator's, a reload's): journal it,
        checkpoint the run, and push the new LRs to its hook, which applies them on its
        next step. An operator's decision is checkpointed before the answer; a reload's
        off the loop (a file many runs share must not hold the loop for an fsync each:
        a restart before it is durable applies the file again, from the journal's
        record on)."""
        self._runs_cache = None
        self.decided += 1
        if reloaded:  # first: the reload's own decision is of the new policy version
            self.sink.policy_changed(session.key, session.info, decision)
        self.sink.decision(session.key, {**decision, "wall_time": time.time()})
        if reloaded:
            self.checkpoints.changed(session.key)
        else:
            self.checkpoints.save(session.key)
        conn = self.conns.get(session.key)
        if conn is not None:
            self.reply(conn, session, -1, session.lrs(), [decision], False, False)

    def _bye(self, conn: Conn) -> None:
        key = conn.run
        if key is None:
            return
        session = self.sessions.pop(key, None)
        self.conns.pop(key, None)
        conn.run = None
        self._last_seen.pop(key, None)
        self.checkpoints.forget(key)
        self.live.unwatch(key)
        if session is not None:
            self.checkpoints.delete(key)  # off the loop, after its checkpoint in flight
            if session.last_step < 0 and not session.engine.decision_count:
                # Ended before its first observation: a hook that rejoined another run
                # (lrctl.Scheduler's or ctl.load_state_dict() after attach), or one that
                # never trained. The journal decides whether there is anything to show
                # (a run rejoined by key after its end, or rewound, has).
                self.sink.discard_run(key)
                log.info("run %s ended before its first step", key)
                return
            self.sink.close_run(key)
            log.info("run %s ended at step %d", key, session.last_step)

    # -- housekeeping --------------------------------------------------------------------
    def _state_dir_recreated(self) -> None:
        """The state dir was deleted and made again: every open run's journal written back,
        every run checkpointed again."""
        try:  # (the journal's sink makes it; without one, nothing else would)
            paths.ensure_private_dir(self.store.dir, quiet=True)
        except OSError as exc:
            log.error("cannot make the checkpoints' directory again: %s", exc)
        self.store.refresh()
        self.sink.restore()
        for key in list(self.sessions):
            self.checkpoints.save(key)

    def _exit_if_idle(self) -> None:
        """``idle_exit``: stop once no hook has been connected for that long; and, whatever
        ``idle_exit``, once none is connected and none can connect again (the socket is
        another's now: a controller no one can reach would otherwise run for ever, out of
        sight of ``lrctl status`` and ``lrctl stop``)."""
        if self.conns:
            self._no_hook_since = self._now
            return
        if self.transport.admission.unreachable:
            log.warning("no hook is connected and none can reach this controller (its socket "
                        "%s is another's now): checkpointing %d run(s) and exiting",
                        self.transport.admission.socket_path, len(self.sessions))
            self.stop()
            return
        if self.idle_exit is not None and self._now - self._no_hook_since > self.idle_exit:
            log.info("no hook has been connected for %.0f s (--idle-exit %g): checkpointing "
                     "%d run(s) and exiting; the next attach() starts a new controller",
                     self._now - self._no_hook_since, self.idle_exit, len(self.sessions))
            self.stop()

    def _evict_idle(self) -> None:
        """Checkpoint and forget runs whose hook is gone for ``session_timeout`` seconds."""
        if self.session_timeout is None:
            return
        now = time.monotonic()
        for key in [k for k in self.sessions if k not in self.conns
                    and now - self._last_seen.get(k, now) > self.session_timeout]:
            if self._evict(key, f"no hook for {self.session_timeout:.0f} s (its process "
                                "ended without closing the run, or lost the controller)"):
                log.info("run %s evicted after %.0f s without its hook; its state stays on "
                         "disk and a reconnect resumes it", key, self.session_timeout)

    def _evict(self, key: str, reason: str) -> bool:
        """Checkpoint a run without a hook (unless its checkpoint is current) and forget it
        (False: its checkpoint failed, so its only copy is in memory, and it stays; or a
        hello for it is being answered, which counts on finding it held)."""
        if key in self.handshakes.pending:
            return False
        if not self.checkpoints.current(key):
            if self.checkpoints.retry_waits(key, time.monotonic()):
                return False  # (its only copy is in memory, and a try now would be wasted)
            self.checkpoints.save(key)
            if key in self.checkpoints.errors:
                return False
        self.sessions.pop(key)
        self._last_seen.pop(key, None)
        self.checkpoints.forget(key)
        self.store.detach(key)  # a start restores it no more; its hook's hello does
        self.live.unwatch(key)
        self.sink.drop_run(key, reason)
        return True
