"""Compact frames (lrctl.wire.compact): the per-step obs and lr in binary, for peers that
agreed in the hello and welcome. Each decodes to exactly the message its JSON frame
gives; anything else is JSON or a protocol error; a peer that did not agree never
gets one, and a hook that reconnects to a controller that reads only JSON replays
its held observations as JSON."""

from __future__ import annotations

import contextlib
import itertools
import math
import os
import socket
import struct
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from daemon_helpers import POLICIES, Client, ControllerProc, losses
from hypothesis import given
from hypothesis import strategies as st

from lrctl._link import Link
from lrctl.wire.compact import (
    COMPACT_BIT,
    compact_agreed,
    decode_compact,
    encode_lr_compact,
    encode_obs_compact,
    to_json_frame,
)
from lrctl.wire.decoder import FrameDecoder
from lrctl.wire.errors import ProtocolError
from lrctl.wire.frames import HEADER, MAX_HELLO, encode
from lrctl.wire.messages import MAX_HELD, decode_body, encode_lr, encode_obs, with_used

_OBS_SIZE = 26
POLICY = "version: 1\npolicies:\n  - kind: rangetest\n    growth: 1.01\n"  # moves every step
finite = st.floats(allow_nan=False, allow_infinity=False, allow_subnormal=True)


def _feed(frame: bytes) -> dict[str, Any]:
    (msg,) = FrameDecoder().feed(frame)
    return msg


def _same(a: object, b: object) -> bool:
    """Equal with the same types, -0.0 apart from 0.0."""
    if isinstance(a, float) and isinstance(b, float):
        return a == b and math.copysign(1.0, a) == math.copysign(1.0, b)
    if isinstance(a, dict) and isinstance(b, dict):
        return list(a) == list(b) and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return type(a) is type(b) and a == b


@given(st.integers(0, 2**62), st.one_of(st.none(), finite), st.one_of(st.none(), finite))
def test_a_compact_obs_is_the_message_of_its_json_frame(step: int, loss: float | None,
                                                         grad: float | None) -> None:
    frame = encode_obs_compact(step, loss, grad)
    assert frame is not None and HEADER.unpack_from(frame)[0] & COMPACT_BIT
    assert len(frame) == 4 + 26
    assert _same(_feed(frame), decode_body(encode_obs(step, loss, grad)[4:]))
    assert to_json_frame(frame) == encode_obs(step, loss, grad)


@given(st.integers(-1, 2**62), st.lists(finite, min_size=1, max_size=8), st.booleans(),
       st.booleans(), st.sampled_from(["active", "shadow", "manual", "a_B"]),
       st.integers(-1, 2**62))
def test_a_compact_lr_is_the_message_of_its_json_frame(step: int, lrs: list[float],
                                                        skip: bool, stop: bool, mode: str,
                                                        saved: int) -> None:
    frame = encode_lr_compact(step, lrs, skip, stop, mode, saved)
    json_frame = encode_lr(step, lrs, skip, stop, mode, saved)
    assert frame is not None and json_frame is not None
    assert _same(_feed(frame), decode_body(json_frame[4:]))


@st.composite
def _held(draw: st.DrawFn) -> tuple[list[float], list[float | None] | None,
                                    list[tuple[int, list[float]]] | None, list[float] | None]:
    """An every="auto" report's held steps: losses, grad norms (None where a step had
    none) or none at all, runs of the LRs they ran on, and the report's own LRs."""
    k = draw(st.integers(1, 64))
    held_losses = draw(st.lists(finite, min_size=k, max_size=k))
    grads = draw(st.one_of(st.none(), st.lists(st.one_of(st.none(), finite), min_size=k,
                                                max_size=k)))
    groups = draw(st.integers(1, 3))
    lrs = st.lists(finite, min_size=groups, max_size=groups)
    runs = None
    if draw(st.booleans()):
        cuts = sorted(draw(st.sets(st.integers(1, k - 1), max_size=min(k - 1, 4)))) if k > 1 \
            else []
        bounds = [0, *cuts, k]
        runs = [(b - a, draw(lrs)) for a, b in itertools.pairwise(bounds)]
    used = draw(st.one_of(st.none(), lrs))
    return held_losses, grads, runs, used


@given(st.integers(64, 2**62), st.one_of(st.none(), finite), st.one_of(st.none(), finite),
       _held())
def test_a_compact_batch_report_is_the_message_of_its_json_frame(
        step: int, loss: float | None, grad: float | None, held: Any) -> None:
    """every="auto"'s reports (the steps held since the last one: pl, pg, pu) go compact,
    and read as exactly their JSON frame; their JSON form is what a replay to a
    controller that reads only JSON sends, and a replay's change of ``u`` keeps them."""
    held_losses, grads, runs, used = held
    frame = encode_obs_compact(step, loss, grad, used, held_losses, grads, runs)
    json_frame = encode_obs(step, loss, grad, prior=held_losses, prior_grads=grads,
                            prior_used=runs, used=used)
    assert frame is not None and HEADER.unpack_from(frame)[0] & COMPACT_BIT
    assert frame[5] & 8  # the held steps' flag
    msg = _feed(frame)
    assert _same(msg, _feed(json_frame))
    assert to_json_frame(frame) == json_frame
    again = with_used(frame, [0.5])
    assert HEADER.unpack_from(again)[0] & COMPACT_BIT
    assert _same(_feed(again), {**msg, "u": [0.5]})


@pytest.mark.parametrize(("held_losses", "grads", "runs"), [
    ([1.0, math.nan], None, None),  # a non-finite held loss
    ([1.0, 2.0], [1.0, math.inf], None),  # ... grad norm
    ([1.0, 2.0], [1.0, math.nan], None),  # NaN is the compact form's "no grad norm"
    ([1.0, 2.0], [1.0], None),  # grads not as long as the losses
    ([1.0] * (MAX_HELD + 1), None, None),  # too many held steps
    ([1.0, 2.0], None, [(0, [0.1])]),  # an empty run
    ([1.0, 2.0], None, [(3, [0.1])]),  # a run longer than the held steps
    ([1.0, 2.0], None, [(2, [math.inf])]),  # a non-finite LR
    ([1.0, 2.0], None, [(1, [0.1]), (1, [0.1]), (1, [0.1])]),  # more runs than steps
    ([1, 2.0], None, None),  # not a float
    ([1.0] * 63, None, [(1, [0.1] * 512)] * 63),  # past the frame limit (an adversarial
])                                                 # pass: 263 KB, and the connection closed
def test_held_steps_compact_cannot_carry_are_left_to_json(
        held_losses: list[Any], grads: Any, runs: Any) -> None:
    assert encode_obs_compact(70, 0.5, None, None, held_losses, grads, runs) is None


def _held_body(k: int = 2, held_flags: int = 1, held_losses: tuple[float, ...] = (1.0, 2.0),
               grads: tuple[float, ...] = (1.0, math.nan),
               runs: tuple[tuple[int, int], ...] = ((2, 1),)) -> bytes:
    body = struct.pack("<BBqddHB", 1, 1 | 8, 9, 0.5, 0.0, k, held_flags)
    body += struct.pack(f"<{len(held_losses)}d", *held_losses)
    if held_flags & 1:
        body += struct.pack(f"<{len(grads)}d", *grads)
    body += struct.pack("<H", len(runs))
    for count, n in runs:
        body += struct.pack("<HH", count, n) + struct.pack(f"<{n}d", *([0.1] * n))
    return body


def test_the_held_steps_body_reads_as_written() -> None:
    assert decode_compact(_held_body()) == {
        "v": 1, "t": "obs", "s": 9, "l": 0.5, "g": None, "pl": [1.0, 2.0],
        "pg": [1.0, None], "pu": [[2, [0.1]]]}


@pytest.mark.parametrize(("body", "match"), [
    (_held_body()[:-1], "bad compact obs"),  # its last LR one byte short
    (_held_body() + b"\x00", "bad compact obs"),  # a byte after it
    (_held_body(k=0, held_losses=(), grads=(), runs=()), "its held steps"),
    (_held_body(k=MAX_HELD + 1), "its held steps"),
    (_held_body(held_flags=3), "its held steps"),  # an unknown held flag
    (_held_body(held_losses=(1.0, math.nan)), "non-finite held loss"),
    (_held_body(held_losses=(1.0, math.inf)), "non-finite held loss"),
    (_held_body(grads=(1.0, -math.inf)), "infinite held grad norm"),
    (_held_body(runs=((1, 1), (1, 1), (1, 1))), "more runs than held steps"),
    (_held_body()[:_OBS_SIZE + 4], "its held steps"),  # cut inside the losses
], ids=["short", "long", "no-steps", "too-many-steps", "unknown-flag", "nan-loss",
        "inf-loss", "inf-grad", "too-many-runs", "cut"])
def test_a_bad_held_steps_body_is_a_protocol_error(body: bytes, match: str) -> None:
    with pytest.raises(ProtocolError, match=match):
        decode_compact(body)
    with pytest.raises(ProtocolError):
        FrameDecoder().feed(HEADER.pack(COMPACT_BIT | len(body)) + body)


def test_a_batch_report_goes_compact_and_decides_what_its_json_frame_decides(
        controller: ControllerProc) -> None:
    """An every="auto" hook through a real controller: its batch reports are compact
    (once the welcome agreed), and the controller decides from them exactly what it
    decides from the same run's reports sent as JSON."""
    import torch

    import lrctl

    curve = losses(600, seed=4, spikes=(250, 480))
    runs: dict[bool, tuple[list[dict[str, Any]], list[bytes]]] = {}
    for compact in (True, False):
        opt = torch.optim.SGD([torch.nn.Parameter(torch.ones(3))], lr=0.1)
        sent: list[bytes] = []
        with lrctl.attach(opt, policy=str(POLICIES / "default.yaml"), every="auto",
                          spawn=False, run_name="batch", timeout=30.0) as ctl:
            assert ctl._batch is not None and ctl._link is not None
            ctl._batch.fix_k(8)
            assert ctl._link.wait(lambda: ctl._link.connected, 30.0) and ctl._link.compact
            ctl._link.compact = compact  # False: every frame JSON, as to an older peer
            send = ctl._link.send_obs
            ctl._link.send_obs = (  # type: ignore[method-assign]
                lambda t, frame, sent=sent, send=send: (sent.append(frame), send(t, frame))[1])
            for t, loss in enumerate(curve):
                assert ctl._link.wait(lambda: ctl._acked >= ctl._reported, 30.0)
                ctl.step(loss, grad_norm=1.0 + (t % 5) * 0.1)
                opt.step()
        runs[compact] = [d.to_dict() for d in ctl.decisions], sent
    batches = [f for f in runs[True][1] if "pl" in _feed(f)]
    assert len(batches) > 50
    assert all(HEADER.unpack_from(f)[0] & COMPACT_BIT for f in batches)
    assert not any(HEADER.unpack_from(f)[0] & COMPACT_BIT for f in runs[False][1])
    assert runs[True][0] == runs[False][0] and runs[True][0]


@pytest.mark.parametrize(("step", "loss", "grad"), [
    (1, math.nan, 1.0), (1, 1.0, math.inf), (1, -math.inf, None), (-1, 1.0, 1.0),
    (2**63, 1.0, 1.0), (1, 1, 1.0), (True, 1.0, 1.0)])
def test_an_obs_compact_cannot_carry_is_left_to_json(step: Any, loss: Any, grad: Any) -> None:
    assert encode_obs_compact(step, loss, grad) is None


@pytest.mark.parametrize(("lrs", "mode", "skip"), [
    ([math.nan], "active", False), ([1], "active", False), ([0.1], "bad mode", False),
    ([0.1], "", False), ([0.1], "x" * 33, False), ([0.1], "active", 1)])
def test_an_lr_compact_cannot_carry_is_left_to_json(lrs: list[Any], mode: str,
                                                    skip: Any) -> None:
    assert encode_lr_compact(5, lrs, skip, False, mode, 3) is None


def _lr_body(n: int = 1, mode: bytes = b"active", flags: int = 0) -> bytes:
    return (struct.pack("<BBqqB", 2, flags, 5, 3, len(mode)) + mode + struct.pack("<H", n)
            + struct.pack(f"<{n}d", *([0.1] * n)))


@pytest.mark.parametrize(("body", "match"), [
    (b"", "unknown compact frame"),
    (b"\x07" + bytes(25), "unknown compact frame"),
    (b"\x01" + bytes(24), "unknown compact frame"),  # an obs one byte short
    (b"\x01\x04" + bytes(24), "bad compact obs"),  # an unknown flag
    (struct.pack("<BBqdd", 1, 1, 5, math.nan, 0.0), "bad compact obs"),
    (_lr_body(flags=8), "bad compact lr"),
    (_lr_body(mode=b"no way"), "bad compact lr"),
    (_lr_body()[:-1], "bad compact lr"),  # its LR one byte short
    (_lr_body() + b"\x00", "bad compact lr"),
])
def test_a_bad_compact_frame_is_a_protocol_error(body: bytes, match: str) -> None:
    with pytest.raises(ProtocolError, match=match):
        decode_compact(body)
    with pytest.raises(ProtocolError):
        FrameDecoder().feed(HEADER.pack(COMPACT_BIT | len(body)) + body)


def test_an_oversized_compact_frame_is_refused_by_its_length() -> None:
    with pytest.raises(ProtocolError, match="exceeds the limit"):
        FrameDecoder(limit=1 << 10).feed(HEADER.pack(COMPACT_BIT | (1 << 20)) + b"\x01")


def test_compact_and_json_frames_split_anywhere_reassemble() -> None:
    frames = [encode_obs_compact(7, 0.5, None), encode_obs(8, 0.25, 1.0),
              encode_lr_compact(8, [0.1, 0.2], True, False, "active", 4),
              encode({"t": "bye"})]
    stream = b"".join(f for f in frames if f is not None)
    decoder = FrameDecoder()
    got: list[dict[str, Any]] = []
    for i in range(len(stream)):
        got += decoder.feed(stream[i:i + 1])
    assert [(m["t"], m.get("s")) for m in got] == [("obs", 7), ("obs", 8), ("lr", 8),
                                                  ("bye", None)]
    assert got[2]["lrs"] == [0.1, 0.2] and got[2]["skip"] is True


# -- with a real controller ----------------------------------------------------------------
def _hello(run: str, **extra: Any) -> bytes:
    return encode({"t": "hello", "run": run, "run_name": run, "lrs": [0.1], "groups": 1,
                   "policy": {"text": POLICY, "source": "<test>"}, **extra}, MAX_HELLO)


def test_a_controller_answers_compact_only_to_a_hook_that_said_so(
        controller: ControllerProc) -> None:
    """Two raw clients, the same curve: one said compact and sends compact obs, the other
    JSON. The first gets compact answers, the second only JSON, with the same LRs."""
    curve = losses(300, seed=3)
    answers: dict[bool, list[dict[str, Any]]] = {}
    for compact in (True, False):
        c = Client(controller.socket)
        c.send(_hello(f"compact-{compact}", **({"compact": 1} if compact else {})))
        welcome = c.answer()
        assert welcome["t"] == "welcome" and (welcome.get("compact") == 1) is compact
        got = []
        for t, loss in enumerate(curve):
            frame = encode_obs_compact(t, loss, 1.0) if compact else encode_obs(t, loss, 1.0)
            assert frame is not None
            c.send(frame)
            header = _recv_exact(c.sock, 4)
            (raw,) = HEADER.unpack(header)
            body = _recv_exact(c.sock, raw & ~COMPACT_BIT)
            assert bool(raw & COMPACT_BIT) is compact or body.find(b'"d":[{') >= 0
            got.append(c.decoder.feed(header + body)[0])
        answers[compact] = got
        c.send(encode({"t": "bye"}))
        c.sock.close()
    assert [m["lrs"] for m in answers[True]] == [m["lrs"] for m in answers[False]]
    assert [m["s"] for m in answers[True]] == list(range(300))


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    out = b""
    while len(out) < n:
        chunk = sock.recv(n - len(out))
        assert chunk, "the controller closed the connection"
        out += chunk
    return out


class _JsonOnlyController:
    """A scripted peer on a Unix socket that speaks only JSON (an older controller): it
    welcomes each hello at ``last_step`` -1 and records every frame it gets."""

    def __init__(self, path: str, compact: bool) -> None:
        self.compact = compact
        self.frames: list[bytes] = []
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(path)
        self.listener.listen(1)
        self.got_obs = threading.Condition()
        self.conn: socket.socket | None = None
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        conn, _ = self.listener.accept()
        self.conn = conn
        with conn:
            header = _recv_exact(conn, 4)
            _recv_exact(conn, HEADER.unpack(header)[0])  # the hello
            welcome = {"t": "welcome", "run": "r", "last_step": -1, "saved_step": -1,
                       "lrs": [0.1], "mode": "active", "restored": False}
            if self.compact:
                welcome["compact"] = 1
            conn.sendall(encode(welcome))
            while True:
                try:
                    header = _recv_exact(conn, 4)
                except AssertionError:
                    return
                (raw,) = HEADER.unpack(header)
                body = _recv_exact(conn, raw & ~COMPACT_BIT)
                with self.got_obs:
                    self.frames.append(header + body)
                    self.got_obs.notify_all()

    def wait_for(self, n: int) -> None:
        with self.got_obs:
            assert self.got_obs.wait_for(lambda: len(self.frames) >= n, timeout=30)

    def hang_up(self) -> None:
        """Close the hook's connection, as a controller that stopped does."""
        assert self.conn is not None
        with contextlib.suppress(OSError):  # (gone already: the hook closed it)
            self.conn.shutdown(socket.SHUT_RDWR)
        self.thread.join(10)
        self.listener.close()


@pytest.fixture
def sock_path(short_dir: Path) -> Iterator[str]:
    path = str(short_dir / "fake.sock")
    yield path
    if os.path.exists(path):
        os.unlink(path)


def test_a_hook_replays_its_compact_frames_as_json_to_a_controller_that_reads_only_json(
        sock_path: str) -> None:
    first = _JsonOnlyController(sock_path, compact=True)
    link = Link(sock_path, {"run": "r", "lrs": [0.1], "compact": 1},
                lambda msg: None, warn=lambda key, text: None)
    assert link.open(timeout=5.0)
    assert link.wait(lambda: link.connected, 10.0) and link.compact
    for t in range(5):
        frame = encode_obs_compact(t, 1.0 / (t + 1), 1.0)
        assert frame is not None
        link.send_obs(t, frame)  # unanswered: held for a replay
    first.wait_for(5)
    assert all(HEADER.unpack_from(f)[0] & COMPACT_BIT for f in first.frames)
    first.hang_up()  # the controller went away; a new one, JSON only, takes over
    assert link.wait(lambda: not link.connected, 10.0)
    os.unlink(sock_path)
    second = _JsonOnlyController(sock_path, compact=False)
    assert link.reconnect_now(10.0) and not link.compact
    second.wait_for(5)
    assert not any(HEADER.unpack_from(f)[0] & COMPACT_BIT for f in second.frames)
    assert [decode_body(f[4:])["s"] for f in second.frames] == [0, 1, 2, 3, 4]
    link.close(bye=False)
    second.hang_up()


def test_a_hook_and_its_controller_agree_on_compact_frames(controller: ControllerProc) -> None:
    import torch

    import lrctl

    opt = torch.optim.SGD(torch.nn.Linear(2, 1).parameters(), lr=0.1)
    ctl = lrctl.attach(opt, policy=POLICY, spawn=False, run_name="agree", timeout=30.0)
    try:
        for loss in losses(20):
            ctl.step(loss, grad_norm=1.0)
            opt.step()
        assert ctl._link is not None and ctl._link.compact
        # What it still holds for a replay (the steps after the last checkpoint) is compact.
        assert all(HEADER.unpack_from(f)[0] & COMPACT_BIT for _, f in ctl._link.buffer)
    finally:
        ctl.close()


@pytest.mark.parametrize(("value", "agreed"), [(1, True), (True, False), (1.0, False),
                                               ("1", False), (2, False), (None, False)])
def test_only_the_integer_1_agrees_to_compact_frames(value: object, agreed: bool) -> None:
    assert compact_agreed(value) is agreed


def test_the_held_steps_a_frame_may_carry_cover_every_auto_and_no_more() -> None:
    """A frame is handled whole: what one may carry bounds what one peer's frame holds
    the controller's loop for (at 256 held steps, a run with heavy valid policies cost
    the others ~14 ms a frame: an adversarial pass). every="auto" holds at most
    MAX_K - 1 steps; that many pass, in both forms, and one past MAX_HELD does not."""
    from lrctl._batching import Batching
    from lrctl.wire.messages import prior_steps

    assert Batching.MAX_K - 1 <= MAX_HELD
    fits = [1.0] * MAX_HELD
    assert len(prior_steps({"pl": fits}, MAX_HELD)) == MAX_HELD
    assert decode_compact(_held_body(k=MAX_HELD, held_flags=0, held_losses=tuple(fits),
                                     runs=()))["pl"] == fits
    with pytest.raises(ProtocolError, match=f"at most {MAX_HELD}"):
        prior_steps({"pl": [*fits, 1.0]}, MAX_HELD + 1)
