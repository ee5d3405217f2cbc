"""The Lightning callback against a real ``Trainer`` and a real controller.

What a user relies on: the LR each optimizer step uses is lrctl's; the grad
norm lrctl sees is the one before Lightning clips; and a run resumed with
``trainer.fit(ckpt_path=...)`` rejoins the same controller session and carries
on counting steps, so the policies continue rather than start over.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from integ_common import EARLYSTOP, POLICY, check_early_stop
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lrctl
from lrctl.client import total_grad_norm
from lrctl.integrations.lightning import LrctlCallback

LR = 0.05
CLIP = 0.01  # far below the grad norms here: every step is clipped


class Regression(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 1))

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=LR)


class Recorder(pl.Callback):
    """The LR each optimizer step used and its pre-clip grad norm; the losses."""

    def __init__(self) -> None:
        self.used: list[float] = []
        self.norms: list[float] = []
        self.losses: list[float] = []

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                                 optimizer: Any) -> None:
        # Inside optimizer.step(closure), after backward, before clipping and the update.
        self.used.append(float(optimizer.param_groups[0]["lr"]))
        self.norms.append(float(total_grad_norm(optimizer)))

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        self.losses.append(float(outputs["loss"]))


class Preempted(RuntimeError):
    pass


class CrashAt(pl.Callback):
    """Save a checkpoint at ``step`` optimizer steps, then die as a preempted job would."""

    def __init__(self, step: int, path: Path) -> None:
        self.step, self.path = step, path

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        if trainer.global_step == self.step:
            trainer.save_checkpoint(self.path)
            raise Preempted(f"preempted at step {self.step}")


def loader() -> DataLoader[Any]:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(256, 8, generator=gen)
    y = x.sum(dim=1, keepdim=True) + 0.1 * torch.randn(256, 1, generator=gen)
    return DataLoader(TensorDataset(x, y), batch_size=16, shuffle=False)


def fit(root: Path, max_steps: int, callbacks: list[pl.Callback],
        ckpt_path: Path | None = None) -> pl.Trainer:
    torch.manual_seed(0)
    trainer = pl.Trainer(max_steps=max_steps, accelerator="cpu", devices=1, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, gradient_clip_val=CLIP,
                         default_root_dir=str(root), callbacks=callbacks)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*num_workers.*")
        trainer.fit(Regression(), loader(), ckpt_path=ckpt_path)
    return trainer


def test_lr_applied_grad_norm_pre_clip_and_resume(controller: Any, tmp_path: Path) -> None:
    ckpt = tmp_path / "mid.ckpt"
    first = LrctlCallback(policy=POLICY, sync=True, timeout=10.0, run_name="pl-test")
    rec1 = Recorder()
    with pytest.raises(Preempted):
        fit(tmp_path, 20, [first, rec1, CrashAt(10, ckpt)])
    assert first.controller is not None
    run_key = first.controller.run_key
    assert first.controller.steps_taken == 10
    assert first.controller.total_steps == 20  # max_steps, for the anneal
    saved = torch.load(ckpt, weights_only=False)["callbacks"]
    assert {"run_key": run_key, "step": 10, "initial_lrs": [LR]} in saved.values()

    second = LrctlCallback(policy=POLICY, sync=True, timeout=10.0, run_name="pl-test")
    rec2 = Recorder()
    fit(tmp_path, 20, [second, rec2], ckpt_path=ckpt)
    assert second.controller is not None
    assert second.controller.run_key == run_key, "the resumed fit must rejoin its session"
    assert second.controller.steps_taken == 20

    used, norms, losses = rec1.used + rec2.used, rec1.norms + rec2.norms, rec1.losses + rec2.losses
    assert len(used) == len(norms) == len(losses) == 20
    assert min(norms) > 10 * CLIP, "the recorded norms should be the pre-clip ones"

    # One engine fed all 20 steps in order gives the LRs both fits used: the
    # controller continued the session's policy state across the resume, and it
    # saw the pre-clip grad norms (the plateau policy watches them).
    engine = lrctl.load_policy(POLICY, base_lrs=[LR])
    expected = [engine.applied_lrs[0]]
    for step in range(19):
        expected.append(engine.observe(step, losses[step], grad_norm=norms[step])[0])
    assert used == pytest.approx(expected, rel=1e-6)
    assert len(set(used)) > 5, "the policy should move the LR"


class Validated(Regression):
    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", nn.functional.mse_loss(self.net(x), y))


def test_an_early_stop_sets_trainer_should_stop(controller: Any, tmp_path: Path) -> None:
    callback = LrctlCallback(policy=EARLYSTOP, sync=True, timeout=10.0, run_name="pl-stop")
    torch.manual_seed(0)
    trainer = pl.Trainer(max_steps=40, accelerator="cpu", devices=1, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, val_check_interval=4,
                         limit_val_batches=2, num_sanity_val_steps=0,
                         default_root_dir=str(tmp_path), callbacks=[callback])
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*num_workers.*")
        trainer.fit(Validated(), loader(), loader())
    ctl = callback.controller
    assert ctl is not None and ctl.should_stop
    # Validation after steps 4 and 8; the second val_loss goes with step 8's statistics
    # (0-based step 8 is the ninth optimizer step), which stops the fit there.
    check_early_stop(ctl.decisions, trainer.global_step, 40)
    assert trainer.global_step == 9
