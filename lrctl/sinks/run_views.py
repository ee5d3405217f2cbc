"""How a run's decisions read in the MLflow UI: the run's description and the table rows.

Pure: journal records in, Markdown and rows out; no I/O, no clock, no mlflow.
The MLflow worker keeps one :class:`RunSummary` per run in the run's cursor and
folds each decision in when MLflow has acknowledged it, so the description
costs O(1) per decision however long the run, survives controller restarts,
and (because every decision carries its journal ``seq``) folding a decision
twice after a replay counts it once.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ..policy._base import float_from_json

__all__ = [
    "MAX_NOTE_CHARS",
    "RECENT",
    "TABLE_COLUMNS",
    "RunSummary",
    "decision_row",
    "runs_view_link",
]

#: How many of the latest decisions the description lists.
RECENT = 20
#: The description is a run tag: MLflow stores at most 8 000 characters; stay well below.
MAX_NOTE_CHARS = 5000
MAX_REASON_CHARS = 160
#: Columns of the ``lrctl/decisions_table.json`` artifact (LRs of param group 0).
TABLE_COLUMNS = ("step", "policy", "action", "old_lr", "new_lr", "reason")
# Characters that Markdown (and a GFM table cell) would read as markup.
_MD_SPECIAL = str.maketrans({c: f"\\{c}" for c in "\\`*_[]<>|#"})


def decision_row(record: Mapping[str, Any]) -> list[Any]:
    """One decision as a table row, in :data:`TABLE_COLUMNS` order. Non-finite or
    missing LRs are ``None`` (JSON ``null``, a blank cell, NaN in pandas)."""
    reason = str(record.get("reason", ""))
    if record.get("shadow"):  # decided in shadow mode: recorded, never applied
        reason = f"shadow mode, not applied: {reason}"
    return [int(record.get("step", 0)), str(record.get("policy", "")),
            str(record.get("action", "")), _lr0(record, "old_lrs"), _lr0(record, "new_lrs"),
            reason]


def runs_view_link(experiment_id: str) -> str:
    """The UI route (relative to the MLflow UI's page) of the experiment's runs table in
    the *Model training* view. MLflow 3.17's UI picks GenAI or Model training from its
    sidebar switch (stored per browser, GenAI by default), not from the experiment's
    ``mlflow.experimentKind`` tag, unless the URL names the workflow."""
    return f"#/experiments/{experiment_id}/runs?workflowType=machine_learning"


@dataclass
class RunSummary:
    """Counts by action, the latest :data:`RECENT` decisions and the policy in use."""

    policy_source: str = ""
    policy_sha256: str = ""
    policy_version: int = 0
    seq: int = 0  # the last decision folded in
    counts: dict[str, int] = field(default_factory=dict)
    recent: list[list[Any]] = field(default_factory=list)  # decision_row()s, oldest first

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def add_decision(self, seq: int, record: Mapping[str, Any]) -> bool:
        """Fold in the decision numbered ``seq``; False if it was already counted."""
        if seq <= self.seq:
            return False
        self.seq = seq
        action = str(record.get("action", ""))
        self.counts[action] = self.counts.get(action, 0) + 1
        self.recent.append(decision_row(record))
        del self.recent[:-RECENT]
        return True

    def add_prior(self, records: Iterable[Mapping[str, Any]]) -> None:
        """Fold in the decisions the MLflow run held before this run's journal (a run
        continued from another controller's journal), oldest first: they are counted, and
        come before every decision of the journal in the latest ones. Once per journal
        and MLflow run (the caller keeps count; their ``seq`` is another journal's)."""
        rows = []
        for record in records:
            action = str(record.get("action", ""))
            self.counts[action] = self.counts.get(action, 0) + 1
            rows.append(decision_row(record))
        self.recent[:0] = rows[-RECENT:]
        del self.recent[:-RECENT]

    def set_policy(self, source: str, sha256: str, version: int) -> None:
        self.policy_source, self.policy_sha256, self.policy_version = source, sha256, version

    def to_json(self) -> dict[str, Any]:
        return {"policy_source": self.policy_source, "policy_sha256": self.policy_sha256,
                "policy_version": self.policy_version, "seq": self.seq,
                "counts": dict(self.counts), "recent": [list(r) for r in self.recent]}

    @classmethod
    def from_json(cls, data: Mapping[str, Any] | None) -> RunSummary:
        if not data:
            return cls()
        return cls(policy_source=str(data.get("policy_source", "")),
                   policy_sha256=str(data.get("policy_sha256", "")),
                   policy_version=int(data.get("policy_version", 0)),
                   seq=int(data.get("seq", 0)),
                   counts={str(k): int(v) for k, v in (data.get("counts") or {}).items()},
                   recent=[list(r) for r in (data.get("recent") or [])][-RECENT:])

    def markdown(self, experiment_id: str | None = None,
                 artifacts: tuple[str, str] = ("lrctl/decisions_table.json",
                                               "lrctl/decisions.jsonl")) -> str:
        """The run description: at most :data:`MAX_NOTE_CHARS` characters (the oldest
        rows of the table give way first). The UI shows its first lines until someone
        clicks "Show more": the headline and the link come first, then the newest rows."""
        head = [self._headline(experiment_id), ""]
        foot = ["", self._footer(len(self.recent), artifacts)]
        rows = [f"| {r[0]} | {_md(r[1])} | {_md(r[2])} | {_lr(r[3])} → {_lr(r[4])} "
                f"| {_md(_clip(r[5]))} |" for r in reversed(self.recent)]
        while True:
            table = ["| step | policy | action | LR (group 0) | reason |",
                     "|---:|---|---|---|---|", *rows] if rows else ["No decisions yet."]
            text = "\n".join([*head, *table, *foot])
            if len(text) <= MAX_NOTE_CHARS or not rows:
                return text[:MAX_NOTE_CHARS]
            rows.pop()
            foot[-1] = self._footer(len(rows), artifacts)

    def _headline(self, experiment_id: str | None) -> str:
        policy = os.path.basename(self.policy_source) or "(unknown policy file)"
        version = f" v{self.policy_version}" if self.policy_version > 1 else ""
        sha = f", sha256 `{self.policy_sha256[:12]}`" if self.policy_sha256 else ""
        counts = ", ".join(f"{n} {_md(action)}" for action, n in
                           sorted(self.counts.items(), key=lambda kv: (-kv[1], kv[0])))
        total = self.total
        decisions = f"{total} decision{'' if total == 1 else 's'}"
        link = (f" · [training runs of this experiment]({runs_view_link(experiment_id)})"
                if experiment_id else "")
        return (f"**lrctl** · policy `{policy.replace('`', '')}`{version}{sha} · "
                f"{decisions}{': ' + counts if counts else ''}{link}")

    def _footer(self, shown: int, artifacts: tuple[str, str]) -> str:
        table, jsonl = artifacts
        if not self.total:  # the artifacts come with the first decision
            return ("The decisions will be listed here, with every one in the artifacts "
                    f"`{table}` (table) and `{jsonl}` (full records).")
        latest = f"Latest {shown} of {self.total}, newest first. " if shown < self.total else ""
        return (f"{latest}Every decision: artifacts `{table}` (table) and `{jsonl}` "
                f"(full records); metrics `lrctl/event/<action>`.")


def _lr0(record: Mapping[str, Any], key: str) -> float | None:
    try:
        value = float_from_json(record[key][0])
    except (KeyError, IndexError, TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def _lr(value: Any) -> str:
    return "-" if value is None else f"{float(value):.4g}"


def _clip(text: str) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= MAX_REASON_CHARS else text[:MAX_REASON_CHARS - 1] + "…"


def _md(text: str) -> str:
    return " ".join(str(text).split()).translate(_MD_SPECIAL)
