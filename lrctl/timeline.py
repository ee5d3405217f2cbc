"""The timeline picture of a run: loss, grad norm and LR per group, decisions marked.

Drawn from the run's journal (not from memory), so it covers the whole run
across controller restarts. A WSD policy's phases are shaded on the LR axis
(warmup, cooldown; the stable phase is what lies between) and an early stop is
a black dashed line; the journal is streamed through bounded
downsamplers, so a week-long run costs the same memory as a short one.
matplotlib is imported only when a picture is drawn, with the Agg backend and
without pyplot, so drawing from a worker thread touches no global GUI state.
"""

from __future__ import annotations

import itertools
import math
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .policy._base import float_from_json
from .policy._decision import record_ratio as decision_ratio
from .sinks.journal import RunPaths, read_json, read_lines
from .sinks.sampling import GRAD_NORM, LOSS, Downsampler

__all__ = ["Phase", "TimelineData", "load_timeline", "phase_spans", "render", "render_run"]

MAX_POINTS = 4000
MAX_MARKS = 400
MAX_LABELS = 12
_LR = re.compile(r"^lrctl/lr/g(\d+)$")
_PHASE_ACTIONS = frozenset({"warmup_done", "decay_start", "decay_cancel", "decay_done"})
MAX_PHASE_EVENTS = 1000
_BOTTOM = 0.06  # the axes' bottom edge, as a share of the figure's height, at least
_MARGIN = 0.01  # below the longest decision label


@dataclass(frozen=True)
class Phase:
    """A shaded stretch of the LR axis: ``label`` from step ``start`` to ``end``."""

    label: str
    start: int
    end: int


@dataclass
class TimelineData:
    title: str
    loss: Downsampler = field(default_factory=lambda: Downsampler(MAX_POINTS))
    grad_norm: Downsampler = field(default_factory=lambda: Downsampler(MAX_POINTS))
    lrs: dict[int, Downsampler] = field(default_factory=dict)
    decisions: list[dict[str, Any]] = field(default_factory=list)  # at most MAX_MARKS
    decision_count: int = 0
    #: WSD phase events and stops, kept apart from the thinned marks (few per run).
    phase_events: list[dict[str, Any]] = field(default_factory=list)
    last_step: int = 0


def load_timeline(run_dir: str | os.PathLike[str],
                  prior_decisions: Iterable[dict[str, Any]] = (),
                  prior_points: Iterable[tuple[str, float, int]] = ()) -> TimelineData:
    """Stream a run's journal into bounded series. ``prior_decisions`` and
    ``prior_points`` (``(metric key, value, step)``) come before it: what the run's
    MLflow run holds from before this journal (a run continued from another controller's
    state directory)."""
    paths = RunPaths(Path(run_dir))
    meta = read_json(paths.meta, {}) or {}
    data = TimelineData(title=f"{meta.get('run_name') or paths.run_key}  "
                              f"({meta.get('policy_source', '')})")
    for key, value, step in prior_points:
        _add_point(data, key, value, step)
    for line in read_lines(paths.stream("metrics")):
        if isinstance(line.record.get("rewind"), int):  # a resume undid the later steps
            _drop_after(data, line.record["rewind"])
        for key, value, step in line.record["points"]:
            _add_point(data, key, float_from_json(value), step)
    stride = 1
    for record in itertools.chain(prior_decisions, (
            line.record for line in read_lines(paths.stream("decisions")))):
        data.last_step = max(data.last_step, int(record.get("step", 0)))
        action = record.get("action")
        phase = (record.get("kind") == "wsd" and action in _PHASE_ACTIONS) or action == "stop"
        if phase and len(data.phase_events) < MAX_PHASE_EVENTS:
            data.phase_events.append(record)
        data.decision_count += 1
        if (data.decision_count - 1) % stride == 0:
            data.decisions.append(record)
            if len(data.decisions) > MAX_MARKS:
                data.decisions = data.decisions[::2]
                stride *= 2
    return data


def _drop_after(data: TimelineData, step: int) -> None:
    for series in (data.loss, data.grad_norm, *data.lrs.values()):
        series.drop_after(step)


def _add_point(data: TimelineData, key: str, value: float, step: int) -> None:
    if key == LOSS:
        data.loss.add(step, value)
    elif key == GRAD_NORM:
        data.grad_norm.add(step, value)
    elif m := _LR.match(key):
        data.lrs.setdefault(int(m.group(1)), Downsampler(MAX_POINTS)).add(step, value)


def phase_spans(events: list[dict[str, Any]], last_step: int) -> list[Phase]:
    """The warmup and cooldown stretches that a WSD policy's decisions mark.

    A decision at step ``t`` takes effect from step ``t + 1``: a warmup ends at
    ``warmup_done``'s step + 1; a cooldown runs from ``decay_start``'s step + 1 to
    the step after its ``decay_done`` or ``decay_cancel`` (a new ``decay_start``
    restarts it), or to ``last_step`` while it is still under way.
    """
    spans: list[Phase] = []
    open_at: tuple[int, str] | None = None
    for rec in events:
        step, action = int(rec.get("step", 0)) + 1, rec.get("action")
        if rec.get("kind") != "wsd":
            continue
        if action == "warmup_done":
            spans.append(Phase("warmup", 0, step))
        elif action == "decay_start":
            if open_at is not None:
                spans.append(Phase(open_at[1], open_at[0], step))
            source = (rec.get("evidence") or {}).get("source", "")
            open_at = (step, f"cooldown ({source})" if source else "cooldown")
        elif action in ("decay_done", "decay_cancel") and open_at is not None:
            label = open_at[1] + (", cancelled" if action == "decay_cancel" else "")
            spans.append(Phase(label, open_at[0], step))
            open_at = None
    if open_at is not None:
        spans.append(Phase(open_at[1], open_at[0], max(last_step + 1, open_at[0])))
    return spans


def render_run(run_dir: str | os.PathLike[str], out: str | os.PathLike[str],
               private: bool = False, prior_decisions: Iterable[dict[str, Any]] = (),
               prior_points: Iterable[tuple[str, float, int]] = ()) -> Path:
    return render(load_timeline(run_dir, prior_decisions, prior_points), out, private)


def render(data: TimelineData, out: str | os.PathLike[str], private: bool = False) -> Path:
    """Write the picture to ``out`` (PNG) and return its path. ``private``: a file in a
    run's own directory, written 0600 and never through a symlink (as its journal)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    # Fixed margins, not a layout engine: "constrained" measures every tick label in
    # extra drawing passes, which doubled the cost of a picture (the MLflow shipper
    # draws one per run). Only the decision labels, which run down past the LR axis,
    # are measured, to make room for them (_fit_labels).
    fig = Figure(figsize=(13, 9), dpi=100)
    canvas = FigureCanvasAgg(fig)
    ax_loss, ax_gn, ax_lr = fig.subplots(3, 1, sharex=True,
                                         gridspec_kw={"height_ratios": [2, 1, 2]})
    fig.subplots_adjust(left=0.075, right=0.985, bottom=_BOTTOM, top=0.92, hspace=0.06)
    _series(ax_loss, data.loss, "loss", "tab:blue")
    _series(ax_gn, data.grad_norm, "grad norm", "tab:orange")
    for g, series in sorted(data.lrs.items()):
        xs, ys = series.points()
        ax_lr.step(xs, ys, where="post", label=f"group {g}")
    ax_lr.set_ylabel("learning rate")
    ax_lr.set_xlabel("step")
    if _positive_span(data.lrs.values()) > 100:
        ax_lr.set_yscale("log")
    if data.lrs:
        ax_lr.legend(loc="upper right", fontsize="small")
    labels = _marks(data, (ax_loss, ax_gn, ax_lr))
    _phases(data, ax_lr, (ax_loss, ax_gn, ax_lr))
    _fit_labels(fig, ax_lr, labels, canvas.get_renderer())
    shown = f", {len(data.decisions)} marked" if len(data.decisions) < data.decision_count else ""
    fig.suptitle(f"{data.title}\n{data.decision_count} decisions{shown}", fontsize="medium")
    out = Path(out)
    if private:
        from .paths import open_private

        with os.fdopen(open_private(out, os.O_WRONLY | os.O_TRUNC), "wb") as f:
            fig.savefig(f, format="png")
    else:
        fig.savefig(out, format="png")
    return out


def _series(ax: Any, series: Downsampler, label: str, color: str) -> None:
    xs, ys = series.points()
    finite = [(x, y) for x, y in zip(xs, ys, strict=True) if math.isfinite(y)]
    if finite:
        ax.plot([x for x, _ in finite], [y for _, y in finite], color=color, lw=0.8)
        if min(y for _, y in finite) > 0 and _span([y for _, y in finite]) > 100:
            ax.set_yscale("log")
    bad = [x for x, y in zip(xs, ys, strict=True) if not math.isfinite(y)]
    if bad:  # along the axis' foot (x in data, y in axes units): y = 0 is off a log axis
        ax.plot(bad, [0.02] * len(bad), "x", color="red", label="non-finite",
                transform=ax.get_xaxis_transform(), clip_on=False)
        ax.legend(loc="upper right", fontsize="small")
    ax.set_ylabel(label)
    ax.grid(alpha=0.3)


def _fit_labels(fig: Any, ax_lr: Any, labels: list[Any], renderer: Any) -> None:
    """Raise the axes' bottom edge so that the longest decision label, which hangs
    down from the top of the LR axis, ends inside the figure."""
    if not labels:
        return
    height = fig.bbox.height
    longest = max(label.get_window_extent(renderer).height for label in labels) / height
    top = fig.subplotpars.top
    lr_top = ax_lr.get_position().y1
    share = (lr_top - _BOTTOM) / (top - _BOTTOM)  # where the LR axis ends, as a share
    need = _MARGIN + longest  # lr_top must be this high
    if lr_top < need:
        # lr_top = bottom + (top - bottom) * share, solved for bottom
        fig.subplots_adjust(bottom=min(0.5, (need - top * share) / (1 - share)))


def _marks(data: TimelineData, axes: tuple[Any, ...]) -> list[Any]:
    """A vertical line per decision (red: LR down, green: up, grey: neither); the
    reasons of up to MAX_LABELS of them, evenly chosen, written on the LR axis.
    ``skip`` decisions get a faint line and no label: they come with a back-off (or
    in a burst) at the same steps, and their labels would hide the back-off's."""
    if not data.decisions:
        return []
    labelled = [rec for rec in data.decisions if rec.get("action") != "skip"]
    every = max(1, math.ceil(len(labelled) / MAX_LABELS))
    ax_lr = axes[-1]
    for rec in data.decisions:
        ratio = decision_ratio(rec)
        color = "tab:red" if ratio < 1 else "tab:green" if ratio > 1 else "tab:gray"
        alpha = 0.2 if rec.get("action") == "skip" else 0.6
        for ax in axes:
            ax.axvline(rec.get("step", 0), color=color, lw=0.7, alpha=alpha)
    labels = []
    for i, rec in enumerate(labelled):
        if i % every:
            continue
        ratio = decision_ratio(rec)
        color = "tab:red" if ratio < 1 else "tab:green" if ratio > 1 else "tab:gray"
        step = rec.get("step", 0)
        label = f"{step}: {rec.get('policy')} {rec.get('action')} - {rec.get('reason', '')}"
        labels.append(ax_lr.annotate(
            label[:90], xy=(step, 1.0), xycoords=("data", "axes fraction"), rotation=90,
            va="top", ha="right", fontsize=6.5, color=color))
    return labels


def _phases(data: TimelineData, ax_lr: Any, axes: tuple[Any, ...]) -> None:
    """WSD phases shaded and named on the LR axis; early stops as black dashed lines."""
    colors = {"warmup": "tab:olive"}
    for phase in phase_spans(data.phase_events, data.last_step):
        color = colors.get(phase.label, "tab:purple")
        ax_lr.axvspan(phase.start, phase.end, color=color, alpha=0.12, lw=0)
        ax_lr.annotate(phase.label, xy=(phase.start, 0.02), xycoords=("data", "axes fraction"),
                       fontsize=7, color=color)
    for rec in data.phase_events:
        if rec.get("action") == "stop":
            for ax in axes:
                ax.axvline(rec.get("step", 0), color="black", lw=1.0, ls="--", alpha=0.8)


def _span(values: list[float]) -> float:
    pos = [v for v in values if v > 0]
    return max(pos) / min(pos) if pos else 1.0


def _positive_span(series: Any) -> float:
    values: list[float] = []
    for s in series:
        values.extend(s.points()[1])
    return _span(values)
