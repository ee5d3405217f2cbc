"""Verbs that work on policy files alone: ``validate`` and ``replay``."""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from collections.abc import Iterator
from pathlib import Path

from .._defaults import DEFAULT_POLICY, RECORDED_CURVE

MAX_CURVE_ROWS = 10_000_000


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("validate", help="check policy files; exit non-zero on the first problem",
                       description="Check policy files. Prints FILE:LINE: KEY: MESSAGE for each "
                                   "invalid file and exits 1; exits 0 when all are valid.")
    p.add_argument("files", nargs="*", metavar="FILE")
    p.add_argument("--kinds", action="store_true", help="list the policy kinds and their knobs")
    p.add_argument("-q", "--quiet", action="store_true", help="print errors only")
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("replay", help="run a policy over a recorded loss curve, offline",
                       description="Feed a recorded run (CSV with step,loss[,grad_norm] and "
                                   "optional metric columns) through a policy in-process and "
                                   "print every decision with its reason.")
    p.add_argument("policy", nargs="?", default=str(DEFAULT_POLICY),
                   help="policy file, or the name of a shipped policy such as wsd or "
                        "earlystop (default: the shipped default.yaml)")
    p.add_argument("--curve", default=str(RECORDED_CURVE),
                   help="CSV file (default: a recorded AdamW run at a hot LR)")
    p.add_argument("--lr", type=float, action="append", dest="lrs", metavar="LR",
                   help="initial LR of a param group (repeat per group; default 0.02)")
    p.add_argument("--total-steps", type=_positive_int, default=None, metavar="N",
                   help="the run's length, as attach(total_steps=N) gives it (for anneal)")
    p.add_argument("--json", action="store_true", help="print decisions as JSON lines")
    p.set_defaults(func=cmd_replay)


def cmd_validate(args: argparse.Namespace) -> int:
    from ..config import ConfigError, describe_kinds, parse_policy

    if args.kinds:
        print(describe_kinds())
        if not args.files:
            return 0
    if not args.files:
        print("lrctl validate: give at least one FILE (or --kinds)", file=sys.stderr)
        return 2
    failed = 0
    for path in args.files:
        try:
            parsed = parse_policy(Path(path))
        except ConfigError as exc:
            print(exc, file=sys.stderr)
            failed += 1
            continue
        if not args.quiet:
            names = ", ".join(e.name for e in parsed.entries)
            n = len(parsed.entries)
            print(f"{path}: ok ({n} polic{'y' if n == 1 else 'ies'}: {names}; "
                  f"sha256 {parsed.sha256[:12]})")
    return 1 if failed else 0


def read_curve(path: str) -> Iterator[tuple[int, dict[str, float | None]]]:
    """Rows of a recorded curve, each with its line number in the file: ``step`` and
    ``loss`` required, other columns are metrics."""
    # utf-8-sig: a spreadsheet's "CSV UTF-8" starts with a byte-order mark
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        try:
            fields = reader.fieldnames
        except csv.Error as exc:
            raise ValueError(f"{path}:1: {exc}") from None
        if fields is None or not {"step", "loss"} <= set(fields):
            raise ValueError(f"{path}: expected a CSV header with at least step,loss")
        named = [name for name in fields if name]  # (a spreadsheet's trailing ",,")
        if len(set(named)) != len(named):
            twice = sorted({name for name in named if named.count(name) > 1})
            raise ValueError(f"{path}:1: column {', '.join(twice)} named more than once")
        for rows, row in enumerate(reader, start=1):
            n = reader.line_num  # (blank lines are skipped, so not rows + 1)
            if rows > MAX_CURVE_ROWS:
                raise ValueError(f"{path}: more than {MAX_CURVE_ROWS} rows")
            if None in row:  # (DictReader's key for the fields past the header's)
                raise ValueError(f"{path}:{n}: {len(fields) + len(row[None])} "
                                 f"fields, but the header has {len(fields)}")
            try:
                yield n, {k: (float(v) if v not in ("", None) else None)
                          for k, v in row.items()}
            except ValueError as exc:
                raise ValueError(f"{path}:{n}: {exc}") from None


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def cmd_replay(args: argparse.Namespace) -> int:
    from ..config import ConfigError, load_policy
    from ..policy import ObservationError

    lrs = args.lrs or [0.02]
    bad = [lr for lr in lrs if not (math.isfinite(lr) and lr >= 0)]
    if bad:  # (said by the engine as the policy file's "base_lrs" before)
        print(f"lrctl replay: --lr must be finite and >= 0, but got {bad[0]}", file=sys.stderr)
        return 2
    try:
        engine = load_policy(Path(args.policy), lrs, args.total_steps)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 1
    steps = 0
    lr_min = lr_max = engine.applied_lrs[0]
    try:
        for line, row in read_curve(args.curve):
            step = row.pop("step")
            if step is None or not float(step).is_integer():
                raise ValueError(f"{args.curve}:{line}: bad step {step!r}")
            metrics = {k: v for k, v in row.items() if k not in ("loss", "grad_norm")
                       and v is not None}
            try:
                applied = engine.update(int(step), row.get("loss"), row.get("grad_norm"),
                                        metrics)
            except (ValueError, ObservationError) as exc:  # the row's: say where it is
                raise ValueError(f"{args.curve}:{line}: {exc}") from None
            lr_min, lr_max = min(lr_min, applied[0]), max(lr_max, applied[0])
            steps += 1
            for d in engine.last_decisions:
                if args.json:
                    print(json.dumps(d.to_dict(), allow_nan=False))
                else:
                    print(f"step {d.step:>7}  {d.policy:<12} {d.action:<12} "
                          f"{_fmt(d.old_lrs[0])} → {_fmt(d.new_lrs[0])}  {d.reason}")
    except BrokenPipeError:
        raise  # `lrctl replay | head`: the reader left (see cli.main)
    except (OSError, ValueError, ObservationError, csv.Error) as exc:
        if isinstance(exc, OSError) and exc.strerror:  # not "[Errno 2] ...: 'PATH'"
            said = f"cannot read {exc.filename or args.curve}: {exc.strerror}"
        elif isinstance(exc, UnicodeDecodeError):
            said = f"{args.curve}: not UTF-8 text ({exc.reason})"
        elif isinstance(exc, csv.Error):
            said = f"{args.curve}: {exc}"
        else:
            said = str(exc)
        print(f"lrctl replay: {said}", file=sys.stderr)
        return 1
    if not args.json:
        print(f"\n{steps} steps replayed from {args.curve} through {args.policy}: "
              f"{engine.decision_count} decisions; LR (group 0) ranged "
              f"{_fmt(lr_min)}–{_fmt(lr_max)}, final {_fmt(engine.applied_lrs[0])}"
              + ("; the policy asked the run to stop" if engine.should_stop else ""))
    return 0


def _fmt(x: float) -> str:
    return f"{x:.4g}" if math.isfinite(x) else str(x)
