"""A plain PyTorch training loop where lrctl is one line.

Trains a 64→256→10 MLP on scikit-learn's bundled digits (no download) with
AdamW. Where a script would set the learning rate by hand or with a scheduler,
it calls ``ctl.step(loss)``: the controller's policies (by default a divergence
guard and a plateau decay; ``--policy`` for another) set the LR and explain every
change.

    python examples/train_plain.py --steps 2000 --lr 0.01
"""

from __future__ import annotations

import argparse

import torch
from sklearn.datasets import load_digits
from torch import nn

import lrctl


def load_data(seed: int) -> tuple[torch.Tensor, ...]:
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    train, val = order[:1500], order[1500:]
    return x[train], y[train], x[val], y[val]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--policy", default=None, help="policy file (default: lrctl's default)")
    parser.add_argument("--eval-every", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    x_train, y_train, x_val, y_val = load_data(args.seed)
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 10))
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)

    with lrctl.attach(optimizer, policy=args.policy, run_name="train-plain") as ctl:
        for step in range(args.steps):
            batch = torch.randint(0, len(x_train), (args.batch_size,))
            loss = nn.functional.cross_entropy(model(x_train[batch]), y_train[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            ctl.step(loss)  # ← lrctl: stream the loss, apply the controller's LR
            if not ctl.should_skip:
                optimizer.step()
            if ctl.should_stop:
                stop = next((d for d in reversed(ctl.decisions) if d.action == "stop"), None)
                print(f"step {step}: the policy asked to stop"
                      + (f" ({stop.reason})" if stop is not None else ""))
                break
            if step % args.eval_every == 0 or step == args.steps - 1:
                with torch.no_grad():
                    val_loss = nn.functional.cross_entropy(model(x_val), y_val).item()
                ctl.report(val_loss=val_loss)
                print(f"step {step:5d}  loss {loss.item():.4f}  val {val_loss:.4f}  "
                      f"lr {ctl.lr[0]:.3g}")
        print(f"lrctl run {ctl.run_key}: {ctl.steps_taken} steps, final lr {ctl.lr[0]:.3g}")
        print(f"  {len(ctl.decisions)} decision(s){':' if ctl.decisions else ''}")
        for d in ctl.decisions:
            print(f"  step {d.step}: {d.policy} {d.action}: {d.reason}")


if __name__ == "__main__":
    main()
