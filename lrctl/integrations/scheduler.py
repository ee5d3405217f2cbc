"""``lrctl.Scheduler``: lrctl behind torch's ``LRScheduler`` interface.

For code that wants a scheduler object (``step()``, ``get_last_lr()``,
``state_dict()``): call ``scheduler.step(loss)`` once per optimizer step, after
``optimizer.step()`` as with any torch scheduler. The LR it returns is in effect
for the next step, as with torch's schedulers. ``scheduler.report(val_loss=…)``
sends named metrics (plateau decay or early stopping on them), and
``scheduler.should_stop`` is set by a ``stop`` decision (early stopping, or a
divergence the guard gave up on): end the loop then.

torch's order (``step()`` after ``optimizer.step()``) means a NaN/inf step has reached
the weights before lrctl sees it: the hook's local skip of such steps needs
``lrctl.attach`` with ``ctl.step(loss)`` before ``optimizer.step()``. The scheduler
says nothing about the order it is documented to be called in.

``state_dict()`` holds the hook's state (``ctl.state_dict()``, under ``"lrctl"``), so
``load_state_dict()`` rejoins the run exactly, as ``attach(..., resume=state)`` does;
``close()`` (or a ``with`` block) ends the run.
"""

from __future__ import annotations

from typing import Any, cast

from torch import Tensor
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

from ..hook import STATE_FORMAT, Controller

__all__ = ["Scheduler"]


class Scheduler(LRScheduler):
    """A torch ``LRScheduler`` whose LRs come from an lrctl controller.

    Keyword arguments go to :func:`lrctl.attach` (``policy``, ``run_name``,
    ``sync``, ``socket``, ``spawn``…). ``step(metrics)`` takes the step's loss
    (a tensor or a float), or nothing for a step with no loss to report.
    """

    def __init__(self, optimizer: Optimizer, **attach_options: Any) -> None:
        # LRScheduler.__init__ would take a first step of its own and wrap
        # optimizer.step; the controller owns the LR, so set up only what the
        # interface promises.
        self.optimizer = optimizer
        self.controller = Controller(optimizer, **attach_options)
        self.controller._after_order_expected = True  # torch's order: see the module doc
        self.base_lrs = [float(g.get("initial_lr", g["lr"])) for g in optimizer.param_groups]
        self.last_epoch = self.controller.steps_taken  # a resume's start_step
        self._last_lr = _lrs(self.controller.lr)

    def step(self, metrics: Any = None, epoch: None = None) -> None:  # type: ignore[override]
        """Report this step's loss (``metrics``) and apply the latest LRs."""
        if epoch is not None:
            raise TypeError("lrctl.Scheduler counts steps itself; step(epoch=...) is not supported")
        self.controller.step(metrics)
        self.last_epoch += 1
        self._last_lr = _lrs(self.controller.lr)

    def report(self, **metrics: Any) -> None:
        """Named metrics (``val_loss=0.31``), sent with the next step's observation."""
        self.controller.report(**metrics)

    def get_lr(self) -> list[float]:  # type: ignore[override]
        return self.controller.lr

    def get_last_lr(self) -> list[float]:  # type: ignore[override]
        return [float(lr) for lr in self._last_lr]

    @property
    def should_stop(self) -> bool:
        return self.controller.should_stop

    @property
    def should_skip(self) -> bool:
        return self.controller.should_skip

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint needs: where this run stands, and the hook's state
        (``ctl.state_dict()``: the run's policies as of this step)."""
        return {"last_epoch": self.last_epoch, "run_key": self.controller.run_key,
                "lrs": self.controller.lr, "lrctl": self.controller.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Rejoin the run ``state_dict`` saved (before the first ``step()``): exactly, from
        the hook's state it holds; a state saved by an earlier lrctl, without one, rejoins
        by run key at its ``last_epoch``, from the controller's own state of the run."""
        hook_state = state_dict.get("lrctl")
        if hook_state is None:
            hook_state = {"format": STATE_FORMAT, "run_key": state_dict["run_key"],
                          "step": int(state_dict["last_epoch"]),
                          "initial_lrs": list(self.controller._initial)}
        self.controller.load_state_dict(hook_state)
        self.last_epoch = self.controller.steps_taken
        self._last_lr = _lrs(self.controller.lr)

    def close(self, end_run: bool = True) -> None:
        """End the run (``end_run=False``: leave it resumable), as ``ctl.close`` does."""
        self.controller.close(end_run=end_run)

    def __enter__(self) -> Scheduler:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        self.close(end_run=exc_type is None)  # a crash leaves the run resumable


def _lrs(values: list[float]) -> list[float | Tensor]:
    """Our float LRs typed as torch declares ``LRScheduler._last_lr``."""
    return cast("list[float | Tensor]", values)
