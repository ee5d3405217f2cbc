"""A tiny character-level transformer language model, with lrctl steering its LR.

The corpus is Python's own standard library source, read from this machine's
installation: real text, offline. The model is a few-layer causal transformer
built from torch's own modules; lrctl replaces the warmup-plus-decay lines a
script like nanoGPT's train.py would carry.

    python examples/train_charlm.py --steps 500
"""

from __future__ import annotations

import argparse
import sysconfig
from pathlib import Path

import torch
from torch import nn

import lrctl


def load_corpus(max_chars: int) -> str:
    """Concatenated stdlib sources, in a fixed order, up to ``max_chars``."""
    root = Path(sysconfig.get_paths()["stdlib"])
    parts, total = [], 0
    for path in sorted(root.glob("*.py")):
        text = path.read_text(encoding="utf-8", errors="replace")
        parts.append(text)
        total += len(text)
        if total >= max_chars:
            break
    return "".join(parts)[:max_chars]


class CharLM(nn.Module):
    def __init__(self, vocab: int, context: int, width: int, layers: int, heads: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.position = nn.Parameter(torch.zeros(context, width))
        layer = nn.TransformerEncoderLayer(width, heads, 4 * width, dropout=0.0,
                                           batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(width, vocab)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(context))

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        t = idx.shape[1]
        h = self.embed(idx) + self.position[:t]
        h = self.blocks(h, mask=self.mask[:t, :t], is_causal=True)
        return self.head(h)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--context", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--chars", type=int, default=400_000)
    parser.add_argument("--policy", default=None, help="policy file (default: lrctl's default)")
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

    model = CharLM(len(vocab), args.context, args.width, args.layers, heads=4)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.1)
    loss_fn = nn.CrossEntropyLoss()

    with lrctl.attach(optimizer, policy=args.policy, run_name="charlm") as ctl:
        for step in range(args.steps):
            x, y = batch(train)
            loss = loss_fn(model(x).flatten(0, 1), y.flatten())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            ctl.step(loss, grad_norm=grad_norm)  # ← lrctl: no recomputation of the norm
            if not ctl.should_skip:
                optimizer.step()
            if ctl.should_stop:
                break
            if step % 100 == 0 or step == args.steps - 1:
                with torch.no_grad():
                    vx, vy = batch(val)
                    val_loss = loss_fn(model(vx).flatten(0, 1), vy.flatten()).item()
                ctl.report(val_loss=val_loss)
                print(f"step {step:5d}  loss {loss.item():.3f}  val {val_loss:.3f}  "
                      f"lr {ctl.lr[0]:.3g}")
        print(f"lrctl run {ctl.run_key}: {ctl.steps_taken} steps, final lr {ctl.lr[0]:.3g}")
        print(f"  {len(ctl.decisions)} decision(s){':' if ctl.decisions else ''}")
        for d in ctl.decisions:
            print(f"  step {d.step}: {d.policy} {d.action}: {d.reason}")


if __name__ == "__main__":
    main()
