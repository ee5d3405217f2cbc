"""Verbs that read a run's audit trail from the journal: ``decisions`` and ``report``.

They read the controller's state directory, not MLflow, so they work while
MLflow is down, before the backlog is replayed, and for runs that never had
MLflow at all.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..policy._base import float_from_json


class RunNotFound(LookupError):
    pass


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("decisions", help="a run's decisions, with their reasons, as a table",
                       description="Print every decision of a run from the controller's "
                                   "journal. RUN is a run key, a unique prefix of one, a run "
                                   "name or an MLflow run id.")
    p.add_argument("run", metavar="RUN")
    p.add_argument("--json", action="store_true",
                   help="one JSON record per line, as in the lrctl/decisions.jsonl artifact")
    _state_dir_option(p)
    p.set_defaults(func=cmd_decisions)

    p = sub.add_parser("report", help="draw a run's timeline picture (PNG)",
                       description="Draw loss, grad norm and the LR of each param group over "
                                   "steps, with the decisions marked and labelled.")
    p.add_argument("run", metavar="RUN")
    p.add_argument("-o", "--output", default="timeline.png", help="PNG file (default: %(default)s)")
    _state_dir_option(p)
    p.set_defaults(func=cmd_report)


def _state_dir_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--state-dir", default=None,
                   help="controller state directory (default: $LRCTL_STATE_DIR, else "
                        "$XDG_STATE_HOME/lrctl, else ~/.local/state/lrctl, and those of "
                        "controllers on other sockets inside it)")


def cmd_decisions(args: argparse.Namespace) -> int:
    from ..sinks.journal import JournalError, read_lines

    try:
        paths = find_run(args.run, args.state_dir)
    except RunNotFound as exc:
        print(f"lrctl decisions: {exc}", file=sys.stderr)
        return 2
    records: list[dict[str, Any]] = []
    damage = None
    try:
        for line in read_lines(paths.stream("decisions")):
            records.append(line.record)
    except JournalError as exc:  # what comes before the damage, and what it is
        damage = exc
    if args.json:
        for rec in records:
            print(json.dumps(rec, separators=(",", ":")))
    else:
        print(format_table(records))
    if damage is not None:
        print(f"lrctl decisions: the journal is damaged after decision {len(records)}: "
              f"{damage}", file=sys.stderr)
        return 1
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from ..sinks.journal import JournalError
    from ..timeline import render_run

    try:
        paths = find_run(args.run, args.state_dir)
    except RunNotFound as exc:
        print(f"lrctl report: {exc}", file=sys.stderr)
        return 2
    try:
        out = render_run(paths.root, args.output)
    except JournalError as exc:
        print(f"lrctl report: run {paths.run_key}'s journal is damaged: {exc}",
              file=sys.stderr)
        return 1
    except OSError as exc:  # a missing folder, a directory given as the file, no space
        print(f"lrctl report: cannot write {args.output or 'the picture'}: "
              f"{exc.strerror or exc}", file=sys.stderr)
        return 1
    print(f"{out}: timeline of run {paths.run_key}")
    return 0


def find_run(query: str, state_dir: str | None = None) -> Any:
    """The journal of the run a user means: key, unique key prefix, run name or MLflow id.
    Without ``state_dir``: in the state directory of the controller on the default socket
    (``$LRCTL_SOCKET``: one started with ``--state-dir`` keeps its runs there), the shared
    one and those of controllers on other sockets (``lrctl.paths.state_dirs``)."""
    from ..paths import state_dirs
    from ..sinks.journal import RunPaths, list_run_keys, read_json
    from ._client import live_state_dir

    live = None
    if state_dir:
        roots = [Path(state_dir)]
    else:
        roots = state_dirs()
        live = live_state_dir(None)
        if live and Path(live) not in roots:
            roots.insert(0, Path(live))
    every = [(root, key) for root in roots for key in list_run_keys(root)]
    matches = [(root, k) for root, k in every if k == query]
    # By name or prefix, a run discarded before its first step is none of them (it would
    # be the latest of its name after a Scheduler resume): by its key only.
    found = [(root, k) for root, k in every if _discarded(RunPaths.of(root, k)) is None]
    if not matches:  # a run name (a prefix of each of its runs' keys: NAME-xxxxxxxx)
        for root, k in found:
            paths = RunPaths.of(root, k)
            meta = read_json(paths.meta, {}) or {}
            cursor = read_json(paths.cursor, {}) or {}
            if query in (meta.get("run_name"), cursor.get("run_id"),
                         (meta.get("mlflow") or {}).get("run_id")):
                matches.append((root, k))
        if len(matches) > 1:
            # A run name that a script used again on each run: its latest run, said so.
            matches.sort(key=lambda rk: _created(RunPaths.of(*rk)))
            others = ", ".join(k for _, k in matches[-2::-1][:5])
            print(f"lrctl: {query!r} names {len(matches)} runs; the latest, "
                  f"{matches[-1][1]} (the others, newest first: {others}"
                  f"{', …' if len(matches) > 6 else ''}; give a run key for another)",
                  file=sys.stderr)
            matches = matches[-1:]
    if not matches:
        matches = [(root, k) for root, k in found if k.startswith(query)]
    where = str(roots[0]) if len(roots) == 1 else f"{roots[0]} (and {len(roots) - 1} more)"
    if len(matches) == 1:
        return RunPaths.of(*matches[0])
    if not matches:
        latest = sorted(found, key=lambda rk: _modified(RunPaths.of(*rk).meta))[-5:]
        known = ", ".join(k for _, k in latest) if latest else "none"
        # No run at all where it looked, and no controller answering: the runs may be in
        # a directory given to 'lrctl serve --state-dir', where nobody looks. Say so.
        hint = ("; a controller started with --state-dir D keeps its runs in D: pass "
                "--state-dir D" if state_dir is None and live is None and not found else "")
        raise RunNotFound(f"no run matches {query!r} in {where} (latest runs: {known})"
                          f"{hint}")
    if len({root for root, _ in matches}) == 1:
        raise RunNotFound(f"{query!r} is ambiguous in {matches[0][0]}: "
                          f"{', '.join(k for _, k in matches[:10])}")
    listed = ", ".join(f"{k} in {root}" for root, k in matches[:10])
    raise RunNotFound(f"{query!r} is ambiguous: {listed} (--state-dir picks one)")


def _created(paths: Any) -> float:
    """When a run was created (its meta says; rewritten on every resume, so not its
    file's time), else its meta file's time."""
    from ..sinks.journal import read_json

    created = (read_json(paths.meta, {}) or {}).get("created")
    return float(created) if isinstance(created, (int, float)) else _modified(paths.meta)


def _modified(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def format_table(records: Sequence[dict[str, Any]]) -> str:
    header = ("STEP", "TIME", "POLICY", "ACTION", "LR (group 0)", "REASON")
    rows = [header]
    for rec in records:
        wall = rec.get("wall_time")
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(wall))) if wall else "-"
        rows.append((str(rec.get("step", "")), when, str(rec.get("policy", "")),
                     str(rec.get("action", "")) + (" (shadow)" if rec.get("shadow") else ""),
                     _lr_change(rec), str(rec.get("reason", ""))))
    widths = [max(len(r[i]) for r in rows) for i in range(len(header) - 1)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r[:-1], widths, strict=True)) + "  " + r[-1]
             for r in rows]
    lines.append(f"{len(records)} decision{'s' if len(records) != 1 else ''}")
    return "\n".join(lines)


def _lr_change(rec: dict[str, Any]) -> str:
    old, new = rec.get("old_lrs") or [], rec.get("new_lrs") or []
    if not old or not new:
        return "-"
    more = f" (+{len(new) - 1} groups)" if len(new) > 1 else ""
    return f"{float_from_json(old[0]):.4g} -> {float_from_json(new[0]):.4g}{more}"


def _discarded(paths: Any) -> Any:
    """:func:`~lrctl.sinks.journal.discarded_end`, or None for a run whose journal is
    damaged (found by name still: ``decisions`` then shows what it can)."""
    from ..sinks.journal import JournalError, discarded_end

    try:
        return discarded_end(paths)
    except JournalError:
        return None
