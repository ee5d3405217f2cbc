"""The wire format alone: round trips, limits, and refusals (no sockets)."""

from __future__ import annotations

import json
import math
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lrctl.protocol import (
    MAX_FRAME,
    FrameDecoder,
    ProtocolError,
    encode,
    encode_obs,
    float_in,
    float_out,
)

floats = st.floats(allow_nan=True, allow_infinity=True) | st.none()
names = st.from_regex(r"[A-Za-z][A-Za-z0-9_./-]{0,20}", fullmatch=True)


def _same(a: float | None, b: float | None) -> bool:
    if a is None or b is None:
        return a is b
    return (math.isnan(a) and math.isnan(b)) or a == b


@given(step=st.integers(0, 2**62), loss=floats, grad=floats,
       metrics=st.dictionaries(names, st.floats(allow_nan=True), max_size=4))
def test_obs_round_trip(step: int, loss: float | None, grad: float | None,
                        metrics: dict[str, float]) -> None:
    (msg,) = FrameDecoder().feed(encode_obs(step, loss, grad, metrics))
    assert msg["t"] == "obs" and msg["s"] == step
    assert _same(None if msg["l"] is None else float_in(msg["l"], "l"), loss)
    assert _same(None if msg["g"] is None else float_in(msg["g"], "g"), grad)
    got = {k: float_in(v, k) for k, v in msg.get("m", {}).items()}
    assert got.keys() == metrics.keys()
    assert all(_same(got[k], metrics[k]) for k in metrics)


@given(st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=20)
                    | st.floats(allow_nan=False, allow_infinity=False),
                    lambda inner: st.lists(inner, max_size=4)
                    | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=20))
def test_encode_decode_round_trip(value: object) -> None:
    msg = {"t": "x", "payload": value}
    (back,) = FrameDecoder().feed(encode(msg))
    assert back == {"v": 1, **msg}


def test_frames_split_anywhere_reassemble() -> None:
    data = b"".join(encode_obs(i, 0.5, None) for i in range(5))
    decoder = FrameDecoder()
    got = []
    for i in range(len(data)):  # one byte at a time
        got += decoder.feed(data[i:i + 1])
    assert [m["s"] for m in got] == list(range(5))


def test_non_finite_floats_are_strings_and_json_stays_strict() -> None:
    frame = encode_obs(1, float("inf"), float("-inf"))
    json.loads(frame[4:], parse_constant=lambda c: pytest.fail(f"constant {c}"))
    assert float_out(float("nan")) == "nan"
    with pytest.raises(ProtocolError, match="must be a number"):
        float_in("1.5", "loss")
    with pytest.raises(ProtocolError):
        float_in(True, "loss")


def test_oversized_frames_are_refused_before_reading_them() -> None:
    with pytest.raises(ProtocolError, match="exceeds the limit"):
        FrameDecoder().feed(struct.pack(">I", MAX_FRAME + 1))
    with pytest.raises(ProtocolError, match="exceeds the limit"):
        encode({"t": "x", "blob": "a" * MAX_FRAME})


def test_first_frame_may_be_larger_than_later_ones() -> None:
    decoder = FrameDecoder(limit=100, first_limit=1000)
    big = encode({"t": "hello", "pad": "a" * 500}, 1000)
    assert decoder.feed(big)[0]["t"] == "hello"
    with pytest.raises(ProtocolError):
        decoder.feed(big)


@pytest.mark.parametrize("body, match", [
    (b"\xff\xfe", "not UTF-8 JSON"),
    (b"{not json", "not UTF-8 JSON"),
    (b"[1, 2]", "JSON object"),
    (b'{"v": 1, "t": "obs", "l": NaN}', "not UTF-8 JSON"),
    (b'{"v": 2, "t": "obs"}', "unsupported protocol version 2"),
    (b'{"t": "obs"}', "unsupported protocol version None"),
    (b'{"v": 1}', "no type"),
])
def test_bad_frames_raise_a_protocol_error_naming_the_problem(body: bytes, match: str) -> None:
    with pytest.raises(ProtocolError, match=match):
        FrameDecoder().feed(struct.pack(">I", len(body)) + body)


def test_late_steps_are_read_in_order_with_one_lr_per_group() -> None:
    from lrctl.wire.messages import late_steps

    assert late_steps({"steps": [[4, [0.1, 0.2]], [5, [0.1, 0]]]}, 2) == [
        (4, [0.1, 0.2]), (5, [0.1, 0.0])]
    for bad in (None, [], [[5, [0.1]], [5, [0.1]]], [[5, [0.1]], [4, [0.1]]],
                [[-1, [0.1]]], [[True, [0.1]]], [[5, [0.1, 0.2]]], [[5, ["nan"]]],
                [[5, [-0.1]]], [5, [0.1]], [[5, [0.1]]] * 300):
        with pytest.raises(ProtocolError):
            late_steps({"steps": bad}, 1)
