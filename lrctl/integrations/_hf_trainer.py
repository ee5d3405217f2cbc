"""What the Hugging Face callback needs from the ``Trainer`` itself.

Callbacks are handed the model, the optimizer and the scheduler, never the
Trainer; and the Trainer shows them a step's loss and grad norm only when it
logs (every ``logging_steps``), the loss averaged over the logging window and a
NaN/inf loss replaced by the average of earlier ones (``logging_nan_inf_filter``).
lrctl needs both at every optimizer step, before the update, as they really
were. So :func:`find_trainer` finds the Trainer whose ``train()`` is calling
the callback, and for the length of that ``train()``:

* :class:`StepTaps` records what ``training_step`` returns (the loss the
  Trainer backpropagated, already divided for gradient accumulation: summed
  over a step's micro-batches it is the step's loss, the number the Trainer
  logs with ``logging_steps=1``, before its NaN filter) and what
  ``_get_grad_norm`` returns (the pre-clip norm the Trainer logs).
* :class:`TrainerSchedule` takes the Trainer's ``lr_scheduler`` slot.

Both are instance attributes of that Trainer, put back as they were when
training ends; no class is patched.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from types import FrameType
from typing import Any

__all__ = ["StepTaps", "TrainerSchedule", "find_trainer", "metric_driven"]

_ABSENT = object()


def find_trainer() -> Any | None:
    """The ``transformers.Trainer`` whose method is on the call stack (``train()``), or None.

    Callback events are dispatched by the Trainer's own methods, so while a
    callback runs, an enclosing frame's ``self`` is the Trainer (a subclass, such
    as TRL's, included).
    """
    from transformers import Trainer

    frame: FrameType | None = sys._getframe(1)
    while frame is not None:
        candidate = frame.f_locals.get("self")
        if isinstance(candidate, Trainer):
            return candidate
        frame = frame.f_back
    return None


class StepTaps:
    """The loss and grad norm of the optimizer step in progress, taken from the Trainer.

    Values stay tensors (no device sync); :meth:`take` hands them over and
    starts the next step.
    """

    def __init__(self, trainer: Any) -> None:
        self.trainer = trainer
        self._loss: Any = None  # the sum of this step's micro-batch losses
        self._grad_norm: Any = None
        self._saved: list[tuple[str, Any, Any]] = []  # (name, what was there, our tap)
        self._tap("training_step", self._on_training_step)
        #: False on a Trainer without ``_get_grad_norm`` (not transformers 5.x): the
        #: caller then lets the hook compute the norm (after clipping).
        self.grad_norm_tapped = self._tap("_get_grad_norm", self._on_grad_norm)

    def take(self) -> tuple[Any, Any]:
        """(loss, grad norm) of the step about to update the weights; None where unknown."""
        loss, grad_norm = self._loss, self._grad_norm
        self._loss = self._grad_norm = None
        return loss, grad_norm

    def remove(self) -> None:
        """Put the Trainer's attributes back as they were (ours only, if still in place)."""
        while self._saved:
            name, before, tap = self._saved.pop()
            if self.trainer.__dict__.get(name) is not tap:
                continue  # someone replaced our tap since: leave theirs
            if before is _ABSENT:
                del self.trainer.__dict__[name]
            else:
                self.trainer.__dict__[name] = before

    # -- internals -----------------------------------------------------------------------
    def _tap(self, name: str, record: Callable[[Any], None]) -> bool:
        original = getattr(self.trainer, name, None)
        if not callable(original):
            return False

        def tap(*args: Any, **kwargs: Any) -> Any:
            out = original(*args, **kwargs)
            record(out)
            return out

        self._saved.append((name, self.trainer.__dict__.get(name, _ABSENT), tap))
        self.trainer.__dict__[name] = tap
        return True

    def _on_training_step(self, loss: Any) -> None:
        if loss is None:
            return
        value = loss.detach() if hasattr(loss, "detach") else loss
        self._loss = value if self._loss is None else self._loss + value

    def _on_grad_norm(self, grad_norm: Any) -> None:
        self._grad_norm = grad_norm


class TrainerSchedule:
    """The Trainer's ``lr_scheduler`` while lrctl runs: the Trainer's own one, held.

    A module-level class with plain-data state: the Trainer saves
    ``lr_scheduler.state_dict()`` into every checkpoint with ``torch.save`` and
    loads it back with ``weights_only=True``.

    * ``step()``: with ``keep=False`` (lrctl's LRs are the LRs) the Trainer's
      scheduler still counts its steps, but the LRs it writes are taken back at
      once; with ``keep=True`` (``base="loop"``) it sets the LR as usual and
      lrctl scales that.
    * ``get_last_lr()``: the LRs the last optimizer step used, so the
      ``learning_rate`` the Trainer logs is lrctl's.
    * ``state_dict()`` / ``load_state_dict()``: the Trainer's scheduler's own, so a
      checkpoint resumes with or without lrctl.
    """

    def __init__(self, inner: Any, lrs: Callable[[], list[float]], keep: bool) -> None:
        self.inner = inner
        self.keep = keep
        self._lrs = lrs

    def step(self, *args: Any, **kwargs: Any) -> None:
        if metric_driven(self.inner) and not args and not kwargs:
            return  # a ReduceLROnPlateau-style scheduler steps only with a metric
        if self.keep:
            self.inner.step(*args, **kwargs)
            return
        groups = self.inner.optimizer.param_groups
        held = [group["lr"] for group in groups]
        values = [float(lr) for lr in held]  # a tensor LR may be filled in place
        self.inner.step(*args, **kwargs)
        for group, lr, value in zip(groups, held, values, strict=True):
            if hasattr(lr, "fill_"):
                lr.fill_(value)
            group["lr"] = lr

    def get_last_lr(self) -> list[float]:
        return self._lrs()

    def state_dict(self) -> dict[str, Any]:
        return dict(self.inner.state_dict())

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.inner.load_state_dict(state_dict)

    def __getattr__(self, name: str) -> Any:
        # last_epoch, base_lrs, optimizer…: the Trainer's scheduler answers.
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)


def metric_driven(scheduler: Any) -> bool:
    """A scheduler stepped with a metric (``ReduceLROnPlateau``, transformers' ``GreedyLR``),
    which the Trainer steps after evaluation rather than every step."""
    torch = sys.modules.get("torch")
    plateau = getattr(getattr(getattr(torch, "optim", None), "lr_scheduler", None),
                      "ReduceLROnPlateau", ())
    return isinstance(scheduler, plateau) or type(scheduler).__name__ == "GreedyLR"
