"""A hook that hangs up right after its last frames: what it sent is still applied.

``ctl.close()`` sends the last observations and ``bye`` and closes at once, without
reading the controller's answers. The controller's next reply then fails (the peer is
gone) while the rest of what the hook sent is still in its receive buffer: it must
apply all of it (the observations, then the ``bye`` that ends the run), not drop it.
"""

from __future__ import annotations

import socket
import time

from daemon_helpers import ControllerProc

from lrctl.client import request
from lrctl.protocol import MAX_HELLO, FrameDecoder, encode, encode_obs

# A warmup over the whole run: the LR changes at every step, so every step gets a reply.
POLICY = "version: 1\npolicies:\n  - kind: warmup\n    steps: 100000\n"
STEPS = 4000  # ~200 KiB of frames: more than the controller reads in one go


def test_the_last_observations_and_bye_of_a_hook_that_hung_up_are_applied(
        controller: ControllerProc) -> None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(30)
    sock.connect(controller.socket)
    sock.sendall(encode({"t": "hello", "run": "hangup-1", "run_name": "hangup",
                         "policy": {"text": POLICY, "source": "<test>"}, "lrs": [0.1],
                         "groups": 1}, MAX_HELLO))
    decoder = FrameDecoder(1 << 22)
    welcome: list[dict[str, object]] = []
    while not welcome:
        welcome = decoder.feed(sock.recv(1 << 16))
    assert welcome[0]["t"] == "welcome"
    frames = b"".join(encode_obs(t, 1.0, 1.0) for t in range(STEPS)) + encode({"t": "bye"})
    sock.sendall(frames)  # then hang up without reading a single answer
    sock.close()

    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # no timing asserted: wait for the outcome
        runs = request({"t": "runs"}, controller.socket)["runs"]
        if not any(r["run"] == "hangup-1" for r in runs):
            break
        time.sleep(0.05)
    assert not any(r["run"] == "hangup-1" for r in runs), (
        "the run was not ended: its bye (and last observations) were dropped")
    log = controller.log.read_text()
    assert f"run hangup-1 ended at step {STEPS - 1}" in log, log[-2000:]
