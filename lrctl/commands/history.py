"""``lrctl runs --all``: every run the state directory remembers, ended ones included.

A live controller forgets a run when it ends; its journal stays. This reads the
journals (so it works with no controller running) and, when a controller
answers, marks the runs it is serving as live.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["journal_runs"]


def journal_runs(state_dir: Path, live: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """One summary per journaled run, oldest first: key, name, state, last step and LRs,
    decision count, last decision and MLflow run id."""
    from ..sinks.journal import RunPaths, last_line, list_run_keys, read_json

    out = []
    for key in list_run_keys(state_dir):
        paths = RunPaths.of(state_dir, key)
        meta = read_json(paths.meta, {}) or {}
        cursor = read_json(paths.cursor, {}) or {}
        last_decision = last_line(paths.stream("decisions"))
        last_event = last_line(paths.stream("events"))
        last_metrics = last_line(paths.stream("metrics"))
        step, lrs = None, {}
        if last_metrics is not None:
            for name, value, at in last_metrics.record.get("points", []):
                step = at if step is None else max(step, at)
                if str(name).startswith("lrctl/lr/g"):
                    lrs[int(str(name).rsplit("g", 1)[1])] = value
        ended = last_event is not None and last_event.record.get("event") == "end"
        state = "live" if key in live else ("ended" if ended else "detached")
        if key in live:
            step, lrs = live[key].get("step", step), dict(enumerate(live[key].get("lrs", [])))
        out.append({
            "run": key, "run_name": meta.get("run_name", key), "state": state,
            "step": step, "lrs": [lrs[g] for g in sorted(lrs)],
            "decisions": 0 if last_decision is None else int(last_decision.record["seq"]),
            "last_decision": None if last_decision is None else last_decision.record,
            "mlflow_run_id": cursor.get("run_id") or (meta.get("mlflow") or {}).get("run_id"),
            "modified": paths.meta.stat().st_mtime, "state_dir": str(state_dir),
        })
    out.sort(key=lambda r: r["modified"])
    return out
