"""Pure policy logic: observations in, learning-rate decisions out.

Nothing here does I/O, reads a clock or imports torch, mlflow or watchdog.
"""

from __future__ import annotations

from ._base import Action, Observation, Policy, ReactivePolicy, Role, StepContext
from ._decision import Decision
from ._engine import Engine, ObservationError
from ._params import REQUIRED, Param, ParamError
from ._registry import available_kinds, get_policy_class, register_policy, unregister_policy
from ._schedule import Schedule

__all__ = [
    "REQUIRED",
    "Action",
    "Decision",
    "Engine",
    "Observation",
    "ObservationError",
    "Param",
    "ParamError",
    "Policy",
    "ReactivePolicy",
    "Role",
    "Schedule",
    "StepContext",
    "available_kinds",
    "get_policy_class",
    "register_policy",
    "unregister_policy",
]
