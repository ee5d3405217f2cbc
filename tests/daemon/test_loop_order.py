"""The loop's order, decided at the first ``ctl.step()``: an optimizer step someone else
took between ``attach()`` and that call is not the loop stepping first.

The hook tells a loop that calls ``ctl.step()`` after ``optimizer.step()`` (torch's
order: the NaN guard is off, with a warning) from one that calls it before (the
README's order: a non-finite step is skipped) by whether the optimizer has stepped by
its first ``step()``. A checkpoint loader that initialises the optimizer's state with a
step at LR 0 (torch's ``set_optimizer_state_dict`` on a fresh optimizer), or a burn-in
step, took one: the guard was turned off for the run, with a false warning. Such a step
is followed by a backward before the loop's first ``step()``; the loop's own step, in
torch's order, is not.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import pytest
import torch
from daemon_helpers import ControllerProc

import lrctl

ORDER_WARNING = "runs after optimizer.step"
# The loader sets the LRs to 0 for its step, which the hook takes for a foreign write.
LOADERS_LR = "ignore:.*something else set the LR:RuntimeWarning"
BAD_STEP = 20


def _model() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.Linear(4, 1))
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)


def _loss(model: torch.nn.Module) -> torch.Tensor:
    x = torch.randn(16, 8)
    return ((model(x) - x.sum(1, keepdim=True)) ** 2).mean()


def _finite(model: torch.nn.Module) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in model.parameters())


def _readme_loop(model: torch.nn.Module, opt: torch.optim.Optimizer, ctl: lrctl.Controller,
                 set_to_none: bool | None, steps: int = 40) -> None:
    """ctl.step(loss) between backward() and optimizer.step(); a NaN loss and gradient at
    BAD_STEP. ``set_to_none``: how the loop zeroes its gradients (None: it zeroes them at
    the end of the iteration, so the first backward adds to what was there)."""
    for t in range(steps):
        if set_to_none is not None:
            opt.zero_grad(set_to_none=set_to_none)
        loss = _loss(model)
        loss.backward()
        if t == BAD_STEP:
            loss = loss * float("nan")
            next(model.parameters()).grad.fill_(float("nan"))  # type: ignore[union-attr]
        ctl.step(loss)
        opt.step()
        if set_to_none is None:
            opt.zero_grad()


def _order_warnings(caught: list[warnings.WarningMessage]) -> list[str]:
    return [str(w.message) for w in caught if ORDER_WARNING in str(w.message)]


def _dcp_initialise(model: torch.nn.Module, opt: torch.optim.Optimizer) -> None:
    """torch's distributed-checkpoint loader on an optimizer with no state yet: it runs
    ``opt.step()`` once, with zero gradients and LR 0, to create the state it loads into."""
    dcp = pytest.importorskip("torch.distributed.checkpoint.state_dict")
    saved = dcp.get_optimizer_state_dict(model, torch.optim.AdamW(model.parameters(), lr=1e-2))
    dcp.set_optimizer_state_dict(model, opt, saved)


def _burn_in(model: torch.nn.Module, opt: torch.optim.Optimizer) -> None:
    """One step of the loop's own before it reports to lrctl (no zero_grad after it)."""
    _loss(model).backward()
    opt.step()


def _no_grad_step(model: torch.nn.Module, opt: torch.optim.Optimizer) -> None:
    """A step with no gradients at all (a warm-up call of ``step()``: it does nothing)."""
    opt.step()


STRAY: dict[str, Callable[[torch.nn.Module, torch.optim.Optimizer], None]] = {
    "dcp-init": _dcp_initialise,
    "burn-in": _burn_in,
    "no-grad": _no_grad_step,
}


@pytest.mark.parametrize("set_to_none", [True, False, None])
@pytest.mark.parametrize("stray", sorted(STRAY))
def test_a_step_before_the_first_report_keeps_the_guard_on(
        controller: ControllerProc, stray: str, set_to_none: bool | None) -> None:
    model, opt = _model()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ctl = lrctl.attach(opt, policy=None)
        STRAY[stray](model, opt)  # between attach() and the loop's first ctl.step()
        _readme_loop(model, opt, ctl, set_to_none)
        ctl.close()
    assert _order_warnings(caught) == []
    assert not ctl._after_order and ctl._guard.enabled
    assert ctl._guard.skipped == 1  # the NaN step, skipped
    assert _finite(model), "a non-finite step reached the weights"


def test_the_testers_checkpoint_loading_loop(controller: ControllerProc) -> None:
    """The report's reproduction, as written: the default policy, one Linear."""
    dcp = pytest.importorskip("torch.distributed.checkpoint.state_dict")
    torch.manual_seed(0)
    m = torch.nn.Linear(8, 1)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.1)
    saved = dcp.get_optimizer_state_dict(m, torch.optim.AdamW(m.parameters(), lr=1e-2))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ctl = lrctl.attach(opt)
        dcp.set_optimizer_state_dict(m, opt, saved)  # runs opt.step() once at LR 0
        for t in range(50):
            x = torch.randn(16, 8)
            loss = ((m(x) - x.sum(1, keepdim=True)) ** 2).mean()
            opt.zero_grad()
            loss.backward()
            if t == BAD_STEP:
                loss = loss * float("nan")
                m.weight.grad.fill_(float("nan"))  # type: ignore[union-attr]
            ctl.step(loss)
            opt.step()
        ctl.close()
    assert not torch.isnan(m.weight).any()
    assert _order_warnings(caught) == []


# How a loop in torch's order zeroes its gradients: (set_to_none, where), where "top" is
# before the backward and "after-step" between optimizer.step() and ctl.step().
ZEROING = [None, (True, "top"), (False, "top"), (True, "after-step"), (False, "after-step")]


@pytest.mark.filterwarnings("ignore:.*found no gradients:RuntimeWarning")  # (zero_grad())
@pytest.mark.parametrize("zeroing", ZEROING, ids=str)
def test_a_loop_in_torchs_order_is_still_told(controller: ControllerProc,
                                               zeroing: tuple[bool, str] | None) -> None:
    model, opt = _model()
    ctl = lrctl.attach(opt, policy=None)
    with pytest.warns(RuntimeWarning, match=ORDER_WARNING):
        for _ in range(3):
            if zeroing is not None and zeroing[1] == "top":
                opt.zero_grad(set_to_none=zeroing[0])
            loss = _loss(model)
            loss.backward()
            opt.step()
            if zeroing is not None and zeroing[1] == "after-step":
                opt.zero_grad(set_to_none=zeroing[0])
            ctl.step(loss)
    assert ctl._after_order and not ctl._guard.enabled
    ctl.close()


@pytest.mark.filterwarnings(LOADERS_LR)
def test_torchs_order_after_a_checkpoint_loaders_step(controller: ControllerProc) -> None:
    """The loader's step, then a loop in torch's order: the last step before the first
    ctl.step() is the loop's, on the gradients it still holds."""
    model, opt = _model()
    ctl = lrctl.attach(opt, policy=None)
    _dcp_initialise(model, opt)
    with pytest.warns(RuntimeWarning, match=ORDER_WARNING):
        for _ in range(3):
            opt.zero_grad()
            loss = _loss(model)
            loss.backward()
            opt.step()
            ctl.step(loss)
    assert ctl._after_order and not ctl._guard.enabled
    ctl.close()


def test_the_gradients_are_watched_only_until_the_first_report(
        controller: ControllerProc) -> None:
    """Once the order is known, an optimizer step notes nothing about its gradients."""
    model, opt = _model()
    ctl = lrctl.attach(opt, policy=None)
    _burn_in(model, opt)
    assert ctl._guard.watching and ctl._guard._consumed is not None
    _readme_loop(model, opt, ctl, True, steps=3)
    assert not ctl._guard.watching and ctl._guard._consumed is None
    ctl.close()
