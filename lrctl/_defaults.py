"""Where the packaged data lives: one owner for the paths every part of lrctl reads.

Light on purpose (the hook imports it): paths only, nothing is read here.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["DATA", "DEFAULT_POLICY", "POLICIES", "RANGETEST_POLICY", "RECORDED_CURVE"]

DATA = Path(__file__).resolve().parent / "data"
POLICIES = DATA / "policies"
#: ``attach(optimizer)`` and ``load_policy`` with no policy use this file.
DEFAULT_POLICY = POLICIES / "default.yaml"
#: The opt-in LR range test (the demo's policy).
RANGETEST_POLICY = POLICIES / "rangetest.yaml"
#: A recorded loss curve for ``lrctl replay`` with no ``--curve``.
RECORDED_CURVE = DATA / "loss_curve.csv"
