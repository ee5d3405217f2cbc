"""A run's small files beside its journal: written atomically (meta, cursor, policy
texts), read back tolerating damage, and its directories kept private (0700, never
through a symlink). The journal's streams (:mod:`.journal`) open their files here too."""

from __future__ import annotations

import contextlib
import json
import logging
import os
from pathlib import Path
from typing import IO, Any

from ..paths import ensure_private_dir, open_private, read_regular

__all__ = ["DamagedFile", "atomic_write_json", "atomic_write_text", "fsync_path",
           "open_append", "open_new", "private_dirs", "read_json"]


def atomic_write_json(path: Path, value: Any, *, sync: bool = True) -> None:
    """Replace ``path`` with ``value`` so that a crash leaves the old or the new file, whole.
    ``sync=False``: the caller makes it durable later (:func:`fsync_path` on the file and
    its directory) before anything that depends on it is reported durable."""
    data = json.dumps(value, indent=1, sort_keys=True, allow_nan=False).encode()
    _replace(path, data, sync)
    if sync:
        fsync_path(path.parent)


def atomic_write_text(path: Path, text: str, *, sync: bool = True) -> None:
    _replace(path, text.encode("utf-8"), sync)


def _replace(path: Path, data: bytes, sync: bool) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open_new(tmp) as f:
            f.write(data)
            f.flush()
            if sync:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        # (A full disk: what it took of the temporary file would only hold the space.)
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def fsync_path(path: Path) -> None:
    """fsync a file or a directory by its path."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class DamagedFile(ValueError):
    """A run's JSON file (meta, cursor) that is not what lrctl writes there."""


#: A run's JSON files (meta, cursor) are a few KiB; past this one is not ours.
_MAX_JSON_BYTES = 16 << 20


def read_json(path: Path, default: Any = None, strict: bool = False) -> Any:
    """The JSON in ``path``; ``default`` when there is none. A damaged file (empty,
    truncated, not JSON, or not an object where ``default`` is one) is logged and read as
    ``default``, so that one run's file cannot stop the controller or a command from
    reading the others; with ``strict`` it raises :class:`DamagedFile` instead."""
    try:
        try:  # a regular file only, never blocking: a FIFO there would hang the reader
            data = read_regular(path, _MAX_JSON_BYTES + 1)
        except FileNotFoundError:
            raise
        except OSError as exc:
            raise ValueError(exc.strerror or str(exc)) from None
        if len(data) > _MAX_JSON_BYTES:
            raise ValueError(f"larger than {_MAX_JSON_BYTES} bytes")
        value = json.loads(data.decode("utf-8"))
        if isinstance(default, dict) and not isinstance(value, dict):
            raise ValueError(f"a JSON {type(value).__name__}, not an object")
        return value
    except FileNotFoundError:
        return default
    except (ValueError, UnicodeDecodeError) as exc:
        if strict:
            raise DamagedFile(f"{path} is damaged ({exc})") from None
        logging.getLogger("lrctl").warning("%s is damaged (%s): read as empty", path, exc)
        return default


def private_dirs(path: Path) -> None:
    """``path`` and any missing parent, 0700 (a run's directory holds its journal, meta
    and policy texts); a symlink or a file there is refused, also at each directory
    between the state directory's ``runs`` and ``path`` (a ``runs`` symlink would put
    every journal wherever it points)."""
    chain = [path]
    for parent in path.parents:
        if chain[-1].name == "runs":
            break
        chain.append(parent)
    else:
        chain = [path]  # (not inside a runs directory: that path alone)
    for directory in reversed(chain):
        ensure_private_dir(directory, quiet=True)


def open_append(path: Path) -> IO[bytes]:
    """``path`` for appending and reading, unbuffered; created 0600, never through a
    symlink (see :func:`lrctl.paths.open_private`)."""
    return open(open_private(path, os.O_RDWR | os.O_APPEND), "a+b", buffering=0)


def open_new(path: Path) -> IO[bytes]:
    """A temporary file to replace another with, empty, 0600, never through a symlink."""
    return open(open_private(path, os.O_WRONLY | os.O_TRUNC), "wb")
