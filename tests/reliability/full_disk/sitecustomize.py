"""Fault injection for a controller process: a disk that fills up.

On ``PYTHONPATH``, Python imports this at start-up. While the file named by
``$LRCTL_TEST_FULL_DISK`` exists, the disk under ``$LRCTL_TEST_FULL_DISK_UNDER``
(the state dir) is full for journal appends (``*.jsonl`` opened for appending in
binary, by name or by descriptor): it had as many bytes free as the flag file says
(0 if empty) when the flag appeared, a write that needs more writes what fits and
returns short, and the next one fails with ``ENOSPC``, as a real file system does.
Removing the flag frees the disk. With ``$LRCTL_TEST_FULL_DISK_WRITEBACK`` set, so are
the temporary files a journal is written back through (``.<stream>.jsonl.<pid>.tmp``,
opened for writing: a state dir deleted and made again). tmpfs quotas and loop mounts
are not available to the tests; this is the same sequence of system-call results.
Without the variables it does nothing.
"""

from __future__ import annotations

import builtins
import errno
import io
import os

_FLAG = os.environ.get("LRCTL_TEST_FULL_DISK")
_UNDER = os.environ.get("LRCTL_TEST_FULL_DISK_UNDER")
_WRITEBACK = bool(os.environ.get("LRCTL_TEST_FULL_DISK_WRITEBACK"))

if _FLAG and _UNDER:
    _real_open = builtins.open
    _armed: dict[str, object] = {"id": None, "free": 0}

    def _free() -> int | None:
        """Bytes still free while the disk is full; None while it is not."""
        try:
            st = os.stat(_FLAG)  # type: ignore[arg-type]
        except FileNotFoundError:
            _armed["id"] = None
            return None
        ident = (st.st_ino, st.st_mtime_ns)
        if _armed["id"] != ident:
            with _real_open(_FLAG, encoding="ascii") as f:  # type: ignore[arg-type]
                text = f.read().strip()
            _armed.update(id=ident, free=int(text or 0))
        return int(_armed["free"])  # type: ignore[call-overload]

    class _FillingFile(io.FileIO):
        def write(self, b):  # type: ignore[no-untyped-def, override]
            free = _free()
            if free is None:
                return super().write(b)
            if free <= 0:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), self.name)
            n = super().write(bytes(memoryview(b)[:free]))
            _armed["free"] = free - (n or 0)
            return n

    def _open(file, mode="r", buffering=-1, *args, **kwargs):  # type: ignore[no-untyped-def]
        if isinstance(file, int):  # a descriptor (the journal opens its files O_NOFOLLOW)
            name = os.readlink(f"/proc/self/fd/{file}")
        else:
            name = os.fsdecode(file) if isinstance(file, (str, bytes, os.PathLike)) else ""
        appended = "a" in mode and name.endswith(".jsonl")
        written_back = (_WRITEBACK and "w" in mode and ".jsonl." in os.path.basename(name)
                        and name.endswith(".tmp"))
        if ((appended or written_back) and "b" in mode
                and os.path.abspath(name).startswith(_UNDER)):  # type: ignore[arg-type]
            raw = _FillingFile(file if isinstance(file, int) else name,
                               mode.replace("b", "").replace("t", ""))
            return raw if buffering == 0 else io.BufferedWriter(raw)
        return _real_open(file, mode, buffering, *args, **kwargs)

    builtins.open = _open
