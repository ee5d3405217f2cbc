"""Run many independent training runs, in this process or in a pool of worker processes.

A unit is one (task, arm, starting LR, seed) run. Workers are forked on Linux
(as torch's DataLoader workers are: instant, and the parent has run no torch
work yet) and spawned elsewhere. Each uses one torch thread and sends back the
run without its per-step curves (the quality benchmark needs only the final
loss and the decisions). Results come back in the order of the units, whatever
the order they finish in.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .runner import RunResult

__all__ = ["Unit", "default_jobs", "run_units"]


@dataclass(frozen=True)
class Unit:
    task: str
    arm: str
    lr: float
    seed: int
    steps: int
    policy: Any = None  # a policy file for policy arms (picklable: a str or a Path)


def default_jobs() -> int:
    """The CPUs this process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not on Linux
        return max(1, os.cpu_count() or 1)


def _init_worker() -> None:
    import warnings

    import torch

    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", category=UserWarning)


def run_unit(unit: Unit, keep_curves: bool = True) -> RunResult:
    from .runner import train
    from .tasks import TASKS

    result = train(TASKS[unit.task], unit.arm, unit.lr, unit.seed, steps=unit.steps,
                   policy=unit.policy)
    if not keep_curves:
        result.train_loss, result.lrs = [], []
    return result


def _run_in_worker(unit: Unit) -> RunResult:
    return run_unit(unit, keep_curves=False)


def run_units(units: Sequence[Unit], jobs: int = 1,
              done: Callable[[Unit, RunResult, int], None] | None = None,
              start_method: str | None = None) -> list[RunResult]:
    """Every unit's run, in the order of ``units``; ``done(unit, result, n_done)`` after each.

    ``start_method``: how workers start (default: ``fork`` on Linux, else ``spawn``, which
    costs a second or two per worker to import torch, and a resource-tracker process).
    """
    results: list[RunResult | None] = [None] * len(units)
    if jobs <= 1 or len(units) <= 1:
        for i, unit in enumerate(units):
            results[i] = run_unit(unit, keep_curves=False)
            if done is not None:
                done(unit, results[i], i + 1)  # type: ignore[arg-type]
        return results  # type: ignore[return-value]

    import multiprocessing
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    if start_method is None:
        start_method = "fork" if sys.platform.startswith("linux") else "spawn"
    ctx = multiprocessing.get_context(start_method)
    n_done = 0
    with ProcessPoolExecutor(max_workers=min(jobs, len(units)), mp_context=ctx,
                             initializer=_init_worker) as pool:
        pending = {pool.submit(_run_in_worker, unit): i for i, unit in enumerate(units)}
        try:
            while pending:
                finished, _ = wait(pending, return_when=FIRST_COMPLETED)
                for fut in finished:
                    i = pending.pop(fut)
                    results[i] = fut.result()
                    n_done += 1
                    if done is not None:
                        done(units[i], results[i], n_done)  # type: ignore[arg-type]
        except BaseException:  # Ctrl-C: drop the queue; the running units end with it
            pool.shutdown(wait=False, cancel_futures=True)
            raise
    return results  # type: ignore[return-value]

