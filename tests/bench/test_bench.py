"""Fast checks of the benchmark code: structure, regret arithmetic, fault handling.

Tiny step counts only; no timing thresholds. The full grid is run by hand
(``lrctl bench quality``) and its numbers live in the README.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from lrctl.bench import _suite  # noqa: E402
from lrctl.bench.arms import ARMS  # noqa: E402
from lrctl.bench.faults import FAULTS, Fault  # noqa: E402
from lrctl.bench.quality import GRID, QualityConfig, run_quality, summarize_quality  # noqa: E402
from lrctl.bench.recovery import RecoveryConfig, recovery_steps, run_recovery  # noqa: E402
from lrctl.bench.runner import RunResult, train  # noqa: E402
from lrctl.bench.tasks import TASKS  # noqa: E402
from lrctl.cli import main  # noqa: E402


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def test_light_name_lists_match_the_real_tables() -> None:
    assert tuple(TASKS) == _suite.TASK_NAMES
    assert tuple(ARMS) == _suite.ARM_NAMES


def test_grid_is_seven_points_over_three_decades() -> None:
    assert len(GRID) == 7
    assert GRID[0] == pytest.approx(1e-4) and GRID[-1] == pytest.approx(1e-1)


@pytest.mark.parametrize("task", list(TASKS))
def test_lrctl_run_is_finite_and_seeded(task: str) -> None:
    a = train(TASKS[task], "lrctl", 1e-3, seed=3, steps=15)
    b = train(TASKS[task], "lrctl", 1e-3, seed=3, steps=15)
    assert not a.diverged and math.isfinite(a.final_val)
    assert a.train_loss == b.train_loss  # same seed, same run
    assert len(a.lrs) == 15


def _fake(arm: str, lr: float, seed: int, val: float, diverged: bool = False) -> RunResult:
    return RunResult("digits", arm, lr, seed, 10, val, diverged)


def test_regret_uses_the_best_seed_averaged_cosine_cell() -> None:
    lrs = [1e-3, 1e-2]
    runs = [_fake("cosine", 1e-3, 0, 2.0), _fake("cosine", 1e-3, 1, 4.0),  # mean 3
            _fake("cosine", 1e-2, 0, 1.0), _fake("cosine", 1e-2, 1, 1.0),  # mean 1: best
            _fake("lrctl", 1e-3, 0, 1.04), _fake("lrctl", 1e-3, 1, 1.04),
            _fake("lrctl", 1e-2, 0, 1.0), _fake("lrctl", 1e-2, 1, math.nan, diverged=True)]
    s = summarize_quality(runs, ["cosine", "lrctl"], lrs)["digits"]
    assert s["best_cosine_val"] == 1.0 and s["best_cosine_lr"] == 1e-2
    assert s["arms"]["cosine"]["regret"] == [3.0, 1.0]
    lrctl = s["arms"]["lrctl"]
    assert lrctl["regret"] == [pytest.approx(1.04), math.inf]  # one diverged seed: inf
    assert lrctl["robust_width"] == 1 and lrctl["nan_runs"] == 1


def test_quick_quality_run_has_every_arm_and_task(tmp_path: Path) -> None:
    # Every arm of the table on the two original tasks (each task alone: tests below and
    # in test_quality_suite.py); the policy:<stem> arms are checked there too.
    cfg = QualityConfig.quick()
    cfg.tasks, cfg.arms = _suite.LEGACY_TASKS, tuple(ARMS)
    cfg.lrs, cfg.steps = (1e-3, 1e-1), {t: 8 for t in TASKS}
    seen: list[int] = []
    result = run_quality(cfg, lambda line, done, total: seen.append(done))
    assert seen == list(range(1, len(cfg.tasks) * len(ARMS) * 2 + 1))
    assert set(result["summary"]) == set(cfg.tasks)
    for task in cfg.tasks:
        arms = result["summary"][task]["arms"]
        assert set(arms) == set(ARMS)
        assert arms["lrctl"]["nan_runs"] == 0
        assert all(len(a["regret"]) == 2 for a in arms.values())
    json.dumps(result["runs"], allow_nan=False)


@pytest.mark.parametrize("kind", list(FAULTS))
def test_lrctl_keeps_parameters_finite_under_each_fault(kind: str) -> None:
    run = train(TASKS["digits"], "lrctl", 1e-3, seed=0, steps=60, fault=Fault(kind, 40))
    assert not run.diverged, run.decisions[-3:]
    if kind in ("nan_grad", "nan_loss"):
        assert run.skipped >= 1


def test_nan_gradient_breaks_an_unguarded_run() -> None:
    run = train(TASKS["digits"], "fixed", 1e-3, seed=0, steps=30, fault=Fault("nan_grad", 10))
    assert run.diverged


def test_recovery_steps() -> None:
    losses = [1.0] * 50 + [9.0] * 7 + [1.05] * 20
    # The first 10-step window with a median ≤ 1.1 holds 4 × 9.0 and 6 × 1.05.
    assert recovery_steps(losses, 50) == 3
    assert recovery_steps([1.0] * 50 + [math.nan] + [5.0] * 20, 50) is None


def test_quick_recovery_run_structure() -> None:
    cfg = RecoveryConfig.quick()
    cfg.tasks, cfg.faults, cfg.steps = ("digits",), ("nan_loss",), {"digits": 60}
    result = run_recovery(cfg)
    assert [(r["arm"], r["fault"]) for r in result["runs"]] == [
        ("lrctl", "nan_loss"), ("lrctl+rollback", "nan_loss"), ("fixed", "nan_loss")]
    lrctl, rollback, fixed = result["runs"]
    assert lrctl["finite"] and rollback["finite"] and not fixed["finite"]
    assert [(r["arm"], r["runs"]) for r in result["within_5pct"]] == [
        ("lrctl", 1), ("lrctl+rollback", 1), ("fixed", 1)]
    assert result["false_backoffs"]["steps"] == 60 + 30


def test_cli_quick_smoke(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    rc = main(["bench", "recovery", "--quick", "--tasks", "digits", "--faults", "nan_grad",
               "--steps", "40", "--out", str(out), "--json", str(tmp_path / "r.json"), "-q"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "| digits | lrctl | nan_grad |" in printed and "cores" in printed
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["suite"] == "recovery" and data["machine"]["cores"]
    assert (out / "recovery.md").is_file()


def test_cli_quality_writes_plot(tmp_path: Path) -> None:
    rc = main(["bench", "quality", "--quick", "--tasks", "digits", "--arms", "lrctl",
               "--steps", "5", "--out", str(tmp_path), "-q"])
    assert rc == 0
    assert (tmp_path / "quality.png").stat().st_size > 1000
