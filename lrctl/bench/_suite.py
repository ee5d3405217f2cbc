"""What a sub-benchmark of ``lrctl bench`` provides, so that new ones plug in as modules.

A suite module exposes ``SUITE``; :mod:`lrctl.commands.bench` lists the modules
in ``SUITE_MODULES`` and gives every suite the shared options (``--quick``,
``--json``, ``--out``) plus the ones it adds itself.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ._targets import Target

__all__ = ["ARM_NAMES", "BASE_ARMS", "LEGACY_TASKS", "TASK_NAMES", "Progress", "Suite"]

# Names only, so that building the command line does not import torch; the tests
# check that they match :data:`lrctl.bench.tasks.TASKS` and :data:`lrctl.bench.arms.ARMS`.
TASK_NAMES = ("digits", "charlm", "cancer_logreg", "diabetes", "digits_ae", "noisy_labels",
              "moons", "wine", "digits_cnn", "teacher_student", "sparse_parity", "linreg",
              "friedman", "adding")
#: The tasks of the first benchmarks: the recovery and overhead suites still run these.
LEGACY_TASKS = ("digits", "charlm")
ARM_NAMES = ("fixed", "cosine", "plateau", "schedulefree", "prodigy", "lrctl", "lrctl+rollback")
#: The quality benchmark's reference arms; every policy file adds a ``policy:<stem>`` arm.
BASE_ARMS = ("fixed", "cosine", "plateau", "schedulefree", "prodigy")

#: Called after each unit of work: (a one-line description, units done, units in all).
Progress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class Suite:
    name: str
    help: str
    #: Adds the suite's own options to its sub-parser.
    add_arguments: Callable[[argparse.ArgumentParser], None]
    #: Runs the suite: (parsed args, progress) → a JSON-safe result.
    run: Callable[[argparse.Namespace, Progress], dict[str, Any]]
    #: Renders the result as Markdown; may write files (plots) under the given folder.
    render: Callable[[dict[str, Any], Path], str]
    #: The figures the suite judges against a target (``lrctl bench all`` lists them first).
    targets: Callable[[dict[str, Any]], list[Target]] | None = None
