"""The state dir deleted under a running controller (issue #18, item 3).

Before: the LRs stayed exact, but the directory was never made again: the journal
and the log went on into deleted files, ``lrctl decisions`` found no run, and the
MLflow run stayed RUNNING. Now the controller notices within its housekeeping second,
makes the directory again (0700, never through a symlink), writes each open run's
journal back from the files it still holds open, reopens its log, says so in the log
and in ``lrctl status``, and the run's MLflow run ends with every decision once.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from daemon_helpers import REPO, ControllerProc
from rel_helpers import FIGURES, RawClient, hello, store_client, until, until_shipped

import lrctl
from lrctl.client import request

QUIET = "version: 1\npolicies:\n  - kind: plateau\n    metric: loss\n    patience: 100000\n"


def test_state_dir_deleted_mid_run_comes_back_with_the_whole_journal(
        make_controller: Callable[..., ControllerProc], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    from sinks_helpers import assert_exactly_once, mlflow_run_id

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)
    controller = make_controller(audit=True)
    state = Path(os.environ["LRCTL_STATE_DIR"])
    opt = torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=0.1)
    made: list[dict] = []
    with lrctl.attach(opt, policy=QUIET, sync=True, spawn=False) as ctl:
        key = ctl.run_key

        def phase(rounds: int) -> None:
            for _ in range(rounds):
                for _ in range(5):
                    ctl.step(1.0, grad_norm=1.0)
                lr = 0.01 * (len(made) + 1)
                made.append(request({"t": "set_lr", "run": key, "lr": lr})["decision"])
                ctl.step(1.0, grad_norm=1.0)
                assert ctl.lr == [lr]

        phase(3)
        shutil.rmtree(state)
        phase(3)  # the run goes on, its LRs exact
        until("the state dir to come back", lambda: bool(
            request({"t": "status"}).get("state_dir_recreated")))
        assert stat.S_IMODE(os.lstat(state).st_mode) == 0o700
        # Its lock came back with it: no second controller can take the directory now.
        other = subprocess.run([sys.executable, "-m", "lrctl", "serve", "--foreground",
                                "--no-audit", "--socket", str(state.parent / "o.sock"),
                                "--state-dir", str(state)], capture_output=True, text=True,
                               cwd=REPO, timeout=60)
        assert other.returncode == 3 and "state directory" in other.stderr, other.stderr
        status = subprocess.run([sys.executable, "-m", "lrctl", "status"], capture_output=True,
                                text=True, cwd=REPO, timeout=60)
        assert "state dir was deleted and recreated 1 time(s)" in status.stdout, status.stdout
        phase(2)
        out = subprocess.run([sys.executable, "-m", "lrctl", "decisions", key, "--json",
                              "--state-dir", str(state)], capture_output=True, text=True,
                             cwd=REPO, timeout=60)
        assert out.returncode == 0, out.stderr
        listed = [json.loads(line) for line in out.stdout.splitlines()]
        assert [(r["seq"], r["new_lrs"]) for r in listed] == [
            (i + 1, d["new_lrs"]) for i, d in enumerate(made)]
    log = (state / "controller.log").read_text()
    assert "recreated" in log
    client = store_client(uri)

    until_shipped(client, state, key, len(made))
    controller.stop()
    uploaded = assert_exactly_once(client, mlflow_run_id(state, key), state, key, tmp_path)
    FIGURES["state dir deleted"] = {"decisions": len(made), "journal": len(listed),
                                    "mlflow": len(uploaded)}


def _serve_again(controller: ControllerProc) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "lrctl", "serve", "--foreground",
                           "--no-audit", "--socket", controller.socket,
                           "--state-dir", controller.state_dir + "-2"],
                          capture_output=True, text=True, timeout=60, cwd=REPO)


def test_the_socket_directory_removed_under_the_controller_comes_back(
        controller: ControllerProc) -> None:
    """XDG_RUNTIME_DIR removed at logout, say: the socket, its directory and its lock file
    go. Before, the controller logged 'cannot bind' every second for ever, nothing could
    reach it, and the next hook started a second controller on the same socket. Now it
    makes the directory again (0700), takes the new lock file's lock and binds again;
    the runs connected meanwhile never noticed."""
    run_dir = Path(controller.socket).parent
    opt = torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=0.1)
    with lrctl.attach(opt, policy=QUIET, sync=True, spawn=False) as ctl:
        for _ in range(5):
            ctl.step(1.0, grad_norm=1.0)
        shutil.rmtree(run_dir)
        for _ in range(5):
            ctl.step(1.0, grad_norm=1.0)  # its connection is untouched
        until("the socket bound again", lambda: os.path.exists(controller.socket))
        assert request({"t": "status"}, controller.socket)["pid"] == controller.pid
        assert stat.S_IMODE(os.stat(run_dir).st_mode) == 0o700
        out = _serve_again(controller)  # the lock is ours again: a second one refuses
        assert out.returncode == 3 and f"pid {controller.pid}" in out.stderr, out.stderr
        assert ctl.connected and ctl.steps_taken == 10
    assert controller.stop() == 0


def test_a_removed_lock_file_does_not_let_a_second_controller_take_a_live_socket(
        controller: ControllerProc) -> None:
    """Before, ``lrctl serve`` found the lock free, took the socket for stale, unlinked it
    and served in its place; the live controller could no longer be reached."""
    os.unlink(controller.socket + ".lock")
    out = _serve_again(controller)
    assert out.returncode == 3 and "answers on" in out.stderr, out.stderr
    assert f"pid {controller.pid}" in out.stderr  # who, and no lock file of its own left
    assert not os.path.exists(controller.socket + ".lock")
    assert request({"t": "status"}, controller.socket)["pid"] == controller.pid


def _answers(sock: str) -> bool:
    try:
        return request({"t": "status"}, sock, timeout=5.0)["t"] == "status"
    except Exception:
        return False


def test_a_state_dir_another_controller_took_gets_nothing_of_ours(
        controller: ControllerProc, short_dir: Path) -> None:
    """The state dir deleted, and another controller started on the path before this one
    made it again: before, this one wrote its open runs' checkpoints (and journals, and
    its log) into the other's directory. Now it writes nothing there, says why in its
    status, and serves its open runs on from memory, their LRs exact."""
    state = Path(controller.state_dir)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=0.1)
    with lrctl.attach(opt, policy=QUIET, sync=True, spawn=False) as ctl:
        key = ctl.run_key
        for _ in range(5):
            ctl.step(1.0, grad_norm=1.0)
        other_sock = str(short_dir / "b.sock")
        os.kill(controller.pid, signal.SIGSTOP)  # (the other starts inside its second)
        try:
            shutil.rmtree(state)
            other = subprocess.Popen([sys.executable, "-m", "lrctl", "serve", "--foreground",
                                      "--no-audit", "--socket", other_sock, "--state-dir",
                                      str(state)], cwd=REPO, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
            until("the other controller to serve", lambda: _answers(other_sock))
        finally:
            os.kill(controller.pid, signal.SIGCONT)
        try:
            def refused() -> bool:
                ctl.step(1.0, grad_norm=1.0)  # observations a checkpoint would save
                errors = request({"t": "status"}, controller.socket)["errors"]
                return any("cannot lock it again" in e for e in errors) and any(
                    e.startswith(f"run {key}: checkpoint") and "not written" in e
                    for e in errors)

            until("the directory found taken, and a checkpoint refused", refused)
            status = request({"t": "status"}, controller.socket)
            assert not status["state_dir_recreated"]
            assert ctl.connected and opt.param_groups[0]["lr"] == 0.1
            # A resumed job rejoining the run with an MLflow run of its own would have its
            # records opened there (a review's find): refused, retryably, as a new run is.
            rejoin = RawClient(controller.socket)
            token = ctl._link.hello.get("resume_token") if ctl._link else None
            rejoin.send(hello(key, QUIET, [0.1], resume_token=token, mlflow={
                "run_id": "0123456789abcdef", "tracking_uri": "sqlite:///elsewhere.db"}))
            refusal = rejoin.recv()
            rejoin.close()
            assert refusal is not None and refusal["t"] == "error", refusal
            assert refusal.get("retry") is True and "cannot lock it again" in refusal["message"]
            assert ctl.connected
            assert not [p for p in state.rglob("*") if key in p.name]
            log = (state / "controller.log").read_text()  # the other's
            assert key not in log and "deleted" not in log, log
            assert _answers(other_sock)
        finally:
            other.send_signal(signal.SIGTERM)
            assert other.wait(60) == 0
    assert not [p for p in state.rglob("*") if key in p.name]  # (its end removed nothing)


def test_a_symlink_in_the_state_dirs_place_takes_no_new_run(
        controller: ControllerProc, short_dir: Path) -> None:
    """Reported as refused, but a new run's files went through it: now no new run starts
    until it is fixed (its hook trains on, says why, and tries again)."""
    state = Path(controller.state_dir)
    elsewhere = short_dir / "elsewhere"
    elsewhere.mkdir(mode=0o700)
    state.rename(short_dir / "moved")
    state.symlink_to(elsewhere)
    until("the symlink reported", lambda: any(
        "refusing to use it" in e for e in request({"t": "status"}, controller.socket)["errors"]))
    opt = torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=0.1)
    with pytest.warns(RuntimeWarning, match="no new run starts here"):
        ctl = lrctl.attach(opt, policy=QUIET, spawn=False)
    for _ in range(3):
        ctl.step(1.0, grad_norm=1.0)
    assert not ctl.connected and opt.param_groups[0]["lr"] == 0.1
    ctl.close()
    assert list(elsewhere.iterdir()) == []
