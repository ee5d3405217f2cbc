"""Hostile peers (issue #18): slow YAML, peers that never read, strangers on TCP, idle and
half-sent connections. Each test runs a real controller; most run a *reference* run
beside the attack and assert that it was served throughout.

Outcomes, not timings: counts of answers, which peers got in, error codes. Where a
stall must be bounded the bound is generous and the attack large, so that the old
code, which stalled the loop for the whole attack, fails by a wide margin.
"""

from __future__ import annotations

import contextlib
import json
import resource
import select
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from daemon_helpers import ControllerProc, serving
from rel_helpers import FIGURES, RawClient, hello, rss_kib, until

from lrctl.daemon import Limits
from lrctl.daemon.store import StateStore
from lrctl.protocol import FrameDecoder, encode
from lrctl.wire.messages import MAX_HELD
from lrctl.wire.operator import ControllerError, request

POLICY = "version: 1\npolicies:\n  - kind: divergence\n"
# 60 KB of YAML block list: ~10 000 nodes, ~0.5-1.5 s of PyYAML per copy on the loop
# before. (As a flow list, "[1,1,…]", its commas would be refused before any parse:
# Limits.max_frame_items.)
SLOW_YAML = POLICY + "junk:\n" + "".join("  - 1\n" for _ in range(10_000))
TOKEN = "hostile-peers-token"


class Reference(threading.Thread):
    """A run that sends an observation and waits for its answer, over and over."""

    def __init__(self, path: str) -> None:
        super().__init__(daemon=True)
        self.client = RawClient(path)
        self.client.send(hello("reference", POLICY, [0.1]))
        assert self.client.answer()["t"] == "welcome"
        self.answered = 0
        self.worst = 0.0
        self.failure: BaseException | None = None
        self._halt = threading.Event()

    def run(self) -> None:
        step = 0
        try:
            while not self._halt.is_set():
                started = time.monotonic()
                self.client.obs(step, 1.0 / (1 + step), 1.0)
                assert self.client.answer()["t"] == "lr"
                self.worst = max(self.worst, time.monotonic() - started)
                self.answered += 1
                step += 1
        except BaseException as exc:  # reported by finish()
            self.failure = exc

    def finish(self) -> None:
        self._halt.set()
        self.join(60)
        self.client.close()
        assert self.failure is None, f"the reference run failed: {self.failure!r}"


@contextlib.contextmanager
def reference(path: str) -> Iterator[Reference]:
    ref = Reference(path)
    ref.start()
    try:
        yield ref
    finally:
        ref.finish()


def _tcp_controller(make_controller: Callable[..., ControllerProc],
                    short_dir: Path) -> tuple[ControllerProc, int]:
    token_file = short_dir / "token"
    token_file.write_text(TOKEN + "\n")
    token_file.chmod(0o600)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    return make_controller(["--tcp", str(port), "--token-file", str(token_file)]), port


def _frames(sock: socket.socket) -> list[dict[str, Any]]:
    """Every frame until the controller closes the connection."""
    decoder, out = FrameDecoder(1 << 22), []
    while True:
        try:
            data = sock.recv(1 << 16)
        except ConnectionResetError:
            return out
        if not data:
            return out
        out += decoder.feed(data)


# -- #5: policy text parsed off the loop, on a budget --------------------------------------
def test_slow_yaml_hellos_do_not_stall_other_runs(controller: ControllerProc) -> None:
    """Ten hellos each carrying 60 KB of YAML: the reference run is answered all along,
    many times before the last attacker is; the attackers get a clear refusal."""
    with reference(controller.socket) as ref:
        attackers = [RawClient(controller.socket) for _ in range(10)]
        for i, c in enumerate(attackers):
            c.send(hello(f"slow-{i}", SLOW_YAML, [0.1]))
        replies = [c.recv() for c in attackers]
        answered_meanwhile = ref.answered
    for reply in replies:
        assert reply is not None and reply["t"] == "error" and reply["fatal"]
        assert reply["code"] == "bad_policy", reply
        assert "YAML" in reply["message"] or "parsing took longer" in reply["message"]
    # Before: the loop parsed each text itself, and answered nobody meanwhile.
    assert answered_meanwhile >= 30, answered_meanwhile
    FIGURES["slow YAML hellos"] = {"attackers": 10, "reference answers meanwhile":
                                   answered_meanwhile}


def test_a_policy_over_the_parse_budget_is_refused_clearly(short_dir: Path) -> None:
    store = StateStore(short_dir / "state")
    with serving(str(short_dir / "s.sock"), store,
                 limits=Limits(hello_budget_s=0.02)) as (_, path):
        slow = RawClient(path)
        slow.send(hello("slow", SLOW_YAML, [0.1]))
        reply = slow.recv()
        assert reply is not None and reply["code"] == "bad_policy"
        assert "parsing took longer than the 0.02 s allowed" in reply["message"]
        good = RawClient(path)  # the controller goes on as before
        good.send(hello("good", POLICY, [0.1]))
        assert good.answer()["t"] == "welcome"
        slow.close()
        good.close()


# -- #6: never block on a peer that does not read --------------------------------------------
def test_peers_that_never_read_their_replies_do_not_stall_the_loop(
        controller: ControllerProc) -> None:
    """60 peers each ask 1 000 ``status`` without reading, then send a broken frame.
    Before, the error reply to each blocked the loop for 0.5 s (30 s in all)."""
    peers = []
    for _ in range(60):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(controller.socket)
        s.settimeout(60)
        s.sendall(encode({"t": "status"}) * 1000)
        peers.append(s)
    for s in peers:  # answered: the replies pile up in the controller, unread
        select.select([s], [], [], 60)
    with reference(controller.socket) as ref:
        for s in peers:
            s.sendall(struct.pack(">I", 1 << 30))  # a broken frame: a fatal error is due
        before = ref.answered
        until("the reference run answered after the attack",
              lambda: ref.answered >= before + 50)
    for s in peers:  # each was closed in the end, without anyone reading first
        assert _closed_soon(s)
        s.close()
    assert ref.worst < 10.0, f"an answer waited {ref.worst:.1f} s"  # bound: generous
    FIGURES["peers that never read"] = {"peers": 60, "worst reference wait s":
                                        round(ref.worst, 3)}


def _closed_soon(s: socket.socket) -> bool:
    with contextlib.suppress(ConnectionResetError):
        while s.recv(1 << 16):
            pass
    return True


# -- #7: the token before anything large over TCP --------------------------------------------
def test_an_unauthenticated_tcp_peer_cannot_make_the_controller_read_a_big_frame(
        make_controller: Callable[..., ControllerProc], short_dir: Path) -> None:
    ctl, port = _tcp_controller(make_controller, short_dir)
    with socket.create_connection(("127.0.0.1", port), timeout=60) as s:
        s.sendall(struct.pack(">I", 1 << 20) + b'{"v":1,"t":"hello","x":"')
        frames = _frames(s)  # answered from the length alone: the megabyte never came
    assert [f["code"] for f in frames] == ["too_large"], frames
    assert "4096" in frames[0]["message"]
    with socket.create_connection(("127.0.0.1", port), timeout=60) as s:
        body = json.dumps({"v": 1, "t": "hello", "token": "wrong"}).encode()
        big = json.dumps({"v": 1, "t": "hello", "x": "a" * 200_000}).encode()
        s.sendall(struct.pack(">I", len(body)) + body + struct.pack(">I", len(big)) + big)
        frames = _frames(s)
    assert [f["code"] for f in frames] == ["unauthorized"], frames
    assert request({"t": "status"}, f"tcp://127.0.0.1:{port}", token=TOKEN)["t"] == "status"
    assert request({"t": "status"}, ctl.socket)["t"] == "status"


def test_a_lone_surrogate_is_refused_and_costs_no_one_anything(
        make_controller: Callable[..., ControllerProc], short_dir: Path) -> None:
    """An adversarial pass's find: a token (or any string) holding a lone UTF-16 surrogate
    escape is valid JSON, and ``"\\ud800".encode()`` raised out of the loop: one 40-byte
    frame from a TCP stranger ended the controller. In a run's name it broke ``lrctl
    runs`` for every operator while the run was held."""
    ctl, port = _tcp_controller(make_controller, short_dir)
    with socket.create_connection(("127.0.0.1", port), timeout=60) as s:
        body = b'{"v":1,"t":"auth","token":"\\ud800"}'
        s.sendall(struct.pack(">I", len(body)) + body)
        frames = _frames(s)
    assert [f["code"] for f in frames] == ["bad_message"], frames
    assert "surrogate" in frames[0]["message"]
    peer = RawClient(ctl.socket)
    body = encode(hello("evil", POLICY, [0.1])).replace(b'"run_name":"evil"',
                                                        b'"run_name":"evil\\udc00"')
    peer.send_raw(struct.pack(">I", len(body) - 4) + body[4:])
    assert peer.answer()["code"] == "bad_message"
    peer.close()
    assert request({"t": "status"}, f"tcp://127.0.0.1:{port}", token=TOKEN)["t"] == "status"
    assert request({"t": "runs"}, ctl.socket)["t"] == "runs"
    assert ctl.proc.poll() is None


def test_policies_whose_windows_add_up_past_the_bound_are_refused_at_hello(
        controller: ControllerProc) -> None:
    """An adversarial pass's find: 64 divergence guards with ``window: 100000`` (each
    allowed) gave a run a state whose checkpoint, encoded on the loop every second, held
    every run's answers for up to 0.7 s, and could not be read back (over 16 MiB)."""
    text = "version: 1\npolicies:\n" + "".join(
        f"  - kind: divergence\n    name: d{i}\n    window: 100000\n" for i in range(64))
    with reference(controller.socket) as ref:
        peer = RawClient(controller.socket)
        peer.send(hello("greedy", text, [0.1]))
        refused = peer.answer()
        peer.close()
        assert refused["t"] == "error", refused
        assert "smaller windows" in refused["message"]
        until("the reference run, served", lambda: ref.answered > 10)
    assert request({"t": "runs"}, controller.socket)["t"] == "runs"


def test_a_state_too_large_to_snapshot_is_refused_each_time_and_the_run_goes_on(
        controller: ControllerProc) -> None:
    """``ctl.state_dict()`` of a run whose windows hold more than a hello may carry back:
    refused (``state_too_large``), every time it is asked, without harm to the run. (The
    controller remembers the verdict until the run holds fewer values: each request had
    encoded the whole state on the loop.)"""
    text = "version: 1\npolicies:\n  - kind: divergence\n    window: 100000\n"
    run = RawClient(controller.socket)
    run.send(hello("big-state", text, [0.1]))
    assert run.answer()["t"] == "welcome"
    step = 0
    held = [1.0 + (i % 97) / 1000.0 for i in range(MAX_HELD)]
    for _ in range(40_960 // (MAX_HELD + 1)):  # ~40 000 steps: ~80 000 values, ~1.4 MB
        run.send({"t": "obs", "s": step + MAX_HELD, "l": 1.05, "g": 1.05, "pl": held,
                  "pg": held})
        assert run.answer()["t"] == "lr"
        step += MAX_HELD + 1
    for _ in range(3):
        run.send({"t": "snapshot"})
        refused = run.answer()
        assert refused["t"] == "error" and refused["code"] == "state_too_large", refused
    run.obs(step, 1.0, 1.0)
    assert run.answer()["t"] == "lr"
    run.close()


def test_a_tcp_hook_with_a_large_policy_shows_its_token_first(
        make_controller: Callable[..., ControllerProc], short_dir: Path) -> None:
    import torch

    import lrctl

    _, port = _tcp_controller(make_controller, short_dir)
    policy = POLICY + "".join(f"# padding line {i:04d} of a long policy file\n"
                              for i in range(300))  # ~13 KB: over the pre-auth frame limit
    opt = torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=0.1)
    with lrctl.attach(opt, policy=policy, socket=f"tcp://127.0.0.1:{port}", token=TOKEN,
                      sync=True, spawn=False) as ctl:
        ctl.step(1.0)
        assert ctl.connected


# -- #8: connection slots, idle peers, memory ------------------------------------------------
def _allow_files(n: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < n:
        if hard != resource.RLIM_INFINITY and hard < n:
            pytest.skip(f"needs {n} open files, the hard limit is {hard}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (n, hard))


def test_idle_unix_connections_at_the_cap_do_not_shut_out_hooks_or_status(
        controller: ControllerProc) -> None:
    _allow_files(4096)
    idle = []
    try:
        for _ in range(1100):  # more than the 1 024 connections a controller takes
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(controller.socket)  # blocking: waits while the backlog is full
            idle.append(s)
        assert request({"t": "status"}, controller.socket, timeout=30)["t"] == "status"
        hook = RawClient(controller.socket)
        hook.send(hello("late-hook", POLICY, [0.1]))
        assert hook.answer()["t"] == "welcome"
        hook.obs(0, 1.0, 1.0)
        assert hook.answer()["t"] == "lr"
        hook.close()
    finally:
        for s in idle:
            s.close()


def test_silent_tcp_connections_do_not_shut_out_an_authorised_client(
        make_controller: Callable[..., ControllerProc], short_dir: Path) -> None:
    _, port = _tcp_controller(make_controller, short_dir)
    silent = [socket.create_connection(("127.0.0.1", port), timeout=60) for _ in range(300)]
    try:  # 300 > the 256 TCP slots: the oldest silent ones make room
        reply = request({"t": "status"}, f"tcp://127.0.0.1:{port}", token=TOKEN, timeout=30)
        assert reply["t"] == "status"
    finally:
        for s in silent:
            s.close()


def test_half_sent_hellos_cannot_take_the_controllers_memory(
        controller: ControllerProc) -> None:
    """300 peers each send all but the last byte of a 1 MiB hello and wait: what the
    controller holds for them is bounded (before: ~300 MiB), and the rest are closed."""
    size = (1 << 20) - 16
    part = struct.pack(">I", size) + b"{" + b" " * (size - 2)
    start = rss_kib(controller.pid)
    peers = [socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) for _ in range(300)]
    for s in peers:
        s.connect(controller.socket)
        s.settimeout(60)
    senders = [threading.Thread(target=_send_quietly, args=(s, part)) for s in peers]
    for t in senders:
        t.start()
    for t in senders:
        t.join(120)
    assert request({"t": "status"}, controller.socket, timeout=30)["t"] == "status"
    grown = (rss_kib(controller.pid) - start) / 1024
    for s in peers:  # all closed in the end (the budget, then the quiet timeout)
        assert _closed_soon(s)
        s.close()
    assert grown < 150, f"the controller grew by {grown:.0f} MiB"
    FIGURES["half-sent 1 MiB hellos"] = {"peers": 300, "controller growth MiB": round(grown)}


def _send_quietly(s: socket.socket, data: bytes) -> None:
    with contextlib.suppress(OSError):
        s.sendall(data)


def test_a_silent_unix_peer_is_closed(controller: ControllerProc) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(60)
        s.connect(controller.socket)
        assert s.recv(1) == b""  # closed after the quiet timeout (10 s); before: never
    with pytest.raises(ControllerError):  # and the controller serves on
        request({"t": "set_lr", "run": "nobody", "lr": 0.1}, controller.socket)


def test_hellos_waiting_for_their_session_are_bounded_in_bytes(short_dir: Path) -> None:
    """A hello waiting for the session builder is held decoded, and a run's state in it
    (``session``) can take twenty times its bytes: 30 hellos of 1 MiB behind slow ones
    took the controller from 30 to 736 MiB (found by an adversarial pass). The waiting
    hellos' bytes are capped together; past the cap a hello is answered ``unavailable``,
    to retry, and the hellos already waiting are answered once the builder gets to them."""
    limits = Limits(max_pending_hello_bytes=1 << 20)
    with serving(str(short_dir / "c.sock"), StateStore(short_dir / "state"),
                 limits=limits) as (srv, path):
        gate = threading.Event()
        build = srv.handshakes.builder.build

        def held(job: Any) -> Any:
            assert gate.wait(60)
            return build(job)
        srv.handshakes.builder.build = held  # the builder is busy: hellos wait
        pad = {"pad": "x" * 400_000}  # a "run state" the build will refuse
        clients = []
        for i in range(3):
            c = RawClient(path, timeout=30)
            c.send(hello(f"big-{i}", POLICY, [0.1], session=pad))
            clients.append(c)
        refused = clients[2].recv()
        assert refused is not None and refused["code"] == "unavailable", refused
        assert refused["retry"] is True and "other hellos" in refused["message"]
        gate.set()
        for c in clients[:2]:  # answered, in turn (here: the state is refused)
            reply = c.recv()
            assert reply is not None and reply["t"] == "error" and reply["code"] != \
                "unavailable", reply
        ok = RawClient(path, timeout=30)  # and the next hello is served
        ok.send(hello("small", POLICY, [0.1]))
        assert ok.answer()["t"] == "welcome"
        for c in [*clients, ok]:
            c.close()
