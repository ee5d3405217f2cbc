"""What the file system says of a watched policy path: the policy watcher's checks."""

from __future__ import annotations

import os
import stat
from typing import Any

__all__ = ["RECENT_S", "changed_since_check", "dir_identity", "resolve", "stat_signature"]

#: A file modified less than this long before a check is read again at that check: a
#: second write within the file system's timestamp tick leaves its stat unchanged.
RECENT_S = 2.0


def dir_identity(directory: str) -> tuple[int, int] | None:
    """The directory at ``directory`` now (through symlinks), or None if there is none."""
    try:
        st = os.stat(directory)
    except OSError:
        return None
    return (st.st_dev, st.st_ino) if stat.S_ISDIR(st.st_mode) else None


def stat_signature(path: str) -> tuple[int, ...] | None:
    """What a stat says of the file at ``path`` (through symlinks); None if none."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def changed_since_check(entry: dict[str, Any], sig: tuple[int, ...] | None, now: float) -> bool:
    """Whether the check must read a file whose stat is now ``sig``: it differs from
    the last check's, or the file was written so recently that a second write within
    the same timestamp tick would not show."""
    if "sig" not in entry:  # the first check: what it sees is what was watched
        entry["sig"] = sig
        return False
    seen, entry["sig"] = entry["sig"], sig
    if sig != seen:
        return True
    return sig is not None and 0.0 <= now - sig[3] / 1e9 < RECENT_S


def resolve(path: str, entry: dict[str, Any], real: str | None = None) -> bool:
    """Record the directories to watch for ``path``: its own and its resolved
    target's (symlinks; ``real``, when resolved already). Returns True when they
    changed."""
    real = os.path.realpath(path) if real is None else real
    wanted = {os.path.dirname(path), os.path.dirname(real)}
    changed = wanted != entry["dirs"]
    entry["dirs"] = wanted
    entry["real"] = real
    return changed
