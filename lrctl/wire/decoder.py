"""The incremental frame decoder both sides use: bytes in, whole messages out."""

from __future__ import annotations

from typing import Any

from .compact import COMPACT_BIT, decode_compact
from .errors import ProtocolError
from .frames import HEADER, MAX_FRAME
from .messages import decode_body

_SIZE = ~COMPACT_BIT & 0xFFFF_FFFF  # a frame's length, without the compact bit
_SMALL = 4096  # frames of at most this many bytes are not counted (max_containers)

__all__ = ["FrameDecoder"]


class FrameDecoder:
    """Incremental decoder: feed bytes, get whole messages.

    The first frame may be up to ``first_limit`` bytes, later ones up to ``limit``.
    ``gated``: return the first frame alone and decode nothing after it until
    :meth:`open_gate`; what comes meanwhile is held as bytes (:attr:`buffered`). The
    controller checks a TCP peer's token before it parses anything large, and holds
    what a peer sends after its hello undecoded until the hello is answered (decoded
    JSON can take twenty times its bytes). Errors are :class:`ProtocolError`; after one
    the stream is unusable.
    """

    def __init__(self, limit: int = MAX_FRAME, first_limit: int | None = None, *,
                 gated: bool = False, max_containers: int | None = None) -> None:
        self.limit = limit
        # At most this many JSON objects and arrays in a frame :meth:`next` decodes: a
        # MiB of empty objects takes twenty times its bytes decoded, and 45 ms of C code
        # that holds the loop; a hook's frames hold a few, a hello with a run's state a
        # few dozen (its windows are lists of numbers). None: no bound.
        self.max_containers = max_containers
        self._next_limit = first_limit if first_limit is not None else limit
        self._buf = bytearray()
        self._pos = 0  # push/next: where the next frame starts in _buf
        self._budget: int | None = 1 if gated else None  # frames left to decode (None: any)
        self.last_size = 0  # bytes of the frame :meth:`next` decoded last

    @property
    def buffered(self) -> int:
        """Bytes held: an unfinished frame, or whole frames not yet taken by :meth:`next`
        (or, while gated, what followed the first)."""
        return len(self._buf) - self._pos

    @property
    def gated(self) -> bool:
        return self._budget is not None

    def open_gate(self, next_limit: int, frames: int | None = None) -> None:
        """Decode on (``frames`` more, then gated again; None: no gate): the next frame
        may be up to ``next_limit`` bytes. Nothing is decoded here: :meth:`next` takes
        what is held, one frame at a time."""
        self._budget = frames
        self._next_limit = next_limit

    def discard(self) -> None:
        """Drop what is held and decode nothing more (a peer told to go)."""
        self._buf = bytearray()
        self._pos = 0
        self._budget = 0

    # -- one message at a time (the controller: decoding counts in a peer's share) ------
    def push(self, data: bytes) -> None:
        """Hold ``data``; nothing is decoded until :meth:`next`."""
        self._buf += data

    @property
    def has_frame(self) -> bool:
        """Whether :meth:`next` has something to do: a whole frame is held (or a header
        over the limit, which it refuses), and no gate stops it."""
        if self._budget == 0:
            return False
        buf, pos = self._buf, self._pos
        if len(buf) - pos < 4:
            return False
        size = HEADER.unpack_from(buf, pos)[0] & _SIZE
        return size > self._next_limit or len(buf) - pos - 4 >= size

    def next(self) -> dict[str, Any] | None:
        """The next whole message held, decoded (None if there is none, or a gate)."""
        if self._budget == 0:
            return None
        buf, pos = self._buf, self._pos
        left = len(buf) - pos
        if left < 4:
            return None
        (raw,) = HEADER.unpack_from(buf, pos)
        size = raw & _SIZE
        if size > self._next_limit:
            raise ProtocolError(
                f"frame of {size} bytes exceeds the limit of {self._next_limit}", "too_large")
        if left - 4 < size:
            return None
        if left == 4 + size:  # the last one held (the usual read: one frame)
            body = bytes(buf[pos + 4:]) if pos else bytes(buf)[4:]
            buf.clear()
            self._pos = 0
        else:
            body = bytes(buf[pos + 4:pos + 4 + size])
            pos += 4 + size
            if pos >= 1 << 16:  # taken frames are dropped now and then, not one by one
                del buf[:pos]
                pos = 0
            self._pos = pos
        self._next_limit = self.limit
        self.last_size = size
        if self._budget is not None:
            self._budget -= 1
        if raw & COMPACT_BIT:
            return decode_compact(body)
        if self.max_containers is not None and size > _SMALL and (
                body.count(b"{") + body.count(b"[") > self.max_containers):
            raise ProtocolError(f"frame holds more than {self.max_containers} JSON objects "
                                "and arrays", "too_large")
        return decode_body(body)

    def feed(self, data: bytes) -> list[dict[str, Any]]:
        """Hold ``data`` and return every whole message held, decoded (the hook's and the
        operator client's way; not to be mixed with :meth:`push`)."""
        if self._budget == 0:  # gated: held as it came
            self._buf += data
            return []
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
        while end - pos >= 4 and self._budget != 0:
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
            if self._budget is not None:
                self._budget -= 1
            out.append(decode_compact(body) if raw & COMPACT_BIT else decode_body(body))
        if pos < end:
            self._buf += data[pos:] if pos else data
        return out
