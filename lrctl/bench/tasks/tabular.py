"""Tabular tasks on scikit-learn's bundled data sets and generators (no downloads).

* ``digits``: an MLP 64→256→10 on the 8×8 digits, 80/20 train/validation split
  (the split is fixed; the seed changes the initialisation and batch order).
* ``wine``: a small MLP on 4 of the 13 features of the 178-row wine data (with
  all 13 the classes separate and the loss tends to 0), batch 8: few rows,
  noisy steps, overfitting at high LRs.
* ``cancer_logreg``: logistic regression (convex) on the breast-cancer data.
* ``diabetes``: an MLP regressing the diabetes progression score (standardised).
* ``linreg``: linear least squares (convex) on ill-conditioned features
  (``make_regression`` with a low effective rank), batch 512.
* ``noisy_labels``: 4-class ``make_classification`` with 25 % of the training
  labels flipped to another class; validated on the clean labels, so memorising
  the noise shows up as a rising validation loss.
"""

from __future__ import annotations

import functools

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

__all__ = ["build_cancer_logreg", "build_diabetes", "build_digits", "build_linreg",
           "build_noisy_labels", "build_wine"]



# -- digits (unchanged since the first benchmark) ---------------------------------------
@functools.lru_cache(maxsize=1)
def digits_data() -> Data:
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
    gen = seeded(seed)
    x_tr, y_tr, x_va, y_va = digits_data()
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


# -- shared loading ---------------------------------------------------------------------
def _split(x: object, y: object, *, classes: bool, scale_y: bool = False) -> Data:
    xt = torch.tensor(x, dtype=torch.float32)
    yt = torch.tensor(y, dtype=torch.long if classes else torch.float32)
    if not classes:
        yt = yt.reshape(-1, 1)
    return split_xy(xt, yt, scale_y)


def _bce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.binary_cross_entropy_with_logits(logits.squeeze(-1), target)


# -- wine -------------------------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def _wine_data() -> Data:
    from sklearn.datasets import load_wine

    x, y = load_wine(return_X_y=True)
    return _split(x[:, :4], y, classes=True)  # 4 of 13 features: the classes overlap


def build_wine(seed: int) -> TaskInstance:
    gen = seeded(seed)
    model = nn.Sequential(nn.Linear(4, 32), nn.ReLU(), nn.Linear(32, 3))
    return tensor_task(model, _wine_data(), 8, gen)


# -- breast cancer, logistic regression -------------------------------------------------
@functools.lru_cache(maxsize=1)
def _cancer_data() -> Data:
    from sklearn.datasets import load_breast_cancer

    x, y = load_breast_cancer(return_X_y=True)
    x_tr, y_tr, x_va, y_va = _split(x, y, classes=True)
    return x_tr, y_tr.float(), x_va, y_va.float()


def build_cancer_logreg(seed: int) -> TaskInstance:
    gen = seeded(seed)
    return tensor_task(nn.Linear(30, 1), _cancer_data(), 16, gen, _bce)


# -- diabetes regression ----------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def _diabetes_data() -> Data:
    from sklearn.datasets import load_diabetes

    x, y = load_diabetes(return_X_y=True)
    return _split(x, y, classes=False, scale_y=True)


def build_diabetes(seed: int) -> TaskInstance:
    gen = seeded(seed)
    model = nn.Sequential(nn.Linear(10, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(),
                          nn.Linear(64, 1))
    return tensor_task(model, _diabetes_data(), 32, gen, F.mse_loss)


# -- ill-conditioned linear least squares -----------------------------------------------
@functools.lru_cache(maxsize=1)
def _linreg_data() -> Data:
    from sklearn.datasets import make_regression

    x, y = make_regression(n_samples=5000, n_features=64, n_informative=48, effective_rank=8,
                           tail_strength=0.2, noise=0.5, random_state=0)
    return _split(x, y, classes=False, scale_y=True)


def build_linreg(seed: int) -> TaskInstance:
    gen = seeded(seed)
    return tensor_task(nn.Linear(64, 1), _linreg_data(), 512, gen, F.mse_loss)


# -- noisy labels -----------------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def _noisy_data() -> Data:
    from sklearn.datasets import make_classification

    x, y = make_classification(n_samples=3000, n_features=20, n_informative=10, n_redundant=4,
                               n_classes=4, n_clusters_per_class=2, class_sep=1.0, flip_y=0.0,
                               random_state=0)
    x_tr, y_tr, x_va, y_va = _split(x, y, classes=True)
    g = torch.Generator().manual_seed(1)
    flip = torch.rand(len(y_tr), generator=g) < 0.25
    shift = torch.randint(1, 4, (len(y_tr),), generator=g)  # another class, uniformly
    noisy = torch.where(flip, (y_tr + shift) % 4, y_tr)
    return x_tr, noisy, x_va, y_va  # validated on clean labels


def build_noisy_labels(seed: int) -> TaskInstance:
    gen = seeded(seed)
    model = nn.Sequential(nn.Linear(20, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(),
                          nn.Linear(128, 4))
    return tensor_task(model, _noisy_data(), 128, gen)
