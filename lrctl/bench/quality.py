"""``lrctl bench quality``: final validation loss over a grid of starting LRs.

Regret is seed-averaged: for each task, arm and starting LR, the mean final
validation loss over the seeds, divided by the best such mean of the
``cosine`` arm over the whole grid (the "grid-tuned cosine" denominator).
A cell with any diverged seed has regret ``inf`` and counts as a NaN run per
diverged seed. *Robust width* is the number of starting LRs with r ≤ 1.05.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ._suite import ARM_NAMES, TASK_NAMES, Progress, Suite

if TYPE_CHECKING:
    from .runner import RunResult

__all__ = ["GRID", "SUITE", "QualityConfig", "run_quality", "summarize_quality"]

#: Seven starting LRs over three decades, half a decade apart.
GRID = tuple(10.0 ** (-4 + k / 2) for k in range(7))
ROBUST_R = 1.05


@dataclass
class QualityConfig:
    tasks: Sequence[str] = TASK_NAMES
    arms: Sequence[str] = ARM_NAMES
    lrs: Sequence[float] = GRID
    seeds: Sequence[int] = (0, 1, 2)
    steps: dict[str, int] = field(default_factory=dict)  # per task; default: the task's own
    policy: Any = None  # the lrctl arm's policy (default: the shipped default.yaml)

    @classmethod
    def quick(cls) -> QualityConfig:
        """A smoke-sized grid: every arm and task, three LRs, one seed, few steps."""
        return cls(lrs=(1e-4, 1e-2, 1e-1), seeds=(0,), steps={t: 40 for t in TASK_NAMES})


def run_quality(cfg: QualityConfig, progress: Progress | None = None) -> dict[str, Any]:
    """Train every (task, arm, LR, seed) of the grid; return runs and per-task summaries."""
    from .runner import train
    from .tasks import TASKS

    if "cosine" not in cfg.arms:
        raise ValueError("the cosine arm is required: it is the regret denominator")
    runs: list[RunResult] = []
    total = len(cfg.tasks) * len(cfg.arms) * len(cfg.lrs) * len(cfg.seeds)
    for task_name in cfg.tasks:
        task = TASKS[task_name]
        steps = cfg.steps.get(task_name, task.steps)
        for arm in cfg.arms:
            for lr in cfg.lrs:
                for seed in cfg.seeds:
                    began = time.perf_counter()
                    result = train(task, arm, lr, seed, steps=steps, policy=cfg.policy)
                    runs.append(result)
                    if progress is not None:
                        progress(f"{task_name} {arm} lr={lr:.3g} seed={seed}: val "
                                 f"{result.final_val:.4f}"
                                 f"{' DIVERGED' if result.diverged else ''} "
                                 f"({time.perf_counter() - began:.1f} s)", len(runs), total)
    return {
        "config": {"tasks": list(cfg.tasks), "arms": list(cfg.arms), "lrs": list(cfg.lrs),
                   "seeds": list(cfg.seeds),
                   "steps": {t: cfg.steps.get(t, TASKS[t].steps) for t in cfg.tasks}},
        "runs": [r.summary() for r in runs],
        "summary": summarize_quality(runs, cfg.arms, cfg.lrs),
    }


def summarize_quality(runs: Sequence[RunResult], arms: Sequence[str],
                      lrs: Sequence[float]) -> dict[str, Any]:
    """Per task: the denominator, and per arm the regret per LR, robust width, median r, NaNs."""
    out: dict[str, Any] = {}
    for task in sorted({r.task for r in runs}, key=list(TASK_NAMES).index):
        mine = [r for r in runs if r.task == task]
        means = {(arm, lr): _mean_val([r for r in mine if r.arm == arm and r.lr == lr])
                 for arm in arms for lr in lrs}
        finite = [v for (arm, _), v in means.items() if arm == "cosine" and math.isfinite(v)]
        best = min(finite) if finite else math.nan
        best_lr = next((lr for lr in lrs if means[("cosine", lr)] == best), None)
        per_arm: dict[str, Any] = {}
        for arm in arms:
            regrets = [means[(arm, lr)] / best if math.isfinite(means[(arm, lr)])
                       else math.inf for lr in lrs]
            per_arm[arm] = {
                "regret": regrets,
                "mean_val": [means[(arm, lr)] for lr in lrs],
                "robust_width": sum(r <= ROBUST_R for r in regrets),
                "median_r": statistics.median(regrets),
                "nan_runs": sum(r.diverged for r in mine if r.arm == arm),
                "runs": sum(r.arm == arm for r in mine),
            }
        out[task] = {"best_cosine_val": best, "best_cosine_lr": best_lr, "arms": per_arm}
    return out


def _mean_val(runs: Sequence[RunResult]) -> float:
    if not runs or any(r.diverged or not math.isfinite(r.final_val) for r in runs):
        return math.nan
    return statistics.fmean(r.final_val for r in runs)


# -- command line ------------------------------------------------------------------------
def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seeds", type=int, default=None, help="number of seeds (default 3)")
    p.add_argument("--tasks", nargs="+", choices=TASK_NAMES, default=None)
    p.add_argument("--arms", nargs="+", choices=ARM_NAMES, default=None,
                   help="arms to run (cosine is always included: it is the denominator)")
    p.add_argument("--steps", type=int, default=None, help="steps per run, every task")


def _run(args: argparse.Namespace, progress: Progress) -> dict[str, Any]:
    cfg = QualityConfig.quick() if args.quick else QualityConfig()
    if args.seeds is not None:
        cfg.seeds = tuple(range(args.seeds))
    if args.tasks:
        cfg.tasks = tuple(args.tasks)
    if args.arms:
        cfg.arms = tuple(a for a in ARM_NAMES if a in args.arms or a == "cosine")
    if args.steps is not None:
        cfg.steps = {t: args.steps for t in cfg.tasks}
    cfg.policy = args.policy
    return run_quality(cfg, progress)


def _render(result: dict[str, Any], out: Path) -> str:
    from .report import plot_regret, quality_tables

    png = plot_regret(result, out / "quality.png")
    return quality_tables(result) + f"\nPlot: {png}\n"


SUITE = Suite("quality", "final validation loss over a grid of starting LRs, per arm",
              _add_arguments, _run, _render)
