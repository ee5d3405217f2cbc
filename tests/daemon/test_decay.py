"""``lrctl decay`` on a live run: the WSD cooldown starts (and is cancelled) from the
command line, the run uses the in-process engine's LRs for the same command, and the
command survives a controller killed with SIGKILL right after it."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from daemon_helpers import ControllerProc

import lrctl

LR = 0.1
WSD = {"version": 1, "policies": [{"kind": "wsd", "start_on": "operator",
                                   "min_lr_ratio": 0.1, "decay_shape": "linear"},
                                  {"kind": "divergence"}]}


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "lrctl", *args], capture_output=True,
                          text=True, timeout=60)


def _optimizer() -> torch.optim.Optimizer:
    return torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=LR)


def _ten_steps(name: str) -> tuple[lrctl.policy.Engine, lrctl.Controller]:
    """A run attached (sync) and ten steps in, beside the in-process engine."""
    engine = lrctl.load_policy(WSD, [LR])
    ctl = lrctl.attach(_optimizer(), policy=WSD, sync=True, spawn=False, run_name=name)
    for t in range(10):
        ctl.step(1.0, grad_norm=1.0)
        engine.observe(t, 1.0, 1.0)
    return engine, ctl


def test_decay_starts_and_cancel_ends_the_cooldown_of_a_live_run(
        controller: ControllerProc) -> None:
    engine = lrctl.load_policy(WSD, [LR])
    with lrctl.attach(_optimizer(), policy=WSD, sync=True, spawn=False, run_name="cool") as ctl:
        for t in range(20):
            ctl.step(1.0, grad_norm=1.0)
            engine.observe(t, 1.0, 1.0)
        assert ctl.lr == [LR]
        out = _cli("decay", "cool", "--steps", "10")
        assert out.returncode == 0, out.stderr
        assert "linear cooldown over steps 20-29" in out.stdout
        assert "started by an operator" in out.stdout
        engine.command("decay", steps=10)
        used = []
        for t in range(20, 25):
            ctl.step(1.0, grad_norm=1.0)
            used.append(ctl.lr)
            engine.observe(t, 1.0, 1.0)
            assert ctl.lr == engine.applied_lrs
        assert used[-1][0] < used[0][0] < LR  # falling, as the engine's

        out = _cli("decay", "cool", "--cancel")
        assert out.returncode == 0 and "back to the stable LR" in out.stdout, out.stderr
        engine.command("cancel")
        ctl.step(1.0, grad_norm=1.0)
        engine.observe(25, 1.0, 1.0)
        assert ctl.lr == engine.applied_lrs == [LR]
        again = _cli("decay", "cool", "--cancel")
        assert again.returncode == 1 and "no cooldown is under way" in again.stderr
        actions = [(d.policy, d.action) for d in ctl.decisions]
        assert ("wsd", "decay_start") in actions and ("wsd", "decay_cancel") in actions
        assert "wsd.decay_cancel" in _cli("runs").stdout


def test_decay_errors_are_clear(controller: ControllerProc) -> None:
    plain = {"version": 1, "policies": [{"kind": "divergence"}]}
    with lrctl.attach(_optimizer(), policy=plain, sync=True, spawn=False, run_name="nowsd") as ctl:
        ctl.step(1.0, grad_norm=1.0)
        out = _cli("decay", "nowsd", "--steps", "5")
        assert out.returncode == 1 and "exactly one policy" in out.stderr
    bad = _cli("decay", "nowsd", "--steps", "0")
    assert bad.returncode == 2 and "--steps must be >= 1" in bad.stderr
    assert _cli("decay", "nowsd", "--cancel", "--steps", "3").returncode == 2


def test_the_decay_survives_a_killed_controller(make_controller) -> None:  # type: ignore[no-untyped-def]
    controller: ControllerProc = make_controller()
    engine, ctl = _ten_steps("durable")
    out = _cli("decay", "durable", "--steps", "20", "--shape", "1-sqrt")
    assert out.returncode == 0, out.stderr
    engine.command("decay", steps=20, shape="1-sqrt")
    controller.kill9()  # the command was checkpointed before the CLI got its answer
    ctl.close(end_run=False)
    controller.start()

    resumed = lrctl.attach(_optimizer(), policy=WSD, sync=True, spawn=False,
                           resume=ctl.run_key, start_step=10)
    try:
        assert resumed.lr == engine.applied_lrs  # the welcome: the cooldown's first LR
        for t in range(10, 35):
            resumed.step(1.0, grad_norm=1.0)
            engine.observe(t, 1.0, 1.0)
            assert resumed.lr == engine.applied_lrs
        assert resumed.lr == [LR * 0.1]
        assert [d.action for d in resumed.decisions] == ["decay_done"]
    finally:
        resumed.close()


def test_the_decay_is_in_the_audit_trail(make_controller, tmp_path,  # type: ignore[no-untyped-def]
                                         monkeypatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    monkeypatch.chdir(tmp_path)
    make_controller(audit=True)
    with lrctl.attach(_optimizer(), policy=WSD, sync=True, spawn=False,
                      run_name="audited") as ctl:
        for _ in range(5):
            ctl.step(1.0, grad_norm=1.0)
        assert _cli("decay", "audited", "--steps", "3").returncode == 0
        # The journal is written (and fsynced) before the operator gets the answer.
        table = _cli("decisions", ctl.run_key or "")
        assert table.returncode == 0, table.stderr
        assert "decay_start" in table.stdout and "started by an operator" in table.stdout


def test_a_run_resumed_from_its_state_keeps_a_later_decay_across_a_controller_restart(
        make_controller) -> None:  # type: ignore[no-untyped-def]
    """An adversarial pass found it: the hook's hello kept the checkpoint's state and sent
    it again on every reconnect, so a controller restart took the run back to the
    checkpoint, undoing a cooldown started after the resume (the LR went back up). The
    state goes out of the hello once the controller has checkpointed past it."""
    controller: ControllerProc = make_controller()
    engine, first = _ten_steps("again")
    state = first.state_dict()
    first.close(end_run=False)
    ctl = lrctl.attach(_optimizer(), policy=WSD, sync=True, spawn=False, resume=state,
                       max_backoff=0.05)
    try:
        for t in range(10, 15):
            ctl.step(1.0, grad_norm=1.0)
            engine.observe(t, 1.0, 1.0)
        out = _cli("decay", "again", "--steps", "20")  # checkpointed before the answer
        assert out.returncode == 0, out.stderr
        engine.command("decay", steps=20)
        for t in range(15, 18):
            ctl.step(1.0, grad_norm=1.0)
            engine.observe(t, 1.0, 1.0)
            assert ctl.lr == engine.applied_lrs
        assert ctl.lr < [LR]
        with pytest.warns(RuntimeWarning, match="lost the controller"):
            controller.kill9()
            controller.start()
            for t in range(18, 40):
                ctl.step(1.0, grad_norm=1.0)  # down, then reconnected and replayed
                engine.observe(t, 1.0, 1.0)
            while not ctl.connected:
                ctl._link.wait(lambda: ctl.connected, 0.2)  # type: ignore[union-attr]
                ctl._pump()
        ctl.step(1.0, grad_norm=1.0)
        engine.observe(40, 1.0, 1.0)
        assert ctl.lr == engine.applied_lrs == [pytest.approx(LR * 0.1)]  # cooled down
        assert [d.action for d in ctl.decisions].count("decay_start") == 1
    finally:
        ctl.close()


@pytest.mark.parametrize("every", [4, 1])
def test_an_every_n_run_that_ends_between_reports_records_its_cooldowns_end(
        controller: ControllerProc, every: int) -> None:
    """A run of 102 steps with every=4 reports step 100 last: the cooldown that ends with
    the run (decay_done from the observation of step 101) was never decided, nor
    recorded. At close the run's last step is reported, with its loss."""
    wsd = {"version": 1, "policies": [{"kind": "wsd", "total_steps": 102, "decay_steps": 20,
                                       "decay_shape": "linear", "min_lr_ratio": 0.1}]}
    with lrctl.attach(_optimizer(), policy=wsd, spawn=False, every=every, timeout=30.0,
                      run_name=f"ends-{every}") as ctl:
        for t in range(102):
            ctl.step(1.0 + t, grad_norm=1.0)
    done = [d for d in ctl.decisions if d.action == "decay_done"]
    assert [d.step for d in done] == [101]
    assert done[0].evidence["value"] == 102
