"""The Hugging Face callback against a real ``Trainer`` and a real controller.

What a user relies on: the LR the optimizer uses each step is lrctl's (the
Trainer's own linear scheduler would have moved it otherwise), the Trainer's
logged ``learning_rate`` is that LR, and lrctl observed the loss and grad norm
the Trainer had already computed (no second grad-norm pass).
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from integ_common import EARLYSTOP, POLICY, check_early_stop
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

import lrctl
import lrctl.hook
from lrctl.integrations.hf import LrctlCallback

STEPS = 24
LR = 1e-3


class Recorder(TrainerCallback):
    """The LR each optimizer step really used, and what the Trainer logged."""

    def __init__(self) -> None:
        self.used: list[float] = []
        self.logs: dict[int, dict[str, float]] = {}

    def on_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        # Right after optimizer.step(), before the Trainer's scheduler steps.
        self.used.append(float(kwargs["optimizer"].param_groups[0]["lr"]))

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None,
               **kwargs: Any) -> None:
        if logs and "loss" in logs:
            self.logs[state.global_step] = dict(logs)


def tiny_dataset(n: int, length: int = 16, vocab: int = 32) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(n):
        start = int(torch.randint(0, vocab, (1,), generator=gen))
        ids = (torch.arange(length) * 3 + start) % vocab  # learnable: an arithmetic pattern
        rows.append({"input_ids": ids, "labels": ids.clone()})
    return rows


def make_trainer(tmp_path: Any, callbacks: list[TrainerCallback]) -> Trainer:
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=32, n_positions=16, n_embd=32, n_layer=2,
                                       n_head=2))
    args = TrainingArguments(
        output_dir=str(tmp_path / "out"), max_steps=STEPS, per_device_train_batch_size=8,
        learning_rate=LR, lr_scheduler_type="linear", warmup_steps=5, logging_steps=1,
        max_grad_norm=1.0, save_strategy="no", report_to=[], use_cpu=True,
        disable_tqdm=True, dataloader_num_workers=0, seed=0)
    return Trainer(model=model, args=args, train_dataset=tiny_dataset(64), callbacks=callbacks)


def test_trainer_uses_lrctl_lr_and_its_own_statistics(
        controller: Any, tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    computed: list[int] = []
    real_norm = lrctl.hook.total_grad_norm

    def counting_norm(optimizer: Any) -> Any:
        computed.append(1)
        return real_norm(optimizer)

    monkeypatch.setattr(lrctl.hook, "total_grad_norm", counting_norm)
    callback = LrctlCallback(policy=POLICY, sync=True, timeout=10.0, run_name="hf-test")
    recorder = Recorder()
    trainer = make_trainer(tmp_path, [callback, recorder])
    trainer.train()

    ctl = callback.controller
    assert ctl is not None and ctl.run_key is not None
    assert ctl.total_steps == STEPS  # the Trainer's max_steps, for the anneal
    assert len(recorder.used) == STEPS
    assert sorted(recorder.logs) == list(range(1, STEPS + 1))
    assert not computed, "the callback computed a grad norm of its own"

    # The Trainer logs step k (global_step k + 1) with the LR that step used.
    logged_lr = [recorder.logs[k + 1]["learning_rate"] for k in range(STEPS)]
    assert logged_lr == recorder.used

    # An in-process engine fed the Trainer's logged loss and grad norm gives the
    # same LRs: step k's observation decides step k + 1's LR (sync mode).
    engine = lrctl.load_policy(POLICY, base_lrs=[LR])
    expected = [engine.applied_lrs[0]]
    for k in range(STEPS - 1):
        logs = recorder.logs[k + 1]
        expected.append(engine.observe(k, logs["loss"], grad_norm=logs["grad_norm"])[0])
    assert recorder.used == pytest.approx(expected, rel=1e-12)

    # The Trainer's linear warmup would start at 0 and ramp: it was taken over.
    assert recorder.used[0] == pytest.approx(LR * 0.1)
    assert len(set(recorder.used)) > STEPS // 2, "the policy should move the LR every step"
    kinds = {d.kind for d in ctl.decisions}
    assert "plateau" in kinds, "the grad-norm plateau should have cut the LR at least once"
    assert all(math.isfinite(x) for x in recorder.used)


def test_an_early_stop_ends_the_trainer(controller: Any, tmp_path: Any) -> None:
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=32, n_positions=16, n_embd=32, n_layer=2,
                                       n_head=2))
    args = TrainingArguments(
        output_dir=str(tmp_path / "out"), max_steps=STEPS, per_device_train_batch_size=8,
        per_device_eval_batch_size=8, learning_rate=LR, logging_steps=1, eval_strategy="steps",
        eval_steps=3, save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True,
        dataloader_num_workers=0, seed=0)
    callback = LrctlCallback(policy=EARLYSTOP, sync=True, timeout=10.0, run_name="hf-stop")
    trainer = Trainer(model=model, args=args, train_dataset=tiny_dataset(64),
                      eval_dataset=tiny_dataset(16), callbacks=[callback])
    trainer.train()
    ctl = callback.controller
    assert ctl is not None and ctl.should_stop
    # eval_loss (as val_loss) after steps 3 and 6 reaches lrctl with the next step's
    # statistics; the second one stops the Trainer long before max_steps.
    check_early_stop(ctl.decisions, trainer.state.global_step, STEPS)
    assert trainer.state.global_step == 7
