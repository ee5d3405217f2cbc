"""``lrctl prune``: remove the journals of runs that ended long ago and are all in MLflow.

Which runs may go is :mod:`lrctl.daemon.retention`'s rule. Here: looking (read only),
then having them moved aside by whoever owns the state directory — the controller
serving from it, asked over its socket, or, when none does, this process under the
directory's gate, which a controller's start waits for — then deleting what was moved
(a controller never waits on that) and saying what went.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from ._client import SOCKET_HELP, state_roots, unserved_socket_note

if TYPE_CHECKING:
    from ..daemon.retention import Kept, Prunable

DEFAULT_DAYS = 30.0
GATE_WAIT_S = 60.0  # another 'lrctl prune' moving journals in the same directory


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "prune", help="remove the journals of runs that ended long ago, all in MLflow",
        description="Remove the journal directories (state dir runs/<key>/) of runs that "
                    "ended, are all in MLflow (or had no MLflow), cannot be resumed (no "
                    "checkpoint) and were last written over DAYS ago. Open, resumable, "
                    "damaged runs, and those MLflow does not have all of, are kept. A "
                    "running controller does the moving itself; none needs to be stopped.")
    p.add_argument("--older-than", type=days, default=DEFAULT_DAYS, metavar="DAYS",
                   help=f"last written over DAYS ago (default {DEFAULT_DAYS:g}; 0: any age)")
    p.add_argument("--dry-run", action="store_true",
                   help="say what would be removed, and remove nothing")
    p.add_argument("--state-dir", default=None,
                   help="the state directory to prune (default: with --socket that "
                        "controller's, else every controller's, as for 'lrctl runs --all')")
    p.add_argument("--socket", help=SOCKET_HELP)
    p.set_defaults(func=cmd_prune)


def days(text: str) -> float:
    """A number of days >= 0, for argparse."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of days, but got {text!r}") \
            from None
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"expected a number of days, finite and >= 0, but "
                                         f"got {text!r}")
    return value


class _Failed(Exception):
    """This state directory cannot be pruned (further) now: why."""


@dataclass
class _Tally:
    runs: int = 0
    size: int = 0
    kept: Counter[str] = field(default_factory=Counter)
    failed: bool = False


def cmd_prune(args: argparse.Namespace) -> int:
    if args.state_dir and not os.path.isdir(args.state_dir):
        print(f"lrctl prune: --state-dir {args.state_dir}: no such directory", file=sys.stderr)
        return 2
    roots, reported = state_roots(args.socket, args.state_dir)
    tally = _Tally()
    for root in roots:
        # The socket of the controller serving this directory, if the one asked for is it.
        socket = args.socket if reported is not None and str(root) == reported else None
        where = f" in {root}" if len(roots) > 1 else ""
        try:
            _prune(root, args, socket, tally, where)
        except _Failed as exc:
            print(f"lrctl prune: {root}: {exc}", file=sys.stderr)
            tally.failed = True
    from ..daemon.retention import RECENT, WHY_KEPT

    why = {**WHY_KEPT, RECENT: f"written to in the last {args.older_than:g} day(s)"}
    kept = ", ".join(f"{n} {why.get(r, r)}" for r, n in sorted(tally.kept.items()))
    exact = f" ({tally.size} bytes)" if tally.size >= 1024 else ""
    print(f"{'would remove' if args.dry_run else 'removed'} {tally.runs} run(s), "
          f"{_size(tally.size)}{exact}" + (f"; kept {sum(tally.kept.values())}: {kept}"
                                          if kept else ""))
    note = unserved_socket_note(args.socket, args.state_dir, reported)
    if note is not None and not tally.runs and not tally.kept:
        print(f"no runs in {roots[0]}\n{note}")
    return 1 if tally.failed else 0


def _prune(root: Path, args: argparse.Namespace, socket: str | None, tally: _Tally,
           where: str) -> None:
    from ..daemon import retention as r

    try:
        runs_fd = r.open_runs(root)
    except FileNotFoundError:
        return  # no run was ever journaled there
    except OSError as exc:  # a symlink, say: never followed
        raise _Failed(f"{root / 'runs'}: {exc.strerror or exc}; nothing removed") from None
    try:
        older_s = args.older_than * 86400.0
        cutoff = time.time() - older_s
        leftovers = r.moved_dirs(runs_fd)
        found = {key: r.examine(root, key, cutoff) for key in r.run_dirs(runs_fd)}
        prunable = [f for f in found.values() if isinstance(f, r.Prunable)]
        _kept(tally, {k: f for k, f in found.items() if isinstance(f, r.Kept)})
        interrupted = "left by an interrupted prune"
        if args.dry_run:
            for name in leftovers:
                _said(tally, r.tree_size(runs_fd, name), "would finish removing",
                      name[len(r.MOVED):], interrupted, where)
            for p in prunable:
                _said(tally, r.tree_size(runs_fd, p.run), "would remove", p.run,
                      f"ended {_when(p.ended_at)}", where)
            return
        moved, failure = _move(root, [p.run for p in prunable], older_s, socket, tally)
        if moved or leftovers:
            os.fsync(runs_fd)  # the renames first: a crash now leaves whole runs, or hidden
        for key, what in [*((n[len(r.MOVED):], interrupted) for n in leftovers),
                          *((p.run, f"ended {_when(p.ended_at)}") for p in moved)]:
            try:
                size = r.remove_moved(runs_fd, r.MOVED + key)
            except OSError as exc:
                print(f"lrctl prune: cannot remove {root / 'runs' / (r.MOVED + key)}: {exc} "
                      "(the next prune finishes it)", file=sys.stderr)
                tally.failed = True
                continue
            _said(tally, size, "removed", key, what, where)
        if failure is not None:
            raise failure
    finally:
        os.close(runs_fd)


def _move(root: Path, keys: list[str], older_s: float, socket: str | None,
          tally: _Tally) -> tuple[list[Prunable], _Failed | None]:
    """Have ``keys``' journals moved aside, a request's worth at a time: by the controller
    serving ``root``, else here under its gate. What was moved, and why it stopped early
    (if it did: what was moved till then is still deleted)."""
    from ..daemon import retention as r

    moved: list[Prunable] = []
    for i in range(0, len(keys), r.MAX_RUNS_PER_REQUEST):
        batch = keys[i:i + r.MAX_RUNS_PER_REQUEST]
        got = None
        with r.gate(root, GATE_WAIT_S, lambda: print(
                f"lrctl prune: waiting for another 'lrctl prune' in {root}", file=sys.stderr,
                flush=True)) as why:
            if why is not None:
                return moved, _Failed(f"{why}; nothing more removed")
            if not r.controller_holds(root):  # (none can start while the gate is held)
                got = r.move_runs(root, batch, time.time() - older_s)
        if got is None:
            try:
                got = _ask(root, batch, older_s, socket)
            except _Failed as exc:
                return moved, exc
        moved += got[0]
        _kept(tally, got[1])
    return moved, None


def _ask(root: Path, batch: list[str], older_s: float,
         socket: str | None) -> tuple[list[Prunable], dict[str, Kept]]:
    """The controller serving ``root`` moves ``batch`` aside (see operator._prune)."""
    from .. import paths
    from ..daemon.retention import Kept, Prunable
    from ..wire.operator import ControllerError, request

    address = socket or paths.state_dir_socket(root)
    if address is None:
        raise _Failed("a controller serves from it, but its lock file names no socket; "
                      "nothing more removed (stop it, or prune with --socket)")
    try:
        reply = request({"t": "prune", "state_dir": os.path.realpath(root), "runs": batch,
                         "older_than_s": older_s}, address, timeout=30.0)
    except ControllerError as exc:
        raise _Failed(f"the controller on {address} refused: {exc}") from None
    except (OSError, ValueError) as exc:
        raise _Failed(f"a controller serves from it but does not answer on {address} "
                      f"({exc}); nothing more removed") from None
    return ([Prunable(**m) for m in reply["moved"]],
            {k: Kept(**v) for k, v in reply["kept"].items()})


def _kept(tally: _Tally, kept: dict[str, Kept]) -> None:
    """Count the runs kept, by why; name on stderr those kept for what is wrong. One that
    could not be moved aside (it may go, but did not) makes the exit status 1."""
    from ..daemon.retention import DAMAGED, FAILED

    for key, why in kept.items():
        tally.kept[why.reason] += 1
        if why.reason in (DAMAGED, FAILED):
            print(f"lrctl prune: run {key}: {why.detail}; kept", file=sys.stderr)
        tally.failed = tally.failed or why.reason == FAILED


def _said(tally: _Tally, size: int, verb: str, key: str, what: str, where: str) -> None:
    tally.runs += 1
    tally.size += size
    print(f"{verb} {key} ({what}, {_size(size)}){where}")


def _when(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(t))


def _size(n: int) -> str:
    if n < 1024:
        return f"{n} bytes"
    value = n / 1024
    for unit in ("KiB", "MiB"):
        if value < 1024:
            return f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"
