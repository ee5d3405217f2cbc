"""``lrctl.Scheduler`` in a plain loop, against a real controller.

Code written for torch schedulers calls ``step()``, ``get_last_lr()`` and
``state_dict()``; the LRs must be the controller's, and identical to the
in-process engine's for the same losses (sync mode).
"""

from __future__ import annotations

import json
import warnings
from typing import Any

import pytest
import torch
from integ_common import EARLYSTOP, POLICY, check_early_stop
from torch import nn

import lrctl

STEPS = 40
LR = 0.05


def test_scheduler_matches_in_process_engine(controller: Any) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    x, y = torch.randn(64, 8), torch.randn(64, 1)
    scheduler = lrctl.Scheduler(optimizer, policy=POLICY, sync=True, timeout=10.0)
    assert isinstance(scheduler, torch.optim.lr_scheduler.LRScheduler)
    used, last_lrs, observed = [], [], []
    try:
        for step in range(STEPS):
            loss = nn.functional.mse_loss(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            grad_norm = float(lrctl.client.total_grad_norm(optimizer))
            used.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            observed.append((step, loss.item(), grad_norm))
            scheduler.step(loss)
            last_lrs.append(scheduler.get_last_lr()[0])
            # The LR a torch scheduler promises for the next step is in the optimizer.
            assert last_lrs[-1] == optimizer.param_groups[0]["lr"]
        state = scheduler.state_dict()
        run_key = scheduler.controller.run_key
    finally:
        scheduler.close()

    engine = lrctl.load_policy(POLICY, base_lrs=[LR])
    expected = [engine.applied_lrs[0]]
    for step, loss_value, grad_norm in observed:
        expected.append(engine.observe(step, loss_value, grad_norm=grad_norm)[0])
    assert used == pytest.approx(expected[:STEPS], rel=1e-9)
    assert last_lrs == pytest.approx(expected[1:], rel=1e-9)
    assert len(set(used)) > STEPS // 2, "the policy should move the LR"

    # state_dict: JSON-plain, with the hook's state: a fresh scheduler's load_state_dict
    # rejoins the run exactly (a newcomer's find: it used to start a new run).
    json.dumps(state)
    assert {k: state[k] for k in ("last_epoch", "run_key", "lrs")} == {
        "last_epoch": STEPS, "run_key": run_key, "lrs": last_lrs[-1:]}
    assert state["lrctl"]["run_key"] == run_key and state["lrctl"]["step"] == STEPS
    optimizer2 = torch.optim.SGD(model.parameters(), lr=LR)
    with lrctl.Scheduler(optimizer2, policy=POLICY, sync=True, timeout=10.0) as resumed:
        resumed.load_state_dict(state)
        assert resumed.last_epoch == STEPS and resumed.controller.run_key == run_key
        assert resumed.get_last_lr() == pytest.approx(last_lrs[-1:], rel=1e-12)
        for step in range(STEPS, STEPS + 10):
            optimizer2.step()
            grad_norm = float(lrctl.client.total_grad_norm(optimizer2))  # the last batch's
            resumed.step(1.0 + 0.01 * step)
            assert resumed.get_last_lr() == [pytest.approx(engine.observe(
                step, 1.0 + 0.01 * step, grad_norm=grad_norm)[0], rel=1e-9)]
        assert resumed.state_dict()["last_epoch"] == STEPS + 10


def test_scheduler_keeps_its_step_count_across_resumes_by_key(controller: Any) -> None:
    """A newcomer's find: the README's resume by key (start_step=last_epoch) counted from
    0 again, so the second resume was 'behind' the controller."""
    param = nn.Parameter(torch.zeros(2))
    param.grad = torch.ones(2)
    optimizer = torch.optim.SGD([param], lr=0.1)
    with lrctl.Scheduler(optimizer, policy=POLICY, sync=True) as first:
        for _ in range(5):
            optimizer.step()
            first.step(1.0)
        key = first.controller.run_key
        first.close(end_run=False)
    again = lrctl.Scheduler(optimizer, policy=POLICY, sync=True, resume=key, start_step=5)
    try:
        assert again.last_epoch == 5
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # torch's order: no warning about it
            optimizer.step()
            again.step(1.0)
        assert again.state_dict()["last_epoch"] == 6
    finally:
        again.close()


def test_scheduler_refuses_epoch_argument(controller: Any) -> None:
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(2))], lr=0.1)
    scheduler = lrctl.Scheduler(optimizer, policy=POLICY)
    try:
        with pytest.raises(TypeError, match="counts steps itself"):
            scheduler.step(epoch=3)  # type: ignore[arg-type]
    finally:
        scheduler.close()


def test_scheduler_exposes_an_early_stop(controller: Any) -> None:
    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    x, y = torch.randn(32, 4), torch.randn(32, 1)
    scheduler = lrctl.Scheduler(optimizer, policy=EARLYSTOP, sync=True, timeout=10.0)
    steps = 0
    try:
        while steps < 100 and not scheduler.should_stop:
            loss = nn.functional.mse_loss(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if steps % 5 == 4:  # a "validation" every 5 steps, sent with this step's loss
                scheduler.report(val_loss=loss.item())
            scheduler.step(loss)
            steps += 1
        check_early_stop(scheduler.controller.decisions, steps, 100)
        # reported with steps 4 and 9: the second one stops the loop after step 9
        assert steps == 10
    finally:
        scheduler.close()
