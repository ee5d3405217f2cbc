"""Shared by the integration tests."""

from __future__ import annotations

from typing import Any

# rangetest reads the loss every step; plateau on grad_norm (patience 1) cuts the LR
# whenever the grad norm fails to improve: any other loss or grad norm than the
# framework's own changes the LR sequence.
POLICY = """\
version: 1
policies:
  - kind: rangetest
    start_factor: 0.1
    growth: 1.15
    min_steps: 3
    rise: 0.5
  - kind: plateau
    metric: grad_norm
    patience: 1
    factor: 0.8
    threshold: 0.0
"""

# Early stopping that always fires at the second validation: no later value beats the
# first by 100, and patience is 1.
EARLYSTOP = """\
version: 1
policies:
  - kind: earlystop
    metric: val_loss
    min_delta: 100.0
    patience: 1
"""


def check_early_stop(decisions: list[Any], steps_run: int, max_steps: int) -> None:
    """The run stopped early, on lrctl's earlystop decision, with its evidence."""
    stops = [d for d in decisions if d.action == "stop"]
    assert len(stops) == 1 and stops[0].kind == "earlystop", decisions
    ev = stops[0].evidence
    assert ev["statistic"] == "val_loss" and ev["wait"] == 1 and ev["patience"] == 1
    # (HF numbers steps from 1, as lrctl then does: the stop is at the last step run)
    assert ev["best_step"] < stops[0].step <= steps_run < max_steps
