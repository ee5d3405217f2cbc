"""The incremental frame decoder both sides use: bytes in, whole messages out."""

from __future__ import annotations

from typing import Any

from .compact import COMPACT_BIT, decode_compact
from .errors import ProtocolError
from .frames import HEADER, MAX_FRAME
from .messages import decode_body

_SIZE = ~COMPACT_BIT & 0xFFFF_FFFF  # a frame's length, without the compact bit

__all__ = ["FrameDecoder"]


class FrameDecoder:
    """Incremental decoder: feed bytes, get whole messages.

    The first frame may be up to ``first_limit`` bytes, later ones up to ``limit``.
    ``gated``: return the first frame alone and decode nothing after it until
    :meth:`open_gate` (the controller checks a TCP peer's token before it parses
    anything large). Errors are :class:`ProtocolError`; after one the stream is unusable.
    """

    def __init__(self, limit: int = MAX_FRAME, first_limit: int | None = None, *,
                 gated: bool = False) -> None:
        self.limit = limit
        self._next_limit = first_limit if first_limit is not None else limit
        self._buf = bytearray()
        self._gated = gated
        self._decoded = 0  # frames decoded while gated (at most one)

    @property
    def buffered(self) -> int:
        """Bytes held: an unfinished frame (or, while gated, what followed the first)."""
        return len(self._buf)

    def open_gate(self, next_limit: int) -> list[dict[str, Any]]:
        """Decode on: the next frame may be up to ``next_limit`` bytes. Returns the whole
        messages already buffered."""
        self._gated = False
        self._next_limit = next_limit
        return self.feed(b"")

    def feed(self, data: bytes) -> list[dict[str, Any]]:
        buf = self._buf
        if buf:  # the rest of a frame: copy out only once a whole frame is in
            buf += data
            if len(buf) < 4 or len(buf) < 4 + (HEADER.unpack_from(buf)[0] & _SIZE) <= (
                    self._next_limit + 4):
                return []
            data = bytes(buf)
            buf.clear()
        out = []
        pos, end = 0, len(data)
        while end - pos >= 4 and not (self._gated and self._decoded):
            (raw,) = HEADER.unpack_from(data, pos)
            size = raw & _SIZE
            if size > self._next_limit:
                raise ProtocolError(
                    f"frame of {size} bytes exceeds the limit of {self._next_limit}", "too_large")
            if end - pos - 4 < size:
                break
            body = data[pos + 4:pos + 4 + size]
            pos += 4 + size
            self._next_limit = self.limit
            self._decoded += self._gated
            out.append(decode_compact(body) if raw & COMPACT_BIT else decode_body(body))
        if pos < end:
            self._buf += data[pos:] if pos else data
        return out
