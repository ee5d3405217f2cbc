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
import shutil
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
    store = StateStore(tmp_path / "state")  # (the stopped controller's let its directory go)
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


def _state(step: int) -> dict[str, object]:
    return {"run": "k1", "engine": {"last_step": step}}


def test_an_earlier_versions_checkpoint_is_set_aside_too(tmp_path: Path) -> None:
    """A review's find: a run restored from a format-1 ``<key>.json`` and evicted stayed
    where every start restores it."""
    store = StateStore(tmp_path)
    store.legacy_path("k1").write_bytes(store.encode(_state(5)))
    store.detach("k1")
    assert list(store.load_all()) == []
    assert store.load("k1") == _state(5)  # its hello still finds it


def test_a_newer_checkpoint_is_never_replaced_by_the_one_set_aside(tmp_path: Path) -> None:
    """A review's find: a run resumed from its hook's state after its eviction has a new
    checkpoint beside the one set aside; a hello's load moved the old one over it."""
    store = StateStore(tmp_path)
    store.save("k1", _state(100))
    store.detach("k1")  # evicted at step 100
    store.save("k1", _state(80))  # resumed from the hook's state (step 50), now at 80
    assert store.load("k1") == _state(80)
    assert not store.detached_path("k1").exists()


def test_a_resume_from_saved_state_after_eviction_says_what_was_undone(
        make_controller: Callable[..., ControllerProc]) -> None:
    """A review's find: a job resumed from ``ctl.state_dict()`` after its run's eviction
    (no journal: --no-audit) got no ``resumed`` decision, the checkpoint set aside was not
    read, and it stayed beside the new one."""
    controller = make_controller(["--session-timeout", "1"])

    def opt() -> torch.optim.Optimizer:
        return torch.optim.SGD([torch.nn.Parameter(torch.ones(2))], lr=0.1)

    first = lrctl.attach(opt(), policy=PLATEAU, sync=True, spawn=False, run_name="gone")
    for _ in range(10):
        first.step(1.0, grad_norm=1.0)
    saved = first.state_dict()
    for _ in range(8):
        first.step(1.0, grad_norm=1.0)
    key = first.run_key
    first.close(end_run=False)
    runs = Path(controller.state_dir) / "runs"
    until(lambda: (runs / ".detached" / f"{key}.ckpt").is_file(), "its eviction")
    with lrctl.attach(opt(), policy=PLATEAU, sync=True, spawn=False, resume=saved) as ctl:
        ctl.step(1.0, grad_norm=1.0)
        assert [d.action for d in ctl.decisions if d.action == "resumed"] == ["resumed"]
        assert (runs / f"{key}.ckpt").exists()
        assert not (runs / ".detached" / f"{key}.ckpt").exists()


def test_without_a_journal_a_recreated_state_dir_gets_its_checkpoints_dir_back(
        make_controller: Callable[..., ControllerProc]) -> None:
    """A review's find: under --no-audit nothing made ``runs/`` again after the state dir
    was deleted, so every checkpoint failed from then on (and the eviction's set-aside)."""
    controller = make_controller(["--session-timeout", "2"])
    ctl = lrctl.attach(torch.optim.SGD([torch.nn.Parameter(torch.ones(2))], lr=0.1),
                       policy=PLATEAU, sync=True, spawn=False, run_name="held")
    for _ in range(5):
        ctl.step(1.0, grad_norm=1.0)
    key = ctl.run_key
    ctl.close(end_run=False)
    state = Path(controller.state_dir)
    until(lambda: (state / "runs" / f"{key}.ckpt").is_file(), "its checkpoint")
    gone = state.rename(state.with_name("gone"))  # (atomic: rm -rf races its writes)
    shutil.rmtree(gone)
    until(lambda: (state / "runs" / ".detached" / f"{key}.ckpt").is_file(),
          "its checkpoint written again, then set aside", deadline_s=30)
    assert controller.proc is not None and controller.proc.poll() is None


def test_a_stopped_controller_lets_its_directories_go(tmp_path: Path, short_dir: Path) -> None:
    """The state dir and the checkpoint directory are held open while it serves (to tell
    them from ones made again at their paths: lrctl/daemon/held_dir.py); not after."""
    before = sorted(os.listdir("/proc/self/fd"))
    store = StateStore(tmp_path / "state")
    with serving(str(short_dir / "c.sock"), store):
        pass
    assert sorted(os.listdir("/proc/self/fd")) == before
