"""``lrctl bench recovery``: inject a fault at T/2 and measure how the run recovers.

For each task, arm, fault and seed, a faulted run is compared with the clean
run of the same seed (same data order, same initialisation):

* ``finite``: every parameter is finite at the end;
* ``final_ratio``: final validation loss / the clean run's (target ≤ 1.10);
* ``recovery_steps``: steps after the fault until the median training loss of a
  10-step window is back within 10 % of the median of the 50 steps before the
  fault (target ≤ 50); a window with a non-finite loss never counts.

Clean runs also measure false alarms: divergence back-offs per 10 000 steps,
counted over the clean runs and the pre-fault halves of the faulted runs, both
in total and outside the range test's sweep (where a spike means the sweep has
found a too-high LR, which is its job).
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

from ._suite import LEGACY_TASKS, TASK_NAMES, Progress, Suite
from .faults import FAULTS, Fault

if TYPE_CHECKING:
    from .runner import RunResult

__all__ = ["SUITE", "RecoveryConfig", "recovery_steps", "run_recovery"]

FINAL_RATIO = 1.10
#: The rollback target: a faulted run ends within 5 % of its clean run's final loss.
CLOSE_RATIO = 1.05
RECOVERY_STEPS = 50
_PRE = 50
_WINDOW = 10


@dataclass
class RecoveryConfig:
    tasks: Sequence[str] = LEGACY_TASKS
    arms: Sequence[str] = ("lrctl", "lrctl+rollback", "fixed")
    faults: Sequence[str] = tuple(FAULTS)
    seeds: Sequence[int] = (0, 1, 2)
    lr: float = 1e-3
    steps: dict[str, int] = field(default_factory=dict)
    policy: Any = None

    @classmethod
    def quick(cls) -> RecoveryConfig:
        return cls(seeds=(0,), steps={t: 120 for t in LEGACY_TASKS})


def run_recovery(cfg: RecoveryConfig, progress: Progress | None = None) -> dict[str, Any]:
    """Clean and faulted runs of every (task, arm, seed); rows, summary and false alarms."""
    from .runner import train
    from .tasks import TASKS

    def report(run: RunResult, label: str, began: float) -> None:
        if progress is not None:
            progress(f"{run.task} {run.arm} {label} seed={run.seed}: val {run.final_val:.4f}"
                     f"{' DIVERGED' if run.diverged else ''} "
                     f"({time.perf_counter() - began:.1f} s)", done, total)

    rows: list[dict[str, Any]] = []
    clean_runs: list[RunResult] = []
    pre_fault_runs: list[tuple[RunResult, int]] = []
    total = len(cfg.tasks) * len(cfg.arms) * (len(cfg.faults) + 1) * len(cfg.seeds)
    done = 0
    for task_name in cfg.tasks:
        task = TASKS[task_name]
        steps = cfg.steps.get(task_name, task.steps)
        at = steps // 2
        for arm in cfg.arms:
            for seed in cfg.seeds:
                began = time.perf_counter()
                clean = train(task, arm, cfg.lr, seed, steps=steps, policy=cfg.policy)
                clean_runs.append(clean)
                done += 1
                report(clean, "clean", began)
                for kind in cfg.faults:
                    began = time.perf_counter()
                    run = train(task, arm, cfg.lr, seed, steps=steps, policy=cfg.policy,
                                fault=Fault(kind, at))
                    pre_fault_runs.append((run, at))
                    rows.append(_row(run, clean, kind, at))
                    done += 1
                    report(run, kind, began)
    return {
        "config": {"tasks": list(cfg.tasks), "arms": list(cfg.arms), "faults": list(cfg.faults),
                   "seeds": list(cfg.seeds), "lr": cfg.lr,
                   "steps": {t: cfg.steps.get(t, TASKS[t].steps) for t in cfg.tasks}},
        "runs": rows,
        "summary": _summarize(rows, cfg),
        "within_5pct": _within(rows, cfg),
        "false_backoffs": false_backoffs(clean_runs, pre_fault_runs),
    }


def recovery_steps(losses: Sequence[float], at: int) -> int | None:
    """Steps after ``at`` until a 10-step median is within 10 % of the pre-fault median."""
    before = [x for x in losses[max(0, at - _PRE):at] if math.isfinite(x)]
    if not before:
        return None
    target = (1.0 + (FINAL_RATIO - 1.0)) * statistics.median(before)
    for k in range(len(losses) - at - _WINDOW + 1):
        window = losses[at + k:at + k + _WINDOW]
        if all(math.isfinite(x) for x in window) and statistics.median(window) <= target:
            return k
    return None


def _row(run: RunResult, clean: RunResult, kind: str, at: int) -> dict[str, Any]:
    ratio = (run.final_val / clean.final_val
             if math.isfinite(run.final_val) and math.isfinite(clean.final_val) else math.inf)
    rec = recovery_steps(run.train_loss, at)
    finite = not run.diverged
    ok = finite and ratio <= FINAL_RATIO and rec is not None and rec <= RECOVERY_STEPS
    return {"task": run.task, "arm": run.arm, "fault": kind, "seed": run.seed,
            "finite": finite, "final_ratio": ratio, "recovery_steps": rec, "success": ok,
            "skipped": run.skipped, "stopped_at": run.stopped_at,
            "actions": run.summary()["actions"]}


def _summarize(rows: list[dict[str, Any]], cfg: RecoveryConfig) -> list[dict[str, Any]]:
    out = []
    for task in cfg.tasks:
        for arm in cfg.arms:
            for kind in cfg.faults:
                mine = [r for r in rows if (r["task"], r["arm"], r["fault"]) == (task, arm, kind)]
                if not mine:
                    continue
                recs = [r["recovery_steps"] for r in mine]
                out.append({
                    "task": task, "arm": arm, "fault": kind,
                    "finite": sum(r["finite"] for r in mine),
                    "success": sum(r["success"] for r in mine),
                    "seeds": len(mine),
                    "worst_final_ratio": max(r["final_ratio"] for r in mine),
                    "worst_recovery_steps": (None if any(x is None for x in recs)
                                             else max(recs)),
                })
    return out


def _within(rows: list[dict[str, Any]], cfg: RecoveryConfig) -> list[dict[str, Any]]:
    """Per arm and fault, over every task and seed: runs that end finite within
    :data:`CLOSE_RATIO` of their clean run's final validation loss."""
    out = []
    for arm in cfg.arms:
        for kind in cfg.faults:
            mine = [r for r in rows if (r["arm"], r["fault"]) == (arm, kind)]
            if mine:
                out.append({"arm": arm, "fault": kind, "runs": len(mine),
                            "within": sum(r["finite"] and r["final_ratio"] <= CLOSE_RATIO
                                          for r in mine)})
    return out


def false_backoffs(clean: Sequence[RunResult],
                   pre_fault: Sequence[tuple[RunResult, int]]) -> dict[str, Any]:
    """Divergence back-offs on unperturbed steps, per 10 000 steps."""
    steps = total = outside_sweep = 0
    spans = [(r, len(r.train_loss)) for r in clean] + [(r, at) for r, at in pre_fault]
    for run, end in spans:
        if run.arm != "lrctl":
            continue
        steps += end
        sweep_end = next((d["step"] for d in run.decisions
                          if d["action"] == "range_test_done"), -1)
        for d in run.decisions:
            if d["kind"] == "divergence" and d["action"] == "backoff" and d["step"] < end:
                total += 1
                outside_sweep += d["step"] > sweep_end
    per = 10_000 / steps if steps else math.nan
    return {"steps": steps, "backoffs": total, "backoffs_outside_sweep": outside_sweep,
            "per_10k": total * per, "per_10k_outside_sweep": outside_sweep * per}


# -- command line ------------------------------------------------------------------------
def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seeds", type=int, default=None, help="number of seeds (default 3)")
    p.add_argument("--tasks", nargs="+", choices=TASK_NAMES, default=None)
    p.add_argument("--faults", nargs="+", choices=tuple(FAULTS), default=None)
    p.add_argument("--lr", type=float, default=None, help="starting LR (default 1e-3)")
    p.add_argument("--steps", type=int, default=None, help="steps per run, every task")


def _run(args: argparse.Namespace, progress: Progress) -> dict[str, Any]:
    cfg = RecoveryConfig.quick() if args.quick else RecoveryConfig()
    if args.seeds is not None:
        cfg.seeds = tuple(range(args.seeds))
    if args.tasks:
        cfg.tasks = tuple(args.tasks)
    if args.faults:
        cfg.faults = tuple(args.faults)
    if args.lr is not None:
        cfg.lr = args.lr
    if args.steps is not None:
        cfg.steps = {t: args.steps for t in cfg.tasks}
    cfg.policy = args.policy
    return run_recovery(cfg, progress)


def _render(result: dict[str, Any], out: Path) -> str:
    from .report import recovery_tables

    return recovery_tables(result)


SUITE = Suite("recovery", "inject faults at T/2; check finiteness, final loss and recovery time",
              _add_arguments, _run, _render)
