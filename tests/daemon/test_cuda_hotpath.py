"""The hook's CUDA hot path (runs only where a GPU exists; ``scripts/gpu_check.sh``).

* No host-device sync on a step that reads nothing back, whether the hook computes
  the grad norm or is handed ``clip_grad_norm_``'s (a CUDA tensor): checked with
  ``torch.cuda.set_sync_debug_mode("error")``, which raises on any sync.
* The statistics reach the controller through the pinned staging buffers, with their
  values intact: a NaN loss on the device becomes the guard's back-off at its step.
* ``lrctl bench cuda`` (:mod:`lrctl.bench.cuda_bench`) runs, quick-sized, on both GPT
  sizes and catches no sync; its step ratios are that suite's to report, never a
  pass/fail threshold here (timings belong to ``lrctl bench``, not to tests).
"""

from __future__ import annotations

import math

import pytest
import torch
from daemon_helpers import ControllerProc
from torch import nn

import lrctl
from lrctl.bench._gpt import GptRun
from lrctl.bench._nosync import NoHostSync
from lrctl.bench.cuda_bench import CudaConfig, _targets, run_cuda

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

POLICY = {"version": 1, "policies": [{"kind": "divergence", "min_samples": 8,
                                      "regrow_after": 10_000}]}
WARMUP = 5  # first steps may sync: pinned buffers, optimizer state, cuBLAS workspaces


def _no_sync_steps(run: GptRun, ctl: lrctl.Controller, steps: int, clip: bool) -> None:
    for _ in range(WARMUP):
        run.step(ctl.step, clip=clip)
    with NoHostSync() as check:  # (a sync inside the hook is caught there: listened for)
        for _ in range(steps):
            run.step(ctl.step, clip=clip)
    assert not check.failures, check.failures


@pytest.mark.parametrize("clip", [False, True], ids=["hook-computes-norm", "clip-norm-given"])
@pytest.mark.parametrize("fused", [False, True], ids=["foreach", "fused"])
def test_hooked_gpt_steps_never_sync(controller: ControllerProc, clip: bool,
                                     fused: bool) -> None:
    run = GptRun(fused=fused)
    with lrctl.attach(run.opt, policy=POLICY, spawn=False) as ctl:
        _no_sync_steps(run, ctl, 40, clip)
        for _ in range(3):  # let the last staged statistics go out
            run.step(ctl.step, clip=clip)
        assert ctl._staging.used  # they went through the pinned buffers
        assert all(buf.is_pinned() for buf in ctl._staging._pinned)
        assert lrctl.client.request({"t": "runs"})["runs"][0]["step"] >= 40


def test_staged_statistics_reach_the_controller_intact(controller: ControllerProc) -> None:
    """A NaN loss on the device: skipped on the device (no sync) and, through the
    pinned buffers, the controller's guard backs off at that very step."""
    model = nn.Linear(8, 1).cuda()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(32, 8, device="cuda")
    nan_at = 20
    with lrctl.attach(opt, policy=POLICY, spawn=False) as ctl:
        for t in range(40):
            loss = model(x).pow(2).mean()
            if t == nan_at:
                loss = loss * torch.tensor(math.nan, device="cuda")
            opt.zero_grad()
            loss.backward()
            ctl.step(loss)
            opt.step()
        assert all(torch.isfinite(p).all() for p in model.parameters())  # the NaN was refused
    backoffs = [d.step for d in ctl.decisions if d.action == "backoff"]
    assert backoffs == [nan_at]


def test_the_cuda_bench_suite_measures_both_sizes_without_a_sync() -> None:
    """``lrctl bench cuda --quick``'s run: every figure finite, no host sync caught in
    either hooked loop on either size (its timings are the suite's to report, not judged
    here)."""
    result = run_cuda(CudaConfig.quick())
    assert [s["size"] for s in result["sizes"]] == ["tiny", "small"]
    for size in result["sizes"]:
        assert size["connected"]
        assert size["syncs"] == dict.fromkeys(size["syncs"], None)
        for row in result["rows"][size["size"]]:
            assert math.isfinite(row["stats"]["median"]) and row["stats"]["median"] > 0
    syncs = [t for t in _targets(result) if "host syncs" in t.what]
    assert len(syncs) == 2 and all(t.ok for t in syncs)
