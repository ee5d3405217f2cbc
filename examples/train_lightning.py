"""A Lightning ``Trainer`` run with lrctl owning the learning rate.

The digits MLP of train_plain.py as a ``LightningModule``. ``configure_optimizers``
returns just the optimizer: the callback attaches it, observes the loss and the
grad norm before Lightning clips it, and reports ``val_loss``. It also saves
where the run stands in Lightning's checkpoints: a fit resumed from one after a
crash (``trainer.fit(ckpt_path=...)``) rejoins the same controller session.

    python examples/train_lightning.py --steps 500
"""

from __future__ import annotations

import argparse
import warnings

import lightning.pytorch as pl
import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lrctl.integrations.lightning import LrctlCallback


class DigitsMLP(pl.LightningModule):
    def __init__(self, lr: float) -> None:
        super().__init__()
        self.lr = lr
        self.net = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 10))

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def validation_step(self, batch: list[torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", nn.functional.cross_entropy(self.net(x), y))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.lr)  # no scheduler: lrctl sets the LR


def loaders(batch_size: int) -> tuple[DataLoader[tuple[torch.Tensor, ...]], ...]:
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    train, val = order[:1500], order[1500:]
    return (DataLoader(TensorDataset(x[train], y[train]), batch_size=batch_size, shuffle=True),
            DataLoader(TensorDataset(x[val], y[val]), batch_size=512))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--policy", default=None, help="policy file (default: lrctl's default)")
    parser.add_argument("--root", default="lightning-out")
    args = parser.parse_args()
    warnings.filterwarnings("ignore", ".*num_workers.*")

    torch.manual_seed(0)
    train, val = loaders(batch_size=64)
    lrctl_callback = LrctlCallback(policy=args.policy, run_name="train-lightning")  # ← lrctl
    trainer = pl.Trainer(max_steps=args.steps, accelerator="cpu", devices=1,
                         gradient_clip_val=1.0, val_check_interval=min(100, args.steps),
                         check_val_every_n_epoch=None, callbacks=[lrctl_callback],
                         logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=args.root)
    trainer.fit(DigitsMLP(args.lr), train, val)

    ctl = lrctl_callback.controller
    assert ctl is not None
    print(f"lrctl run {ctl.run_key}: {ctl.steps_taken} steps, final lr {ctl.lr[0]:.3g}, "
          f"val_loss {float(trainer.callback_metrics['val_loss']):.4f}")
    print(f"  {len(ctl.decisions)} decision(s){':' if ctl.decisions else ''}")
    for d in ctl.decisions:
        print(f"  step {d.step}: {d.policy} {d.action}: {d.reason}")


if __name__ == "__main__":
    main()
