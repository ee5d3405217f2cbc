"""``lrctl bench all``: every other suite in turn, one report.

Each suite runs with its own defaults (or its ``--quick`` size) and the shared
options given to ``all``; the report is the suites' sections in
:data:`lrctl.bench.SUITE_MODULES` order.
"""

from __future__ import annotations

import argparse
import importlib
from pathlib import Path
from typing import Any

from ._suite import Progress, Suite

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
    return {"suites": results}


def _render(result: dict[str, Any], out: Path) -> str:
    by_name = {s.name: s for s in _suites()}
    return "\n".join(f"#### {name}\n\n{by_name[name].render(r, out)}"
                     for name, r in result["suites"].items())


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--only", nargs="+", default=None, metavar="SUITE",
                   help="run just these suites")


SUITE = Suite("all", "every suite above, one after the other", _add_arguments, _run, _render)
