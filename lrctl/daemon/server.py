"""The controller's event loop: one thread owns every session, socket and the sink.

A ``selectors`` loop multiplexes all connections without threads, so session
state has exactly one owner and needs no locks. Each connection is a hook (after
``hello``) or an operator (one request, one answer). Bad input from one
connection earns it an ``error`` frame, and for broken frames a closed
connection; it never disturbs the loop or the other runs.

Persistence: a session is checkpointed when it starts, after
:data:`SAVE_EVERY` observations or :data:`SAVE_INTERVAL` seconds with unsaved
ones, on operator commands, when its hook disconnects, and at shutdown. Every
reply tells the hook the last checkpointed step (``saved_step``), so the hook
keeps just the observations after it and can replay them after a crash.
The checkpoints the hot path asks for (every SAVE_EVERY observations and the
timed ones) are encoded on the loop and written, with their fsyncs, by a
:class:`~lrctl.daemon.store.CheckpointWriter` thread; ``saved_step`` advances
when the loop learns that the file is durable. The rarer ones (a new run, an
operator command, a reload, a disconnect, eviction, shutdown) are written at
once, after any write of the same run still in flight.
A checkpoint that cannot be written is logged and shown by ``runs``/``status``;
the run goes on from memory.

Live policy editing: one :class:`~lrctl.reload.PolicyWatcher` watches every
file a session runs (and ``--policies DIR``). Its thread only puts events on a
queue and writes a byte to a wake-up socketpair registered in the selector; the
loop applies them at once (not at the next observation), so the new LRs are
pushed to the hook as an ``lr`` frame with ``s = -1``.

Housekeeping, once a second: a session with no hook for ``session_timeout``
seconds is checkpointed and dropped from memory (a late reconnect restores it
from disk), and a socket file that was removed is bound again.
"""

from __future__ import annotations

import contextlib
import hmac
import logging
import math
import os
import queue
import selectors
import socket
import time
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any

from .._version import __version__
from ..config import ConfigError
from ..paths import RUN_KEY_MAX, is_run_key
from ..policy import ObservationError
from ..protocol import (
    MAX_FRAME,
    MAX_HELLO,
    FrameDecoder,
    ProtocolError,
    encode,
    encode_lr,
    float_in,
    get_int,
    get_str,
)
from ..reload import DEFAULT_DEBOUNCE_S, PolicyWatcher, ReloadEvent, read_policy_file
from ..sinks import Sink
from .session import Session, text_sha256
from .store import CheckpointWriter, StateStore

__all__ = ["Server"]

log = logging.getLogger("lrctl.daemon")

SAVE_EVERY = 256
MAX_DRAIN = 16 << 20  # bytes read from a hook that hung up, to apply what it sent
SAVE_INTERVAL = 1.0
MAX_CONNECTIONS = 1024
MAX_REMOTE_CONNECTIONS = 256  # TCP peers may not take the slots local hooks need
AUTH_TIMEOUT_S = 10.0
MAX_OUTBUF = 8 << 20
MAX_GROUPS = 4096
MAX_DECISIONS_PER_FRAME = 32
OPERATOR_TYPES = ("runs", "set_lr", "clear_lr", "pause", "resume", "status", "reload",
                  "decay")
DEFAULT_SESSION_TIMEOUT = 600.0
HOUSEKEEPING_INTERVAL = 1.0
_NO_METRICS: Mapping[str, float] = MappingProxyType({})


class Conn:
    __slots__ = ("authed", "dead", "decoder", "eof", "name", "opened", "out", "remote", "run",
                 "sock")

    def __init__(self, sock: socket.socket, authed: bool, name: str) -> None:
        self.sock = sock
        self.authed = authed
        self.remote = not authed  # a TCP peer: it must show the token, and soon
        self.opened = time.monotonic()
        self.name = name
        self.decoder = FrameDecoder(MAX_FRAME, first_limit=MAX_HELLO)
        self.out = bytearray()
        self.run: str | None = None
        self.eof = False  # the peer half-closed: flush the replies, then close
        self.dead = False  # a send failed: the peer is gone, but what it sent still counts


class Server:
    """Serve until :meth:`stop`; ``listeners`` are bound, listening sockets."""

    def __init__(self, listeners: list[tuple[socket.socket, bool]], store: StateStore,
                 sink: Sink, *, token: str | None = None, socket_path: str = "",
                 state_dir: str = "", watch: bool = True, policies_dir: str | None = None,
                 session_timeout: float | None = DEFAULT_SESSION_TIMEOUT,
                 debounce_s: float = DEFAULT_DEBOUNCE_S,
                 idle_exit: float | None = None) -> None:
        self.sel = selectors.DefaultSelector()
        self.store = store
        self.sink = sink
        self.token = token.encode("utf-8") if token else None
        self.socket_path = socket_path
        self.state_dir = state_dir
        self.sessions: dict[str, Session] = {}
        self.conns: dict[str, Conn] = {}  # run key -> its hook's connection
        self._last_save: dict[str, float] = {}
        self._listeners = [sock for sock, _ in listeners]
        self._stopping = False
        self._started = time.monotonic()
        self._nconns = 0
        self._reading: Conn | None = None  # the connection whose batch is being handled
        self.session_timeout = session_timeout
        self.idle_exit = idle_exit
        self._no_hook_since = time.monotonic()  # when the last hook left (or the start)
        self._last_seen: dict[str, float] = {}
        self._store_errors: dict[str, str] = {}
        self._sink_error: str | None = None
        self._housekeeping_at = 0.0
        # The loop's clock, read once per wake-up: when each run's hook was last heard.
        self._now = time.monotonic()
        # No session can be due for a time-based checkpoint before this (see _save_due).
        self._next_save_at = 0.0
        self._nremote = 0
        self._unix: socket.socket | None = None
        self._unix_id: tuple[int, int] | None = None
        for sock, authed in listeners:
            sock.setblocking(False)
            self.sel.register(sock, selectors.EVENT_READ, ("listen", authed))
            if sock.family == socket.AF_UNIX and self._unix is None and socket_path:
                self._unix = sock
                self._unix_id = _file_id(socket_path)
        # Live editing: the watcher thread hands events over through a queue and a wake-up.
        self._events: queue.SimpleQueue[ReloadEvent] = queue.SimpleQueue()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self.sel.register(self._wake_r, selectors.EVENT_READ, ("wake", None))
        # Checkpoints due on the hot path are written by a thread (see _save_soon).
        self._writer = CheckpointWriter(store, self._wake)
        self._saving: dict[str, int] = {}  # run key -> unsaved count its write in flight holds
        self.watcher = PolicyWatcher(self._on_reload_event, debounce_s=debounce_s) if watch \
            else None
        self._watched: dict[str, str] = {}  # run key -> the path it is watched under
        self.library: dict[str, str | None] = {}  # --policies files -> their error, if any
        if policies_dir is not None:
            self._load_library(policies_dir)
        self._restore()

    # -- lifecycle ---------------------------------------------------------------------
    def _restore(self) -> None:
        for key, state in self.store.load_all():
            try:
                session = Session.restore(state)
            except (ValueError, KeyError, TypeError) as exc:
                log.error("cannot restore run %s: %s; its checkpoint is left in place", key, exc)
                continue
            self._adopt(key, session)
            log.info("restored run %s at step %d (policy %s)", key, session.last_step,
                     session.info.policy_sha256[:12])
        # Catch up with edits made while the controller was down (same bytes: no-op).
        for path in sorted({p for p in self._watched.values()}):
            self._events.put(read_policy_file(path))

    def _adopt(self, key: str, session: Session) -> None:
        """A restored session joins the loop (at start, or when an evicted run returns)."""
        self.sessions[key] = session
        self._last_save[key] = time.monotonic()
        self._last_seen[key] = time.monotonic()
        self._sink("open_run", session.info)
        self._sync_watch(session)

    def stop(self) -> None:
        """Ask the loop to finish (safe from a signal handler)."""
        self._stopping = True

    @property
    def last_wake(self) -> float:
        """``time.monotonic()`` at the loop's latest wake-up (its heartbeat; see liveness)."""
        return self._now

    def serve_forever(self, poll: float = 0.25) -> None:
        if self.watcher is not None:
            self.watcher.start()
        self._now = time.monotonic()
        try:
            self._drain_events()
            while not self._stopping:
                ready = self.sel.select(timeout=poll)
                self._now = time.monotonic()
                for key, mask in ready:
                    kind, arg = key.data
                    if kind == "listen":
                        self._accept(key.fileobj, arg)  # type: ignore[arg-type]
                    elif kind == "wake":
                        self._drain_events()
                    elif mask & selectors.EVENT_READ and self._read(arg):
                        if mask & selectors.EVENT_WRITE:
                            self._flush(arg)
                    elif mask & selectors.EVENT_WRITE:
                        self._flush(arg)
                now = time.monotonic()
                if now >= self._next_save_at:
                    self._save_due()
                if now >= self._housekeeping_at:
                    self._housekeeping_at = now + HOUSEKEEPING_INTERVAL
                    self._evict_idle()
                    self._exit_if_idle()
                    self._drop_unauthenticated()
                    self._check_socket()
        finally:
            self._shutdown()

    def _shutdown(self) -> None:
        if self.watcher is not None and not self.watcher.stop(timeout=1.0):
            log.warning("the policy watcher did not stop within 1 s; leaving it behind")
        self._writer.stop()
        self._saved()
        self.sel.unregister(self._wake_r)
        self._wake_r.close()
        self._wake_w.close()
        for key in list(self.sessions):
            self._save(key)
        for conn in [k.data[1] for k in list(self.sel.get_map().values())
                     if k.data[0] == "conn"]:
            self._close(conn, save=False)
        for sock in self._listeners:
            with contextlib.suppress(KeyError, ValueError):
                self.sel.unregister(sock)
            sock.close()
        self.sel.close()
        self._sink("close")
        log.info("controller stopped; %d run(s) checkpointed", len(self.sessions))

    # -- sockets -----------------------------------------------------------------------
    def _accept(self, listener: socket.socket, authed: bool) -> None:
        while True:
            try:
                sock, addr = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.warning("accept failed: %s", exc)
                return
            if self._nconns >= MAX_CONNECTIONS or (
                    not authed and self._nremote >= MAX_REMOTE_CONNECTIONS):
                log.warning("refusing a connection: %d open (%d over TCP)", self._nconns,
                            self._nremote)
                sock.close()
                continue
            sock.setblocking(False)
            conn = Conn(sock, authed, str(addr) if addr else "unix")
            self._nconns += 1
            self._nremote += conn.remote
            self.sel.register(sock, selectors.EVENT_READ, ("conn", conn))

    def _read(self, conn: Conn) -> bool:
        """Read and handle what arrived; False when the connection was closed."""
        try:
            data = conn.sock.recv(1 << 16)
        except (BlockingIOError, InterruptedError):
            return True
        except OSError:
            data = b""
        if not data:
            if conn.out:  # answer what it asked before it hung up its end
                conn.eof = True
                self.sel.modify(conn.sock, selectors.EVENT_WRITE, ("conn", conn))
                return True
            self._close(conn)
            return False
        try:
            messages = conn.decoder.feed(data)
        except ProtocolError as exc:
            self._fail(conn, exc.code, str(exc))
            return False
        self._handle(conn, messages)
        if conn.dead:
            self._hung_up(conn)
            return False
        return conn.sock.fileno() >= 0

    def _handle(self, conn: Conn, messages: list[dict[str, Any]]) -> None:
        """Dispatch ``messages``; a reply that cannot be sent marks ``conn`` dead, and the
        rest are still applied (a hook that hung up right after sending is gone when we
        answer: what it sent before is applied, and checkpointed when it is closed)."""
        previous, self._reading = self._reading, conn  # an operator's push may land here
        try:
            for msg in messages:
                if conn.sock.fileno() < 0:
                    return
                try:
                    self._dispatch(conn, msg)
                except ProtocolError as exc:
                    self._send(conn, {"t": "error", "code": exc.code, "message": str(exc),
                                      "fatal": False})
                except Exception as exc:  # a bug (or a plugin's) must not end every run
                    log.exception("internal error handling a %r message", msg.get("t"))
                    self._send(conn, {"t": "error", "code": "internal",
                                      "message": f"controller error: {exc!r}", "fatal": False})
        finally:
            self._reading = previous

    def _hung_up(self, conn: Conn) -> None:
        """A reply could not be sent: the hook closed its end, often right after its last
        observations and its ``bye`` (``ctl.close()`` does not wait for answers). What it
        sent is all in our receive buffer: apply it, up to :data:`MAX_DRAIN` bytes, then
        close, so that the run ends (or stays resumable) exactly as the hook left it."""
        budget = MAX_DRAIN
        while budget > 0 and conn.sock.fileno() >= 0:
            try:
                data = conn.sock.recv(1 << 16)
            except OSError:  # nothing more (or a reset): done
                break
            if not data:
                break
            budget -= len(data)
            try:
                messages = conn.decoder.feed(data)
            except ProtocolError as exc:
                log.warning("closing %s: %s", conn.run or conn.name, exc)
                break
            self._handle(conn, messages)
        self._close(conn)

    def _send(self, conn: Conn, msg: Mapping[str, Any], limit: int = MAX_FRAME) -> None:
        if conn.dead:
            return
        try:
            frame = encode(msg, limit)
        except ProtocolError:
            frame = encode(_slim(msg), limit)
        except ValueError as exc:  # a non-finite float slipped through: a bug, not a crash
            log.error("cannot encode a %s frame: %s", msg.get("t"), exc)
            frame = encode({"t": "error", "code": "internal", "message": str(exc),
                            "fatal": False})
        self._send_frame(conn, frame)

    def _send_frame(self, conn: Conn, frame: bytes) -> None:
        if conn.dead:
            return
        if conn.out:
            conn.out += frame
        else:
            try:
                sent = conn.sock.send(frame)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError:
                conn.dead = True
                if self._reading is not conn:
                    self._hung_up(conn)
                return
            if sent < len(frame):
                conn.out += frame[sent:]
                self.sel.modify(conn.sock, selectors.EVENT_READ | selectors.EVENT_WRITE,
                                ("conn", conn))
        if len(conn.out) > MAX_OUTBUF:
            log.warning("closing %s: it does not read its replies", conn.run or conn.name)
            self._close(conn)

    def _flush(self, conn: Conn) -> None:
        if conn.sock.fileno() < 0:
            return
        try:
            sent = conn.sock.send(conn.out)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            conn.dead = True
            self._hung_up(conn)
            return
        del conn.out[:sent]
        if not conn.out:
            if conn.eof:
                self._close(conn)
                return
            self.sel.modify(conn.sock, selectors.EVENT_READ, ("conn", conn))

    def _fail(self, conn: Conn, code: str, message: str) -> None:
        """An error frame, best effort, then close: for input we cannot go on from."""
        log.warning("closing %s: %s", conn.run or conn.name, message)
        try:
            conn.sock.setblocking(True)
            conn.sock.settimeout(0.5)
            conn.sock.sendall(bytes(conn.out) + encode(
                {"t": "error", "code": code, "message": message, "fatal": True}))
        except OSError:
            pass
        self._close(conn)

    def _close(self, conn: Conn, save: bool = True) -> None:
        if conn.sock.fileno() < 0:
            return
        self.sel.unregister(conn.sock)
        conn.sock.close()
        self._nconns -= 1
        self._nremote -= conn.remote
        if conn.run is not None and self.conns.get(conn.run) is conn:
            del self.conns[conn.run]
            if save and conn.run in self.sessions:
                self._save(conn.run)  # the hook is gone: do not leave state only in memory

    # -- messages ----------------------------------------------------------------------
    def _dispatch(self, conn: Conn, msg: dict[str, Any]) -> None:
        t = msg["t"]
        if not conn.authed:
            self._authenticate(conn, msg)
            if not conn.authed:
                return
        if t == "obs":
            self._obs(conn, msg)
        elif t == "hello":
            self._hello(conn, msg)
        elif t == "bye":
            self._bye(conn)
        elif t in OPERATOR_TYPES:
            self._send(conn, self._operator(t, msg), MAX_HELLO)  # a table of many runs
        else:
            raise ProtocolError(f"unknown message type {t!r:.40}", "bad_message")

    def _authenticate(self, conn: Conn, msg: Mapping[str, Any]) -> None:
        given = msg.get("token")
        if (self.token is not None and isinstance(given, str)
                and hmac.compare_digest(given.encode("utf-8"), self.token)):
            conn.authed = True
            return
        self._fail(conn, "unauthorized",
                   "a valid token is required on TCP (set LRCTL_TOKEN or LRCTL_TOKEN_FILE)")

    def _hello(self, conn: Conn, msg: Mapping[str, Any]) -> None:
        if conn.run is not None:
            raise ProtocolError("hello sent twice on one connection", "bad_message")
        key = get_str(msg, "run", max_len=RUN_KEY_MAX)
        assert key is not None
        if not is_run_key(key):  # no "/" and no leading ".": cannot leave the state dir
            self._fail(conn, "bad_message", f"bad run key {key!r}: letters, digits, ._- only")
            return
        policy = msg.get("policy")
        if not isinstance(policy, dict):
            raise ProtocolError("policy must be an object {text, source}", "bad_message")
        text = get_str(policy, "text", max_len=MAX_HELLO)
        source = get_str(policy, "source", max_len=4096)
        lrs = _lrs(msg.get("lrs"))
        if get_int(msg, "groups", lo=1, hi=MAX_GROUPS) != len(lrs):
            raise ProtocolError(f"groups says {msg.get('groups')} but lrs has {len(lrs)}",
                                "bad_message")
        mlflow = msg.get("mlflow") or {}
        if not isinstance(mlflow, dict):
            raise ProtocolError("mlflow must be an object {run_id, tracking_uri}", "bad_message")
        watch = msg.get("watch", True)
        if not isinstance(watch, bool):
            raise ProtocolError(f"watch must be true or false, but got {watch!r:.40}",
                                "bad_message")
        total_steps = get_int(msg, "total_steps", lo=1, optional=True)
        sync = msg.get("sync", False)
        if not isinstance(sync, bool):
            raise ProtocolError(f"sync must be true or false, but got {sync!r:.40}",
                                "bad_message")
        if source is not None and not source.startswith("<"):
            source = _clean_source(source)
        session = self.sessions.get(key)
        if session is None:
            session = self._from_disk(key)
        restored = session is not None
        if session is None:
            try:
                session = Session.create(
                    key=key, run_name=get_str(msg, "run_name", max_len=250) or key,
                    policy_text=text or "", policy_source=source or "<string>", lrs=lrs,
                    world_size=get_int(msg, "world_size", lo=1, hi=1 << 20, optional=True) or 1,
                    total_steps=total_steps,
                    mlflow_run_id=get_str(mlflow, "run_id", max_len=64, optional=True),
                    tracking_uri=get_str(mlflow, "tracking_uri", max_len=4096, optional=True),
                    cwd=get_str(msg, "cwd", max_len=4096, optional=True))
            except ConfigError as exc:
                self._fail(conn, "bad_policy", str(exc))
                return
            session.watch = watch
            self.sessions[key] = session
            self._sink("open_run", session.info)
            self._save(key)
            self._sync_watch(session)
            log.info("run %s started (%d group(s), policy %s%s)", key, len(lrs), source,
                     "" if session.watch_path else ", not watched")
        elif list(session.engine.initial_lrs) != lrs or text_sha256(text or "") not in (
                session.hello_sha256, session.info.policy_sha256):
            # After a live reload the hook still sends the text it started with.
            self._fail(conn, "run_conflict",
                       f"run {key} exists with a different policy or initial LRs")
            return
        elif total_steps is not None and total_steps != session.total_steps:
            # A run resumed with a new length (max_steps raised): the anneal follows it.
            log.info("run %s: total_steps %s -> %d", key, session.total_steps, total_steps)
            session.set_total_steps(total_steps)
            self._save(key)
        session.sync = sync  # which LRs the optimizer used at a step (see _obs)
        self._last_seen[key] = time.monotonic()
        old = self.conns.get(key)
        if old is not None and old is not conn:
            log.info("run %s reconnected; dropping its old connection", key)
            self._close(old, save=False)
        conn.run = key
        self.conns[key] = conn
        self._send(conn, {"t": "welcome", "version": __version__, "run": key,
                          "last_step": session.last_step,
                          "saved_step": session.saved_step, "lrs": session.lrs(),
                          "mode": session.mode, "restored": restored,
                          "policy_sha256": session.info.policy_sha256})

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
        if step <= session.last_step:
            # A replay that overlaps what the restored session has seen: answer, don't apply.
            raise ProtocolError(f"step {step} already observed (last step "
                                f"{session.last_step})", "stale_step")
        try:
            loss = None if loss is None else loss if type(loss) is float else float_in(
                loss, "loss")
            grad = None if grad is None else grad if type(grad) is float else float_in(
                grad, "grad_norm")
            # The LRs the optimizer used at this step: an async hook applies the answer to
            # step t at step t + 1 (so step t ran on what was decided before it); a sync
            # hook waits for the answer to t and applies it to t's own optimizer step.
            used = None if session.sync else session.lrs()
            result = session.observe(step, loss, grad, metrics)
        except ObservationError as exc:
            raise ProtocolError(str(exc), "bad_observation") from None
        try:
            self.sink.observation(key, step, loss, grad, result.lrs if used is None else used)
        except Exception as exc:
            self._sink_failed("observation", exc)
        if result.decisions:
            for d in result.decisions:
                self._sink("decision", key, {**d, "wall_time": time.time()})
        if session.unsaved >= SAVE_EVERY and (
                key not in self._store_errors  # a failing disk: retry at SAVE_INTERVAL
                or self._now - self._last_save.get(key, 0.0) >= SAVE_INTERVAL):
            self._save_soon(key)
        elif session.unsaved == 1:  # it has something to checkpoint again
            self._next_save_at = min(self._next_save_at,
                                     self._last_save.get(key, 0.0) + SAVE_INTERVAL)
        self._reply(conn, session, step, result.lrs, result.decisions, result.skip, result.stop)

    def _reply(self, conn: Conn, session: Session, step: int, lrs: list[float],
               decisions: list[dict[str, Any]], skip: bool, stop: bool) -> None:
        if not decisions:
            frame = encode_lr(step, lrs, skip, stop, session.mode, session.saved_step)
            if frame is not None:  # the usual reply, the same bytes without json.dumps
                self._send_frame(conn, frame)
                return
        first, rest = decisions[:MAX_DECISIONS_PER_FRAME], decisions[MAX_DECISIONS_PER_FRAME:]
        self._send(conn, {"t": "lr", "s": step, "lrs": lrs, "skip": skip, "stop": stop,
                          "mode": session.mode, "saved_step": session.saved_step, "d": first})
        while rest:
            chunk, rest = rest[:MAX_DECISIONS_PER_FRAME], rest[MAX_DECISIONS_PER_FRAME:]
            self._send(conn, {"t": "lr", "s": step, "lrs": lrs, "skip": skip, "stop": stop,
                              "mode": session.mode, "saved_step": session.saved_step,
                              "d": chunk})

    def _bye(self, conn: Conn) -> None:
        key = conn.run
        if key is None:
            return
        session = self.sessions.pop(key, None)
        self.conns.pop(key, None)
        conn.run = None
        self._last_save.pop(key, None)
        self._last_seen.pop(key, None)
        self._store_errors.pop(key, None)
        self._unwatch(key)
        if session is not None:
            if key in self._saving:  # its checkpoint must not land after the delete
                self._writer.wait()
                self._saved()
            self.store.delete(key)
            self._sink("close_run", key)
            log.info("run %s ended at step %d", key, session.last_step)

    def _operator(self, t: str, msg: Mapping[str, Any]) -> dict[str, Any]:
        if t == "status":
            errors = [f"run {s.key}: reload: {s.reload_error}" for s in self.sessions.values()
                      if s.reload_error]
            errors += [f"run {k}: checkpoint: {e}" for k, e in self._store_errors.items()]
            errors += [f"policies: {e}" for e in self.library.values() if e]
            if self._sink_error:
                errors.append(f"sink: {self._sink_error}")
            return {"t": "status", "pid": os.getpid(), "version": __version__,
                    "runs": len(self.sessions), "connected": len(self.conns),
                    "uptime_s": round(time.monotonic() - self._started, 3),
                    "socket": self.socket_path, "state_dir": self.state_dir,
                    "watching": [] if self.watcher is None else self.watcher.watched(),
                    "errors": errors[:50]}
        if t == "runs":
            return {"t": "runs", "runs": [
                {**s.summary(), "connected": k in self.conns,
                 "store_error": self._store_errors.get(k)}
                for k, s in sorted(self.sessions.items())]}
        if t == "reload":
            return self._operator_reload(get_str(msg, "run", max_len=96, optional=True))
        key = get_str(msg, "run", max_len=96)
        session = self._find(key or "")
        if t == "set_lr":
            lr = float_in(msg.get("lr"), "lr")
            if not math.isfinite(lr) or lr < 0:
                raise ProtocolError(f"lr must be finite and >= 0, but got {lr!r}", "bad_message")
            steps = get_int(msg, "steps", lo=1, optional=True)
            decision = session.set_lr(lr, steps)
        elif t == "clear_lr":
            decision = session.clear_lr()
        elif t == "decay":
            decision = session.decay(msg)
        else:
            decision = session.set_mode("shadow" if t == "pause" else "active")
        self._sink("decision", session.key, {**decision, "wall_time": time.time()})
        self._save(session.key)
        conn = self.conns.get(session.key)
        if conn is not None:  # push: the run applies it on its next step
            self._reply(conn, session, -1, session.lrs(), [decision], False, False)
        log.info("operator: %s on run %s", t, session.key)
        return {"t": "ok", "run": session.key, "message": decision["reason"],
                "decision": decision}

    def _find(self, name: str) -> Session:
        """A session by run key, or by a run name or key prefix that names exactly one."""
        if name in self.sessions:
            return self.sessions[name]
        found = [s for k, s in self.sessions.items()
                 if s.info.run_name == name or k.startswith(name)] if name else []
        if len(found) == 1:
            return found[0]
        if not found:
            raise ProtocolError(f"no run named {name!r}; see 'lrctl runs'", "no_such_run")
        raise ProtocolError(f"{name!r} matches {len(found)} runs: "
                            f"{', '.join(sorted(s.key for s in found))}", "ambiguous_run")

    # -- live policy editing ---------------------------------------------------------------
    def _on_reload_event(self, event: ReloadEvent) -> None:
        """Runs on the watcher's thread: hand the event over and wake the loop, nothing else."""
        self._events.put(event)
        self._wake()

    def _wake(self) -> None:
        """Wake the loop (from another thread)."""
        with contextlib.suppress(OSError):  # full: the loop is awake already
            self._wake_w.send(b"\0")

    def _drain_events(self) -> None:
        with contextlib.suppress(OSError):
            while self._wake_r.recv(4096):
                pass
        self._saved()
        while True:
            try:
                event = self._events.get_nowait()
            except queue.Empty:
                return
            self._apply_event(event)

    def _sync_watch(self, session: Session) -> None:
        """Watch the session's file under the right path (or none when pinned)."""
        want = session.watch_path
        have = self._watched.get(session.key)
        if want == have or self.watcher is None:
            return
        self._unwatch(session.key)
        if want is not None:
            try:
                self.watcher.watch(want, session.info.policy_sha256)
            except OSError as exc:  # e.g. the inotify watch limit: run on, unwatched
                session.reload_error = f"cannot watch {want}: {exc.strerror or exc}"
                log.error("run %s: %s", session.key, session.reload_error)
                return
            self._watched[session.key] = want

    def _unwatch(self, key: str) -> None:
        path = self._watched.pop(key, None)
        if path is not None and self.watcher is not None:
            self.watcher.unwatch(path)

    def _load_library(self, directory: str) -> None:
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

    def _apply_event(self, event: ReloadEvent,
                     only: list[Session] | None = None) -> list[dict[str, Any]]:
        """Apply a file's new version to every session running it; their decisions."""
        path = os.path.normpath(event.path)
        targets = only if only is not None else [
            s for s in self.sessions.values() if s.watch_path == path]
        if path in self.library:
            self.library[path] = event.error
        if event.status == "missing":
            log.warning("%s; %d run(s) keep their current policy until it returns",
                        event.error, len(targets))
            return []
        if event.status == "invalid":
            log.error("reload rejected, %d run(s) keep the old version: %s", len(targets),
                      event.error)
        out = []
        for session in targets:
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
                    continue
                try:
                    decision = session.reload(event.policy, event.forced)
                except (ConfigError, ValueError) as exc:
                    log.error("run %s cannot take %s: %s", session.key, path, exc)
                    decision = session.reload_failed(str(exc), event.sha256)
                else:
                    log.info("run %s: %s", session.key, decision["reason"])
            else:
                decision = session.reload_failed(event.error or "invalid", event.sha256)
            self._sink("decision", session.key, {**decision, "wall_time": time.time()})
            self._sink("policy_changed", session.key, session.info, decision)
            self._save(session.key)
            self._sync_watch(session)  # the new version may say watch: false
            conn = self.conns.get(session.key)
            if conn is not None:
                self._reply(conn, session, -1, session.lrs(), [decision], False, False)
            out.append(decision)
        return out

    def _operator_reload(self, name: str | None) -> dict[str, Any]:
        """``lrctl reload [RUN]``: read the file(s) now and apply even unchanged bytes."""
        if name:
            session = self._find(name)
            if session.watch_path is None:
                raise ProtocolError(
                    f"run {session.key} is pinned to its policy version (not a file, "
                    "'watch: false' in the file, or attach(watch=False))", "pinned")
            sessions = [session]
        else:
            sessions = [s for s in self.sessions.values() if s.watch_path is not None]
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
            decisions += self._apply_event(event, only=group)
        log.info("operator: reload of %d run(s)", len(sessions))
        lines = [f"{d['action']}: {d['reason']}" for d in decisions] + problems
        return {"t": "ok", "run": sessions[0].key if name else "*",
                "message": "; ".join(lines) or "no watched runs",
                "decisions": decisions[:MAX_DECISIONS_PER_FRAME]}

    # -- housekeeping -----------------------------------------------------------------------
    def _drop_unauthenticated(self) -> None:
        """A TCP peer that has not shown the token within AUTH_TIMEOUT_S is closed, so
        that idle strangers cannot hold connection slots the local hooks need."""
        now = time.monotonic()
        stale = [key.data[1] for key in list(self.sel.get_map().values())
                 if key.data[0] == "conn" and not key.data[1].authed
                 and now - key.data[1].opened > AUTH_TIMEOUT_S]
        for conn in stale:
            log.warning("closing %s: no token within %g s", conn.name, AUTH_TIMEOUT_S)
            self._close(conn, save=False)

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
            self._save(key)
            if key in self._store_errors:
                continue  # its only copy is in memory: keep it
            self.sessions.pop(key)
            self._last_seen.pop(key, None)
            self._last_save.pop(key, None)
            self._unwatch(key)
            log.info("run %s evicted after %.0f s without its hook; its state stays on disk "
                     "and a reconnect resumes it", key, self.session_timeout)

    def _from_disk(self, key: str) -> Session | None:
        """An evicted run whose hook came back."""
        try:
            state = self.store.load(key)
            session = None if state is None else Session.restore(state)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.error("cannot restore run %s: %s", key, exc)
            return None
        if session is not None:
            self._adopt(key, session)
            log.info("run %s restored from disk at step %d", key, session.last_step)
        return session

    def _check_socket(self) -> None:
        """Bind the socket file again if someone removed it; connections stay as they are."""
        if self._unix is None or self._unix_id is None:
            return
        now = _file_id(self.socket_path)
        if now == self._unix_id:
            return
        if now is not None:
            log.error("%s was replaced by another file; not touching it. New runs cannot "
                      "reach this controller; existing ones go on", self.socket_path)
            self._unix_id = now  # say it once
            self._unix = None
            return
        log.warning("socket %s was removed; binding it again", self.socket_path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)
        try:
            sock.bind(self.socket_path)
            os.chmod(self.socket_path, 0o600)
            sock.listen(128)
        except OSError as exc:
            sock.close()
            log.error("cannot bind %s again: %s", self.socket_path, exc)
            return
        finally:
            os.umask(old)
        sock.setblocking(False)
        with contextlib.suppress(KeyError, ValueError):
            self.sel.unregister(self._unix)
        self._unix.close()
        self._listeners = [s for s in self._listeners if s is not self._unix] + [sock]
        self.sel.register(sock, selectors.EVENT_READ, ("listen", True))
        self._unix = sock
        self._unix_id = _file_id(self.socket_path)

    # -- persistence and sink ------------------------------------------------------------
    def _save(self, key: str) -> None:
        """Checkpoint ``key`` now (operator commands, reloads, disconnects, shutdown)."""
        if key in self._saving:  # after the write in flight, never before it
            self._writer.wait()
            self._saved()
        session = self.sessions[key]
        try:
            self.store.save(key, session.to_state())
        except (OSError, ValueError) as exc:
            self._save_failed(key, exc)
            return
        if self._store_errors.pop(key, None) is not None:
            log.info("run %s checkpointed again", key)
        session.saved_step = session.last_step
        session.unsaved = 0
        self._last_save[key] = time.monotonic()

    def _save_failed(self, key: str, exc: Exception) -> None:
        if key not in self._store_errors:  # once per outage, not once per step
            log.error("cannot checkpoint run %s: %s; the run goes on from memory, "
                      "a controller restart would lose it", key, exc)
        self._store_errors[key] = str(exc)
        self._last_save[key] = time.monotonic()  # retry at SAVE_INTERVAL, not per step

    def _save_soon(self, key: str) -> None:
        """Checkpoint ``key`` on the writer thread (the hot path's checkpoints): the loop
        encodes the state, the thread writes and fsyncs it, and :meth:`_saved` advances
        ``saved_step`` only once the file is durable. One write per run at a time."""
        if key in self._saving:
            return  # its observations since then wait for the next checkpoint
        session = self.sessions[key]
        try:
            data = self.store.encode(session.to_state())
        except ValueError as exc:
            self._save_failed(key, exc)
            return
        self._saving[key] = session.unsaved
        self._writer.submit(key, data, (session, session.last_step))
        session.unsaved = 0
        self._last_save[key] = time.monotonic()

    def _saved(self) -> None:
        """Apply the writer's finished checkpoints (on the loop's thread)."""
        while True:
            try:
                key, (session, step), error = self._writer.done.get_nowait()
            except queue.Empty:
                return
            held = self._saving.pop(key, 0)
            if self.sessions.get(key) is not session:
                continue  # the run ended (or was replaced) meanwhile
            if error is not None:
                self._save_failed(key, error)
                session.unsaved += held  # still to be checkpointed
            else:
                if self._store_errors.pop(key, None) is not None:
                    log.info("run %s checkpointed again", key)
                session.saved_step = max(session.saved_step, step)
            if session.unsaved:
                self._next_save_at = min(self._next_save_at,
                                         self._last_save.get(key, 0.0) + SAVE_INTERVAL)

    def _save_due(self) -> None:
        """Checkpoint the sessions with observations unsaved for SAVE_INTERVAL seconds.

        The loop calls this only from ``_next_save_at`` on: the earliest time any
        session could be due, kept here and lowered by ``_obs`` when a session gets
        its first unsaved observation (the only way one becomes due).
        """
        now = time.monotonic()
        next_at = math.inf
        for key, session in self.sessions.items():
            if session.unsaved and key not in self._saving:  # in flight: see _saved
                if now - self._last_save.get(key, 0.0) >= SAVE_INTERVAL:
                    self._save_soon(key)
                if session.unsaved and key not in self._saving:  # failed: try again later
                    next_at = min(next_at, self._last_save.get(key, 0.0) + SAVE_INTERVAL)
        self._next_save_at = next_at

    def _sink(self, method: str, *args: Any) -> None:
        """A sink failure is logged, never allowed to take the controller down."""
        try:
            getattr(self.sink, method)(*args)
        except Exception as exc:
            self._sink_failed(method, exc)

    def _sink_failed(self, method: str, exc: Exception) -> None:
        log.exception("sink %s failed", method)
        self._sink_error = f"{method} failed: {exc}"


def _file_id(path: str) -> tuple[int, int] | None:
    try:
        st = os.lstat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _clean_source(source: str) -> str:
    """A client's policy path, made safe to show, watch and store.

    Only an absolute path to a file may be watched; anything else (a relative
    path, NULs, control characters) is kept as an opaque label in angle
    brackets, which the controller never opens.
    """
    if (not os.path.isabs(source) or any(ord(c) < 32 for c in source)
            or len(source) > 4096):
        return "<" + "".join(c if c.isprintable() else "?" for c in source[:200]) + ">"
    return os.path.normpath(source)


def _lrs(value: Any) -> list[float]:
    if not isinstance(value, list) or not 1 <= len(value) <= MAX_GROUPS:
        raise ProtocolError(f"lrs must be a list of 1-{MAX_GROUPS} numbers", "bad_message")
    out = [float_in(v, "lrs") for v in value]
    if not all(math.isfinite(v) and v >= 0 for v in out):
        raise ProtocolError(f"lrs must be finite and >= 0, but got {out[:8]}", "bad_message")
    return out


def _slim(msg: Mapping[str, Any]) -> dict[str, Any]:
    """A frame too large to send: drop the decisions' evidence, which is what grows."""
    out = dict(msg)
    if "d" in out:
        out["d"] = [{**d, "evidence": {"truncated": True}} for d in out["d"]]
    return out

