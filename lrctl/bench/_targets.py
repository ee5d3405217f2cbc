"""Targets at a glance: every target a suite judges, with what was measured, in one table.

``lrctl bench all`` puts this table first in its report, so that the README's speed
table is this table as one command printed it, never figures gathered by hand from
several runs. Each suite says which of its figures are targets (``Suite.targets``);
the helpers here turn its summary rows into :class:`Target` lines.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["Target", "row_targets", "table"]


@dataclass(frozen=True)
class Target:
    """One judged figure: what it is, the target, what was measured, and the verdict."""

    what: str
    target: str
    measured: str
    ok: bool | None

    def to_dict(self) -> dict[str, Any]:
        return {"what": self.what, "target": self.target, "measured": self.measured,
                "ok": self.ok}


def measured_of_row(row: Mapping[str, Any]) -> str:
    """A :class:`~lrctl.bench._timing.Row`'s figure: its ratio when it has one (the
    judged figure), else its median, with the inter-quartile range either way."""
    ratio = row.get("ratio")
    if ratio:
        return (f"{ratio['median']:.3f}× {row['vs']} (IQR {ratio['q1']:.3f}–"
                f"{ratio['q3']:.3f})")
    s = row["stats"]
    return f"{s['median']:.3g} {row['unit']} (IQR {s['q1']:.3g}–{s['q3']:.3g})"


def row_targets(rows: Iterable[Mapping[str, Any]], prefix: str = "",
                measured: Callable[[Mapping[str, Any]], str] = measured_of_row,
                ) -> list[Target]:
    """The rows that carry a target, as targets (``prefix`` names their table)."""
    return [Target(f"{prefix}{r['arm']}", r["target"], measured(r), r["ok"])
            for r in rows if r.get("target")]


def _verdict(ok: bool | None) -> str:
    return "" if ok is None else ("pass" if ok else "**miss**")


def table(by_suite: Mapping[str, Sequence[Target]]) -> str:
    """Markdown: suite, figure, target, measured, result; then the count of misses."""
    lines = ["| suite | figure | target | measured | result |", "|---|---|---|---|---|"]
    judged = missed = 0
    for suite, targets in by_suite.items():
        for t in targets:
            lines.append(f"| {suite} | {t.what} | {t.target} | {t.measured} | "
                         f"{_verdict(t.ok)} |")
            judged += t.ok is not None
            missed += t.ok is False
    lines.append(f"\n{judged - missed} of {judged} targets met.")
    return "\n".join(lines) + "\n"
