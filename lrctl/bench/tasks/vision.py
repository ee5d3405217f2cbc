"""Image tasks on the 8×8 digits (the same fixed 80/20 split as ``digits``).

* ``digits_cnn``: a small convolutional network (3×3 convolutions with 8 and 16
  channels, the second with stride 2, then a linear read-out) classifying the digits as 1×8×8
  images.
* ``digits_ae``: an autoencoder 64→32→8→32→64 reconstructing the standardised
  pixels (mean squared error); no labels.
"""

from __future__ import annotations

from torch import nn
from torch.nn import functional as F

from ._base import TaskInstance, seeded, tensor_task
from .tabular import digits_data

__all__ = ["build_digits_ae", "build_digits_cnn"]


def build_digits_cnn(seed: int) -> TaskInstance:
    gen = seeded(seed)
    x_tr, y_tr, x_va, y_va = digits_data()
    data = (x_tr.reshape(-1, 1, 8, 8), y_tr, x_va.reshape(-1, 1, 8, 8), y_va)
    model = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU(),
        nn.Flatten(), nn.Linear(16 * 4 * 4, 10))
    return tensor_task(model, data, 128, gen)


def build_digits_ae(seed: int) -> TaskInstance:
    gen = seeded(seed)
    x_tr, _, x_va, _ = digits_data()
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 8), nn.ReLU(),
                          nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 64))
    return tensor_task(model, (x_tr, x_tr, x_va, x_va), 256, gen, F.mse_loss)

