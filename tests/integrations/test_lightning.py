"""The Lightning callback against a real ``Trainer`` and a real controller.

What a user relies on: the LR each optimizer step uses is lrctl's; the grad
norm lrctl sees is the one before Lightning clips, and the loss the mean of a
step's micro-batches; a run resumed with ``trainer.fit(ckpt_path=...)`` rejoins
the same controller session and carries on counting steps, so the policies
continue rather than start over; and a NaN loss never reaches the weights.
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
import lrctl.hook
from lrctl.client import total_grad_norm
from lrctl.integrations.lightning import LrctlCallback

LR = 0.05
CLIP = 0.01  # far below the grad norms here: every step is clipped


class Regression(pl.LightningModule):
    def __init__(self, nan_at: int | None = None) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 1))
        self.nan_at = nan_at  # the global_step whose loss is NaN (a bad batch)

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        x, y = batch
        loss = nn.functional.mse_loss(self.net(x), y)
        if self.trainer.global_step == self.nan_at:
            loss = loss * float("nan")
        return loss

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
        ckpt_path: Path | None = None, module: Regression | None = None,
        **options: Any) -> pl.Trainer:
    torch.manual_seed(0)
    trainer = pl.Trainer(max_steps=max_steps, accelerator="cpu", devices=1, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, gradient_clip_val=CLIP,
                         default_root_dir=str(root), callbacks=callbacks, **options)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*num_workers.*")
        trainer.fit(module or Regression(), loader(), ckpt_path=ckpt_path)
    return trainer


@pytest.mark.parametrize("saved_by", ["this version", "lrctl 0.2"])
def test_lr_applied_grad_norm_pre_clip_and_resume(controller: Any, tmp_path: Path,
                                                  saved_by: str) -> None:
    ckpt = tmp_path / "mid.ckpt"
    first = LrctlCallback(policy=POLICY, sync=True, timeout=10.0, run_name="pl-test")
    rec1 = Recorder()
    with pytest.raises(Preempted):
        fit(tmp_path, 20, [first, rec1, CrashAt(10, ckpt)])
    assert first.controller is not None
    run_key = first.controller.run_key
    assert first.controller.steps_taken == 10
    assert first.controller.total_steps == 20  # max_steps, for the anneal
    checkpoint = torch.load(ckpt, weights_only=False)
    (key, saved), = [(k, v) for k, v in checkpoint["callbacks"].items()
                     if k.startswith("LrctlCallback")]
    # What ctl.state_dict() holds: plain data, the hook's own format.
    assert {k: saved[k] for k in ("format", "run_key", "step", "initial_lrs")} == {
        "format": "lrctl.hook/1", "run_key": run_key, "step": 10, "initial_lrs": [LR]}
    if saved_by == "lrctl 0.2":  # that version saved three fields, no format
        checkpoint["callbacks"][key] = {"run_key": run_key, "step": 10, "initial_lrs": [LR]}
        torch.save(checkpoint, ckpt)

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


def test_loss_is_the_mean_of_the_micro_batches(controller: Any, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """With accumulate_grad_batches=2 a step's loss is the mean of its two batches'."""
    observed: list[tuple[float, float]] = []
    real_step = lrctl.hook.Controller.step

    def spy(self: Any, loss: Any = None, grad_norm: Any = None, **kwargs: Any) -> None:
        observed.append((float(loss), float(grad_norm)))
        real_step(self, loss, grad_norm, **kwargs)

    monkeypatch.setattr(lrctl.hook.Controller, "step", spy)
    callback = LrctlCallback(policy=POLICY, sync=True, timeout=10.0, run_name="pl-accum")
    recorder = Recorder()
    fit(tmp_path, 8, [callback, recorder], accumulate_grad_batches=2)
    # Lightning hands on_train_batch_end each batch's loss divided by 2.
    assert len(recorder.losses) == 16 and len(recorder.used) == 8
    step_losses = [recorder.losses[2 * k] + recorder.losses[2 * k + 1] for k in range(8)]
    assert [loss for loss, _ in observed] == pytest.approx(step_losses, rel=1e-6)
    assert [norm for _, norm in observed] == pytest.approx(recorder.norms, rel=1e-6)


NAN_STEP = 6


class Weights(pl.Callback):
    """The parameters before and after each batch, by global_step."""

    def __init__(self) -> None:
        self.before: dict[int, list[torch.Tensor]] = {}
        self.after: dict[int, list[torch.Tensor]] = {}

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                             batch: Any, batch_idx: int) -> None:
        self.before[trainer.global_step] = [p.detach().clone() for p in pl_module.parameters()]

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        self.after[trainer.global_step - 1] = [p.detach().clone()
                                               for p in pl_module.parameters()]


def test_a_nan_loss_never_reaches_the_weights(controller: Any, tmp_path: Path) -> None:
    callback = LrctlCallback(policy=POLICY, timeout=10.0, run_name="pl-nan")
    weights = Weights()
    trainer = fit(tmp_path, 12, [callback, weights], module=Regression(nan_at=NAN_STEP))
    for name, param in trainer.lightning_module.named_parameters():
        assert torch.isfinite(param).all(), name
    # That update was skipped: the weights after it are the weights before it.
    for before, after in zip(weights.before[NAN_STEP], weights.after[NAN_STEP], strict=True):
        assert torch.equal(before, after)
    assert callback.skipped == 1
    # lrctl saw the NaN, at the step Lightning ran (and would log) the batch at.
    assert callback.controller is not None
    skips = [d for d in callback.controller.decisions if d.action == "skip"]
    assert [d.step for d in skips] == [NAN_STEP]
    assert skips[0].evidence["loss"] == "nan"
