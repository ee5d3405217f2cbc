"""LRWriter's shortcut (nothing to do when nothing changed) never hides a change."""

from __future__ import annotations

from typing import Any

import pytest

from lrctl._writer import LRWriter


class _Opt:
    def __init__(self, *lrs: float) -> None:
        self.param_groups: list[dict[str, Any]] = [{"lr": lr, "params": []} for lr in lrs]


def _writer(opt: _Opt, base: str = "controller") -> tuple[LRWriter, list[str]]:
    warned: list[str] = []
    return LRWriter(opt, [g["lr"] for g in opt.param_groups], base,
                    lambda key, msg: warned.append(key)), warned


def test_a_foreign_write_after_quiet_steps_is_seen_and_overwritten() -> None:
    opt = _Opt(0.1, 0.01)
    writer, warned = _writer(opt)
    target = [0.05, 0.005]
    for _ in range(3):
        writer.apply(target)  # the same list each time: the shortcut
    assert [g["lr"] for g in opt.param_groups] == target and not warned
    opt.param_groups[1]["lr"] = 0.3  # a scheduler left in the loop
    writer.apply(target)
    assert [g["lr"] for g in opt.param_groups] == target
    assert warned == ["foreign-lr"] and writer.foreign_writes == 1


def test_an_equal_value_written_by_someone_else_is_no_foreign_write() -> None:
    opt = _Opt(0.1)
    writer, warned = _writer(opt)
    target = [0.05]
    writer.apply(target)
    opt.param_groups[0]["lr"] = float("0.05")  # another object, the same value
    writer.apply(target)
    assert opt.param_groups[0]["lr"] == 0.05 and not warned


def test_loop_mode_scales_the_loops_lr_at_every_step() -> None:
    opt = _Opt(1.0)
    writer, _ = _writer(opt, base="loop")
    target = [0.5]  # the controller halved the LR
    for loop_lr in (None, 0.9, None, 0.8):  # None: the loop leaves its LR alone this step
        if loop_lr is not None:
            opt.param_groups[0]["lr"] = loop_lr
        writer.apply(target)
        assert opt.param_groups[0]["lr"] == writer.base[0] * 0.5
        writer.restore()  # after the optimizer step: the loop's own LR is back
        assert opt.param_groups[0]["lr"] == writer.base[0]


def test_new_param_group_dicts_are_written() -> None:
    opt = _Opt(0.1)
    writer, _ = _writer(opt)
    target = [0.05]
    writer.apply(target)
    opt.param_groups = [{"lr": 0.1, "params": []}]  # optimizer.load_state_dict()
    writer.apply(target)
    assert opt.param_groups[0]["lr"] == 0.05


@pytest.mark.parametrize("then", ["the one before", "the one cut short"])
def test_a_write_cut_short_by_an_error_is_never_taken_as_done(then: str) -> None:
    """The loop's filters made the foreign-write warning an error: apply() stopped with
    group 0 holding the new target's LR and group 1 not yet written. Whichever target
    comes next, and even once group 1 holds the very float the writer left there again
    (the loop put back ``ctl.lr``), its LRs are written, not skipped as in place."""
    opt = _Opt(0.1, 0.01)

    def warn(key: str, message: str) -> None:
        raise RuntimeWarning(message)  # warnings.simplefilter("error") in the loop

    writer = LRWriter(opt, [0.1, 0.01], "controller", warn)
    before, cut_short = [0.05, 0.005], [0.02, 0.002]
    writer.apply(before)
    opt.param_groups[1]["lr"] = 0.3  # a scheduler still stepping
    with pytest.raises(RuntimeWarning):
        writer.apply(cut_short)
    assert opt.param_groups[0]["lr"] == 0.02  # written before group 1 raised
    opt.param_groups[1]["lr"] = writer.applied[1]  # ctl.lr's float, the one written there
    target = before if then == "the one before" else cut_short
    writer.apply(target)
    assert [g["lr"] for g in opt.param_groups] == target
