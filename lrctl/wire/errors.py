"""The error of a frame or message that breaks the protocol."""

from __future__ import annotations

__all__ = ["ProtocolError"]


class ProtocolError(ValueError):
    """A frame or a message that breaks the protocol; ``code`` is machine-readable."""

    def __init__(self, message: str, code: str = "bad_frame") -> None:
        super().__init__(message)
        self.code = code
