"""The wire protocol's former home: everything now lives in :mod:`lrctl.wire`
(frames, messages, the float convention, the operator client). Kept so that code
importing ``lrctl.protocol`` goes on working."""

from __future__ import annotations

from .wire.decoder import FrameDecoder
from .wire.errors import ProtocolError
from .wire.frames import MAX_FRAME, MAX_HELLO, VERSION, encode
from .wire.messages import (
    decode_body,
    encode_lr,
    encode_obs,
    float_in,
    float_out,
    get_float,
    get_int,
    get_str,
)

__all__ = ["MAX_FRAME", "MAX_HELLO", "VERSION", "FrameDecoder", "ProtocolError", "decode_body",
           "encode", "encode_lr", "encode_obs", "float_in", "float_out", "get_float", "get_int",
           "get_str"]
