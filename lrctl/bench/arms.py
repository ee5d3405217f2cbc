"""The arms of the quality benchmark: ways to drive the learning rate of one run.

Every arm starts from the same "starting LR" and the same AdamW settings
(betas 0.9/0.999, weight decay 0.01), so the grid over starting LRs asks one
question: how much does each method depend on that first guess?

* ``fixed``: the starting LR throughout.
* ``cosine``: linear warmup over the first 5 % of steps, then cosine decay to 0
  (the tuned baseline: its best grid point is the regret denominator).
* ``plateau``: torch ``ReduceLROnPlateau`` (factor 0.5, patience 2) on the
  validation loss, evaluated 20 times per run.
* ``schedulefree``: ``schedulefree.AdamWScheduleFree`` with a 5 % warmup.
* ``prodigy``: ``prodigyopt.Prodigy`` (lr 1.0) with the starting LR as its initial
  step-size estimate ``d0``, and cosine annealing as its authors recommend.
* ``lrctl``: AdamW driven by an lrctl policy file (default: the shipped
  ``default.yaml``) through the in-process engine.
"""

from __future__ import annotations

import contextlib
import io
import math
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

__all__ = ["ARMS", "DEFAULT_POLICY", "Controller", "make_controller"]

DEFAULT_POLICY = Path(__file__).resolve().parent.parent / "data" / "policies" / "default.yaml"
WEIGHT_DECAY = 0.01
WARMUP_FRACTION = 0.05
EVALS_PER_RUN = 20


class Controller:
    """An optimizer and whatever sets its LR, behind the hooks the training loop calls.

    The base class is the ``fixed`` arm: it never touches the LR.
    """

    evals_per_run = 0  # validation losses this arm wants reported during the run

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer = optimizer

    def before_step(self, step: int) -> None:
        """Set the LR for ``step``."""

    def after_backward(self, step: int, loss: float, grad_norm: float) -> bool:
        """See the step's statistics; return True to skip its optimizer step."""
        return False

    def after_step(self, step: int) -> None:
        """The optimizer has stepped (or skipped)."""

    def on_validation(self, step: int, val_loss: float) -> None:
        """A validation loss measured after ``step``."""

    def should_stop(self) -> bool:
        return False

    def train_mode(self) -> None:
        """Put the optimizer in training mode (schedule-free keeps two weight sets)."""

    def eval_mode(self) -> None:
        """Put the weights that should be evaluated in place."""

    def decisions(self) -> list[dict[str, Any]]:
        return []

    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])


def _adamw(params: Iterable[torch.nn.Parameter], lr: float) -> torch.optim.AdamW:
    return torch.optim.AdamW(params, lr=lr, weight_decay=WEIGHT_DECAY)


class _Scheduled(Controller):
    """An optimizer with a torch ``LRScheduler`` stepped once per optimizer step."""

    def __init__(self, optimizer: torch.optim.Optimizer, lam: Callable[[int], float]) -> None:
        super().__init__(optimizer)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lam)

    def after_step(self, step: int) -> None:
        self.scheduler.step()


def warmup_cosine(steps: int, warmup: int) -> Callable[[int], float]:
    def lam(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, steps - warmup))
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return lam


class _Plateau(Controller):
    evals_per_run = EVALS_PER_RUN

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        super().__init__(optimizer)
        self.scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, mode="min", factor=0.5, patience=2)

    def on_validation(self, step: int, val_loss: float) -> None:
        if math.isfinite(val_loss):
            self.scheduler.step(val_loss)


class _ScheduleFree(Controller):
    def train_mode(self) -> None:
        self.optimizer.train()  # type: ignore[attr-defined]

    def eval_mode(self) -> None:
        self.optimizer.eval()  # type: ignore[attr-defined]


class LrctlController(Controller):
    """AdamW driven by an in-process lrctl engine: LRs in before, statistics out after."""

    def __init__(self, optimizer: torch.optim.Optimizer, policy: Any, steps: int) -> None:
        from .. import load_policy

        super().__init__(optimizer)
        # Told the run's length, as the cosine arm is: attach(total_steps=...) does the same.
        self.engine = load_policy(policy, [g["lr"] for g in optimizer.param_groups],
                                  total_steps=steps)

    def before_step(self, step: int) -> None:
        for group, lr in zip(self.optimizer.param_groups, self.engine.applied_lrs, strict=True):
            group["lr"] = lr

    def after_backward(self, step: int, loss: float, grad_norm: float) -> bool:
        self.engine.observe(step, loss, grad_norm)
        return self.engine.should_skip

    def should_stop(self) -> bool:
        return self.engine.should_stop

    def decisions(self) -> list[dict[str, Any]]:
        return [d.to_dict() for d in self.engine.decisions]


def _fixed(params: Any, lr: float, steps: int, policy: Any) -> Controller:
    return Controller(_adamw(params, lr))


def _cosine(params: Any, lr: float, steps: int, policy: Any) -> Controller:
    warmup = max(1, int(WARMUP_FRACTION * steps))
    return _Scheduled(_adamw(params, lr), warmup_cosine(steps, warmup))


def _plateau(params: Any, lr: float, steps: int, policy: Any) -> Controller:
    return _Plateau(_adamw(params, lr))


def _schedulefree(params: Any, lr: float, steps: int, policy: Any) -> Controller:
    import schedulefree

    opt = schedulefree.AdamWScheduleFree(params, lr=lr, weight_decay=WEIGHT_DECAY,
                                         warmup_steps=max(1, int(WARMUP_FRACTION * steps)))
    return _ScheduleFree(opt)


def _prodigy(params: Any, lr: float, steps: int, policy: Any) -> Controller:
    import prodigyopt

    with contextlib.redirect_stdout(io.StringIO()):  # it prints its weight-decay mode
        opt = prodigyopt.Prodigy(params, lr=1.0, d0=lr, weight_decay=WEIGHT_DECAY)
    return _Scheduled(opt, warmup_cosine(steps, 1))


def _lrctl(params: Any, lr: float, steps: int, policy: Any) -> Controller:
    return LrctlController(_adamw(params, lr), policy if policy is not None else DEFAULT_POLICY,
                           steps)


Factory = Callable[[Any, float, int, Any], Controller]
ARMS: dict[str, Factory] = {
    "fixed": _fixed,
    "cosine": _cosine,
    "plateau": _plateau,
    "schedulefree": _schedulefree,
    "prodigy": _prodigy,
    "lrctl": _lrctl,
}


def make_controller(arm: str, params: Any, lr: float, steps: int,
                    policy: Any = None) -> Controller:
    """The controller of ``arm`` for a run of ``steps`` steps from starting LR ``lr``."""
    try:
        factory = ARMS[arm]
    except KeyError:
        raise ValueError(f"unknown arm {arm!r} (known: {', '.join(ARMS)})") from None
    return factory(params, lr, steps, policy)
