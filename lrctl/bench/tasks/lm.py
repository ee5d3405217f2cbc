"""A tiny character-level language model on Python's own standard-library source.

* ``charlm``: a two-layer causal transformer (width 64) predicting the next
  byte of Python standard-library source; the last 10 % of the text is the
  validation split. Too high an LR stalls it near the unigram loss rather than
  producing NaNs; too low an LR leaves it short of the bigram structure.
"""

from __future__ import annotations

import functools
import math
import sysconfig
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from ._base import Batch, TaskInstance, seeded

__all__ = ["TinyTransformer", "build_charlm", "corpus"]

# Stable, plain-ASCII modules present in every CPython 3.10+; any missing one is skipped.
_CORPUS_FILES = ("textwrap.py", "string.py", "shlex.py", "fnmatch.py", "heapq.py", "bisect.py",
                 "random.py", "difflib.py", "argparse.py", "calendar.py", "fractions.py")
_CORPUS_BYTES = 400_000


@functools.lru_cache(maxsize=1)
def corpus() -> bytes:
    """Python's own standard-library source, as 7-bit ASCII."""
    root = Path(sysconfig.get_paths()["stdlib"])
    chunks = [(root / name).read_bytes() for name in _CORPUS_FILES if (root / name).is_file()]
    if not chunks:
        raise RuntimeError(f"no standard-library sources found under {root}")
    text = b"\n".join(chunks)[:_CORPUS_BYTES]
    return bytes(b if b < 128 else ord("?") for b in text)


class TinyTransformer(nn.Module):
    """A pre-norm causal transformer over bytes (vocabulary 128)."""

    mask: torch.Tensor  # (a buffer)

    def __init__(self, context: int, width: int = 64, layers: int = 2, heads: int = 4) -> None:
        super().__init__()
        self.embed = nn.Embedding(128, width)
        self.pos = nn.Parameter(torch.randn(context, width) * 0.02)
        block = nn.TransformerEncoderLayer(width, heads, dim_feedforward=2 * width, dropout=0.0,
                                           batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(block, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, 128)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(context),
                             persistent=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        n = idx.shape[1]
        h = self.embed(idx) + self.pos[:n]
        h = self.blocks(h, mask=self.mask[:n, :n], is_causal=True)
        return self.head(self.norm(h))


def build_charlm(seed: int, context: int = 32, batch_size: int = 16,
                 val_batches: int = 8) -> TaskInstance:
    gen = seeded(seed)
    data = torch.tensor(list(corpus()), dtype=torch.long)
    split = int(0.9 * len(data))
    train, val = data[:split], data[split:]
    model = TinyTransformer(context)
    # A fixed validation set: evenly spaced windows of the held-out text.
    starts = torch.linspace(0, len(val) - context - 2, val_batches * batch_size).long()
    val_x = torch.stack([val[s:s + context] for s in starts])
    val_y = torch.stack([val[s + 1:s + context + 1] for s in starts])

    def next_batch() -> Batch:
        s = torch.randint(0, len(train) - context - 1, (batch_size,), generator=gen)
        x = torch.stack([train[i:i + context] for i in s])
        y = torch.stack([train[i + 1:i + context + 1] for i in s])
        return x, y

    def loss(m: nn.Module, batch: Batch) -> torch.Tensor:
        logits = m(batch[0])
        return F.cross_entropy(logits.reshape(-1, 128), batch[1].reshape(-1))

    def val_loss(m: nn.Module) -> float:
        with torch.no_grad():
            logits = m(val_x)
            value = float(F.cross_entropy(logits.reshape(-1, 128), val_y.reshape(-1)))
        return value if math.isfinite(value) else math.nan

    return TaskInstance(model, next_batch, loss, val_loss)
