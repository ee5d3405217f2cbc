"""Synthetic tasks: generated from fixed seeds, so every run sees the same problem.

* ``teacher_student``: a 20→64→64→1 ReLU MLP regressing a random tanh teacher
  (20→32→1) on 1600 rows (80/20 split), standardised targets, batch 32. Small
  data and a smooth target: the validation loss is sensitive to the LR late in
  the run, a known hard case for LR policies.
* ``sparse_parity``: the parity of 3 fixed bits out of 20 (±1 inputs), 10 % of
  the labels flipped (validation too: the floor is H(0.1) ≈ 0.325 nats), fresh
  samples every step, an MLP 20→128→1; at low LRs the loss sits at log 2 for a
  long stretch before it falls (the long run of the suite).
* ``moons``: a deep, narrow tanh MLP (five hidden layers of 32) on
  ``make_moons`` with noise, batch 8.
* ``friedman``: a residual MLP with LayerNorm on ``make_friedman1`` regression,
  batch 256.
* ``adding``: a GRU (hidden 32) on the adding problem: sequences of 10 (value,
  marker) pairs, target the sum of the two marked values plus N(0, 0.1²) noise
  (so the validation loss has a floor, ~0.01, rather than tending to 0).
"""

from __future__ import annotations

import functools
import itertools

import torch
from torch import nn
from torch.nn import functional as F

from ._base import (
    Batch,
    Data,
    TaskInstance,
    seeded,
    split_xy,
    tensor_task,
)

__all__ = ["build_adding", "build_friedman", "build_moons", "build_sparse_parity",
           "build_teacher_student"]



def _mlp(*widths: int, act: type[nn.Module] = nn.ReLU) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(itertools.pairwise(widths)):
        layers.append(nn.Linear(a, b))
        if i < len(widths) - 2:
            layers.append(act())
    return nn.Sequential(*layers)


# -- teacher-student regression ---------------------------------------------------------
@functools.lru_cache(maxsize=1)
def _teacher_data() -> Data:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1600, 20, generator=g)
    w1 = torch.randn(20, 32, generator=g) / 20 ** 0.5 * 2.0
    b1 = torch.randn(32, generator=g) * 0.5
    w2 = torch.randn(32, 1, generator=g) / 32 ** 0.5
    y = torch.tanh(x @ w1 + b1) @ w2
    return split_xy(x, y, scale_y=True)


def build_teacher_student(seed: int) -> TaskInstance:
    gen = seeded(seed)
    return tensor_task(_mlp(20, 64, 64, 1), _teacher_data(), 32, gen, F.mse_loss)


# -- sparse parity ----------------------------------------------------------------------
_PARITY_N, _PARITY_K, _PARITY_NOISE = 20, 3, 0.1


def _parity(x: torch.Tensor, bits: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    clean = x[:, bits].prod(dim=1) > 0
    flip = torch.rand(len(x), generator=gen) < _PARITY_NOISE
    return (clean ^ flip).float()


@functools.lru_cache(maxsize=1)
def _parity_fixed() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    bits = torch.randperm(_PARITY_N, generator=g)[:_PARITY_K]
    x_va = torch.randint(0, 2, (2000, _PARITY_N), generator=g).float() * 2 - 1
    return bits, x_va, _parity(x_va, bits, g)


def build_sparse_parity(seed: int, batch_size: int = 32, chunk: int = 250) -> TaskInstance:
    gen = seeded(seed)
    bits, x_va, y_va = _parity_fixed()
    model = _mlp(_PARITY_N, 128, 1)
    queue: list[Batch] = []

    def next_batch() -> Batch:
        if not queue:  # draw `chunk` batches at once: one step of a 5000-step run stays cheap
            x = torch.randint(0, 2, (chunk * batch_size, _PARITY_N), generator=gen) * 2.0 - 1
            y = _parity(x, bits, gen)
            queue.extend(zip(x.split(batch_size), y.split(batch_size), strict=True))
            queue.reverse()
        return queue.pop()

    def loss_fn(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.binary_cross_entropy_with_logits(logits.squeeze(-1), y)

    inst = tensor_task(model, (x_va, y_va, x_va, y_va), batch_size, gen, loss_fn)
    inst.next_batch = next_batch
    return inst


# -- moons, deep and narrow -------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def _moons_data() -> Data:
    from sklearn.datasets import make_moons

    x, y = make_moons(n_samples=2000, noise=0.25, random_state=0)
    return split_xy(torch.tensor(x, dtype=torch.float32), torch.tensor(y), scale_y=False)


def build_moons(seed: int) -> TaskInstance:
    gen = seeded(seed)
    model = _mlp(2, 32, 32, 32, 32, 32, 2, act=nn.Tanh)
    return tensor_task(model, _moons_data(), 8, gen)


# -- friedman, residual MLP with LayerNorm ------------------------------------------------
class _ResBlock(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, width)
        self.fc2 = nn.Linear(width, width)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.fc2(F.relu(self.fc1(self.norm(h))))


@functools.lru_cache(maxsize=1)
def _friedman_data() -> Data:
    from sklearn.datasets import make_friedman1

    x, y = make_friedman1(n_samples=3000, n_features=10, noise=1.0, random_state=0)
    return split_xy(torch.tensor(x, dtype=torch.float32),
                     torch.tensor(y, dtype=torch.float32).reshape(-1, 1), scale_y=True)


def build_friedman(seed: int) -> TaskInstance:
    gen = seeded(seed)
    model = nn.Sequential(nn.Linear(10, 64), _ResBlock(64), _ResBlock(64), nn.LayerNorm(64),
                          nn.Linear(64, 1))
    return tensor_task(model, _friedman_data(), 256, gen, F.mse_loss)


# -- the adding problem, GRU ------------------------------------------------------------
_ADD_LEN, _ADD_NOISE = 10, 0.1


def _adding_batch(n: int, gen: torch.Generator) -> Batch:
    values = torch.rand(n, _ADD_LEN, generator=gen)
    first = torch.randint(0, _ADD_LEN // 2, (n,), generator=gen)
    second = torch.randint(_ADD_LEN // 2, _ADD_LEN, (n,), generator=gen)
    marks = torch.zeros(n, _ADD_LEN)
    rows = torch.arange(n)
    marks[rows, first] = 1.0
    marks[rows, second] = 1.0
    x = torch.stack([values, marks], dim=-1)
    target = (values * marks).sum(dim=1, keepdim=True)
    return x, target + _ADD_NOISE * torch.randn(n, 1, generator=gen)


class _GRURegressor(nn.Module):
    def __init__(self, hidden: int = 32) -> None:
        super().__init__()
        self.rnn = nn.GRU(2, hidden, batch_first=True)
        self.head = nn.Linear(hidden, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(x)
        return self.head(out[:, -1])


@functools.lru_cache(maxsize=1)
def _adding_val() -> Batch:
    return _adding_batch(1000, torch.Generator().manual_seed(0))


def build_adding(seed: int, batch_size: int = 32) -> TaskInstance:
    gen = seeded(seed)
    x_va, y_va = _adding_val()
    inst = tensor_task(_GRURegressor(), (x_va, y_va, x_va, y_va), batch_size, gen, F.mse_loss)
    inst.next_batch = lambda: _adding_batch(batch_size, gen)
    return inst
