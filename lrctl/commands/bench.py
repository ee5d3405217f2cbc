"""``lrctl bench SUITE``: run a benchmark suite, print its tables, optionally save JSON.

Suites are modules listed in :data:`lrctl.bench.SUITE_MODULES`, each exposing a
``SUITE`` (name, options, run, render); adding a benchmark means adding a module
there, not editing this verb. Progress goes to stderr, one line per run; the
Markdown summary, headed by the date and the machine, goes to stdout.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
from pathlib import Path
from typing import Any

DEFAULT_OUT = Path("lrctl-bench")


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from ..bench import SUITE_MODULES

    p = sub.add_parser("bench", help="benchmarks: training quality, fault recovery, speed "
                       "(the hook, the controller, MLflow, reloads, CUDA)",
                       description="Run a benchmark suite in-process and print its tables.")
    suites = p.add_subparsers(dest="suite", metavar="SUITE")
    suites.required = True
    for name in SUITE_MODULES:
        suite = importlib.import_module(name).SUITE
        sp = suites.add_parser(suite.name, help=suite.help, description=suite.help)
        sp.add_argument("--quick", action="store_true",
                        help="a smoke-sized run (fewer rounds, LRs, seeds and steps)")
        sp.add_argument("--json", metavar="FILE", help="write the full result as JSON")
        sp.add_argument("--out", type=Path, default=DEFAULT_OUT,
                        help=f"folder for plots and the Markdown report (default {DEFAULT_OUT}/)")
        sp.add_argument("--policy", default=None,
                        help="policy file for the lrctl arm (default: the shipped default.yaml)")
        sp.add_argument("-q", "--quiet", action="store_true", help="no progress lines")
        suite.add_arguments(sp)
        sp.set_defaults(func=cmd_bench, bench_suite=suite)


def cmd_bench(args: argparse.Namespace) -> int:
    problem = _invalid_policy(args)
    if problem is not None:
        print(problem, file=sys.stderr)  # ``file:line: key: message``, as lrctl validate
        return 2

    import torch

    from ..bench.report import machine, machine_line, provenance, provenance_line

    torch.set_num_threads(1)  # comparable numbers on shared machines; runs are tiny
    suite = args.bench_suite
    began = time.perf_counter()

    def progress(line: str, done: int, total: int) -> None:
        if not args.quiet:
            print(f"[{done}/{total}] {line}", file=sys.stderr, flush=True)

    info = machine()
    # Taken before the run: the code that ran, not what changed while it ran.
    origin = provenance(getattr(args, "command_line", None))
    result: dict[str, Any] = suite.run(args, progress)
    result["suite"] = suite.name
    result["machine"] = info
    result["provenance"] = origin
    result["seconds"] = round(time.perf_counter() - began, 1)
    args.out.mkdir(parents=True, exist_ok=True)
    text = (f"### lrctl bench {suite.name}{' --quick' if args.quick else ''}\n\n"
            f"Measured {machine_line(info)}; {result['seconds']} s.\n"
            f"{provenance_line(origin)}\n\n"
            + suite.render(result, args.out))
    (args.out / f"{suite.name}.md").write_text(text)
    print(text)
    if args.json:
        Path(args.json).write_text(json.dumps(_json_safe(result), indent=1, allow_nan=False))
    return 0


def _invalid_policy(args: argparse.Namespace) -> ValueError | None:
    """The first of the policies named on the command line (``--policy``, and the quality
    suite's ``--policies``) that does not parse, or None. Checked once, before any run:
    otherwise each run that loads the policy fails alone, after the runs before it (in
    worker processes too)."""
    from ..config import parse_policy

    sources: list[str | Path] = [] if args.policy is None else [args.policy]
    # ``--policies`` are files (``policy:<stem>`` arms), as lrctl.bench.arms.policy_arms reads them.
    sources.extend(Path(f) for f in getattr(args, "policies", None) or ())
    for source in sources:
        try:
            parse_policy(source)
        except ValueError as exc:  # a ConfigError, which names the file (and line, key)
            return exc
    return None


def _json_safe(value: Any) -> Any:
    from ..policy._decision import json_safe

    return json_safe(value)
