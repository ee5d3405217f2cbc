"""Declared, validated policy knobs.

Every policy lists its knobs as :class:`Param` objects. The same declaration
validates keyword arguments in the constructor, validates YAML (the config
layer reports the failing key with its file and line), documents defaults in
``lrctl validate --explain`` and the README, and names MLflow params.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["MAX_INT", "MAX_MEAN_WINDOW", "MAX_WINDOW", "REQUIRED", "Param", "ParamError",
           "bind_params", "did_you_mean"]

_MAX_LIST = 4096
#: The most observations a policy's window may hold: each run's memory, its checkpoint
#: and the loop's work on one observation stay bounded (a window of 1e8 was accepted,
#: and one peer's observations then stalled every other run).
MAX_WINDOW = 100_000
#: ... and a running mean's, which is summed at every observation.
MAX_MEAN_WINDOW = 10_000
#: No integer knob is larger (in magnitude): 2**53, past which a YAML float such as
#: ``1e30`` no longer says an exact integer (and sizes built from it overflow).
MAX_INT = 2**53


class ParamError(ValueError):
    """A knob has a bad value. ``key`` names it so callers can point at it."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}")
        self.key = key
        self.message = message

    def __reduce__(self) -> tuple[Any, ...]:
        # As ConfigError's: pickled as the constructor's arguments, not ``self.args``.
        return type(self), (self.key, self.message), self.__dict__


@dataclass(frozen=True)
class Param:
    """One knob of a policy.

    ``kind`` is one of ``"float"``, ``"int"``, ``"bool"``, ``"str"``,
    ``"float_or_list"`` (a number, or one number per param group, as torch
    accepts for ``min_lr``/``base_lr``/``max_lr``).
    """

    name: str
    kind: str
    default: Any
    doc: str
    choices: tuple[str, ...] = ()
    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    optional: bool = False  # ``None`` is an accepted value (and usually the default)

    def check(self, value: Any) -> Any:
        """Return ``value`` normalised, or raise :class:`ParamError`."""
        if value is None:
            if self.optional:
                return None
            raise ParamError(self.name, "a value is required")
        if self.kind == "bool":
            if not isinstance(value, bool):
                raise ParamError(self.name, f"expected true or false, but got {value!r}")
            return value
        if self.kind == "str":
            if not isinstance(value, str):
                raise ParamError(self.name, f"expected a string, but got {value!r}")
            if self.choices and value not in self.choices:
                raise ParamError(
                    self.name, f"expected one of {', '.join(self.choices)}, but got {value!r}"
                )
            return value
        if self.kind == "int":
            if isinstance(value, bool) or not isinstance(value, int):
                if isinstance(value, float) and value.is_integer() and math.isfinite(value):
                    value = int(value)
                else:
                    raise ParamError(self.name, f"expected an integer, but got {value!r}")
            if abs(value) > MAX_INT:
                raise ParamError(self.name, f"integer too large: {value!r} (at most 2**53)")
            self._check_range(value)
            return value
        if self.kind == "float":
            return self._check_number(value)
        if self.kind == "float_or_list":
            if isinstance(value, (list, tuple)):
                if not value:
                    raise ParamError(self.name, "expected a number or a non-empty list of numbers")
                if len(value) > _MAX_LIST:
                    raise ParamError(self.name, f"list too long ({len(value)} > {_MAX_LIST})")
                return [self._check_number(v) for v in value]
            return self._check_number(value)
        raise AssertionError(f"unknown param kind {self.kind!r}")  # a bug in a Param table

    def _check_number(self, value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ParamError(self.name, f"expected a number, but got {value!r}")
        try:
            number = float(value)
        except OverflowError:
            raise ParamError(self.name, f"number too large: {value!r}") from None
        if not math.isfinite(number):
            raise ParamError(self.name, f"expected a finite number, but got {value!r}")
        self._check_range(number)
        return number

    def _check_range(self, number: float) -> None:
        bounds: list[tuple[float | None, Callable[[float, float], bool], str]] = [
            (self.ge, lambda x, b: x >= b, ">="),
            (self.gt, lambda x, b: x > b, ">"),
            (self.le, lambda x, b: x <= b, "<="),
            (self.lt, lambda x, b: x < b, "<"),
        ]
        for bound, ok, symbol in bounds:
            if bound is not None and not ok(number, bound):
                raise ParamError(self.name, f"must be {symbol} {_number(bound)}, but got "
                                            f"{_number(number)}")

    def describe(self) -> str:
        default = "required" if self.default is _REQUIRED else repr(self.default)
        extra = f" (one of: {', '.join(self.choices)})" if self.choices else ""
        return f"{self.name} [{self.kind}, default {default}]{extra}: {self.doc}"


class _Required:
    def __repr__(self) -> str:
        return "required"


#: Marks a knob that has no default.
REQUIRED: Any = _Required()
_REQUIRED = REQUIRED


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """``"; did you mean 'x'?"`` for the closest of ``choices`` to a misspelt ``word``."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.75)
    return f"; did you mean {close[0]!r}?" if close else ""


def bind_params(
    kind: str, params: Sequence[Param], values: Mapping[str, Any]
) -> dict[str, Any]:
    """Check ``values`` against ``params``: unknown keys, missing keys, types, ranges. The
    keys are checked in the order given (a file's), so the first problem said is the first
    in the file."""
    by_name = {p.name: p for p in params}
    checked: dict[str, Any] = {}
    for key, value in values.items():
        param = by_name.get(key)
        if param is None:
            hint = ", ".join(sorted(by_name)) or "none"
            raise ParamError(str(key), f"unknown key for kind {kind!r}"
                                       f"{did_you_mean(str(key), by_name)} (known keys: {hint})")
        checked[key] = param.check(value)
    bound: dict[str, Any] = {}
    for p in params:
        if p.name in checked:
            bound[p.name] = checked[p.name]
        elif p.default is _REQUIRED:
            raise ParamError(p.name, f"required by kind {kind!r}")
        else:
            bound[p.name] = p.default
    return bound


def _number(x: float) -> str:
    """``x`` as a user wrote it: an int in full (10000, not 1e+04), a float short."""
    return str(x) if isinstance(x, int) else f"{x:g}"
