"""``lrctl rollback RUN [--to STEP]``: have a live run restore one of its snapshots."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from ._client import SOCKET_HELP, ask


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "rollback", help="roll a run back to one of its snapshots (recorded as a decision)",
        description="RUN's hook restores the newest snapshot it holds at or before --to "
                    "(default: its newest) at its next step and skips that step's update; "
                    "the step counter moves on. Needs attach(..., snapshot_every=N). "
                    "Recorded as a decision of the policy 'operator', like set-lr.")
    p.add_argument("run", help="run key, run name or a unique key prefix")
    p.add_argument("--to", type=int, help="restore the newest snapshot at or before this step")
    p.add_argument("--socket", help=SOCKET_HELP)
    p.set_defaults(func=cmd_rollback)


def cmd_rollback(args: argparse.Namespace) -> int:
    if args.to is not None and args.to < 0:
        print(f"lrctl rollback: --to must be >= 0, but got {args.to}", file=sys.stderr)
        return 2
    msg: dict[str, Any] = {"t": "rollback", "run": args.run}
    if args.to is not None:
        msg["to"] = args.to
    reply = ask(args, msg)
    if isinstance(reply, int):
        return reply
    print(f"{reply['run']}: {reply['message']}")
    return 0
