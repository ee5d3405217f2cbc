"""DDP on CPU (gloo): only rank 0 talks to the controller, every rank uses its LRs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from daemon_helpers import REPO, ControllerProc
from ddp_run import check_job

# One DDP job at a time: two torchrun jobs side by side (the two xdist workers) have had a
# rank abort inside gloo ('terminate called without an active exception'); a job's
# teardown abort after its ranks' work is tests/ddp_run.py's to judge.
pytestmark = pytest.mark.xdist_group("ddp")


def _torchrun(worker: str, out_dir: Path) -> subprocess.CompletedProcess[str]:
    """Two ranks on this machine. ``--standalone``: the rendezvous binds port 0 itself (a
    port picked free beforehand could be taken by another test's peer before torchrun
    bound it, and a rank that then met a stranger aborted inside gloo)."""
    out = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         str(Path(__file__).with_name(worker)), str(out_dir)],
        capture_output=True, text=True, timeout=240, cwd=REPO)
    check_job(out, lambda: all((out_dir / f"rank{r}.json").exists() for r in (0, 1)))
    return out


def test_lrs_are_identical_on_both_ranks_every_step(controller: ControllerProc,
                                                    short_dir: Path) -> None:
    _torchrun("ddp_worker.py", short_dir)
    ranks = [json.loads((short_dir / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["connected"] is True and ranks[1]["connected"] is False  # rank 0 only
    assert ranks[0]["lrs"] == ranks[1]["lrs"]
    assert len({lr[0] for lr in ranks[0]["lrs"]}) > 10  # the controller really drove them


def test_a_rollback_restores_the_same_snapshot_on_every_rank(controller: ControllerProc,
                                                             short_dir: Path) -> None:
    _torchrun("ddp_rollback_worker.py", short_dir)
    ranks = [json.loads((short_dir / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["rolled"], "no rollback happened"
    # The same step, the same snapshot, on both ranks; the weights are the snapshot's.
    assert [r[:2] for r in ranks[0]["rolled"]] == [r[:2] for r in ranks[1]["rolled"]]
    for rank in ranks:
        for _, to, weights in rank["rolled"]:
            assert weights == rank["snapshots"][str(to)]
    assert ranks[0]["rolled"][0][2] == ranks[1]["rolled"][0][2]
    assert ranks[0]["final"] == ranks[1]["final"]


def test_a_resume_by_key_in_loop_mode_uses_the_same_lr_on_every_rank(
        controller: ControllerProc, short_dir: Path) -> None:
    """A review found it: the run's initial LRs, told by the welcome to rank 0 only, left
    the other ranks scaling the loop's LR by another factor (replicas drifting apart)."""
    _torchrun("ddp_resume_worker.py", short_dir)
    ranks = [json.loads((short_dir / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert len(ranks[0]["used"]) == 10 and ranks[0]["used"] == ranks[1]["used"]
    # The loop's LR (half the run's initial) times the warmup's factor at each step.
    expected = [0.025 * (0.01 + 0.99 * t / 40) for t in range(20, 30)]
    assert ranks[0]["used"] == [pytest.approx(lr, rel=1e-9) for lr in expected]


def test_a_nan_one_rank_alone_sees_is_skipped_by_every_rank(controller: ControllerProc,
                                                           short_dir: Path) -> None:
    """An adversarial pass's find: with every=4, rank 1's NaN loss on a step between
    reports was skipped by rank 1 only; rank 0 (no norm computed there) applied the
    all-reduced NaN gradients, and the replicas went apart, then NaN."""
    _torchrun("ddp_nan_worker.py", short_dir)
    ranks = [json.loads((short_dir / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["nan_at"] for r in ranks] == [None, None]
    assert [r["skipped"] for r in ranks] == [1, 1]
    assert ranks[0]["weights"] == ranks[1]["weights"]
