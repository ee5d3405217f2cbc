"""Tables, a machine description and the regret plot for ``lrctl bench``.

Tables are Markdown so that they paste into the README unchanged; the plot is
written with matplotlib's Agg backend (no display needed), imported only here.
"""

from __future__ import annotations

import datetime as _dt
import math
import os
import platform
from pathlib import Path
from typing import Any

__all__ = ["machine", "plot_regret", "quality_tables", "recovery_tables"]


def machine() -> dict[str, Any]:
    """What the numbers were measured on: date, CPU, cores, Python and torch versions."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f
                        if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {"date": _dt.date.today().isoformat(), "cpu": cpu, "cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
            "torch": torch.__version__, "platform": platform.platform()}


def machine_line(info: dict[str, Any]) -> str:
    return (f"{info['date']}, {info['cpu']}, {info['cores']} cores "
            f"({info['torch_threads']} torch thread), Python {info['python']}, "
            f"torch {info['torch']}")


def _r(x: float) -> str:
    return f"{x:.3f}" if math.isfinite(x) else "∞"


def quality_tables(result: dict[str, Any]) -> str:
    """Per task: one row per arm with robust width, median r, NaN runs and r per LR."""
    cfg, summary = result["config"], result["summary"]
    lrs = cfg["lrs"]
    lines = []
    for task, s in summary.items():
        lines.append(f"**{task}** ({cfg['steps'][task]} steps, {len(cfg['seeds'])} seeds; "
                     f"best cosine: val {s['best_cosine_val']:.4f} at LR "
                     f"{s['best_cosine_lr']:.3g})\n")
        head = " | ".join(f"r@{lr:.2g}" for lr in lrs)
        lines.append(f"| arm | robust width | median r | NaN runs | {head} |")
        lines.append("|---|---|---|---|" + "---|" * len(lrs))
        for arm, a in s["arms"].items():
            cells = " | ".join(_r(x) for x in a["regret"])
            lines.append(f"| {arm} | {a['robust_width']}/{len(lrs)} | {_r(a['median_r'])} | "
                         f"{a['nan_runs']}/{a['runs']} | {cells} |")
        lines.append("")
    return "\n".join(lines)


def recovery_tables(result: dict[str, Any]) -> str:
    lines = ["| task | arm | fault | success | finite | worst final ratio | "
             "worst recovery steps |", "|---|---|---|---|---|---|---|"]
    for row in result["summary"]:
        rec = row["worst_recovery_steps"]
        lines.append(f"| {row['task']} | {row['arm']} | {row['fault']} | "
                     f"{row['success']}/{row['seeds']} | {row['finite']}/{row['seeds']} | "
                     f"{_r(row['worst_final_ratio'])} | {'never' if rec is None else rec} |")
    fb = result["false_backoffs"]
    lines.append("")
    lines.append(f"False back-offs on clean steps (lrctl): {fb['backoffs']} in {fb['steps']} steps "
                 f"= {fb['per_10k']:.2f} per 10 000 ({fb['backoffs_outside_sweep']} outside the "
                 f"range-test sweep = {fb['per_10k_outside_sweep']:.2f} per 10 000).")
    return "\n".join(lines)


def plot_regret(result: dict[str, Any], path: Path) -> Path:
    """r against starting LR, one panel per task, one line per arm (∞ drawn at the top)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary, lrs = result["summary"], result["config"]["lrs"]
    fig, axes = plt.subplots(1, len(summary), figsize=(5.5 * len(summary), 4.2), squeeze=False)
    cap = 3.0
    for ax, (task, s) in zip(axes[0], summary.items(), strict=True):
        for arm, a in s["arms"].items():
            ys = [min(r, cap) if math.isfinite(r) else cap for r in a["regret"]]
            ax.plot(lrs, ys, marker="o", label=arm, linewidth=2.5 if arm == "lrctl" else 1.2)
        ax.axhline(1.05, color="grey", linestyle="--", linewidth=0.8)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_ylim(0.9, cap * 1.05)
        ax.set_xlabel("starting LR")
        ax.set_ylabel("regret r (final val / best cosine), capped at 3")
        ax.set_title(task)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
