"""One training run of one task under one arm, with an optional injected fault.

The loop is the one a user writes: forward, backward, grad norm, let the LR
driver see the statistics (it may ask to skip the step), optimizer step. Faults
are injected at the points where they happen in real training: a mis-set LR, a
corrupt gradient, a NaN loss.

A stop that only early stopping asked for does not end the loop: the validation
loss at the stop becomes the run's ``final_val`` (the model a user would keep),
and the run trains on to the end, the same run as if it had not stopped, for
``full_val``: what the stop cost in validation loss, against the steps it saved.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from .arms import make_controller
from .faults import Fault
from .tasks import Task

__all__ = ["RunResult", "train"]

_NAN_PATIENCE = 25  # consecutive non-finite losses after which a run is given up as diverged


@dataclass
class RunResult:
    task: str
    arm: str
    lr: float
    seed: int
    steps: int
    final_val: float
    diverged: bool
    stopped_at: int | None = None
    train_loss: list[float] = field(default_factory=list)
    lrs: list[float] = field(default_factory=list)
    skipped: int = 0
    decisions: list[dict[str, Any]] = field(default_factory=list)
    steps_done: int = 0  # optimizer steps taken or skipped (fewer than steps if stopped early)
    seconds: float = 0.0  # wall time of the run, build and validation included
    early_stop_step: int | None = None  # the step early stopping asked to stop after
    full_val: float = math.nan  # with an early stop: the final val of the run trained on

    def summary(self) -> dict[str, Any]:
        """The JSON-safe record of the run, without per-step curves."""
        return {"task": self.task, "arm": self.arm, "lr": self.lr, "seed": self.seed,
                "steps": self.steps, "final_val": _json_float(self.final_val),
                "diverged": self.diverged, "stopped_at": self.stopped_at,
                "steps_done": self.steps_done, "skipped": self.skipped,
                "early_stop_step": self.early_stop_step,
                "full_val": _json_float(self.full_val),
                "seconds": round(self.seconds, 3),
                "actions": _count_actions(self.decisions)}


def train(task: Task, arm: str, lr: float, seed: int, *, steps: int | None = None,
          fault: Fault | None = None, policy: Any = None) -> RunResult:
    """Train ``task`` for ``steps`` steps under ``arm`` from starting LR ``lr``, with the
    optimizer the task declares."""
    began = time.perf_counter()
    steps = task.steps if steps is None else steps
    inst = task.build(seed)
    model = inst.model
    params = [p for p in model.parameters() if p.requires_grad]
    ctl = make_controller(arm, params, lr, steps, policy, task.optimizer)
    eval_every = max(1, steps // ctl.evals_per_run) if ctl.evals_per_run else 0
    result = RunResult(task.name, arm, lr, seed, steps, math.nan, False)
    val_at_stop = math.nan
    bad_streak = 0
    model.train()
    ctl.train_mode()
    for step in range(steps):
        ctl.before_step(step)
        loss = inst.loss(model, inst.next_batch())
        if fault is not None and fault.poisons_loss(step):
            loss = loss * math.nan
        ctl.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        scale = 1.0 if fault is None else fault.grad_scale(step)
        if scale != 1.0:
            for p in params:
                if p.grad is not None:
                    p.grad.mul_(scale)
        grad_norm = float(torch.nn.utils.get_total_norm([p.grad for p in params
                                                         if p.grad is not None]))
        loss_value = float(loss.detach())
        result.train_loss.append(loss_value)
        if ctl.after_backward(step, loss_value, grad_norm):
            result.skipped += 1
        else:
            _step_with_lr_scale(ctl.optimizer, 1.0 if fault is None else fault.lr_scale(step))
        result.lrs.append(ctl.lr() * (1.0 if fault is None else fault.lr_scale(step)))
        ctl.after_step(step)
        bad_streak = 0 if math.isfinite(loss_value) else bad_streak + 1
        if bad_streak >= _NAN_PATIENCE:
            result.diverged = result.early_stop_step is None  # else only the run trained on
            break
        if eval_every and (step + 1) % eval_every == 0 and step + 1 < steps:
            ctl.on_validation(step, _validate(inst, ctl))
        if ctl.should_stop():
            if ctl.stop_kinds != {"earlystop"}:
                result.stopped_at = step
                break
            if result.early_stop_step is None:
                result.early_stop_step = step
                val_at_stop = _validate(inst, ctl)
    result.final_val = _validate(inst, ctl)
    finite_params = all(bool(torch.isfinite(p).all()) for p in params)
    if result.early_stop_step is not None:
        full_ok = finite_params and math.isfinite(result.final_val)
        result.full_val = result.final_val if full_ok else math.inf
        result.final_val = val_at_stop
        finite_params = math.isfinite(val_at_stop)
    result.diverged = result.diverged or not finite_params or not math.isfinite(result.final_val)
    result.decisions = ctl.decisions()
    result.steps_done = len(result.train_loss)
    result.seconds = time.perf_counter() - began
    return result


def _validate(inst: Any, ctl: Any) -> float:
    inst.model.eval()
    ctl.eval_mode()
    value = inst.val_loss(inst.model)
    ctl.train_mode()
    inst.model.train()
    return value


def _step_with_lr_scale(optimizer: torch.optim.Optimizer, scale: float) -> None:
    """One optimizer step at ``scale`` × the LRs the driver set, which are then restored."""
    if scale == 1.0:
        optimizer.step()
        return
    saved = [g["lr"] for g in optimizer.param_groups]
    for g in optimizer.param_groups:
        g["lr"] = g["lr"] * scale
    try:
        optimizer.step()
    finally:
        for g, lr in zip(optimizer.param_groups, saved, strict=True):
            g["lr"] = lr


def _count_actions(decisions: list[dict[str, Any]]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for d in decisions:
        key = f"{d['policy']}:{d['action']}"
        counts[key] = counts.get(key, 0) + 1
    return counts


def _json_float(x: float) -> float | str:
    return x if math.isfinite(x) else ("nan" if math.isnan(x) else str(x))
