"""Operator verbs on a live run: runs, set-lr (held, then released), pause/resume."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import torch
from daemon_helpers import ControllerProc

import lrctl

WARMUP = {"version": 1, "policies": [{"kind": "warmup", "steps": 10, "start_factor": 0.1}]}


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "lrctl", *args], capture_output=True,
                          text=True, timeout=60)


def test_set_lr_is_held_for_n_steps_recorded_then_released(controller: ControllerProc) -> None:
    opt = torch.optim.SGD([{"params": [torch.nn.Parameter(torch.ones(1))], "lr": 0.1},
                           {"params": [torch.nn.Parameter(torch.ones(1))], "lr": 0.05}])
    engine = lrctl.load_policy(WARMUP, [0.1, 0.05])
    with lrctl.attach(opt, policy=WARMUP, sync=True, spawn=False, run_name="op") as ctl:
        for t in range(20):
            ctl.step(1.0)
            engine.observe(t, 1.0)
        out = _cli("set-lr", "op", "0.02", "--steps", "3")
        assert out.returncode == 0, out.stderr
        assert "held for 3 steps" in out.stdout
        lrs = []
        for t in range(20, 25):
            ctl.step(1.0)
            lrs.append(ctl.lr)
            engine.observe(t, 1.0)
        # Steps 20-22 run at the manual LR (group ratios kept), then the policy's LR returns:
        # 3 steps, as the records say, also in sync mode (where the answer to a step sets
        # that step's own LR, so the answer to step 22 still holds it).
        assert lrs[:3] == [[0.02, 0.01]] * 3
        assert lrs[3:] == [engine.applied_lrs] * 2
        actions = [(d.policy, d.action) for d in ctl.decisions]
        assert ("operator", "set_lr") in actions and ("operator", "release_lr") in actions
        held = next(d for d in ctl.decisions if d.action == "set_lr")
        assert held.reason.endswith("held for 3 steps (through step 22)")
        released = next(d for d in ctl.decisions if d.action == "release_lr")
        assert (released.step, released.reason) == (23, "manual override ended after step 22")
        table = _cli("runs")
        assert table.returncode == 0 and "op-" in table.stdout
        assert "operator.release_lr" in table.stdout


def test_an_lr_another_group_cannot_take_is_refused_and_changes_nothing(
        controller: ControllerProc) -> None:
    """An adversarial pass's find: group 1 at 1000× group 0, ``set-lr 1e306`` made its LR
    inf; every answer to that run, its checkpoints and ``lrctl runs`` (for every run)
    then failed on the non-JSON float."""
    opt = torch.optim.SGD([{"params": [torch.nn.Parameter(torch.ones(1))], "lr": 0.001},
                           {"params": [torch.nn.Parameter(torch.ones(1))], "lr": 1.0}])
    with lrctl.attach(opt, policy=WARMUP, sync=True, spawn=False, run_name="big") as ctl:
        ctl.step(1.0)
        out = _cli("set-lr", "big", "1e306")
        assert out.returncode == 1 and "group 1" in out.stderr and "smaller" in out.stderr
        assert "Traceback" not in out.stderr and "internal" not in out.stderr
        ctl.step(1.0)
        assert ctl.connected and all(x < 1e300 for x in ctl.lr)
        assert not any(d.policy == "operator" for d in ctl.decisions)
        table = _cli("runs")
        assert table.returncode == 0 and "big-" in table.stdout
    # base="loop": the loop's LRs times set-lr's over the initial LR (a review's find)
    loop_opt = torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=1e-3)
    with lrctl.attach(loop_opt, base="loop", sync=True, spawn=False, run_name="loopy") as ctl:
        ctl.step(1.0)
        loop_opt.step()
        out = _cli("set-lr", "loopy", "1e308")
        assert out.returncode == 1 and "base='loop'" in out.stderr and "smaller" in out.stderr
        ctl.step(1.0)
        assert ctl.lr == [1e-3] and _cli("runs").returncode == 0


def test_the_runs_table_is_reused_for_a_moment_but_never_hides_a_change(
        controller: ControllerProc) -> None:
    """``runs`` answers are built at most every quarter second (many peers asking at once
    starved the training runs: 300 runs, 20 peers, the reference run from 640 answers/s
    to 3/s); a run that came or went, and an operator's change, show at once."""
    from lrctl.client import request

    opt = torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=0.1)
    with lrctl.attach(opt, policy=WARMUP, sync=True, spawn=False, run_name="first") as ctl:
        ctl.step(1.0)
        before = request({"t": "runs"})["runs"]
        assert [r["run_name"] for r in before] == ["first"]
        opt2 = torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=0.2)
        with lrctl.attach(opt2, policy=WARMUP, sync=True, spawn=False,
                          run_name="second") as other:
            other.step(1.0)
            assert {r["run_name"] for r in request({"t": "runs"})["runs"]} == {
                "first", "second"}
            assert _cli("set-lr", "first", "0.05").returncode == 0
            (first,) = [r for r in request({"t": "runs"})["runs"] if r["run_name"] == "first"]
            assert first["override"] and first["lrs"] == [0.05]
        assert [r["run_name"] for r in request({"t": "runs"})["runs"]] == ["first"]


def test_pause_records_shadow_decisions_and_holds_the_lr(controller: ControllerProc) -> None:
    opt = torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=0.1)
    with lrctl.attach(opt, policy=WARMUP, sync=True, spawn=False, run_name="pz") as ctl:
        ctl.step(1.0)
        held = ctl.lr
        assert _cli("pause", "pz").returncode == 0
        again = _cli("pause", "pz")  # refused, nothing recorded (a newcomer's find)
        assert again.returncode == 1 and "already in shadow mode" in again.stderr
        for _ in range(15):  # warmup would act, and its phase event is recorded as shadow
            ctl.step(1.0)
        assert ctl.lr == held and ctl.mode == "shadow"
        assert any(d.shadow for d in ctl.decisions if d.policy != "operator")
        assert "shadow" in _cli("runs").stdout
        assert _cli("resume", "pz").returncode == 0
        again = _cli("resume", "pz")
        assert again.returncode == 1 and "already active" in again.stderr
        ctl.step(1.0)
        assert ctl.lr == [0.1] and ctl.mode == "active"
        assert [d.action for d in ctl.decisions if d.policy == "operator"] == ["pause", "resume"]


def test_shadow_mode_from_yaml_observes_without_acting(controller: ControllerProc) -> None:
    opt = torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=0.1)
    with lrctl.attach(opt, policy={**WARMUP, "mode": "shadow"}, sync=True, spawn=False) as ctl:
        for _ in range(12):
            ctl.step(1.0)
            assert ctl.lr == [0.1]
        assert ctl.decisions and all(d.shadow for d in ctl.decisions)


def test_operator_errors_are_clear(controller: ControllerProc) -> None:
    out = _cli("set-lr", "nobody", "0.1")  # exit 2, as decisions and report for such a RUN
    assert out.returncode == 2 and "no run named 'nobody'" in out.stderr
    assert "runs --all" in out.stderr and "--socket" in out.stderr  # another socket's?
    for verb in (("pause",), ("rollback",), ("decay", "--cancel"), ("reload",)):
        out = _cli(verb[0], "nobody", *verb[1:])
        assert out.returncode == 2 and "no run named 'nobody'" in out.stderr, (verb, out)
    out = _cli("set-lr", "x", "nan")
    assert out.returncode == 2 and "finite" in out.stderr
    for negative in ("-inf", "-1e-3", "-0.1", "-2"):  # a number, not an unknown option
        out = _cli("set-lr", "x", negative, "--steps", "3")
        assert out.returncode == 2 and "finite and >= 0" in out.stderr, (negative, out.stderr)
    status = _cli("status")
    assert status.returncode == 0 and f"pid {controller.pid}" in status.stdout


def test_verbs_without_a_controller_say_so(short_dir) -> None:  # type: ignore[no-untyped-def]
    out = _cli("runs")
    assert out.returncode == 1 and "no controller answers" in out.stderr
    assert "start one with 'lrctl serve'" in out.stderr
    elsewhere = str(short_dir / "elsewhere.sock")  # the hint names the socket asked
    out = _cli("status", "--socket", elsewhere)
    assert f"start one with 'lrctl serve --socket {elsewhere}'" in out.stderr
    stop = _cli("stop")
    assert stop.returncode == 1 and "nothing to stop" in stop.stderr
    # An address no socket can have: one line that says why, no traceback.
    for verb in ("status", "runs", "stop"):
        bad = _cli(verb, "--socket", str(short_dir / ("x" * 120) / "c.sock"))
        assert bad.returncode == 1, bad.stderr
        assert "byte limit" in bad.stderr and "Traceback" not in bad.stderr
        assert len(bad.stderr.strip().splitlines()) == 1
    # An adversarial pass's finds: a TCP address's hint made a Unix socket named
    # ./tcp:/HOST:PORT, and an unreadable token file was blamed on a missing controller.
    import socket

    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    tcp = _cli("status", "--socket", f"tcp://127.0.0.1:{port}")
    assert f"start one with 'lrctl serve --tcp 127.0.0.1:{port} --token-file FILE'" in \
        tcp.stderr
    missing = str(short_dir / "no-token")
    token = subprocess.run([sys.executable, "-m", "lrctl", "status", "--socket",
                            f"tcp://127.0.0.1:{port}"], capture_output=True, text=True,
                           timeout=60, env={**os.environ, "LRCTL_TOKEN_FILE": missing})
    assert token.returncode == 1
    assert f"cannot read the token file $LRCTL_TOKEN_FILE names {missing}" in token.stderr


def test_a_hung_controller_is_told_apart_from_none(controller: ControllerProc) -> None:
    """An adversarial pass's find: a SIGSTOPped controller got "start one with lrctl
    serve" and `lrctl stop` said "nothing to stop"."""
    os.kill(controller.pid, signal.SIGSTOP)
    try:
        stop = _cli("stop", "--timeout", "1")
    finally:
        os.kill(controller.pid, signal.SIGCONT)
    assert stop.returncode == 1 and "did not answer in time" in stop.stderr
    assert f"kill {controller.pid}" in stop.stderr and "nothing to stop" not in stop.stderr


def test_clearing_no_manual_lr_records_nothing(controller: ControllerProc) -> None:
    """It said 'manual override cleared' and journaled an empty release_lr decision."""
    opt = torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=0.1)
    with lrctl.attach(opt, policy={**WARMUP}, sync=True, spawn=False) as ctl:
        ctl.step(1.0, grad_norm=1.0)
        before = len(ctl.decisions)
        out = _cli("set-lr", ctl.run_key, "--clear")
        assert out.returncode == 1 and "no manual LR is set" in out.stderr, out.stderr
        out = _cli("set-lr", ctl.run_key, "0.2", "--clear")
        assert out.returncode == 2 and "not both" in out.stderr
        assert _cli("set-lr", ctl.run_key, "0.2").returncode == 0
        assert _cli("set-lr", ctl.run_key, "--clear").returncode == 0
        ctl.step(1.0, grad_norm=1.0)
        actions = [d.action for d in ctl.decisions[before:]]
        assert actions.count("release_lr") == 1 and actions.count("set_lr") == 1


GUARDED = {"version": 1, "max_lr": 0.5,
           "policies": [{"kind": "divergence", "min_samples": 8, "cooldown": 1}]}


def test_set_lr_past_max_lr_is_refused_and_decisions_under_it_say_they_did_not_apply(
        controller: ControllerProc) -> None:
    """A typo (``1e9`` for ``1e-9``) once got past the file's ``max_lr``; and under a
    manual LR the guard's back-offs were recorded as LR changes while the optimizer
    kept the manual LR: the audit no longer matched what ran."""
    opt = torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=0.1)
    with lrctl.attach(opt, policy=GUARDED, sync=True, spawn=False, run_name="ovr") as ctl:
        for _ in range(20):
            ctl.step(1.0, grad_norm=1.0)
            opt.step()
        out = _cli("set-lr", "ovr", "1e9")
        assert out.returncode == 1 and "max_lr 0.5" in out.stderr, out.stderr
        assert "Traceback" not in out.stderr
        assert not any(d.action == "set_lr" for d in ctl.decisions)
        assert _cli("set-lr", "ovr", "0.2").returncode == 0
        for _ in range(3):  # a blow-up under the manual LR
            ctl.step(1e6, grad_norm=1e6)
            opt.step()
            assert opt.param_groups[0]["lr"] == 0.2
        cuts = [d for d in ctl.decisions if d.action == "backoff"]
        assert cuts, [d.action for d in ctl.decisions]
        for d in cuts:
            assert d.evidence.get("overridden") is True
            assert "not applied: an operator's manual LR is in force" in d.reason
        assert _cli("set-lr", "ovr", "--clear").returncode == 0
        ctl.step(1.0, grad_norm=1.0)
        opt.step()
        released = [d for d in ctl.decisions if d.action == "release_lr"]
        assert released and released[-1].new_lrs[0] < 0.1  # the cuts apply from now on
        assert opt.param_groups[0]["lr"] == released[-1].new_lrs[0]


def test_a_run_name_two_runs_share_is_refused_with_exit_2(controller: ControllerProc) -> None:
    params = [torch.nn.Parameter(torch.ones(1)) for _ in range(2)]
    opts = [torch.optim.SGD([p], lr=0.1) for p in params]
    with lrctl.attach(opts[0], policy=WARMUP, sync=True, spawn=False, run_name="twin") as a, \
            lrctl.attach(opts[1], policy=WARMUP, sync=True, spawn=False, run_name="twin") as b:
        a.step(1.0)
        b.step(1.0)
        out = _cli("set-lr", "twin", "0.02")
        assert out.returncode == 2 and "'twin' matches 2 runs" in out.stderr, out
        assert a.run_key in out.stderr and b.run_key in out.stderr
        a.step(1.0)
        b.step(1.0)
        assert a.lr == b.lr  # the same policy at the same step: nothing was set on either
        assert not [d for d in (*a.decisions, *b.decisions) if d.policy == "operator"]


def test_an_lr_far_above_the_runs_is_refused_without_force(controller: ControllerProc) -> None:
    """A newcomer's find: with no max_lr in the file, ``set-lr RUN 1e3`` (for 1e-3) was
    taken without a word. More than 100x both the initial LR and the LR now is refused,
    with nothing recorded, unless ``--force``; the initial LR is always allowed back."""
    opt = torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=1e-3)
    with lrctl.attach(opt, policy=WARMUP, sync=True, spawn=False, run_name="typo") as ctl:
        ctl.step(1.0)  # warmup: 1e-4 now
        out = _cli("set-lr", "typo", "1e3")
        assert out.returncode == 1 and "--force" in out.stderr, out.stderr
        assert "(at most 0.001)" in out.stderr and "Traceback" not in out.stderr
        ctl.step(1.0)
        assert not any(d.policy == "operator" for d in ctl.decisions)
        assert _cli("set-lr", "typo", "0.1").returncode == 0  # 100x the initial: allowed
        assert _cli("set-lr", "typo", "1e3", "--force").returncode == 0
        ctl.step(1.0)
        assert ctl.lr == [1e3]
        assert [d.evidence["lr"] for d in ctl.decisions if d.action == "set_lr"] == [0.1, 1e3]
        both = _cli("set-lr", "typo", "--clear", "--force")
        assert both.returncode == 2 and "not both" in both.stderr
