"""MLflow's ``lrctl/lr/g{i}`` at step s is the LR the optimizer actually used at step s.

A real controller ships to a real ``mlflow server``; the training loop records
each param group's LR inside the optimizer step, and the MLflow history must
agree at every step, in async and in sync mode.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from live_controller import live_controller
from mlflow.tracking import MlflowClient
from sinks_helpers import MlflowServer, lr_curve, mlflow_run_id

import lrctl

# A schedule that changes the LR every step and a plateau rule that makes decisions.
POLICY = {"version": 1, "policies": [
    {"kind": "cyclical", "base_lr": 0.01, "max_lr": 0.05, "step_size_up": 7},
    {"kind": "plateau", "metric": "loss", "patience": 15, "factor": 0.5, "cooldown": 5}]}


@pytest.mark.parametrize("sync", [False, True])
def test_mlflow_lr_is_the_lr_used_at_each_step(mlflow_server: MlflowServer, workdir: Path,
                                               monkeypatch: pytest.MonkeyPatch,
                                               sync: bool) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.uri)
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    opt = torch.optim.SGD([{"params": [model.weight]}, {"params": [model.bias], "lr": 0.002}],
                          lr=0.02)
    used: dict[int, list[float]] = {}
    with live_controller(audit=True) as controller:
        monkeypatch.setenv("LRCTL_SOCKET", controller.socket)
        ctl = lrctl.attach(opt, policy=POLICY, sync=sync, spawn=False, run_name="used")
        for step in range(200):
            opt.zero_grad()
            model(torch.ones(8, 4)).pow(2).mean().backward()
            ctl.step(1.0, grad_norm=1.0)  # a flat loss: the plateau rule decides
            opt.step()
            used[step] = [g["lr"] for g in opt.param_groups]  # what that step used
        key = ctl.run_key
        ctl.close()
        assert key is not None and any(d.action == "reduce" for d in ctl.decisions)
        client = MlflowClient(mlflow_server.uri)
        run = _finished_run(client, Path(controller.state_dir), key)
    for g in (0, 1):
        at = lr_curve(client, run.info.run_id, g)
        wrong = [(s, at(s), v[g]) for s, v in used.items() if at(s) != v[g]]
        assert not wrong, wrong[:5]


def test_mlflow_lr_is_the_lr_used_with_the_loops_own_schedule(
        mlflow_server: MlflowServer, workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``base="loop"``: the loop sets its LR every step and lrctl's plateau rule scales it;
    MLflow records the product, the LR each optimizer step used."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.uri)
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.02)
    used: dict[int, float] = {}
    step = 0
    reactive = {"version": 1, "policies": [POLICY["policies"][1]]}
    with live_controller(audit=True) as controller:
        monkeypatch.setenv("LRCTL_SOCKET", controller.socket)
        ctl = lrctl.attach(opt, policy=reactive, base="loop", spawn=False, run_name="loop",
                           timeout=60.0)
        # After attach: pre-step hooks run in registration order, lrctl's sets the LR.
        opt.register_step_pre_hook(
            lambda o, *_: used.__setitem__(step, o.param_groups[0]["lr"]))
        for step in range(200):
            opt.param_groups[0]["lr"] = 0.02 * (1 - step / 400)  # the loop's own schedule
            opt.zero_grad()
            model(torch.ones(8, 4)).pow(2).mean().backward()
            ctl.step(1.0, grad_norm=1.0)
            opt.step()
        key = ctl.run_key
        ctl.close()
        assert key is not None and any(d.action == "reduce" for d in ctl.decisions)
        client = MlflowClient(mlflow_server.uri)
        run = _finished_run(client, Path(controller.state_dir), key)
    at = lr_curve(client, run.info.run_id, 0)
    assert used[0] == 0.02 and min(used.values()) < 0.02 * 0.5  # scaled after a reduce
    wrong = [(s, at(s), v) for s, v in used.items() if at(s) != pytest.approx(v, rel=1e-12)]
    assert not wrong, wrong[:5]


@pytest.mark.parametrize(("every", "late"), [(1, False), (4, False), (1, True)])
def test_a_push_read_after_a_report_applies_a_step_later_as_recorded(
        mlflow_server: MlflowServer, workdir: Path, monkeypatch: pytest.MonkeyPatch,
        every: int, late: bool) -> None:
    """An audit's find: a ``set-lr`` push read after a report had stated its step's LRs
    (here by ``state_dict()`` between ``ctl.step()`` and ``optimizer.step()``; in the
    find, during the report's own send) was applied to that step, so MLflow said the old
    LR for a step that ran on the new one. It now applies a step later, as recorded.
    ``late``: the answer the step needs is not in when it is reported (the controller
    stopped a moment), so the report goes without its LRs: the same holds."""
    model, opt = _pushed_model(mlflow_server, monkeypatch)
    used: dict[int, float] = {}
    with live_controller(audit=True) as controller:
        monkeypatch.setenv("LRCTL_SOCKET", controller.socket)
        ctl = lrctl.attach(opt, policy=GUARD, every=every, spawn=False, run_name="push",
                           timeout=60.0)
        for step in range(120):
            opt.zero_grad()
            model(torch.ones(8, 4)).pow(2).mean().backward()
            ctl.step(1.0, grad_norm=1.0)
            if late and step == 48:
                os.kill(controller.proc.pid, signal.SIGCONT)
            if step == 48:  # a report step: its LRs went out with it
                _set_lr(controller.socket, str(ctl.run_key), 0.005)
                ctl.state_dict()  # reads the push that came meanwhile
            opt.step()
            used[step] = opt.param_groups[0]["lr"]
            if late and step == 46:
                ctl.state_dict()  # every answer in: the next step needs none it lacks
                os.kill(controller.proc.pid, signal.SIGSTOP)  # the answer to 47 waits
        key = ctl.run_key
        ctl.close()
        assert key is not None and used[48] == 0.02 and used[49] == 0.005
        _assert_drawn_as_used(mlflow_server, controller.state_dir, key, used)


def _finished_run(client: MlflowClient, state: Path, key: str) -> Any:
    """The run's MLflow run, once the controller has shipped everything and ended it."""
    deadline = time.monotonic() + 120
    while True:
        try:
            run = client.get_run(mlflow_run_id(state, key))
            if run.info.status == "FINISHED":
                return run
        except (OSError, KeyError, TypeError):
            pass
        assert time.monotonic() < deadline, "the run was never shipped and ended"
        time.sleep(0.1)


def test_a_push_taken_before_the_coming_steps_report_applies_at_that_step(
        mlflow_server: MlflowServer, workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A review's find in the fix above: a report that goes without its LRs (the answer
    it needed still on its way) is recorded at the controller's LRs when it reads it, a
    push it took before included (an async hook's reports are read on a timer, an
    operator's push at once). Such a push, read before the answer to that report, applies
    at that step; one read after the answer, a step later."""
    model, opt = _pushed_model(mlflow_server, monkeypatch)
    used: dict[int, float] = {}
    with live_controller(audit=True) as controller:
        monkeypatch.setenv("LRCTL_SOCKET", controller.socket)
        ctl = lrctl.attach(opt, policy=GUARD, spawn=False, run_name="push", timeout=60.0)
        link = ctl._link
        assert link is not None
        send_obs, delayed = link.send_obs, []

        def late_48(step: int, frame: bytes) -> None:  # the controller reads report 48 late
            if step == 48 and not delayed:
                delayed.append((step, frame))
                return
            send_obs(step, frame)
        link.send_obs = late_48  # type: ignore[method-assign]
        for step in range(120):
            opt.zero_grad()
            model(torch.ones(8, 4)).pow(2).mean().backward()
            ctl.step(1.0, grad_norm=1.0)
            if step == 48:
                os.kill(controller.proc.pid, signal.SIGCONT)
                assert link.wait(lambda: ctl._acked >= 47, 30)  # the answer to 47 is in
                _set_lr(controller.socket, str(ctl.run_key), 0.005)
                send_obs(*delayed[0])  # now the controller reads report 48
                ctl.state_dict()  # reads the push, then the answer to 48
            opt.step()
            used[step] = opt.param_groups[0]["lr"]
            if step == 46:
                ctl.state_dict()  # every answer in, then the answer to 47 waits
                os.kill(controller.proc.pid, signal.SIGSTOP)
        key = ctl.run_key
        ctl.close()
        assert key is not None and used[47] == 0.02 and used[48] == 0.005
        _assert_drawn_as_used(mlflow_server, controller.state_dir, key, used)


#: The push tests' policy: no LR of its own moves, so each change is the operator's.
GUARD = {"version": 1, "policies": [{"kind": "divergence"}]}


def _pushed_model(server: MlflowServer,
                  monkeypatch: pytest.MonkeyPatch) -> tuple[torch.nn.Module, torch.optim.SGD]:
    """The push tests' model and optimizer (LR 0.02), their MLflow the test server."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.uri)
    model = torch.nn.Linear(4, 1)
    return model, torch.optim.SGD(model.parameters(), lr=0.02)


def _set_lr(socket: str, key: str, lr: float) -> None:
    """``lrctl set-lr`` on ``key``, as an operator runs it."""
    out = subprocess.run([sys.executable, "-m", "lrctl", "set-lr", "--socket", socket, key,
                          str(lr)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr


def _assert_drawn_as_used(server: MlflowServer, state_dir: str, key: str,
                          used: dict[int, float]) -> None:
    """MLflow's ``lrctl/lr/g0``, once the run is shipped, is ``used`` at every step."""
    client = MlflowClient(server.uri)
    run = _finished_run(client, Path(state_dir), key)
    at = lr_curve(client, run.info.run_id, 0)
    wrong = [(s, at(s), v) for s, v in used.items() if at(s) != v]
    assert not wrong, wrong[:5]
