"""A directory held open, to tell whether its path still leads to it.

``(st_dev, st_ino)`` of a path, remembered and compared later, cannot tell a directory
deleted and made again from the one before: a freed inode's number is reused at once
(ext4 and tmpfs both gave the new directory the old one's number in the tests). A
descriptor held open keeps the old inode alive, so a directory made again at the path
always has another number; the held one's link count says it was deleted.
"""

from __future__ import annotations

import contextlib
import os
import stat

__all__ = ["HeldDir"]

_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC | os.O_NOFOLLOW


def _open(path: str | os.PathLike[str]) -> int:
    try:
        return os.open(path, _FLAGS)
    except OSError:
        return -1


def _ident(path: str | os.PathLike[str]) -> tuple[int, int] | None:
    """A directory's ``(st_dev, st_ino)``, never a symlink's (None)."""
    try:
        st = os.lstat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino) if stat.S_ISDIR(st.st_mode) else None


class HeldDir:
    """The directory at ``path`` when made (or :meth:`reopen`-ed), held open. Where it
    cannot be held (out of descriptors, a directory we may not read), its remembered
    ``(st_dev, st_ino)`` stands in: the weaker test, but never "made again" for a
    directory that is still there."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = path
        self._ident = _ident(path)
        self._fd = _open(path)
        self._closed = False

    def same(self) -> bool:
        """Whether ``path`` still leads to the held directory (never through a symlink)."""
        if self._closed:
            return False
        fd = self._fd  # (another thread may reopen meanwhile: a stale read says False)
        if fd < 0:
            return self._ident is not None and _ident(self.path) == self._ident
        try:
            held, now = os.fstat(fd), os.lstat(self.path)
        except OSError:
            return False
        return (held.st_nlink > 0 and held.st_dev == now.st_dev
                and held.st_ino == now.st_ino)

    def reopen(self) -> None:
        """Hold the directory at ``path`` now (the old one is let go)."""
        self._ident = _ident(self.path)
        old, self._fd = self._fd, _open(self.path)
        self._closed = False
        if old >= 0:
            with contextlib.suppress(OSError):
                os.close(old)

    def close(self) -> None:
        """Let it go; :meth:`same` is False from now on."""
        old, self._fd, self._closed = self._fd, -1, True
        if old >= 0:
            with contextlib.suppress(OSError):
                os.close(old)
