"""The hook's fast paths must give exactly what the general ones give.

The link parses plain ``lr`` replies without ``json.loads`` and frames bytes
itself; anything unusual must fall back, never be misread.
"""

from __future__ import annotations

import pytest

from lrctl.wire.decoder import FrameDecoder
from lrctl.wire.errors import ProtocolError
from lrctl.wire.frames import MAX_HELLO, decode_json, encode
from lrctl.wire.messages import plain_message


def _body(msg: dict[str, object]) -> bytes:
    return encode(msg)[4:]


PLAIN = {"t": "lr", "s": 41, "lrs": [0.001, 3e-05, 1.0], "skip": False, "stop": True,
         "mode": "active", "saved_step": -1, "d": []}


@pytest.mark.parametrize("msg", [
    PLAIN,
    {**PLAIN, "s": -1, "lrs": [], "skip": True, "saved_step": 256, "mode": "shadow"},
    {**PLAIN, "lrs": [1e-300, 12345678901.5, 0, 7]},
])
def test_plain_reply_parses_like_json(msg: dict[str, object]) -> None:
    body = _body(msg)
    fast = plain_message(body)
    assert fast == decode_json(body)
    assert fast is not None and all(type(v) is float for v in fast["lrs"])  # type: ignore[union-attr]


@pytest.mark.parametrize("msg", [
    {**PLAIN, "d": [{"step": 3, "policy": "divergence"}]},
    {**PLAIN, "lrs": ["nan"]},
    {**PLAIN, "extra": 1},
    {"t": "welcome", "run": "r", "last_step": -1},
])
def test_anything_else_falls_back(msg: dict[str, object]) -> None:
    assert plain_message(_body(msg)) is None


def _decoder() -> FrameDecoder:
    return FrameDecoder(MAX_HELLO)  # as the hook's link reads the controller

def test_framing_splits_joins_and_keeps_partial_frames() -> None:
    frames = encode(PLAIN) + encode({"t": "error", "code": "x", "message": "m", "fatal": False})
    frames += encode({**PLAIN, "s": 42})
    decoder = _decoder()
    got = []
    for i in range(0, len(frames), 7):  # arbitrary cuts, across headers and bodies
        got += decoder.feed(frames[i:i + 7])
    assert [m["t"] for m in got] == ["lr", "error", "lr"] and got[2]["s"] == 42
    assert _decoder().feed(frames) == got  # all at once: the same messages


def test_oversized_frame_is_refused() -> None:
    with pytest.raises(ProtocolError):
        _decoder().feed((1 << 30).to_bytes(4, "big") + b"{}")
