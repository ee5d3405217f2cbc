"""``lrctl/lr/g0`` at step *s* is the LR optimizer step *s* ran on, also where the hook
did not apply the controller's answers step by step (see lrctl._lr_history): steps
trained while the controller was gone, replayed to a new one, and the steps an
``every="auto"`` batch held. Real controller processes, real sockets, the journal
read back."""

from __future__ import annotations

import math
import os
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch
from daemon_helpers import ControllerProc, until
from test_audit_curve import drawn

import lrctl
from lrctl.client import request
from lrctl.sinks.journal import RunPaths, last_line, read_lines

# The LR moves at every step of the warmup: any step recorded with another step's LR shows.
WARMUP = {"version": 1, "policies": [{"kind": "warmup", "steps": 400}]}


def _ended(paths: RunPaths) -> bool:
    end = last_line(paths.stream("events"))
    return end is not None and end.record.get("event") == "end"


def _at(points: list[tuple[int, float]], step: int) -> float:
    """The recorded step curve's value at ``step`` (points at every change)."""
    return [v for s, v in points if s <= step][-1]


class _Loop:
    """A training loop that notes the LR each optimizer step ran on (a pre-step hook
    registered after lrctl's sees what lrctl applied)."""

    def __init__(self) -> None:
        self.weight = torch.nn.Parameter(torch.ones(4))
        self.opt = torch.optim.SGD([self.weight], lr=0.1)
        self.ran: list[float] = []
        self.step = 0
        self.key = ""  # the run's key, once its hook closed

    def track(self) -> None:
        self.opt.register_step_pre_hook(
            lambda opt, args, kwargs: self.ran.append(opt.param_groups[0]["lr"]))

    def train(self, ctl: Any, steps: int) -> None:
        for _ in range(steps):
            self.opt.zero_grad()
            loss = (self.weight ** 2).sum() + 1.0
            loss.backward()
            ctl.step(loss)
            self.opt.step()
            self.step += 1


@contextmanager
def _audited(make_controller: Any, name: str, policy: Any = WARMUP,
             **options: Any) -> Iterator[tuple[ControllerProc, _Loop, Any]]:
    """A controller with its journal, a loop and its hook; the hook closed after."""
    proc: ControllerProc = make_controller(audit=True)
    loop = _Loop()
    ctl = lrctl.attach(loop.opt, policy=policy, spawn=False, run_name=name, **options)
    loop.track()
    try:
        yield proc, loop, ctl
    finally:
        loop.key = ctl.run_key or ""
        ctl.close()


def _check_all(proc: ControllerProc, loop: _Loop) -> None:
    """Every step's record is what it ran on."""
    _check(drawn(proc.state_dir, loop.key), loop.ran, range(1, loop.step))


def _check(points: list[tuple[int, float]], ran: list[float], steps: range) -> None:
    wrong = [(s, _at(points, s), ran[s]) for s in steps
             if not math.isclose(_at(points, s), ran[s], rel_tol=1e-12)]
    assert not wrong, f"recorded != ran at (step, recorded, ran): {wrong[:8]}"


def test_steps_trained_while_the_controller_was_gone_are_recorded_as_they_ran(
        make_controller: Any) -> None:
    with _audited(make_controller, "gone", timeout=10.0) as (proc, loop, ctl):
        loop.train(ctl, 60)
        proc.kill9()  # its checkpoint is up to a second old: the hook replays from it
        with pytest.warns(RuntimeWarning, match="lost the controller"):
            loop.train(ctl, 40)  # fail-open: the warmup stands still at its last LR
        stalled = loop.ran[-30:]
        assert len(set(stalled)) == 1, "no answer came while the controller was gone"
        proc.start()
        deadline = time.monotonic() + 30
        while not ctl.connected and time.monotonic() < deadline:
            loop.train(ctl, 1)  # the hook reconnects (with back-off) and replays
        assert ctl.connected
        loop.train(ctl, 20)
    # Every step: before the kill, the outage the new controller replayed (recorded, as
    # it decided them, with the warmup's LRs before this change), and after.
    _check_all(proc, loop)


def test_the_steps_of_an_auto_batch_are_recorded_as_they_ran(make_controller: Any) -> None:
    with _audited(make_controller, "auto", every="auto", timeout=10.0) as (proc, loop, ctl):
        assert ctl._batch is not None
        ctl._batch.fix_k(8)  # batches of 8: an answer lands in the midst of each
        loop.train(ctl, 200)
    _check_all(proc, loop)


def test_a_decision_at_a_step_an_auto_batch_held_has_its_loss_beside_it(
        make_controller: Any) -> None:
    """An audit probe's find: ``lrctl/loss`` and ``lrctl/grad_norm`` are logged at each
    decision step, but a decision at a step an ``every="auto"`` batch held reached the
    record after the batch's later steps: 17 of 22 decision steps had no loss point."""
    plateau = {"version": 1, "policies": [
        {"kind": "plateau", "patience": 2, "threshold": 0.5, "factor": 0.9}]}
    with _audited(make_controller, "auto-points", plateau, every="auto",
                  timeout=10.0) as (proc, loop, ctl):
        assert ctl._batch is not None
        ctl._batch.fix_k(8)
        loop.train(ctl, 120)
    paths = RunPaths.of(Path(proc.state_dir), loop.key)
    until(lambda: _ended(paths), "the run's end journaled")
    decided = {line.record["step"] for line in read_lines(paths.stream("decisions"))}
    assert {s for s in decided if s % 8 != 7}, "some decisions at steps a batch held"
    losses = {step for line in read_lines(paths.stream("metrics"))
              for name, _, step in line.record["points"] if name == "lrctl/loss"}
    assert decided <= losses, sorted(decided - losses)


def test_auto_awaits_a_back_off_after_two_urgent_reports_in_a_row(
        make_controller: Any) -> None:
    """An adversarial pass's find: with every="auto", a NaN at step 40 and the highest
    loss yet at 41 (a blow-up) are both reported at once; the hook remembered only the
    last urgent report, so the pre-step hook of step 41 did not await the back-off to
    step 40: it ran a step late, and the audit said it had not."""
    spikes = {40: math.nan, 41: 100.0}

    class _Spiky(_Loop):
        def train(self, ctl: Any, steps: int) -> None:
            for _ in range(steps):
                self.opt.zero_grad()
                loss = (self.weight ** 2).sum() + 1.0
                loss.backward()
                ctl.step(loss * spikes.get(self.step, 1.0))
                if not ctl.should_skip or self.step not in spikes:
                    self.opt.step()
                else:
                    self.ran.append(math.nan)  # skipped: nothing ran
                self.step += 1

    proc: ControllerProc = make_controller(audit=True)
    loop = _Spiky()
    ctl = lrctl.attach(loop.opt, policy="default", spawn=False, run_name="auto-nan",
                       every="auto", timeout=10.0, sync=False)
    loop.track()
    try:
        loop.train(ctl, 60)
    finally:
        loop.key = ctl.run_key or ""
        ctl.close()
    backoff = [d for d in ctl.decisions if d.action == "backoff"]
    assert backoff and backoff[0].step == 40
    assert loop.ran[41] == pytest.approx(backoff[0].new_lrs[0])  # in effect at t + 1
    points = drawn(proc.state_dir, loop.key)
    _check(points, loop.ran, range(1, 40))
    _check(points, loop.ran, range(41, loop.step))


def test_sync_in_torchs_order_records_what_each_step_ran_on(make_controller: Any) -> None:
    """An adversarial pass's find: sync, with step() after optimizer.step() (torch's order,
    lrctl.Scheduler(sync=True)), every step was recorded with the LR decided after it
    (one step early): the report of a step that has run now says what it ran on."""
    with _audited(make_controller, "sync-after", sync=True, timeout=10.0) as (proc, loop,
                                                                                  ctl):
        for _ in range(60):
            loop.opt.zero_grad()
            loss = (loop.weight ** 2).sum() + 1.0
            loss.backward()
            loop.opt.step()
            ctl.step(loss)
            loop.step += 1
    _check_all(proc, loop)


def test_the_unreported_steps_of_every_n_are_recorded_as_they_ran(
        make_controller: Any) -> None:
    """An adversarial pass's find: with every=4 the warmup's LR changed at every step, but
    the record moved only at report steps: steps between reports showed the LR of the
    report before them (up to N - 1 steps late). A report now says where the LRs of the
    steps since the last one changed (``gu``)."""
    with _audited(make_controller, "every4", every=4, timeout=10.0) as (proc, loop, ctl):
        loop.train(ctl, 62)  # ends between two reports: close() reports the last step
    _check_all(proc, loop)


@pytest.mark.parametrize("every", [1, 4])
def test_a_loops_own_schedule_under_every_n_is_recorded_as_it_ran(
        make_controller: Any, every: int) -> None:
    """An audit probe's find: with ``base="loop"`` and ``every=4`` the steps between
    reports were recorded at lrctl's LRs without the loop's schedule (59 of 79 steps
    wrong; after a back-off the chart went up where the optimizer's LR went down)."""
    guard = {"version": 1, "policies": [{"kind": "divergence"}]}
    with _audited(make_controller, f"loop{every}", guard, base="loop", every=every,
                  timeout=10.0) as (proc, loop, ctl):
        schedule = torch.optim.lr_scheduler.LambdaLR(loop.opt, lambda t: 0.98 ** t)
        for _ in range(79):
            loop.opt.zero_grad()
            loss = (loop.weight ** 2).sum() + 1.0
            loss.backward()
            ctl.step(loss * math.nan if loop.step == 40 else loss)
            if not ctl.should_skip:
                loop.opt.step()
            else:
                loop.ran.append(math.nan)  # (a skipped step runs on nothing)
            schedule.step()
            loop.step += 1
    assert any(d.action == "backoff" for d in ctl.decisions), ctl.decisions
    _check(drawn(proc.state_dir, loop.key), loop.ran,
           [s for s in range(1, loop.step) if s != 40])  # (the skipped step ran on nothing)


def test_the_loops_own_lrs_kept_for_every_n_stay_bounded_with_no_controller(
        tmp_path: Path) -> None:
    """A review's find: with nothing reported (no controller answers) the history of the
    loop's LRs grew by one entry a step (20 000 steps: 3 MB)."""
    import warnings

    from lrctl._lr_history import LRHistory

    loop = _Loop()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # (no controller: it says so)
        ctl = lrctl.attach(loop.opt, policy={"version": 1, "policies": [
            {"kind": "divergence"}]}, base="loop", every=4, spawn=False,
            socket=str(tmp_path / "nobody.sock"), timeout=0.01)
        schedule = torch.optim.lr_scheduler.LambdaLR(loop.opt, lambda t: 0.999 ** t)
        for _ in range(3 * LRHistory.PRUNE_AT):
            loop.train(ctl, 1)
            schedule.step()
        assert ctl._applied is not None
        assert len(ctl._applied) <= 2 * LRHistory.PRUNE_AT
        ctl.close()
    every1 = lrctl.attach(torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=0.1),
                          base="loop", spawn=False, socket=str(tmp_path / "nobody.sock"))
    assert every1._applied is None  # (every=1 reports every step: nothing to keep)
    every1.close()


def test_steps_run_while_answers_came_late_are_recorded_as_they_ran(
        make_controller: Any) -> None:
    """A controller that stops answering for a while (here SIGSTOP): the hook waits one
    ``timeout`` for an answer due, then trains on at its LRs without waiting; the answers
    come later and apply as they arrive. Each step is recorded with what it ran on."""
    with _audited(make_controller, "late", timeout=0.05) as (proc, loop, ctl):
        loop.train(ctl, 40)
        os.kill(proc.pid, signal.SIGSTOP)
        try:
            with pytest.warns(RuntimeWarning, match="did not arrive within"):
                loop.train(ctl, 30)
        finally:
            os.kill(proc.pid, signal.SIGCONT)
        assert ctl.late_waits >= 1
        loop.train(ctl, 60)
    assert len(set(loop.ran[45:70])) < 25, "the stop held the warmup back"
    # The step whose wait timed out went out before the wait (its answer was on its way):
    # recorded with the LRs decided for it, which it did not get. Every other step as it ran.
    points = drawn(proc.state_dir, loop.key)
    wrong = [s for s in range(1, loop.step)
             if not math.isclose(_at(points, s), loop.ran[s], rel_tol=1e-12)]
    assert len(wrong) <= ctl.late_waits, wrong


def test_operator_pushes_are_recorded_from_the_step_they_ran_at(make_controller: Any) -> None:
    """``lrctl set-lr`` (a push) lands whenever the controller reads it, often while a
    paced hook's observation is still unread: it was recorded a step before the hook
    applied it. Many pushes, at whatever moment they come, each recorded as it ran."""
    guard = {"version": 1, "policies": [{"kind": "divergence"}]}
    with _audited(make_controller, "pushed", guard, timeout=10.0) as (proc, loop, ctl):
        key = ctl.run_key
        for i in range(12):
            loop.train(ctl, 15)
            # Between step() and optimizer.step(): the controller takes the push before it
            # reads the observation just sent (paced), the hook after this step. (The
            # answer due is in first, as it is when a step outlasts the round trip: a
            # report sent before it says no LRs, and a push in that window is recorded
            # by the controller's view; see the README's audit table.)
            assert ctl._link is not None
            assert ctl._link.wait(lambda: ctl._acked >= ctl._reported, 10.0)
            loop.opt.zero_grad()
            loss = (loop.weight ** 2).sum() + 1.0
            loss.backward()
            ctl.step(loss)
            request({"t": "set_lr", "run": key, "lr": 0.01 * (i + 1)}, proc.socket,
                    timeout=10.0)
            loop.opt.step()
            loop.step += 1
        loop.train(ctl, 15)
    assert len(set(loop.ran)) >= 12, "every push reached the optimizer"
    _check_all(proc, loop)


def test_an_evaluation_after_the_last_step_records_no_step_that_never_ran(
        make_controller: Any) -> None:
    """Metrics reported after the last step go on an observation of the step after it,
    which never runs: the record used to end with that step, at the LRs the warmup
    would have given it (``lrctl/lr/g0`` one past the run, and its loss curve short of
    the last step). The policies still see the metrics, and decide at that step."""
    earlystop = {"version": 1, "policies": [{"kind": "warmup", "steps": 400},
                                            {"kind": "earlystop", "metric": "val_loss",
                                             "patience": 1}]}
    with _audited(make_controller, "final-eval", earlystop, timeout=10.0) as (
            proc, loop, ctl):
        loop.train(ctl, 20)
        ctl.report(val_loss=1.0)
        loop.train(ctl, 17)  # the last step is 36
        ctl.report(val_loss=2.0)  # worse: earlystop asks to stop, after step 36
    stops = [d for d in ctl.decisions if d.action == "stop"]
    assert [d.step for d in stops] == [37], ctl.decisions
    paths = RunPaths.of(Path(proc.state_dir), loop.key)
    until(lambda: _ended(paths), "the run's end journaled (its last points with it)")
    points = drawn(proc.state_dir, loop.key)
    assert points[-1][0] == loop.step - 1 == 36
    _check_all(proc, loop)
    losses = [step for line in read_lines(paths.stream("metrics"))
              for name, _, step in line.record["points"] if name == "lrctl/loss"]
    assert max(losses) == 36, "the loss curve reaches the last step"


def test_the_history_keeps_each_change_from_the_step_it_first_ran_at() -> None:
    from lrctl._lr_history import LRHistory

    history = LRHistory(0, [0.1])
    history.note(3, [0.2])
    history.note(3, [0.3])  # changed again before step 3 ran: the later note wins
    history.note(5, [0.3])  # the same LRs: no change
    history.note(7, [0.1])
    history.note(7, [0.3])  # and back before step 7 ran: no change at all
    assert [history.at(s) for s in range(9)] == [[0.1]] * 3 + [[0.3]] * 6
    assert len(history) == 2
    assert history.runs(1, 6) == [(2, [0.1]), (3, [0.3])]
    history.note(9, [0.4])
    assert history.runs(8, 12) == [(1, [0.3]), (3, [0.4])]
    history.forget_before(8)  # what steps >= 8 need: the change in force at 8 on
    assert history.at(8) == [0.3] and history.at(9) == [0.4] and history.at(2) is None
    assert history.runs(2, 9) is None and history.runs(8, 8) is None


def test_the_wire_carries_the_lrs_used_and_refuses_bad_ones() -> None:
    from lrctl.wire.compact import decode_compact, encode_obs_compact, to_json_frame
    from lrctl.wire.errors import ProtocolError
    from lrctl.wire.frames import HEADER, decode_json
    from lrctl.wire.messages import (
        encode_obs,
        gap_used,
        lr_list,
        prior_used,
        says_used,
        with_used,
    )

    frame = encode_obs_compact(7, 1.5, None, [0.1, 0.02])
    assert frame is not None
    msg = decode_compact(frame[HEADER.size:])
    assert (msg["s"], msg["l"], msg["g"], msg["u"]) == (7, 1.5, None, [0.1, 0.02])
    assert decode_json(to_json_frame(frame)[HEADER.size:])["u"] == [0.1, 0.02]
    plain = encode_obs_compact(7, 1.5, 2.0)
    assert plain is not None and "u" not in decode_compact(plain[HEADER.size:])
    # A replay adds them to a frame without them, compact where it was, and takes them
    # out for a controller that does not read them.
    assert not says_used(plain) and says_used(frame)
    assert decode_compact(with_used(plain, [0.3])[HEADER.size:])["u"] == [0.3]
    assert with_used(frame, None) == encode_obs_compact(7, 1.5, None)
    json_frame = encode_obs(7, 1.5, None)
    assert not says_used(json_frame)
    assert says_used(with_used(json_frame, [0.3]))
    assert decode_json(with_used(json_frame, [0.3])[HEADER.size:])["u"] == [0.3]
    assert encode_obs_compact(7, 1.5, 2.0, [math.nan]) is None  # the JSON frame then
    # The run's end (metrics after the last step): said, and absent otherwise.
    ended = decode_json(encode_obs(8, None, None, {"val_loss": 1.0}, end=True)[HEADER.size:])
    assert ended["e"] == 1 and ended["m"] == {"val_loss": 1.0}
    assert "e" not in decode_json(encode_obs(8, None, None, {"val_loss": 1.0})[HEADER.size:])
    body = plain[HEADER.size:]
    for bad in (body[:1] + bytes([7]) + body[2:],  # flag 4 without the LRs
                body[:1] + bytes([7]) + body[2:] + b"\x01",  # a count cut short
                body[:1] + bytes([7]) + body[2:] + b"\x02\x00" + bytes(8)):  # one LR short
        with pytest.raises(ProtocolError):
            decode_compact(bad)
    assert lr_list([0.1, 0.2], 2, "u") == [0.1, 0.2]
    for bad in ([0.1], [0.1, -1.0], [0.1, "inf"], "0.1"):
        with pytest.raises(ProtocolError):
            lr_list(bad, 2, "u")
    assert prior_used({"pu": [[2, [0.1]], [1, [0.2]]]}, 3, 1) == [[0.1], [0.1], [0.2]]
    assert prior_used({}, 3, 1) is None
    for runs in ([[2, [0.1]]], [[4, [0.1]]], [[0, [0.1]], [3, [0.1]]], [[3, [0.1, 0.2]]],
                 [["3", [0.1]]]):
        with pytest.raises(ProtocolError):
            prior_used({"pu": runs}, 3, 1)
    gap = decode_json(encode_obs(8, 1.0, None, gap_used=[(5, [0.1]), (7, [0.2])])[HEADER.size:])
    assert gap_used(gap, 4, 8, 1) == [(5, [0.1]), (7, [0.2])]
    assert gap_used({}, 4, 8, 1) == []
    assert gap_used({"gu": [[3, [0.1]], [6, [0.2]]]}, 4, 8, 1) == [(6, [0.2])]  # (observed)
    for changes in ([[8, [0.1]]], [[6, [0.1]], [5, [0.2]]], [[5, [-0.1]]], [[-1, [0.1]]],
                    [[5, [0.1, 0.2]]], [["5", [0.1]]], [[5]], "x", [[5, [0.1]]] * 300):
        with pytest.raises(ProtocolError):
            gap_used({"gu": changes}, 4, 8, 1)
