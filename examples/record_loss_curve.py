"""Record the loss curve that `lrctl replay` ships with.

A 64→256→10 MLP trained with AdamW at a deliberately hot, fixed learning rate on
a synthetic 10-class problem (Gaussian clusters, made here: nothing is
downloaded). Writes ``step,loss,grad_norm`` rows to a CSV file.

    python examples/record_loss_curve.py lrctl/data/loss_curve.csv --steps 3000
"""

from __future__ import annotations

import argparse
import csv

import torch
from torch import nn


def main(out: str, steps: int = 3000, lr: float = 0.02, seed: int = 0) -> None:
    torch.manual_seed(seed)
    centers = torch.randn(10, 64) * 1.5
    labels = torch.randint(0, 10, (8192,))
    inputs = centers[labels] + torch.randn(8192, 64) * 2.0
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 10))
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    rows = []
    for step in range(steps):
        idx = torch.randint(0, len(inputs), (64,))
        loss = nn.functional.cross_entropy(model(inputs[idx]), labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.get_total_norm([p.grad for p in model.parameters()])
        opt.step()
        rows.append((step, f"{loss.item():.6g}", f"{grad_norm.item():.6g}"))
    with open(out, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(("step", "loss", "grad_norm"))
        writer.writerows(rows)
    print(f"{steps} steps at LR {lr:g} written to {out}; replay them through a policy "
          f"with: lrctl replay POLICY --curve {out} --lr {lr:g}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", nargs="?", default="loss_curve.csv", help="the CSV to write")
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--lr", type=float, default=0.02)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    main(args.out, args.steps, args.lr, args.seed)
