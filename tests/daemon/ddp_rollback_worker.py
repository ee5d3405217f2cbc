"""One rank of the DDP rollback test: a fault only rank 0 reports makes the controller
roll back; every rank records its weights at the snapshot and after the restore."""

from __future__ import annotations

import json
import math
import os
import random
import sys

import torch
import torch.distributed as dist

import lrctl

GUARD = {"version": 1, "policies": [{"kind": "divergence", "cooldown": 5, "min_samples": 8,
                                     "window": 32}]}


def _flat(model: torch.nn.Module) -> list[float]:
    return [float(x) for p in model.parameters() for x in p.detach().flatten()]


def main(out_dir: str) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(rank)  # different data per rank, as in real data parallelism
    model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(8, 1))
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    rng = random.Random(0)
    at_snapshot: dict[int, list[float]] = {}
    rolled: list[tuple[int, int, list[float]]] = []
    with lrctl.attach(opt, policy=GUARD, spawn=False, run_name="ddp-rb",
                      snapshot_every=5, keep=4) as ctl:
        for t in range(60):
            if t % 5 == 0:
                at_snapshot[t] = _flat(model)
            loss = model(torch.randn(16, 8)).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            # The fault: what rank 0 reports from step 30 on (the controller hears rank 0).
            ctl.step(math.exp(rng.gauss(0.0, 0.02)) * (60.0 if t >= 30 else 1.0))
            if ctl.rolled_back is not None:
                rolled.append((t, ctl.rolled_back, _flat(model)))
            opt.step()
        final = _flat(model)
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump({"rolled": rolled, "snapshots": at_snapshot, "final": final}, f)
    dist.barrier()  # every rank done before any tears down
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
