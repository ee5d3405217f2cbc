"""A state dir read-only when a run ends (a file system remounted ``ro`` mid-run).

Before: the ended run's checkpoint, which the controller removes at its goodbye, stayed
on disk when the removal failed (``EROFS``), logged once and never tried again. ``lrctl
runs --all`` showed the ended run at its checkpoint's old step, and the next controller
start restored it: a ``resume`` event after its ``end``, its MLflow run set ``RUNNING``
again (to be ended ``KILLED`` at the session timeout). Now the removal is tried again
every second until it goes, ``status`` says so meanwhile, and a start does not restore
a checkpoint older than its run's goodbye (the file system came back after the stop).

The removal fails by fault injection in the controller (``readonly_disk/sitecustomize.py``):
mounts are not available to the tests.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import torch
from daemon_helpers import ControllerProc
from rel_helpers import until

import lrctl
from lrctl.client import request
from lrctl.sinks.journal import RunPaths, read_lines

READONLY = Path(__file__).resolve().parent / "readonly_disk"  # sitecustomize: EROFS


def _env(flag: Path, state: Path) -> dict[str, str]:
    return {**os.environ, "LRCTL_TEST_READONLY": str(flag),
            "LRCTL_TEST_READONLY_UNDER": str(state),
            "PYTHONPATH": os.pathsep.join(p for p in (str(READONLY),
                                                      os.environ.get("PYTHONPATH")) if p)}


def _run_that_ends(state: Path) -> str:
    opt = torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=0.1)
    with lrctl.attach(opt, sync=True, spawn=False, run_name="ro") as ctl:
        for _ in range(20):
            ctl.step(1.0, grad_norm=1.0)
        key = ctl.run_key
    assert key is not None
    events = RunPaths.of(state, key).stream("events")
    until(f"the run's end in {events}", lambda: b'"event":"end"' in events.read_bytes())
    return key


def _unremoved(key: str) -> list[str]:
    return [e for e in request({"t": "status"})["errors"]
            if key in e and "cannot be removed" in e]


def _events(state: Path, key: str) -> list[str]:
    return [line.record["event"] for line in
            read_lines(RunPaths.of(state, key).stream("events"))]


def _refused(controller: ControllerProc, key: str) -> bool:
    return f"cannot remove the checkpoint of ended run {key}" in controller.log.read_text(
        errors="replace")


def test_an_ended_runs_checkpoint_is_removed_once_the_disk_takes_writes_again(
        make_controller: Callable[..., ControllerProc], short_dir: Path) -> None:
    state = Path(os.environ["LRCTL_STATE_DIR"])
    flag = short_dir / "read-only"
    flag.touch()
    controller = make_controller(audit=True, env=_env(flag, state))
    key = _run_that_ends(state)
    ckpt = state / "runs" / f"{key}.ckpt"
    until("the removal to be refused", lambda: _refused(controller, key))
    assert ckpt.exists()
    flag.unlink()  # read-write again
    until(f"{ckpt} to be removed", lambda: not ckpt.exists(), 10.0)


def test_status_says_an_ended_runs_checkpoint_cannot_be_removed_while_it_cannot(
        make_controller: Callable[..., ControllerProc], short_dir: Path) -> None:
    state = Path(os.environ["LRCTL_STATE_DIR"])
    flag = short_dir / "read-only"
    flag.touch()
    make_controller(audit=True, env=_env(flag, state))
    key = _run_that_ends(state)
    until("status to say the checkpoint cannot be removed", lambda: bool(_unremoved(key)), 10.0)
    flag.unlink()
    until("the error to leave status", lambda: not _unremoved(key), 10.0)


def test_a_checkpoint_left_from_before_a_runs_end_is_not_restored_at_the_next_start(
        make_controller: Callable[..., ControllerProc], short_dir: Path) -> None:
    state = Path(os.environ["LRCTL_STATE_DIR"])
    flag = short_dir / "read-only"
    flag.touch()
    first = make_controller(audit=True, env=_env(flag, state))
    key = _run_that_ends(state)
    ckpt = state / "runs" / f"{key}.ckpt"
    until("the removal to be refused", lambda: _refused(first, key))
    assert first.stop() == 0
    assert ckpt.exists(), "the stop should have found the disk read-only still"
    flag.unlink()  # the file system comes back while no controller runs
    make_controller(audit=True)
    assert request({"t": "runs"})["runs"] == [], "the ended run was restored"
    until(f"{ckpt} to be removed", lambda: not ckpt.exists(), 10.0)
    assert _events(state, key) == ["policy", "end"]
