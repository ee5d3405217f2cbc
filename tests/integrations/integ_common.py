"""Shared by the integration tests."""

from __future__ import annotations

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
