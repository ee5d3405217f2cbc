"""``lrctl/lr/g0`` as MLflow draws it (straight lines between the journaled points) is the
LR each optimizer step ran on, across a hook's reopening of its run and a controller's
restart: real controller processes, real sockets, the journal read back."""

from __future__ import annotations

import math
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from daemon_helpers import ControllerProc, until

import lrctl
from lrctl.sinks.journal import RunPaths, last_line, read_lines

# 0.1 up to step 99, 0.05 from step 100: one change, at a step that can come first.
STEP_DECAY = {"version": 1, "policies": [
    {"kind": "decay", "schedule": "step", "step_size": 100, "gamma": 0.5}]}


def drawn(state_dir: str, key: str) -> list[tuple[int, float]]:
    """``lrctl/lr/g0``'s journaled points in step order (of two at a step, the later)."""
    points: dict[int, float] = {}
    for line in read_lines(RunPaths.of(Path(state_dir), key).stream("metrics")):
        for name, value, step in line.record["points"]:
            if name == "lrctl/lr/g0":
                points[step] = float(value)
    return sorted(points.items())


def at(points: list[tuple[int, float]], step: int) -> float:
    """The line MLflow draws through ``points``, at ``step``: a ramp between two points of
    different values shows as a wrong value at the steps between them."""
    before = [(s, v) for s, v in points if s <= step][-1]
    after = next(((s, v) for s, v in points if s > step), before)
    if after[0] == before[0]:
        return before[1]
    return before[1] + (after[1] - before[1]) * (step - before[0]) / (after[0] - before[0])


def check_drawn(state_dir: str, key: str, ran: list[float]) -> None:
    points = drawn(state_dir, key)
    wrong = [(s, at(points, s), ran[s]) for s in range(len(ran))
             if not math.isclose(at(points, s), ran[s], rel_tol=1e-9)]
    assert not wrong, f"drawn != ran at (step, drawn, ran): {wrong[:8]}; points {points}"


def ended(state_dir: str, key: str) -> bool:
    end = last_line(RunPaths.of(Path(state_dir), key).stream("events"))
    return end is not None and end.record.get("event") == "end"


class Loop:
    """A loop that notes the LR each optimizer step ran on."""

    def __init__(self) -> None:
        self.opt = torch.optim.SGD([torch.nn.Parameter(torch.ones(2))], lr=0.1)
        self.ran: list[float] = []
        # After the step (lrctl's pre-step hook may set the LR after one registered before
        # attach() would have read it): what the step ran on.
        self.opt.register_step_post_hook(
            lambda opt, args, kwargs: self.ran.append(opt.param_groups[0]["lr"]))

    def train(self, ctl: Any, steps: int) -> None:
        for _ in range(steps):
            ctl.step(1.0, grad_norm=1.0)
            self.opt.step()


@pytest.mark.parametrize("every", [1, "auto"])
def test_a_run_resumed_from_its_state_draws_its_first_change_as_a_step(
        make_controller: Any, every: int | str) -> None:
    """A review found it: the run, reopened by a resume from ``ctl.state_dict()``, had a
    new sampler, so the change at its first observed step (100) had no point closing the
    old level: a ramp from the last periodic point (50) to 100."""
    proc: ControllerProc = make_controller(audit=True)
    loop = Loop()
    first = lrctl.attach(loop.opt, policy=STEP_DECAY, spawn=False, every=every,
                         run_name="reopened", timeout=30.0)
    loop.train(first, 100)
    key, state = first.run_key, first.state_dict()
    first.close(end_run=False)
    with lrctl.attach(loop.opt, policy=STEP_DECAY, spawn=False, every=every,
                      resume=state, timeout=30.0) as again:
        loop.train(again, 60)
    assert loop.ran.index(0.05) >= 100, "the change comes after the reopening"
    until(lambda: ended(proc.state_dir, key), "the run's end in its journal")
    check_drawn(proc.state_dir, key, loop.ran)


@pytest.mark.parametrize("how", ["sigterm", "sigkill"])
def test_a_restarted_controller_draws_a_change_at_its_first_step_as_a_step(
        make_controller: Any, how: str) -> None:
    """The same after a controller restart: the change at the first step the new
    controller observes (100) closes the level the journal logged last."""
    proc: ControllerProc = make_controller(audit=True)
    loop = Loop()
    with pytest.warns(RuntimeWarning, match="lost the controller"), lrctl.attach(
            loop.opt, policy=STEP_DECAY, spawn=False, run_name="restarted",
            timeout=30.0, max_backoff=0.05) as ctl:
        loop.train(ctl, 100)
        if how == "sigterm":
            assert proc.stop() == 0
        else:
            until(lambda: any(Path(proc.state_dir, "runs").glob("restarted-*.ckpt")),
                  "the run's checkpoint")
            assert proc.proc is not None
            proc.proc.send_signal(signal.SIGKILL)
            proc.proc.wait(10)
        proc.start()
        while not ctl.connected:  # reconnects within its back-off, replaying what it ran
            loop.train(ctl, 1)
        loop.train(ctl, 30)
        # Under load the restarted controller may answer the replay after those 30 steps
        # (the hook, late, waits for no answer until they catch up): train on until the
        # change is live (a CI run under load trained all 30 at 0.1), then a few more.
        until(lambda: loop.train(ctl, 1) or 0.05 in loop.ran, "the step decay to come live")
        loop.train(ctl, 5)
        key = ctl.run_key
    assert loop.ran.index(0.05) >= 100, "the change comes after the restart"
    until(lambda: ended(proc.state_dir, key), "the run's end in its journal")
    check_drawn(proc.state_dir, key, loop.ran)


def test_steps_a_resume_undid_leave_neither_the_journals_readers_nor_mlflow_wrong(
        make_controller: Any) -> None:
    """A review found it: a job killed after step 80 and resumed from its step-60 state
    trained 61-80 again at another LR (the operator's set-lr at 70 was undone), yet the
    journal's readers (``lrctl report``'s timeline, ``lrctl runs``) and MLflow kept the
    undone run's points. Now the readers drop them, and MLflow gets a later point at each
    undone step (where a step has two points, the later one stands)."""
    import subprocess
    import sys

    from lrctl.commands.history import _sampled
    from lrctl.sinks.journal import tail_records
    from lrctl.timeline import load_timeline

    proc: ControllerProc = make_controller(audit=True)
    loop = Loop()
    first = lrctl.attach(loop.opt, policy=STEP_DECAY, spawn=False, sync=True,
                         run_name="undone", timeout=30.0)
    loop.train(first, 61)  # steps 0-60
    key, state = first.run_key, first.state_dict()
    loop.train(first, 10)
    out = subprocess.run([sys.executable, "-m", "lrctl", "set-lr", key, "0.01"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    loop.train(first, 10)  # up to step 80, the last 0.01
    assert loop.ran[-1] == 0.01
    first.close(end_run=False)  # the job dies
    del loop.ran[61:]
    with lrctl.attach(loop.opt, policy=STEP_DECAY, spawn=False, sync=True, resume=state,
                      timeout=30.0) as again:
        loop.train(again, 59)  # steps 61-119, again
    assert 0.01 not in loop.ran
    until(lambda: ended(proc.state_dir, key), "the run's end in its journal")
    check_drawn(proc.state_dir, key, loop.ran)  # MLflow's rule: the later point stands
    root = RunPaths.of(Path(proc.state_dir), key).root
    xs, ys = load_timeline(root).lrs[0].points()
    assert [(x, y) for x, y in zip(xs, ys, strict=True) if y == 0.01] == []
    assert xs == sorted(xs), "the timeline's points go on from the resumed step"
    step, lrs = _sampled(tail_records(root / "metrics.jsonl"))
    assert (step, lrs) == (119, [0.05])


def test_a_controller_restart_inside_the_undone_steps_keeps_redoing_them(
        make_controller: Any) -> None:
    """A review's find: the range of undone steps still to get a later point lived in the
    sampler alone, so a controller restarted inside it left the undone points (an
    operator's 0.01 at 71-80) standing after it."""
    proc: ControllerProc = make_controller(audit=True)
    loop = Loop()
    first = lrctl.attach(loop.opt, policy=STEP_DECAY, spawn=False, sync=True,
                         run_name="undone", timeout=30.0)
    loop.train(first, 61)
    key, state = first.run_key, first.state_dict()
    loop.train(first, 10)
    out = subprocess.run([sys.executable, "-m", "lrctl", "set-lr", str(key), "0.01"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    loop.train(first, 10)
    first.close(end_run=False)
    del loop.ran[61:]  # the job died: it resumes from the state of step 60
    with pytest.warns(RuntimeWarning), lrctl.attach(
            loop.opt, policy=STEP_DECAY, spawn=False, sync=True, resume=state,
            timeout=30.0, max_backoff=0.05) as again:
        loop.train(again, 4)  # 61-64 redone, then a restart inside the undone 65-80
        assert proc.stop() == 0
        proc.start()
        while not again.connected:
            loop.train(again, 1)
        loop.train(again, 40)
    until(lambda: ended(proc.state_dir, str(key)), "the run to end")
    check_drawn(proc.state_dir, str(key), loop.ran)


def test_a_resume_from_the_state_saved_before_a_resumable_close_undoes_nothing(
        make_controller: Any) -> None:
    """A review's find: ``close(end_run=False)`` reports an every=N run's last step, but a
    ``state_dict()`` taken just before it (a preemption handler's order) held the run as of
    the last report, so its resume was recorded as undoing the steps after it. The state
    now has the last step too."""
    proc: ControllerProc = make_controller(audit=True)
    loop = Loop()
    first = lrctl.attach(loop.opt, policy=STEP_DECAY, spawn=False, every=10,
                         run_name="preempted", timeout=30.0)
    loop.train(first, 96)  # steps 0-95, 90 the last report
    key, state = first.run_key, first.state_dict()
    first.close(end_run=False)
    with lrctl.attach(loop.opt, policy=STEP_DECAY, spawn=False, every=10, resume=state,
                      timeout=30.0) as again:
        loop.train(again, 20)
    until(lambda: ended(proc.state_dir, str(key)), "the run to end")
    actions = [line.record["action"] for line in
               read_lines(RunPaths.of(Path(proc.state_dir), str(key)).stream("decisions"))]
    assert "resumed" not in actions, actions


@pytest.mark.parametrize("sync", [True, False])
def test_a_hook_resumed_from_state_rejoins_a_restarted_controller_without_a_rewind(
        make_controller: Any, sync: bool) -> None:
    """A review's find: a hook resumed from ``ctl.state_dict()`` sends that state again on
    each reconnect, so a controller restarted a few steps later (which had restored the
    run from its own checkpoint, past the state) took the run back to the state, and the
    audit called the steps since "undone", though the hook replayed them. The controller
    now knows the state it last resumed the run from, and rejoins that hook as it is."""
    proc: ControllerProc = make_controller(audit=True)
    loop = Loop()
    first = lrctl.attach(loop.opt, policy=STEP_DECAY, spawn=False, sync=sync,
                         run_name="rejoin", timeout=30.0)
    loop.train(first, 61)
    key, state = str(first.run_key), first.state_dict()
    first.close(end_run=False)
    with pytest.warns(RuntimeWarning), lrctl.attach(
            loop.opt, policy=STEP_DECAY, spawn=False, sync=sync, resume=state,
            timeout=30.0, max_backoff=0.05) as again:
        loop.train(again, 4)
        assert proc.stop() == 0  # checkpoints the run at step 64
        proc.start()
        until(lambda: (loop.train(again, 1), not again.connected)[1], "the hook to see it")
        until(lambda: (loop.train(again, 1), again.connected)[1], "the hook to reconnect")
        loop.train(again, 160 - len(loop.ran))
    until(lambda: ended(proc.state_dir, key), "the run to end")
    actions = [line.record["action"] for line in
               read_lines(RunPaths.of(Path(proc.state_dir), key).stream("decisions"))]
    assert "resumed" not in actions, actions
    assert loop.ran[-1] == 0.05  # the step decay at 100 came, live
    check_drawn(proc.state_dir, key, loop.ran)


def test_a_hook_resumed_from_state_rejoins_its_run_set_aside_without_a_rewind(
        make_controller: Any) -> None:
    """A review's find in the fix above: the run, set aside after ``--session-timeout``
    while its hook was away, was taken back to that hook's saved state on its reconnect
    (the steps it had run since called undone, and lost to the policies): its checkpoint
    says which state it was last resumed from, and the hook is joined to it as it is."""
    proc: ControllerProc = make_controller(extra=["--session-timeout", "1"], audit=True)
    loop = Loop()
    first = lrctl.attach(loop.opt, policy=STEP_DECAY, spawn=False, run_name="aside",
                         timeout=30.0)
    loop.train(first, 61)
    key, state = str(first.run_key), first.state_dict()
    first.close(end_run=False)
    with pytest.warns(RuntimeWarning), lrctl.attach(
            loop.opt, policy=STEP_DECAY, spawn=False, resume=state, timeout=30.0,
            max_backoff=0.05) as again:
        loop.train(again, 20)
        link = again._link
        assert link is not None
        reopen = link.open
        link.open = lambda timeout: False  # type: ignore[method-assign]  # away a while
        link._down("the test's connection lost")
        until(lambda: (loop.train(again, 1), f"run {key} evicted" in proc.log.read_text())[1],
              "the run to be set aside")
        link.open = reopen  # type: ignore[method-assign]
        until(lambda: (loop.train(again, 1), again.connected)[1], "the hook to reconnect")
        loop.train(again, 5)
    until(lambda: ended(proc.state_dir, key), "the run to end")
    actions = [line.record["action"] for line in
               read_lines(RunPaths.of(Path(proc.state_dir), key).stream("decisions"))]
    assert "resumed" not in actions, actions


@pytest.mark.parametrize("sync,every", [(True, 4), (True, 1), (False, 4)])
def test_a_change_after_unreported_steps_is_drawn_as_a_step(
        make_controller: Any, sync: bool, every: int) -> None:
    """A newcomer's find: a sync hook reporting every 4th step applies the decision of its
    report at 100 to step 100 itself, and the chart drew the old level from the last
    report (96) to 100 as a ramp: steps 97-99 ran at 0.1, not between 0.1 and 0.05."""
    proc: ControllerProc = make_controller(audit=True)
    loop = Loop()
    with lrctl.attach(loop.opt, policy=STEP_DECAY, spawn=False, sync=sync, every=every,
                      run_name="gapped", timeout=30.0) as ctl:
        loop.train(ctl, 130)
        key = ctl.run_key
    assert 0.05 in loop.ran, "the step decay came live"
    until(lambda: ended(proc.state_dir, key), "the run's end in its journal")
    check_drawn(proc.state_dir, key, loop.ran)


class _StagedOnCPU:
    """:class:`lrctl._staging.DeviceStaging` without a GPU: a staged report goes out at
    the next read of the link, as a finished device copy does."""

    def __init__(self) -> None:
        self._pending: list[tuple[int, float, float, Any]] = []
        self.used = False

    def __bool__(self) -> bool:
        return bool(self._pending)

    @property
    def oldest(self) -> int | None:
        return self._pending[0][0] if self._pending else None

    def stage(self, t: int, loss: Any, grad: Any, on_dev: Any, metrics: Any,
              send: Any) -> None:
        self._pending.append((t, float(loss), float(grad), metrics))
        self.used = True

    def drain(self, send: Any, block: bool) -> None:
        while self._pending:
            send(*self._pending.pop(0))


def test_a_change_after_unreported_steps_of_staged_reports_is_drawn_where_it_ran(
        make_controller: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """A review found it: an async every=4 hook's CUDA-staged report said nothing of its
    unreported steps (gu: _reported had moved to the step when it was staged), so the
    decay that reached step 101 was drawn from 103 to 104 (a ramp from 100 before)."""
    from lrctl import _hook_report

    monkeypatch.setattr(_hook_report.Reporting, "_report",
                        lambda self, t, loss, grad: self._stage(t, loss, grad, (True, True),
                                                                {}))
    proc: ControllerProc = make_controller(audit=True)
    loop = Loop()
    with lrctl.attach(loop.opt, policy=STEP_DECAY, spawn=False, every=4,
                      run_name="staged", timeout=30.0) as ctl:
        ctl._staging = _StagedOnCPU()  # type: ignore[assignment]
        loop.train(ctl, 160)
        # A staged report's answer is not waited for: under load the decay decided at 100
        # comes live later (CI once trained all 160 at 0.1). Train on until it has, then
        # a few more steps; the chart must show wherever it came.
        until(lambda: loop.train(ctl, 1) or 0.05 in loop.ran, "the step decay to come live")
        loop.train(ctl, 5)
        key = ctl.run_key
    until(lambda: ended(proc.state_dir, key), "the run's end in its journal")
    check_drawn(proc.state_dir, key, loop.ran)


def test_a_change_an_every_n_hook_cannot_tell_is_drawn_after_its_report(
        make_controller: Any) -> None:
    """A review found it: with more than ``MAX_USED`` (512) param groups an async every=4
    hook's reports say neither what their step ran on (u) nor where the LRs of the steps
    before changed (gu); the controller then drew the decay, which reached step 101 (the
    step after the report of 100), at 103-104. It now takes the change to be where an
    async hook applies it: the step after the report it answers."""
    from lrctl._hook_used import MAX_USED

    loop = Loop()
    loop.opt = torch.optim.SGD([{"params": [torch.nn.Parameter(torch.ones(1))]}
                                for _ in range(MAX_USED + 1)], lr=0.1)
    loop.opt.register_step_post_hook(
        lambda opt, args, kwargs: loop.ran.append(opt.param_groups[0]["lr"]))
    proc: ControllerProc = make_controller(audit=True)
    with lrctl.attach(loop.opt, policy=STEP_DECAY, spawn=False, every=4,
                      run_name="many-groups", timeout=30.0) as ctl:
        loop.train(ctl, 130)
        key = ctl.run_key
    assert loop.ran.index(0.05) == 101, "the answer to the report of 100, at the step after"
    until(lambda: ended(proc.state_dir, key), "the run's end in its journal")
    check_drawn(proc.state_dir, key, loop.ran)
