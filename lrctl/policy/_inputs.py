"""What the engine accepts: observations, base LRs, run lengths, policy names, checked.

The engine validates every observation (it comes from another process, a journal or
a user's script); the checks here say what was wrong, and run once per step, so the
usual observation (an ``int`` step, ``float`` statistics, no metrics) takes the short
way through them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import Any

from ._base import Observation

__all__ = ["ObservationError", "check_lrs", "check_metrics", "check_observation",
           "check_total_steps", "make_observation", "unique_names"]

MAX_METRICS = 64
_RESERVED = frozenset({"step", "loss", "grad_norm"})
#: The metrics of an observation that has none: shared, read-only.
NO_METRICS: Mapping[str, float] = MappingProxyType({})


class ObservationError(ValueError):
    """An observation the engine cannot accept (bad step, bad number, bad name)."""


def check_observation(step: Any, loss: Any, grad_norm: Any, metrics: Mapping[str, Any],
                      last_step: int | None) -> tuple[float | None, float | None,
                                                      Mapping[str, float]]:
    """The loss, grad norm and metrics of ``step`` as an :class:`Observation` holds them;
    ``ObservationError`` unless ``step`` comes after ``last_step`` and all are numbers."""
    # `type(x) is int` / `is float` first: the usual case, and exactly the values that the
    # full checks would accept unchanged (bool is not `int` by type, nor a float subclass).
    if type(step) is not int and (isinstance(step, bool) or not isinstance(step, int)):
        raise ObservationError(f"step must be a non-negative integer, but got {step!r}")
    if step < 0:
        raise ObservationError(f"step must be a non-negative integer, but got {step!r}")
    if last_step is not None and step <= last_step:
        raise ObservationError(f"steps must increase: got step {step} after step {last_step}")
    checked = check_metrics(metrics) if metrics else NO_METRICS  # checked before the stats
    if loss is not None and type(loss) is not float:
        loss = _number("loss", loss)
    if grad_norm is not None and type(grad_norm) is not float:
        grad_norm = _number("grad_norm", grad_norm)
    return loss, grad_norm, checked


def make_observation(step: Any, loss: Any, grad_norm: Any, metrics: Mapping[str, Any],
                     last_step: int | None, lrs: Sequence[float]) -> Observation:
    """The checked :class:`Observation` of ``step``, which must come after ``last_step``."""
    loss, grad_norm, checked = check_observation(step, loss, grad_norm, metrics, last_step)
    return Observation(step, loss, grad_norm, checked, tuple(lrs))


def check_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The named metrics of an observation, checked (count, names, numbers); else
    ``ObservationError``."""
    if len(metrics) > MAX_METRICS:
        raise ObservationError(f"at most {MAX_METRICS} metrics per observation")
    clean = {}
    for name, value in metrics.items():
        if not isinstance(name, str) or not _is_metric_name(name):
            raise ObservationError(
                f"bad metric name {name!r}: 1-64 letters, digits or _./- starting "
                "with a letter")
        if name in _RESERVED:
            raise ObservationError(f"metric name {name!r} is reserved")
        clean[name] = _number(name, value)
    return clean


def _is_metric_name(name: str) -> bool:
    return 0 < len(name) <= 64 and name[0].isalpha() and all(
        c.isalnum() or c in "_./-" for c in name)


def _number(name: str, value: Any) -> float:
    if isinstance(value, (bool, str, bytes)):
        raise ObservationError(f"{name} must be a number, but got {value!r}")
    try:
        return float(value)
    except (TypeError, ValueError, OverflowError):
        raise ObservationError(f"{name} must be a number, but got {value!r}") from None


def check_total_steps(total_steps: Any) -> int | None:
    if total_steps is None:
        return None
    if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
        raise ValueError(f"total_steps must be a positive integer or None, but got "
                         f"{total_steps!r}")
    return total_steps


def check_lrs(lrs: Sequence[float]) -> list[float]:
    out = []
    if not lrs:
        raise ValueError("base_lrs must name at least one param group")
    for lr in lrs:
        if isinstance(lr, bool) or not isinstance(lr, (int, float)):
            raise ValueError(f"base_lrs must be numbers, but got {lr!r}")
        if not math.isfinite(lr) or lr < 0:
            raise ValueError(f"base_lrs must be finite and >= 0, but got {lr!r}")
        out.append(float(lr))
    return out


def unique_names(kinds: Sequence[str]) -> list[str]:
    """Default policy names: the kind, with ``#2``, ``#3``… for repeats."""
    seen: dict[str, int] = {}
    names = []
    for kind in kinds:
        seen[kind] = seen.get(kind, 0) + 1
        names.append(kind if seen[kind] == 1 else f"{kind}#{seen[kind]}")
    return names
