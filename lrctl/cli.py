"""The ``lrctl`` command line.

Each group of verbs lives in a module of :mod:`lrctl.commands` with a
``register(subparsers)`` function; this module only assembles them.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import warnings
from collections.abc import Sequence

from . import __version__

COMMAND_MODULES = (
    "lrctl.commands.policy",
    "lrctl.commands.bench",
    "lrctl.commands.daemon",
    "lrctl.commands.steer",
    "lrctl.commands.cooldown",
    "lrctl.commands.rollback",
    "lrctl.commands.audit",
    "lrctl.commands.prune",
    "lrctl.commands.demo",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lrctl", description="Adaptive learning-rate controller for PyTorch training runs."
    )
    parser.add_argument("--version", action="version", version=f"lrctl {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def _one_line_warning(message: Warning | str, category: type[Warning], filename: str,
                      lineno: int, line: str | None = None) -> str:
    """lrctl's own warnings as the one line a command prints (``lrctl: ...``), not with
    the source line that raised them; any other package's as Python shows them."""
    text = str(message)
    if filename.startswith(_PACKAGE):
        return (text if text.startswith("lrctl") else f"lrctl: {text}") + "\n"
    return _python_format(message, category, filename, lineno, line)


_python_format = warnings.formatwarning
_PACKAGE = os.path.dirname(os.path.abspath(__file__)) + os.sep


def main(argv: Sequence[str] | None = None) -> int:
    warnings.formatwarning = _one_line_warning
    parser = build_parser()
    args = parser.parse_args(argv)
    # The command line as given, for results that record what produced them.
    args.command_line = ["lrctl", *(sys.argv[1:] if argv is None else argv)]
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # `lrctl decisions RUN | head`: the reader left; exit quietly, as Unix tools do.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141


if __name__ == "__main__":
    sys.exit(main())
