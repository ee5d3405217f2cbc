"""Controller crashes and restarts: the run goes on, and decisions resume exactly."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from daemon_helpers import POLICIES, ControllerProc, losses

import lrctl
from lrctl.policy import Decision
from lrctl.policy._arbiter import REPLAYED

POLICY = str(POLICIES / "default.yaml")


def _opt(lr: float = 0.1) -> torch.optim.Optimizer:
    return torch.optim.SGD([torch.nn.Parameter(torch.ones(2))], lr=lr)


def _step_all(ctl: lrctl.Controller, curve: list[float], start: int, stop: int) -> list:
    out = []
    for t in range(start, stop):
        ctl.step(curve[t], grad_norm=1.0)
        out.append(ctl.lr)
    return out


@pytest.mark.parametrize("kill_at", [150, 333])
def test_kill_9_mid_run_then_restart_continues_as_if_uninterrupted(
        controller: ControllerProc, kill_at: int) -> None:
    curve = losses(900, seed=7, spikes=(200, 420, 421))
    engine = lrctl.load_policy(POLICY, [0.1])
    expected = [engine.observe(t, loss, 1.0) for t, loss in enumerate(curve)]
    with pytest.warns(RuntimeWarning, match="lost the controller"):
        ctl = lrctl.attach(_opt(), policy=POLICY, sync=True, spawn=False, max_backoff=0.05)
        try:
            assert _step_all(ctl, curve, 0, kill_at) == expected[:kill_at]
            controller.kill9()
            # Down: training goes on at the last LR, nothing raised.
            held = _step_all(ctl, curve, kill_at, kill_at + 100)
            assert held == [expected[kill_at - 1]] * 100
            assert not ctl.connected
            controller.start()
            t = kill_at + 100
            _reconnect(ctl)
            # Every observation, including the 100 made while it was down, was replayed.
            rest = _step_all(ctl, curve, t, len(curve))
            assert rest == expected[t:]
            assert [d.to_dict() for d in ctl.decisions] == _replayed(
                engine.decisions, kill_at, kill_at + 100)
        finally:
            ctl.close()


def _replayed(decisions: list[Decision], first: int, end: int) -> list[dict[str, Any]]:
    """``decisions`` as a sync hook's run records them when it replays steps ``first`` to
    ``end`` (exclusive), run while the controller was down: a spike skip there did not
    happen (the hook's guard skipped the non-finite steps itself)."""
    out = []
    for d in map(Decision.to_dict, decisions):
        if (d["action"] == "skip" and first <= d["step"] < end
                and isinstance(value := d["evidence"].get("value"), float)
                and math.isfinite(value)):
            d["reason"] += REPLAYED
            d["evidence"] = {**d["evidence"], "advisory": True, "already_ran": True}
        out.append(d)
    return out


def _reconnect(ctl: lrctl.Controller) -> None:
    while not ctl.connected:  # reconnects within its back-off; no timing asserted
        ctl._link.wait(lambda: ctl.connected, 0.2)  # type: ignore[union-attr]
        ctl._pump()


def test_sigterm_flushes_state_and_a_restart_restores_the_session(
        controller: ControllerProc) -> None:
    curve = losses(300, seed=2)
    engine = lrctl.load_policy(POLICY, [0.1])
    expected = [engine.observe(t, loss, 1.0) for t, loss in enumerate(curve)]
    ctl = lrctl.attach(_opt(), policy=POLICY, sync=True, spawn=False, run_name="flush",
                       max_backoff=0.05)
    try:
        assert _step_all(ctl, curve, 0, 120) == expected[:120]
        assert controller.stop() == 0
        (path,) = (Path(controller.state_dir) / "runs").glob("flush-*.ckpt")
        state = json.loads(path.read_text().split("\n")[1])
        assert state["engine"]["last_step"] == 119  # flushed at shutdown, not periodically
        controller.start()
        runs = lrctl.client.request({"t": "runs"})["runs"]
        assert [(r["step"], r["connected"]) for r in runs] == [(119, False)]
        with pytest.warns(RuntimeWarning, match="lost the controller"):
            ctl.step(curve[120], grad_norm=1.0)  # finds the old connection dead
        _reconnect(ctl)
        assert _step_all(ctl, curve, 121, 300) == expected[121:]
    finally:
        ctl.close()
    assert lrctl.client.request({"t": "runs"})["runs"] == []  # bye ends the session


def test_a_corrupt_checkpoint_is_never_loaded(controller: ControllerProc) -> None:
    ctl = lrctl.attach(_opt(), policy=POLICY, sync=True, spawn=False, run_name="corrupt")
    ctl.step(1.0)
    controller.stop()
    ctl._link.close(bye=False)  # type: ignore[union-attr]
    ctl._link = None
    (path,) = (Path(controller.state_dir) / "runs").glob("corrupt-*.ckpt")
    head, body, _ = path.read_text().split("\n")
    path.write_text(head + "\n" + body.replace('"last_step":0', '"last_step":7') + "\n")
    controller.start()
    assert lrctl.client.request({"t": "runs"})["runs"] == []
    assert list(path.parent.glob("*.corrupt"))


def test_a_resume_by_run_key_behind_the_controller_says_its_steps_are_not_observed(
        controller: ControllerProc) -> None:
    """Rejoining a run by its key without start_step: the controller has it at step 19,
    the hook counts from 0, and its steps up to 19 would be answered as already seen
    with nothing said. The hook says so at attach; with start_step it says nothing."""
    curve = losses(40, seed=3)
    ctl = lrctl.attach(_opt(), policy=POLICY, sync=True, spawn=False)
    _step_all(ctl, curve, 0, 20)
    key = ctl.run_key
    ctl.close(end_run=False)
    opt = _opt()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        behind = lrctl.attach(opt, policy=POLICY, spawn=False, resume=key, timeout=30.0)
        for t in range(20):  # async: each is answered as already seen, at once
            behind.step(curve[t], grad_norm=1.0)
            opt.step()
        assert behind._link is not None
        assert behind._link.wait(lambda: behind._acked == 19, 30.0)
    said = [str(w.message) for w in seen]
    assert any("up to step 19, and this hook counts from step 0" in m and "start_step" in m
               for m in said), said
    assert behind.late_waits == 0 and not any("did not arrive" in m for m in said), said
    behind.close(end_run=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning at all
        with lrctl.attach(_opt(), policy=POLICY, sync=True, spawn=False, resume=key,
                          start_step=20) as again:
            _step_all(again, curve, 20, 40)
            assert again.steps_taken == 40


def test_state_dict_after_close_says_to_call_it_while_attached(
        controller: ControllerProc) -> None:
    """After the `with` block (close()), state_dict() cannot ask the controller: the
    warning says why, not that no controller runs (one does)."""
    opt = _opt()
    with lrctl.attach(opt, policy=POLICY, sync=True, spawn=False) as ctl:
        _step_all(ctl, losses(5), 0, 5)
    with pytest.warns(RuntimeWarning, match=r"after close\(\) .* call it while the run is "
                                            r"attached") as seen:
        state = ctl.state_dict()
    assert not any("without a controller" in str(w.message) for w in seen)
    assert state["run_key"] == ctl.run_key and state["step"] == 5


def test_a_resume_past_the_controllers_last_step_starts_at_its_schedules_step(
        controller: ControllerProc) -> None:
    """A newcomer's find: the controller had the run up to step 9 (killed before its
    next checkpoint, say), the loop resumed at step 100, and step 100 trained at the
    warmup's LR of step 10 (100x too low in one run). The first resumed step's LRs are
    now those of its own step."""
    warmup = {"version": 1, "policies": [{"kind": "warmup", "steps": 200}]}
    reference = lrctl.load_policy(warmup, [0.1])
    reference.start_at(100)
    ctl = lrctl.attach(_opt(), policy=warmup, sync=True, spawn=False)
    for _ in range(10):
        ctl.step(1.0, grad_norm=1.0)
    key = ctl.run_key
    ctl.close(end_run=False)
    opt = _opt()
    with lrctl.attach(opt, policy=warmup, spawn=False, resume=key, start_step=100,
                      timeout=30.0) as again:  # async: step 100 uses the welcome's LRs
        assert again.lr == reference.applied_lrs  # the LR the optimizer uses at step 100
        used = []
        opt.register_step_pre_hook(lambda o, *_: used.append(o.param_groups[0]["lr"]))
        again.step(1.0, grad_norm=1.0)
        opt.step()
    assert used == [pytest.approx(reference.applied_lrs[0])]


@pytest.mark.parametrize("base", ["controller", "loop"])
def test_a_resume_by_run_key_after_loading_the_optimizer_continues_the_runs_lrs(
        controller: ControllerProc, base: str) -> None:
    """Found by trying the plain-PyTorch resume: attach(resume=run_key) after
    optimizer.load_state_dict() sent the checkpoint's LRs as the run's initial ones and
    was refused (RunConflict). The run's initial LRs stand: the LRs go on exactly as an
    uninterrupted run's, and base="loop" multiplies the loop's LR by the same factor."""
    warmup = {"version": 1, "policies": [{"kind": "warmup", "steps": 40}]}
    reference = lrctl.load_policy(warmup, [0.1, 0.01])
    expected = [reference.observe(t, 1.0, 1.0) for t in range(30)]

    def optimizer() -> torch.optim.Optimizer:
        params = [torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(2))]
        return torch.optim.SGD([{"params": [params[0]], "lr": 0.1},
                                {"params": [params[1]], "lr": 0.01}])

    opt = optimizer()
    ctl = lrctl.attach(opt, policy=warmup, sync=True, spawn=False, base=base)
    for t in range(20):
        ctl.step(1.0, grad_norm=1.0)
        assert ctl.lr == pytest.approx(expected[t])
        opt.step()
    if base == "loop":  # the loop's own schedule has moved its LRs by the checkpoint
        for group in opt.param_groups:
            group["lr"] *= 0.5
    key, saved = ctl.run_key, opt.state_dict()
    ctl.close(end_run=False)
    again = optimizer()
    again.load_state_dict(saved)  # its groups now hold the checkpoint's LRs
    loaded = [g["lr"] for g in again.param_groups]
    assert loaded[0] != 0.1
    used: list[list[float]] = []
    again.register_step_pre_hook(lambda o, *_: used.append([g["lr"] for g in o.param_groups]))
    with lrctl.attach(again, policy=warmup, sync=True, spawn=False, resume=key,
                      start_step=20, base=base) as resumed:
        for _ in range(10):
            resumed.step(1.0, grad_norm=1.0)
            again.step()
        assert resumed.state_dict()["initial_lrs"] == [0.1, 0.01]
    # base="loop": the loop's LR (what it loaded) times the controller's LR over the run's
    # initial LR, i.e. half the controller's here; base="controller": the controller's.
    scale = 0.5 if base == "loop" else 1.0
    assert used == [pytest.approx([scale * lr for lr in lrs]) for lrs in expected[20:30]]


def _runs() -> list[dict]:
    out = subprocess.run([sys.executable, "-m", "lrctl", "runs", "--json"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return list(json.loads(out.stdout))


def test_a_resume_from_state_under_a_policy_edited_since_reloads_it(
        controller: ControllerProc, tmp_path: Path) -> None:
    """An adversarial pass found it: the policy file edited after the last checkpoint (a
    live edit) made that checkpoint's state unusable (RunConflict at attach, the script
    could not restart). The state is resumed and the edited version reloaded into it, as
    a live edit would be: the policies keep their state, the reload is a decision."""
    path = tmp_path / "plateau.yaml"
    path.write_text("version: 1\npolicies:\n  - kind: plateau\n    factor: 0.5\n"
                    "    patience: 20\n")
    curve = losses(60, seed=3)
    first = lrctl.attach(_opt(), policy=str(path), sync=True, spawn=False)
    _step_all(first, curve, 0, 30)
    state = first.state_dict()
    first.close(end_run=False)
    path.write_text(path.read_text().replace("factor: 0.5", "factor: 0.25"))
    with lrctl.attach(_opt(), policy=str(path), sync=True, spawn=False, resume=state) as ctl:
        _step_all(ctl, curve, 30, 32)
        reloads = [d for d in ctl.decisions if d.action == "reload"]
        assert len(reloads) == 1 and reloads[0].step == 29
        assert "changed plateau" in reloads[0].reason
        again = ctl.state_dict()
    with lrctl.attach(_opt(), policy=str(path), sync=True, spawn=False, resume=again) as ctl:
        _step_all(ctl, curve, 32, 34)
        assert not [d for d in ctl.decisions if d.action == "reload"]  # the same version
        again = ctl.state_dict()
    # Another file (a review's find: the run kept watching the old one, and an edit of
    # it, or a controller restart, took the run back to it).
    other = tmp_path / "other.yaml"
    other.write_text(path.read_text().replace("factor: 0.25", "factor: 0.75"))
    with lrctl.attach(_opt(), policy=str(other), sync=True, spawn=False, resume=again) as ctl:
        _step_all(ctl, curve, 34, 36)
        [held] = [r for r in _runs() if r["run"] == ctl.run_key]
        assert held["policy_source"] == str(other) and held["watching"]


def test_a_metric_reported_before_the_checkpoint_reaches_the_resumed_run(
        controller: ControllerProc) -> None:
    """An adversarial pass found it: evaluate, ctl.report(val_loss=...), checkpoint, die:
    the metric went with the next step's observation, which never came, and the resumed
    run's early stopping named an older best step (the wrong checkpoint to keep). The
    state keeps what is reported and not yet sent; the resumed run's first step sends it."""
    policy = {"version": 1, "policies": [{"kind": "earlystop", "metric": "val_loss",
                                          "patience": 2}]}
    vals = {9: 1.0, 19: 0.5, 29: 0.2, 39: 0.6, 49: 0.7, 59: 0.8}
    reference = lrctl.load_policy(policy, [0.1])
    for t in range(61):
        metrics = {"val_loss": vals[t - 1]} if t - 1 in vals else {}
        reference.update(t, 1.0, 1.0, metrics, t - 1 if metrics else None)
    assert reference.should_stop

    def run(ctl: lrctl.Controller, start: int, stop: int) -> None:
        for t in range(start, stop):
            ctl.step(1.0, grad_norm=1.0)
            if t in vals:
                ctl.report(val_loss=vals[t])

    first = lrctl.attach(_opt(), policy=policy, sync=True, spawn=False)
    run(first, 0, 30)  # val_loss 0.2, the best, reported after step 29
    state = first.state_dict()
    assert state["metrics"] == {"val_loss": 0.2}
    with pytest.warns(RuntimeWarning, match="state_dict"):
        first.close(end_run=False)  # the process dies here
    with lrctl.attach(_opt(), policy=policy, sync=True, spawn=False, resume=state) as ctl:
        run(ctl, 30, 61)
        assert ctl.should_stop
        stops = [d for d in ctl.decisions if d.action == "stop"]
        expected = [d for d in reference.decisions if d.action == "stop"]
        assert [(d.step, d.reason, d.evidence) for d in stops] == [
            (d.step, d.reason, d.evidence) for d in expected]
        assert stops[0].evidence["best_step"] == 29


def test_a_state_with_a_non_finite_pending_metric_resumes(controller: ControllerProc) -> None:
    """A review found it: a diverged evaluation (val_loss=nan) reported before the
    checkpoint made the checkpoint's state refused at resume."""
    first = lrctl.attach(_opt(), policy=POLICY, sync=True, spawn=False)
    _step_all(first, [1.0] * 5, 0, 5)
    first.report(val_loss=float("nan"))
    state = first.state_dict()
    with pytest.warns(RuntimeWarning, match="state_dict"):
        first.close(end_run=False)
    assert math.isnan(state["metrics"]["val_loss"])
    with lrctl.attach(_opt(), policy=POLICY, sync=True, spawn=False, resume=state) as ctl:
        _step_all(ctl, [1.0] * 6, 5, 6)
        assert ctl.run_key == first.run_key


def test_a_state_dict_the_controller_does_not_answer_in_time_says_so(
        controller: ControllerProc) -> None:
    """An adversarial pass found it: a controller stalled at the checkpoint left a state
    without the run's policies and no word of it; the resume then blamed the user."""
    with lrctl.attach(_opt(), policy=POLICY, spawn=False, timeout=0.3) as ctl:
        for _ in range(5):
            ctl.step(1.0, grad_norm=1.0)
        os.kill(controller.pid, signal.SIGSTOP)
        try:
            with pytest.warns(RuntimeWarning, match="no answer from the controller within"):
                state = ctl.state_dict()
        finally:
            os.kill(controller.pid, signal.SIGCONT)
        assert "session" not in state and state["step"] == 5


def test_load_state_dict_of_a_run_key_says_what_it_takes(controller: ControllerProc) -> None:
    with lrctl.attach(_opt(), policy=POLICY, spawn=False) as ctl, \
            pytest.raises(TypeError, match=r"resume=run_key"):
        ctl.load_state_dict(ctl.run_key)  # type: ignore[arg-type]


def _set_lr_after_the_checkpoint(name: str) -> tuple[lrctl.Controller, dict]:
    """A run checkpointed at step 10 (its state), then set to LR 0.01 by an operator at
    step 14, whose process dies after step 17."""
    first = lrctl.attach(_opt(), policy=POLICY, sync=True, spawn=False, run_name=name)
    _step_all(first, [1.0] * 20, 0, 10)
    state = first.state_dict()
    _step_all(first, [1.0] * 20, 10, 15)
    out = subprocess.run([sys.executable, "-m", "lrctl", "set-lr", name, "0.01"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    _step_all(first, [1.0] * 20, 15, 18)
    assert first.lr == [0.01]
    first.close(end_run=False)
    return first, state


def test_a_resume_from_state_that_undoes_later_steps_says_so_in_the_audit(
        controller: ControllerProc) -> None:
    """An adversarial pass found it: an operator's decision made after the checkpoint was
    undone by the resume (the run goes on from the checkpoint's state, as documented)
    while the audit trail still showed it as in force. The resume is now a decision that
    names what it undid."""
    _, state = _set_lr_after_the_checkpoint("undo")
    with lrctl.attach(_opt(), policy=POLICY, sync=True, spawn=False, resume=state) as ctl:
        assert ctl.lr == [0.1]  # the checkpoint's
        _step_all(ctl, [1.0] * 20, 10, 11)
        [resumed] = [d for d in ctl.decisions if d.action == "resumed"]
        assert resumed.step == 9 and resumed.evidence["seen_up_to"] == 17
        assert resumed.evidence["undone"] == [{"step": 14, "action": "set_lr"}]
        assert "set_lr@14" in resumed.reason


def test_a_resume_from_state_after_the_run_left_memory_still_says_what_it_undid(
        make_controller, tmp_path: Path,  # type: ignore[no-untyped-def]
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A review found it: the 'resumed' decision looked only at the run in memory, so a
    job restarted after --session-timeout (the run then only on disk) recorded nothing."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    monkeypatch.chdir(tmp_path)
    make_controller(["--session-timeout", "1"], audit=True)
    first, state = _set_lr_after_the_checkpoint("gone")
    deadline = time.monotonic() + 60
    while any(r["run"] == first.run_key for r in _runs()):  # evicted after 1 s idle
        assert time.monotonic() < deadline, "the run was never evicted"
        threading.Event().wait(0.1)
    with lrctl.attach(_opt(), policy=POLICY, sync=True, spawn=False, resume=state) as ctl:
        _step_all(ctl, [1.0] * 20, 10, 11)
        [resumed] = [d for d in ctl.decisions if d.action == "resumed"]
        assert resumed.step == 9 and resumed.evidence["seen_up_to"] == 17
        assert resumed.evidence["undone"] == [{"step": 14, "action": "set_lr"}]
        # The journal has it too, and what the resumed run decides at steps seen before
        # (an adversarial pass found both dropped as replays of journaled steps).
        out = subprocess.run([sys.executable, "-m", "lrctl", "set-lr", "gone", "0.02"],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        _step_all(ctl, [1.0] * 20, 11, 13)
    journal = subprocess.run([sys.executable, "-m", "lrctl", "decisions", ctl.run_key,
                              "--json"], capture_output=True, text=True, timeout=60)
    actions = [(r["step"], r["action"]) for r in map(json.loads, journal.stdout.splitlines())]
    assert actions[-3:] == [(14, "set_lr"), (9, "resumed"), (10, "set_lr")], actions


def test_a_resume_by_key_with_another_policy_names_the_runs(controller: ControllerProc) -> None:
    """A newcomer resumed by key without policy= and got 'a different policy', with no
    word of which or what to do."""
    first = lrctl.attach(_opt(), policy=POLICY, sync=True, spawn=False)
    _step_all(first, [1.0] * 3, 0, 3)
    first.close(end_run=False)
    with pytest.raises(lrctl.client.RunConflict, match=r"default\.yaml, sha256 [0-9a-f]{12}\): "
                                                        r"attach with that policy"):
        lrctl.attach(_opt(), policy="sgdr", spawn=False, resume=first.run_key)


def test_an_every_n_run_resumed_from_state_uses_an_uninterrupted_runs_lrs(
        controller: ControllerProc) -> None:
    """An adversarial pass found it: every=4, resumed at step 100 (last report: 96), took
    the schedule's LR of step 100 for that step, where the run holds the LR decided at
    its last report until the next one."""
    warmup = {"version": 1, "policies": [{"kind": "warmup", "steps": 200}]}

    def train(ctl: lrctl.Controller, opt: torch.optim.Optimizer, steps: range) -> list:
        used: list[float] = []
        handle = opt.register_step_pre_hook(
            lambda o, *_: used.append(o.param_groups[0]["lr"]))
        for _ in steps:
            ctl.step(1.0, grad_norm=1.0)
            opt.step()
        handle.remove()
        return used

    opt = _opt()
    with lrctl.attach(opt, policy=warmup, spawn=False, every=4, timeout=30.0) as ctl:
        reference = train(ctl, opt, range(120))
    opt = _opt()
    first = lrctl.attach(opt, policy=warmup, spawn=False, every=4, timeout=30.0)
    assert train(first, opt, range(100)) == reference[:100]
    state = first.state_dict()
    first.close(end_run=False)
    opt = _opt()
    with lrctl.attach(opt, policy=warmup, spawn=False, every=4, timeout=30.0,
                      resume=state) as again:
        assert train(again, opt, range(100, 120)) == reference[100:]


def test_a_resume_from_state_that_no_controller_answers_trains_at_the_checkpoints_lr(
        controller: ControllerProc) -> None:
    """An adversarial pass found it: with no controller, a resume from ctl.state_dict()
    trained at the run's initial LR (0.1 after a warmup's 0.0055), not the checkpoint's."""
    warmup = {"version": 1, "policies": [{"kind": "warmup", "steps": 200}]}
    first = lrctl.attach(_opt(), policy=warmup, sync=True, spawn=False)
    _step_all(first, [1.0] * 10, 0, 10)
    at_checkpoint = first.lr
    state = first.state_dict()
    first.close(end_run=False)
    controller.stop()
    opt = _opt()
    with pytest.warns(RuntimeWarning, match="no controller answers"):
        ctl = lrctl.attach(opt, policy=warmup, spawn=False, resume=state)
    try:
        used: list[float] = []
        opt.register_step_pre_hook(lambda o, *_: used.append(o.param_groups[0]["lr"]))
        ctl.step(1.0, grad_norm=1.0)
        opt.step()
        assert used == at_checkpoint and at_checkpoint[0] < 0.01
    finally:
        ctl.close()


def test_a_run_that_gained_a_param_group_resumes_from_its_state(
        controller: ControllerProc) -> None:
    """Unfreezing a layer mid-run (add_param_group), then resuming the natural way (build
    the optimizer with both groups, load its state, attach with resume=state) raised
    "the saved lrctl state has 1 param group(s), this optimizer has 2" (found by an
    adversarial pass). The run goes on with its groups; the added one keeps its own LR,
    as it did before the checkpoint."""
    warmup = {"version": 1, "policies": [{"kind": "warmup", "steps": 20}]}
    frozen, head = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(2))
    opt = torch.optim.SGD([frozen], lr=0.1)
    first = lrctl.attach(opt, policy=warmup, sync=True, spawn=False)
    _step_all(first, [1.0] * 10, 0, 5)
    opt.add_param_group({"params": [head], "lr": 0.05})
    with pytest.warns(RuntimeWarning, match="applied to the first ones only"):
        _step_all(first, [1.0] * 10, 5, 10)
    state, saved_opt = first.state_dict(), opt.state_dict()
    lr_at_10 = first.lr
    first.close(end_run=False)

    again_opt = torch.optim.SGD([{"params": [frozen]}, {"params": [head], "lr": 0.05}],
                                lr=0.1)
    again_opt.load_state_dict(saved_opt)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        again = lrctl.attach(again_opt, policy=warmup, sync=True, spawn=False, resume=state)
        try:
            assert again.lr == lr_at_10
            _step_all(again, [1.0] * 20, 10, 15)
            assert again.lr[0] > lr_at_10[0]  # the warmup goes on where it was
            assert again_opt.param_groups[0]["lr"] == again.lr[0]
            assert again_opt.param_groups[1]["lr"] == 0.05  # its own, as before
        finally:
            again.close()
    assert any("applied to the first ones only" in str(w.message) for w in caught)


@pytest.mark.parametrize("field", ["lrs", "policy_source"])
def test_a_saved_session_with_bad_fields_is_refused_and_adopts_nothing(
        controller: ControllerProc, field: str) -> None:
    """An adversarial pass's find: a resume state whose engine LRs said inf was answered
    with an error, yet adopted; from then on `lrctl runs` failed for every run, and the
    run could not be checkpointed. A non-string policy source raised inside the hello.
    The README: a session that cannot be rebuilt refuses the hello and changes nothing."""
    first = lrctl.attach(_opt(), policy=POLICY, sync=True, spawn=False, run_name="bad-state")
    _step_all(first, [1.0] * 5, 0, 5)
    state = first.state_dict()
    first.close(end_run=False)
    session = json.loads(json.dumps(state["session"]))
    if field == "lrs":
        session["engine"]["lrs"] = ["inf"]
    else:
        session["policy_source"] = 7
    with pytest.raises(lrctl.client.PolicyRejected, match="is not usable"):
        lrctl.attach(_opt(), policy=POLICY, sync=True, spawn=False,
                     resume={**state, "session": session})
    runs = subprocess.run([sys.executable, "-m", "lrctl", "runs", "--json"],
                          capture_output=True, text=True, timeout=60)
    assert runs.returncode == 0, runs.stderr
    assert all(math.isfinite(x) for r in json.loads(runs.stdout) for x in r["lrs"])
    assert "internal error" not in controller.log.read_text()


def test_state_dict_of_a_run_too_large_for_a_frame_says_so(controller: ControllerProc) -> None:
    """A divergence window of 40 000 (allowed: up to 100 000) makes the run's state more
    than a frame may carry: the hook said the controller did not answer in time, and
    suggested a longer timeout, which could not help."""
    policy = {"version": 1, "policies": [{"kind": "divergence", "window": 40_000,
                                          "min_samples": 40_000}]}
    opt = torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=0.1)
    with lrctl.attach(opt, policy=policy, spawn=False, sync=True) as ctl:
        for t in range(41_000):
            ctl.step(1.0 + (t % 7) / 10, grad_norm=1.0 + (t % 5) / 10)
        with warnings.catch_warnings(record=True) as said:
            warnings.simplefilter("always")
            state = ctl.state_dict()
        texts = [str(w.message) for w in said]
        assert "session" not in state and state["step"] == 41_000
        assert any("larger than 1 MiB" in t for t in texts), texts
        assert not any("got no answer" in t for t in texts), texts
        ctl.step(1.0, grad_norm=1.0)  # the run goes on
        assert ctl.connected
