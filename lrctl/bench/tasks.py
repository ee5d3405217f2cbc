"""Benchmark tasks: small, seeded, offline, a few seconds per run on one CPU thread.

Each task builds, for a seed, a model, a stream of training batches and a
validation loss on a held-out split. The data ship with installed packages
(scikit-learn's ``load_digits``) or with Python itself (standard-library source
text), so a benchmark never downloads anything.

* ``digits``: an MLP 64→256→10 on the 8×8 digits, 80/20 train/validation split
  (the split is fixed; the seed changes the initialisation and batch order).
* ``charlm``: a two-layer causal transformer (width 64) predicting the next
  byte of Python standard-library source; the last 10 % of the text is the
  validation split. Too high an LR stalls it near the unigram loss rather than
  producing NaNs; too low an LR leaves it short of the bigram structure.
"""

from __future__ import annotations

import math
import sysconfig
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["TASKS", "Task", "TaskInstance", "get_task"]

Batch = tuple[torch.Tensor, torch.Tensor]

# Stable, plain-ASCII modules present in every CPython 3.10+; any missing one is skipped.
_CORPUS_FILES = ("textwrap.py", "string.py", "shlex.py", "fnmatch.py", "heapq.py", "bisect.py",
                 "random.py", "difflib.py", "argparse.py", "calendar.py", "fractions.py")
_CORPUS_BYTES = 400_000


@dataclass
class TaskInstance:
    """One seeded instance of a task: the model and its data, ready to train."""

    model: nn.Module
    next_batch: Callable[[], Batch]
    loss: Callable[[nn.Module, Batch], torch.Tensor]
    val_loss: Callable[[nn.Module], float]


@dataclass(frozen=True)
class Task:
    """A named task with its default length in optimizer steps."""

    name: str
    steps: int
    build: Callable[[int], TaskInstance]
    description: str


def _seeded(seed: int) -> torch.Generator:
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


# -- digits -------------------------------------------------------------------------
def _digits_data() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    xt = torch.tensor(x, dtype=torch.float32)
    yt = torch.tensor(y, dtype=torch.long)
    order = torch.randperm(len(xt), generator=torch.Generator().manual_seed(0))
    n_train = int(0.8 * len(xt))
    tr, va = order[:n_train], order[n_train:]
    mean, std = xt[tr].mean(0), xt[tr].std(0).clamp_min(1e-3)  # train statistics only
    return (xt[tr] - mean) / std, yt[tr], (xt[va] - mean) / std, yt[va]


def build_digits(seed: int, batch_size: int = 64) -> TaskInstance:
    gen = _seeded(seed)
    x_tr, y_tr, x_va, y_va = _digits_data()
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 10))

    def next_batch() -> Batch:
        idx = torch.randint(0, len(x_tr), (batch_size,), generator=gen)
        return x_tr[idx], y_tr[idx]

    def loss(m: nn.Module, batch: Batch) -> torch.Tensor:
        return F.cross_entropy(m(batch[0]), batch[1])

    def val_loss(m: nn.Module) -> float:
        with torch.no_grad():
            return float(F.cross_entropy(m(x_va), y_va))

    return TaskInstance(model, next_batch, loss, val_loss)


# -- tiny character-level language model --------------------------------------------
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
    gen = _seeded(seed)
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


TASKS: dict[str, Task] = {
    "digits": Task("digits", 600, build_digits,
                   "MLP 64→256→10 on sklearn digits, batch 64, 80/20 split"),
    "charlm": Task("charlm", 600, build_charlm,
                   "2-layer causal transformer (width 64, context 32, batch 16) on stdlib source"),
}


def get_task(name: str) -> Task:
    try:
        return TASKS[name]
    except KeyError:
        raise ValueError(f"unknown task {name!r} (known: {', '.join(TASKS)})") from None
