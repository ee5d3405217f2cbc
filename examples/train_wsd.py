"""Train a tiny language model at a stable LR; start its cooldown from the command line.

WSD (warmup, stable, decay): the LR warms up, then holds, for as long as you
like; when you decide the model is good enough (or the budget is spent), you
cool it down, and the cooldown is where the loss drops. No run length to fix in
advance. While this script trains, in another terminal:

    lrctl runs                            # find the run
    lrctl decay wsd-charlm --steps 200    # cool down over the next 200 steps
    lrctl decay wsd-charlm --cancel       # changed your mind: back to the stable LR

The cooldown is a decision of the run's WSD policy, recorded with its reason
(MLflow, `lrctl decisions`) and checkpointed: it survives a controller restart.
The run stops by itself when the cooldown ends (``stop_after_decay``).

    python examples/train_wsd.py
"""

from __future__ import annotations

import argparse

import torch
from torch import nn
from train_charlm import CharLM, load_corpus  # the model and data of train_charlm.py

import lrctl

POLICY = {
    "version": 1,
    "policies": [
        # As the shipped policies set it: ordinary training swings the grad norm 2-3x,
        # the kind's own floor (min_sigma, 0.05) would call a 1.6x swing a spike.
        {"kind": "divergence", "grad_norm_min_sigma": 0.2},
        {"kind": "wsd", "warmup_steps": 50, "start_on": "operator", "decay_steps": 200,
         "decay_shape": "1-sqrt", "stop_after_decay": True},
    ],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--max-steps", "--steps", type=int, default=100_000,
                        help="stop here if no cooldown was started")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--context", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--chars", type=int, default=100_000)
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--policy", default=None, help="policy file (default: WSD, the "
                                                       "cooldown started by an operator)")
    args = parser.parse_args()

    torch.manual_seed(0)
    text = load_corpus(args.chars)
    vocab = sorted(set(text))
    index = {c: i for i, c in enumerate(vocab)}
    data = torch.tensor([index[c] for c in text])
    split = int(0.9 * len(data))
    train, val = data[:split], data[split:]

    def batch(source: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        starts = torch.randint(0, len(source) - args.context - 1, (args.batch_size,))
        x = torch.stack([source[s:s + args.context] for s in starts])
        y = torch.stack([source[s + 1:s + args.context + 1] for s in starts])
        return x, y

    model = CharLM(len(vocab), args.context, args.width, layers=1, heads=4)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.1)
    loss_fn = nn.CrossEntropyLoss()

    with lrctl.attach(optimizer, policy=args.policy or POLICY, run_name="wsd-charlm") as ctl:
        print(f"run {ctl.run_key}: stable LR {args.lr:g} after a 50-step warmup; start the "
              f"cooldown with: lrctl decay wsd-charlm --steps 200", flush=True)
        for step in range(args.max_steps):
            x, y = batch(train)
            loss = loss_fn(model(x).flatten(0, 1), y.flatten())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            ctl.step(loss, grad_norm=grad_norm)  # ← lrctl sets the LR of every phase
            if not ctl.should_skip:
                optimizer.step()
            if ctl.should_stop:  # the cooldown is over (or the run diverged)
                break
            if step % args.eval_every == 0:
                with torch.no_grad():
                    vx, vy = batch(val)
                    val_loss = loss_fn(model(vx).flatten(0, 1), vy.flatten()).item()
                ctl.report(val_loss=val_loss)
                print(f"step {step:5d}  loss {loss.item():.3f}  val {val_loss:.3f}  "
                      f"lr {ctl.lr[0]:.3g}", flush=True)
        print(f"lrctl run {ctl.run_key}: {ctl.steps_taken} steps, final lr {ctl.lr[0]:.3g}")
        print(f"  {len(ctl.decisions)} decision(s){':' if ctl.decisions else ''}")
        for d in ctl.decisions:
            print(f"  step {d.step}: {d.policy} {d.action}: {d.reason}")


if __name__ == "__main__":
    main()
