"""A hook's ``hello``, checked field by field into a typed :class:`Hello`.

Every problem raises ``ProtocolError`` naming the field (an ``error`` frame; the
connection stays), except a run key that could name a path outside the state
directory, which is :class:`~lrctl.daemon.transport.Refused` (the connection closes).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..paths import RUN_KEY_MAX, is_run_key
from ..wire.compact import compact_agreed
from ..wire.errors import ProtocolError
from ..wire.frames import MAX_HELLO
from ..wire.messages import float_in, get_int, get_str
from .transport import Refused

__all__ = ["MAX_GROUPS", "Hello", "parse_hello"]

MAX_GROUPS = 4096  # param groups a run may have
MAX_HELD = 4096  # snapshot steps a hello may list (the newest)


@dataclass(frozen=True)
class Hello:
    run: str
    run_name: str
    policy_text: str
    policy_source: str  # an absolute, normalised path, or an opaque "<label>"
    lrs: list[float]
    world_size: int
    total_steps: int | None  # the run's length, when the hook knows it
    mlflow_run_id: str | None
    tracking_uri: str | None
    cwd: str | None
    watch: bool  # attach(watch=...): follow edits of the policy file
    sync: bool  # the hook waits for each answer
    pace: bool = False  # an async hook: it may be read on a timer (see pacing.py)
    every: int = 1  # an every=N hook reports every N-th step only
    compact: bool = False  # it reads compact lr answers (see lrctl.wire.compact)
    session: dict[str, Any] | None = None  # the run's state from the user's checkpoint
    session_id: str | None = None  # that hook's name for it (the same on its reconnects)
    start_step: int = 0  # the step number of the loop's first step
    resume_token: str | None = None  # from the run's welcome: may take a connected run over
    snapshots: tuple[int, int] | None = None  # the hook's (every, keep): it can roll back
    snapshots_held: tuple[int, ...] | None = None  # the snapshot steps it holds now
    ran: bool = False  # it reports each step after its optimizer step (no skip reaches it)


def parse_hello(msg: Mapping[str, Any]) -> Hello:
    key = get_str(msg, "run", max_len=RUN_KEY_MAX)
    assert key is not None
    if not is_run_key(key):  # no "/" and no leading ".": cannot leave the state dir
        raise Refused(f"bad run key {key!r}: letters, digits, ._- only", "bad_message")
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
    watch = _bool(msg, "watch", True)
    total_steps = get_int(msg, "total_steps", lo=1, optional=True)
    sync = _bool(msg, "sync", False)
    session = msg.get("session")
    if session is not None and not isinstance(session, dict):
        raise ProtocolError("session must be the object a snapshot returned", "bad_message")
    if source is not None and not source.startswith("<"):
        source = _clean_source(source)
    return Hello(
        run=key, run_name=get_str(msg, "run_name", max_len=250) or key,
        policy_text=text or "", policy_source=source or "<string>", lrs=lrs,
        world_size=get_int(msg, "world_size", lo=1, hi=1 << 20, optional=True) or 1,
        total_steps=total_steps,
        mlflow_run_id=get_str(mlflow, "run_id", max_len=64, optional=True),
        tracking_uri=get_str(mlflow, "tracking_uri", max_len=4096, optional=True),
        cwd=get_str(msg, "cwd", max_len=4096, optional=True), watch=watch, sync=sync,
        session=session,
        session_id=get_str(msg, "session_id", max_len=64, optional=True) if session else None,
        start_step=get_int(msg, "start_step", lo=0, optional=True) or 0,
        resume_token=get_str(msg, "resume_token", max_len=64, optional=True),
        snapshots=_snapshots(msg.get("snapshots")),
        snapshots_held=_snapshots_held(msg.get("snapshots")),
        pace=_bool(msg, "pace", False) and not sync,
        compact=compact_agreed(msg.get("compact")),
        every=get_int(msg, "every", lo=1, hi=1 << 30, optional=True) or 1,
        ran=_bool(msg, "ran", False))


def _snapshots(value: Any) -> tuple[int, int] | None:
    """``{"every": N, "keep": K}``: the hook keeps snapshots (see lrctl._rollback)."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ProtocolError("snapshots must be an object {every, keep}", "bad_message")
    every = get_int(value, "every", lo=1, hi=1 << 40)
    keep = get_int(value, "keep", lo=1, hi=1 << 20)
    assert every is not None and keep is not None
    return every, keep


def _snapshots_held(value: Any) -> tuple[int, ...] | None:
    """``snapshots.held``: the steps of the snapshots the hook holds (absent: a hook that
    does not say; the controller's own count stands)."""
    held = value.get("held") if isinstance(value, dict) else None
    if held is None:
        return None
    if (not isinstance(held, list) or len(held) > MAX_HELD
            or not all(type(s) is int and 0 <= s < 1 << 62 for s in held)):
        raise ProtocolError(f"snapshots.held must be a list of at most {MAX_HELD} steps",
                            "bad_message")
    return tuple(held)


def _lrs(value: Any) -> list[float]:
    if not isinstance(value, list) or not 1 <= len(value) <= MAX_GROUPS:
        raise ProtocolError(f"lrs must be a list of 1-{MAX_GROUPS} numbers", "bad_message")
    out = [float_in(v, "lrs") for v in value]
    if not all(math.isfinite(v) and v >= 0 for v in out):
        raise ProtocolError(f"lrs must be finite and >= 0, but got {out[:8]}", "bad_message")
    return out


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


def _bool(msg: Mapping[str, Any], key: str, default: bool) -> bool:
    value = msg.get(key, default)
    if not isinstance(value, bool):
        raise ProtocolError(f"{key} must be true or false, but got {value!r:.40}",
                            "bad_message")
    return value
