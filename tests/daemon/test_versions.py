"""A hook never drives a controller of another lrctl version on the shared socket.

A controller started from another install or checkout may not know this
version's policy keys or protocol. The hook reads the version in the welcome;
on a mismatch it uses (or starts) a controller of its own version on a
versioned socket beside the shared one, or, with ``spawn=False``, runs
fail-open with a warning that says what to do.
"""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Iterator

import pytest
import torch

import lrctl
from lrctl import _spawn, client, paths
from lrctl.protocol import MAX_FRAME, FrameDecoder, encode


class OldController:
    """Answers every hello with a welcome that names an older version (or none), and
    ``status`` with that version (unless ``status=False``: then only the welcome says)."""

    def __init__(self, path: str, version: str | None, status: bool = True) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(path)
        self.sock.listen(8)
        self.version = version
        self.status = status
        self.hellos: list[dict] = []
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            decoder = FrameDecoder(MAX_FRAME * 16)
            with conn:
                while True:
                    data = conn.recv(1 << 16)
                    if not data:
                        break
                    for msg in decoder.feed(data):
                        if msg["t"] == "status" and self.status:
                            reply = {"t": "status", "pid": 1}
                            if self.version is not None:
                                reply["version"] = self.version
                            conn.sendall(encode(reply))
                        if msg["t"] == "hello":
                            self.hellos.append(msg)
                            welcome = {"t": "welcome", "run": msg["run"], "last_step": -1,
                                       "saved_step": -1, "lrs": msg["lrs"], "mode": "active",
                                       "restored": False, "policy_sha256": "0" * 64}
                            if self.version is not None:
                                welcome["version"] = self.version
                            conn.sendall(encode(welcome))

    def close(self) -> None:
        self.sock.close()


@pytest.fixture(params=[True, False], ids=["status", "welcome-only"])
def old_controller(request: pytest.FixtureRequest) -> Iterator[OldController]:
    path = os.environ["LRCTL_SOCKET"]
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    old = OldController(path, version=None, status=request.param)
    try:
        yield old
    finally:
        old.close()


def _opt() -> torch.optim.Optimizer:
    return torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=0.1)


def test_another_version_on_the_shared_socket_gets_our_own_controller(
        old_controller: OldController, reap_spawned: None) -> None:
    with pytest.warns(RuntimeWarning, match=r"runs lrctl < 0.2, this hook is lrctl") as seen:
        ctl = lrctl.attach(_opt(), sync=True)
    try:
        # Asked its version first, it never got this run (it kept a phantom of it); one
        # that does not say it in its status learns the hook's version from the hello.
        if old_controller.status:
            assert old_controller.hellos == []
        else:
            assert old_controller.hellos[0]["lrctl"] == lrctl.__version__
        versioned = _spawn.versioned_socket(os.environ["LRCTL_SOCKET"])
        assert versioned.endswith(f"-{lrctl.__version__}.sock")
        status = client.request({"t": "status"}, versioned)
        assert status["version"] == lrctl.__version__ and status["runs"] == 1
        # A state directory of its own (one serves one controller), inside the user's.
        assert status["state_dir"] == str(paths.state_dir(socket=versioned))
        assert f"its state and log in {status['state_dir']}" in str(seen[0].message)
        assert status["state_dir"].startswith(os.path.join(os.environ["LRCTL_STATE_DIR"],
                                                           "sockets", "c-"))
        ctl.step(1.0, grad_norm=1.0)
        assert ctl.connected
    finally:
        ctl.close()


def test_without_spawn_another_version_means_fail_open(old_controller: OldController) -> None:
    opt = _opt()
    with pytest.warns(RuntimeWarning, match="training continues at the optimizer's LRs"):
        ctl = lrctl.attach(opt, spawn=False)
    for _ in range(3):
        ctl.step(1.0, grad_norm=1.0)
        opt.step()
    assert not ctl.connected and opt.param_groups[0]["lr"] == 0.1
    ctl.close()


def test_a_versioned_socket_always_fits_beside_a_long_one(short_dir) -> None:  # type: ignore[no-untyped-def]
    """A legal 103-byte socket plus '-<version>' was past the Unix limit, and attach()
    raised ValueError out of the training script."""
    long_dir = "/tmp/" + "d" * (paths.UNIX_PATH_MAX - 5 - len("/c.sock") - 4)
    address = f"{long_dir}/c.sock"
    assert len(address) <= paths.UNIX_PATH_MAX
    versioned = _spawn.versioned_socket(address)
    assert len(os.fsencode(versioned)) <= paths.UNIX_PATH_MAX
    assert os.path.dirname(versioned) == str(paths.runtime_dir())
    assert versioned.endswith(f"-{lrctl.__version__}.sock")
    assert _spawn.versioned_socket("/tmp/x/c.sock") == f"/tmp/x/c-{lrctl.__version__}.sock"


def test_the_fail_open_warning_names_the_socket_to_stop(short_dir) -> None:  # type: ignore[no-untyped-def]
    """Another version on a socket given to attach(): 'lrctl stop' alone would stop the
    default socket's controller, not that one."""
    path = str(short_dir / "run" / "other.sock")
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    old = OldController(path, version=None, status=True)
    try:
        with pytest.warns(RuntimeWarning, match=f"stop it with 'lrctl stop --socket {path}'"):
            ctl = lrctl.attach(_opt(), socket=path, spawn=False)
        assert not ctl.connected and old.hellos == []  # (asked its version, then left alone)
        ctl.close()
    finally:
        old.close()
