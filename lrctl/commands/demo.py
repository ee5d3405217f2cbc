"""``lrctl demo``: the main job on embedded defaults."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("demo", help="train a small model twice: lrctl vs a fixed LR (~1 min)",
                       description="Start (or reuse) a controller, train a digits MLP at a "
                                   "too-high LR with lrctl's range-test policy (rangetest.yaml, "
                                   "opt-in: the default keeps the LR you gave) and with the LR "
                                   "fixed, then show the decisions, the comparison, the MLflow "
                                   "runs and a timeline picture. Needs no arguments.")
    p.add_argument("--steps", type=int, default=3000, help="steps per run (default %(default)s)")
    p.add_argument("--lr", type=float, default=0.5,
                   help="the (too high) starting LR (default %(default)s)")
    p.set_defaults(func=cmd_demo)


def cmd_demo(args: argparse.Namespace) -> int:
    if args.steps < 100:
        raise SystemExit("lrctl demo: --steps must be at least 100")
    if not args.lr > 0:
        raise SystemExit("lrctl demo: --lr must be > 0")
    from ..demo import run_demo

    return run_demo(steps=args.steps, lr=args.lr)
