"""``lrctl bench quality``: final validation loss over a grid of starting LRs.

Every (task, arm, starting LR, seed) is one short training run with the
optimizer the task declares. The tasks are split, in code, into a *tuning* half
(policy defaults may be tuned on them) and a *held-out* half (only reported);
the report gives each half its own tables, held-out first. The metrics (regret
against grid-tuned cosine, robust width, median regret, harm against the fixed
LR, NaN runs, false back-offs) are defined in :mod:`lrctl.bench._metrics`.

The arms are the reference methods (:data:`BASE_ARMS`) and one
``policy:<stem>`` arm per policy file (``--policies``; default: every file in
the checkout's ``policies/``, or the packaged ``default.yaml``). ``lrctl`` is the
older name of a single policy arm, driven by ``--policy`` (default: the packaged
``default.yaml``); it runs when named in ``--arms`` or when ``--policy`` is given.
"""

from __future__ import annotations

import argparse
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ._metrics import HARM_R, ROBUST_R, aggregate, summarize_quality
from ._suite import ARM_NAMES, BASE_ARMS, TASK_NAMES, Progress, Suite

if TYPE_CHECKING:
    from ._pool import Unit
    from .runner import RunResult

__all__ = ["GRID", "HARM_R", "ROBUST_R", "SUITE", "QualityConfig", "run_quality",
           "summarize_quality"]

#: Seven starting LRs over three decades, half a decade apart.
GRID = tuple(10.0 ** (-4 + k / 2) for k in range(7))
SPLIT_CHOICES = ("all", "heldout", "tuning")


@dataclass
class QualityConfig:
    tasks: Sequence[str] = TASK_NAMES
    #: Arms to run; ``None``: :data:`BASE_ARMS` plus one arm per file of ``policies``.
    arms: Sequence[str] | None = None
    lrs: Sequence[float] = GRID
    seeds: Sequence[int] = (0, 1, 2)
    steps: dict[str, int] = field(default_factory=dict)  # per task; default: the task's own
    policy: Any = None  # the lrctl arm's policy (default: the packaged default.yaml)
    policies: Sequence[str | Path] | None = None  # policy:<stem> arms (default: see above)
    jobs: int = 1  # worker processes; 1 runs everything in this process
    split: str = "all"  # recorded with the result: the split that ``tasks`` was drawn from

    @classmethod
    def quick(cls) -> QualityConfig:
        """A smoke-sized grid: every arm and task, three LRs, one seed, few steps."""
        return cls(lrs=(1e-4, 1e-2, 1e-1), seeds=(0,), steps={t: 40 for t in TASK_NAMES})

    def policy_files(self) -> dict[str, Path]:
        """``policy:<stem>`` arm → file, for the configured policy files."""
        from .arms import policy_arms

        return policy_arms(self.policies)

    def arm_names(self) -> tuple[str, ...]:
        if self.arms is None:
            return (*BASE_ARMS, *self.policy_files())
        return tuple(self.arms)


def _units(cfg: QualityConfig, arms: Sequence[str], files: dict[str, Path]) -> list[Unit]:
    from ._pool import Unit
    from .tasks import TASKS

    units: list[Unit] = []
    for task in cfg.tasks:
        steps = cfg.steps.get(task, TASKS[task].steps)
        for arm in arms:
            policy = cfg.policy if arm == "lrctl" else files.get(arm)
            if isinstance(policy, Path):  # absolute: a worker may resolve it elsewhere
                policy = str(policy.resolve())
            units.extend(Unit(task, arm, lr, seed, steps, policy)
                         for lr in cfg.lrs for seed in cfg.seeds)
    return units


def resolve_arms(cfg: QualityConfig) -> tuple[tuple[str, ...], dict[str, Path]]:
    """The arms of ``cfg`` and the policy file of each ``policy:<stem>`` arm; ValueError
    for an unknown arm or a missing ``cosine``."""
    from ..config import parse_policy
    from .arms import POLICY_PREFIX

    arms = cfg.arm_names()
    if "cosine" not in arms:
        raise ValueError("the cosine arm is required: it is the regret denominator")
    files = cfg.policy_files() if any(a.startswith(POLICY_PREFIX) for a in arms) else {}
    known_policies = list(files)
    files = {arm: path for arm, path in files.items() if arm in arms}
    for path in files.values():
        try:
            parse_policy(path)
        except (OSError, ValueError) as e:  # ConfigError is a ValueError
            raise ValueError(f"policy file {path}: {e}") from None
    unknown = [a for a in arms if a not in ARM_NAMES and a not in files]
    if unknown:
        known = [*ARM_NAMES, *(known_policies or [f"{POLICY_PREFIX}<stem>"])]
        raise ValueError(f"unknown arm(s) {', '.join(unknown)} (known: {', '.join(known)})")
    return arms, files


def run_quality(cfg: QualityConfig, progress: Progress | None = None) -> dict[str, Any]:
    """Train every (task, arm, LR, seed) of the grid; return runs, per-task summaries and
    the per-split aggregates."""
    from ._pool import run_units
    from .tasks import TASKS

    arms, files = resolve_arms(cfg)
    units = _units(cfg, arms, files)

    def done(unit: Unit, result: RunResult, n: int) -> None:
        if progress is not None:
            progress(f"{unit.task} {unit.arm} lr={unit.lr:.3g} seed={unit.seed}: val "
                     f"{result.final_val:.4f}{' DIVERGED' if result.diverged else ''} "
                     f"({result.seconds:.1f} s)", n, len(units))

    runs = run_units(units, cfg.jobs, done)
    summary = summarize_quality(runs, arms, cfg.lrs)
    for task, s in summary.items():
        s["split"] = TASKS[task].split
    used: dict[str, Path | None] = dict(files)
    if "lrctl" in arms:
        from .arms import DEFAULT_POLICY

        used["lrctl"] = DEFAULT_POLICY if cfg.policy is None else _as_file(cfg.policy)
    return {
        "config": {"tasks": list(cfg.tasks), "arms": list(arms), "lrs": list(cfg.lrs),
                   "seeds": list(cfg.seeds), "split": cfg.split, "jobs": cfg.jobs,
                   "steps": {t: cfg.steps.get(t, TASKS[t].steps) for t in cfg.tasks},
                   "policy_files": {arm: _file_info(path) for arm, path in used.items()
                                    if path is not None},
                   "task_info": {t: _task_info(TASKS[t]) for t in cfg.tasks}},
        "runs": [r.summary() for r in runs],
        "summary": summary,
        "splits": aggregate(summary, {t: TASKS[t].split for t in summary}, arms),
    }


def _as_file(policy: Any) -> Path | None:
    """``policy`` as a file path, or None when it is YAML text or a dict."""
    try:
        return Path(policy) if Path(policy).is_file() else None
    except (TypeError, OSError, ValueError):
        return None


def _file_info(path: Path) -> dict[str, str]:
    """A policy file as the report shows it: its path (relative to the checkout when it is
    inside) and the sha256 of its content."""
    root = Path(__file__).resolve().parent.parent.parent
    try:
        shown = str(path.resolve().relative_to(root))
    except ValueError:
        shown = str(path)
    return {"path": shown, "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}


def _task_info(task: Any) -> dict[str, Any]:
    return {"split": task.split, "kind": task.kind, "optimizer": task.optimizer,
            "batch_size": task.batch_size, "description": task.description}


# -- command line ------------------------------------------------------------------------
def _add_arguments(p: argparse.ArgumentParser) -> None:
    from ._pool import default_jobs

    p.add_argument("--seeds", type=int, default=None, help="number of seeds (default 3)")
    p.add_argument("--split", choices=SPLIT_CHOICES, default="all",
                   help="the tasks to run: the held-out half, the tuning half, or all (default)")
    p.add_argument("--tasks", nargs="+", choices=TASK_NAMES, default=None, metavar="TASK",
                   help=f"run just these tasks (within --split): {', '.join(TASK_NAMES)}")
    p.add_argument("--arms", nargs="+", default=None, metavar="ARM",
                   help=f"arms to run: {', '.join(ARM_NAMES)} or policy:<stem> (default: "
                        f"{', '.join(BASE_ARMS)} and every policy:<stem> of --policies; "
                        "cosine and fixed always run: they are the references)")
    p.add_argument("--policies", nargs="+", default=None, metavar="FILE",
                   help="policy files, one policy:<stem> arm each (default: every *.yaml in "
                        "the checkout's policies/, else the packaged default.yaml)")
    p.add_argument("--steps", type=int, default=None, help="steps per run, every task")
    p.add_argument("--jobs", type=int, default=default_jobs(),
                   help="worker processes, one torch thread each (default: the CPUs this "
                        "process may use)")


def _config(args: argparse.Namespace) -> QualityConfig:
    from .tasks import tasks_in_split

    cfg = QualityConfig.quick() if args.quick else QualityConfig()
    split = getattr(args, "split", "all") or "all"
    in_split = tasks_in_split(split)
    cfg.split = split
    cfg.tasks = tuple(t for t in (args.tasks or in_split) if t in in_split)
    if not cfg.tasks:
        raise SystemExit(f"lrctl bench quality: no task of {args.tasks} is in split {split!r}")
    if args.seeds is not None:
        cfg.seeds = tuple(range(args.seeds))
    if args.policies:
        cfg.policies = tuple(args.policies)
    cfg.policy = args.policy
    if args.arms:
        cfg.arms = tuple(dict.fromkeys(["fixed", "cosine", *args.arms]))
    elif args.policy is not None:
        cfg.arms = (*cfg.arm_names(), "lrctl")
    if args.steps is not None:
        cfg.steps = {t: args.steps for t in cfg.tasks}
    cfg.jobs = max(1, args.jobs if getattr(args, "jobs", None) is not None else 1)
    return cfg


def _run(args: argparse.Namespace, progress: Progress) -> dict[str, Any]:
    cfg = _config(args)
    try:
        resolve_arms(cfg)
    except ValueError as e:
        raise SystemExit(f"lrctl bench quality: {e}") from None
    return run_quality(cfg, progress)


def _render(result: dict[str, Any], out: Path) -> str:
    from .report import plot_regret, quality_tables

    png = plot_regret(result, out / "quality.png")
    return quality_tables(result) + f"\nPlot: {png}\n"


SUITE = Suite("quality", "final validation loss over a grid of starting LRs, per arm; "
              "tuning and held-out tasks reported apart", _add_arguments, _run, _render)
