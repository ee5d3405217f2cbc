"""On CUDA the hook never forces a host-device sync (runs only where a GPU exists)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from daemon_helpers import ControllerProc

import lrctl
from lrctl.bench._nosync import NoHostSync

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

POLICY = {"version": 1, "policies": [{"kind": "warmup", "steps": 50},
                                     {"kind": "divergence", "min_samples": 8}]}


def _steps_without_sync(ctl: lrctl.Controller, train_step: Callable[[lrctl.Controller], None],
                        warmup: int) -> None:
    """``warmup`` steps (first allocations: pinned buffers, optimizer state, may sync),
    then 60 under ``set_sync_debug_mode("error")``, which raises on any host sync, then
    3 more to let the last staged statistics go out."""
    for _ in range(warmup):
        train_step(ctl)
    with NoHostSync() as check:  # (a sync inside the hook is caught there: listened for)
        for _ in range(60):
            train_step(ctl)
    assert not check.failures, check.failures
    for _ in range(3):
        train_step(ctl)


@pytest.mark.parametrize("every", [1, 4])
def test_async_hook_steps_without_host_device_sync(controller: ControllerProc,
                                                   every: int) -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(),
                                torch.nn.Linear(256, 10)).cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randn(64, 64, device="cuda")

    def train_step(ctl: lrctl.Controller) -> None:
        loss = model(x).pow(2).mean()
        opt.zero_grad(set_to_none=False)
        loss.backward()
        ctl.step(loss)  # a CUDA tensor; the grad norm is computed on the device
        opt.step()

    with lrctl.attach(opt, policy=POLICY, every=every, spawn=False) as ctl:
        _steps_without_sync(ctl, train_step, warmup=3)
        runs = lrctl.client.request({"t": "runs"})["runs"]
        assert runs[0]["step"] >= 60  # statistics did reach the controller
        assert ctl.lr[0] > 1e-3 * 0.01  # warmup moved the LR
        assert ctl.lr == [g["lr"] for g in opt.param_groups]


def test_sync_mode_on_cuda_reports_the_same_values(controller: ControllerProc) -> None:
    model = torch.nn.Linear(8, 1).cuda()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    engine = lrctl.load_policy(POLICY, [0.1])
    with lrctl.attach(opt, policy=POLICY, sync=True, spawn=False) as ctl:
        for t in range(20):
            loss = torch.tensor(1.0 + t, device="cuda")
            ctl.step(loss, grad_norm=torch.tensor(2.0, device="cuda"))
            assert ctl.lr == engine.observe(t, 1.0 + t, 2.0)


def _mlp_run() -> tuple[torch.nn.Module, torch.optim.Optimizer, torch.Tensor]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(),
                                torch.nn.Linear(256, 10)).cuda()
    return model, torch.optim.AdamW(model.parameters(), lr=1e-3), torch.randn(
        64, 64, device="cuda")


def test_auto_interval_and_bf16_autocast_steps_without_host_device_sync(
        controller: ControllerProc) -> None:
    """``every="auto"`` with a device loss (each step takes the full way: judging a
    device value on the host would sync) under bf16 autocast, the usual GPU loop."""
    model, opt, x = _mlp_run()

    def train_step(ctl: lrctl.Controller) -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(x).float().pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        ctl.step(loss)
        opt.step()

    with lrctl.attach(opt, policy=POLICY, every="auto", spawn=False) as ctl:
        _steps_without_sync(ctl, train_step, warmup=5)
        assert lrctl.client.request({"t": "runs"})["runs"][0]["step"] >= 60
        assert ctl.lr == [g["lr"] for g in opt.param_groups]


def test_fp16_grad_scaler_steps_add_no_host_device_sync(controller: ControllerProc) -> None:
    """fp16 with a ``GradScaler``: the scaler's own ``step`` syncs (torch reads its
    found-inf flag), so only ``ctl.step(loss, scaler=...)`` runs under the debug mode;
    an overflow the scaler skips (gradients overflowed, the loss finite) is no spike."""
    model, opt, x = _mlp_run()
    scaler = torch.amp.GradScaler("cuda", init_scale=2.0**16)

    def train_step(ctl: lrctl.Controller, checked: bool, poison: bool = False) -> None:
        with torch.autocast("cuda", dtype=torch.float16):
            loss = model(x).float().pow(2).mean()
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss * 1e35 if poison else loss).backward()  # inf gradients
        if checked:
            with NoHostSync() as check:
                ctl.step(loss, scaler=scaler)
            assert not check.failures, check.failures
        else:
            ctl.step(loss, scaler=scaler)
        scaler.step(opt)
        scaler.update()

    with lrctl.attach(opt, policy=POLICY, spawn=False) as ctl:
        for _ in range(5):
            train_step(ctl, checked=False)
        torch.cuda.synchronize()
        for t in range(60):
            train_step(ctl, checked=True, poison=t == 30)
        torch.cuda.synchronize()
        for _ in range(3):
            train_step(ctl, checked=False)
        assert lrctl.client.request({"t": "runs"})["runs"][0]["step"] >= 60
        assert all(torch.isfinite(p).all() for p in model.parameters())
    assert not [d for d in ctl.decisions if d.action == "backoff"]  # an overflow, not a spike
