"""A NaN/inf step never reaches the weights in the README's own loop (async, one line).

The loop below is the README's quick start, as written: no ``should_skip``
check, no ``sync=True``. A NaN is injected into the loss, or an inf into one
gradient, and every parameter must stay finite while the run goes on.
"""

from __future__ import annotations

import math
import select
import warnings
from collections.abc import Callable

import pytest
import torch
from daemon_helpers import ControllerProc

import lrctl

OPTIMIZERS: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "sgd": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9),
    "adam": lambda p: torch.optim.Adam(p, lr=3e-3),
    "adamw": lambda p: torch.optim.AdamW(p, lr=3e-3),
}
BAD_STEPS = (40, 41, 70)


def _data(seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(8, 1, generator=g)
    out = []
    for _ in range(120):
        x = torch.randn(16, 8, generator=g)
        out.append((x, x @ w + 0.01 * torch.randn(16, 1, generator=g)))
    return out


def _finite(model: torch.nn.Module) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in model.parameters())


def _readme_loop(opt_name: str, poison: str, **attach: object) -> tuple[bool, list[float],
                                                                      lrctl.Controller]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    loss_fn = torch.nn.MSELoss()
    optimizer = OPTIMIZERS[opt_name](model.parameters())
    ctl = lrctl.attach(optimizer, policy=None, **attach)   # once
    always_finite = True
    losses = []
    for step, (x, y) in enumerate(_data()):
        loss = loss_fn(model(x), y)
        if poison == "loss" and step in BAD_STEPS:
            loss = loss * math.nan
        optimizer.zero_grad()
        loss.backward()
        if poison == "grad" and step in BAD_STEPS:
            next(model.parameters()).grad[0, 0] = math.inf
        ctl.step(loss)              # ← the one line
        optimizer.step()
        always_finite = always_finite and _finite(model)
        losses.append(float(loss.detach()))
    ctl.close()
    return always_finite, losses, ctl


@pytest.mark.parametrize("poison", ["loss", "grad"])
@pytest.mark.parametrize("opt_name", sorted(OPTIMIZERS))
def test_readme_loop_skips_non_finite_steps(controller: ControllerProc, opt_name: str,
                                             poison: str) -> None:
    finite, losses, ctl = _readme_loop(opt_name, poison)
    assert finite, "a non-finite step reached the weights"
    assert all(math.isfinite(v) for v in losses[80:]), "the run did not recover"
    assert losses[-1] < losses[0]
    assert ctl._guard.skipped == len(BAD_STEPS)
    skips = sorted({d.step for d in ctl.decisions if d.action == "skip"})
    assert skips == list(BAD_STEPS), skips  # each skip is on the record


def test_guard_works_without_a_controller(short_dir: object) -> None:
    """Fail-open keeps the protection: it does not depend on the controller."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        finite, _, ctl = _readme_loop("adamw", "loss", spawn=False,
                                      socket="/nonexistent/lrctl.sock")
    assert finite and ctl._guard.skipped == len(BAD_STEPS)


def test_a_loop_that_skips_itself_does_not_lose_the_next_step(controller: ControllerProc) -> None:
    model = torch.nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ctl = lrctl.attach(opt, policy=None, sync=True)
    stepped = []
    for step in range(6):
        opt.zero_grad()
        loss = model(torch.ones(2, 4)).sum() * (math.nan if step == 2 else 1.0)
        loss.backward()
        ctl.step(loss)
        if ctl.should_skip:       # the loop honours the skip itself ...
            continue
        before = model.weight.detach().clone()
        opt.step()                # ... so the guard must not skip this (good) step
        stepped.append(not torch.equal(before, model.weight))
    ctl.close()
    assert stepped == [True] * 5 and _finite(model)


def test_an_async_spike_verdict_does_not_skip_the_next_good_step(
        controller: ControllerProc) -> None:
    """An adversarial pass's find: async, a loss spike at step 40 (the step has run by the
    time the verdict comes) set should_skip during step 41's step(): a loop honouring it
    skipped step 41, a good one. Only a verdict on the step being taken sets it."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    ctl = lrctl.attach(opt, policy="default", timeout=10.0)
    skipped = []
    for step in range(50):
        opt.zero_grad()
        loss = (model(torch.randn(8, 4)) ** 2).mean() + 1.0
        loss.backward()
        if step == 40:  # every answer in: step 40's report says its LRs, nothing is read
            assert ctl._link.wait(lambda: ctl._acked >= ctl._reported, 10.0)
        ctl.step(loss.detach() * (1000.0 if step == 40 else 1.0))
        if ctl.should_skip:
            skipped.append(step)
            continue
        opt.step()
        if step == 40:  # the verdict on step 40 has come: step 41's step() reads it
            select.select([ctl._link._sock], [], [], 10.0)
    ctl.close()
    spike = [d for d in ctl.decisions if d.action == "skip" and d.step == 40]
    assert spike and spike[0].evidence.get("advisory")  # the verdict came, advisory
    assert skipped == []


def test_warns_when_called_after_optimizer_step(controller: ControllerProc) -> None:
    model = torch.nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ctl = lrctl.attach(opt, policy=None)
    with pytest.warns(RuntimeWarning, match="runs after optimizer.step"):
        for _ in range(3):
            opt.zero_grad()
            model(torch.ones(2, 4)).sum().backward()
            opt.step()
            ctl.step(1.0)
    assert not ctl._guard.enabled  # it does not skip a step it has not seen yet
    ctl.close()


def test_warns_once_when_no_gradient_exists(controller: ControllerProc) -> None:
    model = torch.nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ctl = lrctl.attach(opt, policy=None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            ctl.step(1.0)  # before any backward()
    ctl.close()
    messages = [str(w.message) for w in caught if "no gradients" in str(w.message)]
    assert len(messages) == 1 and "after loss.backward()" in messages[0]


def test_close_unwraps_the_optimizer(controller: ControllerProc) -> None:
    opt = torch.optim.SGD(torch.nn.Linear(2, 1).parameters(), lr=0.1)
    ctl = lrctl.attach(opt, policy=None)
    assert "step" in vars(opt)
    ctl.close()
    assert "step" not in vars(opt)


def test_a_skipped_step_holds_the_lrs_it_would_have_used(controller: ControllerProc) -> None:
    """The guard skips step t's optimizer step: the param groups still hold the answer to
    t - 1 then (the hook awaits it, as at any other step), not whichever answer happened
    to be in. The controller is stopped while steps t - 1 and t are reported, so that
    answer is certainly still on its way when the skipped step comes; it goes on while
    ``step()`` of the skipped step awaits that answer (before its report says the LRs)."""
    import signal
    import threading

    from daemon_helpers import POLICIES

    policy = str(POLICIES / "rangetest.yaml")  # its sweep moves the LR every step
    engine = lrctl.load_policy(policy, [0.1])
    param = torch.nn.Parameter(torch.ones(2))
    opt = torch.optim.SGD([param], lr=0.1)
    with lrctl.attach(opt, policy=policy, spawn=False, timeout=30.0) as ctl:
        for t in range(10):
            param.grad = torch.ones(2)
            ctl.step(1.0, grad_norm=1.0)
            opt.step()
            expected = engine.observe(t, 1.0, 1.0)
        assert controller.proc is not None and ctl._link is not None
        assert ctl._link.wait(lambda: ctl._acked >= 9, 30.0)  # the answer to step 9: in
        controller.proc.send_signal(signal.SIGSTOP)
        try:
            param.grad = torch.ones(2)
            ctl.step(1.0, grad_norm=1.0)  # step 10
            expected_at_11 = engine.observe(10, 1.0, 1.0)
            opt.step()
            assert [opt.param_groups[0]["lr"]] == expected
            resume = threading.Timer(0.3, controller.proc.send_signal, (signal.SIGCONT,))
            resume.start()
            ctl.step(math.nan, grad_norm=1.0)  # step 11: skipped by the guard
            resume.join()
        finally:
            controller.proc.send_signal(signal.SIGCONT)
        before = param.detach().clone()
        opt.step()
        assert torch.equal(param, before)  # skipped
        assert [opt.param_groups[0]["lr"]] == expected_at_11 != expected


@pytest.mark.parametrize("make", [
    lambda p: torch.optim.LBFGS(p, lr=0.5, max_iter=4),
    lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True),
], ids=["lbfgs", "sgd-nesterov"])
def test_a_skipped_closure_step_returns_the_closures_loss(
        controller: ControllerProc, make: Callable[..., torch.optim.Optimizer]) -> None:
    """torch's documented closure loop, ``loss = opt.step(closure)``, then ``loss.item()``:
    a step the guard skipped returned None, and the loop crashed on the NaN it was
    protecting it from (found by an adversarial pass). It returns the closure's loss,
    evaluated as the step would have, and the weights are untouched."""
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 1)
    optimizer = make(model.parameters())
    (x, y), = _data()[:1]
    poison = [False]

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        if poison[0]:
            loss = loss * math.nan
        loss.backward()
        return loss

    with lrctl.attach(optimizer, policy=None, spawn=False) as ctl:
        for step in range(8):
            poison[0] = step == 5
            ctl.step(closure())
            before = [p.detach().clone() for p in model.parameters()]
            loss = optimizer.step(closure)
            assert isinstance(loss, torch.Tensor), (step, loss)
            assert math.isnan(loss.item()) == (step == 5)
            if step == 5:
                after = list(model.parameters())
                assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))
        assert _finite(model) and ctl._guard.skipped == 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_device_verdict_zeroes_every_gradient_bit_for_bit(dtype: torch.dtype) -> None:
    """The device way of the guard (CUDA, a non-fused optimizer; run here on CPU tensors,
    where the same ops run): a bad verdict leaves every gradient +0.0, a NaN, an inf and a
    transposed view's too, and a sparse gradient's values (an embedding's), and a good one
    leaves them bit for bit."""
    from lrctl._guard import zero_grads_unless

    def grads() -> tuple[torch.optim.Optimizer, list[torch.Tensor]]:
        g = torch.Generator().manual_seed(1)
        dense = [torch.randn(5, 7, generator=g).to(dtype), torch.randn(3, generator=g).to(dtype)]
        params = [torch.nn.Parameter(torch.zeros_like(d)) for d in dense]
        params[0].grad = dense[0].t().contiguous().t()  # a non-contiguous gradient
        params[1].grad = dense[1]
        params[1].grad[1] = math.nan
        params[1].grad[2] = math.inf
        sparse = torch.nn.Parameter(torch.zeros(4))
        sparse.grad = torch.sparse_coo_tensor([[1, 3]], [math.nan, 2.0], (4,),
                                              check_invariants=True)
        return torch.optim.SGD([*params, sparse], lr=0.1), [*params, sparse]

    opt, params = grads()
    before = [p.grad.clone() for p in params]
    zero_grads_unless(torch, torch.tensor(True), opt)
    for p, b in zip(params[:2], before[:2], strict=True):
        assert torch.equal(p.grad.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))
    opt, params = grads()
    zero_grads_unless(torch, torch.tensor(False), opt)
    for p in params:
        dense = p.grad.to_dense()
        assert torch.equal(dense, torch.zeros_like(dense)) and not dense.signbit().any()
