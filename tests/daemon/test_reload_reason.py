"""A reload's reason names what moved: a knob's old and new value, a policy added or
removed as such (not as its ``kind`` going from or to its default)."""

from __future__ import annotations

from lrctl.daemon._knobs import knob_changes, said_changes

OLD = {"mode": "active", "plateau.kind": "plateau", "plateau.factor": "0.5"}


def test_a_changed_knob_says_its_old_and_new_value() -> None:
    changes = knob_changes(OLD, {**OLD, "plateau.factor": "0.25"})
    assert said_changes(changes) == "plateau.factor 0.5 → 0.25"


def test_an_added_or_removed_policy_is_said_so_once() -> None:
    new = {**OLD, "decay.kind": "decay", "decay.factor": "0.9"}
    added = knob_changes(OLD, new)
    assert added == {"decay.kind": [None, "decay"], "decay.factor": [None, "0.9"]}
    assert said_changes(added) == "policy decay added (kind decay)"
    assert said_changes(knob_changes(new, OLD)) == "policy decay removed (kind decay)"
    both = knob_changes(new, {**OLD, "plateau.factor": "0.1"})
    assert said_changes(both) == "plateau.factor 0.5 → 0.1; policy decay removed (kind decay)"
