"""What the file system says of a watched policy path: the policy watcher's checks."""

from __future__ import annotations

import os
import stat
from typing import Any

__all__ = ["TIMESTAMP_TICK_S", "changed_since_check", "dir_identity", "resolve", "stat_signature"]

#: The coarsest file-system timestamp granularity allowed for: a file whose mtime is
#: within this of the last look may have been written after it (FAT's is 2 s; ext4's a
#: clock tick).
TIMESTAMP_TICK_S = 2.0


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


def changed_since_check(entry: dict[str, Any], sig: tuple[int, ...] | None,
                        looked_at: float) -> bool:
    """Whether a check must read a file whose stat, taken just after ``looked_at`` (wall
    clock), is ``sig``: it differs from the last check's, or the file was written since
    the last look (the last check, or ``watch()``: ``entry["since"]``), give or take a
    timestamp tick: a write just before a stat and another within the same tick leave
    that stat unchanged. However late a check comes, a write after the last look is read."""
    seen = entry.get("sig", sig)  # (the first check has nothing to compare with)
    since = entry.get("since", looked_at)
    entry["sig"], entry["since"] = sig, looked_at
    if sig != seen:
        return True
    return sig is not None and sig[3] / 1e9 >= since - TIMESTAMP_TICK_S


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
