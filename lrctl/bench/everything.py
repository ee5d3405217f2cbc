"""``lrctl bench all``: every other suite in turn, one report.

Each suite runs with its own defaults (or its ``--quick`` size) and the shared
options given to ``all``; the report starts with every target the suites judge
(:mod:`._targets`: the table the README shows), then the suites' sections in
:data:`lrctl.bench.SUITE_MODULES` order.
"""

from __future__ import annotations

import argparse
import importlib
from pathlib import Path
from typing import Any

from ._suite import Progress, Suite
from ._targets import Target, table

__all__ = ["SUITE"]

_SHARED = ("quick", "policy", "out", "quiet", "json")


def _suites() -> list[Suite]:
    from . import SUITE_MODULES

    return [s for s in (importlib.import_module(m).SUITE for m in SUITE_MODULES)
            if s.name != "all"]


def _run(args: argparse.Namespace, progress: Progress) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for suite in _suites():
        if args.only and suite.name not in args.only:
            continue
        parser = argparse.ArgumentParser(add_help=False)
        suite.add_arguments(parser)
        ns = parser.parse_args([])
        for name in _SHARED:
            setattr(ns, name, getattr(args, name, None))

        def prefixed(line: str, done: int, total: int, name: str = suite.name) -> None:
            progress(f"{name}: {line}", done, total)

        results[suite.name] = suite.run(ns, prefixed)
    by_name = {s.name: s for s in _suites()}
    targets = {name: [t.to_dict() for t in by_name[name].targets(r)]  # type: ignore[misc]
               for name, r in results.items() if by_name[name].targets is not None}
    return {"suites": results, "targets": targets}


def _render(result: dict[str, Any], out: Path) -> str:
    by_name = {s.name: s for s in _suites()}
    glance = {name: [Target(**t) for t in ts] for name, ts in result.get("targets", {}).items()}
    head = f"#### targets at a glance\n\n{table(glance)}\n" if glance else ""
    return head + "\n".join(f"#### {name}\n\n{by_name[name].render(r, out)}"
                            for name, r in result["suites"].items())


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--only", nargs="+", default=None, metavar="SUITE",
                   help="run just these suites")


SUITE = Suite("all", "every suite above, one after the other", _add_arguments, _run, _render)
