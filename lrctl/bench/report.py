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

__all__ = ["machine", "plot_regret", "provenance", "provenance_line", "quality_tables",
           "recovery_tables"]


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


def provenance(command_line: list[str] | None = None) -> dict[str, Any]:
    """What produced a result: the git commit of the code (and whether its tree had
    uncommitted changes, untracked files included), the command line and the time."""
    import shlex
    import subprocess
    import sys

    root = Path(__file__).resolve().parent.parent.parent
    commit, dirty = "unknown", None

    def git(*a: str) -> str:
        return subprocess.run(["git", "-C", str(root), *a], capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain"))
    except (OSError, subprocess.SubprocessError):
        pass
    shown = list(command_line) if command_line else ["lrctl", *sys.argv[1:]]
    return {"commit": commit, "dirty": dirty, "command": shlex.join(shown),
            "sys_argv": list(sys.argv),
            "datetime": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}


def provenance_line(p: dict[str, Any]) -> str:
    tree = {True: " (uncommitted changes)", False: "", None: ""}[p["dirty"]]
    return f"Command `{p['command']}` at commit `{p['commit'][:12]}`{tree}, {p['datetime']}."


def machine_line(info: dict[str, Any]) -> str:
    return (f"{info['date']}, {info['cpu']}, {info['cores']} cores "
            f"({info['torch_threads']} torch thread), Python {info['python']}, "
            f"torch {info['torch']}")


def _r(x: float) -> str:
    return f"{x:.3f}" if math.isfinite(x) else "∞"


_SPLIT_TITLE = {"heldout": "Held-out tasks", "tuning": "Tuning tasks"}
_SPLIT_NAME = {"heldout": "held-out", "tuning": "tuning"}
_OPT = {"adamw": "AdamW", "adam": "Adam", "sgdm": "SGD+momentum 0.9"}


def _fb(fb: dict[str, Any] | None) -> str:
    return "—" if fb is None else f"{fb['per_10k']:.2f} ({fb['count']})"


def _opt(x: Any) -> str:
    return "—" if x is None else f"{x:g}"


def quality_tables(result: dict[str, Any]) -> str:
    """The split aggregates (held-out first), the task list, then one table per task."""
    cfg, summary = result["config"], result["summary"]
    lrs, n = cfg["lrs"], len(cfg["lrs"])
    info = cfg.get("task_info", {})
    splits = result.get("splits", {})
    lines = [
        f"Split: **{cfg.get('split', 'all')}**; {len(summary)} tasks, {n} starting LRs "
        f"({lrs[0]:.2g} … {lrs[-1]:.2g}), {_n(len(cfg['seeds']), 'seed')}, arms "
        f"{', '.join(cfg['arms'])}. Regret r = seed-mean final validation loss ÷ the best "
        "seed-mean of `cosine` over the grid (grid-tuned cosine); robust width = starting "
        "LRs with r ≤ 1.05; harm = starting LRs where the seed-median final validation loss "
        "is more than 5 % worse than `fixed`'s at the same LR (a diverged run is infinitely "
        "bad); false back-offs = backoff/rollback/stop decisions of a policy arm per 10 000 "
        "steps of these fault-free runs (count in brackets).",
        ""]
    files = cfg.get("policy_files", {})
    if files:
        lines += ["Policy arms: " + "; ".join(
            f"`{arm}` = `{f['path']}` (sha256 `{f['sha256'][:12]}`)" for arm, f in files.items())
            + ".", ""]
    for split, agg in splits.items():
        title = _SPLIT_TITLE.get(split, f"{split} tasks")
        lines.append(f"#### {title} ({len(agg['tasks'])}): {', '.join(agg['tasks'])}\n")
        lines.append("| arm | median robust width | median of median r | harm, total | "
                     "tasks with harm 0 | max harm on a task | NaN runs | "
                     "false back-offs /10k |")
        lines.append("|---|---|---|---|---|---|---|---|")
        for arm, a in agg["arms"].items():
            zero = "—" if a["tasks_harm_0"] is None else f"{a['tasks_harm_0']}/{a['tasks']}"
            lines.append(f"| {arm} | {a['median_robust_width']:g}/{n} | "
                         f"{_r(a['median_median_r'])} | {_opt(a['harm_total'])} | {zero} | "
                         f"{_opt(a['harm_max'])} | {a['nan_runs']}/{a['runs']} | "
                         f"{_fb(a['false_backoffs'])} |")
        lines.append("")
        lines += _early_stop_table(agg["arms"])
    if info:
        lines.append("#### Tasks\n")
        lines.append("| task | split | kind | optimizer | batch | steps | best cosine: val @ LR |")
        lines.append("|---|---|---|---|---|---|---|")
        for task, s in _by_split(summary):
            t = info[task]
            edge = " (grid edge)" if s.get("best_at_edge") else ""
            lines.append(f"| {task} | {_SPLIT_NAME.get(t['split'], t['split'])} | {t['kind']} | "
                         f"{_OPT.get(t['optimizer'], t['optimizer'])} | {t['batch_size']} | "
                         f"{cfg['steps'][task]} | {_best(s)}{edge} |")
        lines.append("")
    for task, s in _by_split(summary):
        t = info.get(task, {})
        split = s.get("split", t.get("split", ""))
        where = (f"{_SPLIT_NAME.get(split, split)}; "
                 f"{_OPT.get(t.get('optimizer', ''), t.get('optimizer', ''))}, "
                 f"batch {t.get('batch_size', '?')}; " if t else "")
        lines.append(f"**{task}** ({where}{cfg['steps'][task]} steps, "
                     f"{_n(len(cfg['seeds']), 'seed')}; best cosine: {_best(s)})\n")
        head = " | ".join(f"r@{lr:.2g}" for lr in lrs)
        lines.append(f"| arm | robust width | median r | harm | NaN runs | "
                     f"false back-offs /10k | {head} |")
        lines.append("|---|---|---|---|---|---|" + "---|" * n)
        for arm, a in s["arms"].items():
            cells = " | ".join(_r(x) for x in a["regret"])
            lines.append(f"| {arm} | {a['robust_width']}/{n} | {_r(a['median_r'])} | "
                         f"{_opt(a.get('harm'))} | {a['nan_runs']}/{a['runs']} | "
                         f"{_fb(a.get('false_backoffs'))} | {cells} |")
        lines.append("")
    return "\n".join(lines)


def _early_stop_table(arms: dict[str, Any]) -> list[str]:
    """Steps saved by early stops, at equal final validation loss, per arm that stopped."""
    rows = {arm: a for arm, a in arms.items() if (a.get("early_stops") or {}).get("stopped")}
    if not rows:
        return []
    lines = ["Early stopping: steps saved at equal final validation loss (a stop whose "
             "validation loss is within 5 % of the same run's trained to the end).\n",
             "| arm | runs stopped | steps saved | at equal final val | stops that cost "
             "more |", "|---|---|---|---|---|"]
    for arm, a in rows.items():
        e = a["early_stops"]
        total = e["steps"] or 1
        lines.append(f"| {arm} | {e['stopped']}/{a['runs']} | {e['saved'] / total:.1%} | "
                     f"{e['saved_equal'] / total:.1%} | {e['worse']} |")
    return [*lines, ""]


def _n(k: int, word: str) -> str:
    return f"{k} {word}{'' if k == 1 else 's'}"


def _best(s: dict[str, Any]) -> str:
    if s["best_cosine_lr"] is None:
        return "none (every cosine cell diverged)"
    return f"val {s['best_cosine_val']:.4f} at LR {s['best_cosine_lr']:.3g}"


def _by_split(summary: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """Tasks held-out first, then tuning, each in declaration order."""
    rank = {"heldout": 0, "tuning": 1}
    return sorted(summary.items(), key=lambda kv: rank.get(kv[1].get("split", ""), 2))


def recovery_tables(result: dict[str, Any]) -> str:
    lines = ["| task | arm | fault | success | finite | worst final ratio | "
             "worst recovery steps |", "|---|---|---|---|---|---|---|"]
    for row in result["summary"]:
        rec = row["worst_recovery_steps"]
        lines.append(f"| {row['task']} | {row['arm']} | {row['fault']} | "
                     f"{row['success']}/{row['seeds']} | {row['finite']}/{row['seeds']} | "
                     f"{_r(row['worst_final_ratio'])} | {'never' if rec is None else rec} |")
    close = result.get("within_5pct")
    if close:
        faults = list(dict.fromkeys(r["fault"] for r in close))
        lines += ["", "Runs ending within 5 % of the clean run's final loss (every task and seed):",
                  "", "| arm | " + " | ".join(faults) + " |", "|---" * (len(faults) + 1) + "|"]
        for arm in dict.fromkeys(r["arm"] for r in close):
            cells = {r["fault"]: f"{r['within']}/{r['runs']}" for r in close if r["arm"] == arm}
            lines.append(f"| {arm} | " + " | ".join(cells.get(f, "") for f in faults) + " |")
    fb = result["false_backoffs"]
    lines.append("")
    lines.append(f"False back-offs on clean steps (lrctl): {fb['backoffs']} in {fb['steps']} steps "
                 f"= {fb['per_10k']:.2f} per 10 000 ({fb['backoffs_outside_sweep']} outside the "
                 f"range-test sweep = {fb['per_10k_outside_sweep']:.2f} per 10 000).")
    return "\n".join(lines)


def plot_regret(result: dict[str, Any], path: Path) -> Path:
    """r against starting LR, one panel per task (held-out first), one line per arm (∞ drawn
    at the top); policy arms solid, reference arms dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary, lrs = result["summary"], result["config"]["lrs"]
    items = _by_split(summary)
    cols = min(4, len(items))
    rows = math.ceil(len(items) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.6 * rows), squeeze=False)
    cap = 3.0
    arms = list(next(iter(summary.values()))["arms"]) if summary else []
    colors = plt.get_cmap("tab20" if len(arms) > 10 else "tab10")
    for k, (task, s) in enumerate(items):
        ax = axes[k // cols][k % cols]
        for i, (arm, a) in enumerate(s["arms"].items()):
            policy = arm == "lrctl" or arm.startswith("policy:")
            ys = [min(r, cap) if math.isfinite(r) else cap for r in a["regret"]]
            ax.plot(lrs, ys, marker="o", markersize=3, label=arm, color=colors(i),
                    linestyle="-" if policy else "--",
                    linewidth=2.4 if arm in ("lrctl", "policy:default") else 1.1)
        ax.axhline(1.05, color="grey", linestyle=":", linewidth=0.8)
        ax.set_xscale("log")
        ax.set_yscale("log")
        finite = [r for a in s["arms"].values() for r in a["regret"] if math.isfinite(r)]
        ax.set_ylim(max(1e-3, min([0.9, *(0.95 * r for r in finite)])), cap * 1.05)
        split = s.get("split", "")
        ax.set_title(f"{task} ({_SPLIT_NAME.get(split, split)})", fontsize=10)
        if k % cols == 0:
            ax.set_ylabel("r (final val / best cosine), cap 3", fontsize=8)
        if k // cols == rows - 1:
            ax.set_xlabel("starting LR", fontsize=8)
    for k in range(len(items), rows * cols):
        axes[k // cols][k % cols].axis("off")
    if items:
        handles, labels = axes[0][0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="lower center", ncol=min(6, len(labels)), fontsize=8,
                   frameon=False)
    fig.tight_layout(rect=(0, 0.04 + 0.02 * math.ceil(len(arms) / 6) / rows, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
