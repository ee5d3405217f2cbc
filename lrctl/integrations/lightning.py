"""Lightning integration: ``LrctlCallback``.

    trainer = L.Trainer(callbacks=[LrctlCallback(policy="policies/default.yaml")])

* Attaches the first optimizer at ``on_train_start`` (no scheduler is needed;
  leave ``configure_optimizers`` returning just the optimizer). Not earlier:
  on a resume Lightning loads the optimizer's checkpointed state after
  ``on_fit_start``, and ``Optimizer.load_state_dict`` replaces the param-group
  dicts the hook would otherwise keep writing LRs into.
* Observes every optimizer step: the grad norm taken in
  ``on_before_optimizer_step``, before Lightning clips the gradients (a device
  tensor: no synchronisation), and the step's loss, the mean of its
  micro-batches' losses under gradient accumulation (the sum of the losses
  Lightning divides by ``accumulate_grad_batches``). Logging settings play no
  part.
* **Step numbers are Lightning's**: lrctl's step *t* is the batch Lightning
  runs at ``global_step`` *t* and logs ``self.log(...)`` values from at step
  *t*; the first is 0.
* **A NaN/inf step never reaches the weights.** Lightning calls
  ``optimizer.step(closure)`` and computes the loss *inside* it, so the hook's
  guard, which decides when ``step`` is called, cannot: the callback skips the
  update itself in ``on_before_optimizer_step`` when the grad norm is not
  finite (the gradients are dropped, as if the batch had not happened; on a
  device they are zeroed without a host sync). Under 16-bit AMP the
  ``GradScaler`` skips such steps itself and must see them, so the callback
  leaves them to it.
* Reports the validation metrics Lightning collected (``val_loss``…) after
  each validation run.
* A ``stop`` decision sets ``trainer.should_stop``.
* Its state (``ctl.state_dict()``: the run key, the step count, the initial
  LRs and, where the controller supports it, the policies' state) goes into
  Lightning checkpoints; ``trainer.fit(ckpt_path=...)`` rejoins the same
  controller run and continues its step count and policy state. Checkpoints
  written by lrctl 0.2's callback load too.
* A fit that ends normally ends the controller session (the run is finished;
  its MLflow run is closed). A fit that ends in an exception (a crash, a
  preemption, Ctrl-C) only disconnects: the controller keeps the session, on
  disk if it is idle for long, for a resume to rejoin.
"""

from __future__ import annotations

import math
import sys
import warnings
from typing import Any

import lightning.pytorch as pl

from .._torchutil import total_grad_norm
from ..hook import STATE_FORMAT, Controller

__all__ = ["LrctlCallback"]

# The hook's warning for a ctl.step() that comes after optimizer.step() says a NaN step has
# reached the weights; here the callback skips such steps itself (see the module notes).
_AFTER_STEP_WARNING = r"lrctl: ctl\.step\(\) runs after optimizer\.step\(\)"


class LrctlCallback(pl.Callback):
    """Keyword arguments go to :func:`lrctl.attach` (``policy``, ``run_name``, ``sync``…)."""

    def __init__(self, **attach_options: Any) -> None:
        self.attach_options = attach_options
        self.controller: Controller | None = None
        self.skipped = 0  # updates this callback skipped for a non-finite grad norm
        self._grad_norm: Any = None
        self._loss: Any = None  # the sum of this step's (normalised) micro-batch losses
        self._last_global_step = -1
        self._resume: dict[str, Any] | None = None
        self._first_step = True

    # -- lifecycle -------------------------------------------------------------------------
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.optimizers:
            raise RuntimeError("LrctlCallback: configure_optimizers returned no optimizer")
        optimizer = trainer.optimizers[0]
        options: dict[str, Any] = {"compute_grad_norm": False, **self.attach_options}
        total = _total_steps(trainer)
        if total is not None:
            options.setdefault("total_steps", total)  # for the anneal
        # lrctl's step t is the batch Lightning runs (and logs) at global_step t. A resume
        # continues from the checkpoint's step and initial LRs (the restored optimizer
        # holds the LRs of the step it stopped at, not the run's initial ones).
        options.setdefault("start_step", int(trainer.global_step))
        if options.get("snapshot_every") is not None and options.get("on_snapshot") is None:
            options.setdefault("model", pl_module)  # its buffers (BatchNorm) roll back too
        if self._resume is not None:
            options.setdefault("resume", self._resume)
            initial = self._resume.get("initial_lrs")
            if isinstance(initial, list) and len(initial) == len(optimizer.param_groups):
                # The hook writes the run's LRs over these at once; starting from the
                # initial ones, it does not take the restored ones for a foreign write.
                for group, lr in zip(optimizer.param_groups, initial, strict=True):
                    group["lr"] = float(lr)
        self.controller = Controller(optimizer, **options)
        self._last_global_step = trainer.global_step
        self._loss = self._grad_norm = None
        self._first_step = True

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
        if self.controller is None or optimizer is not self.controller.optimizer:
            return
        self._grad_norm = total_grad_norm(optimizer)
        if self._grad_norm is not None and getattr(trainer.precision_plugin, "scaler",
                                                   None) is None:
            self._drop_if_nonfinite(optimizer, self._grad_norm)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.controller is None:
            return
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if loss is not None:
            loss = loss.detach() if hasattr(loss, "detach") else loss
            self._loss = loss if self._loss is None else self._loss + loss
        if trainer.global_step == self._last_global_step:
            return  # no optimizer step this batch (gradient accumulation)
        self._last_global_step = trainer.global_step
        loss, grad_norm, self._loss, self._grad_norm = self._loss, self._grad_norm, None, None
        if self._first_step:
            self._first_step = False
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", _AFTER_STEP_WARNING)
                self.controller.step(loss, grad_norm=grad_norm)
        else:
            self.controller.step(loss, grad_norm=grad_norm)
        if self.controller.should_stop:
            trainer.should_stop = True

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.controller is None or trainer.sanity_checking:
            return
        metrics = {}
        for name, value in trainer.callback_metrics.items():
            # A NaN val_loss too (a diverged model): the policies count it as no improvement.
            metrics[name.replace("/", "_")] = float(value)
        if metrics:
            self.controller.report(**metrics)

    # -- checkpoints -----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        if self.controller is None:
            return dict(self._resume or {})
        return self.controller.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state = dict(state_dict)
        if "format" not in state and "run_key" in state:
            state["format"] = STATE_FORMAT  # written by lrctl 0.2: the same fields
        self._resume = state if state.get("run_key") else None

    # -- internals -------------------------------------------------------------------------
    def _drop_if_nonfinite(self, optimizer: Any, grad_norm: Any) -> None:
        """Skip this update if the grad norm is NaN/inf: the gradients never reach the weights.

        On the host the gradients are dropped (``None``): torch's optimizers then leave
        the parameters and their state alone, as if the batch had not happened. On a
        device the verdict stays there (no sync): the gradients are zeroed, so the
        weights stay finite, though momentum and weight decay still move them a little.
        """
        torch = sys.modules["torch"]
        if grad_norm.device.type == "cpu":
            if bool(torch.isfinite(grad_norm)):
                return
            self.skipped += 1
            for group in optimizer.param_groups:
                for param in group["params"]:
                    param.grad = None
            return
        finite = torch.isfinite(grad_norm)
        for group in optimizer.param_groups:
            for param in group["params"]:
                if param.grad is not None:
                    param.grad.copy_(torch.where(finite, param.grad,
                                                 torch.zeros_like(param.grad)))


def _total_steps(trainer: pl.Trainer) -> int | None:
    """The run's optimizer steps, when Lightning can tell (not for an endless run)."""
    try:
        total = trainer.estimated_stepping_batches
    except Exception:  # no dataloader length, or a Lightning that cannot estimate
        return None
    if isinstance(total, (int, float)) and math.isfinite(total) and total >= 1:
        return int(total)
    return None
