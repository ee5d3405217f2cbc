"""The one convention for floats in JSON: strict JSON has no ``NaN``/``Infinity``, so a
non-finite number travels (and is journaled, and kept in a policy's state) as the
string ``"nan"``, ``"inf"`` or ``"-inf"``. Standard library only: the policy core
uses it too.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

__all__ = ["NON_FINITE", "float_from_json", "float_to_json", "json_safe"]

NON_FINITE = ("nan", "inf", "-inf")


def float_to_json(x: float) -> float | str:
    """A float for strict JSON: non-finite values become strings."""
    if math.isfinite(x):
        return x
    return "nan" if math.isnan(x) else ("inf" if x > 0 else "-inf")


def float_from_json(x: float | int | str) -> float:
    """The inverse of :func:`float_to_json`; ``ValueError`` for any other string."""
    if isinstance(x, str):
        if x not in NON_FINITE:
            raise ValueError(f"not a float: {x!r}")
        return float(x)
    return float(x)


def json_safe(value: Any) -> Any:
    """A copy of ``value`` that strict JSON can encode (non-finite floats as strings,
    tuples as lists, anything else unknown as its ``str``)."""
    if isinstance(value, float):
        return float_to_json(value)
    if isinstance(value, Mapping):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if value is None or isinstance(value, (bool, int, str)):
        return value
    return str(value)
