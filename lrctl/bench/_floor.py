"""The socket floor arm of ``lrctl bench overhead``: the least a hook can do per step.

A client of the same paced controller the hook arms use, that does per step only what
no socket hook can avoid: read the answer to the step before (one ``recv``: it has
come, a step has passed), decode its compact frame, write its LR into the optimizer,
and send this step's compact ``obs`` (one ``send``, which wakes nobody: the
controller reads paced runs on a timer). No guard, no history, no audit of the LRs
used, no fail-open, no reconnect. What the real hook costs above it is bookkeeping;
what this arm costs is the floor of any hook that talks to the controller through a
socket, on this machine.
"""

from __future__ import annotations

import os
import secrets
import select
import socket
from typing import Any

from .._version import __version__
from ..protocol import MAX_HELLO, encode
from ..wire.compact import compact_agreed, encode_obs_compact
from ..wire.decoder import FrameDecoder

__all__ = ["SocketFloor"]

_WAIT_MS = 1000.0  # an answer later than this is not waited for (the controller is gone)


class SocketFloor:
    """A paced run of the controller at ``path``, driven by :meth:`call` once a step."""

    def __init__(self, path: str, group: dict[str, Any], policy_text: str) -> None:
        self.group = group  # the optimizer's param group whose LR the answers set
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self._hello(path, group, policy_text)
        except BaseException:
            self.sock.close()
            raise
        self.poller = select.poll()
        self.poller.register(self.sock, select.POLLIN)
        self.step = 0
        self.answered = -1  # the newest step answered
        self.waits = 0  # answers not in when the next step began (waited for)
        self.late = 0  # ... nor within _WAIT_MS (the step went on without them)

    def _hello(self, path: str, group: dict[str, Any], policy_text: str) -> None:
        self.sock.settimeout(30)
        self.sock.connect(path)
        self.sock.sendall(encode({
            "t": "hello", "run": f"bench-floor-{secrets.token_hex(4)}", "run_name": "bench-floor",
            "policy": {"text": policy_text, "source": "<bench>"}, "lrs": [group["lr"]],
            "groups": 1, "world_size": 1, "mlflow": {"run_id": None, "tracking_uri": None},
            "cwd": os.getcwd(),
            "sync": False, "pace": True, "compact": 1, "lrctl": __version__}, MAX_HELLO))
        self.decoder = FrameDecoder()
        welcome = self._first_message()
        if welcome.get("t") != "welcome" or not compact_agreed(welcome.get("compact")):
            raise ConnectionError(f"the controller did not welcome a compact run: {welcome}")
        self.sock.setblocking(False)

    def _first_message(self) -> dict[str, Any]:
        while True:
            data = self.sock.recv(1 << 16)
            if not data:
                raise ConnectionError("the controller closed the connection at hello")
            msgs = self.decoder.feed(data)
            if msgs:
                return msgs[0]

    def call(self, loss: float, g: float) -> None:
        due = self.step - 1  # the answer this step's LR comes from, as the hook's
        while self.answered < due:
            try:
                data = self.sock.recv(1 << 16)
            except BlockingIOError:
                self.waits += 1
                if not self.poller.poll(_WAIT_MS):
                    self.late += 1
                    break
                continue
            if not data:
                raise ConnectionError("the controller closed the connection")
            for msg in self.decoder.feed(data):
                if msg.get("t") == "lr" and msg.get("lrs"):
                    self.group["lr"] = msg["lrs"][0]
                    if isinstance(msg.get("s"), int):
                        self.answered = max(self.answered, msg["s"])
        frame = encode_obs_compact(self.step, loss, g)
        assert frame is not None  # finite floats
        self.sock.send(frame)
        self.step += 1

    def close(self) -> None:
        self.sock.close()
