"""The controller's protocol fast paths give exactly what the general ones give.

``encode_lr`` formats the usual ``lr`` reply by hand and ``decode_body`` parses
the plain ``obs`` frame without ``json.loads``; both must agree byte for byte and
value for value with ``json``, and hand anything unusual to it.
"""

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
    decode_body,
    encode,
    encode_lr,
    encode_obs,
)

any_float = st.floats(allow_nan=True, allow_infinity=True, allow_subnormal=True)
finite = st.floats(allow_nan=False, allow_infinity=False, allow_subnormal=True)
some_floats = st.one_of(any_float, st.sampled_from([0.0, -0.0, 5e-324, -5e-324, 1e16, 1e-5,
                                                    1.7976931348623157e308, 0.1, 1.0]))
steps = st.one_of(st.integers(-3, 3), st.integers(0, 2**62), st.integers(-2**70, 2**70))


def _json_body(body: bytes) -> dict[str, object]:
    """The reference decoder: what ``decode_body`` did before its fast path."""
    msg = json.loads(body.decode("utf-8"), parse_constant=_reject)
    assert isinstance(msg, dict)
    return msg


def _reject(name: str) -> object:
    raise ValueError(name)


def _same(a: object, b: object) -> bool:
    """Equal, with the same types, NaN equal to NaN and -0.0 apart from 0.0."""
    if isinstance(a, float) and isinstance(b, float):
        return type(a) is type(b) and ((math.isnan(a) and math.isnan(b)) or (
            a == b and math.copysign(1.0, a) == math.copysign(1.0, b)))
    if isinstance(a, dict) and isinstance(b, dict):
        return list(a) == list(b) and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return type(a) is type(b) and a == b


# -- lr replies ----------------------------------------------------------------------------
def _lr_msg(step: int, lrs: list[float], skip: bool, stop: bool, mode: str,
            saved: int) -> dict[str, object]:
    return {"t": "lr", "s": step, "lrs": lrs, "skip": skip, "stop": stop, "mode": mode,
            "saved_step": saved, "d": []}


@given(steps, st.lists(some_floats, max_size=6), st.booleans(), st.booleans(),
       st.sampled_from(["active", "shadow", "x", "weird mode", "é", ""]), steps)
def test_encode_lr_is_encode_byte_for_byte(step: int, lrs: list[float], skip: bool,
                                           stop: bool, mode: str, saved: int) -> None:
    fast = encode_lr(step, lrs, skip, stop, mode, saved)
    plain = all(math.isfinite(x) for x in lrs) and mode in ("active", "shadow", "x")
    if not plain:
        assert fast is None  # non-finite LRs or an odd mode: the general path decides
        return
    assert fast == encode(_lr_msg(step, lrs, skip, stop, mode, saved))


@pytest.mark.parametrize("args", [
    (1, [1], False, False, "active", 0),  # an int LR: json writes 1, not 1.0
    (True, [0.1], False, False, "active", 0),  # bool steps are not ints here
    (1, [0.1], 0, False, "active", 0),
    (1, [0.1], False, False, "active", 2.0),
    (1, (0.1,), False, False, "active", 0),  # a tuple is fine: same values, same bytes
])
def test_encode_lr_odd_types_fall_back_or_agree(args: tuple) -> None:  # type: ignore[type-arg]
    fast = encode_lr(*args)
    if fast is not None:
        step, lrs, skip, stop, mode, saved = args
        assert fast == encode(_lr_msg(step, list(lrs), skip, stop, mode, saved))
    else:
        assert args[1] != (0.1,)


def test_encode_lr_leaves_oversized_frames_to_encode() -> None:
    lrs = [1.2345678901234567e-300] * 4096
    assert encode_lr(1, lrs, False, False, "active", 0) is None
    with pytest.raises(ProtocolError):
        encode(_lr_msg(1, lrs, False, False, "active", 0))
    assert encode_lr(1, lrs, False, False, "active", 0, limit=1 << 20) == encode(
        _lr_msg(1, lrs, False, False, "active", 0), 1 << 20)


def test_plain_lr_reply_is_what_the_hook_fast_path_reads() -> None:
    from lrctl.wire.frames import decode_json
    from lrctl.wire.messages import plain_message

    frame = encode_lr(7, [0.001, 5e-324, -0.0, 1e16], True, False, "shadow", 3)
    assert frame is not None
    assert plain_message(frame[4:]) == decode_json(frame[4:]) == decode_body(frame[4:])


# -- obs frames ----------------------------------------------------------------------------
@given(st.integers(0, 2**63), st.one_of(st.none(), some_floats),
       st.one_of(st.none(), some_floats))
def test_plain_obs_decodes_like_json(step: int, loss: float | None,
                                     grad: float | None) -> None:
    body = encode_obs(step, loss, grad)[4:]
    assert _same(decode_body(body), _json_body(body))


@given(st.integers(0, 2**62), finite, st.dictionaries(
    st.sampled_from(["val_loss", "acc"]), finite, min_size=1))
def test_obs_with_metrics_decodes_like_json(step: int, loss: float,
                                            metrics: dict[str, float]) -> None:
    body = encode_obs(step, loss, None, metrics)[4:]
    assert _same(decode_body(body), _json_body(body))


NUMBERS = ["0", "-0", "1", "-1", "0.5", "-0.0", "1e5", "1E5", "1e+5", "1e-5", "1.5e300",
           "1e999", "-1e999", "2.5e-330", "123456789012345678901234567890.5", "1" * 40 + ".0",
           "0." + "1" * 45, "1e12345", "01.5", "1.", ".5", "+1.0", "1e", "1.0e", "--1.0",
           "1_0.0", " 1.0", "1.0 ", "NaN", "Infinity", "-Infinity", '"nan"', '"inf"',
           '"-inf"', '"1.0"', "null", "true", "[]", "{}"]
STEPS = ["0", "1", "-1", "-0", "01", "1.0", "1e3", "123456789012345678",
         "1234567890123456789", "9" * 30, '"1"', "null", "true"]


@pytest.mark.parametrize("number", NUMBERS)
@pytest.mark.parametrize("field", ["l", "g"])
def test_any_obs_value_decodes_like_json_or_fails_alike(number: str, field: str) -> None:
    values = {"l": "0.25", "g": "1.5"}
    values[field] = number
    body = f'{{"v":1,"t":"obs","s":3,"l":{values["l"]},"g":{values["g"]}}}'.encode()
    _check_body(body)


@pytest.mark.parametrize("step", STEPS)
def test_any_obs_step_decodes_like_json_or_fails_alike(step: str) -> None:
    _check_body(f'{{"v":1,"t":"obs","s":{step},"l":0.5,"g":null}}'.encode())


@pytest.mark.parametrize("body", [
    b'{"v":1,"t":"obs","s":3,"l":0.5,"g":0.5,"m":{}}',
    b'{"v":1,"t":"obs","s":3,"l":0.5}',
    b'{"v":1,"t":"obs","s":3,"g":0.5,"l":0.5}',
    b'{"v":1, "t":"obs","s":3,"l":0.5,"g":0.5}',
    b'{"v":1,"t":"obs","s":3,"l":0.5,"g":0.5} ',
    b'{"v":2,"t":"obs","s":3,"l":0.5,"g":0.5}',
    b'{"v":1,"t":"obs","s":3,"l":0.5,"g":0.5,"l":7.5}',
    b'{"v":1,"t":"obs","s":3,"l":0.5,"g":0.5}\n',
    b'{"v":1,"t":"obs","s":3,"l":0.5,"g":0.5',
    b'{"v":1,"t":"obs","s":3,"l":0.5,"g":0.5}}',
    '{"v":1,"t":"obs","s":3,"l":0.5,"g":0.5,"x":"é"}'.encode(),
    b'{"v":1,"t":"obs","s":3,"l":0.5,"g":0.5,"x":"\xff"}',
])
def test_unusual_obs_frames_go_through_json(body: bytes) -> None:
    _check_body(body)


@given(st.binary(max_size=80))
def test_random_bytes_decode_like_json_or_fail_alike(body: bytes) -> None:
    _check_body(body)


@given(st.integers(0, 10**6), finite, finite, st.binary(max_size=12))
def test_mutated_obs_frames_decode_like_json_or_fail_alike(step: int, loss: float, grad: float,
                                                           junk: bytes) -> None:
    body = encode_obs(step, loss, grad)[4:]
    cut = len(junk) % len(body)
    _check_body(body[:cut] + junk + body[cut + len(junk) // 2:])


def _check_body(body: bytes) -> None:
    """``decode_body`` gives what the json-only decoder gives, or the same error."""
    try:
        want: object = _reference_decode(body)
    except ProtocolError as exc:
        with pytest.raises(ProtocolError) as got:
            decode_body(body)
        assert got.value.code == exc.code
        return
    assert _same(decode_body(body), want)


def _reference_decode(body: bytes) -> dict[str, object]:
    """``decode_body`` as it was before the fast path."""
    try:
        msg = json.loads(body.decode("utf-8"), parse_constant=_reject)
    except (UnicodeDecodeError, ValueError) as exc:
        raise ProtocolError(f"frame is not UTF-8 JSON: {exc}") from None
    except RecursionError:
        raise ProtocolError("frame nests too deeply") from None
    if not isinstance(msg, dict):
        raise ProtocolError("not an object")
    if msg.get("v") != 1:
        raise ProtocolError("version", "bad_version")
    if not isinstance(msg.get("t"), str):
        raise ProtocolError("no type", "bad_message")
    return msg


# -- framing ---------------------------------------------------------------------------------
@given(st.lists(st.tuples(st.integers(0, 10**9), st.one_of(st.none(), some_floats)),
                min_size=1, max_size=8), st.lists(st.integers(1, 40), max_size=12))
def test_frames_cut_anywhere_decode_alike(obs: list[tuple[int, float | None]],
                                          cuts: list[int]) -> None:
    stream = b"".join(encode_obs(s, v, None) for s, v in obs)
    stream += encode({"t": "bye"})
    whole = FrameDecoder().feed(stream)
    assert len(whole) == len(obs) + 1
    decoder = FrameDecoder()
    got: list[dict[str, object]] = []
    pos = 0
    for n in cuts:
        got += decoder.feed(stream[pos:pos + n])
        pos += n
    got += decoder.feed(stream[pos:])
    assert len(got) == len(whole) and all(_same(a, b) for a, b in zip(got, whole, strict=True))


def test_a_frame_over_the_limit_is_refused_while_it_trickles_in() -> None:
    decoder = FrameDecoder(limit=MAX_FRAME)
    frame = struct.pack(">I", MAX_FRAME + 1) + b"{" * 10
    assert decoder.feed(frame[:2]) == []
    with pytest.raises(ProtocolError) as exc:
        decoder.feed(frame[2:])
    assert exc.value.code == "too_large"


def test_a_large_first_frame_trickling_in_decodes_once_whole() -> None:
    decoder = FrameDecoder(limit=MAX_FRAME, first_limit=1 << 20)
    frame = encode({"t": "hello", "pad": "x" * 500_000}, 1 << 20)
    frame += encode_obs(5, 0.5, None)
    hello_end = len(frame) - len(encode_obs(5, 0.5, None))
    msgs = []
    for i in range(0, len(frame), 999):
        got = decoder.feed(frame[i:i + 999])
        assert got == [] or i + 999 >= hello_end  # nothing before the hello is whole
        msgs += got
    assert [m["t"] for m in msgs] == ["hello", "obs"] and len(msgs[0]["pad"]) == 500_000
