"""The controller's event loop: one thread owns every session, socket and the sink.

A ``selectors`` loop multiplexes all connections without threads, so session
state has exactly one owner and needs no locks. The server keeps the registry of
runs (sessions, their hooks' connections, when each was last heard) and the hot
path (hello, observation, reply, bye); its collaborators each own one job:

* :mod:`~lrctl.daemon.transport`: connections, framing, authentication, the wake-up,
  and holding replies for the group commit; :mod:`~lrctl.daemon.admission`: the
  listeners, who gets a connection and who keeps one (caps, eviction, fd exhaustion);
* :mod:`~lrctl.daemon.handshake`: the ``hello`` (typed by :mod:`~lrctl.daemon.hello`):
  which session it joins, built off the loop, and who may take a run over;
* :mod:`~lrctl.daemon.operator`: the operator verbs;
* :mod:`~lrctl.daemon.live_reload`: watched policy files applied to running sessions;
* :mod:`~lrctl.daemon.checkpoints`: when each run is checkpointed, and by which thread;
* :mod:`~lrctl.daemon.guarded_sink`: the journal/MLflow sink, whose failures never
  end the loop.

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

import logging
import math
import socket
import time
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

from ..policy import ObservationError
from ..reload import DEFAULT_DEBOUNCE_S
from ..sinks import Sink
from ..wire.errors import ProtocolError
from ..wire.frames import MAX_HELLO
from ..wire.messages import encode_lr, float_in, get_int, prior_steps
from . import operator
from .checkpoints import Checkpoints
from .guarded_sink import GuardedSink
from .handshake import Handshakes
from .limits import DEFAULT_SESSION_TIMEOUT, Limits
from .live_reload import LiveReload
from .session import Session, Step
from .state_dir import StateDirWatch
from .store import StateStore
from .transport import Conn, Transport, Unavailable

__all__ = ["Server"]

log = logging.getLogger("lrctl.daemon")

_NO_METRICS: Mapping[str, float] = MappingProxyType({})


class Server:
    """Serve until :meth:`stop`; ``listeners`` are bound, listening sockets, each with
    whether its peers are trusted (Unix) or must show ``token`` first (TCP)."""

    def __init__(self, listeners: list[tuple[socket.socket, bool]], store: StateStore,
                 sink: Sink, *, token: str | None = None, socket_path: str = "",
                 state_dir: str = "", watch: bool = True, policies_dir: str | None = None,
                 session_timeout: float | None = DEFAULT_SESSION_TIMEOUT,
                 debounce_s: float = DEFAULT_DEBOUNCE_S,
                 idle_exit: float | None = None, limits: Limits | None = None,
                 pacing: bool = True) -> None:
        self.limits = limits or Limits()
        self.store = store
        self.state_dir = state_dir
        self.session_timeout = session_timeout
        self.idle_exit = idle_exit
        self.sessions: dict[str, Session] = {}
        self.conns: dict[str, Conn] = {}  # run key -> its hook's connection
        self._last_seen: dict[str, float] = {}  # run key -> when its hook was last heard
        self.started = time.monotonic()
        self._stopping = False
        self._no_hook_since = self.started  # when the last hook left (or the start)
        self._housekeeping_at = 0.0
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
                self.adopt(key, session)
            except (ValueError, KeyError, TypeError) as exc:
                log.error("cannot restore run %s: %s; its checkpoint is left in place", key, exc)
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
        """Open (or reopen) the session's records with its current :class:`RunInfo`."""
        error = self.sink.open_run(session.info)
        if error is not None:  # a run whose decisions cannot be journaled is not served
            raise Unavailable(f"cannot journal run {session.key}: {error}")

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
            while not self._stopping:
                ready = self.transport.select(poll)
                self._now = time.monotonic()
                self.transport.serve(ready)
                self.transport.release()  # the group commit, then the replies it holds
                now = time.monotonic()
                if now >= self.checkpoints.next_due:
                    self.checkpoints.save_due(now)
                if now >= self.transport.admission.resume_at:
                    self.transport.admission.tick(now)
                if now >= self._housekeeping_at:
                    self._housekeeping_at = now + self.limits.housekeeping_interval
                    self.sink.tick()
                    if self.state_watch.check():
                        self._state_dir_recreated()
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
        deadline = time.monotonic() + self.limits.shutdown_budget_s
        self.handshakes.stop()
        self.live.stop()
        self.checkpoints.stop()
        saved = self.checkpoints.save_all(hooked=self.conns, deadline=deadline)
        self.transport.close()
        self.sink.close()
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
        elif t == "snapshot":
            self._snapshot(conn)
        elif t in operator.OPERATOR_TYPES:
            reply = operator.answer(self, t, msg)
            self.transport.send(conn, reply, MAX_HELLO)  # a table of many runs
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

    def commit(self) -> None:
        self.sink.commit()

    def woken(self) -> None:
        self.checkpoints.finished()
        self.live.drain()
        self.handshakes.finished()

    # -- the hot path ------------------------------------------------------------------
    def _snapshot(self, conn: Conn) -> None:
        """The run's state for the user's checkpoint (``ctl.state_dict()``)."""
        session = self.sessions.get(conn.run or "")
        if session is None:
            raise ProtocolError("snapshot before hello", "bad_message")
        self.transport.send(conn, {"t": "snapshot", "s": session.last_step,
                                   "session": session.to_state()}, MAX_HELLO)

    def _obs(self, conn: Conn, msg: Mapping[str, Any]) -> None:
        """One observation: the hot path (a plain one allocates next to nothing here)."""
        key = conn.run
        if key is None:
            raise ProtocolError("obs before hello", "bad_message")
        session = self.sessions.get(key)
        if session is None:
            raise ProtocolError(f"run {key} is no longer served; reconnect", "no_such_run")
        self._last_seen[key] = self._now
        step = msg.get("s")
        if type(step) is not int or not 0 <= step <= 2**62:
            step = get_int(msg, "s")  # raises the error that names the problem
            assert step is not None
        loss = msg.get("l")
        grad = msg.get("g")
        raw_metrics = msg.get("m")
        metrics: Mapping[str, float] = _NO_METRICS
        if raw_metrics:
            if not isinstance(raw_metrics, dict):
                raise ProtocolError("m must be an object of named metrics", "bad_message")
            metrics = {str(k): float_in(v, f"metric {k!r:.40}") for k, v in raw_metrics.items()}
        # The hook carried out a rollback before this step: the snapshot step it restored.
        restored = None if msg.get("r") is None else get_int(msg, "r", hi=step)
        prior = prior_steps(msg, step)  # every="auto": the steps held back, oldest first
        if step <= session.last_step:
            # A replay that overlaps what the restored session has seen, or a hook counting
            # from behind it: answered (with its step, so the hook waits for it no longer),
            # not applied.
            self.transport.send(conn, {"t": "error", "code": "stale_step", "s": step,
                                       "fatal": False, "message": f"step {step} already "
                                       f"observed (last step {session.last_step})"})
            return
        try:
            loss = None if loss is None else loss if type(loss) is float else float_in(
                loss, "loss")
            grad = None if grad is None else grad if type(grad) is float else float_in(
                grad, "grad_norm")
            # The LRs the optimizer used at this step: an async hook applies the answer to
            # step t at step t + 1 (so step t ran on what was decided before it); a sync
            # hook waits for the answer to t and applies it to t's own optimizer step.
            used = None if session.sync else session.lrs()
            base = msg.get("b")
            if base is not None:  # base="loop": the loop's own LRs, scaled by lrctl's
                base = _base_lrs(base, len(session.engine.initial_lrs))
            held = self._observe_held(key, session, prior, used) if prior else None
            result = session.observe(step, loss, grad, metrics)
            if held is not None:
                result.decisions[:0] = held.decisions
                result.stop = result.stop or held.stop
        except ObservationError as exc:
            raise ProtocolError(str(exc), "bad_observation") from None
        if msg.get("o") is True:
            session.overflows += 1  # a GradScaler overflow: counted, never divergence
        if restored is not None:
            result.decisions.append(session.rolled_back(step, restored))
        used = result.lrs if used is None else used
        if base is not None:
            used = session.used_lrs(used, base)
        self.sink.observation(key, step, loss, grad, used)
        for d in result.decisions:
            self.sink.decision(key, {**d, "wall_time": time.time()})
        self.checkpoints.observed(key, session, self._now)
        self.reply(conn, session, step, result.lrs, result.decisions, result.skip, result.stop)

    def _observe_held(self, key: str, session: Session,
                      prior: list[tuple[int, float | None, float | None]],
                      used: list[float] | None) -> Step:
        """The held steps of a batched ``obs``, each observed in order; they ran on the
        LRs in effect before the frame (the hook applies answers at its reports)."""
        held = Step([], [], False, False)
        for s, loss, grad in prior:
            if s <= session.last_step:
                continue  # a replay overlapping what a restored session has seen
            result = session.observe(s, loss, grad, _NO_METRICS)
            self.sink.observation(key, s, loss, grad, result.lrs if used is None else used)
            held.decisions += result.decisions
            held.stop = held.stop or result.stop
        return held

    def reply(self, conn: Conn, session: Session, step: int, lrs: list[float],
              decisions: list[dict[str, Any]], skip: bool, stop: bool) -> None:
        if not decisions:
            frame = encode_lr(step, lrs, skip, stop, session.mode, session.saved_step)
            if frame is not None:  # the usual reply, the same bytes without json.dumps
                self.transport.send_frame(conn, frame)
                return
        per_frame = operator.MAX_DECISIONS_PER_FRAME
        for i in range(0, max(len(decisions), 1), per_frame):
            self.transport.send(conn, {"t": "lr", "s": step, "lrs": lrs, "skip": skip,
                                       "stop": stop, "mode": session.mode,
                                       "saved_step": session.saved_step,
                                       "d": decisions[i:i + per_frame]})

    def publish(self, session: Session, decision: dict[str, Any],
                reloaded: bool = False) -> None:
        """A decision made off the hot path (an operator's, a reload's): journal it,
        checkpoint the run, and push the new LRs to its hook, which applies them on its
        next step."""
        self.sink.decision(session.key, {**decision, "wall_time": time.time()})
        if reloaded:
            self.sink.policy_changed(session.key, session.info, decision)
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
            self.sink.close_run(key)
            log.info("run %s ended at step %d", key, session.last_step)

    # -- housekeeping --------------------------------------------------------------------
    def _state_dir_recreated(self) -> None:
        """The state dir was deleted and made again: every open run's journal written back,
        every run checkpointed again."""
        self.sink.restore()
        for key in list(self.sessions):
            self.checkpoints.save(key)

    def _exit_if_idle(self) -> None:
        """``idle_exit``: stop once no hook has been connected for that long."""
        if self.conns:
            self._no_hook_since = self._now
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
            self.checkpoints.save(key)
            if key in self.checkpoints.errors:
                continue  # its only copy is in memory: keep it
            self.sessions.pop(key)
            self._last_seen.pop(key, None)
            self.checkpoints.forget(key)
            self.live.unwatch(key)
            self.sink.drop_run(key, f"no hook for {self.session_timeout:.0f} s (its process "
                                    "ended without closing the run, or lost the controller)")
            log.info("run %s evicted after %.0f s without its hook; its state stays on disk "
                     "and a reconnect resumes it", key, self.session_timeout)


def _base_lrs(value: Any, groups: int) -> list[float]:
    """The ``b`` of an observation: one finite LR >= 0 per param group."""
    if not isinstance(value, list) or len(value) != groups:
        raise ProtocolError(f"b must be a list of {groups} LRs", "bad_message")
    out = [float_in(v, "b") for v in value]
    if not all(math.isfinite(v) and v >= 0 for v in out):
        raise ProtocolError("b must hold finite LRs >= 0", "bad_message")
    return out
