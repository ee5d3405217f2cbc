"""Real training loops against a real controller: the loop's own LR code, mixed precision,
gradient accumulation, and skips that are recorded being skips that happen.

Every loop here is async (the README's default) unless it says otherwise.
"""

from __future__ import annotations

import copy
import math
import warnings
from typing import Any

import pytest
import torch
from daemon_helpers import ControllerProc

import lrctl
from lrctl._hook_link import PolicyRejected
from lrctl._torchutil import total_grad_norm, unscaled_norm

# A guard that backs off at once on a non-finite loss and regrows only much later: a
# NaN at step NAN_AT halves every LR from NAN_AT + 1 on, within these short runs.
GUARD = {"version": 1, "policies": [{"kind": "divergence", "factor": 0.5, "cooldown": 5,
                                      "regrow_after": 1000, "min_samples": 8}]}
NAN_AT = 12
STEPS = 40
# Exactness is what these tests check, not fail-open: on a loaded machine an answer may
# take longer than the default 1 s, after which the hook would carry on without it.
SLOW_OK = 60.0


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 12), torch.nn.Tanh(), torch.nn.Linear(12, 1))


def _batches(n: int, batch: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(6, 1, generator=g)
    out = []
    for _ in range(n):
        x = torch.randn(batch, 6, generator=g)
        out.append((x, x @ w + 0.05 * torch.randn(batch, 1, generator=g)))
    return out


def _lr_used(optimizer: torch.optim.Optimizer) -> list[float]:
    """Record the LR of group 0 at each optimizer step taken. A post-step hook: it sees
    the LR the step used, after every pre-step hook (a pre-step hook registered before
    attach would run before lrctl's, and miss an answer that lrctl's waits for)."""
    used: list[float] = []
    optimizer.register_step_post_hook(lambda opt, *_: used.append(opt.param_groups[0]["lr"])
                                      and None)
    return used


def _cosine(it: int, base: float = 0.05, warmup: int = 5, total: int = STEPS) -> float:
    """nanoGPT's get_lr."""
    if it < warmup:
        return base * (it + 1) / (warmup + 1)
    ratio = (it - warmup) / (total - warmup)
    return 0.1 * base + 0.5 * (1 + math.cos(math.pi * ratio)) * 0.9 * base


def _loop(ctl: lrctl.Controller | None, optimizer: torch.optim.Optimizer,
          model: torch.nn.Module, *, loop_lr: Any = None, scheduler: Any = None,
          nan_at: int | None = NAN_AT) -> None:
    loss_fn = torch.nn.MSELoss()
    for it, (x, y) in enumerate(_batches(STEPS, 16)):
        if loop_lr is not None:
            for group in optimizer.param_groups:
                group["lr"] = loop_lr(it)
        loss = loss_fn(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        if ctl is not None:
            ctl.step(loss * math.nan if it == nan_at else loss)
        optimizer.step()
        if scheduler is not None:
            scheduler.step()


def _decaying(it: int) -> float:
    return 1.0 / (1 + 0.1 * it)


def _lambda_lrs(lam: Any, lr: float = 0.05) -> list[float]:
    """The LR of each of STEPS steps under torch's LambdaLR alone: the reference."""
    reference = torch.optim.SGD(_model().parameters(), lr=lr)
    ref_sched = torch.optim.lr_scheduler.LambdaLR(reference, lam)
    lrs = []
    for _ in range(STEPS):
        lrs.append(reference.param_groups[0]["lr"])
        reference.step()
        ref_sched.step()
    return lrs


def test_loop_mode_scales_the_loops_own_cosine(controller: ControllerProc) -> None:
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=_cosine(0))
    with lrctl.attach(optimizer, policy=GUARD, base="loop", timeout=SLOW_OK) as ctl:
        used = _lr_used(optimizer)  # after attach: sees the LR lrctl set
        _loop(ctl, optimizer, model, loop_lr=_cosine)
        backoffs = [d for d in ctl.decisions if d.action == "backoff"]
    assert [d.step for d in backoffs] == [NAN_AT]
    assert len(used) == STEPS - 1  # the NaN step was skipped by the hook
    steps = [s for s in range(STEPS) if s != NAN_AT]
    for s, lr in zip(steps, used, strict=True):
        want = _cosine(s) * (0.5 if s > NAN_AT else 1.0)
        assert lr == pytest.approx(want, rel=1e-12), (s, lr, want)


def test_runs_shows_the_loops_lr_scaled_under_base_loop(controller: ControllerProc) -> None:
    """A newcomer's find: ``lrctl runs`` showed 0.1, the LR at attach, while the loop's
    LambdaLR had it at 0.01 (``runs --all`` showed 0.01)."""
    from lrctl.client import request

    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: 0.1 if it >= 5 else 1.0)
    with lrctl.attach(optimizer, policy=GUARD, base="loop", sync=True,
                      timeout=SLOW_OK) as ctl:
        _loop(ctl, optimizer, model, scheduler=scheduler, nan_at=None)
        [row] = [r for r in request({"t": "runs"})["runs"] if r["run"] == ctl.run_key]
    assert row["lrs"] == [pytest.approx(0.01)]


def test_loop_mode_keeps_a_torch_scheduler_exact(controller: ControllerProc) -> None:
    """LambdaLR and a chainable StepLR keep computing from their own LRs: lrctl's multiplier
    applies only inside the optimizer step."""
    lam = _decaying
    model = _model()
    ref_lrs = _lambda_lrs(lam)

    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lam)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "something else set the LR", no torch warning
        with lrctl.attach(optimizer, policy=GUARD, base="loop", timeout=SLOW_OK) as ctl:
            used = _lr_used(optimizer)
            _loop(ctl, optimizer, model, scheduler=scheduler)
    steps = [s for s in range(STEPS) if s != NAN_AT]
    for s, lr in zip(steps, used, strict=True):
        assert lr == pytest.approx(ref_lrs[s] * (0.5 if s > NAN_AT else 1.0), rel=1e-12)
    assert scheduler.get_last_lr()[0] == pytest.approx(lam(STEPS) * 0.05, rel=1e-12)

    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=10, gamma=0.5)
    with lrctl.attach(optimizer, policy=GUARD, base="loop", timeout=SLOW_OK) as ctl:
        used = _lr_used(optimizer)  # after attach: sees the LR lrctl set
        _loop(ctl, optimizer, model, scheduler=scheduler)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.05 * 0.5 ** 4)  # StepLR's own
    assert used[-1] == pytest.approx(0.05 * 0.5 ** 3 * 0.5)  # step 39: StepLR × back-off


def test_loop_mode_scales_a_warmup_from_zero_made_before_attach(
        controller: ControllerProc) -> None:
    """HF's linear warmup pattern: LambdaLR from 0, made before attach, so the group holds
    LR 0 at attach. The run's initial LR was read as 0, and a multiplier over 0 could not
    apply: the back-off was recorded and the LR used stayed the loop's (found by an
    adversarial pass). The schedule's reference, initial_lr, is the run's initial LR."""
    def lam(it: int) -> float:
        return min(1.0, it / 10)
    ref_lrs = _lambda_lrs(lam)
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lam)
    assert optimizer.param_groups[0]["lr"] == 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # (no "LR 0 at attach" either: it has initial_lr)
        with lrctl.attach(optimizer, policy=GUARD, base="loop", timeout=SLOW_OK) as ctl:
            used = _lr_used(optimizer)
            _loop(ctl, optimizer, model, scheduler=scheduler)
            assert [d.step for d in ctl.decisions if d.action == "backoff"] == [NAN_AT]
    steps = [s for s in range(STEPS) if s != NAN_AT]
    for s, lr in zip(steps, used, strict=True):
        assert lr == pytest.approx(ref_lrs[s] * (0.5 if s > NAN_AT else 1.0), rel=1e-12), s


@pytest.mark.parametrize("base", ["loop", "controller"])
def test_a_cpu_tensor_lr_written_by_a_scheduler_is_seen(
        controller: ControllerProc, base: str) -> None:
    """A tensor LR (torch's pattern for compiled optimizers) was never read back: under
    base="loop" a StepLR's cut was overwritten by a stale base (the LR went back up 5x at
    the back-off), and under base="controller" the scheduler's LR was used while the record
    said lrctl's (found by an adversarial pass). A CPU tensor is read back like a float."""
    def run(lr: object) -> tuple[list[float], int]:
        torch.manual_seed(0)
        model = _model()
        optimizer = torch.optim.Adam(model.parameters(), lr=lr)  # type: ignore[arg-type]
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=7, gamma=0.1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # (controller mode warns of the scheduler)
            with lrctl.attach(optimizer, policy=GUARD, base=base, timeout=SLOW_OK) as ctl:
                used: list[float] = []
                optimizer.register_step_post_hook(
                    lambda opt, *_: used.append(float(opt.param_groups[0]["lr"])) and None)
                _loop(ctl, optimizer, model, scheduler=scheduler)
        return used, ctl.foreign_lr_writes

    floats, float_writes = run(1e-3)
    tensors, tensor_writes = run(torch.tensor(1e-3, dtype=torch.float64))
    assert tensors == pytest.approx(floats, rel=1e-12)
    assert tensor_writes == float_writes
    if base == "controller":
        assert float_writes > 0  # the scheduler's writes, seen and overwritten
    else:
        assert floats[-1] == pytest.approx(1e-3 * 0.1 ** 5 * 0.5)  # StepLR x back-off
    single, single_writes = run(torch.tensor(1e-3))  # float32: its own precision
    assert single == pytest.approx(floats, rel=1e-6)
    assert single_writes == float_writes  # (no false foreign writes from the rounding)


def test_loop_mode_with_a_zero_lr_and_no_schedule_says_its_multipliers_cannot_act(
        controller: ControllerProc) -> None:
    optimizer = torch.optim.SGD(_model().parameters(), lr=0.0)
    with pytest.warns(RuntimeWarning, match="LR 0 at attach") as caught:
        lrctl.attach(optimizer, policy=GUARD, base="loop", timeout=SLOW_OK).close()
    said = [str(w.message) for w in caught if "LR 0 at attach" in str(w.message)]
    assert len(said) == 1 and "param group 0" in said[0] and "initial_lr" in said[0]


def test_a_scheduler_created_after_attach_wraps_the_guarded_step(
        controller: ControllerProc) -> None:
    """The usual order in a script (attach, then build the scheduler): torch's scheduler
    wraps ``optimizer.step.__func__``, so the guard must be a bound method; its wrapper
    then calls through the guard, which still skips the NaN step. A newcomer found that
    this order crashed in ``LRScheduler.__init__``."""
    lam = _decaying
    ref_lrs = _lambda_lrs(lam)

    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch's "lr_scheduler.step() before" warning too
        with lrctl.attach(optimizer, policy=GUARD, base="loop", timeout=SLOW_OK) as ctl:
            scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lam)
            used = _lr_used(optimizer)
            _loop(ctl, optimizer, model, scheduler=scheduler)
    assert len(used) == STEPS - 1  # the NaN step skipped, through the scheduler's wrapper
    steps = [s for s in range(STEPS) if s != NAN_AT]
    for s, lr in zip(steps, used, strict=True):
        assert lr == pytest.approx(ref_lrs[s] * (0.5 if s > NAN_AT else 1.0), rel=1e-12)
    # Detached: the scheduler's wrapper stays (it is on top) and steps the optimizer.
    before = [p.detach().clone() for p in model.parameters()]
    model(torch.ones(1, 6)).sum().backward()
    optimizer.step()
    assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters(), strict=True))


def test_controller_mode_overwrites_a_leftover_loop_and_says_so(
        controller: ControllerProc) -> None:
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    with (pytest.warns(RuntimeWarning, match=r"something else set the LR.*base='loop'"),
          lrctl.attach(optimizer, policy=GUARD, timeout=SLOW_OK) as ctl):
        used = _lr_used(optimizer)
        _loop(ctl, optimizer, model, loop_lr=_cosine)
    # The LR used is lrctl's (0.05, halved after the NaN), never the leftover cosine.
    steps = [s for s in range(STEPS) if s != NAN_AT]
    for s, lr in zip(steps, used, strict=True):
        assert lr == pytest.approx(0.05 * (0.5 if s > NAN_AT else 1.0), rel=1e-12), s
    # Every iteration wrote the LR; only a write of the very value lrctl had set is unseen.
    assert ctl.foreign_lr_writes == sum(
        _cosine(s) != 0.05 * (0.5 if s > NAN_AT else 1.0) for s in range(STEPS))


def test_a_grad_scaler_overflow_is_not_divergence(controller: ControllerProc) -> None:
    """An fp16 loop whose scaler starts far too high: its first steps overflow, the scaler
    skips them and lowers its scale; lrctl counts them and backs off on none."""
    model = _model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 120, growth_interval=1000)
    loss_fn = torch.nn.MSELoss()
    with lrctl.attach(optimizer, scaler=scaler) as ctl:  # the default policy
        for x, y in _batches(30, 16):
            with torch.autocast("cpu", dtype=torch.float16):
                loss = loss_fn(model(x).float(), y)
            optimizer.zero_grad()
            scaler.scale(loss).backward()
            ctl.step(loss)
            scaler.step(optimizer)
            scaler.update()
        decisions = ctl.decisions
        lrs = ctl.lr
    assert ctl.overflows >= 4, ctl.overflows  # 2^120 → 2^16 takes a few halvings
    assert scaler.get_scale() < 2.0 ** 120
    assert not [d for d in decisions if d.action in ("backoff", "skip", "stop")], decisions
    assert lrs == [1e-3]
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())


def test_the_grad_norm_is_unscaled() -> None:
    """With the scaler known, the norm the hook reports is the true gradients' norm."""
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    x, y = _batches(1, 16)[0]
    loss = torch.nn.functional.mse_loss(model(x), y)
    scaler.scale(loss).backward()
    scaled = float(total_grad_norm(optimizer))
    norm = float(unscaled_norm(scaler, optimizer, total_grad_norm(optimizer)))
    assert norm == pytest.approx(scaled / 1024.0, rel=1e-6)
    scaler.unscale_(optimizer)  # the loop unscaled: no second division
    assert float(unscaled_norm(scaler, optimizer, total_grad_norm(optimizer))) == pytest.approx(
        scaled / 1024.0, rel=1e-6)


def test_a_grown_scale_is_no_overflow(controller: ControllerProc) -> None:
    """An adversarial pass's find: a GradScaler whose scale grew large (bf16, or a long
    run with no overflow: it doubles every growth_interval steps) made the norm of the
    still-scaled gradients inf in float32 (the squares overflow past ~1e19): every step
    was read as an overflow, none carried a grad norm. The norm is now summed wide."""
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 70, growth_interval=10 ** 6)
    loss_fn = torch.nn.MSELoss()
    with lrctl.attach(optimizer, scaler=scaler, sync=True, timeout=SLOW_OK) as ctl:
        for x, y in _batches(12, 16):
            optimizer.zero_grad()
            scaler.scale(loss_fn(model(x), y)).backward()
            ctl.step(loss_fn(model(x), y).detach())
            scaler.step(optimizer)
            scaler.update()
    assert scaler.get_scale() == 2.0 ** 70  # nothing overflowed
    assert ctl.overflows == 0
    x, y = _batches(1, 16)[0]
    optimizer.zero_grad()
    scaler.scale(loss_fn(model(x), y)).backward()
    wide = float(unscaled_norm(scaler, optimizer, total_grad_norm(optimizer, wide=True)))
    optimizer.zero_grad()
    loss_fn(model(x), y).backward()
    assert wide == pytest.approx(float(total_grad_norm(optimizer)), rel=1e-5)


def test_every_n_with_a_scaler_reports_non_finite_steps_between_reports(
        controller: ControllerProc) -> None:
    """An adversarial pass's find: with every=4 and a GradScaler, a NaN loss between two
    reports was neither reported nor recorded (no skip, no back-off), and a run of
    overflows between reports (the scaler skipping steps) was taken for gradient
    accumulation and warned about."""
    model = _model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 16, growth_interval=10 ** 6)
    loss_fn = torch.nn.MSELoss()
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        with lrctl.attach(optimizer, scaler=scaler, every=4, timeout=SLOW_OK) as ctl:
            for step, (x, y) in enumerate(_batches(60, 16)):
                loss = loss_fn(model(x), y) * (math.nan if step == 41 else 1.0)
                optimizer.zero_grad()
                scaler.scale(loss).backward()
                if 10 <= step < 18:  # the scaler skips these (inf gradients)
                    next(model.parameters()).grad.view(-1)[0] = math.inf
                ctl.step(loss.detach())
                scaler.step(optimizer)
                scaler.update()
    assert not [w for w in said if "several times between" in str(w.message)]
    actions = {(d.step, d.action) for d in ctl.decisions}
    assert {(41, "skip"), (41, "backoff")} <= actions


def _accumulated_run(micro: int, batch: int) -> tuple[list[tuple[int, str]], list[float]]:
    """One run of 4 × 8 or 1 × 32 samples per optimizer step, on the same data."""
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    data = _batches(STEPS, 32)
    loss_fn = torch.nn.MSELoss()
    with lrctl.attach(optimizer, policy=GUARD, timeout=SLOW_OK) as ctl:
        used = _lr_used(optimizer)
        for it, (x, y) in enumerate(data):
            optimizer.zero_grad()
            total = torch.zeros(())
            for k in range(micro):
                xs, ys = x[k * batch:(k + 1) * batch], y[k * batch:(k + 1) * batch]
                loss = loss_fn(model(xs), ys) / micro
                loss.backward()
                total += loss.detach()
            ctl.step(total * math.nan if it == NAN_AT else total)
            optimizer.step()
        return [(d.step, d.action) for d in ctl.decisions], used


def test_gradient_accumulation_gives_the_same_decisions(controller: ControllerProc) -> None:
    one, lrs_one = _accumulated_run(1, 32)
    four, lrs_four = _accumulated_run(4, 8)
    assert one == four and (NAN_AT, "backoff") in one
    assert lrs_one == lrs_four


@pytest.mark.parametrize("micro_batches", [2, 3, 4])
@pytest.mark.parametrize("every", [1, 4])
def test_step_per_micro_batch_warns(controller: ControllerProc, micro_batches: int,
                                    every: int) -> None:
    """A newcomer found no warning with 2 or 3 micro-batches (nanoGPT's default is 2):
    it needed three extra calls between two optimizer steps."""
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    with (pytest.warns(RuntimeWarning, match="once per optimizer step"),
          lrctl.attach(optimizer, policy=GUARD, timeout=SLOW_OK, every=every) as ctl):
        for it, (x, y) in enumerate(_batches(6 * micro_batches, 8)):
            loss = torch.nn.functional.mse_loss(model(x), y)
            loss.backward()
            ctl.step(loss)  # wrong: every micro-batch
            if it % micro_batches == micro_batches - 1:
                optimizer.step()
                optimizer.zero_grad()
        assert ctl.steps_taken == 6 * micro_batches  # each call counted one step


def test_one_step_per_optimizer_step_with_some_skipped_does_not_warn(
        controller: ControllerProc) -> None:
    """A loop that skips an optimizer step now and then (its own check) is no
    accumulation: an extra call in one interval, not in three in a row."""
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with lrctl.attach(optimizer, policy=GUARD, timeout=SLOW_OK) as ctl:
            for it, (x, y) in enumerate(_batches(30, 8)):
                optimizer.zero_grad()
                loss = torch.nn.functional.mse_loss(model(x), y)
                loss.backward()
                ctl.step(loss)
                if it % 5 != 4:  # every fifth step skipped by the loop itself
                    optimizer.step()


@pytest.mark.parametrize("sync", [False, True])
def test_a_skip_of_a_step_that_ran_before_it_was_reported_is_recorded_as_advisory(
        controller: ControllerProc, sync: bool) -> None:
    """An audit probe's find: with ``ctl.step()`` after ``optimizer.step()`` a NaN step
    had reached the weights (and a sync spike's step had run) when the controller's
    ``skip`` came, yet the journal and MLflow said the step was skipped."""
    policy = {"version": 1, "policies": [{"kind": "divergence", "skip_spikes": True,
                                          "tolerance": 5, "min_samples": 8,
                                          "z_threshold": 4.0}]}
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    bad = {12: math.nan, 20: 1000.0}
    from lrctl.wire.compact import COMPACT_BIT

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # (the hook warns of the order)
        with lrctl.attach(optimizer, policy=policy, sync=sync, timeout=SLOW_OK) as ctl:
            assert ctl._link is not None
            sent, frames = ctl._link.send_obs, []

            def counting(step: int, frame: bytes) -> None:
                frames.append(bool(int.from_bytes(frame[:4], "big") & COMPACT_BIT))
                sent(step, frame)

            ctl._link.send_obs = counting  # type: ignore[method-assign]
            for it, (x, y) in enumerate(_batches(30, 16)):
                loss = torch.nn.functional.mse_loss(model(x), y)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                ctl.step(loss * bad.get(it, 1.0))
            hello: dict[str, object] = {}
            ctl._link.refresh_hello(hello)  # a reconnect's hello says the order at once
            assert hello.get("ran") is True
    # The order is said once (the first report), then the compact frames go on (JSON
    # where they must: the NaN step's).
    assert frames[0] is False and frames.count(False) <= 2, frames
    skips = {d.step: d for d in ctl.decisions if d.action == "skip"}
    assert 12 in skips and (20 in skips or not sync), ctl.decisions
    for d in skips.values():
        assert d.evidence.get("advisory") is True, d
        assert "runs after optimizer.step()" in d.reason


def test_a_sync_spike_skip_is_carried_out(controller: ControllerProc) -> None:
    """``skip_spikes`` in sync mode: the controller's verdict arrives before the optimizer
    step, and the hook carries it out (the parameters do not move on that step)."""
    policy = {"version": 1, "policies": [{"kind": "divergence", "skip_spikes": True,
                                          "tolerance": 5, "min_samples": 8,
                                          "z_threshold": 4.0}]}
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    moved = []
    with lrctl.attach(optimizer, policy=policy, sync=True) as ctl:
        for it, (x, y) in enumerate(_batches(30, 16)):
            loss = torch.nn.functional.mse_loss(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            ctl.step(loss * 1000 if it == 20 else loss)
            before = [p.detach().clone() for p in model.parameters()]
            optimizer.step()
            moved.append(any(not torch.equal(a, p) for a, p in zip(
                before, model.parameters(), strict=True)))
        skips = [d for d in ctl.decisions if d.action == "skip"]
    assert [d.step for d in skips] == [20]
    assert "advisory" not in skips[0].reason
    assert moved[20] is False and all(moved[:20]) and all(moved[21:])


# A guard that moves the LR often (spikes flagged at a low z, fast regrowth): a resumed run
# that did not continue from the exact policy state would drift at once.
JUMPY = {"version": 1, "policies": [{"kind": "divergence", "z_threshold": 1.5,
                                      "min_samples": 8, "window": 16, "tolerance": 0,
                                      "cooldown": 2, "regrow_after": 4, "factor": 0.7,
                                      "max_backoffs": 1000, "min_multiplier": 1e-4}]}
RESUME_AT, RAN_ON, TOTAL = 30, 42, 60


def _attach_recording(optimizer: torch.optim.Optimizer, used: dict[int, float],
                      clock: list[int], **options: Any) -> lrctl.Controller:
    ctl = lrctl.attach(optimizer, policy=JUMPY, timeout=SLOW_OK, **options)
    optimizer.register_step_pre_hook(
        lambda opt, *_: used.__setitem__(clock[0], opt.param_groups[0]["lr"]))
    return ctl


def _run_steps(ctl: lrctl.Controller, model: torch.nn.Module,
               optimizer: torch.optim.Optimizer, steps: range, clock: list[int]) -> None:
    loss_fn = torch.nn.MSELoss()
    data = _batches(TOTAL, 16, seed=3)
    for it in steps:
        clock[0] = it
        x, y = data[it]
        optimizer.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        ctl.step(loss)
        optimizer.step()


@pytest.mark.parametrize("order", ["attach-resume", "attach-then-load",
                                   "optimizer-first-then-load"])
def test_resume_from_the_users_checkpoint_continues_the_exact_lrs(
        controller: ControllerProc, order: str) -> None:
    """A run checkpointed at step 30 that ran on to step 42 and died, resumed from the
    checkpoint, uses at steps 30..59 exactly the LRs an uninterrupted run used."""
    clock = [0]
    ref_used: dict[int, float] = {}
    model = _model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
    with _attach_recording(optimizer, ref_used, clock) as ctl:
        _run_steps(ctl, model, optimizer, range(TOTAL), clock)
        assert sum(d.action in ("backoff", "regrow") for d in ctl.decisions) >= 4

    used: dict[int, float] = {}
    model = _model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
    ctl = _attach_recording(optimizer, used, clock)
    _run_steps(ctl, model, optimizer, range(RESUME_AT), clock)
    checkpoint = {"model": {k: v.clone() for k, v in model.state_dict().items()},
                  "optimizer": copy.deepcopy(optimizer.state_dict()),
                  "lrctl": ctl.state_dict()}
    assert checkpoint["lrctl"]["session"]["engine"]["last_step"] == RESUME_AT - 1
    _run_steps(ctl, model, optimizer, range(RESUME_AT, RAN_ON), clock)  # then it dies
    ctl.close(end_run=False)
    assert used == {k: v for k, v in ref_used.items() if k < RAN_ON}

    model = _model()
    model.load_state_dict(checkpoint["model"])
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
    if order == "attach-resume":
        ctl = _attach_recording(optimizer, used, clock, resume=checkpoint["lrctl"])
        optimizer.load_state_dict(checkpoint["optimizer"])
    elif order == "attach-then-load":
        ctl = _attach_recording(optimizer, used, clock)
        ctl.load_state_dict(checkpoint["lrctl"])
        optimizer.load_state_dict(checkpoint["optimizer"])
    else:  # the optimizer restored first: its groups hold the checkpoint's LRs
        optimizer.load_state_dict(checkpoint["optimizer"])
        ctl = _attach_recording(optimizer, used, clock)
        ctl.load_state_dict(checkpoint["lrctl"])
    with ctl:
        assert ctl.run_key == checkpoint["lrctl"]["run_key"]
        _run_steps(ctl, model, optimizer, range(RESUME_AT, TOTAL), clock)
    assert used == ref_used


def test_a_new_run_that_starts_at_step_n_gets_the_lrs_for_step_n(
        controller: ControllerProc) -> None:
    """A loop that numbers its first step 1 (the HF Trainer) gets schedule(1) first."""
    warmup = {"version": 1, "policies": [{"kind": "warmup", "steps": 10,
                                          "start_factor": 0.1}]}
    reference = lrctl.load_policy(warmup, base_lrs=[0.1])
    want = [reference.applied_lrs[0]] + [reference.observe(t, 1.0)[0] for t in range(4)]
    optimizer = torch.optim.SGD(_model().parameters(), lr=0.1)
    with lrctl.attach(optimizer, policy=warmup, start_step=3, timeout=SLOW_OK) as ctl:
        assert ctl.lr == [pytest.approx(want[3], rel=1e-12)]


def test_detaching_gives_a_scheduler_its_step_wrapper_back(controller: ControllerProc) -> None:
    optimizer = torch.optim.SGD(_model().parameters(), lr=0.1)
    torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: 1.0)
    wrapped = optimizer.__dict__.get("step")
    assert wrapped is not None  # torch's counting wrapper, on the instance
    with lrctl.attach(optimizer, policy=GUARD, timeout=SLOW_OK):
        assert optimizer.__dict__.get("step") is not wrapped  # the guard's, in front
    assert optimizer.__dict__.get("step") is wrapped


def test_metrics_are_credited_to_the_step_they_measured_and_the_last_ones_count(
        controller: ControllerProc) -> None:
    """A newcomer's finds: report() after step t travels with step t + 1's observation,
    so early stopping's ``best_step`` (``keep that checkpoint``) named t + 1, a step
    whose weights nobody saved; and the evaluation after the last step was never sent
    (no step followed it). Now the observation says which step the metrics measured,
    and a run that ends sends its last metrics on an observation of their own."""
    policy = {"version": 1, "policies": [
        {"kind": "earlystop", "metric": "val_loss", "patience": 1}]}
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    evals = {9: 1.0, 19: 0.5, 29: 0.9}  # the best after step 19; 29 is the last step
    with lrctl.attach(optimizer, policy=policy, timeout=SLOW_OK) as ctl:
        loss_fn = torch.nn.MSELoss()
        for it, (x, y) in enumerate(_batches(30, 16)):
            loss = loss_fn(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            ctl.step(loss)
            optimizer.step()
            if it in evals:
                ctl.report(val_loss=evals[it])
    stops = [d for d in ctl.decisions if d.action == "stop"]
    assert len(stops) == 1, ctl.decisions
    assert stops[0].evidence["best_step"] == 19
    assert stops[0].evidence["value"] == 0.9 and stops[0].step == 30  # after the last step


def test_early_stopping_on_a_metric_the_loop_names_otherwise_warns(
        controller: ControllerProc) -> None:
    """A loop that reports ``eval_loss`` (Hugging Face's name) to ``earlystop``, which
    watches ``val_loss``: it used to stay silently unarmed for the whole run."""
    from lrctl.policy._metric_watch import MISSING_AFTER

    opt = torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=0.1)
    with (pytest.warns(RuntimeWarning, match=r"policy earlystop: no val_loss .*eval_loss")
          as said, lrctl.attach(opt, policy="earlystop", spawn=False) as ctl):
        for step in range(MISSING_AFTER + 5):
            if step % 100 == 0:
                ctl.report(eval_loss=1.0)
            ctl.step(1.0, grad_norm=1.0)
            opt.step()
    # (earlystop.yaml's plateau decay watches val_loss too: each policy says it once)
    assert sum("policy plateau: no val_loss" in str(w.message) for w in said) == 1
    assert [(d.policy, d.action) for d in ctl.decisions] == [
        ("plateau", "metric_missing"), ("earlystop", "metric_missing")]
    assert opt.param_groups[0]["lr"] == 0.1


def test_two_hooks_under_one_active_mlflow_run_do_not_share_it(
        controller: ControllerProc, tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """A GAN's two optimizers inside ``mlflow.start_run()``: both hooks passed the active
    run, so both lrctl runs wrote into one MLflow run (params refused, LR charts and
    tags mixed). The first holds it; the second gets a run of its own, and says so."""
    mlflow = pytest.importorskip("mlflow")
    # (the environment only: mlflow.set_tracking_uri() would outlast this test in the
    # worker process, and every later hook there would pass its URI on)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    gen = torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=0.1)
    disc = torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=0.2)
    with mlflow.start_run() as run:
        with lrctl.attach(gen, spawn=False, run_name="G") as first:
            assert first._link.hello["mlflow"]["run_id"] == run.info.run_id
            with pytest.warns(RuntimeWarning, match="holds the decisions of run G-"):
                second = lrctl.attach(disc, spawn=False, run_name="D")
            assert second._link.hello["mlflow"]["run_id"] is None
            second.close()
        # Closed: the next hook may hold it again (one run after another in one MLflow run).
        with lrctl.attach(disc, spawn=False, run_name="D2") as third:
            assert third._link.hello["mlflow"]["run_id"] == run.info.run_id
        # An attach the controller refused never held it (its frame may live on).
        with pytest.raises(PolicyRejected, match="param group") as refused:
            lrctl.attach(gen, spawn=False, run_name="bad",  # (two min_lrs for one group)
                         policy={"version": 1, "policies": [{"kind": "plateau",
                                                             "min_lr": [0.0, 0.0]}]})
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            with lrctl.attach(gen, spawn=False, run_name="G2") as fourth:
                assert fourth._link.hello["mlflow"]["run_id"] == run.info.run_id
        del refused
