"""Hugging Face ``Trainer`` integration: ``LrctlCallback``.

    trainer = Trainer(model, args, train_dataset=ds,
                      callbacks=[LrctlCallback(policy="policies/default.yaml")])

What it does, and why this way:

* **Statistics the Trainer already has.** The Trainer computes the loss and the
  (pre-clip) grad norm of every optimizer step and hands them to callbacks only
  through ``on_log``, already converted to floats. The callback observes those:
  no extra device synchronisation, no second grad-norm computation. Set
  ``logging_steps`` to how often lrctl should observe (1 for every step; the
  Trainer then syncs the loss each step, as it does for any logging).
* **The Trainer's scheduler does not overwrite lrctl's LR.** At
  ``on_train_begin`` the callback takes over the Trainer's ``lr_scheduler``:
  its ``step()`` no longer touches the optimizer, and its ``get_last_lr()``
  reports lrctl's LR, so the Trainer's ``learning_rate`` log is the LR actually
  used. Warmup and decay belong in the lrctl policy file: ``warmup_steps`` and
  ``lr_scheduler_type`` are ignored, and lrctl starts from ``learning_rate``
  (the group's ``initial_lr``), not from the 0 a warmup scheduler has already
  put into the optimizer.
* **The optimizer inside accelerate's wrapper.** The Trainer hands callbacks an
  ``AcceleratedOptimizer``; lrctl attaches to the torch optimizer inside it.
* **Step numbers are the Trainer's ``global_step``** (also after
  ``resume_from_checkpoint``: the hook counts from the restored step, and the
  Trainer's ``max_steps`` is the run's ``total_steps``). The observation for
  optimizer step *k* is sent at the start of step *k + 1* (the Trainer logs step
  *k* after ``on_step_end``), and its decision applies from step *k + 2* in
  async mode, *k + 1* with ``sync=True``.
* ``eval_*`` metrics from ``on_evaluate`` are reported (``eval_loss`` also as
  ``val_loss``); a ``stop`` decision sets ``control.should_training_stop``.
"""

from __future__ import annotations

import math
from typing import Any

from transformers import TrainerCallback

from ..hook import Controller

__all__ = ["LrctlCallback"]


class LrctlCallback(TrainerCallback):
    """Attach the Trainer's optimizer to an lrctl controller.

    Keyword arguments go to :func:`lrctl.attach` (``policy``, ``run_name``,
    ``sync``, ``socket``, ``spawn``…).
    """

    def __init__(self, **attach_options: Any) -> None:
        self.attach_options = attach_options
        self.controller: Controller | None = None
        self._pending: dict[str, float | None] | None = None  # the last finished step's stats

    # -- lifecycle -------------------------------------------------------------------------
    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        optimizer = kwargs.get("optimizer")
        if optimizer is None:
            raise RuntimeError("LrctlCallback: the Trainer passed no optimizer to on_train_begin")
        # The Trainer's own grad norm arrives through on_log; never compute another.
        options = {"run_name": getattr(args, "run_name", None), **self.attach_options,
                   "compute_grad_norm": False}
        if getattr(state, "max_steps", 0) and state.max_steps > 0:
            options.setdefault("total_steps", int(state.max_steps))  # for the anneal
        # Resumed from a checkpoint: the Trainer has restored global_step; count from it.
        options.setdefault("start_step", int(getattr(state, "global_step", 0) or 0))
        optimizer = _unwrap(optimizer)
        # The Trainer built its scheduler before this call, and a warmup scheduler has
        # already set the LR to its first value (0 for a linear warmup): attach from
        # the configured LR, which torch's schedulers keep as ``initial_lr``.
        for group in optimizer.param_groups:
            if "initial_lr" in group:
                group["lr"] = group["initial_lr"]
        self.controller = Controller(optimizer, **options)
        self._take_over(kwargs.get("lr_scheduler"))

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.controller is None:
            return
        self._flush(state)
        self.controller.close()

    # -- per step --------------------------------------------------------------------------
    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._flush(state)
        if self.controller is not None and self.controller.should_stop:
            control.should_training_stop = True

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._pending = {"loss": None, "grad_norm": None}

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None,
               **kwargs: Any) -> None:
        if self._pending is None or not logs:
            return
        for key in ("loss", "grad_norm"):
            value = logs.get(key)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                self._pending[key] = float(value)

    def on_evaluate(self, args: Any, state: Any, control: Any,
                    metrics: dict[str, Any] | None = None, **kwargs: Any) -> None:
        if self.controller is None or not metrics:
            return
        numbers = {k.replace("/", "_"): float(v) for k, v in metrics.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool)
                   and math.isfinite(float(v))}
        if "eval_loss" in numbers:
            numbers["val_loss"] = numbers["eval_loss"]
        self.controller.report(**numbers)

    # -- internals -------------------------------------------------------------------------
    def _flush(self, state: Any) -> None:
        """Send the statistics of every optimizer step finished since the last call."""
        if self.controller is None or self._pending is None:
            return
        pending, self._pending = self._pending, None
        # A step with no logged loss still counts: it advances the schedules.
        self.controller.step(pending["loss"], grad_norm=pending["grad_norm"])

    def _take_over(self, scheduler: Any) -> None:
        controller = self.controller
        if scheduler is None or controller is None:
            return

        def step(*_: Any, **__: Any) -> None:
            scheduler._last_lr = controller.lr

        def get_last_lr() -> list[float]:
            return controller.lr

        scheduler.step = step
        scheduler.get_last_lr = get_last_lr
        scheduler._last_lr = controller.lr


def _unwrap(optimizer: Any) -> Any:
    """The torch optimizer inside accelerate's ``AcceleratedOptimizer``.

    The wrapper subclasses ``torch.optim.Optimizer`` without running its
    ``__init__``, so registering the hook's pre-step hook on it raises; its
    ``param_groups`` are the inner optimizer's, so attaching to the inner one
    changes the same LRs.
    """
    inner = getattr(optimizer, "optimizer", None)
    while inner is not None and hasattr(inner, "param_groups"):
        optimizer, inner = inner, getattr(inner, "optimizer", None)
    return optimizer
