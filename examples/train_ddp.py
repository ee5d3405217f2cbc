"""Data-parallel training on CPU (gloo) with lrctl: every rank uses the same LR.

Launch with torchrun; each rank trains on its own shard of the digits data.
Only rank 0 talks to the controller; ``ctl.step`` broadcasts its LRs (and the
skip/stop flags) to every rank on a CPU process group, so the ranks cannot
drift apart (accelerate#3797). Each rank prints a fingerprint of the LRs it
used: they are identical.

    torchrun --standalone --nproc_per_node=2 examples/train_ddp.py --steps 300
"""

from __future__ import annotations

import argparse
import hashlib

import torch
import torch.distributed as dist
from sklearn.datasets import load_digits
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import lrctl


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--policy", default=None, help="policy file (default: lrctl's default)")
    args = parser.parse_args()

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)  # the same initial weights on every rank
    digits = load_digits()
    x = (torch.tensor(digits.data, dtype=torch.float32) / 16.0)[rank::world]  # this rank's shard
    y = torch.tensor(digits.target)[rank::world]
    model = DistributedDataParallel(nn.Sequential(nn.Linear(64, 128), nn.ReLU(),
                                                  nn.Linear(128, 10)))
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    generator = torch.Generator().manual_seed(rank)

    used: list[float] = []
    with lrctl.attach(optimizer, policy=args.policy, run_name="train-ddp") as ctl:  # all ranks
        for step in range(args.steps):
            batch = torch.randint(0, len(x), (args.batch_size,), generator=generator)
            loss = nn.functional.cross_entropy(model(x[batch]), y[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            ctl.step(loss)  # ← lrctl: rank 0 reports, every rank gets rank 0's LR
            if not ctl.should_skip:
                optimizer.step()
            used.append(optimizer.param_groups[0]["lr"])
            if ctl.should_stop:
                break
            if rank == 0 and step % 100 == 0:
                print(f"step {step:5d}  loss {loss.item():.4f}  lr {ctl.lr[0]:.3g}")
        decisions = ctl.decisions  # rank 0 receives them; the other ranks only the LRs

    fingerprint = hashlib.sha256(repr(used).encode()).hexdigest()[:16]
    print(f"rank {rank}: {len(used)} steps, final lr {used[-1]:.3g}, "
          f"LR sequence sha256 {fingerprint}", flush=True)
    if rank == 0:
        for d in decisions:
            print(f"  step {d.step}: {d.policy} {d.action}: {d.reason}")
    # Every rank done before any tears down: gloo aborts a rank whose peer left first.
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
