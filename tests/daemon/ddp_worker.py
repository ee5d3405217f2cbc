"""One rank of the DDP test: train a tiny model with lrctl attached, log LRs per step."""

from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist

import lrctl


def main(out_dir: str) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(rank)  # different data per rank, as in real data parallelism
    model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    policy = {"version": 1, "policies": [
        {"kind": "warmup", "steps": 30},
        {"kind": "plateau", "patience": 10, "factor": 0.5, "threshold": 0.5},
    ]}
    lrs = []
    with lrctl.attach(opt, policy=policy, spawn=False, run_name="ddp") as ctl:
        for _ in range(120):
            x = torch.randn(16, 8)
            loss = model(x).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            ctl.step(loss)
            opt.step()
            lrs.append([g["lr"] for g in opt.param_groups])
        connected = ctl.connected
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump({"lrs": lrs, "connected": connected}, f)
    # Every rank done before any tears down: gloo aborts a rank whose peer left first.
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
