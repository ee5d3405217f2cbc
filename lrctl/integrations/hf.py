"""Hugging Face ``Trainer`` integration: ``LrctlCallback``.

    trainer = Trainer(model, args, train_dataset=ds,
                      callbacks=[LrctlCallback(policy="policies/default.yaml")])

What it does, and why this way:

* **Every optimizer step is observed, before the update**, whatever
  ``logging_steps`` is: the loss is what the Trainer's ``training_step``
  returned (summed over the step's micro-batches), the grad norm the pre-clip
  norm the Trainer computed; both stay on the device (no extra sync, no second
  norm). They are sent from ``on_pre_optimizer_step``, so the hook's guard can
  skip a NaN/inf step before it reaches the weights. The Trainer's own logs
  cannot serve: they come every ``logging_steps`` steps, after the update, with
  the loss averaged over the window and a NaN loss replaced
  (``logging_nan_inf_filter``). See :mod:`._hf_trainer` for how the callback
  reaches the Trainer.
* **The guard sits on the optimizer the Trainer steps**: accelerate's
  ``AcceleratedOptimizer``. With fp16 (a ``GradScaler``, CUDA) the scaler
  skips non-finite steps itself and must see each of them to lower its scale,
  so lrctl attaches to the torch optimizer inside and leaves those steps to it.
* **Step numbers are the Trainer's**: lrctl's step *s* is the optimizer step
  the Trainer logs as ``step`` *s* (``global_step`` after it): a decision at
  step *s*, the ``lrctl/lr/g0`` metric at *s* and the Trainer's ``loss`` and
  ``learning_rate`` at *s* are about the same update. The first step is 1.
* **Schedules.** By default lrctl's LRs are the LRs: the Trainer's
  ``lr_scheduler_type`` and warmup are not applied (a warning says so once)
  and lrctl starts from ``learning_rate``; put warmup and decay in the policy
  file. ``LrctlCallback(base="loop")`` keeps the Trainer's schedule and lets the
  policies scale it. Either way the Trainer's logged ``learning_rate`` is the LR
  the step used, and its checkpoints hold its own scheduler's state.
* **Checkpoints and resume.** The callback is a stateful callback
  (``ExportableState``): each checkpoint's ``trainer_state.json`` keeps the
  lrctl run (``ctl.state_dict()``: run key, step, initial LRs and, where the
  controller supports it, the policies' state); ``train(resume_from_checkpoint=
  ...)`` rejoins that run where the checkpoint left it. No Trainer option is
  needed (``restore_callback_states_from_checkpoint`` may stay off).
* ``eval_*`` metrics are reported (``eval_loss`` also as ``val_loss``); a
  ``stop`` decision sets ``control.should_training_stop``.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import warnings
from typing import Any

from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState

from .._callers import callers_level
from ..hook import Controller
from ._hf_trainer import StepTaps, TrainerSchedule, find_trainer, metric_driven

log = logging.getLogger("lrctl.integrations.hf")

__all__ = ["LrctlCallback"]

_STATE_KEY = "lrctl_checkpoint"
# Never written into a checkpoint's trainer_state.json: a secret, and the inputs of one
# particular resume (a callback rebuilt from a checkpoint resumes from that checkpoint).
_NOT_SAVED = frozenset({"token", "resume", "start_step"})


class LrctlCallback(TrainerCallback, ExportableState):
    """Attach the Trainer's optimizer to an lrctl controller.

    Keyword arguments go to :func:`lrctl.attach` (``policy``, ``run_name``,
    ``sync``, ``socket``, ``spawn``, ``base``…). ``base="loop"`` keeps the
    Trainer's ``lr_scheduler_type`` and warmup and lets the policies scale them.
    """

    def __init__(self, **attach_options: Any) -> None:
        self.attach_options = attach_options
        self.controller: Controller | None = None
        self._live = False  # attached, and not yet closed by on_train_end
        self._taps: StepTaps | None = None
        self._trainer: Any = None
        self._schedule: TrainerSchedule | None = None
        self._mlflow_run_id: str | None = None  # the MLflow run this lrctl run logs to
        self._warned: set[str] = set()

    # -- lifecycle -------------------------------------------------------------------------
    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        optimizer = kwargs.get("optimizer")
        if optimizer is None:
            raise RuntimeError("LrctlCallback: the Trainer passed no optimizer to on_train_begin")
        trainer = find_trainer()
        if trainer is None:
            raise RuntimeError("LrctlCallback: no transformers.Trainer is running this callback; "
                               "for another loop use lrctl.attach(optimizer) and ctl.step(loss)")
        if self._live:
            self._finish(end_run=False)  # a train() that raised left us attached
        keep = self.attach_options.get("base", "controller") == "loop"
        scaler = _enabled_scaler(optimizer)
        saved = _saved_checkpoint(state)
        taps = StepTaps(trainer)
        try:
            options = self._options(args, state, saved, scaler,
                                    compute_grad_norm=not taps.grad_norm_tapped)
            if options.get("snapshot_every") is not None and options.get("on_snapshot") is None:
                options.setdefault("model", kwargs.get("model"))  # its buffers roll back too
            self.controller = self._attach(optimizer, scaler, options, keep)
        except BaseException:
            taps.remove()
            raise
        self._taps, self._trainer, self._live = taps, trainer, True
        self._take_over(trainer, keep)
        self._note_mlflow(saved)
        if not keep:
            self._warn_schedule(args, state)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._finish(end_run=True)

    # -- per step --------------------------------------------------------------------------
    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        controller, taps = self.controller, self._taps
        if not self._live or controller is None or taps is None:
            return
        loss, grad_norm = taps.take()
        controller.step(loss, grad_norm=grad_norm)
        if controller.should_stop:
            control.should_training_stop = True

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self._live and self.controller is not None and self.controller.should_stop:
            control.should_training_stop = True

    def on_evaluate(self, args: Any, state: Any, control: Any,
                    metrics: dict[str, Any] | None = None, **kwargs: Any) -> None:
        if not self._live or self.controller is None or not metrics:
            return
        # A NaN eval_loss too (a diverged model): the policies count it as no improvement.
        numbers = {k.replace("/", "_"): float(v) for k, v in metrics.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if "eval_loss" in numbers:
            numbers["val_loss"] = numbers["eval_loss"]
        self.controller.report(**numbers)

    # -- checkpoints (ExportableState) -----------------------------------------------------
    def state(self) -> dict[str, Any]:
        """What the Trainer writes into each checkpoint's ``trainer_state.json``.

        ``args`` are the attach options that JSON can hold (never a ``token``, nor a
        ``resume``/``start_step``):
        with ``restore_callback_states_from_checkpoint=True`` the Trainer builds a
        new callback from them. ``attributes`` hold the lrctl run, which
        ``on_train_begin`` reads back from the restored Trainer state either way.
        """
        checkpoint = None
        if self._live and self.controller is not None:
            checkpoint = {"hook": self.controller.state_dict(),
                          "mlflow_run_id": self._mlflow_run_id}
        return {"args": _json_options(self.attach_options),
                "attributes": {_STATE_KEY: checkpoint}}

    # -- internals -------------------------------------------------------------------------
    def _options(self, args: Any, state: Any, saved: dict[str, Any] | None, scaler: Any,
                 compute_grad_norm: bool) -> dict[str, Any]:
        options: dict[str, Any] = {"run_name": getattr(args, "run_name", None),
                                   **self.attach_options, "compute_grad_norm": compute_grad_norm}
        if scaler is not None:
            options.setdefault("scaler", scaler)  # its overflows are not divergence
        max_steps = int(getattr(state, "max_steps", 0) or 0)
        if max_steps > 0:
            options.setdefault("total_steps", max_steps)  # for the anneal
        # lrctl's step s is the update the Trainer logs as step s: global_step after it.
        options.setdefault("start_step", int(getattr(state, "global_step", 0) or 0) + 1)
        if saved is not None:
            options.setdefault("resume", saved["hook"])
        return options

    @staticmethod
    def _attach(optimizer: Any, scaler: Any, options: dict[str, Any], keep: bool) -> Controller:
        """Attach to the optimizer the Trainer steps (the one inside it under a GradScaler,
        which must run its own skip-and-update on every step)."""
        # The Trainer built its scheduler before this call, and a warmup scheduler has
        # already set the LR to its first value (0 for a linear warmup): lrctl's run
        # starts from the configured LR, which torch's schedulers keep as initial_lr.
        groups = optimizer.param_groups
        scheduled = [group["lr"] for group in groups]
        for group in groups:
            if "initial_lr" in group:
                group["lr"] = group["initial_lr"]
        controller = Controller(optimizer if scaler is None else _inner(optimizer), **options)
        if keep:
            for group, lr in zip(groups, scheduled, strict=True):
                group["lr"] = lr  # this step's base: the Trainer's schedule, scaled by lrctl
        return controller

    def _take_over(self, trainer: Any, keep: bool) -> None:
        scheduler = getattr(trainer, "lr_scheduler", None)
        controller = self.controller
        if scheduler is None or controller is None or isinstance(scheduler, TrainerSchedule):
            return
        if keep and metric_driven(scheduler):
            return  # the Trainer steps it after evaluation only if it sees its own type
        self._schedule = TrainerSchedule(scheduler, lambda: controller.lr, keep)
        trainer.lr_scheduler = self._schedule
        trainer.callback_handler.lr_scheduler = self._schedule

    def _finish(self, end_run: bool) -> None:
        """Close the lrctl run and give the Trainer back its own attributes."""
        self._live = False
        if self._taps is not None:
            self._taps.remove()
            self._taps = None
        trainer, schedule = self._trainer, self._schedule
        if trainer is not None and schedule is not None:
            if trainer.lr_scheduler is schedule:
                trainer.lr_scheduler = schedule.inner
            if trainer.callback_handler.lr_scheduler is schedule:
                trainer.callback_handler.lr_scheduler = schedule.inner
        self._trainer = self._schedule = None
        if self.controller is not None:
            self.controller.close(end_run=end_run)

    def _note_mlflow(self, saved: dict[str, Any] | None) -> None:
        """Keep the MLflow run this lrctl run logs to: the Trainer's.

        The Trainer opens a new MLflow run on every resume (unless ``MLFLOW_RUN_ID``
        reattaches it); the controller follows it, ships the run's whole history
        there, and ends the interrupted job's run (KILLED, tagged
        ``lrctl.continued_in``), which that job left RUNNING.
        """
        active = _active_mlflow_run()
        before = saved.get("mlflow_run_id") if saved is not None else None
        self._mlflow_run_id = active or (before if isinstance(before, str) else None)
        if isinstance(before, str) and active is not None and active != before:
            log.info("lrctl: the resumed run follows the Trainer's new MLflow run %s; the "
                     "interrupted job's run %s is ended with lrctl.continued_in", active, before)

    def _warn_schedule(self, args: Any, state: Any) -> None:
        kind = getattr(args, "lr_scheduler_type", "constant")
        kind = str(getattr(kind, "value", kind))
        warmup = 0
        get_warmup = getattr(args, "get_warmup_steps", None)
        max_steps = int(getattr(state, "max_steps", 0) or 0)
        if callable(get_warmup) and max_steps > 0:
            warmup = int(get_warmup(max_steps))
        if kind == "constant" and warmup == 0:
            return
        self._warn_once("schedule", f"lrctl: the Trainer's schedule (lr_scheduler_type="
                                    f"{kind!r}, {warmup} warmup steps) is not applied: lrctl's "
                                    "policy sets the LR, starting from learning_rate. Put "
                                    "warmup and decay in the policy file (kind: warmup, kind: "
                                    "decay), or use LrctlCallback(base='loop') to keep the "
                                    "Trainer's schedule and have lrctl scale it")

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, RuntimeWarning, stacklevel=callers_level())


def _enabled_scaler(optimizer: Any) -> Any:
    """The ``GradScaler`` accelerate's optimizer wrapper steps through (fp16), or None."""
    scaler = getattr(optimizer, "scaler", None)
    if scaler is None or not getattr(scaler, "is_enabled", lambda: True)():
        return None
    return scaler


def _inner(optimizer: Any) -> Any:
    """The torch optimizer inside accelerate's ``AcceleratedOptimizer`` (its ``param_groups``
    are the inner one's, so both see the same LRs)."""
    inner = getattr(optimizer, "optimizer", None)
    while inner is not None and hasattr(inner, "param_groups"):
        optimizer, inner = inner, getattr(inner, "optimizer", None)
    return optimizer


def _saved_checkpoint(state: Any) -> dict[str, Any] | None:
    """The lrctl run a resumed Trainer state carries (None on a fresh run)."""
    entry = (getattr(state, "stateful_callbacks", None) or {}).get(LrctlCallback.__name__)
    if isinstance(entry, list):  # several LrctlCallbacks: the first one's
        entry = entry[0] if entry else None
    attributes = entry.get("attributes") if isinstance(entry, dict) else None
    saved = attributes.get(_STATE_KEY) if isinstance(attributes, dict) else None
    return saved if isinstance(saved, dict) and isinstance(saved.get("hook"), dict) else None


def _json_options(options: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in options.items():
        if key in _NOT_SAVED:
            continue
        if isinstance(value, os.PathLike):
            value = os.fspath(value)
        try:
            json.dumps(value)
        except (TypeError, ValueError):
            continue  # e.g. a scaler object: not restorable from JSON
        out[key] = value
    return out


def _active_mlflow_run() -> str | None:
    mlflow = sys.modules.get("mlflow")  # only if the script (or the Trainer) loaded it
    if mlflow is None:
        return None
    try:
        run = mlflow.active_run()
    except Exception:
        return None
    return run.info.run_id if run is not None else None
