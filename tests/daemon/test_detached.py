"""Runs evicted without their hook (a training process killed) are set aside.

A long-lived controller's probe: every killed run's checkpoint was restored at every
start (2 000 of them: 9.9 s before the socket answered, 6 016 descriptors, 108 MB),
each restart appended a ``resume`` and an ``end`` to its journal and flipped its MLflow
run back to RUNNING, and nothing was ever removed. An evicted run's checkpoint now goes
to ``runs/.detached/``: a start does not restore it, its hook's hello still does, and it
is removed ``Limits.detached_keep_s`` after it was last written.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from daemon_helpers import ControllerProc, serving, until

import lrctl
from lrctl.client import request
from lrctl.daemon import Limits
from lrctl.daemon.store import StateStore

PLATEAU = "version: 1\npolicies:\n  - kind: plateau\n    patience: 3\n"


def test_a_detached_run_is_not_restored_at_start_and_resumes_on_its_hello(
        make_controller: Callable[..., ControllerProc]) -> None:
    controller = make_controller(["--session-timeout", "1"])
    opt = torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=0.1)
    ctl = lrctl.attach(opt, policy=PLATEAU, sync=True, spawn=False, run_name="killed")
    for _ in range(6):
        ctl.step(1.0, grad_norm=0.5)
    key = ctl.run_key
    ctl.close(end_run=False)  # its hook gone, the run not ended: as a killed process's
    runs = Path(controller.state_dir) / "runs"
    until(lambda: (runs / ".detached" / f"{key}.ckpt").is_file(), "its eviction")
    assert not (runs / f"{key}.ckpt").exists()
    controller.stop()
    controller.start()
    assert request({"t": "runs"})["runs"] == []  # not restored
    assert f"restored run {key}" not in controller.log.read_text()
    back = lrctl.attach(torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=0.1),
                        policy=PLATEAU, sync=True, spawn=False, run_name="killed",
                        resume=key, start_step=6)
    try:
        (run,) = request({"t": "runs"})["runs"]
        assert run["run"] == key and run["step"] == 5  # where it left off
        assert (runs / f"{key}.ckpt").is_file() and not list(
            (runs / ".detached").glob("*.ckpt"))
    finally:
        back.close()


def test_detached_checkpoints_are_removed_after_detached_keep_s(tmp_path: Path,
                                                                 short_dir: Path) -> None:
    store = StateStore(tmp_path / "state")
    store.detached_dir.mkdir()
    old, fresh = store.detached_path("old-run"), store.detached_path("fresh-run")
    for path in (old, fresh):
        path.write_bytes(b"a checkpoint\n")
    week_ago = time.time() - 7 * 86400
    os.utime(old, (week_ago, week_ago))
    with serving(str(short_dir / "c.sock"), store, limits=Limits(detached_keep_s=86400)):
        until(lambda: not old.exists(), "the old checkpoint's removal")
    assert fresh.exists()
    assert store.prune_detached(3600, now=time.time() + 7200) == 1 and not fresh.exists()


def test_a_symlink_at_the_detached_dir_is_never_followed(tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    victim = elsewhere / "victim.ckpt"
    victim.write_bytes(b"not ours to remove\n")
    os.utime(victim, (0, 0))
    store = StateStore(tmp_path / "state")
    store.detached_dir.symlink_to(elsewhere)
    with pytest.raises(OSError):
        store.prune_detached(1.0)
    assert victim.exists()
    store.path("run").write_bytes(b"a checkpoint\n")
    store.detach("run")  # refused (logged): it stays where a start restores it
    assert store.path("run").exists() and not (elsewhere / "run.ckpt").exists()
