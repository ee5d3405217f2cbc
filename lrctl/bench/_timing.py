"""Side-by-side measurement for the speed suites: interleaved blocks, robust summaries.

The machines these run on are shared and noisy (two vCPUs, other jobs waking
up), so no suite reports a lone absolute time. Every arm runs in short blocks,
the arms take turns within each round (the order rotating from round to round,
so that no arm always follows the same neighbour), and a figure is the median
over blocks with the interquartile range as its spread. A ratio is taken per
round, between blocks that ran seconds apart, and then summarised the same way.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ._suite import Progress

__all__ = ["Row", "interleave", "quantile", "ratios", "rows_table", "summary"]


def quantile(xs: Sequence[float], q: float) -> float:
    """Linear-interpolated quantile (``q`` in [0, 1]); NaN for no data."""
    if not xs:
        return math.nan
    s = sorted(xs)
    pos = q * (len(s) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def summary(xs: Sequence[float]) -> dict[str, float]:
    """Median, quartiles, p99 and count: the shape every table row is built from."""
    return {"median": statistics.median(xs) if xs else math.nan, "q1": quantile(xs, 0.25),
            "q3": quantile(xs, 0.75), "p99": quantile(xs, 0.99), "n": float(len(xs))}


def interleave(arms: Mapping[str, Callable[[], float]], rounds: int,
               progress: Progress | None = None, label: str = "") -> dict[str, list[float]]:
    """Run every arm once per round, rotating the order; each call returns one block's figure."""
    names = list(arms)
    out: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            out[name].append(arms[name]())
        if progress is not None:
            progress(f"{label}round {r + 1}/{rounds}: " + ", ".join(
                f"{n} {out[n][-1]:.4g}" for n in names), r + 1, rounds)
    return out


def ratios(num: Sequence[float], den: Sequence[float]) -> list[float]:
    """Per-round ratios of two arms measured in the same rounds."""
    return [a / b for a, b in zip(num, den, strict=True) if b > 0]


@dataclass
class Row:
    """One line of a summary table."""

    arm: str
    stats: dict[str, float]  # summary() of the arm's own figure
    unit: str
    ratio: dict[str, float] | None = None  # summary() of a per-round ratio, if any
    vs: str = ""  # what the ratio is relative to
    target: str = ""
    ok: bool | None = None  # None: no target

    def to_dict(self) -> dict[str, Any]:
        return {"arm": self.arm, "stats": self.stats, "unit": self.unit, "ratio": self.ratio,
                "vs": self.vs, "target": self.target, "ok": self.ok}


def _fmt(x: float) -> str:
    if not math.isfinite(x):
        return "–"
    return f"{x:.3g}" if abs(x) < 1000 else f"{x:,.0f}"


def rows_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """Markdown: arm, median, IQR, ratio (its IQR), target, pass/miss."""
    lines = ["| arm | median | IQR | ratio (IQR) | target | result |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        s, ratio = r["stats"], r.get("ratio")
        ratio_cell = "" if not ratio else (
            f"{ratio['median']:.3f}× {r['vs']} ({ratio['q1']:.3f}–{ratio['q3']:.3f})")
        verdict = "" if r["ok"] is None else ("pass" if r["ok"] else "**miss**")
        lines.append(f"| {r['arm']} | {_fmt(s['median'])} {r['unit']} | "
                     f"{_fmt(s['q1'])}–{_fmt(s['q3'])} | {ratio_cell} | {r['target']} | "
                     f"{verdict} |")
    return "\n".join(lines)
