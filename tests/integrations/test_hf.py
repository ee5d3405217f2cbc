"""The Hugging Face callback against a real ``Trainer`` and a real controller.

What a user relies on: every optimizer step is observed with the loss and the
pre-clip grad norm the Trainer computed, whatever ``logging_steps`` is; the LR
each update uses is lrctl's and is what the Trainer logs; lrctl's step numbers
are the Trainer's; a NaN loss never reaches the weights, although the Trainer
logs it as a finite number; and ``base="loop"`` keeps the Trainer's schedule.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from hf_common import LR, UsedLR, logged, make_trainer, stdlib_bytes, tiny_gpt2, training_args
from integ_common import EARLYSTOP, POLICY, check_early_stop
from live_controller import REPO, LiveController
from transformers import Trainer, get_linear_schedule_with_warmup

import lrctl
import lrctl.hook
from lrctl.integrations.hf import LrctlCallback

STEPS = 24
SCHEDULE_WARNING = "the Trainer's schedule"


def run(tmp_path: Path, callback: LrctlCallback, logging_steps: int = 1,
        trainer_class: type[Trainer] = Trainer, **overrides: Any) -> tuple[Trainer, UsedLR]:
    used = UsedLR()
    trainer = make_trainer(tmp_path / f"out-{logging_steps}", STEPS, [callback, used],
                           trainer_class=trainer_class, logging_steps=logging_steps,
                           **overrides)
    trainer.train()
    return trainer, used


def test_every_step_is_observed_whatever_logging_steps(
        controller: LiveController, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    computed: list[int] = []
    real_norm = lrctl.hook.total_grad_norm

    def counting_norm(optimizer: Any) -> Any:
        computed.append(1)
        return real_norm(optimizer)

    monkeypatch.setattr(lrctl.hook, "total_grad_norm", counting_norm)
    runs: dict[int, list[float]] = {}
    for logging_steps in (1, 10, 500):
        callback = LrctlCallback(policy=POLICY, timeout=10.0, run_name=f"hf-log{logging_steps}")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer, used = run(tmp_path, callback, logging_steps)
        assert sorted(used.used) == list(range(1, STEPS + 1))
        schedule_warnings = [w for w in caught if SCHEDULE_WARNING in str(w.message)]
        assert len(schedule_warnings) == 1, "the replaced linear warmup schedule: warned once"
        # It names the script's line (trainer.train(), in run() here), not lrctl's or the
        # Trainer's: it named the callback's own line in lrctl/integrations/hf.py.
        assert schedule_warnings[0].filename == __file__
        runs[logging_steps] = [used.used[s] for s in range(1, STEPS + 1)]
        ctl = callback.controller
        assert ctl is not None and ctl.total_steps == STEPS
        if logging_steps == 1:
            logs = logged(trainer)
            decisions = ctl.decisions
    assert not computed, "the callback computed a grad norm of its own"
    # The LRs depend on the losses and grad norms observed; identical LRs mean the same
    # observations at every step, however rarely the Trainer logs.
    assert runs[10] == runs[1]
    assert runs[500] == runs[1]

    # With logging_steps=1 the Trainer logs every step's loss and grad norm, and the LR
    # that step used: lrctl's.
    used_lrs = runs[1]
    assert [logs[s]["learning_rate"] for s in range(1, STEPS + 1)] == used_lrs
    # An in-process engine fed those, numbered as the Trainer numbers them, gives the
    # same LRs and the same decisions at the same steps. Async: a decision from step s
    # is in effect at step s + 1.
    engine = lrctl.load_policy(POLICY, base_lrs=[LR, LR])
    expected = [engine.applied_lrs[0]]
    for s in range(1, STEPS):
        expected.append(engine.observe(s, logs[s]["loss"], grad_norm=logs[s]["grad_norm"])[0])
    engine.observe(STEPS, logs[STEPS]["loss"], grad_norm=logs[STEPS]["grad_norm"])
    assert used_lrs == pytest.approx(expected, rel=1e-12)
    assert [(d.step, d.policy, d.action) for d in decisions] == \
        [(d.step, d.policy, d.action) for d in engine.decisions]
    assert "plateau" in {d.kind for d in decisions}, "the grad-norm plateau should have cut"
    # The Trainer's linear warmup would start at 0: lrctl's range test starts at 10%.
    assert used_lrs[0] == pytest.approx(LR * 0.1)
    assert len(set(used_lrs)) > STEPS // 2, "the policy should move the LR every step"


NAN_STEP = 7  # the step, as the Trainer logs it, whose loss is NaN


class NanLossTrainer(Trainer):
    """A Trainer whose loss is NaN at one step (a bad batch, an fp overflow)."""

    def compute_loss(self, model: Any, inputs: Any, return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> Any:
        loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        if model.training and self.state.global_step + 1 == NAN_STEP:
            loss = loss * float("nan")
        return loss


def test_a_nan_loss_never_reaches_the_weights(controller: LiveController,
                                              tmp_path: Path) -> None:
    callback = LrctlCallback(policy=REPO / "policies" / "default.yaml", timeout=10.0,
                             run_name="hf-nan")
    trainer, used = run(tmp_path, callback, trainer_class=NanLossTrainer,
                        lr_scheduler_type="constant", warmup_steps=0)

    for name, param in trainer.model.named_parameters():
        assert torch.isfinite(param).all(), name
    # The update of the NaN step was skipped: AdamW took one step fewer on every weight.
    assert sorted(used.used) == [s for s in range(1, STEPS + 1) if s != NAN_STEP]
    optimizer = trainer.optimizer.optimizer  # inside accelerate's AcceleratedOptimizer
    assert {int(s["step"]) for s in optimizer.state.values()} == {STEPS - 1}
    # The Trainer logs a finite stand-in for that loss (logging_nan_inf_filter)...
    logs = logged(trainer)
    assert math.isfinite(logs[NAN_STEP]["loss"])
    # ...while lrctl saw the NaN, at the step number the Trainer uses for it.
    ctl = callback.controller
    assert ctl is not None
    at_nan = [d for d in ctl.decisions if d.step == NAN_STEP]
    assert {d.action for d in at_nan} >= {"skip", "backoff"}
    assert [(d.evidence["statistic"], d.evidence["value"]) for d in at_nan
            if d.action == "backoff"] == [("loss", "nan")]  # JSON's spelling of NaN
    assert all(d.step == NAN_STEP for d in ctl.decisions)  # the only incident
    # The back-off is in effect from the next step (async).
    assert used.used[NAN_STEP + 1] == pytest.approx(used.used[NAN_STEP - 1] * 0.5)


PLATEAU = """\
version: 1
policies:
  - kind: plateau
    metric: grad_norm
    patience: 1
    factor: 0.8
    threshold: 0.0
"""


def test_base_loop_keeps_the_trainers_schedule_and_scales_it(
        controller: LiveController, tmp_path: Path) -> None:
    callback = LrctlCallback(policy=PLATEAU, timeout=10.0, run_name="hf-loop", base="loop")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer, used = run(tmp_path, callback, save_strategy="steps", save_steps=12)
    assert sorted(used.used) == list(range(1, STEPS + 1))
    assert not [w for w in caught if SCHEDULE_WARNING in str(w.message)]

    # The Trainer's own schedule: linear warmup over 3 steps, then linear decay to 0.
    reference = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=LR)
    hf_schedule = get_linear_schedule_with_warmup(reference, 3, STEPS)
    schedule = []
    for _ in range(STEPS):
        schedule.append(reference.param_groups[0]["lr"])
        reference.step()
        hf_schedule.step()
    # lrctl's multiplier: the plateau's cuts, a decision from step s in effect at s + 1.
    logs = logged(trainer)
    engine = lrctl.load_policy(PLATEAU, base_lrs=[LR])
    multiplier = [1.0]
    for s in range(1, STEPS):
        multiplier.append(engine.observe(s, logs[s]["loss"], grad_norm=logs[s]["grad_norm"])[0]
                          / LR)
    assert min(multiplier) < 1.0, "the plateau should have cut at least once"
    expected = [lr * m for lr, m in zip(schedule, multiplier, strict=True)]
    assert [used.used[s] for s in range(1, STEPS + 1)] == pytest.approx(expected, rel=1e-12)
    assert [logs[s]["learning_rate"] for s in range(1, STEPS + 1)] == \
        pytest.approx(expected, rel=1e-12)
    # The checkpoint holds the Trainer's own scheduler, as torch.load reads it back.
    saved = torch.load(tmp_path / "out-1" / "checkpoint-12" / "scheduler.pt", weights_only=True)
    assert saved["last_epoch"] == 12


def test_restore_callback_states_rebuilds_the_callback_from_its_checkpoint(
        controller: LiveController, tmp_path: Path) -> None:
    """With restore_callback_states_from_checkpoint=True the Trainer replaces the callback
    it was given by one built from the checkpoint's saved options (JSON: a path becomes
    text, a token is never written); that one rejoins the checkpoint's lrctl run."""
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY)
    first = LrctlCallback(policy=policy, timeout=10.0, run_name="hf-restore", token="secret")
    make_trainer(tmp_path / "out", 8, [first], save_strategy="steps", save_steps=4).train()
    assert first.controller is not None
    text = (tmp_path / "out" / "checkpoint-4" / "trainer_state.json").read_text()
    assert "secret" not in text

    given = LrctlCallback(policy=PLATEAU, timeout=10.0)
    second = make_trainer(tmp_path / "out", 8, [given],
                          restore_callback_states_from_checkpoint=True)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "lrctl: the controller has no state for run")
        second.train(resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-4"))
    rebuilt = [cb for cb in second.callback_handler.callbacks if isinstance(cb, LrctlCallback)]
    assert len(rebuilt) == 1 and rebuilt[0] is not given
    assert rebuilt[0].attach_options == {"policy": str(policy), "timeout": 10.0,
                                         "run_name": "hf-restore"}
    assert rebuilt[0].controller is not None
    assert rebuilt[0].controller.run_key == first.controller.run_key
    assert rebuilt[0].controller.steps_taken == 9  # steps 5..8 after the checkpoint's 4


def test_gradient_accumulation_observes_the_whole_steps_loss(
        controller: LiveController, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two micro-batches per update: lrctl sees the loss the Trainer logs for the update
    (the sum of what training_step returned, already divided for accumulation)."""
    observed: list[float] = []
    real_step = lrctl.hook.Controller.step

    def spy(self: Any, loss: Any = None, grad_norm: Any = None, **kwargs: Any) -> None:
        observed.append(float(loss))
        real_step(self, loss, grad_norm, **kwargs)

    monkeypatch.setattr(lrctl.hook.Controller, "step", spy)
    callback = LrctlCallback(policy=PLATEAU, timeout=10.0, run_name="hf-accum")
    trainer = make_trainer(tmp_path / "out", 8, [callback], gradient_accumulation_steps=2,
                           per_device_train_batch_size=4, lr_scheduler_type="constant",
                           warmup_steps=0)
    trainer.train()
    logs = logged(trainer)
    assert observed == pytest.approx([logs[s]["loss"] for s in range(1, 9)], rel=1e-6)


def test_an_early_stop_ends_the_trainer(controller: LiveController, tmp_path: Path) -> None:
    args = training_args(tmp_path / "out", STEPS, eval_strategy="steps", eval_steps=3,
                         per_device_eval_batch_size=8, lr_scheduler_type="constant",
                         warmup_steps=0)
    callback = LrctlCallback(policy=EARLYSTOP, sync=True, timeout=10.0, run_name="hf-stop")
    trainer = Trainer(model=tiny_gpt2(2), args=args, train_dataset=stdlib_bytes(96),
                      eval_dataset=stdlib_bytes(16), callbacks=[callback])
    trainer.train()
    ctl = callback.controller
    assert ctl is not None and ctl.should_stop
    # eval_loss (as val_loss) reaches lrctl with the next step's statistics; the stop
    # ends the Trainer long before max_steps.
    check_early_stop(ctl.decisions, trainer.state.global_step, STEPS)


class _DivergedEvalTrainer(Trainer):
    """Its first evaluation is finite, the later ones NaN (a model that diverged)."""

    evaluations = 0

    def evaluate(self, *args: Any, **kwargs: Any) -> dict[str, float]:
        self.evaluations += 1
        metrics = {"eval_loss": 2.0 if self.evaluations == 1 else math.nan}
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control,
                                                         metrics=metrics)
        return metrics


def test_a_nan_eval_loss_counts_as_no_improvement(controller: LiveController,
                                                  tmp_path: Path) -> None:
    """An adversarial pass found it: the callback dropped non-finite metrics, so a
    diverged evaluation never reached early stopping and the Trainer ran to the end."""
    args = training_args(tmp_path / "out", STEPS, eval_strategy="steps", eval_steps=3,
                         lr_scheduler_type="constant", warmup_steps=0)
    policy = EARLYSTOP.replace("min_delta: 100.0", "min_delta: 0.0")
    callback = LrctlCallback(policy=policy, sync=True, timeout=10.0, run_name="hf-nan-eval")
    trainer = _DivergedEvalTrainer(model=tiny_gpt2(2), args=args,
                                   train_dataset=stdlib_bytes(96), eval_dataset=stdlib_bytes(16),
                                   callbacks=[callback])
    trainer.train()
    ctl = callback.controller
    assert ctl is not None and ctl.should_stop
    check_early_stop(ctl.decisions, trainer.state.global_step, STEPS)
