"""Benchmarks behind ``lrctl bench``: training quality, fault recovery and speed.

Each sub-benchmark is a module exposing ``SUITE`` (see :mod:`lrctl.bench._suite`);
``SUITE_MODULES`` lists them in the order ``lrctl bench --help`` shows them.
Importing this package does not import torch: the suites import it when run.
"""

from __future__ import annotations

SUITE_MODULES = (
    "lrctl.bench.quality",
    "lrctl.bench.recovery",
    "lrctl.bench.overhead",
    "lrctl.bench.latency",
    "lrctl.bench.throughput",
    "lrctl.bench.mlflow_bench",
    "lrctl.bench.reload_bench",
    "lrctl.bench.cuda_bench",
    "lrctl.bench.everything",
)

__all__ = ["SUITE_MODULES"]
