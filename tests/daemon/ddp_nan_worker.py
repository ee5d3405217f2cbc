"""One rank of the DDP test of a NaN one rank alone sees: every=4, rank 1's loss NaN at
step 61 (not a report step): every rank must skip that optimizer step."""

from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist

import lrctl

BAD_STEP = 61


def main(out_dir: str) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(8, 1))
    torch.manual_seed(rank)  # different data per rank, as in real data parallelism
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    nan_at = None
    with lrctl.attach(opt, spawn=False, every=4, run_name="ddp-nan") as ctl:
        for t in range(100):
            x = torch.randn(16, 8)
            if rank == 1 and t == BAD_STEP:
                x[0, 0] = float("nan")
            loss = model(x).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            ctl.step(loss)
            opt.step()
            if nan_at is None and not all(torch.isfinite(p).all() for p in model.parameters()):
                nan_at = t
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump({"nan_at": nan_at, "skipped": ctl._guard.skipped,
                   "weights": [p.detach().flatten().tolist() for p in model.parameters()]}, f)
    dist.barrier()  # every rank done before any tears down (see ddp_worker.py)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
