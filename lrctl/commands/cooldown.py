"""``lrctl decay RUN``: start (or cancel) the cooldown of a live run's WSD policy now."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from ._client import SOCKET_HELP, ask

SHAPES = ("linear", "cosine", "1-sqrt")


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "decay", help="start a run's cooldown now (kind: wsd), or --cancel it",
        description="Start the cooldown of RUN's WSD policy after its last observed step: "
                    "the LR falls to the policy's min_lr_ratio over the next --steps steps "
                    "(default: the policy's own length, decay_steps or decay_fraction x the "
                    "run's length). A cooldown under way restarts from "
                    "its current level. --cancel, before it ends, returns to the stable LR. "
                    "Recorded as a decision and kept in the run's checkpoint.")
    p.add_argument("run", help="run key, run name or a unique key prefix")
    p.add_argument("--steps", type=int, help="length of the cooldown in steps")
    p.add_argument("--shape", choices=SHAPES, help="shape of the cooldown (default: the "
                                                   "policy's decay_shape)")
    p.add_argument("--cancel", action="store_true",
                   help="cancel the cooldown under way: back to the stable LR")
    p.add_argument("--socket", help=SOCKET_HELP)
    p.set_defaults(func=cmd_decay)


def cmd_decay(args: argparse.Namespace) -> int:
    if args.cancel and (args.steps is not None or args.shape is not None):
        print("lrctl decay: --cancel takes no --steps or --shape", file=sys.stderr)
        return 2
    if args.steps is not None and args.steps < 1:
        print(f"lrctl decay: --steps must be >= 1, but got {args.steps}", file=sys.stderr)
        return 2
    msg: dict[str, Any] = {"t": "decay", "run": args.run}
    if args.cancel:
        msg["cancel"] = True
    else:
        msg.update({"steps": args.steps, "shape": args.shape})
    reply = ask(args, msg)
    if isinstance(reply, int):
        return reply
    print(f"{reply['run']}: {reply['message']}")
    return 0
