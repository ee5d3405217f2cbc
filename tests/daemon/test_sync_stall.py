"""A sync hook whose wait for an answer ran out (a stalled controller: SIGSTOP here)
trains on at its last LRs, not waiting again until the answers catch up. The
controller, answering later, recorded its decided LRs as those of the steps of the
stall, and a spike skip decided for one of them as carried out: the hook tells it
which steps ran without their answer, on which LRs (``late``), and the record says
what ran: the ``lrctl/lr`` points of those steps as they ran (the later point of a
step stands), and a ``not_applied`` record (policy ``hook``) beside the skip and the
back-off that did not reach their step. Real controller, real journal.
"""

from __future__ import annotations

import math
import os
import signal
import warnings
from pathlib import Path
from typing import Any

import torch
from daemon_helpers import POLICIES, ControllerProc, losses, until
from test_audit_curve import at, drawn, ended

import lrctl
from lrctl.sinks.journal import RunPaths, read_lines

# A lone spike: skip it and halve the LR (divergence.yaml as it was before loss_confirm: 2,
# which only skips a lone one: a skip and a back-off decided in the stall, here).
POLICY = (POLICIES / "divergence.yaml").read_text().replace("loss_confirm: 2", "loss_confirm: 1")
STEPS = 220
LIVE_SPIKE, STOP_AT, STALL_SPIKE, CONT_AT = 60, 120, 124, 140


def _journal(state_dir: str, key: str, stream: str) -> list[dict[str, Any]]:
    return [line.record for line in read_lines(RunPaths.of(Path(state_dir), key).stream(stream))]


def _stalled_run(proc: ControllerProc, says_late: bool = True,
                 ) -> tuple[lrctl.Controller, list[float], list[int]]:
    """A sync hook trained through a stall of its controller with a spike in it: the
    hook, the LR each step ran on (a skipped one: the LR in force) and the steps that
    updated the weight."""
    curve = losses(STEPS, seed=5, spikes=(LIVE_SPIKE, STALL_SPIKE))  # even steps: spikes
    weight = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([weight], lr=0.1)
    ran: list[float] = []
    stepped: list[int] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # "no decision within", by design
        ctl = lrctl.attach(opt, policy=POLICY, sync=True, spawn=False, timeout=0.05,
                           run_name="stall")
        assert ctl._link is not None and ctl._link.says_late
        ctl._link.says_late = says_late  # (False: as a controller that does not read late)
        try:
            for t, loss in enumerate(curve):
                if t == STOP_AT:
                    os.kill(proc.pid, signal.SIGSTOP)
                elif t == CONT_AT:
                    os.kill(proc.pid, signal.SIGCONT)
                weight.grad = torch.ones(1)
                ctl.step(loss, grad_norm=1.0)
                if ctl.should_skip:
                    ran.append(opt.param_groups[0]["lr"])
                    continue
                before = weight.item()
                opt.step()
                ran.append(opt.param_groups[0]["lr"])
                if weight.item() != before:
                    stepped.append(t)
            assert ctl.late_waits == 1
            assert ctl.connected  # (nothing it sent was refused)
        finally:
            os.kill(proc.pid, signal.SIGCONT)
            ctl.close()
    key = ctl.run_key
    assert key is not None
    until(lambda: ended(proc.state_dir, key), "the run's end in the journal")
    return ctl, ran, stepped


def test_steps_of_a_stall_are_recorded_as_they_ran(make_controller: Any) -> None:
    proc: ControllerProc = make_controller(audit=True)
    ctl, ran, stepped = _stalled_run(proc)
    key = ctl.run_key
    assert key is not None
    assert LIVE_SPIKE not in stepped and STALL_SPIKE in stepped
    decisions = _journal(proc.state_dir, key, "decisions")
    at_spike = [(d["policy"], d["action"]) for d in decisions if d["step"] == STALL_SPIKE]
    # The skip and back-off as decided (the journal is append-only), then what of them
    # did not reach the step, which ran at the LR before the back-off.
    assert at_spike == [("divergence", "skip"), ("divergence", "backoff"),
                        ("hook", "not_applied")], at_spike
    late = decisions[-1] if decisions[-1]["action"] == "not_applied" else next(
        d for d in decisions if d["action"] == "not_applied")
    assert late["step"] == STALL_SPIKE
    assert late["evidence"]["ran_lrs"] == [ran[STALL_SPIKE]] == [0.05]
    assert late["evidence"]["decided_lrs"] == [0.025]
    assert late["evidence"]["not_applied"] == [{"policy": "divergence", "action": "skip"},
                                               {"policy": "divergence", "action": "backoff"}]
    assert "skip was not carried out" in late["reason"]
    # Nothing else: the live spike's skip was carried out, and the steps of the stall
    # that had no decision ran on what the record now says.
    assert [d["step"] for d in decisions if d["action"] == "not_applied"] == [STALL_SPIKE]
    # lrctl/lr/g0 at every step: the LR it ran on (of two points at a step, the later).
    points = drawn(proc.state_dir, key)
    wrong = [(s, at(points, s), ran[s]) for s in range(STEPS)
             if not math.isclose(at(points, s), ran[s], rel_tol=1e-12)]
    assert not wrong, f"(step, recorded, ran): {wrong[:8]}"
    # The correction of a step is logged after its first point, in time too (MLflow's
    # latest value of a step is that of its latest time).
    times: dict[int, list[int]] = {}
    for record in _journal(proc.state_dir, key, "metrics"):
        for name, _, s in record["points"]:
            if name == "lrctl/lr/g0" and s == STALL_SPIKE:
                times.setdefault(s, []).append(record["ts"])
    assert len(times[STALL_SPIKE]) == 2 and times[STALL_SPIKE][0] < times[STALL_SPIKE][1]


def test_a_hook_sends_no_late_to_a_controller_that_does_not_say_it_reads_them(
        make_controller: Any) -> None:
    """A controller that does not know ``late`` (its welcome does not say ``late: 1``)
    would refuse the message: the hook sends none, and the record stays as it was."""
    proc: ControllerProc = make_controller(audit=True)
    ctl, _, stepped = _stalled_run(proc, says_late=False)
    assert STALL_SPIKE in stepped
    key = ctl.run_key
    assert key is not None
    decisions = _journal(proc.state_dir, key, "decisions")
    assert not [d for d in decisions if d["action"] == "not_applied"]
    assert [d["action"] for d in decisions if d["step"] == STALL_SPIKE] == ["skip", "backoff"]
