"""A policy file's knobs, flat: the MLflow params of a run, and what a reload changed.

``{"plateau.factor": "0.5", ...}``, as written in the file (a knob left to its default
is absent). A reload's decision names the knobs whose values moved, so that the audit
says "divergence.z_threshold 6.0 → 4.0", not only "changed divergence".
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..config import PolicyFile

__all__ = ["MAX_NAMED", "flatten_params", "knob_changes", "said_changes"]

MAX_NAMED = 8  # knobs a reload's reason names (the evidence has them all)


def flatten_params(policy: PolicyFile) -> dict[str, str]:
    """``{"plateau.factor": "0.5", ...}``: the knobs as MLflow params."""
    out = {"mode": policy.mode, "min_lr": str(policy.min_lr), "max_lr": str(policy.max_lr)}
    for entry in policy.entries:
        out[f"{entry.name}.kind"] = entry.kind
        for k, v in entry.params.items():
            out[f"{entry.name}.{k}"] = str(v)[:250]
    return out


def knob_changes(old: Mapping[str, str],
                 new: Mapping[str, str]) -> dict[str, list[str | None]]:
    """``{knob: [old, new]}`` for every knob whose value moved (None: not written, its
    default), in the files' order."""
    keys = list(old) + [k for k in new if k not in old]
    return {k: [old.get(k), new.get(k)] for k in keys if old.get(k) != new.get(k)}


def said_changes(changes: Mapping[str, list[str | None]]) -> str:
    """The changes for a reason: ``"divergence.z_threshold 6.0 → 4.0; …"``; a policy
    added or removed is said so, once (``"policy decay added (kind decay)"``), its knobs
    left to the evidence."""
    whole = {k.removesuffix(".kind") for k, (a, b) in changes.items()
             if k.endswith(".kind") and (a is None or b is None)}
    said = []
    for k, (a, b) in changes.items():
        name, _, knob = k.rpartition(".")
        if name not in whole:
            said.append(f"{k} {_said(a)} → {_said(b)}")
        elif knob == "kind":
            said.append(f"policy {name} added (kind {b})" if a is None
                        else f"policy {name} removed (kind {a})")
    more = len(said) - MAX_NAMED
    said = said[:MAX_NAMED]
    if more > 0:
        said.append(f"and {more} more")
    return "; ".join(said)


def _said(value: str | None) -> str:
    if value is None:
        return "default"
    return value if len(value) <= 40 else value[:39] + "…"
