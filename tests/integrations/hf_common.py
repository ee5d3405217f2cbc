"""A tiny, deterministic Hugging Face ``Trainer`` for the integration tests.

A one- or two-layer GPT-2 built from a config (no download) learns bytes of
Python's own standard library source. Dropout is off, so a run, and a run
resumed from one of its checkpoints, compute the same numbers. Used in-process
by test_hf*.py and in subprocesses through hf_job.py.
"""

from __future__ import annotations

import sysconfig
from pathlib import Path
from typing import Any

import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

LR = 1e-3
CONTEXT = 32


def stdlib_bytes(n: int, context: int = CONTEXT) -> list[dict[str, torch.Tensor]]:
    """``n`` windows of stdlib source as byte ids (a byte-level tokenizer)."""
    text = b"".join(p.read_bytes() for p in sorted(Path(sysconfig.get_paths()["stdlib"])
                                                   .glob("a*.py")))
    ids = torch.tensor(list(text[:n * context]), dtype=torch.long)
    return [{"input_ids": ids[i * context:(i + 1) * context],
             "labels": ids[i * context:(i + 1) * context]} for i in range(n)]


def tiny_gpt2(layers: int = 1) -> GPT2LMHeadModel:
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(
        vocab_size=256, n_positions=CONTEXT, n_embd=32, n_layer=layers, n_head=2,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0))


def training_args(out: Path, steps: int, **overrides: Any) -> TrainingArguments:
    options: dict[str, Any] = {
        "output_dir": str(out), "max_steps": steps, "per_device_train_batch_size": 8,
        "learning_rate": LR, "lr_scheduler_type": "linear", "warmup_steps": 3,
        "logging_steps": 1, "max_grad_norm": 1.0, "save_strategy": "no", "report_to": [],
        "use_cpu": True, "disable_tqdm": True, "dataloader_num_workers": 0, "seed": 0,
        "log_level": "error"}
    options.update(overrides)
    return TrainingArguments(**options)


def make_trainer(out: Path, steps: int, callbacks: list[TrainerCallback],
                 trainer_class: type[Trainer] = Trainer, layers: int = 1,
                 **overrides: Any) -> Trainer:
    return trainer_class(model=tiny_gpt2(layers), args=training_args(out, steps, **overrides),
                         train_dataset=stdlib_bytes(96), callbacks=callbacks)


class UsedLR(TrainerCallback):
    """The LR each optimizer update really used (an optimizer pre-step hook registered
    after lrctl's, so it sees what lrctl applied), by the Trainer's step number.

    ``path``: also append ``step lr`` lines to a file (flushed: a job may be killed).
    """

    def __init__(self, path: Path | None = None) -> None:
        self.path = path
        self.used: dict[int, float] = {}
        self._state: Any = None

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._state = state
        inner = kwargs["optimizer"]
        while hasattr(getattr(inner, "optimizer", None), "param_groups"):
            inner = inner.optimizer  # accelerate's wrapper has no hook tables of its own
        inner.register_step_pre_hook(self._record)

    def _record(self, optimizer: Any, *_: Any) -> None:
        step = self._state.global_step + 1  # the step the Trainer will log this update as
        lr = float(optimizer.param_groups[0]["lr"])
        self.used[step] = lr
        if self.path is not None:
            with open(self.path, "a") as f:
                f.write(f"{step} {lr!r}\n")


def logged(trainer: Trainer) -> dict[int, dict[str, float]]:
    """The Trainer's per-step training logs (``loss``, ``grad_norm``, ``learning_rate``)."""
    return {int(h["step"]): h for h in trainer.state.log_history if "loss" in h}
