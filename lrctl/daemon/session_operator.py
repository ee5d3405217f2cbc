"""The operator's verbs on one run (``lrctl set-lr``, ``pause``/``resume``, ``decay``):
each a decision of the engine, recorded as the session's last, or a ``ProtocolError``
that names the problem, with nothing changed.

A mixin of :class:`~lrctl.daemon.session.Session`, whose attributes these methods use.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from ..wire.errors import ProtocolError
from ..wire.messages import get_int, get_str

if TYPE_CHECKING:
    from ..config import PolicyFile
    from ..policy import Engine

__all__ = ["OperatorActions"]


class OperatorActions:
    """A run's operator verbs (see the module docstring)."""

    if TYPE_CHECKING:  # what it uses of the Session (for type checkers only)
        key: str
        engine: Engine
        policy: PolicyFile
        loop_base: list[float] | None
        operator_mode: str | None

        def _record(self, decision: dict[str, Any]) -> dict[str, Any]: ...

    def set_lr(self, lr: float, steps: int | None, force: bool = False) -> dict[str, Any]:
        initial = self.engine.initial_lrs[0]
        if self.loop_base is not None and initial > 0:  # base="loop": scales the loop's LRs
            scale = lr / initial
            if not all(math.isfinite(b * scale) for b in self.loop_base):
                raise ProtocolError(f"run {self.key}: the loop's LRs (base='loop') scaled by "
                                    f"an LR of {lr:g} over the initial {initial:g} overflow: "
                                    "give a smaller LR", "bad_request")
        try:
            decision = self.engine.set_lr(lr, steps, force)
        except ValueError as exc:  # an LR another group cannot take: nothing changes
            raise ProtocolError(f"run {self.key}: {exc}", "bad_request") from None
        return self._record(decision.to_dict())

    def clear_lr(self) -> dict[str, Any]:
        try:
            decision = self.engine.clear_lr()
        except ValueError as exc:  # nothing to clear: nothing recorded
            raise ProtocolError(f"run {self.key}: {exc}", "bad_request") from None
        return self._record(decision.to_dict())

    def decay(self, msg: Mapping[str, Any]) -> dict[str, Any]:
        """``lrctl decay``: start (``steps``, ``shape``) or ``cancel`` the cooldown of the
        run's WSD policy after its last observed step. ``ProtocolError`` when the request
        is malformed or the policy cannot do it now (nothing changes then)."""
        cancel = msg.get("cancel", False)
        if not isinstance(cancel, bool):
            raise ProtocolError(f"cancel must be true or false, but got {cancel!r:.40}",
                                "bad_message")
        steps = get_int(msg, "steps", lo=1, hi=1 << 40, optional=True)
        shape = get_str(msg, "shape", max_len=16, optional=True)
        try:
            if cancel:
                decisions = self.engine.command("cancel")
            else:
                decisions = self.engine.command("decay", steps=steps, shape=shape)
        except ValueError as exc:
            raise ProtocolError(f"run {self.key}: {exc}", "bad_request") from None
        return self._record(decisions[-1].to_dict())

    def set_mode(self, mode: str) -> dict[str, Any]:
        """``lrctl pause`` (``"shadow"``) / ``lrctl resume`` (``"active"``); a run already in
        that mode is refused with nothing recorded (the audit holds changes only)."""
        if self.engine.mode == mode:
            verb = ("in shadow mode (paused, or 'mode: shadow' in its policy file)"
                    if mode == "shadow" else "active (not paused)")
            raise ProtocolError(f"run {self.key} is already {verb}", "bad_request")
        decision = self.engine.pause() if mode == "shadow" else self.engine.resume()
        self.operator_mode = None if mode == self.policy.mode else mode
        return self._record(decision.to_dict())
