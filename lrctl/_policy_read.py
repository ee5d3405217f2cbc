"""Reading a policy file for a reload: what a watched file now holds, as a
:class:`ReloadEvent` (the validated new version, the error that names the problem,
or the file gone), read so that nothing at the path can hang the reader.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from .config import MAX_BYTES, ConfigError, PolicyFile, parse_deadline, parse_text
from .paths import read_regular

__all__ = ["PARSE_BUDGET_S", "ReloadEvent", "read_policy_file"]

#: A policy file's parse gives up after this long (a hostile text; the hello's budget).
PARSE_BUDGET_S = 2.0


@dataclass(frozen=True)
class ReloadEvent:
    """What a watched file now holds.

    ``status`` is ``"changed"`` (``policy`` is the validated new version),
    ``"invalid"`` (``error`` reads ``file:line: key: message``; keep the old
    policy) or ``"missing"`` (the file is gone; keep the old policy); the watcher
    also reads ``"unchanged"`` (the version it knows, not parsed again), which it
    never delivers.
    """

    path: str
    status: str
    policy: PolicyFile | None = None
    error: str | None = None
    sha256: str | None = None
    forced: bool = False


def read_policy_file(path: str, unless: str | None = None) -> ReloadEvent:
    """Read and validate ``path`` now; when its bytes hash to ``unless`` (the version
    known), status ``"unchanged"`` without parsing them."""
    try:
        # Non-blocking, and only a regular file: a FIFO or a device at the path
        # must not hang the watcher's thread in open() or read() (nor a directory leak
        # the descriptor opened on it).
        data = read_regular(path, MAX_BYTES + 1, follow=True)
    except FileNotFoundError:
        return ReloadEvent(path, "missing", error=f"{path}: file not found")
    except OSError as exc:
        return ReloadEvent(path, "invalid", error=f"{path}: cannot read: {exc.strerror or exc}")
    sha = hashlib.sha256(data).hexdigest()
    if sha == unless:
        return ReloadEvent(path, "unchanged", sha256=sha)
    if len(data) > MAX_BYTES:
        return ReloadEvent(path, "invalid", error=f"{path}: file larger than {MAX_BYTES} bytes",
                           sha256=sha)
    try:
        with parse_deadline(PARSE_BUDGET_S):  # (PyYAML is pure Python: see parse_deadline)
            policy = parse_text(data.decode("utf-8"), path)
    except UnicodeDecodeError as exc:
        return ReloadEvent(path, "invalid", error=f"{path}: not UTF-8 text ({exc.reason})",
                           sha256=sha)
    except ConfigError as exc:
        return ReloadEvent(path, "invalid", error=str(exc), sha256=sha)
    return ReloadEvent(path, "changed", policy=policy, sha256=policy.sha256)
