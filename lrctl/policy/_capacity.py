"""How many values a run's policies may keep: a bound on its state, checked when built.

Every window is bounded (``window``, ``patience``, ``smoothing_window`` ≤ 100 000), and
a file holds at most 64 policies, but not the product: 64 divergence guards with
``window: 100000`` kept 25 million values, whose checkpoint (encoded on the
controller's loop, every second) held every other run's answers for seconds and could
not be read back, and whose memory a few such runs could exhaust. The engine refuses
policies whose windows may hold more than :data:`MAX_KEPT_VALUES` in all (a few
policies at the largest windows fit; the shipped ones keep a few thousand).

The count walks a policy's attributes (and those of the helper objects of lrctl's own
policy modules it holds; a subclass of one of lrctl's policies is walked too): a
:class:`~lrctl.policy._robust.RobustWindow` keeps two copies of its values, a
:class:`~lrctl.policy.stats.TrendWindow` one, a bounded ``deque`` its ``maxlen``, and a
class's ``KEPT_PER_KNOB`` names the knobs whose value bounds a list it fills (the
divergence guard's cooldown keeps two values per observation). A policy of your own
that keeps its values elsewhere is not counted.

A second bound, :data:`MAX_TESTED_VALUES`, is on the values the run's trend tests
(:class:`~lrctl.policy.stats.TrendWindow`: plateau's stall test, early stopping's
trend) judge at one observation: such a test passes over its whole window when it comes
due (~30 ms for 100 000 values), and policies of one window come due together; three
early stops at ``window: 100000`` held the controller's loop, and every other run's
answer, for 130 ms at a time. One test at the largest window fits.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Mapping
from typing import Any

from ._robust import RobustWindow
from .stats import TrendWindow

__all__ = ["MAX_KEPT_VALUES", "MAX_TESTED_VALUES", "check_kept", "held_values", "kept_values",
           "tested_values"]

MAX_KEPT_VALUES = 1 << 20
MAX_TESTED_VALUES = 1 << 17
_DEPTH = 3  # helper objects inside helper objects


def check_kept(policies: Iterable[Any]) -> None:
    """``ValueError`` when ``policies`` may keep more than :data:`MAX_KEPT_VALUES`, or
    their trend tests judge more than :data:`MAX_TESTED_VALUES` at one observation."""
    policies = list(policies)  # (counted twice)
    for count, bound, what, why, fix in _BOUNDS:
        total = sum(map(count, policies))
        if total > bound:
            raise ValueError(f"{what.format(total)}, more than a run may "
                             f"({bound}: {why}): use {fix}")


def kept_values(policy: Any) -> int:
    """The most values ``policy``'s windows may hold."""
    return _count(policy, _DEPTH, set(), held=False)


def tested_values(policy: Any) -> int:
    """The most values ``policy``'s trend tests judge at one observation."""
    return _count(policy, _DEPTH, set(), held=False, tested=True)


def held_values(policy: Any) -> int:
    """The values ``policy``'s windows hold now (each once: what its state carries)."""
    return _count(policy, _DEPTH, set(), held=True)


def _count(obj: Any, depth: int, seen: set[int], held: bool, tested: bool = False) -> int:
    if id(obj) in seen:
        return 0
    seen.add(id(obj))
    if tested:  # (only the trend tests' windows)
        if isinstance(obj, TrendWindow):
            return obj.window
        if isinstance(obj, (RobustWindow, deque, list)):
            return 0
    if isinstance(obj, RobustWindow):
        return obj.count if held else 2 * obj.size  # arrival order and the sorted copy
    if isinstance(obj, TrendWindow):
        return len(obj) if held else obj.window
    if isinstance(obj, deque):
        return len(obj) if held else obj.maxlen or 0
    if isinstance(obj, list) and held:  # (lists a knob bounds: see KEPT_PER_KNOB)
        return len(obj)
    if depth == 0 or not any(c.__module__.startswith("lrctl.policy")
                             for c in type(obj).__mro__[:-1]):
        return 0
    total = sum(_count(value, depth - 1, seen, held, tested) for value in _attributes(obj))
    if not held and not tested:  # lists a policy fills up to a knob's value (see Divergence)
        params = getattr(obj, "params", None)
        for name, per in getattr(type(obj), "KEPT_PER_KNOB", {}).items():
            value = params.get(name) if isinstance(params, Mapping) else None
            if isinstance(value, int):
                total += per * value
    return total


def _attributes(obj: Any) -> list[Any]:
    values = list(getattr(obj, "__dict__", {}).values())
    for cls in type(obj).__mro__:
        for name in getattr(cls, "__slots__", ()):
            if hasattr(obj, name):
                values.append(getattr(obj, name))
    return values


#: (count, bound, what exceeds it, why it is bounded, what to do) for check_kept.
_BOUNDS = (
    (kept_values, MAX_KEPT_VALUES, "the policies keep up to {} values in their windows",
     "a run's state is checkpointed every second, and its windows are judged at every step",
     "smaller windows (window, patience, cooldown) or fewer windowed policies"),
    (tested_values, MAX_TESTED_VALUES,
     "the policies' trend tests judge up to {} values at one observation",
     "a test passes over its whole window on the controller's loop, holding every other "
     "run's answer meanwhile, ~30 ms per 100 000 values",
     "smaller windows (window, patience) or fewer trend tests"),
)
