"""The decision record: what changed, when, by which policy, and why."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ..wire.floats import float_from_json, float_to_json, json_safe  # noqa: F401 (json_safe re-exported)

__all__ = ["Decision", "json_safe", "record_ratio"]


@dataclass(frozen=True)
class Decision:
    """One decision. ``old_lrs``/``new_lrs`` are the LRs for the next step
    without and with this decision, so ``new/old`` is exactly its effect."""

    step: int
    policy: str  # the policy's name in its file (its kind unless named)
    kind: str
    action: str
    old_lrs: tuple[float, ...]
    new_lrs: tuple[float, ...]
    reason: str
    evidence: Mapping[str, Any] = field(default_factory=dict)
    policy_sha256: str = ""
    shadow: bool = False

    @property
    def ratio(self) -> float:
        """new/old LR of group 0 (1.0 for decisions that do not move the LR)."""
        if not self.old_lrs or self.old_lrs[0] == 0 or not math.isfinite(self.old_lrs[0]):
            return 1.0
        return self.new_lrs[0] / self.old_lrs[0]

    def to_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "policy": self.policy,
            "kind": self.kind,
            "action": self.action,
            "old_lrs": list(self.old_lrs),
            "new_lrs": list(self.new_lrs),
            "reason": self.reason,
            "evidence": json_safe(self.evidence),
            "policy_sha256": self.policy_sha256,
            "shadow": self.shadow,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Decision:
        return cls(
            step=int(d["step"]),
            policy=str(d["policy"]),
            kind=str(d["kind"]),
            action=str(d["action"]),
            old_lrs=tuple(float(x) for x in d["old_lrs"]),
            new_lrs=tuple(float(x) for x in d["new_lrs"]),
            reason=str(d["reason"]),
            evidence=dict(d.get("evidence", {})),
            policy_sha256=str(d.get("policy_sha256", "")),
            shadow=bool(d.get("shadow", False)),
        )


def record_ratio(record: Mapping[str, Any]) -> float:
    """:attr:`Decision.ratio` of a decision as journaled (``to_dict()``, floats as
    strict JSON); 1.0 when it is not defined or the record is malformed, and for a
    shadow-mode decision, which moved no LR (the audit's charts show what happened), as
    for one whose change an operator's manual LR kept from the optimizer."""
    if record.get("shadow"):
        return 1.0
    evidence = record.get("evidence")
    if isinstance(evidence, Mapping) and evidence.get("overridden") is True:
        return 1.0
    try:
        old = float_from_json(record["old_lrs"][0])
        new = float_from_json(record["new_lrs"][0])
    except (KeyError, IndexError, TypeError, ValueError):
        return 1.0
    if old == 0 or not math.isfinite(old):
        return 1.0
    return new / old
