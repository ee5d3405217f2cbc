"""Where the hook's CUDA cost goes, for a machine with a GPU: the host time of
``ctl.step`` and of the (guarded) ``optimizer.step`` against the bare loop's, and the
CUDA kernel launches per step (``torch.profiler``), on the tiny GPT of
``tests/daemon/test_cuda_hotpath.py``, against a private ``lrctl serve``. The arms run
one after another: compare launches, not times, across arms (timings side by side are
``scripts/gpu_check.sh``'s). Writes ``probe.json`` into ``$OUT`` (or /tmp).

    python3 scripts/gpu_probe.py      # from the repository root
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time

sys.path[:0] = ["tests/daemon", "tests"]

import torch  # noqa: E402
from daemon_helpers import ControllerProc  # noqa: E402
from test_cuda_hotpath import POLICY  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

import lrctl  # noqa: E402
from lrctl.bench._gpt import GptRun  # noqa: E402

ARMS = (("bare", False, False, 1), ("hook", True, False, 1), ("bare+clip", False, True, 1),
        ("hook+clip", True, True, 1), ("hook every=4", True, False, 4),
        ("hook auto", True, False, "auto"))
LAUNCHES = ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx")


def _step(run: GptRun, ctl: lrctl.Controller | None, clip: bool) -> tuple[float, float, float]:
    t0 = time.perf_counter()
    loss = run.loss()
    run.opt.zero_grad(set_to_none=True)
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(run.model.parameters(), 1e9) if clip else None
    t1 = time.perf_counter()
    if ctl is not None:
        ctl.step(loss, grad_norm=norm)
    t2 = time.perf_counter()
    run.opt.step()
    return t1 - t0, t2 - t1, time.perf_counter() - t2


def main() -> None:
    private = tempfile.mkdtemp(prefix="lrctl-", dir="/tmp")
    os.chmod(private, 0o700)
    os.environ["LRCTL_SOCKET"] = f"{private}/run/c.sock"
    os.environ["LRCTL_STATE_DIR"] = f"{private}/state"
    proc = ControllerProc(os.environ["LRCTL_SOCKET"], os.environ["LRCTL_STATE_DIR"]).start()
    out: dict[str, dict[str, float]] = {}
    try:
        for name, hooked, clip, every in ARMS:
            run = GptRun()
            ctl = lrctl.attach(run.opt, policy=POLICY, spawn=False, every=every) if hooked else None
            times = [_step(run, ctl, clip) for _ in range(60)][20:]
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                for _ in range(10):
                    _step(run, ctl, clip)
                torch.cuda.synchronize()
            launches = sum(e.count for e in prof.key_averages() if e.key in LAUNCHES)
            out[name] = {"fwd_bwd_ms": statistics.median(t[0] for t in times) * 1e3,
                         "ctl_step_ms": statistics.median(t[1] for t in times) * 1e3,
                         "opt_step_ms": statistics.median(t[2] for t in times) * 1e3,
                         "launches_per_step": launches / 10}
            if ctl is not None:
                ctl.close()
            print(name, json.dumps(out[name]), flush=True)
    finally:
        proc.ensure_dead()
    with open(os.path.join(os.environ.get("OUT", "/tmp"), "probe.json"), "w",
              encoding="utf-8") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
