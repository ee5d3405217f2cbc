"""Lightning integration: ``LrctlCallback``.

    trainer = L.Trainer(callbacks=[LrctlCallback(policy="policies/default.yaml")])

* Attaches the first optimizer at ``on_train_start`` (no scheduler is needed;
  leave ``configure_optimizers`` returning just the optimizer). Not earlier:
  on a resume Lightning loads the optimizer's checkpointed state after
  ``on_fit_start``, and ``Optimizer.load_state_dict`` replaces the param-group
  dicts the hook would otherwise keep writing LRs into.
* Takes the grad norm in ``on_before_optimizer_step``, before Lightning clips
  the gradients (a device tensor: no synchronisation), and the loss from the
  training step's output, once per optimizer step (gradient accumulation aware).
* Reports the validation metrics Lightning collected (``val_loss``…) after
  each validation run.
* A ``stop`` decision sets ``trainer.should_stop``.
* Its state (the controller session, the step count and the initial LRs) goes
  into Lightning checkpoints; ``trainer.fit(ckpt_path=...)`` rejoins the same
  controller session and continues its step count and policy state.
* A fit that ends normally ends the controller session (the run is finished;
  its MLflow run is closed). A fit that ends in an exception (a crash, a
  preemption, Ctrl-C) only disconnects: the controller keeps the session, on
  disk if it is idle for long, for a resume to rejoin.
"""

from __future__ import annotations

import math
from typing import Any

import lightning.pytorch as pl

from .._torchutil import total_grad_norm
from ..hook import Controller

__all__ = ["LrctlCallback"]


class LrctlCallback(pl.Callback):
    """Keyword arguments go to :func:`lrctl.attach` (``policy``, ``run_name``, ``sync``…)."""

    def __init__(self, **attach_options: Any) -> None:
        self.attach_options = attach_options
        self.controller: Controller | None = None
        self._grad_norm: Any = None
        self._last_global_step = -1
        self._resume: dict[str, Any] | None = None
        self._initial_lrs: list[float] = []

    # -- lifecycle -------------------------------------------------------------------------
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.optimizers:
            raise RuntimeError("LrctlCallback: configure_optimizers returned no optimizer")
        optimizer = trainer.optimizers[0]
        options: dict[str, Any] = {"compute_grad_norm": False, **self.attach_options}
        total = _total_steps(trainer)
        if total is not None:
            options.setdefault("total_steps", total)  # for the anneal
        if self._resume is not None and self._resume.get("run_key"):
            options.setdefault("resume", self._resume["run_key"])
            options.setdefault("start_step", int(self._resume.get("step", 0)))
            # The controller knows a run by its policy and *initial* LRs, while the
            # restored optimizer holds the LRs of the step it stopped at: say the
            # initial ones; the welcome then puts the session's current LRs back.
            initial = self._resume.get("initial_lrs")
            if isinstance(initial, list) and len(initial) == len(optimizer.param_groups):
                for group, lr in zip(optimizer.param_groups, initial, strict=True):
                    group["lr"] = float(lr)
        self._initial_lrs = [float(g["lr"]) for g in optimizer.param_groups]
        self.controller = Controller(optimizer, **options)
        self._last_global_step = trainer.global_step

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.controller is not None:
            self.controller.close()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                     exception: BaseException) -> None:
        if self.controller is not None:
            self.controller.close(end_run=False)  # stay resumable

    # -- per step --------------------------------------------------------------------------
    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                                 optimizer: Any) -> None:
        if self.controller is not None and optimizer is self.controller.optimizer:
            self._grad_norm = total_grad_norm(optimizer)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.controller is None or trainer.global_step == self._last_global_step:
            return  # no optimizer step this batch (gradient accumulation)
        self._last_global_step = trainer.global_step
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        self.controller.step(loss, grad_norm=self._grad_norm)
        self._grad_norm = None
        if self.controller.should_stop:
            trainer.should_stop = True

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.controller is None or trainer.sanity_checking:
            return
        metrics = {}
        for name, value in trainer.callback_metrics.items():
            number = float(value)
            if math.isfinite(number):
                metrics[name.replace("/", "_")] = number
        if metrics:
            self.controller.report(**metrics)

    # -- checkpoints -----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        if self.controller is None:
            return dict(self._resume or {})
        return {"run_key": self.controller.run_key, "step": self.controller.steps_taken,
                "initial_lrs": list(self._initial_lrs)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._resume = dict(state_dict)


def _total_steps(trainer: pl.Trainer) -> int | None:
    """The run's optimizer steps, when Lightning can tell (not for an endless run)."""
    try:
        total = trainer.estimated_stepping_batches
    except Exception:  # no dataloader length, or a Lightning that cannot estimate
        return None
    if isinstance(total, (int, float)) and math.isfinite(total) and total >= 1:
        return int(total)
    return None
