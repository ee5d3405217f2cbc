"""Rollback-and-skip without a controller: snapshots restore exactly, the book follows the
hook's snapshots, the divergence guard rolls back only when snapshots exist."""

from __future__ import annotations

import math
import random
from typing import Any

import pytest
import torch

import lrctl
from lrctl._rollback import Rollbacks
from lrctl._snapshots import SnapshotRing
from lrctl.policy._rollback import SnapshotBook

GUARD = {"version": 1, "policies": [{"kind": "divergence", "cooldown": 5, "min_samples": 8,
                                     "window": 32, "skip_spikes": True}]}


def _model() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8),
                                torch.nn.ReLU(), torch.nn.Linear(8, 2))
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2)


def _train(model: torch.nn.Module, opt: torch.optim.Optimizer, steps: int) -> None:
    for _ in range(steps):
        opt.zero_grad()
        model(torch.randn(16, 4)).square().mean().backward()
        opt.step()


def _state(model: torch.nn.Module, opt: torch.optim.Optimizer) -> dict[str, Any]:
    return {"params": [p.detach().clone() for p in model.parameters()],
            "buffers": [b.clone() for b in model.buffers()],
            "opt": [{k: v.clone() if torch.is_tensor(v) else v for k, v in opt.state[p].items()}
                    for p in model.parameters()]}


def _equal(a: dict[str, Any], b: dict[str, Any]) -> bool:
    same = all(torch.equal(x, y) for x, y in zip(a["params"], b["params"], strict=True))
    same &= all(torch.equal(x, y) for x, y in zip(a["buffers"], b["buffers"], strict=True))
    for sa, sb in zip(a["opt"], b["opt"], strict=True):
        same &= sa.keys() == sb.keys() and all(
            torch.equal(sa[k], sb[k]) if torch.is_tensor(sa[k]) else sa[k] == sb[k] for k in sa)
    return bool(same)


def test_a_restore_gives_back_the_snapshot_exactly() -> None:
    model, opt = _model()
    _train(model, opt, 3)
    ring = SnapshotRing(opt, keep=2, model=model)
    want = _state(model, opt)
    ring.take(3)
    _train(model, opt, 4)
    assert not _equal(_state(model, opt), want)
    snap = ring.newest_at_or_before(5)
    assert snap is not None and snap.step == 3
    ring.restore(snap)
    assert _equal(_state(model, opt), want)  # params, BatchNorm stats, Adam moments, step
    _train(model, opt, 1)  # the optimizer goes on from the restored state
    assert int(opt.state[next(model.parameters())]["step"]) == 4


def test_the_ring_keeps_the_newest_and_reuses_its_buffers() -> None:
    model, opt = _model()
    _train(model, opt, 1)
    ring = SnapshotRing(opt, keep=2, model=model)
    first = ring.take(0)
    ptrs = [t.data_ptr() for t in first.params]
    ring.take(10)
    third = ring.take(20)  # the oldest slot, with its buffers, comes back
    assert ring.steps == [10, 20]
    assert [t.data_ptr() for t in third.params] == ptrs
    ring.drop_after(10)
    assert ring.steps == [10] and ring.nbytes > 0


def test_a_snapshot_before_the_first_step_clears_the_optimizer_state() -> None:
    model, opt = _model()
    ring = SnapshotRing(opt, keep=1)
    ring.take(0)
    _train(model, opt, 2)
    ring.restore(ring.ring[0])
    assert all(not opt.state.get(p) for p in model.parameters())


def test_the_book_holds_the_newest_multiples_and_forgets_after_a_rollback() -> None:
    book = SnapshotBook(every=10, keep=3, lag=0)
    book.advance(5)
    assert book.steps == [0]
    book.advance(1000)
    assert book.steps == [980, 990, 1000]
    assert book.newest_at_or_before(995, 1000) == 990
    book.rolled_back(980, 1000)
    assert book.steps == [980]
    book.advance(1010)
    assert book.steps == [980, 1010]
    assert SnapshotBook.from_state(book.state_dict()).state_dict() == book.state_dict()


def test_the_book_does_not_offer_what_the_lag_evicts_nor_count_the_lag_window() -> None:
    book = SnapshotBook(every=2, keep=2, lag=2)
    book.advance(9)
    assert book.steps == [6, 8]
    # The hook takes step 10's snapshot before it hears a decision made at 9: 6 is gone.
    assert book.newest_at_or_before(7, 9) is None
    assert book.newest_at_or_before(9, 9) == 8
    book.rolled_back(8, 9)
    book.advance(14)  # 10 and 11 fall in the window after the decision: no snapshots
    assert book.steps == [12, 14]


def _stream(n: int, fault_at: int, seed: int = 0) -> list[float]:
    rng = random.Random(seed)
    return [math.exp(rng.gauss(0.0, 0.02)) * (60.0 if t >= fault_at else 1.0)
            for t in range(n)]


def test_without_snapshots_the_guard_decides_exactly_as_before() -> None:
    plain = lrctl.load_policy(GUARD, [0.1])
    off = lrctl.load_policy({**GUARD, "policies": [{**GUARD["policies"][0],
                                                    "max_rollbacks": 0}]}, [0.1])
    off.enable_snapshots(5, 3)
    for t, loss in enumerate(_stream(80, 30)):
        assert plain.observe(t, loss) == off.observe(t, loss)
    def records(engine: Any) -> list[dict[str, Any]]:
        return [{**d.to_dict(), "policy_sha256": None} for d in engine.decisions]

    assert records(plain) == records(off)
    assert all(d.action != "rollback" for d in plain.decisions)


def test_a_back_off_that_does_not_take_rolls_back_with_evidence() -> None:
    engine = lrctl.load_policy(GUARD, [0.1])
    engine.enable_snapshots(every=5, keep=4)
    rolled = []
    for t, loss in enumerate(_stream(45, 30)):
        engine.observe(t, loss)
        if engine.rollback_to is not None:
            rolled.append((t, engine.rollback_to))
            break
    [decision] = [d for d in engine.decisions if d.action == "rollback"]
    assert rolled == [(decision.step, 25)]
    ev = decision.evidence
    assert ev["incident_step"] == 30 and ev["snapshot_step"] == 25
    assert ev["steps_lost"] == decision.step - 25  # restored before this step's update
    assert decision.new_lrs[0] < decision.old_lrs[0]  # with the reduced LR
    state = engine.state_dict()
    again = lrctl.load_policy(GUARD, [0.1])
    again.load_state_dict(state)
    assert again.state_dict() == state and again.snapshots is not None


def test_rollbacks_are_bounded_then_stop() -> None:
    """The fault stays (a too-high LR, say): each restored model starts at the old loss,
    and two steps later diverges again."""
    policy = {**GUARD, "policies": [{**GUARD["policies"][0], "max_rollbacks": 1,
                                     "max_backoffs": 50}]}
    engine = lrctl.load_policy(policy, [0.1])
    engine.enable_snapshots(every=5, keep=10)
    rng = random.Random(0)
    restored_at = -100
    for t in range(200):
        broken = t >= 30 and t - restored_at > 2
        engine.observe(t, math.exp(rng.gauss(0.0, 0.02)) * (60.0 if broken else 1.0))
        if engine.rollback_to is not None:
            restored_at = t
        if engine.should_stop:
            break
    actions = [d.action for d in engine.decisions if d.policy == "divergence"]
    assert actions.count("rollback") == 1 and actions[-1] == "stop"
    assert not any(d.evidence.get("level_accepted") for d in engine.decisions)


def test_a_lasting_change_of_data_after_a_rollback_gives_the_lr_back() -> None:
    """The loss 60× up for good, whatever the weights (harder data): the weights restored
    from before the incident show it at once, so no further rollback follows: the level
    is accepted and the LR given back (it was rolled back, then asked to stop, before).
    The watch survives a resume between the rollback and its verdict."""
    engine = lrctl.load_policy(GUARD, [0.1])
    engine.enable_snapshots(every=5, keep=10)
    resumed = None
    for t, loss in enumerate(_stream(300, 30)):
        engine.observe(t, loss)
        if resumed is not None:
            resumed.observe(t, loss)
        elif engine.rollback_to is not None:
            resumed = lrctl.load_policy(GUARD, [0.1])
            resumed.load_state_dict(engine.state_dict())
    actions = [(d.step, d.action) for d in engine.decisions if d.action != "skip"]
    assert [a for _, a in actions] == ["backoff", "rollback", "regrow"], actions
    (given,) = [d for d in engine.decisions if d.evidence.get("level_accepted")]
    assert given.evidence["snapshot_step"] == 25 and given.evidence["multiplier"] == 1.0
    assert "not the weights" in given.reason and list(given.new_lrs) == [0.1]
    assert not engine.should_stop and list(engine.applied_lrs) == [0.1]
    assert resumed is not None and [d.to_dict() for d in resumed.decisions] == [
        d.to_dict() for d in engine.decisions if d.step > actions[1][0]]


def test_a_nonfinite_loss_after_the_restore_is_no_change_of_data() -> None:
    """The same lasting 60× level, but the restored model's third loss is NaN: a new
    incident, so that rollback's verdict is not waited for. The next rollback's restored
    weights show the level again, cleanly: only then is the LR given back."""
    engine = lrctl.load_policy(GUARD, [0.1])
    engine.enable_snapshots(every=5, keep=10)
    rolled = None
    for t, loss in enumerate(_stream(120, 30)):
        engine.observe(t, math.nan if rolled is not None and t == rolled + 3 else loss)
        if engine.rollback_to is not None and rolled is None:
            rolled = t
    assert rolled is not None
    actions = [(d.step, d.action) for d in engine.decisions if d.action != "skip"]
    assert [a for _, a in actions] == ["backoff", "rollback", "backoff", "rollback", "regrow"]
    assert actions[2][0] == rolled + 3
    (given,) = [d for d in engine.decisions if d.evidence.get("level_accepted")]
    assert given.step == actions[4][0] and not engine.should_stop


def test_persisting_nonfinite_values_roll_back() -> None:
    engine = lrctl.load_policy(GUARD, [0.1])
    engine.enable_snapshots(every=4, keep=4)
    for t in range(20):
        engine.observe(t, 1.0 + 0.01 * (t % 3))
    engine.observe(20, math.nan)
    assert engine.rollback_to is None  # one NaN: skipped and backed off, as before
    engine.observe(21, math.nan)
    assert engine.rollback_to == 16
    assert engine.decisions[-1].evidence["in_a_row"] == 2


def test_the_steps_of_the_thrown_away_weights_are_no_new_incident() -> None:
    """A newcomer's find: a rollback decided at t is carried out by an async hook at
    t + 2, so steps t + 1 and t + 2 ran on the broken weights; their NaN counted as a
    new incident and backed off again on top of the rollback's own cut. They are still
    skipped, not judged; after them the restored model is judged as usual."""
    engine = lrctl.load_policy(GUARD, [0.1])
    engine.enable_snapshots(every=4, keep=4, lag=2)
    for t in range(20):
        engine.observe(t, 1.0 + 0.01 * (t % 3))
    engine.observe(20, math.nan)
    engine.observe(21, math.nan)
    assert engine.rollback_to == 16
    lr_after_rollback = engine.applied_lrs
    decided = len(engine.decisions)
    for t in (22, 23):  # the weights being thrown away, restored before step 23's update
        engine.observe(t, math.nan)
        assert engine.should_skip
        assert engine.applied_lrs == lr_after_rollback
    assert [d.action for d in engine.decisions[decided:]] == ["skip", "skip"]
    engine.observe(24, math.nan)  # the restored model: a NaN now is an incident again
    assert engine.decisions[-1].action in ("backoff", "rollback")
    state = engine.state_dict()
    again = lrctl.load_policy(GUARD, [0.1])
    again.load_state_dict(state)
    assert again.state_dict() == state


def test_user_callbacks_are_called_with_the_snapshot_step() -> None:
    saved: list[int] = []
    loaded: list[int] = []
    opt = torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=0.1)
    rb = Rollbacks.create(opt, 3, 2, None, saved.append, loaded.append, lambda k, m: None)
    assert rb is not None
    for t in range(8):
        assert rb.step(t) is None
    assert saved == [0, 3, 6] and rb.steps == [3, 6]
    rb.on_decision({"step": 7, "action": "rollback", "evidence": {"snapshot_step": 5}}, False)
    assert rb.step(8) == 3 and loaded == [3]
    assert rb.step(9) is None and saved == [0, 3, 6]  # 8, 9 lie in the decision's lag window
    rb.step(12)
    assert rb.steps == [3, 12]


def test_options_are_checked() -> None:
    opt = torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=0.1)
    with pytest.raises(ValueError, match="snapshot_every"):
        Rollbacks.create(opt, 0, 2, None, None, None, lambda k, m: None)
    with pytest.raises(ValueError, match="go together"):
        Rollbacks.create(opt, 2, 2, None, print, None, lambda k, m: None)
    assert Rollbacks.create(opt, None, 2, None, None, None, lambda k, m: None) is None


def test_a_rollback_over_an_added_param_group_restores_the_newest_snapshot_that_fits() -> None:
    """Progressive unfreezing (``add_param_group``) with snapshots on: the snapshots taken
    before it hold fewer parameters. A rollback to one of them raised inside the hook,
    which swallowed it: decided, recorded, not done, with a generic error. Now the newest
    snapshot that fits is restored, or none, with a warning that says why."""
    model, opt = _model()
    head = torch.nn.Linear(4, 2)
    said: list[tuple[str, str]] = []
    rollbacks = Rollbacks.create(opt, 10, 3, model, None, None,
                                 lambda key, text: said.append((key, text)))
    assert rollbacks is not None
    for t in range(30):
        if t == 25:
            opt.add_param_group({"params": head.parameters(), "lr": 1e-3})
        assert rollbacks.step(t) is None
        _train(model, opt, 1)
    rollbacks.on_decision({"step": 30, "action": "rollback",
                           "evidence": {"snapshot_step": 20}}, distributed=False)
    assert rollbacks.step(31) is None  # 0, 10, 20 predate the new group: none fits
    assert said and said[-1][0] == "rollback-unfit" and "add_param_group" in said[-1][1]
    assert rollbacks.step(40) is None  # a snapshot of step 40 holds the new group
    want = _state(model, opt)
    _train(model, opt, 2)
    rollbacks.on_decision({"step": 42, "action": "rollback",
                           "evidence": {"snapshot_step": 40}}, distributed=False)
    assert rollbacks.step(43) == 40
    assert _equal(_state(model, opt), want)
