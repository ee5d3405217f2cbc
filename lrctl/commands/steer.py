"""Verbs that steer a live run: set-lr, pause, resume, reload (each recorded as a
decision)."""

from __future__ import annotations

import argparse
import math
import re
import sys
from typing import Any

from ._client import SOCKET_HELP, ask

_SIGNED_NUMBER = re.compile(
    r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$|^-(inf|infinity|nan)$", re.IGNORECASE)


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("set-lr", help="override a run's LR (recorded as a decision)",
                       description="Set the LR of a run's first param group (the others keep "
                                   "their ratio to it) for --steps steps, then hand back to the "
                                   "policies. Without --steps it holds until --clear.")
    # A negative LR is refused with its reason, not taken for an unknown option: argparse
    # knows "-0.1" for a number but not "-1e-3" or "-inf".
    p._negative_number_matcher = _SIGNED_NUMBER
    p.add_argument("run", help="run key, run name or a unique key prefix")
    p.add_argument("lr", nargs="?", type=float, help="the LR")
    p.add_argument("--steps", type=int, help="hold for N steps, then release")
    p.add_argument("--clear", action="store_true", help="release a manual override now")
    p.add_argument("--force", action="store_true",
                   help="take an LR more than 100x both the run's initial LR and its LR now "
                        "(refused without it: a typo's exponent)")
    p.add_argument("--socket", help=SOCKET_HELP)
    p.set_defaults(func=cmd_set_lr)

    for verb, what in (("pause", "shadow mode: policies observe and record but do not act"),
                       ("resume", "leave shadow mode: policies act again")):
        p = sub.add_parser(verb, help=what)
        p.add_argument("run", help="run key, run name or a unique key prefix")
        p.add_argument("--socket", help=SOCKET_HELP)
        p.set_defaults(func=cmd_mode, verb=verb)

    p = sub.add_parser("reload", help="reload a run's policy file now (or every watched run's)",
                       description="Read the policy file of RUN (or of every watched run) now "
                                   "and apply it as a live edit, even if it did not change. "
                                   "An invalid file is reported and the old policy keeps "
                                   "running.")
    p.add_argument("run", nargs="?", help="run key, run name or a unique key prefix")
    p.add_argument("--socket", help=SOCKET_HELP)
    p.set_defaults(func=cmd_reload)


def cmd_set_lr(args: argparse.Namespace) -> int:
    if args.clear and (args.lr is not None or args.steps is not None or args.force):
        print("lrctl set-lr: give an LR (and --steps, --force), or --clear, not both",
              file=sys.stderr)
        return 2
    if args.clear:
        msg: dict[str, Any] = {"t": "clear_lr", "run": args.run}
    elif args.lr is None:
        print("lrctl set-lr: give an LR, or --clear", file=sys.stderr)
        return 2
    else:
        if not math.isfinite(args.lr) or args.lr < 0:
            print(f"lrctl set-lr: LR must be finite and >= 0, but got {args.lr}", file=sys.stderr)
            return 2
        if args.steps is not None and args.steps < 1:
            print(f"lrctl set-lr: --steps must be >= 1, but got {args.steps}", file=sys.stderr)
            return 2
        msg = {"t": "set_lr", "run": args.run, "lr": args.lr, "steps": args.steps}
        if args.force:
            msg["force"] = True
    reply = ask(args, msg)
    if isinstance(reply, int):
        return reply
    print(f"{reply['run']}: {reply['message']}")
    return 0


def cmd_reload(args: argparse.Namespace) -> int:
    msg: dict[str, Any] = {"t": "reload"}
    if args.run:
        msg["run"] = args.run
    reply = ask(args, msg)
    if isinstance(reply, int):
        return reply
    if reply["run"] == "*":  # every watched run: a line each
        print(reply["message"])
    else:
        print(f"{reply['run']}: {reply['message']}")
    failed = any(d.get("action") == "reload_failed" for d in reply.get("decisions", []))
    return 1 if failed or reply.get("missing") else 0


def cmd_mode(args: argparse.Namespace) -> int:
    reply = ask(args, {"t": args.verb, "run": args.run})
    if isinstance(reply, int):
        return reply
    print(f"{reply['run']}: {reply['message']}")
    return 0
