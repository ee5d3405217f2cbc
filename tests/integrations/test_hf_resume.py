"""Checkpoints and resume with the real Hugging Face ``Trainer``, across processes.

A job (hf_job.py) saves a checkpoint every 4 steps and is killed with
``os._exit``; ``train(resume_from_checkpoint=True)`` in a new process must give
every step the LR the uninterrupted run gave it. The policy (a range test and a
grad-norm plateau) has state that a restart from scratch would lose.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from live_controller import LiveController, live_controller, subprocess_env

JOB = Path(__file__).resolve().parent / "hf_job.py"
STEPS, SAVE = 16, 4
TIMEOUT_S = 240
EXITED = 3  # hf_job.py's os._exit code


def job(controller: LiveController, out: Path, log: Path, *extra: str,
        expect: int = 0) -> str:
    proc = subprocess.run([sys.executable, str(JOB), str(out), "--steps", str(STEPS),
                           "--save-steps", str(SAVE), "--lr-log", str(log), *extra],
                          env=subprocess_env(controller), capture_output=True, text=True,
                          timeout=TIMEOUT_S)
    assert proc.returncode == expect, (proc.stdout + proc.stderr)[-4000:]
    return proc.stdout + proc.stderr


def read_lrs(log: Path) -> dict[int, float]:
    lrs: dict[int, float] = {}
    for line in log.read_text().splitlines():
        step, lr = line.split()
        lrs[int(step)] = float(lr)
    return lrs


def losses(out: Path) -> dict[int, float]:
    """The Trainer's logged loss per step, from the last checkpoint's state."""
    state = json.loads((out / f"checkpoint-{STEPS}" / "trainer_state.json").read_text())
    return {h["step"]: h["loss"] for h in state["log_history"] if "loss" in h}


def saved_hook_state(out: Path, step: int) -> dict[str, object]:
    state = json.loads((out / f"checkpoint-{step}" / "trainer_state.json").read_text())
    return state["stateful_callbacks"]["LrctlCallback"]["attributes"]["lrctl_checkpoint"]["hook"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[int, float],
                                                                  dict[int, float]]:
    """The uninterrupted run: (LR used per step, logged loss per step)."""
    root = tmp_path_factory.mktemp("reference")
    with live_controller() as controller:
        job(controller, root / "out", root / "lrs.txt")
    lrs = read_lrs(root / "lrs.txt")
    assert sorted(lrs) == list(range(1, STEPS + 1))
    assert len(set(lrs.values())) > STEPS // 2, "the policy should move the LR"
    # The scheduler the Trainer checkpointed is its own, loadable as it loads it.
    torch.load(root / "out" / f"checkpoint-{STEPS}" / "scheduler.pt", weights_only=True)
    return lrs, losses(root / "out")


def resume_and_compare(controller: LiveController, tmp_path: Path, kill: list[str],
                       killed_at: int, reference: tuple[dict[int, float], dict[int, float]],
                       ) -> None:
    out = tmp_path / "out"
    job(controller, out, tmp_path / "first.txt", *kill, expect=EXITED)
    first = read_lrs(tmp_path / "first.txt")
    assert max(first) == killed_at
    job(controller, out, tmp_path / "resumed.txt", "--resume")
    resumed = read_lrs(tmp_path / "resumed.txt")
    checkpoint = (killed_at // SAVE) * SAVE
    assert sorted(resumed) == list(range(checkpoint + 1, STEPS + 1))

    ref_lrs, ref_losses = reference
    used = {**{s: lr for s, lr in first.items() if s <= checkpoint}, **resumed}
    if used != ref_lrs and "session" not in saved_hook_state(out, checkpoint):
        # Without the policies' state in the checkpoint, the controller's session is
        # where the killed job left it (step killed_at), not where the checkpoint was.
        pytest.xfail("the controller does not support session snapshots yet "
                     "(ctl.state_dict() has no 'session'): a resume rejoins the session "
                     f"where the killed job left it (step {killed_at}), past the checkpoint "
                     f"(step {checkpoint})")
    assert used == ref_lrs
    # And the Trainer resumed exactly: same data, same weights, same losses.
    assert losses(out) == ref_losses


def test_killed_right_after_a_checkpoint_resumes_with_the_same_lrs(
        controller: LiveController, tmp_path: Path,
        reference: tuple[dict[int, float], dict[int, float]]) -> None:
    resume_and_compare(controller, tmp_path, ["--exit-after-save", "8"], 8, reference)


def test_killed_after_a_checkpoint_resumes_from_the_checkpoints_lrctl_state(
        controller: LiveController, tmp_path: Path,
        reference: tuple[dict[int, float], dict[int, float]]) -> None:
    """xfails (strict=False in effect) while the controller lacks session snapshots."""
    resume_and_compare(controller, tmp_path, ["--exit-at", "10"], 10, reference)
