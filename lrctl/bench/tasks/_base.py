"""What a benchmark task is, and the helpers the task families share.

A :class:`Task` is declared once, in code, with everything a reader of the
results needs to know about it: its kind, the optimizer every arm builds for it,
its batch size, its length in steps, and whether it belongs to the *tuning* half
(policy defaults may be tuned on it) or to the *held-out* half (reported, never
tuned on). :func:`Task.build` turns a seed into a :class:`TaskInstance`.

Data are fixed per task (a fixed seed or a fixed split); the run's seed changes
only the initialisation and the order of the batches.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["OPTIMIZERS", "SPLITS", "Batch", "Task", "TaskInstance", "seeded", "tensor_task"]

Batch = tuple[torch.Tensor, torch.Tensor]

#: The optimizers a task may declare: every arm builds this one (or its own variant of it).
OPTIMIZERS = ("adamw", "adam", "sgdm")
#: ``tuning``: defaults may be tuned on the task; ``heldout``: only ever reported.
SPLITS = ("tuning", "heldout")


@dataclass
class TaskInstance:
    """One seeded instance of a task: the model and its data, ready to train."""

    model: nn.Module
    next_batch: Callable[[], Batch]
    loss: Callable[[nn.Module, Batch], torch.Tensor]
    val_loss: Callable[[nn.Module], float]


@dataclass(frozen=True)
class Task:
    """A named task: its default length in optimizer steps, its builder and its declarations."""

    name: str
    steps: int
    build: Callable[[int], TaskInstance]
    description: str
    kind: str
    optimizer: str
    batch_size: int
    split: str

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"task {self.name}: optimizer must be one of {OPTIMIZERS}, "
                             f"not {self.optimizer!r}")
        if self.split not in SPLITS:
            raise ValueError(f"task {self.name}: split must be one of {SPLITS}, "
                             f"not {self.split!r}")
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError(f"task {self.name}: steps and batch_size must be positive")


def seeded(seed: int) -> torch.Generator:
    """Seed torch's global RNG (weight initialisation) and return a batch-order generator."""
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def split_rows(n: int, train_fraction: float = 0.8, seed: int = 0) -> tuple[torch.Tensor,
                                                                              torch.Tensor]:
    """A fixed random train/validation split of ``n`` rows (the same for every run seed)."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_train = int(train_fraction * n)
    return order[:n_train], order[n_train:]


def standardize(x_tr: torch.Tensor, x_va: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Both splits scaled by the training split's mean and standard deviation."""
    mean, std = x_tr.mean(0), x_tr.std(0).clamp_min(1e-3)
    return (x_tr - mean) / std, (x_va - mean) / std


def _finite(value: float) -> float:
    return value if math.isfinite(value) else math.nan


def tensor_task(model: nn.Module, data: tuple[torch.Tensor, ...], batch_size: int,
                gen: torch.Generator,
                loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy,
                val_targets: torch.Tensor | None = None) -> TaskInstance:
    """A task over in-memory tensors ``(x_train, y_train, x_val, y_val)``: batches are drawn
    with replacement; the validation loss is ``loss_fn`` on the whole validation split."""
    x_tr, y_tr, x_va, y_va = data
    if val_targets is not None:
        y_va = val_targets

    def next_batch() -> Batch:
        idx = torch.randint(0, len(x_tr), (batch_size,), generator=gen)
        return x_tr[idx], y_tr[idx]

    def loss(m: nn.Module, batch: Batch) -> torch.Tensor:
        return loss_fn(m(batch[0]), batch[1])

    def val_loss(m: nn.Module) -> float:
        with torch.no_grad():
            return _finite(float(loss_fn(m(x_va), y_va)))

    return TaskInstance(model, next_batch, loss, val_loss)


#: A table split: (x_train, y_train, x_val, y_val).
Data = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]

def split_xy(x: torch.Tensor, y: torch.Tensor, scale_y: bool) -> Data:
    """The fixed train/validation split of a table, features (and optionally targets)
    standardised with the training rows' statistics only."""
    tr, va = split_rows(len(x))
    x_tr, x_va = standardize(x[tr], x[va])
    y_tr, y_va = y[tr], y[va]
    if scale_y:
        y_tr, y_va = standardize(y_tr, y_va)
    return x_tr, y_tr, x_va, y_va
