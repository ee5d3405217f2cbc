"""One rank of the DDP resume test: base="loop", resumed by run key after the optimizer's
own load_state_dict; log the LRs each optimizer step used."""

from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist

import lrctl

POLICY = {"version": 1, "policies": [{"kind": "warmup", "steps": 40}]}


def _train(ctl: lrctl.Controller, model: torch.nn.Module, opt: torch.optim.Optimizer,
           steps: int) -> None:
    for _ in range(steps):
        loss = model(torch.randn(16, 8)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        ctl.step(loss)
        opt.step()


def main(out_dir: str) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(rank)
    model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    ctl = lrctl.attach(opt, policy=POLICY, spawn=False, run_name="ddp-resume", base="loop")
    _train(ctl, model, opt, 20)
    for group in opt.param_groups:  # the loop's own schedule moved its LR
        group["lr"] *= 0.5
    saved = opt.state_dict()
    key = [ctl.run_key]
    dist.broadcast_object_list(key, src=0)
    ctl.close(end_run=False)
    dist.barrier()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    opt.load_state_dict(saved)  # the groups hold the checkpoint's LRs
    used: list[float] = []
    opt.register_step_pre_hook(lambda o, *_: used.append(o.param_groups[0]["lr"]))
    with lrctl.attach(opt, policy=POLICY, spawn=False, resume=key[0], start_step=20,
                      base="loop") as again:
        _train(again, model, opt, 10)
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump({"used": used}, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
