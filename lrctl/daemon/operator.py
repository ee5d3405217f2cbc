"""Operator verbs (``lrctl status / runs / set-lr / pause / resume / reload / decay /
rollback / prune``): one request, one answer.

An operator's change to a run is a decision of the policy ``operator``: journaled,
checkpointed and pushed to the run's hook like any other (see ``Server.publish``).
"""

from __future__ import annotations

import logging
import math
import os
import sys
import time
from collections.abc import Mapping
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

from .._version import __version__
from ..sinks._mlflow_store import unavailable
from ..sinks._ship_state import FILES_WAIT
from ..sinks.shipper_proxy import rss_kib
from ..wire.errors import ProtocolError
from ..wire.messages import float_in, get_int, get_str
from .retention import MAX_RUNS_PER_REQUEST
from .session import Session
from .upkeep import move_aside

if TYPE_CHECKING:
    from .server import Server

__all__ = ["MAX_DECISIONS_PER_FRAME", "OPERATOR_TYPES", "answer", "find"]

log = logging.getLogger("lrctl.daemon")

OPERATOR_TYPES = frozenset({"runs", "set_lr", "clear_lr", "pause", "resume", "status",
                            "reload", "decay", "rollback", "prune"})
MAX_DECISIONS_PER_FRAME = 32


def answer(server: Server, t: str, msg: Mapping[str, Any]) -> dict[str, Any]:
    """The reply to operator message ``msg`` of type ``t`` (one of :data:`OPERATOR_TYPES`)."""
    if t == "status":
        return _status(server)
    if t == "runs":
        sink_errors = server.sink.run_errors()
        return {"t": "runs", "runs": [
            {**s.summary(), "connected": k in server.conns,
             "store_error": server.checkpoints.errors.get(k),
             "sink_error": sink_errors.get(k)}
            for k, s in sorted(server.sessions.items())]}
    if t == "reload":
        return _reload(server, get_str(msg, "run", max_len=96, optional=True))
    if t == "prune":
        return _prune(server, msg)
    key = get_str(msg, "run", max_len=96)
    session = find(server.sessions, key or "")
    if t == "set_lr":
        lr = float_in(msg.get("lr"), "lr")
        if not math.isfinite(lr) or lr < 0:
            raise ProtocolError(f"lr must be finite and >= 0, but got {lr!r}", "bad_message")
        steps = get_int(msg, "steps", lo=1, optional=True)
        force = msg.get("force") or False  # (null, as for steps: not given)
        if not isinstance(force, bool):
            raise ProtocolError(f"force must be true or false, but got {force!r:.40}",
                                "bad_message")
        decision = session.set_lr(lr, steps, force)
    elif t == "clear_lr":
        decision = session.clear_lr()
    elif t == "decay":
        decision = session.decay(msg)
    elif t == "rollback":
        decision = session.rollback(get_int(msg, "to", lo=0, optional=True))
    else:
        decision = session.set_mode("shadow" if t == "pause" else "active")
    server.publish(session, decision)
    log.info("operator: %s on run %s", t, session.key)
    return {"t": "ok", "run": session.key, "message": decision["reason"],
            "decision": decision}


def find(sessions: Mapping[str, Session], name: str) -> Session:
    """A session by run key, or by a run name or key prefix that names exactly one."""
    if name in sessions:
        return sessions[name]
    found = [s for k, s in sessions.items()
             if s.info.run_name == name or k.startswith(name)] if name else []
    if len(found) == 1:
        return found[0]
    if not found:
        raise ProtocolError(f"no run named {name!r} on this controller; see 'lrctl runs' ('lrctl "
                            "runs --all' lists the runs that ended too, and those of "
                            "controllers on other sockets: reach one with --socket)",
                            "no_such_run")
    raise ProtocolError(f"{name!r} matches {len(found)} runs: "
                        f"{', '.join(sorted(s.key for s in found))}", "ambiguous_run")


def _status(server: Server) -> dict[str, Any]:
    errors = [f"run {s.key}: reload: {s.reload_error}" for s in server.sessions.values()
              if s.reload_error]
    errors += [f"run {k}: checkpoint: {e}" for k, e in server.checkpoints.errors.items()]
    errors += [f"run {k} (ended): its checkpoint cannot be removed: {e} (tried again every "
               "second)" for k, e in server.checkpoints.unremoved.items()]
    errors += server.live.errors()
    if server.state_watch.error:
        errors.append(server.state_watch.error)
    if server.sink.error:
        errors.append(f"sink: {server.sink.error}")
    sink_status = server.sink.status()
    for uri, why in ((sink_status.get("shipper") or {}).get("unavailable") or {}).items():
        errors.append(f"{unavailable(why)} ({uri})")
    for key, why in ((sink_status.get("shipper") or {}).get("files_down") or {}).items():
        errors.append(f"run {key}: {FILES_WAIT.format(why)}")
    journal = sink_status.get("journal") or {}
    if journal.get("error"):
        errors.append(f"{journal['error']} ({journal.get('held', 0)} record(s) wait in memory)")
    if journal.get("dropped"):
        errors.append(f"journal: {journal['dropped']} record(s) dropped while the disk "
                      "refused writes")
    return {"t": "status", "pid": os.getpid(), "version": __version__,
            "runs": len(server.sessions), "connected": len(server.conns),
            # Hooks read on a timer now (paced reading), None when it is off (--no-pacing).
            "paced": (None if server.transport.pacing is None
                      else len(server.transport.pacing)),
            # Reads at those looks that found something (since the start): how often a
            # hook's frames waited for a look rather than waking the loop.
            "paced_reads": (None if server.transport.pacing is None
                            else server.transport.pacing.found),
            "uptime_s": round(time.monotonic() - server.started, 3),
            "socket": server.transport.socket_path, "state_dir": server.state_dir,
            "watching": server.live.watching(), "errors": errors[:50],
            "state_dir_recreated": server.state_watch.recreated,
            # Memory, honestly: this process, and the MLflow shipper's (its own process).
            "rss_kib": rss_kib(), "mlflow_loaded": "mlflow" in sys.modules,
            **sink_status}


def _reload(server: Server, name: str | None) -> dict[str, Any]:
    """``lrctl reload [RUN]``: read the file(s) now and apply even unchanged bytes."""
    if name:
        session = find(server.sessions, name)
        if session.watch_path is None:
            raise ProtocolError(
                f"run {session.key} is pinned to its policy version (not a file, "
                "'watch: false' in the file, or attach(watch=False))", "pinned")
        sessions = [session]
    else:
        sessions = [s for s in server.sessions.values() if s.watch_path is not None]
    decisions, problems = server.live.reload_now(sessions)
    log.info("operator: reload of %d run(s)", len(sessions))
    if name:
        lines = [f"{d['action']}: {d['reason']}" for d in decisions]
    else:  # one line per run (each session's last decision is the very dict recorded)
        lines = [f"{s.key}: {d['action']}: {d['reason']}" for s in sessions
                 for d in decisions if s.last_decision is d]
    lines += problems
    return {"t": "ok", "run": sessions[0].key if name else "*",
            "message": ("; " if name else "\n").join(lines) or "no watched runs",
            "decisions": decisions[:MAX_DECISIONS_PER_FRAME],
            # Files that could not be read: nothing was applied from them (exit status 1).
            "missing": problems}


def _prune(server: Server, msg: Mapping[str, Any]) -> dict[str, Any]:
    """``lrctl prune``: move aside the journals of the runs named that may go (see
    :mod:`~lrctl.daemon.retention`), here on the loop, where none of them opens
    meanwhile; the asker deletes them."""
    where = get_str(msg, "state_dir", max_len=4096) or ""
    if not server.state_dir or os.path.realpath(where) != os.path.realpath(server.state_dir):
        serves = server.state_dir or "no state directory"
        raise ProtocolError(f"this controller serves from {serves}, not {where}",
                            "bad_message")
    if not server.store.writable:  # (deleted and made again, another controller's now)
        raise ProtocolError(f"{server.state_dir} is not this controller's to change now "
                            "(see 'lrctl status')", "state_dir")
    keys = msg.get("runs")
    if (not isinstance(keys, list) or len(keys) > MAX_RUNS_PER_REQUEST
            or not all(isinstance(k, str) for k in keys)):
        raise ProtocolError(f"runs must be a list of at most {MAX_RUNS_PER_REQUEST} run "
                            "keys", "bad_message")
    older = float_in(msg.get("older_than_s"), "older_than_s")
    if not (math.isfinite(older) and older >= 0):
        raise ProtocolError(f"older_than_s must be finite and >= 0, but got {older!r}",
                            "bad_message")
    moved, kept = move_aside(server, keys, time.time() - older)
    if moved:
        log.info("operator: prune: the journals of %d ended run(s) moved aside to be "
                 "deleted: %s", len(moved), " ".join(p.run for p in moved))
    return {"t": "pruned", "moved": [asdict(p) for p in moved],
            "kept": {key: asdict(why) for key, why in kept.items()}}
