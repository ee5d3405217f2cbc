"""Sync mode through a real controller gives exactly the in-process LR sequence."""

from __future__ import annotations

import math
import select
import signal
import time
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from daemon_helpers import POLICIES, ControllerProc, losses

import lrctl
from lrctl._link import Link
from lrctl.protocol import FrameDecoder


def _optimizer(lrs: list[float], tensor_lr: bool = False) -> torch.optim.Optimizer:
    groups = [{"params": [torch.nn.Parameter(torch.ones(3))],
               "lr": torch.tensor(lr, dtype=torch.float64) if tensor_lr else lr} for lr in lrs]
    if tensor_lr:
        return torch.optim.Adam(groups, foreach=False)
    return torch.optim.SGD(groups)


def _drive(ctl: lrctl.Controller, engine: lrctl.Engine, curve: list[float],
           start: int = 0) -> list[tuple[int, list[float], list[float]]]:
    """Step both; return the steps where they disagree."""
    mismatches = []
    for t, loss in enumerate(curve[start:], start):
        grad = 1.0 + (t % 7) * 0.1
        ctl.step(loss, grad_norm=grad)
        expected = engine.observe(t, loss, grad)
        if not all(math.isclose(a, b, rel_tol=0, abs_tol=0) for a, b in zip(
                ctl.lr, expected, strict=True)):
            mismatches.append((t, ctl.lr, expected))
    return mismatches


@pytest.mark.parametrize("policy", ["default.yaml", "rangetest.yaml", "plateau.yaml", "sgdr.yaml",
                                    "divergence.yaml", "cyclical.yaml"])
def test_sync_matches_load_policy(controller: ControllerProc, policy: str) -> None:
    path = str(POLICIES / policy)
    lrs = [0.1, 0.01]
    opt = _optimizer(lrs)
    curve = losses(600, seed=1, spikes=(250, 251, 400))
    with lrctl.attach(opt, policy=path, sync=True, spawn=False, run_name=policy) as ctl:
        engine = lrctl.load_policy(path, lrs)
        assert ctl.lr == engine.lrs  # the welcome applies the LR of the first step
        assert _drive(ctl, engine, curve) == []
        assert [d.to_dict() for d in ctl.decisions] == [d.to_dict() for d in engine.decisions]
        assert ctl.should_stop == engine.should_stop
    assert [g["lr"] for g in opt.param_groups] == engine.applied_lrs


@pytest.mark.parametrize("spin_s", [0.0, 1000.0])
def test_the_wait_finds_each_answer_with_or_without_its_spin(
        controller: ControllerProc, spin_s: float) -> None:
    """The sync wait checks for the answer without sleeping for up to ``spin_s`` first:
    it returns as soon as the answer is in (a 1000 s spin that missed it would hang the
    test), the decisions are those of the engine, and a stalled controller still costs
    the sync timeout, not the spin."""
    path = str(POLICIES / "divergence.yaml")
    opt = _optimizer([0.1])
    curve = losses(300, seed=4, spikes=(120, 121))
    with lrctl.attach(opt, policy=path, sync=True, spawn=False, timeout=0.2) as ctl:
        assert ctl._link is not None
        ctl._link.spin_s = spin_s
        engine = lrctl.load_policy(path, [0.1])
        assert _drive(ctl, engine, curve) == []
        assert engine.decisions and len(ctl.decisions) == len(engine.decisions)
        controller.proc.send_signal(signal.SIGSTOP)  # type: ignore[union-attr]
        try:
            with pytest.warns(RuntimeWarning, match="no decision within"):
                ctl.step(1.0, grad_norm=1.0)
        finally:
            controller.proc.send_signal(signal.SIGCONT)  # type: ignore[union-attr]


def test_dict_and_text_policies_and_tensor_lrs_in_place(controller: ControllerProc) -> None:
    policy = {"version": 1, "policies": [{"kind": "warmup", "steps": 20},
                                         {"kind": "plateau", "patience": 5, "factor": 0.5}]}
    opt = _optimizer([0.02, 0.004], tensor_lr=True)
    lr_tensors = [g["lr"] for g in opt.param_groups]
    with lrctl.attach(opt, policy=policy, sync=True, spawn=False) as ctl:
        engine = lrctl.load_policy(policy, [0.02, 0.004])
        assert _drive(ctl, engine, [1.0] * 60) == []
    assert [g["lr"] for g in opt.param_groups] == lr_tensors  # same tensor objects
    assert [float(t) for t in lr_tensors] == engine.applied_lrs
    ratio = float(lr_tensors[1]) / float(lr_tensors[0])
    assert math.isclose(ratio, 0.2)

    text = (POLICIES / "plateau.yaml").read_text()
    opt = _optimizer([0.1])
    with lrctl.attach(opt, policy=text, sync=True, spawn=False) as ctl:
        assert _drive(ctl, lrctl.load_policy(text, [0.1]), losses(200, seed=3)) == []


def test_async_applies_each_decision_at_exactly_the_next_step(
        controller: ControllerProc) -> None:
    """Async: the optimizer step of step t uses the answer to t - 1 — never the answer to
    t, even when it has already arrived (then a seeded run would depend on timing), and
    never an older one (the pre-step hook waits for it, bounded by ``timeout``)."""
    opt = _optimizer([0.1])
    path = str(POLICIES / "rangetest.yaml")  # its sweep moves the LR every step
    engine = lrctl.load_policy(path, [0.1])
    with lrctl.attach(opt, policy=path, spawn=False) as ctl:
        lrs_for_t = engine.applied_lrs  # the welcome: the LRs of step 0
        seen = set()
        for t, loss in enumerate(losses(60)):
            ctl.step(loss, grad_norm=1.0)
            if t % 2:  # half the steps: the answer to t is here before t's optimizer step
                assert ctl._link is not None
                ctl._link.wait(lambda t=t: ctl._acked >= t, 10.0)
            opt.step()
            assert ctl.lr == lrs_for_t == [g["lr"] for g in opt.param_groups], t
            seen.add(tuple(lrs_for_t))
            lrs_for_t = engine.observe(t, loss, 1.0)
    assert len(seen) > 30  # the policy moved the LR nearly every step


def test_the_pre_step_hook_reads_only_for_the_answer_its_step_uses(
        controller: ControllerProc) -> None:
    """With the answer to t - 1 in when step t is reported, the optimizer's pre-step hook
    makes no read (the answer to t is the next step()'s to read), and the LRs are still
    exactly those of the answer to t - 1."""
    opt = _optimizer([0.1])
    path = str(POLICIES / "rangetest.yaml")
    engine = lrctl.load_policy(path, [0.1])
    with lrctl.attach(opt, policy=path, spawn=False) as ctl:
        link = ctl._link
        assert link is not None
        reads = 0
        real_read = link._read

        def counted(*args: Any) -> None:
            nonlocal reads
            reads += 1
            real_read(*args)

        lrs_for_t = engine.applied_lrs
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a hook error it swallowed (a warning) fails too
            for t, loss in enumerate(losses(40)):
                assert link.wait(lambda: ctl._acked >= ctl._reported, 10.0)
                ctl.step(loss, grad_norm=1.0)
                link._read = counted  # type: ignore[method-assign]
                opt.step()
                link._read = real_read  # type: ignore[method-assign]
                assert ctl.lr == lrs_for_t == [g["lr"] for g in opt.param_groups], t
                lrs_for_t = engine.observe(t, loss, 1.0)
        assert reads == 0


class _CountedPoll:
    """A hook link's poller that counts its polls."""

    def __init__(self, poller: select.poll) -> None:
        self.poller = poller
        self.polls = 0

    def poll(self, timeout: float | None = None) -> list[tuple[int, int]]:
        self.polls += 1
        return self.poller.poll(timeout)


def test_step_reads_the_answer_that_came_without_polling_first(
        controller: ControllerProc) -> None:
    """The answer to the step before has come when a step is reported: step() reads it
    with one recv, no poll first; a socket that turns out empty costs nothing else."""
    opt = _optimizer([0.1])
    path = str(POLICIES / "rangetest.yaml")
    engine = lrctl.load_policy(path, [0.1])
    with lrctl.attach(opt, policy=path, spawn=False) as ctl:
        link = ctl._link
        assert link is not None and link._sock is not None
        counted = _CountedPoll(link._poller)
        link._poller = counted  # type: ignore[assignment]
        arrived = select.poll()
        arrived.register(link._sock, select.POLLIN)
        reads = 0
        for t, loss in enumerate(losses(30)):
            expect = ctl._acked < t - 1  # the answer to t - 1: in, unread
            polls = counted.polls
            ctl.step(loss, grad_norm=1.0)
            assert ctl._acked >= t - 1
            if expect:  # read by step(): one recv, no poll
                reads += 1
                assert counted.polls == polls
            opt.step()
            engine.observe(t, loss, 1.0)
            if ctl._acked < t:  # (it may have come before step()'s recv: both read at once)
                assert arrived.poll(10_000)  # the answer to t is in the socket, unread
        assert reads >= 5
        link.pump()  # drained
        link._read(expect=True)  # nothing there: no error, no message, still up
        assert link.connected and ctl._acked == 29


def test_async_runs_are_bit_identical(controller: ControllerProc) -> None:
    """Two async runs of the same seeded loop, a policy that moves the LR every step."""
    policy = {"version": 1, "policies": [{"kind": "cyclical", "base_lr": 0.01,
                                          "max_lr": 0.1, "step_size_up": 3}]}

    def run() -> list[torch.Tensor]:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Tanh(),
                                    torch.nn.Linear(32, 1))
        opt = torch.optim.Adam(model.parameters(), lr=0.05)
        g = torch.Generator().manual_seed(1)
        with lrctl.attach(opt, policy=policy, spawn=False) as ctl:
            for _ in range(150):
                x = torch.randn(16, 8, generator=g)
                loss = (model(x) - x.sum(1, keepdim=True)).pow(2).mean()
                opt.zero_grad()
                loss.backward()
                ctl.step(loss)
                opt.step()
        return [p.detach().clone() for p in model.parameters()]

    first, second = run(), run()
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))


def test_every_n_reports_every_nth_step(controller: ControllerProc) -> None:
    opt = _optimizer([0.1])
    policy = {"version": 1, "policies": [{"kind": "warmup", "steps": 40}]}
    engine = lrctl.load_policy(policy, [0.1])
    with lrctl.attach(opt, policy=policy, sync=True, every=4, spawn=False) as ctl:
        for t in range(20):
            ctl.step(torch.tensor(1.0))
            if t % 4 == 0:
                assert ctl.lr == engine.observe(t, 1.0)
        ctl.report(val_loss=0.5)  # forces the next step to report
        ctl.step(1.0)
        assert ctl.lr == engine.observe(20, 1.0, val_loss=0.5)


def test_grad_norm_is_computed_when_not_given_and_reused_when_given(
        controller: ControllerProc, monkeypatch: pytest.MonkeyPatch) -> None:
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model(torch.ones(2, 4)).pow(2).sum().backward()
    expected = torch.nn.utils.get_total_norm([p.grad for p in model.parameters()]).item()
    sent: list[dict] = []
    real_send = Link.send_obs

    def spy(self: Link, step: int, frame: bytes) -> None:
        sent.extend(FrameDecoder().feed(frame))
        real_send(self, step, frame)

    monkeypatch.setattr(Link, "send_obs", spy)
    with lrctl.attach(opt, sync=True, spawn=False) as ctl:
        ctl.step(torch.tensor(1.0))
        assert sent[-1]["g"] == pytest.approx(expected, rel=1e-6)

        def no_recompute(*args: object, **kwargs: object) -> None:
            raise AssertionError("grad norm recomputed although the caller passed it")

        monkeypatch.setattr(torch.nn.utils, "get_total_norm", no_recompute)
        clipped = torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5, foreach=True)
        ctl.step(torch.tensor(1.0), grad_norm=clipped)
        assert sent[-1]["g"] == pytest.approx(clipped.item())
        assert not [w for w in ctl._warned if w == "internal"]


def test_total_steps_reaches_the_anneal_and_survives_a_restart(
        controller: ControllerProc, tmp_path: Path) -> None:
    """attach(total_steps=N) drives the anneal exactly as load_policy(..., total_steps=N),
    and a controller killed mid-anneal restores the run length with the session."""
    path = tmp_path / "anneal.yaml"
    path.write_text("version: 1\npolicies:\n  - kind: rangetest\n    growth: 1.2\n"
                    "  - kind: anneal\n    shape: linear\n    end_factor: 0.1\n")
    total = 300
    curve = losses(total, seed=4)
    engine = lrctl.load_policy(path, [0.1], total_steps=total)
    opt = _optimizer([0.1])
    with pytest.warns(RuntimeWarning, match="lost the controller"), lrctl.attach(
            opt, policy=str(path), sync=True, spawn=False, total_steps=total,
            max_backoff=0.05) as ctl:
        assert _drive(ctl, engine, curve[:150]) == []
        assert "anneal_start" in [d.action for d in ctl.decisions]
        controller.kill9()
        for t in range(150, 200):  # down: the hook holds the LR and buffers the statistics
            ctl.step(curve[t], grad_norm=1.0 + (t % 7) * 0.1)
            engine.observe(t, curve[t], 1.0 + (t % 7) * 0.1)
        assert not ctl.connected
        controller.start()
        while not ctl.connected:
            ctl._link.wait(lambda: ctl.connected, 0.2)  # type: ignore[union-attr]
            ctl._pump()
        assert _drive(ctl, engine, curve, start=200) == []
    assert [d.action for d in engine.decisions][-1] == "anneal_done"
    assert opt.param_groups[0]["lr"] == pytest.approx(engine.lrs[0])


def test_attach_rejects_a_bad_total_steps() -> None:
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="total_steps"):
            lrctl.attach(_optimizer([0.1]), total_steps=bad, spawn=False)


def test_a_resumed_hook_can_give_the_run_length(controller: ControllerProc,
                                                tmp_path: Path) -> None:
    """First attach without total_steps, resume with it: the controller's session takes
    the new length (logged, checkpointed) and the anneal starts from there."""
    path = tmp_path / "anneal.yaml"
    path.write_text("version: 1\npolicies:\n  - kind: anneal\n    shape: linear\n")
    engine = lrctl.load_policy(path, [0.1])
    opt = _optimizer([0.1])
    curve = losses(100, seed=6)
    ctl = lrctl.attach(opt, policy=str(path), sync=True, spawn=False)
    assert _drive(ctl, engine, curve[:30]) == []
    assert [d.action for d in ctl.decisions] == ["anneal_inactive"]
    run_key = ctl.run_key
    ctl.close(end_run=False)
    engine.total_steps = 100
    with lrctl.attach(opt, policy=str(path), sync=True, spawn=False, resume=run_key,
                      start_step=30, total_steps=100) as again:
        assert _drive(again, engine, curve, start=30) == []
        assert [d.action for d in again.decisions] == ["anneal_start", "anneal_done"]
    assert opt.param_groups[0]["lr"] == 0.0


def test_close_waits_for_the_answers_to_the_last_observations(
        controller: ControllerProc, tmp_path: Path) -> None:
    """Async: the decision made from the very last step (the anneal reaching its end)
    is in ctl.decisions after close(), and the run ended on the controller."""
    path = tmp_path / "anneal.yaml"
    path.write_text("version: 1\npolicies:\n  - kind: anneal\n")
    opt = _optimizer([0.1])
    with lrctl.attach(opt, policy=str(path), spawn=False, total_steps=50) as ctl:
        for _ in range(50):
            ctl.step(1.0, grad_norm=1.0)
            opt.step()
        run_key = ctl.run_key
    assert [(d.step, d.action) for d in ctl.decisions] == [(0, "anneal_start"),
                                                           (49, "anneal_done")]
    # A bye has no answer: the controller ends the run once it reads it, a paced hook's
    # at its next look, which a `runs` asked on a new connection (read as it comes) may
    # precede.
    deadline = time.monotonic() + 30
    while any(r["run"] == run_key
              for r in lrctl.client.request({"t": "runs"}, controller.socket)["runs"]):
        assert time.monotonic() < deadline, "the run never ended on the controller"
        time.sleep(0.02)  # polling on the condition
