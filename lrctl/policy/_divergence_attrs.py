"""The divergence guard's attributes, declared once for the mixins that share them.

:class:`~lrctl.policy.divergence.Divergence` sets every one in ``__init__``; the
mixins (:mod:`._divergence_actions`, :mod:`._divergence_shift`,
:mod:`._divergence_state`, :mod:`._divergence_rollback`) read and write them. This
class holds declarations only (no values, no methods): it changes nothing at run time.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from ._base import Action
from .stats import RobustWindow

__all__ = ["GuardAttributes"]


class GuardAttributes:
    """Type declarations of the divergence guard's state (see the module docstring)."""

    params: dict[str, Any]
    # the multiplier, and what bounds it
    _scale: float
    _ceiling: float
    _before_incident: float  # the multiplier before the back-off that began the incident
    # the rolling statistics (logs, or losses on the linear scale)
    _loss: RobustWindow
    _gnorm: RobustWindow
    # counts
    _spikes: int
    _grad_spikes: int
    _loss_run: int
    _clean: int
    _backoffs: int
    _total_backoffs: int
    _rollbacks: int
    _nonfinite_run: int
    _stopped: bool
    # the incident and its cooldown
    _now: int
    _incident: int
    _discard_until: int
    _cooldown: int
    _cooldown_seen: list[tuple[float | None, float | None]]
    _cooldown_spikes: int
    _escalation: int
    _incident_level: float | None
    _level_held: bool
    _level_shift: bool
    _after: list[float] | None
    _accepted: dict[str, Any] | None
    _with_snapshots: bool
    _restored: dict[str, Any] | None
    _cooldown_level: float | None
    _data_after_rollback: dict[str, Any] | None
    _told_nonpositive: bool
    # methods one mixin calls on another
    _rollback: Callable[..., list[Action] | None]
    _restored_shows_it: Callable[[list[float], dict[str, Any] | None], dict[str, Any] | None]
    _judge: Callable[[float | None, float | None], dict[str, Any] | None]
    _near: Callable[[float, float], bool]
    _levels: Callable[[float, float], dict[str, float]]
    _back_off: Callable[..., list[Action]]
    _rollback_state: Callable[[], dict[str, Any]]
    _load_rollback_state: Callable[[Mapping[str, Any]], None]
