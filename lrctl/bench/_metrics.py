"""The quality benchmark's metrics, from a table of runs; pure arithmetic, no torch.

Per task and arm, over the grid of starting LRs:

* **regret** r at a starting LR: the seed-mean final validation loss divided by
  the best seed-mean of the ``cosine`` arm over the whole grid ("grid-tuned
  cosine"). A cell with a diverged seed has r = ∞.
* **robust width**: the number of starting LRs with r ≤ 1.05.
* **median r**: the median of r over the grid.
* **harm**: the number of starting LRs where the arm's median (over seeds) final
  validation loss is more than 5 % worse than the ``fixed`` arm's median at the
  same starting LR; a diverged run counts as infinitely bad. The ``fixed`` arm's
  harm is 0 by definition; without a ``fixed`` arm, harm is not defined (None).
* **NaN runs**: diverged runs.
* **false back-offs**: the ``backoff``, ``rollback`` and ``stop`` decisions of a
  policy arm on these clean runs (no fault is injected), per 10 000 steps; a stop
  that early stopping or a finished WSD cooldown asked for is planned, not false.
* **early stops** (policy arms): the runs early stopping stopped, the fraction of
  all steps they saved, and the **steps saved at equal final validation loss**:
  those saved by stops whose validation loss at the stop is within 5 % of the one
  the same run reaches when trained on to the end (``full_val``); the stops that
  cost more are counted as ``worse``.

Across the tasks of a split: the median robust width, the median of the median
r, the total harm, the number of tasks with harm 0, the largest harm on one
task, the NaN runs and the false back-offs per 10 000 steps.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .runner import RunResult

__all__ = ["BAD_ACTIONS", "HARM_R", "PLANNED_STOPS", "ROBUST_R", "aggregate", "early_stops",
           "summarize_quality"]

ROBUST_R = 1.05
HARM_R = 1.05
#: Decisions that count as a back-off when nothing went wrong.
BAD_ACTIONS = ("backoff", "rollback", "stop")
#: Kinds whose ``stop`` is the plan, not a back-off: early stopping, a WSD cooldown's end.
PLANNED_STOPS = frozenset({"earlystop", "wsd"})
EQUAL_VAL_R = 1.05  # an early stop within 5 % of the full run's validation loss


def _is_policy(arm: str) -> bool:
    return arm == "lrctl" or arm.startswith("policy:")


def _val(run: RunResult) -> float:
    """A run's final validation loss; a diverged run is infinitely bad."""
    return math.inf if run.diverged or not math.isfinite(run.final_val) else run.final_val


def _mean_val(runs: Sequence[RunResult]) -> float:
    if not runs or any(r.diverged or not math.isfinite(r.final_val) for r in runs):
        return math.nan
    return statistics.fmean(r.final_val for r in runs)


def _median_val(runs: Sequence[RunResult]) -> float:
    return statistics.median(_val(r) for r in runs) if runs else math.nan


def false_backoffs(runs: Iterable[RunResult]) -> dict[str, Any]:
    """Back-off, rollback and stop decisions per 10 000 steps of ``runs``."""
    count = steps = 0
    for run in runs:
        steps += run.steps_done or run.steps
        count += sum(d["action"] in BAD_ACTIONS and d.get("kind") not in PLANNED_STOPS
                     for d in run.decisions)
    return {"count": count, "steps": steps,
            "per_10k": count * 10_000 / steps if steps else math.nan}


def early_stops(runs: Iterable[RunResult]) -> dict[str, Any]:
    """Early stops among ``runs``: how many, the steps they saved (all, and at equal final
    validation loss), the stops that cost more, and the median val ratio stop / full."""
    steps = saved = saved_equal = stopped = worse = 0
    ratios: list[float] = []
    for run in runs:
        steps += run.steps
        if run.early_stop_step is None:
            continue
        stopped += 1
        gain = run.steps - (run.early_stop_step + 1)
        ratio = run.final_val / run.full_val if run.full_val > 0 else math.nan
        ratios.append(ratio)
        saved += gain
        if ratio <= EQUAL_VAL_R:  # NaN (a diverged stop) is not equal
            saved_equal += gain
        else:
            worse += 1
    return {"stopped": stopped, "steps": steps, "saved": saved, "saved_equal": saved_equal,
            "worse": worse,
            "median_val_ratio": _median_finite(ratios)}


def _median_finite(values: list[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return statistics.median(finite) if finite else math.nan


def _sum_early_stops(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    keys = ("stopped", "steps", "saved", "saved_equal", "worse")
    return {k: sum(r[k] for r in rows) for k in keys}


def summarize_quality(runs: Sequence[RunResult], arms: Sequence[str],
                      lrs: Sequence[float]) -> dict[str, Any]:
    """Per task (in order of first appearance): the cosine denominator, and per arm the
    regret per LR, robust width, median r, harm, NaN runs and false back-offs."""
    out: dict[str, Any] = {}
    for task in dict.fromkeys(r.task for r in runs):
        mine = [r for r in runs if r.task == task]
        cells = {(arm, lr): [r for r in mine if r.arm == arm and r.lr == lr]
                 for arm in arms for lr in lrs}
        means = {key: _mean_val(cell) for key, cell in cells.items()}
        medians = {key: _median_val(cell) for key, cell in cells.items()}
        finite = [v for (arm, _), v in means.items() if arm == "cosine" and math.isfinite(v)]
        best = min(finite) if finite else math.nan
        best_lr = next((lr for lr in lrs if means.get(("cosine", lr)) == best), None)
        per_arm: dict[str, Any] = {}
        for arm in arms:
            regrets = [means[(arm, lr)] / best
                       if math.isfinite(means[(arm, lr)]) and math.isfinite(best) else math.inf
                       for lr in lrs]
            harm_lrs: list[float] | None = None
            if "fixed" in arms:
                harm_lrs = [] if arm == "fixed" else [
                    lr for lr in lrs if _worse(medians[(arm, lr)], medians[("fixed", lr)])]
            arm_runs = [r for r in mine if r.arm == arm]
            per_arm[arm] = {
                "regret": regrets,
                "mean_val": [means[(arm, lr)] for lr in lrs],
                "median_val": [medians[(arm, lr)] for lr in lrs],
                "robust_width": sum(r <= ROBUST_R for r in regrets),
                "median_r": statistics.median(regrets),
                "harm": None if harm_lrs is None else len(harm_lrs),
                "harm_lrs": harm_lrs,
                "nan_runs": sum(r.diverged for r in arm_runs),
                "runs": len(arm_runs),
                "false_backoffs": false_backoffs(arm_runs) if _is_policy(arm) else None,
                "early_stops": early_stops(arm_runs) if _is_policy(arm) else None,
            }
        out[task] = {"best_cosine_val": best, "best_cosine_lr": best_lr,
                     "best_at_edge": best_lr is not None and best_lr in (lrs[0], lrs[-1]),
                     "arms": per_arm}
    return out


def aggregate(summary: Mapping[str, Any], split_of: Mapping[str, str],
              arms: Sequence[str]) -> dict[str, Any]:
    """Per split (``heldout`` first, then ``tuning``, then any other) and arm, the
    aggregates over that split's tasks in ``summary``."""
    splits = sorted({split_of[t] for t in summary},
                    key=lambda s: (["heldout", "tuning"].index(s)
                                   if s in ("heldout", "tuning") else 2, s))
    out: dict[str, Any] = {}
    for split in splits:
        tasks = [t for t in summary if split_of[t] == split]
        per_arm: dict[str, Any] = {}
        for arm in arms:
            rows = [summary[t]["arms"][arm] for t in tasks if arm in summary[t]["arms"]]
            if not rows:
                continue
            harms = [r["harm"] for r in rows]
            fb = [r["false_backoffs"] for r in rows if r["false_backoffs"] is not None]
            fb_count, fb_steps = sum(f["count"] for f in fb), sum(f["steps"] for f in fb)
            es = [r["early_stops"] for r in rows if r.get("early_stops") is not None]
            per_arm[arm] = {
                "tasks": len(rows),
                "median_robust_width": statistics.median(r["robust_width"] for r in rows),
                "median_median_r": statistics.median(r["median_r"] for r in rows),
                "harm_total": None if None in harms else sum(harms),
                "tasks_harm_0": None if None in harms else sum(h == 0 for h in harms),
                "harm_max": None if None in harms else max(harms),
                "nan_runs": sum(r["nan_runs"] for r in rows),
                "runs": sum(r["runs"] for r in rows),
                "false_backoffs": None if not fb else {
                    "count": fb_count, "steps": fb_steps,
                    "per_10k": fb_count * 10_000 / fb_steps if fb_steps else math.nan},
                "early_stops": _sum_early_stops(es) if es else None,
            }
        out[split] = {"tasks": tasks, "arms": per_arm}
    return out


def _worse(val: float, fixed: float) -> bool:
    """More than ``HARM_R - 1`` (5 %) worse than ``fixed``, whatever the loss's sign (a
    Gaussian NLL ends below 0: ``val > 1.05 * fixed`` would flag a run 5 % better)."""
    return val - fixed > (HARM_R - 1.0) * abs(fixed)
