"""Rollback-and-skip through a real controller: a fault the back-off cannot cure rolls the
run back (journaled with its evidence), and an operator can ask for one."""

from __future__ import annotations

import json
import math
import random
import subprocess
import sys

import pytest
import torch
from daemon_helpers import ControllerProc

import lrctl

GUARD = {"version": 1, "policies": [{"kind": "divergence", "cooldown": 5, "min_samples": 8,
                                     "window": 32}]}


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "lrctl", *args], capture_output=True,
                          text=True, timeout=60)


def _setup() -> tuple[torch.nn.Linear, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    return model, torch.optim.Adam(model.parameters(), lr=0.01)


def _train_step(model: torch.nn.Linear, opt: torch.optim.Optimizer, ctl: lrctl.Controller,
                loss: float) -> None:
    opt.zero_grad()
    model(torch.ones(2, 3)).sum().backward()
    ctl.step(loss)  # the reported loss is the injected one
    opt.step()


def test_an_injected_fault_rolls_back_and_the_journal_says_why(
        make_controller, tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    monkeypatch.chdir(tmp_path)
    make_controller(audit=True)
    model, opt = _setup()
    rng = random.Random(0)
    snapshots: dict[int, list[torch.Tensor]] = {}
    restored = None
    with lrctl.attach(opt, policy=GUARD, sync=True, spawn=False, run_name="rb",
                      snapshot_every=5, keep=4) as ctl:
        for t in range(60):
            if t % 5 == 0:  # what the snapshot of step t holds: the weights before step t
                snapshots[t] = [p.detach().clone() for p in model.parameters()]
            loss = math.exp(rng.gauss(0.0, 0.02)) * (60.0 if t >= 30 else 1.0)
            _train_step(model, opt, ctl, loss)
            if ctl.rolled_back is not None:
                restored = (t, ctl.rolled_back)
                weights = [p.detach().clone() for p in model.parameters()]
                break
        key = ctl.run_key or ""
        [decision] = [d for d in ctl.decisions if d.action == "rollback"]
    assert restored is not None and restored == (decision.step + 1, 25)
    assert all(torch.equal(a, b) for a, b in zip(weights, snapshots[25], strict=True))
    lines = _cli("decisions", key, "--json")
    assert lines.returncode == 0, lines.stderr
    records = [json.loads(x) for x in lines.stdout.splitlines() if x.strip()]
    [journaled] = [r for r in records if r["action"] == "rollback"]
    ev = journaled["evidence"]
    assert (ev["incident_step"], ev["snapshot_step"]) == (30, 25)
    assert ev["steps_lost"] == journaled["step"] + 2 - 25  # at most: restored before t + 2
    # The hook said it carried it out, and to which snapshot: the audit shows both.
    [done] = [r for r in records if r["action"] == "rolled_back"]
    assert (done["policy"], done["step"]) == ("hook", restored[0])
    assert done["evidence"] == {"snapshot_step": 25, "at_step": restored[0],
                                "steps_lost": restored[0] - 25}
    assert done["evidence"]["steps_lost"] <= ev["steps_lost"]  # an audit's find: it was more


@pytest.mark.parametrize("sync", [True, False])
@pytest.mark.parametrize("cause", ["data", "blow-up"])
def test_a_change_of_data_is_told_from_a_blow_up_by_the_restored_weights_loss(
        controller: ControllerProc, sync: bool, cause: str) -> None:
    """The loss 60× up from step 30: harder data (the restored weights show it too) or a
    blow-up (they show the old loss, then it climbs again at once). Only the first gets
    its LR back; the restored weights' loss is the one of the step after the hook says it
    restored (a review's find: a fixed lag took a broken step's, or a later one, for it)."""
    model, opt = _setup()
    rng = random.Random(0)
    restored_at = None
    with lrctl.attach(opt, policy=GUARD, sync=sync, spawn=False, run_name=f"rb-{cause}",
                      snapshot_every=5, keep=4, timeout=10.0) as ctl:
        for t in range(120):
            fresh = restored_at is not None and t == restored_at + 1
            up = t >= 30 and (cause == "data" or not fresh)
            _train_step(model, opt, ctl, math.exp(rng.gauss(0.0, 0.02)) * (60.0 if up else 1))
            if ctl.rolled_back is not None:
                restored_at = t
            if ctl.should_stop:
                break
    given = [d for d in ctl.decisions if d.evidence.get("level_accepted")]
    assert restored_at is not None
    if cause == "data":
        assert given and given[0].evidence["snapshot_step"] == 25
        assert ctl.lr == [0.01] and not ctl.should_stop
    else:
        assert not given and ctl.lr[0] < 0.01


def test_an_operator_rollback_calls_the_users_callbacks_with_the_step(
        controller: ControllerProc) -> None:
    saved: list[int] = []
    loaded: list[int] = []
    model, opt = _setup()
    with lrctl.attach(opt, policy=GUARD, sync=True, spawn=False, run_name="cb",
                      snapshot_every=4, on_snapshot=saved.append,
                      on_rollback=loaded.append) as ctl:
        for _ in range(14):
            _train_step(model, opt, ctl, 1.0)
        assert saved == [0, 4, 8, 12]
        out = _cli("rollback", "cb", "--to", "10")
        assert out.returncode == 0, out.stderr
        assert "snapshot of step 8" in out.stdout
        _train_step(model, opt, ctl, 1.0)  # hears the decision
        assert ctl.rolled_back is None and loaded == []
        _train_step(model, opt, ctl, 1.0)  # restores before its own update
        assert ctl.rolled_back == 8 and loaded == [8]
        _train_step(model, opt, ctl, 1.0)
        assert ctl.rolled_back is None
        assert ("operator", "rollback") in [(d.policy, d.action) for d in ctl.decisions]
        [done] = [d for d in ctl.decisions if d.action == "rolled_back"]
        assert done.step == 15 and done.evidence["snapshot_step"] == 8
        bad = _cli("rollback", "cb", "--to", "2")  # 0 was dropped from the ring (keep=2)
        assert bad.returncode != 0 and "no snapshot" in bad.stderr


def test_a_run_without_snapshots_cannot_be_rolled_back(controller: ControllerProc) -> None:
    model, opt = _setup()
    with lrctl.attach(opt, policy=GUARD, sync=True, spawn=False, run_name="plain") as ctl:
        _train_step(model, opt, ctl, 1.0)
        out = _cli("rollback", "plain")
        assert out.returncode != 0 and "snapshot_every" in out.stderr


def test_a_process_resumed_from_a_checkpoint_is_offered_none_of_its_predecessors_snapshots(
        controller: ControllerProc) -> None:
    """An adversarial pass found it: after a resume from ctl.state_dict() the controller
    still counted the dead process's snapshots, so `lrctl rollback` was accepted (and
    journaled) and never carried out, and the guard chose a rollback over a back-off.
    The hook's hello says which snapshots it holds."""
    model, opt = _setup()
    ctl = lrctl.attach(opt, policy=GUARD, sync=True, spawn=False, run_name="heir",
                       snapshot_every=4, keep=3)
    for _ in range(14):
        _train_step(model, opt, ctl, 1.0)
    state = ctl.state_dict()
    ctl.close(end_run=False)  # the process dies; its snapshots with it
    model, opt = _setup()
    with lrctl.attach(opt, policy=GUARD, sync=True, spawn=False, resume=state,
                      snapshot_every=4, keep=3) as again:
        _train_step(model, opt, again, 1.0)  # step 14: no snapshot (16 is the next)
        refused = _cli("rollback", "heir")
        assert refused.returncode != 0 and "held: none" in refused.stderr
        for _ in range(3):
            _train_step(model, opt, again, 1.0)  # takes the snapshot of step 16
        out = _cli("rollback", "heir")
        assert out.returncode == 0 and "snapshot of step 16" in out.stdout, out.stderr
        _train_step(model, opt, again, 1.0)  # hears the decision
        _train_step(model, opt, again, 1.0)  # restores before its own update
        assert again.rolled_back == 16
        assert [d.action for d in again.decisions].count("rollback") == 1
