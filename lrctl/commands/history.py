"""``lrctl runs --all``: every run the state directory remembers, ended ones included.

A live controller forgets a run when it ends; its journal stays. This reads the
journals (so it works with no controller running) and, when a controller
answers, asks it which runs it serves: ``live`` (its hook connected) or
``detached`` (held for its hook, which is gone). A run no controller serves is
``ended`` once it said goodbye, or was evicted after ``--session-timeout`` and its
checkpoint is gone; otherwise ``detached`` (a reconnect, or the next controller,
resumes it from its checkpoint). A run that ended before its first step (a hook that
rejoined another run: ``lrctl.Scheduler``'s ``load_state_dict()``) is left out. Its
step and LRs are the controller's, else the checkpoint's (the journal's metrics are a
sample: every 50 steps, thinned in long runs). Runs served without a journal (``--no-audit``) are
listed too: live ones as the controller says, and those resumable from a checkpoint
no controller holds (``detached``).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

from ..paths import is_run_key

__all__ = ["journal_runs"]


def journal_runs(state_dir: Path, live: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """One summary per journaled or served run, oldest first: key, name, state, last step
    and LRs, decision count, last decision and MLflow run id."""
    from ..sinks.journal import (
        DISCARDED,
        JournalError,
        RunPaths,
        last_line,
        list_run_keys,
        read_json,
        tail_records,
    )

    out = []
    keys = list_run_keys(state_dir)
    for key in keys:
        paths = RunPaths.of(state_dir, key)
        meta = read_json(paths.meta, {}) or {}
        cursor = read_json(paths.cursor, {}) or {}
        try:
            last_decision = last_line(paths.stream("decisions"))
            last_event = last_line(paths.stream("events"))
        except FileNotFoundError:  # removed since it was listed (by 'lrctl prune')
            continue
        except JournalError as exc:  # one run's damage: said, the others listed
            print(f"lrctl: run {key}: its journal is damaged ({exc}); not listed",
                  file=sys.stderr)
            continue
        try:
            modified = paths.meta.stat().st_mtime
        except FileNotFoundError:  # removed since it was listed (by 'lrctl prune')
            continue
        end = last_event.record if last_event is not None else {}
        if key not in live and end.get("event") == "end" and end.get("outcome") == DISCARDED:
            continue  # ended before its first step: nothing to list (see discarded_end)
        if key in live:
            state = "live" if live[key].get("connected", True) else "detached"
            step, lrs = live[key].get("step"), list(live[key].get("lrs", []))
        else:
            if end.get("event") != "end":
                state = "detached"  # its hook went without a goodbye (or still may come)
            elif end.get("outcome") == "orphaned":  # evicted: resumable while checkpointed
                state = "detached" if _checkpoint_file(state_dir, key) else "ended"
            else:
                state = "ended"
            step, lrs = _checkpointed(state_dir, key)
            if step is None:
                try:
                    step, lrs = _sampled(tail_records(paths.stream("metrics")))
                except JournalError:
                    step, lrs = None, []
        out.append({
            "run": key, "run_name": meta.get("run_name", key), "state": state,
            "step": step, "lrs": lrs,
            "decisions": 0 if last_decision is None else int(last_decision.record["seq"]),
            "last_decision": None if last_decision is None else last_decision.record,
            "mlflow_run_id": cursor.get("run_id") or (meta.get("mlflow") or {}).get("run_id"),
            "modified": modified, "state_dir": str(state_dir),
        })
    now = time.time()
    for key, run in live.items():  # served with no journal (the controller runs --no-audit)
        if key in keys:
            continue
        out.append({
            "run": key, "run_name": run.get("run_name", key),
            "state": "live" if run.get("connected", True) else "detached",
            "step": run.get("step"), "lrs": list(run.get("lrs", [])), "decisions": None,
            "last_decision": run.get("last_decision"), "mlflow_run_id": None,
            "modified": now, "state_dir": str(state_dir),
        })
    out.extend(_checkpoint_only(state_dir, set(keys) | set(live)))
    out.sort(key=lambda r: r["modified"])
    return out


def _checkpoint_only(state_dir: Path, listed: set[str]) -> list[dict[str, Any]]:
    """Runs resumable from a checkpoint with no journal (served ``--no-audit``) and no
    controller holding them: set aside after ``--session-timeout``, or left by a
    controller that stopped. The journal-less counterpart of a ``detached`` run."""
    from ..daemon.store import DETACHED, LEGACY_SUFFIX, SUFFIX, StateStore

    runs = state_dir / "runs"
    out = []
    for folder in (runs, runs / DETACHED):
        try:
            names = sorted(os.listdir(folder))
        except OSError:
            continue
        for name in names:
            key = name.removesuffix(SUFFIX).removesuffix(LEGACY_SUFFIX)
            if key == name or key in listed or not is_run_key(key):
                continue
            path = folder / name
            try:
                state = StateStore.read_file(path)
                modified = path.stat().st_mtime
            except (OSError, ValueError) as exc:  # damaged: the controller says so too
                print(f"lrctl: run {key}: its checkpoint cannot be read ({exc}); not listed",
                      file=sys.stderr)
                continue
            listed.add(key)
            step, lrs = _checkpointed(state_dir, key)
            out.append({
                "run": key, "run_name": str(state.get("run_name") or key), "state": "detached",
                "step": step, "lrs": lrs, "decisions": None, "last_decision": None,
                "mlflow_run_id": None, "modified": modified, "state_dir": str(state_dir),
            })
    return out


def _checkpoint_file(state_dir: Path, key: str) -> Path | None:
    from ..daemon.store import checkpoint_places

    places = checkpoint_places(state_dir / "runs", key)
    return next((path for path in (*(kept for kept, _ in places), *(aside for _, aside in places))
                 if path.is_file()), None)


def _checkpointed(state_dir: Path, key: str) -> tuple[int | None, list[float]]:
    """The last step and the LRs in effect after it, as the run's checkpoint holds them
    (``None, []`` without a readable one)."""
    from ..daemon.store import StateStore

    path = _checkpoint_file(state_dir, key)
    if path is None:
        return None, []
    try:
        state = StateStore.read_file(path)
        engine = state["engine"]
        if "operator" in engine:
            op = engine["operator"]
            manual = op.get("override") or op.get("hold")
        else:  # a checkpoint from before the operator's LRs moved into the engine's state
            manual = (state.get("override") or {}).get("lrs") or state.get("hold_lrs")
        step = engine["last_step"]
        return (step if isinstance(step, int) else None), [float(x) for x in
                                                            manual or engine["lrs"]]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None, []  # damaged: the controller says so when it loads it


def _sampled(records: list[dict[str, Any]]) -> tuple[int | None, list[float]]:
    """The last step and LRs of a journal's last metrics records (samples): the LRs are
    logged at changes and every ``log_every`` steps, so the newest record may hold none
    (a short run's final loss, say)."""
    step, lrs = None, {}
    for record in records:
        rewind = record.get("rewind")
        if isinstance(rewind, int) and step is not None:  # a resume undid later steps
            step = min(step, rewind)
        for name, value, at in record.get("points", []):
            step = at if step is None else max(step, at)
            if str(name).startswith("lrctl/lr/g"):
                lrs[int(str(name).rsplit("g", 1)[1])] = value
    return step, [lrs[g] for g in sorted(lrs)]
