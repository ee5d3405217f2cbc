"""Numbers JSON allows but floats cannot hold: each is refused, nothing else changes."""

from __future__ import annotations

import json
import struct

import pytest
from daemon_helpers import ControllerProc
from rel_helpers import RawClient, hello

POLICY = "version: 1\npolicies:\n  - kind: plateau\n    patience: 2\n"
HUGE = "9" * 400  # a valid JSON integer; float() of it overflows


def frame(body: str) -> bytes:
    data = body.encode()
    return struct.pack(">I", len(data)) + data


@pytest.mark.parametrize("body", [
    '{"v":1,"t":"obs","s":0,"l":HUGE}',
    '{"v":1,"t":"obs","s":0,"l":1.0,"g":HUGE}',
    '{"v":1,"t":"obs","s":0,"l":1.0,"m":{"val_loss":HUGE}}',
    '{"v":1,"t":"obs","s":HUGE,"l":1.0}',
])
def test_huge_integers_get_an_error_and_the_controller_serves_on(
        controller: ControllerProc, body: str) -> None:
    good = RawClient(controller.socket)
    good.send(hello("good-run", POLICY, [0.1]))
    assert good.answer()["t"] == "welcome"

    bad = RawClient(controller.socket)
    bad.send(hello("bad-run", POLICY, [0.1]))
    assert bad.answer()["t"] == "welcome"
    bad.send_raw(frame(body.replace("HUGE", HUGE)))
    reply = bad.answer()
    assert reply["t"] == "error", reply
    bad.obs(0, 1.0)  # the same connection still works after a non-fatal error
    assert bad.answer()["t"] == "lr"

    good.obs(0, 1.0)
    answer = good.answer()
    assert answer["t"] == "lr" and answer["lrs"] == [0.1]
    assert controller.proc is not None and controller.proc.poll() is None
    good.close()
    bad.close()


def test_huge_initial_lr_in_hello_is_refused(controller: ControllerProc) -> None:
    client = RawClient(controller.socket)
    msg = json.dumps(hello("huge-lr", POLICY, [0.1]))[:-1] + ', "v": 1}'
    client.send_raw(frame(msg.replace('"lrs": [0.1]', f'"lrs": [{HUGE}]')))
    reply = client.recv()
    assert reply is not None and reply["t"] == "error"
    assert controller.proc is not None and controller.proc.poll() is None
    client.close()
