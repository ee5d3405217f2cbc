"""The socket is private to its user; TCP needs the token; bad input never crashes."""

from __future__ import annotations

import os
import socket
import stat
import struct
import subprocess
import sys
import time

import pytest
import torch
from daemon_helpers import POLICIES, ControllerProc

import lrctl
from lrctl import paths
from lrctl.client import ControllerError, request
from lrctl.protocol import FrameDecoder, encode


def test_socket_is_0600_in_a_0700_directory(controller: ControllerProc) -> None:
    assert stat.S_IMODE(os.stat(controller.socket).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(os.path.dirname(controller.socket)).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(controller.state_dir).st_mode) == 0o700


def test_refuses_a_directory_writable_by_others(short_dir, make_controller) -> None:  # type: ignore[no-untyped-def]
    run_dir = short_dir / "run"
    run_dir.mkdir(mode=0o700)
    os.chmod(run_dir, 0o777)
    proc = make_controller(start=False).start(wait=False)
    assert proc.proc.wait(60) != 0
    assert "writable by other users" in proc.log.read_text()
    with pytest.raises(PermissionError, match="writable by other users"):
        paths.ensure_private_dir(run_dir)


@pytest.mark.skipif(os.geteuid() != 0, reason="chown to another user needs root")
def test_refuses_a_directory_owned_by_another_user(short_dir) -> None:  # type: ignore[no-untyped-def]
    other = short_dir / "other"
    other.mkdir(mode=0o700)
    os.chown(other, 12345, 12345)
    with pytest.raises(PermissionError, match="belongs to uid 12345"):
        paths.ensure_private_dir(other)


def test_refuses_a_symlinked_directory(short_dir) -> None:  # type: ignore[no-untyped-def]
    (short_dir / "real").mkdir(mode=0o700)
    (short_dir / "link").symlink_to(short_dir / "real")
    with pytest.raises(PermissionError, match="symlink"):
        paths.ensure_private_dir(short_dir / "link")


def test_socket_path_too_long_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="107-byte limit"):
        paths.parse_address("/tmp/" + "x" * 200)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_tcp_needs_the_token(make_controller, short_dir, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    token_file = short_dir / "token"
    token_file.write_text("s3cret-token\n")
    token_file.chmod(0o600)
    port = _free_port()
    make_controller(["--tcp", str(port), "--token-file", str(token_file)])
    address = f"tcp://127.0.0.1:{port}"
    assert request({"t": "status"}, address, token="s3cret-token")["runs"] == 0
    for bad in (None, "wrong", "s3cret-token-but-longer"):
        with pytest.raises(ControllerError, match="token is required"):
            request({"t": "status"}, address, token=bad)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=0.1)
    with pytest.raises(PermissionError, match="refused"):
        lrctl.attach(opt, socket=address, token="wrong", spawn=False)
    monkeypatch.setenv("LRCTL_TOKEN", "s3cret-token")
    with lrctl.attach(opt, policy=str(POLICIES / "plateau.yaml"), socket=address, sync=True,
                      spawn=False) as ctl:
        ctl.step(1.0)
        assert ctl.connected


def test_serve_tcp_without_a_token_refuses_to_start(short_dir) -> None:  # type: ignore[no-untyped-def]
    sock = short_dir / "t.sock"
    out = subprocess.run([sys.executable, "-m", "lrctl", "serve", "--foreground", "--tcp", "0",
                          "--socket", str(sock), "--state-dir", str(short_dir / "state")],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode != 0
    assert "--tcp needs a token" in out.stderr
    # An adversarial pass's find: the Unix socket, bound first, was left behind (a later
    # `lrctl status` said "connection refused" instead of "no controller").
    assert not sock.exists()


def test_a_symlinked_log_is_refused_by_name_and_leaves_no_socket(short_dir) -> None:  # type: ignore[no-untyped-def]
    sock, state = short_dir / "l.sock", short_dir / "state"
    state.mkdir(mode=0o700)
    (state / "controller.log").symlink_to(short_dir / "elsewhere.log")
    out = subprocess.run([sys.executable, "-m", "lrctl", "serve", "--foreground",
                          "--socket", str(sock), "--state-dir", str(state)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "controller.log is a symlink; refusing to write through it" in out.stderr
    assert not sock.exists() and not (short_dir / "elsewhere.log").exists()


def _raw(path: str) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(10)
    s.connect(path)
    return s


def _read_frames(s: socket.socket) -> list[dict]:
    decoder, frames = FrameDecoder(), []
    while True:
        data = s.recv(65536)
        if not data:
            return frames
        frames += decoder.feed(data)


@pytest.mark.parametrize("payload, code", [
    (struct.pack(">I", 50_000_000), "too_large"),
    (struct.pack(">I", 5) + b"{oops", "bad_frame"),
    (struct.pack(">I", 19) + b'{"v":9,"t":"hello"}', "bad_version"),
])
def test_bad_frames_get_an_error_frame_and_a_closed_connection(
        controller: ControllerProc, payload: bytes, code: str) -> None:
    with _raw(controller.socket) as s:
        s.sendall(payload)
        frames = _read_frames(s)
    assert frames and frames[-1]["t"] == "error" and frames[-1]["code"] == code
    assert frames[-1]["fatal"] is True
    assert request({"t": "status"})["pid"] == controller.pid  # still serving


def test_unknown_version_is_refused_with_a_clear_message(controller: ControllerProc) -> None:
    body = b'{"v":2,"t":"status"}'
    with _raw(controller.socket) as s:
        s.sendall(struct.pack(">I", len(body)) + body)
        (frame,) = _read_frames(s)
    assert "unsupported protocol version 2" in frame["message"]
    assert "speaks version 1" in frame["message"]


def test_bad_messages_get_non_fatal_errors(controller: ControllerProc) -> None:
    with _raw(controller.socket) as s:
        s.sendall(encode({"t": "obs", "s": 1}) + encode({"t": "nonsense"})
                  + encode({"t": "set_lr", "run": "nobody", "lr": 0.1}))
        decoder, frames = FrameDecoder(), []
        while len(frames) < 3:
            frames += decoder.feed(s.recv(65536))
    assert [f["code"] for f in frames] == ["bad_message", "bad_message", "no_such_run"]
    assert not any(f["fatal"] for f in frames)


def test_an_invalid_policy_is_refused_at_attach_with_file_and_line(
        controller: ControllerProc, short_dir) -> None:  # type: ignore[no-untyped-def]
    bad = short_dir / "bad.yaml"
    bad.write_text("version: 1\npolicies:\n  - kind: plateau\n    factor: 2\n")
    opt = torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=0.1)
    with pytest.raises(lrctl.client.PolicyRejected, match=r"bad.yaml:4: factor: "):
        lrctl.attach(opt, policy=str(bad), spawn=False)
    with pytest.raises(TypeError, match="needs a torch optimizer"):
        lrctl.attach(object(), spawn=False)


def test_a_silent_tcp_peer_is_dropped_and_local_hooks_keep_working(  # type: ignore[no-untyped-def]
        make_controller, short_dir) -> None:
    token_file = short_dir / "token"
    token_file.write_text("s3cret-token\n")
    token_file.chmod(0o600)
    port = _free_port()
    ctl = make_controller(["--tcp", str(port), "--token-file", str(token_file)])
    stranger = socket.create_connection(("127.0.0.1", port), timeout=60)
    stranger.sendall(b"\x00\x00")  # half a length prefix, then nothing: never authenticates
    started = time.monotonic()
    assert stranger.recv(1) == b""  # the controller closed it (the timeout is ~10 s)
    assert time.monotonic() - started < 60
    stranger.close()
    assert request({"t": "status"}, ctl.socket)["runs"] == 0  # the local socket serves on
