"""Decoding counts in a peer's share of a wake-up: the controller decodes a peer's frames
one at a time, as it handles them, and leaves the rest as bytes for the next wake-up.

3 449 frames of 19 bytes fit in one 64 KiB read, and they were all decoded on the loop at
once (about 25 ms), before any share or budget applied: an adversarial pass had 100 such
peers stall every run for seconds (a hook's answer 4.3 s late; `tests/reliability/
attacks.py tiny` measures it on a real controller). Real sockets, the real transport."""

from __future__ import annotations

import socket

import pytest
from daemon_helpers import QuietHandler, serve_until

from lrctl.daemon.conn import Conn
from lrctl.daemon.limits import Limits
from lrctl.daemon.transport import Transport
from lrctl.wire import decoder as decoder_module
from lrctl.wire.frames import encode

FRAMES = 3000  # of 19 bytes: 57 KB, one read


class _Counting(QuietHandler):
    def __init__(self) -> None:
        self.handled = 0

    def handle(self, conn: Conn, msg: dict) -> None:
        self.handled += 1



def test_a_peers_frames_are_decoded_as_they_are_handled_not_a_read_at_a_time(
        monkeypatch: pytest.MonkeyPatch) -> None:
    decoded = [0]
    decode = decoder_module.decode_body

    def counting(body: bytes) -> dict:
        decoded[0] += 1
        return decode(body)
    monkeypatch.setattr(decoder_module, "decode_body", counting)
    handler = _Counting()
    t = Transport([], handler, limits=Limits(max_messages_per_wake=64))
    ours, them = socket.socketpair()
    try:
        conn = t.open_conn(ours, True, "flood")
        conn.run = "flood"
        them.sendall(encode({"t": "x"}) * FRAMES)
        serve_until(t, lambda: handler.handled > 0)
        assert handler.handled <= 64  # one wake-up's budget ...
        assert decoded[0] == handler.handled  # ... and nothing decoded ahead of it
        assert conn.decoder.buffered > 0  # the rest waits, as bytes
        serve_until(t, lambda: handler.handled == FRAMES)  # nothing lost, nothing twice
        assert decoded[0] == FRAMES and conn.decoder.buffered == 0
    finally:
        t.close()
        them.close()


@pytest.mark.parametrize("split", [1, 3, 4, 5, 7, 19, 4096])
def test_frames_read_in_any_pieces_come_out_whole_and_in_order(split: int) -> None:
    """The incremental decoder (push, then next) against frames cut at any byte."""
    frames = [encode({"t": "obs", "s": s, "pad": "x" * (s * 37 % 200)}) for s in range(50)]
    data = b"".join(frames)
    d = decoder_module.FrameDecoder()
    got: list[dict] = []
    for i in range(0, len(data), split):
        d.push(data[i:i + split])
        while d.has_frame:
            msg = d.next()
            assert msg is not None
            got.append(msg)
    assert [m["s"] for m in got] == list(range(50)) and d.buffered == 0 and d.next() is None


def test_a_gated_decoder_decodes_the_first_frame_alone_until_opened() -> None:
    d = decoder_module.FrameDecoder(gated=True)
    d.push(encode({"t": "hello"}) + encode({"t": "obs", "s": 0}) + encode({"t": "obs", "s": 1}))
    assert d.next() == {"v": 1, "t": "hello"}
    assert not d.has_frame and d.next() is None and d.buffered > 0
    d.open_gate(1 << 16, 1)
    assert d.next()["s"] == 0 and d.next() is None  # type: ignore[index]
    d.open_gate(1 << 16)
    assert d.next()["s"] == 1 and d.buffered == 0  # type: ignore[index]
    d.push(encode({"t": "obs", "s": 2}))
    d.discard()
    assert d.buffered == 0 and d.next() is None


def test_an_oversized_frame_is_refused_when_its_turn_comes() -> None:
    d = decoder_module.FrameDecoder(limit=64)
    d.push(encode({"t": "obs", "s": 0}) + (1000).to_bytes(4, "big"))
    assert d.next()["s"] == 0  # type: ignore[index]
    assert d.has_frame  # (a header over the limit: next() has something to say)
    with pytest.raises(decoder_module.ProtocolError, match="exceeds the limit"):
        d.next()


def test_a_frame_of_too_many_objects_and_arrays_is_refused_before_it_is_decoded() -> None:
    """A 1 MiB frame of empty objects took twenty times its bytes decoded, and 45 ms of C
    decoding that nothing could interrupt (an adversarial pass had such hellos take the
    controller to 736 MiB): the controller's decoders count a large frame's objects and
    arrays first. A hello that resumes a run with a window of 100 000 numbers (a list:
    one array) is taken, as before (found by a review of a first version that counted
    commas too)."""
    def frame(items: str) -> bytes:
        body = ('{"v": 1, "t": "hello", "x": [' + items + "]}").encode()
        return len(body).to_bytes(4, "big") + body

    d = decoder_module.FrameDecoder(first_limit=1 << 20, max_containers=4096)
    d.push(frame(",".join(["{}"] * 20_000)))
    with pytest.raises(decoder_module.ProtocolError, match="more than 4096 JSON objects"):
        d.next()
    window = decoder_module.FrameDecoder(first_limit=1 << 20, max_containers=4096)
    window.push(frame(",".join(["0.1234"] * 100_000)))
    assert len(window.next()["x"]) == 100_000  # type: ignore[index]
    ok = decoder_module.FrameDecoder(first_limit=1 << 20)  # (no bound: the hook's side)
    ok.push(frame(",".join(["{}"] * 20_000)))
    assert len(ok.next()["x"]) == 20_000  # type: ignore[index]
