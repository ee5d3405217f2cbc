"""Frames: a 4-byte big-endian length, then that many bytes of UTF-8 JSON (one object
with ``"v": 1``); the limits, the encoder and the JSON decoder both sides use (see
:mod:`lrctl.wire` for the protocol; :mod:`.decoder` cuts a byte stream into frames,
and :mod:`.messages` decodes the per-step ones without ``json.loads``).
"""

from __future__ import annotations

import json
import re
import struct
from collections.abc import Mapping
from typing import Any

from .._unicode import has_lone_surrogate
from .errors import ProtocolError

__all__ = ["HEADER", "MAX_FRAME", "MAX_HELLO", "VERSION", "ProtocolError", "decode_json",
           "encode"]

VERSION = 1
MAX_HELLO = 1 << 20
MAX_FRAME = 64 << 10
HEADER = struct.Struct(">I")
#: A JSON escape of a UTF-16 surrogate: json.loads pairs two of them into one character,
#: and leaves a lone one in the string, which then cannot be encoded again (every answer,
#: log line or listing that carried it would fail). Frames with one are walked.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def encode(msg: Mapping[str, Any], limit: int = MAX_FRAME) -> bytes:
    """One frame. ``msg`` gets ``v`` added; non-finite floats must already be strings."""
    body = json.dumps({"v": VERSION, **msg}, separators=(",", ":"), allow_nan=False,
                      ensure_ascii=False).encode("utf-8")
    if len(body) > limit:
        raise ProtocolError(f"frame of {len(body)} bytes exceeds the limit of {limit}",
                            "too_large")
    return HEADER.pack(len(body)) + body


def decode_json(body: bytes) -> dict[str, Any]:
    """One frame's JSON body → a message with a known version and a string type (see
    :func:`~lrctl.wire.messages.decode_body`, which skips this for per-step frames)."""
    try:
        msg = json.loads(body.decode("utf-8"), parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError) as exc:
        raise ProtocolError(f"frame is not UTF-8 JSON: {exc}") from None
    except RecursionError:
        raise ProtocolError("frame nests too deeply") from None
    if _SURROGATE_ESCAPE.search(body) and has_lone_surrogate(msg):
        raise ProtocolError("frame holds a lone UTF-16 surrogate escape (\\ud800-\\udfff): "
                            "its strings are not Unicode text", "bad_message")
    if not isinstance(msg, dict):
        raise ProtocolError(f"frame must be a JSON object, but got {type(msg).__name__}")
    version = msg.get("v")
    if version != VERSION:
        raise ProtocolError(f"unsupported protocol version {version!r}: this side speaks "
                            f"version {VERSION}; upgrade lrctl on both sides", "bad_version")
    if not isinstance(msg.get("t"), str):
        raise ProtocolError("message has no type ('t')", "bad_message")
    return msg


def _reject_constant(name: str) -> Any:
    raise ValueError(f"non-standard JSON constant {name}")


