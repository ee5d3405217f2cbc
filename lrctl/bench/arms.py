"""The arms of the quality benchmark: ways to drive the learning rate of one run.

Every arm builds the optimizer the task declares (``Task.optimizer``) with the
same "starting LR", so the grid over starting LRs asks one question: how much
does each method depend on that first guess? The optimizers: ``adamw`` (betas
0.9/0.999, weight decay 0.01), ``adam`` (no weight decay), ``sgdm`` (SGD with
momentum 0.9, no weight decay).

* ``fixed``: the starting LR throughout.
* ``cosine``: linear warmup over the first 5 % of steps, then cosine decay to 0
  (the tuned baseline: its best grid point is the regret denominator).
* ``plateau``: torch ``ReduceLROnPlateau`` (factor 0.5, patience 2) on the
  validation loss, evaluated 20 times per run.
* ``schedulefree``: ``schedulefree.AdamWScheduleFree`` (weight decay as the
  task's optimizer) or, on ``sgdm`` tasks, ``SGDScheduleFree`` (momentum 0.9),
  with a 5 % warmup.
* ``prodigy``: ``prodigyopt.Prodigy`` (lr 1.0) with the starting LR as its initial
  step-size estimate ``d0``, and cosine annealing as its authors recommend. It
  is an Adam-type method on every task, ``sgdm`` ones included.
* ``policy:<stem>``: the task's optimizer driven by the lrctl policy file
  ``<stem>.yaml`` through the in-process engine (:func:`policy_arms` maps names
  to files). A policy that watches ``val_loss`` is sent the validation loss 20
  times per run, as a user would with ``ctl.report(val_loss=...)``.
* ``lrctl``: the same with one file (``--policy``; default: the shipped
  ``default.yaml``); the name of the earlier benchmarks, kept as an alias.
* ``lrctl+rollback``: ``lrctl`` with host snapshots (every 10 steps, the newest 4),
  so the divergence guard may roll back (see :mod:`lrctl.bench._rollback_arm`).

A policy arm's ``stop`` decisions are collected by kind (``stop_kinds``): the runner
trains on past a stop that only early stopping asked for, to measure what the stop
saved against the validation loss the full run reaches (see
:mod:`lrctl.bench.runner`).
"""

from __future__ import annotations

import contextlib
import io
import math
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from .._defaults import DEFAULT_POLICY

__all__ = ["ARMS", "DEFAULT_POLICY", "POLICY_PREFIX", "Controller", "build_optimizer",
           "default_policy_files", "is_policy_arm", "make_controller", "policy_arms"]

#: The checkout's ``policies/`` folder (absent in an installed wheel).
REPO_POLICIES = Path(__file__).resolve().parent.parent.parent / "policies"
POLICY_PREFIX = "policy:"
WEIGHT_DECAY = 0.01
MOMENTUM = 0.9
WARMUP_FRACTION = 0.05
EVALS_PER_RUN = 20


class Controller:
    """An optimizer and whatever sets its LR, behind the hooks the training loop calls.

    The base class is the ``fixed`` arm: it never touches the LR.
    """

    evals_per_run = 0  # validation losses this arm wants reported during the run

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer = optimizer
        #: The kinds of policy that asked to stop (``earlystop``, ``divergence``…).
        self.stop_kinds: set[str] = set()

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


def build_optimizer(kind: str, params: Iterable[torch.nn.Parameter],
                    lr: float) -> torch.optim.Optimizer:
    """The task's declared optimizer at starting LR ``lr``."""
    if kind == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=WEIGHT_DECAY)
    if kind == "adam":
        return torch.optim.Adam(params, lr=lr)
    if kind == "sgdm":
        return torch.optim.SGD(params, lr=lr, momentum=MOMENTUM)
    raise ValueError(f"unknown optimizer {kind!r} (known: adamw, adam, sgdm)")


def _weight_decay(kind: str) -> float:
    return WEIGHT_DECAY if kind == "adamw" else 0.0


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
    """An optimizer driven by an in-process lrctl engine: LRs in before, statistics out after.

    A policy that watches ``val_loss`` gets it: the arm validates 20 times per run
    and sends the value with the next observation, as ``ctl.report`` does.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, policy: Any, steps: int) -> None:
        from .. import load_policy

        super().__init__(optimizer)
        # Told the run's length, as the cosine arm is: attach(total_steps=...) does the same.
        self.engine = load_policy(policy, [g["lr"] for g in optimizer.param_groups],
                                  total_steps=steps)
        watched = {p.params.get("metric") for p in self.engine.policies
                   if isinstance(getattr(p, "params", None), dict)}
        self.evals_per_run = EVALS_PER_RUN if "val_loss" in watched else 0
        self._pending: dict[str, float] = {}

    def before_step(self, step: int) -> None:
        for group, lr in zip(self.optimizer.param_groups, self.engine.applied_lrs, strict=True):
            group["lr"] = lr

    def after_backward(self, step: int, loss: float, grad_norm: float) -> bool:
        metrics, self._pending = self._pending, {}
        self.engine.observe(step, loss, grad_norm, **metrics)
        for d in self.engine.last_decisions:  # usually none: no cost on most steps
            if d.action == "stop":
                self.stop_kinds.add(d.kind)
        return self.engine.should_skip

    def on_validation(self, step: int, val_loss: float) -> None:
        if math.isfinite(val_loss):
            self._pending["val_loss"] = val_loss

    def should_stop(self) -> bool:
        return self.engine.should_stop

    def decisions(self) -> list[dict[str, Any]]:
        return [d.to_dict() for d in self.engine.decisions]


def _fixed(params: Any, lr: float, steps: int, policy: Any, opt: str) -> Controller:
    return Controller(build_optimizer(opt, params, lr))


def _cosine(params: Any, lr: float, steps: int, policy: Any, opt: str) -> Controller:
    warmup = max(1, int(WARMUP_FRACTION * steps))
    return _Scheduled(build_optimizer(opt, params, lr), warmup_cosine(steps, warmup))


def _plateau(params: Any, lr: float, steps: int, policy: Any, opt: str) -> Controller:
    return _Plateau(build_optimizer(opt, params, lr))


def _schedulefree(params: Any, lr: float, steps: int, policy: Any, opt: str) -> Controller:
    import schedulefree

    warmup = max(1, int(WARMUP_FRACTION * steps))
    if opt == "sgdm":
        return _ScheduleFree(schedulefree.SGDScheduleFree(params, lr=lr, momentum=MOMENTUM,
                                                          warmup_steps=warmup))
    return _ScheduleFree(schedulefree.AdamWScheduleFree(params, lr=lr,
                                                        weight_decay=_weight_decay(opt),
                                                        warmup_steps=warmup))


def _prodigy(params: Any, lr: float, steps: int, policy: Any, opt: str) -> Controller:
    import prodigyopt

    with contextlib.redirect_stdout(io.StringIO()):  # it prints its weight-decay mode
        prodigy = prodigyopt.Prodigy(params, lr=1.0, d0=lr, weight_decay=_weight_decay(opt))
    return _Scheduled(prodigy, warmup_cosine(steps, 1))


def _lrctl(params: Any, lr: float, steps: int, policy: Any, opt: str) -> Controller:
    return LrctlController(build_optimizer(opt, params, lr),
                           policy if policy is not None else DEFAULT_POLICY, steps)


def _lrctl_rollback(params: Any, lr: float, steps: int, policy: Any, opt: str) -> Controller:
    from ._rollback_arm import RollbackController

    return RollbackController(build_optimizer(opt, params, lr),
                              policy if policy is not None else DEFAULT_POLICY, steps)


Factory = Callable[[Any, float, int, Any, str], Controller]
ARMS: dict[str, Factory] = {
    "fixed": _fixed,
    "cosine": _cosine,
    "plateau": _plateau,
    "schedulefree": _schedulefree,
    "prodigy": _prodigy,
    "lrctl": _lrctl,
    "lrctl+rollback": _lrctl_rollback,
}


def is_policy_arm(arm: str) -> bool:
    """Whether ``arm`` is driven by an lrctl policy (``lrctl`` or ``policy:<stem>``)."""
    return arm == "lrctl" or arm.startswith(POLICY_PREFIX)


def default_policy_files() -> list[Path]:
    """Every ``*.yaml`` of the checkout's ``policies/`` folder, or the packaged default."""
    files = sorted(REPO_POLICIES.glob("*.yaml")) if REPO_POLICIES.is_dir() else []
    return files or [DEFAULT_POLICY]


def policy_arms(files: Sequence[str | Path] | None = None) -> dict[str, Path]:
    """Arm name ``policy:<stem>`` → policy file, for ``files`` (default: see above)."""
    out: dict[str, Path] = {}
    for f in default_policy_files() if files is None else files:
        path = Path(f)
        name = POLICY_PREFIX + path.stem
        if name in out and out[name].resolve() != path.resolve():
            raise ValueError(f"two policy files named {path.stem!r}: {out[name]} and {path}")
        out[name] = path
    return out


def make_controller(arm: str, params: Any, lr: float, steps: int,
                    policy: Any = None, optimizer: str = "adamw") -> Controller:
    """The controller of ``arm`` for a run of ``steps`` steps from starting LR ``lr``.

    ``policy``: the policy of the ``lrctl`` arm, or of a ``policy:<stem>`` arm (default:
    the file of that stem in :func:`policy_arms`).
    """
    if arm.startswith(POLICY_PREFIX):
        if policy is None:
            try:
                policy = policy_arms()[arm]
            except KeyError:
                raise ValueError(f"no policy file for arm {arm!r}; pass it as policy=") from None
        return _lrctl(params, lr, steps, policy, optimizer)
    try:
        factory = ARMS[arm]
    except KeyError:
        raise ValueError(f"unknown arm {arm!r} (known: {', '.join(ARMS)}, "
                         f"{POLICY_PREFIX}<stem>)") from None
    return factory(params, lr, steps, policy, optimizer)
