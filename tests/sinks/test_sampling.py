"""Which points an observation yields: a faithful LR step curve with few points."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lrctl.sinks.sampling import DENSE_POINTS, Downsampler, MetricSampler, periodic_step


def lr_points(points: list[tuple[str, float, int]], group: int = 0) -> list[tuple[int, float]]:
    return [(s, v) for k, v, s in points if k == f"lrctl/lr/g{group}"]


def test_table_of_points_for_a_step_change() -> None:
    s = MetricSampler(log_every=10)
    got = {step: s.observe(step, 1.0, 0.5, [0.1 if step < 14 else 0.05]) for step in range(22)}
    assert got[0] == [("lrctl/lr/g0", 0.1, 0), ("lrctl/loss", 1.0, 0), ("lrctl/grad_norm", 0.5, 0)]
    assert got[1] == []
    assert got[10] == [("lrctl/lr/g0", 0.1, 10), ("lrctl/loss", 1.0, 10),
                       ("lrctl/grad_norm", 0.5, 10)]
    # The old level is closed at the last step that used it: a vertical edge, not a ramp.
    assert got[14] == [("lrctl/lr/g0", 0.1, 13), ("lrctl/lr/g0", 0.05, 14)]
    assert got[20][0] == ("lrctl/lr/g0", 0.05, 20)
    assert s.finish() == [("lrctl/lr/g0", 0.05, 21), ("lrctl/loss", 1.0, 21),
                          ("lrctl/grad_norm", 0.5, 21)]


@pytest.mark.parametrize(("step", "periodic"), [
    (0, True), (50, True), (99_950, True), (100_000, True),  # every 50 to 100 000
    (100_050, False), (100_100, True), (299_900, True),  # then every 100 to 300 000
    (300_000, True), (300_100, False), (300_200, True), (699_800, True),  # every 200
    (700_000, True), (700_200, False), (700_400, True), (1_500_000, True),  # every 400
    (1_500_400, False), (1_500_800, True), (49, False), (51, False)])
def test_periodic_points_thin_out_as_the_run_grows_long(step: int, periodic: bool) -> None:
    """Known answers, log_every=50: DENSE_POINTS (2 000) points at each spacing."""
    assert DENSE_POINTS == 2000
    assert periodic_step(step, 50) is periodic


def test_a_week_of_steps_holds_tens_of_thousands_of_periodic_points_not_millions() -> None:
    """A soak run at 600 steps/s: a week is 362 880 000 steps, 7.3 M points per metric at
    a fixed 50. Counted spacing by spacing (each a closed range of multiples), checked
    against a step-by-step count over the first 3 M steps."""
    def count(last: int, every: int = 50) -> int:
        total, k = 0, 0
        while (start := ((1 << k) - 1) * every * DENSE_POINTS) <= last:
            end = min(last, ((1 << (k + 1)) - 1) * every * DENSE_POINTS - 1)
            spacing = every << k
            total += end // spacing - (start - 1) // spacing if start else end // spacing + 1
            k += 1
        return total
    assert count(2_999_999) == sum(periodic_step(s, 50) for s in range(3_000_000)) == 9875
    assert count(362_880_000) == 23_544
    assert count(99_999) == 2000  # a run of 100 000 steps: every 50, as before


def test_a_long_runs_changes_and_decisions_keep_their_points_between_thinned_ones() -> None:
    """Past the dense part, a change off the spacing still closes the old level and opens
    the new one, and a decision step still gets its loss and grad norm."""
    s = MetricSampler(log_every=50)
    s.observe(1_000_000, 1.0, 0.5, [0.1])
    assert s.observe(1_000_050, 1.0, 0.5, [0.1]) == []  # (every 400 there)
    assert lr_points(s.observe(1_000_123, 1.0, 0.5, [0.05])) == [(1_000_122, 0.1),
                                                                   (1_000_123, 0.05)]
    assert s.decision(1_000_177) == []  # its observation comes next
    assert s.observe(1_000_177, 0.9, 0.4, [0.05]) == [("lrctl/loss", 0.9, 1_000_177),
                                                       ("lrctl/grad_norm", 0.4, 1_000_177)]
    assert lr_points(s.observe(1_000_400, 1.0, 0.5, [0.05])) == [(1_000_400, 0.05)]


def test_a_change_between_reports_is_a_vertical_edge_too() -> None:
    """every=N: reports at 0 and 10, the LR changed at 15 (an unreported step), then
    report 20. The old LR ran through 14: a point there (a review's find: at 10, which
    drew a ramp from 10 to 15)."""
    s = MetricSampler(log_every=50)
    s.observe(0, 1.0, 0.5, [0.1])
    assert lr_points(s.observe(10, 1.0, 0.5, [0.1])) == []
    assert lr_points(s.lr_change(15, [0.05])) == [(14, 0.1), (15, 0.05)]
    assert lr_points(s.lr_change(16, [0.04])) == [(16, 0.04)]  # (15 is logged: its LR held)
    assert lr_points(s.observe(20, 1.0, 0.5, [0.04])) == []
    assert lr_points(s.lr_change(20 + 1, [0.04])) == []  # no change, no point


def test_a_change_at_a_report_after_unreported_steps_closes_the_level_before_it() -> None:
    """A sync hook reporting every 4th step: the decision at report 100 applies to step
    100, and steps 97-99 (unreported, no change told) ran on the old LR: the old level is
    closed at 99, not at the last report (96), which drew a ramp across 97-99."""
    s = MetricSampler(log_every=1000)
    for step in range(0, 100, 4):
        s.observe(step, 1.0, 0.5, [0.1])
    assert lr_points(s.observe(100, 1.0, 0.5, [0.05])) == [(99, 0.1), (100, 0.05)]


def test_the_last_steps_lrs_corrected_are_logged_again_later() -> None:
    """A sync hook ran its last observed step without its answer (a stalled controller):
    that step's points again, as it ran (the later point stands), and the next change
    closes the corrected level, not the first one."""
    s = MetricSampler(log_every=50)
    for step in range(5):
        s.observe(step, 1.0, 0.5, [0.1])
    # A change recorded at 5 (a back-off) that the step did not get: 5's point again.
    assert lr_points(s.observe(5, 1.0, 0.5, [0.05])) == [(4, 0.1), (5, 0.05)]
    assert lr_points(s.ran(5, [0.1])) == [(5, 0.1)]
    # Step 6 too: no point at 6 yet, so the level before it (0.05 recorded) is closed at 5
    # (logged: none), then 6 as it ran.
    assert lr_points(s.observe(6, 1.0, 0.5, [0.05])) == [(6, 0.05)]
    assert lr_points(s.ran(6, [0.1])) == [(6, 0.1)]
    assert lr_points(s.observe(7, 1.0, 0.5, [0.1])) == []  # no point: 0.1 went on
    assert lr_points(s.ran(7, [0.1])) == []  # ran as recorded: nothing
    assert lr_points(s.ran(6, [0.2])) == []  # not the last observed step: left alone
    # A step with no point of its own: the level before closed at the step before it.
    assert lr_points(s.observe(8, 1.0, 0.5, [0.1])) == []
    assert lr_points(s.observe(9, 1.0, 0.5, [0.1])) == []
    assert lr_points(s.ran(9, [0.3])) == [(8, 0.1), (9, 0.3)]
    assert lr_points(s.observe(10, 1.0, 0.5, [0.05])) == [(10, 0.05)]  # (9 is logged)


def test_a_second_point_at_a_step_replaces_the_first_in_a_downsampled_series() -> None:
    d = Downsampler(capacity=4)
    for x, y in [(0, 1.0), (1, 2.0), (1, 3.0)]:
        d.add(x, y)
    assert d.points() == ([0, 1], [1.0, 3.0])
    d = Downsampler(capacity=4)
    for x in range(10):  # strided: the latest point is held apart
        d.add(x, float(x))
    d.add(9, -1.0)
    xs, ys = d.points()
    assert xs[-1] == 9 and ys[-1] == -1.0 and xs.count(9) == 1


def test_a_decision_step_gets_its_loss_and_grad_norm_once_in_either_order() -> None:
    s = MetricSampler(log_every=100)
    s.observe(0, 3.0, 1.0, [0.1])
    s.observe(5, 2.0, None, [0.1])
    assert s.decision(5) == [("lrctl/loss", 2.0, 5)]
    assert s.decision(5) == []  # a second decision at the same step
    assert s.decision(6) == []  # its observation has not come yet
    assert ("lrctl/loss", 1.5, 6) in s.observe(6, 1.5, 0.2, [0.1])


def test_log_every_is_validated() -> None:
    with pytest.raises(ValueError, match="log_every"):
        MetricSampler(log_every=0)


@given(st.lists(st.sampled_from([0.1, 0.05, 0.2]), min_size=1, max_size=300),
       st.integers(1, 60), st.integers(1, 3))
def test_the_logged_step_curve_equals_every_lr_used(levels: list[float], every: int,
                                                    stride: int) -> None:
    s = MetricSampler(log_every=every)
    used: dict[int, list[float]] = {}
    points: list[tuple[str, float, int]] = []
    for i, lr in enumerate(levels):
        step = i * stride  # steps may skip (gradient accumulation)
        used[step] = [lr, lr / 10]
        points += s.observe(step, 1.0, None, used[step])
    points += s.finish()
    for g in (0, 1):
        curve = sorted(lr_points(points, g))
        for step, lrs in used.items():
            assert [v for t, v in curve if t <= step][-1] == lrs[g]
        assert curve[-1][0] == max(used)  # the curve reaches the last step


def test_downsampler_is_bounded_and_keeps_both_ends() -> None:
    d = Downsampler(capacity=100)
    for i in range(1_000_000):
        d.add(i, float(i))
    xs, _ = d.points()
    assert len(xs) <= 101
    assert xs[0] == 0 and xs[-1] == 999_999
    gaps = {b - a for a, b in itertools.pairwise(xs[:-1])}
    assert len(gaps) == 1  # evenly spread


def test_a_seeded_sampler_closes_the_journaled_level_before_its_first_change() -> None:
    """A reopened run (its journal's last LR point: 0.1 at 50) whose first observed step,
    100, has a new LR: the old level is closed at 99, not drawn as a ramp from 50."""
    s = MetricSampler(log_every=50)
    s.seed(50, [0.1])
    assert lr_points(s.observe(100, 1.0, 0.5, [0.05])) == [(99, 0.1), (100, 0.05)]
    seeded = MetricSampler(log_every=50)
    seeded.seed(50, [0.1])
    assert lr_points(seeded.observe(51, 1.0, 0.5, [0.1])) == []  # no change, no point
    again = MetricSampler(log_every=50)
    again.seed(50, [0.1])
    assert lr_points(again.lr_change(60, [0.05])) == [(59, 0.1), (60, 0.05)]  # every=N
    assert MetricSampler(log_every=50).observe(7, 1.0, None, [0.1])[0] == ("lrctl/lr/g0", 0.1, 7)


def test_a_reopened_run_is_seeded_from_the_points_a_rewind_left_standing(
        tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A review's find: the seed of a reopened run took the newest LR point of the
    journal's tail, an undone one (0.01 at 80) over the resumed run's own (0.1 at 65), and
    forgot the undone steps still to redo."""
    import json
    from types import SimpleNamespace

    from lrctl.sinks._open_run import seed_sampler

    lines = [
        {"seq": 1, "ts": 0, "points": [["lrctl/lr/g0", 0.1, 0], ["lrctl/lr/g0", 0.1, 70],
                                       ["lrctl/lr/g0", 0.01, 71], ["lrctl/lr/g0", 0.01, 80]]},
        {"seq": 2, "ts": 1, "rewind": 60,
         "points": [["lrctl/lr/g0", 0.1, s] for s in range(61, 66)]},
    ]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    run = SimpleNamespace(paths=SimpleNamespace(stream=lambda n: tmp_path / f"{n}.jsonl"),
                          sampler=MetricSampler(50))
    seed_sampler(run)  # type: ignore[arg-type]
    sampler = run.sampler
    # 66-80 were undone: each gets a later point; the change at 67 closes 0.1 at 66.
    assert sampler.observe(66, 1.0, 1.0, [0.1])[0] == ("lrctl/lr/g0", 0.1, 66)
    assert ("lrctl/lr/g0", 0.05, 67) in sampler.observe(67, 1.0, 1.0, [0.05])
    assert ("lrctl/lr/g0", 0.05, 80) in sampler.observe(80, 1.0, 1.0, [0.05])
    assert not [p for p in sampler.observe(81, 1.0, 1.0, [0.05]) if p[0].startswith("lrctl/lr")]
