"""Injected faults: a training process dying mid-frame, an unwritable checkpoint, a
corrupt one, a removed socket file and a stale one. The controller stays up and
every other run is unaffected."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from daemon_helpers import ControllerProc
from rel_helpers import FIGURES, RawClient, hello, until

import lrctl
from lrctl.client import request

PLATEAU = "version: 1\npolicies:\n  - kind: plateau\n    metric: loss\n    patience: 3\n"
FAULTS: dict[str, int] = {}


def _count(name: str) -> None:
    FAULTS[name] = FAULTS.get(name, 0) + 1
    FIGURES["faults injected and survived"] = dict(FAULTS)


def _runs() -> dict[str | None, dict]:
    return {r["run"]: r for r in request({"t": "runs"})["runs"]}


def _opt() -> torch.optim.Optimizer:
    return torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=0.1)


def _step(ctl: lrctl.Controller, engine: lrctl.Engine, t: int) -> None:
    ctl.step(1.0)
    engine.observe(t, 1.0)
    assert ctl.lr == engine.applied_lrs, f"step {t}"


DIES_MID_FRAME = textwrap.dedent("""
    import os, signal, socket, sys
    sys.path.insert(0, sys.argv[2])
    from rel_helpers import hello
    from lrctl.protocol import encode, encode_obs
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(sys.argv[1])
    s.sendall(encode(hello("orphan", sys.argv[3], [0.1]), 1 << 20))
    for t in range(5):
        s.sendall(encode_obs(t, 1.0, None))
    frame = encode_obs(5, 1.0, None)
    s.sendall(frame[: len(frame) // 2])
    os.kill(os.getpid(), signal.SIGKILL)  # its answers unread: the controller's sends fail
""")


def test_training_process_killed_mid_frame_is_cleaned_up_and_can_resume(
        make_controller: Callable[..., ControllerProc]) -> None:
    controller = make_controller(["--session-timeout", "1"])
    engine = lrctl.load_policy(PLATEAU, [0.1])
    with lrctl.attach(_opt(), policy=PLATEAU, sync=True, spawn=False) as ctl:
        for t in range(5):
            _step(ctl, engine, t)
        for _ in range(3):
            out = subprocess.run([sys.executable, "-c", DIES_MID_FRAME, controller.socket,
                                  str(Path(__file__).parent), PLATEAU], timeout=60)
            assert out.returncode == -signal.SIGKILL
            _count("training process killed mid-frame")
        # Its hook is gone: checkpointed at once (the step is checked on reconnect below).
        until("the orphan's checkpoint", lambda: (
            Path(controller.state_dir) / "runs" / "orphan.ckpt").is_file())
        for t in range(5, 10):  # the well-behaved run is unaffected throughout
            _step(ctl, engine, t)
        # No hook for longer than --session-timeout: dropped from memory, kept on disk.
        until("the orphan to be evicted", lambda: "orphan" not in _runs())
        runs = Path(controller.state_dir) / "runs"  # (set aside: a start restores it no more)
        assert (runs / ".detached" / "orphan.ckpt").is_file()
        assert not (runs / "orphan.ckpt").exists()
        for t in range(10, 15):
            _step(ctl, engine, t)
        # A late reconnect resumes where the orphan left off.
        late = RawClient(controller.socket)
        try:
            late.send(hello("orphan", PLATEAU, [0.1]))
            welcome = late.answer()
            assert welcome["t"] == "welcome" and welcome["restored"] is True
            assert welcome["last_step"] == 4
            late.obs(5, 1.0)
            assert late.answer()["s"] == 5
        finally:
            late.close()
        assert controller.proc is not None and controller.proc.poll() is None
        assert "evicted after" in controller.log.read_text()


def test_unwritable_checkpoint_is_reported_and_training_continues(
        controller: ControllerProc) -> None:
    engine = lrctl.load_policy(PLATEAU, [0.1])
    runs_dir = Path(controller.state_dir) / "runs"
    with lrctl.attach(_opt(), policy=PLATEAU, sync=True, spawn=False, run_name="w") as ctl:
        for t in range(3):
            _step(ctl, engine, t)
        # The checkpoint's path becomes a non-empty directory: every save fails (as root too).
        target = runs_dir / f"{ctl.run_key}.ckpt"
        until("the first checkpoint (written off the loop)", target.is_file)
        target.unlink()
        target.mkdir()
        (target / "x").write_text("in the way")
        request({"t": "pause", "run": ctl.run_key})  # forces a save now
        request({"t": "resume", "run": ctl.run_key})
        for t in range(3, 40):  # the run goes on from memory, with the right LRs
            _step(ctl, engine, t)
        until("the error in runs", lambda: _runs()[ctl.run_key]["store_error"] is not None)
        _count("checkpoint path unwritable")
        out = subprocess.run([sys.executable, "-m", "lrctl", "runs"], capture_output=True,
                             text=True, timeout=60)
        assert "cannot checkpoint" in out.stdout, out
        assert "checkpoint" in " ".join(request({"t": "status"})["errors"])
        assert "cannot checkpoint run" in controller.log.read_text()
        assert ctl.connected
        # The path is fixed: checkpoints resume and the error clears.
        shutil.rmtree(target)
        for _ in range(5):
            ctl.step(1.0)
        until("the checkpoint to be written", lambda: target.is_file())
        until("the error to clear", lambda: _runs()[ctl.run_key]["store_error"] is None)
        until("no temporary file left (a write may be finishing)",
              lambda: not [p for p in runs_dir.iterdir() if p.name.endswith(".tmp")])


def test_corrupt_or_partial_checkpoints_are_never_loaded(
        make_controller: Callable[..., ControllerProc]) -> None:
    controller = make_controller()
    with pytest.warns(RuntimeWarning, match="lost the controller"), lrctl.attach(
            _opt(), policy=PLATEAU, sync=True, spawn=False, run_name="good") as ctl:
        for _ in range(5):
            ctl.step(1.0)
        key = ctl.run_key
        runs_dir = Path(controller.state_dir) / "runs"
        # A new run's first checkpoint is made durable off the loop: wait for it.
        until("the run's first checkpoint", (runs_dir / f"{key}.ckpt").is_file)
        controller.kill9()
        good = (runs_dir / f"{key}.ckpt").read_bytes()
        damaged = {
            "truncated": good[: len(good) // 2],
            "flipped": good.replace(b'"run_name":"good"', b'"run_name":"evil"'),
            "empty": b"",
            "garbage": os.urandom(200),
        }
        for name, data in damaged.items():
            (runs_dir / f"{name}.ckpt").write_bytes(data)
            _count("corrupt checkpoint")
        controller.start()
        runs = _runs()
        assert key in runs and not set(damaged) & set(runs)
        for name in damaged:
            assert (runs_dir / f"{name}.corrupt").is_file()
        assert "moved aside as .corrupt" in controller.log.read_text()
        ctl.step(1.0)  # the hook notices the restart (and warns) before it closes


def test_socket_file_removed_while_serving_is_bound_again(controller: ControllerProc) -> None:
    engine = lrctl.load_policy(PLATEAU, [0.1])
    with lrctl.attach(_opt(), policy=PLATEAU, sync=True, spawn=False) as ctl:
        for t in range(3):
            _step(ctl, engine, t)
        os.unlink(controller.socket)
        _count("socket file removed")
        for t in range(3, 10):  # the open connection is not affected
            _step(ctl, engine, t)
        until("the socket to come back", lambda: os.path.exists(controller.socket))
        assert os.stat(controller.socket).st_mode & 0o777 == 0o600
        assert request({"t": "status"})["pid"] == controller.pid  # new connections work
        assert "was removed; bound it again" in controller.log.read_text()
        for t in range(10, 15):
            _step(ctl, engine, t)


def test_a_stale_socket_from_a_dead_controller_is_taken_over(
        controller: ControllerProc) -> None:
    controller.kill9()
    assert os.path.exists(controller.socket)  # left behind
    _count("stale socket")
    controller.start()
    assert request({"t": "status"})["pid"] == controller.pid
    assert "took over the stale socket" in controller.log.read_text()


def test_a_controller_no_one_can_reach_exits_once_its_hooks_are_gone(
        controller: ControllerProc) -> None:
    """A soak test's find: a controller whose socket file was replaced (or served by
    another controller) ran for ever once its runs ended, unreachable by ``lrctl status``
    and ``lrctl stop``. It serves the hooks still connected, then checkpoints and exits."""
    engine = lrctl.load_policy(PLATEAU, [0.1])
    ctl = lrctl.attach(_opt(), policy=PLATEAU, sync=True, spawn=False)
    for t in range(3):
        _step(ctl, engine, t)
    os.unlink(controller.socket)
    with open(controller.socket, "w") as planted:  # another file in its place
        planted.write("not a socket\n")
    _count("socket file replaced")
    until("the controller to see it", lambda: "was replaced by another file" in
          controller.log.read_text())
    for t in range(3, 10):  # the connected hook is still served
        _step(ctl, engine, t)
    proc = controller.proc
    assert proc is not None and proc.poll() is None
    ctl.close(end_run=False)  # resumable: its checkpoint is written at the exit
    until("the controller to exit", lambda: proc.poll() is not None)
    assert proc.returncode == 0
    assert "none can reach this controller" in controller.log.read_text()
    assert any((Path(controller.state_dir) / "runs").glob("*.ckpt"))
