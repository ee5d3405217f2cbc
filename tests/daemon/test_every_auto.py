"""``every="auto"``: batched reports through a real controller see every step, decide
exactly what per-step reports decide, and apply a spike's back-off at t + 1."""

from __future__ import annotations

import itertools
import math
from time import perf_counter

import pytest
import torch
from daemon_helpers import POLICIES, ControllerProc, losses

import lrctl
from lrctl._batching import Batching
from lrctl.wire.decoder import FrameDecoder
from lrctl.wire.errors import ProtocolError
from lrctl.wire.messages import encode_obs, prior_steps


def _optimizer(lr: float = 0.1) -> torch.optim.Optimizer:
    return torch.optim.SGD([torch.nn.Parameter(torch.ones(3))], lr=lr)


def _grad(t: int) -> float:
    return 1.0 + (t % 7) * 0.1


def _run(curve: list[float], k: int | None, quiet_path: bool = True,
         frames: list[dict] | None = None, settle: bool = False,
         tensors: bool = False) -> tuple[list[dict], list[float], int]:
    """Decisions, the LR each optimizer step used, the last step reported. ``quiet_path``
    False: every step takes the full way (``_quietly`` always declines);
    ``frames``: collects the observations sent; ``settle``: every answer is in before
    each step (no timing in the outcome); ``tensors``: the loop hands CPU tensors."""
    path = str(POLICIES / "default.yaml")
    opt = _optimizer()
    with lrctl.attach(opt, policy=path, every="auto" if k else 1, spawn=False,
                      run_name="auto", timeout=30.0) as ctl:  # a loaded machine is no excuse
        if k:
            assert ctl._batch is not None
            ctl._batch.fix_k(k)  # what the timings would choose on a fast loop
        if not quiet_path:
            ctl._quietly = lambda *args: False  # type: ignore[method-assign]
        if frames is not None:
            assert ctl._link is not None
            send = ctl._link.send_obs
            ctl._link.send_obs = lambda t, frame: (  # type: ignore[method-assign]
                frames.extend(FrameDecoder().feed(frame)[0] for _ in [0]), send(t, frame))
        applied: list[float] = []
        for t, loss in enumerate(curve):
            if settle:
                assert ctl._link is not None
                assert ctl._link.wait(lambda: ctl._acked >= ctl._reported, 30.0)
            if tensors:
                ctl.step(torch.tensor(loss, dtype=torch.float64),
                         grad_norm=torch.tensor(_grad(t), dtype=torch.float64))
            else:
                ctl.step(loss, grad_norm=_grad(t))
            opt.step()
            applied.append(opt.param_groups[0]["lr"])
        assert ctl.steps_taken == len(curve)
    return [d.to_dict() for d in ctl.decisions], applied, ctl._reported


@pytest.mark.parametrize("k", [4, 16])
def test_batched_reports_decide_what_per_step_reports_decide(
        controller: ControllerProc, k: int) -> None:
    curve = losses(900, seed=2, spikes=(300, 301, 620))
    per_step, per_step_lrs, _ = _run(curve, None)
    batched, batched_lrs, last = _run(curve, k)
    # Every step was observed, in order: the decisions are those of per-step reports.
    assert batched == per_step
    assert last == len(curve) - 1
    backoffs = [d for d in batched if d["action"] == "backoff"]
    assert backoffs
    # A back-off decided from a spike is in effect at the very next step, as with
    # every=1: a spike stands out (a new high, or not finite), so it reports at once.
    # (A non-finite step is skipped by the guard: its LR is never used, so not checked.)
    checked = [d for d in backoffs if math.isfinite(curve[d["step"] + 1])]
    assert checked
    for d in checked:
        assert math.isclose(batched_lrs[d["step"] + 1], d["new_lrs"][0]), d
        assert batched_lrs[d["step"] + 1] == per_step_lrs[d["step"] + 1]


@pytest.mark.parametrize("tensors", [False, True])
def test_the_quiet_path_does_what_the_full_way_does(
        controller: ControllerProc, monkeypatch: pytest.MonkeyPatch, tensors: bool) -> None:
    """A quiet step's shortcut (``Controller._quietly``) sends the same frames, gets
    the same decisions and leaves the same LR at every step as the full way; with every
    answer in before each step, it is taken on every step that neither reports nor
    takes in the answer to a report, with floats or CPU tensors (the README's loop)."""
    curve = losses(700, seed=5, spikes=(250, 251, 480))
    curve[400] = float("nan")
    taken = 0
    real = lrctl.Controller._quietly

    def counting(self: lrctl.Controller, *args: object) -> bool:
        nonlocal taken
        held = real(self, *args)  # type: ignore[arg-type]
        taken += held
        return held

    monkeypatch.setattr(lrctl.Controller, "_quietly", counting)
    quick_frames: list[dict] = []
    quick = _run(curve, 8, frames=quick_frames, settle=True, tensors=tensors)
    reports = len(quick_frames)
    # Every step that neither reported nor had an answer to take in went the quiet way.
    assert taken >= len(curve) - 2 * reports
    assert reports < len(curve) // 4
    full_frames: list[dict] = []
    assert _run(curve, 8, quiet_path=False, frames=full_frames, settle=True,
                tensors=tensors) == quick
    assert full_frames == quick_frames


def test_quiet_steps_report_in_batches_and_close_flushes_them(
        controller: ControllerProc) -> None:
    """A falling loss: k steps per frame; the last held steps go out at close()."""
    opt = _optimizer()
    sent: list[int] = []
    with lrctl.attach(opt, policy=str(POLICIES / "plateau.yaml"), every="auto",
                      spawn=False) as ctl:
        assert ctl._batch is not None and ctl._link is not None
        ctl._batch.fix_k(8)
        send = ctl._link.send_obs
        ctl._link.send_obs = lambda t, frame: (sent.append(t), send(t, frame))  # type: ignore[method-assign]
        curve = [2.0 - 0.001 * t for t in range(205)]  # never a new high after step 0
        for loss in curve:
            ctl.step(loss, grad_norm=1.0)
            opt.step()
    assert sent[:3] == [0, 8, 16]  # the first step is the only high; then every 8th
    assert all(b - a == 8 for a, b in itertools.pairwise(sent[:-1]))
    assert sent[-1] == 204  # held steps 201..204 went out as the report of 204


def test_device_or_metrics_steps_report_alone() -> None:
    batch = Batching()
    batch.fix_k(8)
    assert batch.due(1.0, None)  # no recent high yet: stands out
    batch.take(1.0, None)
    assert not batch.due(0.9, None)
    batch.hold(1, 0.9, None)
    assert batch.due(float("nan"), None)
    assert batch.due(float("inf"), None)
    assert batch.due(1.5, None)  # a new high over the recent window
    assert not batch.due(0.95, None)
    assert batch.due(0.95, 3.0)  # the first grad norm is a new high too
    losses_, grads = batch.take(0.95, 3.0)
    assert losses_ == [0.9] and grads is None
    assert not batch.due(0.9, 2.0) and batch.due(0.9, 3.5)


def _feed(batch: Batching, clock: list[float], steps: int, interval: float, report: float,
          sparse: bool = True) -> None:
    """``steps`` steps of ``interval`` seconds through ``batch`` as the hook drives it:
    each report step reads the clock and its cost (``report`` seconds) is told; the quiet
    steps between share the time (``sparse``), or read the clock too."""
    after_report = False
    for _ in range(steps):
        clock[0] += interval
        step = int(clock[1])
        due = len(batch.losses) + 1 >= batch.k
        if due or after_report or not sparse:
            batch.tick(clock[0], step)
        if due:
            batch.spent(report)
            batch.take(1.0, None)
        else:
            assert batch.hold_if_quiet(step, 1.0, None)
        after_report = due
        clock[1] += 1


@pytest.mark.parametrize("sparse", [False, True])
def test_k_follows_the_measured_cost(sparse: bool) -> None:
    """k: the smallest power of two that keeps reporting under 1 % of the step time;
    it grows at once and shrinks only on a clear change. ``sparse``: as in the hook,
    only full-way steps (a report and the step after it) read the clock; the quiet
    steps between share the time."""
    batch = Batching()
    clock = [0.0, 0.0]  # the time, the step
    _feed(batch, clock, 64, 1e-3, 100e-6, sparse)  # 100 µs on a 1 ms step: 10 × 10 µs -> 16
    assert batch.k == 16
    _feed(batch, clock, 256, 1e-3, 60e-6, sparse)  # 60 µs -> 8: not a clear change, 16 stays
    assert batch.k == 16
    _feed(batch, clock, 256, 20e-3, 100e-6, sparse)  # a 20 ms step: reporting every step fits
    assert batch.k == 1
    _feed(batch, clock, 256, 1e-5, 100e-6, sparse)  # no room at all: the cap
    assert batch.k == Batching.MAX_K
    batch.tick(clock[0] + 1.0, 0)  # a resume's new step count: no interval from it
    assert batch.k == Batching.MAX_K


def test_a_slow_step_that_does_not_report_cannot_pin_k_at_1(
        controller: ControllerProc, monkeypatch: pytest.MonkeyPatch) -> None:
    """The full-way step that does not report (the step at which k first grows: its
    quiet test ran with k = 1) slowed once by the machine, here by 5 ms on the hook's
    clock: k still follows the reports' cost. That step's time, taken as what a quiet
    step costs, once left no report cost to save: k fell to 1 at the next look and
    stayed there, no such step coming again at k = 1 to correct it."""
    real = perf_counter
    slowed: list[int] = []
    offset = [0.0]
    tick = Batching.tick

    def ticking(self: Batching, now: float, step: int) -> None:
        tick(self, now, step)
        if step == Batching.WARMUP and not slowed:
            slowed.append(step)
            offset[0] = 5e-3  # this step's end, and every reading after, 5 ms on

    monkeypatch.setattr(Batching, "tick", ticking)
    monkeypatch.setattr("lrctl._hook_report.perf_counter", lambda: real() + offset[0])
    opt = _optimizer()
    with lrctl.attach(opt, policy=str(POLICIES / "default.yaml"), every="auto", spawn=False,
                      run_name="auto-slow", timeout=30.0) as ctl:
        assert ctl._batch is not None
        for t in range(400):
            for p in opt.param_groups[0]["params"]:
                p.grad = torch.full_like(p, 1.0)
            ctl.step(2.0 - t * 1e-3)  # a falling loss: no step stands out
            opt.step()
        assert slowed == [Batching.WARMUP]
        assert ctl._batch.k > 1  # a tiny step against a report's ~100 µs: the cap


def test_wire_carries_held_steps_and_rejects_bad_ones() -> None:
    frame = encode_obs(10, 0.5, None, prior=[0.7, float("nan")], prior_grads=[None, 2.0])
    msg = FrameDecoder().feed(frame)[0]
    (s0, l0, g0), (s1, l1, g1) = prior_steps(msg, 10)
    assert (s0, l0, g0, s1, g1) == (8, 0.7, None, 9, 2.0)
    assert l1 is not None and math.isnan(l1)
    for bad in ({"pl": "x"}, {"pl": [1.0] * 300}, {"pl": [1.0], "pg": []},
                {"pl": [1.0] * 11}, {"pl": ["loss"]}):
        with pytest.raises(ProtocolError):
            prior_steps(bad, 10)


def test_auto_is_one_step_per_report_in_sync_mode(controller: ControllerProc) -> None:
    with lrctl.attach(_optimizer(), every="auto", sync=True, spawn=False) as ctl:
        assert ctl._batch is None
    with pytest.raises(ValueError, match="'auto'"):
        lrctl.attach(_optimizer(), every="sometimes", spawn=False)


def test_a_nan_on_a_quiet_step_is_skipped_and_reported_at_once(
        controller: ControllerProc) -> None:
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x = torch.randn(8, 4)
    sent: list[int] = []
    with lrctl.attach(opt, every="auto", spawn=False, timeout=30.0) as ctl:
        assert ctl._batch is not None and ctl._link is not None
        ctl._batch.fix_k(16)
        send = ctl._link.send_obs
        ctl._link.send_obs = lambda t, frame: (sent.append(t), send(t, frame))  # type: ignore[method-assign]
        for t in range(40):
            loss = model(x).pow(2).mean() * (1.0 - 1e-3 * t)
            opt.zero_grad()
            loss.backward()
            if t == 21:  # a quiet step (the batch from 17 is not full)
                loss = loss * float("nan")
            before = [p.detach().clone() for p in model.parameters()]
            ctl.step(loss)
            opt.step()
            if t == 21:
                assert all(torch.equal(a, b) for a, b in zip(
                    before, model.parameters(), strict=True))  # skipped by the guard
    assert 21 in sent  # not held: reported the step it happened
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert any(d.step == 21 and d.action == "skip" for d in ctl.decisions)


def test_a_refused_batched_frame_moves_nothing(controller: ControllerProc) -> None:
    """An adversarial pass: a batched frame whose own metrics were refused (a bad name,
    more than 64) had its held steps applied first, so the LR moved and the decisions
    of those steps were neither journaled nor answered (23 halvings, 3 decisions
    recorded). Now the frame is refused whole: the same steps, sent again with good
    metrics, are applied then, with their decisions."""
    from daemon_helpers import Client

    from lrctl.wire.frames import MAX_HELLO, encode

    guard = ("version: 1\npolicies:\n  - kind: divergence\n    factor: 0.5\n"
             "    min_samples: 8\n")
    c = Client(controller.socket)
    c.send(encode({"t": "hello", "run": "refused", "run_name": "refused", "lrs": [0.1],
                   "groups": 1, "policy": {"text": guard, "source": "<test>"}}, MAX_HELLO))
    assert c.answer()["t"] == "welcome"
    c.send(encode_obs(10, 0.5, None, {"1bad": 1.0}, prior=[0.7, float("nan")]))
    reply = c.answer()
    assert reply["t"] == "error" and reply["code"] == "bad_observation", reply
    c.send(encode_obs(10, 0.5, None, {"val": 1.0}, prior=[0.7, float("nan")]))
    reply = c.answer()
    assert reply["t"] == "lr" and reply["lrs"] == [0.05], reply  # the NaN's back-off
    assert [(d["step"], d["action"]) for d in reply["d"]] == [(9, "skip"), (9, "backoff")]
    c.sock.close()
