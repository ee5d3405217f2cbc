"""The operator's manual LR and shadow mode's hold live in the engine: every path (the
controller, ``load_policy`` in-process, replay) decides the LR the same way."""

from __future__ import annotations

import pytest

import lrctl
from lrctl.daemon.session import Session
from lrctl.policy import Engine

DECAY = ("version: 1\npolicies:\n  - kind: decay\n    schedule: step\n    step_size: 10\n"
         "    gamma: 0.5\n")


def engine(mode: str = "active") -> Engine:
    text = DECAY + (f"mode: {mode}\n" if mode != "active" else "")
    return lrctl.load_policy(text, [0.1, 0.01])


def run(e: Engine, steps: range) -> list[list[float]]:
    return [e.observe(t, 1.0, 1.0) for t in steps]


def test_a_manual_lr_is_held_for_its_steps_then_released_with_a_record() -> None:
    e = engine()
    run(e, range(5))
    d = e.set_lr(0.5, steps=3)  # steps 5, 6, 7 (through step 4 + 3)
    manual = [0.5, 0.5 * (0.01 / 0.1)]  # group 1 keeps its initial ratio to group 0
    assert (d.policy, d.action, list(d.new_lrs)) == ("operator", "set_lr", manual)
    assert e.applied_lrs == manual
    got = run(e, range(5, 12))
    assert got[:2] == [manual] * 2  # the LRs for steps 6 and 7
    assert got[2:] == [[0.1, 0.01]] * 2 + [[0.05, 0.005]] * 3  # the policies' LRs again
    released = [x for x in e.decisions if x.action == "release_lr"]
    assert [(x.step, list(x.old_lrs)) for x in released] == [(7, manual)]
    assert "ended after step 7" in released[0].reason


@pytest.mark.parametrize(("now", "lr", "taken"), [
    (0.1, 10.0, True),      # 100x the initial LR (and the LR now): the bound itself
    (0.1, 10.001, False),   # past it
    (0.05, 10.0, True),     # after a decay, 100x the initial still goes
    (0.1, 1e3, False),      # 1e3 for 1e-3
    (0.1, 0.0, True),       # down is never a jump
])
def test_a_manual_lr_far_above_both_the_initial_and_the_current_needs_force(
        now: float, lr: float, taken: bool) -> None:
    e = engine()
    run(e, range(9 if now == 0.1 else 11))
    assert e.applied_lrs[0] == now
    if taken:
        assert e.set_lr(lr).new_lrs[0] == lr
        return
    decisions = len(e.decisions)
    with pytest.raises(ValueError, match=r"more than 100x the run's initial LR and its LR now"):
        e.set_lr(lr)
    assert (e.applied_lrs[0], len(e.decisions)) == (now, decisions)  # nothing changed
    assert e.set_lr(lr, force=True).new_lrs[0] == lr


def test_a_frozen_group_0_judges_a_manual_lr_by_the_other_groups() -> None:
    """A review found it: group 0 at LR 0 (frozen) gives every group the manual LR, yet
    every positive LR was refused as more than 100x its 0."""
    e = lrctl.load_policy(DECAY, [0.0, 1e-3])
    run(e, range(3))
    with pytest.raises(ValueError, match=r"every group's initial and current LR"):
        e.set_lr(1.0)  # 1000x group 1's
    assert list(e.set_lr(0.1).new_lrs) == [0.1, 0.1]  # (100x group 1's: taken)


def test_shadow_holds_what_was_in_effect_when_it_began_on_every_path() -> None:
    e = engine()
    run(e, range(25))  # two decays: 0.025
    held = e.applied_lrs
    assert held == pytest.approx([0.025, 0.0025])
    d = e.pause()
    assert (d.action, d.old_lrs, d.new_lrs) == ("pause", tuple(held), tuple(held))
    assert run(e, range(25, 60))[-1] == held  # the policies decide on, the LRs hold
    e.resume()
    assert e.applied_lrs == e.lrs != held
    built_in_shadow = engine("shadow")
    assert run(built_in_shadow, range(30))[-1] == [0.1, 0.01]  # the initial LRs


def test_the_manual_lr_and_the_hold_survive_a_checkpoint() -> None:
    e = engine()
    run(e, range(5))
    e.set_lr(0.3, steps=10)
    e.pause()
    again = engine()
    again.load_state_dict(e.state_dict())
    assert again.applied_lrs == e.applied_lrs == pytest.approx([0.3, 0.03])
    assert run(again, range(5, 20)) == run(e, range(5, 20))
    assert [x.action for x in again.last_decisions] == [x.action for x in e.last_decisions]


def test_a_reload_keeps_the_manual_lr() -> None:
    s = Session.create(key="r", run_name="r", policy_text=DECAY, policy_source="<t>",
                       lrs=[0.1, 0.01])
    s.observe(0, 1.0, 1.0, {})
    s.set_lr(0.2, None)
    from lrctl.config import parse_text
    s.reload(parse_text(DECAY.replace("0.5", "0.25"), "<t>"))
    assert s.lrs() == pytest.approx([0.2, 0.02])
    assert s.override == {"lrs": pytest.approx([0.2, 0.02]), "until": None}


def test_a_pause_outlasts_edits_whose_mode_comes_and_goes() -> None:
    """An adversarial pass's find: ``lrctl pause``, then an edit to ``mode: shadow`` and
    one back to ``mode: active``, and the run was active again (the pause was inferred
    from the engine's mode differing from the file's); ``resume`` then said "already
    active". It is kept, through checkpoints too, until the operator resumes."""
    from lrctl.config import parse_text

    def edit(s: Session, mode: str, gamma: str) -> None:
        s.reload(parse_text(DECAY.replace("0.5", gamma) + f"mode: {mode}\n", "<t>"))

    s = Session.create(key="p", run_name="p", policy_text=DECAY, policy_source="<t>",
                       lrs=[0.1, 0.01])
    s.observe(0, 1.0, 1.0, {})
    s.set_mode("shadow")
    for mode, gamma in (("active", "0.4"), ("shadow", "0.3"), ("active", "0.2")):
        edit(s, mode, gamma)
        assert s.mode == "shadow", mode
    s = Session.restore(s.to_state())  # a controller restart
    edit(s, "active", "0.1")
    assert s.mode == "shadow"
    s.set_mode("active")  # the operator's resume: the file governs again
    assert s.mode == "active" and s.operator_mode is None
    edit(s, "shadow", "0.2")
    assert s.mode == "shadow"  # the file's own mode: shadow


def test_a_checkpoint_from_before_the_operators_mode_was_kept_infers_it() -> None:
    s = Session.create(key="q", run_name="q", policy_text=DECAY, policy_source="<t>",
                       lrs=[0.1, 0.01])
    s.set_mode("shadow")
    state = s.to_state()
    del state["operator_mode"]
    assert Session.restore(state).operator_mode == "shadow"
    state["operator_mode"] = "bogus"  # a hook's saved state is checked, not trusted
    assert Session.restore(state).operator_mode is None


def test_an_older_checkpoint_with_the_session_holding_them_restores() -> None:
    s = Session.create(key="o", run_name="o", policy_text=DECAY, policy_source="<t>",
                       lrs=[0.1, 0.01])
    for t in range(3):
        s.observe(t, 1.0, 1.0, {})
    state = s.to_state()
    del state["engine"]["operator"]  # as written before the move
    state["hold_lrs"] = [0.07, 0.007]
    state["override"] = {"lrs": [0.4, 0.04], "until": 8}
    restored = Session.restore(state)
    assert restored.lrs() == [0.4, 0.04]
    assert restored.engine.operator.hold == (0.07, 0.007)
    assert restored.override == {"lrs": [0.4, 0.04], "until": 8}


@pytest.mark.parametrize("bad", [{"override": ["nan", 1.0]}, {"override": [True, 1.0]},
                                 {"hold": [0.1]}, {"override": [0.1, 0.1], "until": "9"},
                                 {"hold": [-1.0, 0.1]}])
def test_operator_state_from_a_checkpoint_is_checked(bad: dict[str, object]) -> None:
    e = engine()
    state = e.state_dict()
    state["operator"] = {"override": None, "until": None, "hold": None, **bad}
    with pytest.raises(ValueError):
        engine().load_state_dict(state)


def test_decisions_under_a_manual_lr_are_recorded_as_not_applied() -> None:
    """Known answer: divergence cuts under ``set_lr`` leave the LR at the manual one,
    their records say so, and their event ratio is 1 (MLflow's ``lrctl/event/*``)."""
    from lrctl.policy._decision import record_ratio

    engine = lrctl.load_policy("version: 1\nmax_lr: 0.01\npolicies:\n  - kind: divergence\n",
                               base_lrs=[0.003])
    for s in range(40):
        engine.observe(step=s, loss=1.0)
    with pytest.raises(ValueError, match=r"max_lr 0\.01"):
        engine.set_lr(1.0)
    engine.set_lr(0.005)
    for s in range(40, 44):
        assert engine.observe(step=s, loss=float("inf")) == [0.005]
    cuts = [d for d in engine.decisions if d.action == "backoff"]
    assert cuts and all(d.evidence["overridden"] is True for d in cuts)
    assert all(record_ratio(d.to_dict()) == 1.0 for d in cuts)
    skips = [d for d in engine.decisions if d.action == "skip"]
    assert skips and all("overridden" not in d.evidence for d in skips)  # skips are real
    released = engine.clear_lr()
    assert released.new_lrs[0] < 0.003 and engine.applied_lrs == list(released.new_lrs)


def test_a_decision_at_the_last_step_of_a_manual_lr_is_applied_and_not_marked() -> None:
    """The manual LR held through step 2 ends once step 2 is observed: a cut decided
    then sets the LRs of step 3, which the optimizer runs: no "not applied" mark."""
    from lrctl.policy.plateau import Plateau

    eng = Engine([Plateau(patience=0, factor=0.5)], [0.1])
    eng.observe(0, 1.0)
    eng.set_lr(0.05, steps=2)  # through step 2
    eng.observe(1, 2.0)  # a cut under the manual LR: not applied
    assert eng.observe(2, 3.0) == [0.025]  # a cut as it ends: applied at step 3
    cuts = {d.step: d for d in eng.decisions if d.action == "reduce"}
    assert cuts[1].evidence.get("overridden") is True
    assert "overridden" not in cuts[2].evidence and "not applied" not in cuts[2].reason


WSD_ON_CALL = {"version": 1, "policies": [{"kind": "wsd", "start_on": "operator",
                                             "decay_steps": 4}]}


def test_an_operators_decay_and_cancel_under_a_manual_lr_are_recorded_as_not_applied() -> None:
    """A review find: ``lrctl decay`` (``Engine.command``) under ``set_lr`` recorded
    ``decay_start 0.003 -> 0.0015`` unmarked while the optimizer held 0.001 (MLflow's
    event ratio 0.5 for a change that never happened); so did ``decay --cancel``. Now
    they say so, as an observation's decisions do; after the manual LR ends, unmarked."""
    from lrctl.policy._decision import record_ratio

    e = lrctl.load_policy(WSD_ON_CALL, base_lrs=[0.003])
    for s in range(3):
        e.observe(step=s, loss=1.0)
    e.set_lr(0.001)
    start = e.command("decay", steps=4)
    assert [d.action for d in start] == ["decay_start"]
    assert start[0].new_lrs[0] < start[0].old_lrs[0]  # the policies' LRs did move
    assert start[0].evidence["overridden"] is True and "not applied" in start[0].reason
    assert record_ratio(start[0].to_dict()) == 1.0
    assert e.observe(step=3, loss=1.0) == [0.001]
    cancel = e.command("cancel")
    assert [d.action for d in cancel] == ["decay_cancel"]
    assert cancel[0].evidence["overridden"] is True
    assert e.observe(step=4, loss=1.0) == [0.001]
    e.clear_lr()
    again = e.command("decay", steps=4)  # no manual LR now: applied, and unmarked
    assert "overridden" not in again[0].evidence and "not applied" not in again[0].reason
    assert e.observe(step=5, loss=1.0)[0] < 0.003


@pytest.mark.parametrize("sync", [False, True], ids=["async", "sync"])
def test_a_decay_as_a_timed_manual_lr_ends_is_applied_and_not_marked(sync: bool) -> None:
    """A review's find: the manual LR ends with the next observation's answer, so the
    decay commanded now reaches the optimizer: no "not applied" mark (as for an
    observation's decision at the manual LR's last step, above)."""
    e = lrctl.load_policy(WSD_ON_CALL, base_lrs=[0.003])
    e.answers_same_step = sync
    for s in range(2 if sync else 3):
        e.observe(step=s, loss=1.0)
    e.set_lr(0.001, steps=1)  # held for one step: the next
    if sync:  # a sync hook's step 2 runs on the answer to its own observation
        assert e.observe(step=2, loss=1.0) == [0.001]
    assert e.operator.until == (2 if sync else 3)
    # Now the answer to observation 3 is the first the policies' LRs set again (async:
    # for step 4; sync: for step 3 itself): the decay reaches the optimizer.
    start = e.command("decay", steps=4)
    assert "overridden" not in start[0].evidence and "not applied" not in start[0].reason
    assert e.observe(step=3, loss=1.0)[0] < 0.003  # the decayed LR, in force


GUARD = "version: 1\npolicies:\n  - kind: divergence\n    max_backoffs: 2\n"


@pytest.mark.parametrize("how", ["file", "pause"])
def test_a_stop_decided_in_shadow_mode_is_recorded_and_never_acted_on(how: str) -> None:
    # A shadow stop used to set should_stop: an in-process shadow engine stopped the
    # loop, and a paused run was stopped at its first step after `lrctl resume`, by a
    # decision recorded as `stop (shadow)`.
    e = lrctl.load_policy(GUARD + ("mode: shadow\n" if how == "file" else ""), [0.1])
    if how == "pause":
        e.pause()
    for t in range(40):
        e.observe(t, 1.0)
    for t in range(40, 50):
        e.observe(t, float("nan"))
    stops = [d for d in e.decisions if d.action == "stop"]
    assert stops and all(d.shadow for d in stops)
    assert not e.should_stop
    if how == "pause":
        e.resume()
        e.observe(50, 1.0)
        assert not e.should_stop
    active = lrctl.load_policy(GUARD, [0.1])
    for t in range(50):
        active.observe(t, 1.0 if t < 40 else float("nan"))
    assert active.should_stop  # the same run, active: the stop is acted on
