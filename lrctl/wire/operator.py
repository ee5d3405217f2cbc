"""The operator client: one request, one answer (used by the CLI verbs and the benches)."""

from __future__ import annotations

import socket as _socket
from collections.abc import Mapping
from typing import Any

from .. import paths
from .decoder import FrameDecoder
from .frames import MAX_FRAME, encode
from .token import token_from_env
from .unix import connect_unix

__all__ = ["ControllerError", "request"]


class ControllerError(RuntimeError):
    """The controller answered an operator request with an error."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def request(msg: Mapping[str, Any], address: str | None = None, *, token: str | None = None,
            timeout: float = 5.0) -> dict[str, Any]:
    """One request, one answer. Raises ``OSError`` when no controller answers and
    :class:`ControllerError` for an ``error`` answer."""
    address = address or paths.default_socket()
    kind, addr = paths.parse_address(address)
    if kind == "unix":
        sock = connect_unix(addr, timeout)  # type: ignore[arg-type]
    else:
        token = token or token_from_env()  # first: an unreadable token file is said as such
        sock = _socket.create_connection(addr, timeout=timeout)  # type: ignore[arg-type]
    with sock:
        payload = dict(msg)
        if kind == "tcp":
            payload["token"] = token
        sock.sendall(encode(payload))
        decoder = FrameDecoder(MAX_FRAME * 16)
        while True:
            data = sock.recv(1 << 16)
            if not data:
                raise ConnectionError(f"the controller at {address} closed the connection")
            for reply in decoder.feed(data):
                if reply["t"] == "error":
                    raise ControllerError(str(reply.get("code")), str(reply.get("message")))
                return reply
