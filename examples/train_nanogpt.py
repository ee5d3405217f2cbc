"""A training loop written like nanoGPT's ``train.py``, with lrctl added in five lines.

Everything nanoGPT's loop does stays: AdamW, its own warmup + cosine ``get_lr``
written into the param groups every iteration, gradient accumulation,
``clip_grad_norm_``, a ``GradScaler`` (fp16 autocast; here on the CPU), and a
checkpoint every ``--eval-interval`` iterations that ``--resume`` continues from.
lrctl keeps that schedule (``base="loop"``) and adds its protection: a
non-finite step never reaches the weights, the divergence guard and plateau
decay scale the loop's LR, overflow steps of the scaler are not divergence, and
the run's lrctl state travels inside the checkpoint, so a resumed run continues
with exactly the LRs an uninterrupted one would have had.

    python examples/train_nanogpt.py --max-iters 300
    python examples/train_nanogpt.py --max-iters 600 --resume   # from out/ckpt.pt
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from contextlib import nullcontext
from pathlib import Path

import torch
from torch import nn
from train_charlm import CharLM, load_corpus

import lrctl


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out-dir", default="out")
    p.add_argument("--max-iters", "--steps", type=int, default=300,
                   help="iterations to train (nanoGPT's max_iters; --steps as the other examples)")
    p.add_argument("--eval-interval", type=int, default=50)
    p.add_argument("--eval-iters", type=int, default=5)
    p.add_argument("--gradient-accumulation-steps", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--block-size", type=int, default=32)
    p.add_argument("--n-layer", type=int, default=2)
    p.add_argument("--n-embd", type=int, default=32)
    p.add_argument("--learning-rate", type=float, default=3e-3)
    p.add_argument("--min-lr", type=float, default=3e-4)
    p.add_argument("--warmup-iters", type=int, default=20)
    p.add_argument("--lr-decay-iters", type=int, default=None)
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--dtype", choices=["float32", "float16"], default="float16")
    p.add_argument("--init-scale", type=float, default=2.0 ** 16)
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--resume", action="store_true", help="continue from out-dir/ckpt.pt")
    p.add_argument("--policy", default=None, help="lrctl policy (default: lrctl's default)")
    p.add_argument("--exit-after", type=int, default=None,
                   help="die (os._exit) after this iteration, as a preempted job would")
    p.add_argument("--lr-log", default=None, help="append 'iter lr' lines (the LR used)")
    p.add_argument("--lrctl-timeout", type=float, default=1.0,
                   help="seconds the hook waits for a late decision before failing open")
    return p.parse_args()


def main() -> None:
    args = parse()
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    lr_decay_iters = args.lr_decay_iters or args.max_iters

    torch.manual_seed(args.seed)
    text = load_corpus(200_000)
    vocab = sorted(set(text))
    index = {c: i for i, c in enumerate(vocab)}
    data = torch.tensor([index[c] for c in text])
    n = int(0.9 * len(data))
    splits = {"train": data[:n], "val": data[n:]}

    def get_batch(split: str) -> tuple[torch.Tensor, torch.Tensor]:
        src = splits[split]
        ix = torch.randint(len(src) - args.block_size - 1, (args.batch_size,))
        x = torch.stack([src[i:i + args.block_size] for i in ix])
        y = torch.stack([src[i + 1:i + 1 + args.block_size] for i in ix])
        return x, y

    def get_lr(it: int) -> float:  # nanoGPT's schedule, unchanged
        if it < args.warmup_iters:
            return args.learning_rate * (it + 1) / (args.warmup_iters + 1)
        if it > lr_decay_iters:
            return args.min_lr
        ratio = (it - args.warmup_iters) / (lr_decay_iters - args.warmup_iters)
        coeff = 0.5 * (1.0 + math.cos(math.pi * ratio))
        return args.min_lr + coeff * (args.learning_rate - args.min_lr)

    model = CharLM(len(vocab), args.block_size, args.n_embd, args.n_layer, heads=4)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate,
                                  weight_decay=0.1, betas=(0.9, 0.95))
    fp16 = args.dtype == "float16"
    scaler = torch.amp.GradScaler("cpu", enabled=fp16, init_scale=args.init_scale)
    ctx = torch.autocast("cpu", dtype=torch.float16) if fp16 else nullcontext()
    loss_fn = nn.CrossEntropyLoss()

    iter_num, lrctl_state = 0, None
    if args.resume:
        ckpt = torch.load(out / "ckpt.pt", weights_only=False)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scaler.load_state_dict(ckpt["scaler"])
        iter_num, lrctl_state = ckpt["iter_num"], ckpt["lrctl"]

    # lrctl: keep the loop's schedule, add protection; resume the run the checkpoint holds.
    ctl = lrctl.attach(optimizer, policy=args.policy, run_name="nanogpt", base="loop",
                       scaler=scaler, resume=lrctl_state, total_steps=args.max_iters,
                       timeout=args.lrctl_timeout)
    lr_log = open(args.lr_log, "a") if args.lr_log else None  # noqa: SIM115
    if lr_log is not None:  # the LR each optimizer step really used (after lrctl's hook)
        def log_lr(opt: torch.optim.Optimizer, *_: object) -> None:
            lr_log.write(f"{iter_num} {opt.param_groups[0]['lr']!r}\n")

        optimizer.register_step_pre_hook(log_lr)

    @torch.no_grad()
    def estimate_loss() -> dict[str, float]:
        model.eval()
        result = {}
        for split in ("train", "val"):
            losses = []
            for _ in range(args.eval_iters):
                x, y = get_batch(split)
                with ctx:
                    logits = model(x)
                losses.append(loss_fn(logits.flatten(0, 1).float(), y.flatten()).item())
            result[split] = sum(losses) / len(losses)
        model.train()
        return result

    while iter_num < args.max_iters:
        torch.manual_seed(args.seed + iter_num)  # the same batches after a resume
        lr = get_lr(iter_num)
        for group in optimizer.param_groups:
            group["lr"] = lr
        if iter_num % args.eval_interval == 0 and iter_num > 0:
            losses = estimate_loss()
            ctl.report(val_loss=losses["val"])
            print(f"iter {iter_num}: train {losses['train']:.4f}, val {losses['val']:.4f}")
            torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                        "scaler": scaler.state_dict(), "iter_num": iter_num,
                        "lrctl": ctl.state_dict()}, out / "ckpt.pt")  # lrctl: its state too
        total = torch.zeros(())
        for _ in range(args.gradient_accumulation_steps):
            x, y = get_batch("train")
            with ctx:
                loss = loss_fn(model(x).flatten(0, 1).float(), y.flatten())
                loss = loss / args.gradient_accumulation_steps
            scaler.scale(loss).backward()
            total += loss.detach()
        scaler.unscale_(optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        ctl.step(total, grad_norm)  # lrctl: once per optimizer step, the whole batch's loss
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        if args.exit_after is not None and iter_num == args.exit_after:
            if lr_log is not None:
                lr_log.close()
            os._exit(3)  # no close(), no goodbye: a preempted job
        iter_num += 1
        if ctl.should_stop:
            print(f"lrctl asked to stop at iter {iter_num}")
            break

    if lr_log is not None:
        lr_log.close()
    summary = {"run": ctl.run_key, "iters": iter_num, "lr": ctl.lr[0],
               "overflows": ctl.overflows, "decisions": len(ctl.decisions)}
    ctl.close()
    print("lrctl summary " + json.dumps(summary))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
