"""Benchmark tasks: small, seeded, offline, about a second per run on one CPU thread.

Each task builds, for a seed, a model, a stream of training batches and a
validation loss on a held-out split. The data ship with installed packages
(scikit-learn's bundled data sets and generators) or with Python itself
(standard-library source text), or are generated from fixed seeds, so a
benchmark never downloads anything.

Every task declares, here, the optimizer that every arm builds for it and its
*split*: ``tuning`` tasks are the ones policy defaults may be tuned on
(``digits`` and ``charlm`` were); ``heldout`` tasks are only ever reported.
Never move a task from held-out to tuning after looking at its numbers.
"""

from __future__ import annotations

from ._base import OPTIMIZERS, SPLITS, Task, TaskInstance
from .lm import TinyTransformer, build_charlm, corpus
from .synthetic import (
    build_adding,
    build_friedman,
    build_moons,
    build_sparse_parity,
    build_teacher_student,
)
from .tabular import (
    build_cancer_logreg,
    build_diabetes,
    build_digits,
    build_linreg,
    build_noisy_labels,
    build_wine,
)
from .vision import build_digits_ae, build_digits_cnn

__all__ = ["OPTIMIZERS", "SPLITS", "TASKS", "Task", "TaskInstance", "TinyTransformer", "corpus",
           "get_task", "tasks_in_split"]

_ALL = (
    # -- tuning: policy defaults may be tuned on these ---------------------------------------
    Task("digits", 600, build_digits, "MLP 64→256→10 on sklearn digits, batch 64, 80/20 split",
         kind="MLP classifier", optimizer="adamw", batch_size=64, split="tuning"),
    Task("charlm", 600, build_charlm,
         "2-layer causal transformer (width 64, context 32, batch 16) on stdlib source",
         kind="transformer LM", optimizer="adamw", batch_size=16, split="tuning"),
    Task("cancer_logreg", 800, build_cancer_logreg,
         "logistic regression on sklearn breast cancer (30 features), batch 16",
         kind="convex logistic regression", optimizer="sgdm", batch_size=16, split="tuning"),
    Task("diabetes", 500, build_diabetes,
         "MLP 10→64→64→1 regressing sklearn diabetes (standardised), batch 32",
         kind="tabular regression", optimizer="adam", batch_size=32, split="tuning"),
    Task("digits_ae", 600, build_digits_ae,
         "autoencoder 64→32→8→32→64 on the digits pixels (MSE), batch 256",
         kind="autoencoder", optimizer="adam", batch_size=256, split="tuning"),
    Task("noisy_labels", 800, build_noisy_labels,
         "MLP 20→128→128→4, 25% of training labels flipped, clean validation, batch 128",
         kind="noisy labels", optimizer="sgdm", batch_size=128, split="tuning"),
    Task("moons", 800, build_moons,
         "deep narrow tanh MLP (5×32) on make_moons (noise 0.25), batch 8",
         kind="deep narrow MLP", optimizer="sgdm", batch_size=8, split="tuning"),
    # -- held out: reported, never tuned on ------------------------------------------------
    Task("wine", 300, build_wine, "MLP 4→32→3 on 4 of the 13 sklearn wine features, batch 8",
         kind="small tabular classifier", optimizer="adam", batch_size=8, split="heldout"),
    Task("digits_cnn", 300, build_digits_cnn,
         "CNN (3×3 conv 8, 3×3/2 conv 16, linear) on 8×8 digit images, batch 128",
         kind="CNN", optimizer="sgdm", batch_size=128, split="heldout"),
    Task("teacher_student", 1000, build_teacher_student,
         "MLP 20→64→64→1 regressing a random tanh teacher, 1600 rows, batch 32",
         kind="teacher-student regression", optimizer="adamw", batch_size=32, split="heldout"),
    Task("sparse_parity", 5000, build_sparse_parity,
         "MLP 20→128→1 on the parity of 3 of 20 ±1 bits, 10% label noise, batch 32",
         kind="sparse parity", optimizer="sgdm", batch_size=32, split="heldout"),
    Task("linreg", 300, build_linreg,
         "least squares on ill-conditioned make_regression (64 features), batch 512",
         kind="convex linear regression", optimizer="sgdm", batch_size=512, split="heldout"),
    Task("friedman", 400, build_friedman,
         "residual MLP with LayerNorm (2 blocks, width 64) on make_friedman1, batch 256",
         kind="residual MLP regression", optimizer="sgdm", batch_size=256, split="heldout"),
    Task("adding", 300, build_adding,
         "GRU (hidden 32) on the adding problem, length 10, noisy targets, batch 32",
         kind="recurrent (GRU)", optimizer="adamw", batch_size=32, split="heldout"),
)

TASKS: dict[str, Task] = {t.name: t for t in _ALL}


def get_task(name: str) -> Task:
    try:
        return TASKS[name]
    except KeyError:
        raise ValueError(f"unknown task {name!r} (known: {', '.join(TASKS)})") from None


def tasks_in_split(split: str) -> tuple[str, ...]:
    """Task names of ``split`` (``tuning``, ``heldout`` or ``all``), in declaration order."""
    if split == "all":
        return tuple(TASKS)
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r} (known: {', '.join(SPLITS)}, all)")
    return tuple(name for name, t in TASKS.items() if t.split == split)
