"""One open run of the audit sink, and what its journal already holds when it reopens."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .base import RunInfo
from .journal import (
    RunPaths,
    StreamWriter,
    atomic_write_text,
    last_line,
    read_lines,
    tail_records,
)
from .sampling import LR_PREFIX, MetricSampler

__all__ = ["DedupKey", "OpenRun", "current_policy", "dedup_key", "load_high_water",
           "save_policy"]


@dataclass
class OpenRun:
    paths: RunPaths
    writers: dict[str, StreamWriter]
    sampler: MetricSampler
    policy_sha256: str
    policy_version: int
    last_step: int | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    # What the journal already holds: after a controller crash the hook replays the
    # observations since the last checkpoint, and the engine re-makes their decisions.
    journaled_step: int = -1
    journaled_at_step: set[DedupKey] = field(default_factory=set)
    # Decisions handed to the journal at ``decided_step`` so far (journaled or not): the
    # next one's place among them (see :func:`dedup_key`).
    decided_step: int = -1
    decided_at_step: int = 0
    policy_texts: dict[str, str] = field(default_factory=dict)  # sha256 -> text, if deleted
    # A journal this life began (none before it): the only kind a discard may remove.
    fresh: bool = False
    # Resumed from an earlier checkpoint: the step its next metrics line says it went
    # back to ("rewind"), so that readers of the journal drop the undone steps' points.
    rewound_to: int | None = None
    # The time (ms) of its latest metrics line (a correction's is later: see AuditSink).
    metrics_ts: int = 0


def load_high_water(run: OpenRun) -> None:
    """Where the journal of a restored run ends: its last decision step and metric step."""
    placed = 0  # records at journaled_step so far
    for line in read_lines(run.paths.stream("decisions")):
        step = int(line.record.get("step", -1))
        if step > run.journaled_step:
            run.journaled_step, run.journaled_at_step, placed = step, set(), 0
        if step == run.journaled_step:
            run.journaled_at_step.add(dedup_key(line.record, placed))
            placed += 1
    last = last_line(run.paths.stream("metrics"))
    steps = [point[2] for point in (last.record.get("points") or [])] if last else []
    if steps:
        run.last_step = max(int(s) for s in steps)
    seed_sampler(run)


def seed_sampler(run: OpenRun) -> None:
    """A reopened run's sampler starts from the LRs its journal logged last, so that its
    first change is drawn as a step, not as a ramp from that point (the journal's tail
    holds them: periodic points, see sampling.periodic_step; none there, no seed)."""
    last: dict[int, tuple[int, float]] = {}  # group -> (step, value) of its last point
    logged = redo_until = -1  # the newest step with points; undone steps still to redo
    for record in tail_records(run.paths.stream("metrics")):
        rewind = record.get("rewind")
        if isinstance(rewind, int) and not isinstance(rewind, bool):
            # A resume undid the steps after ``rewind``: their points do not stand, and
            # those of them not yet observed again still want a later point each (a
            # restart inside that range must not end the redo: see MetricSampler.rewind).
            redo_until = max(redo_until, logged)
            last = {g: sv for g, sv in last.items() if sv[0] <= rewind}
        for point in record.get("points") or ():
            if isinstance(point, list) and len(point) == 3 and isinstance(point[2], int):
                logged = max(logged, point[2])
            if (isinstance(point, list) and len(point) == 3 and isinstance(point[0], str)
                    and point[0].startswith(LR_PREFIX) and isinstance(point[2], int)
                    and isinstance(point[1], (int, float))):
                group = point[0][len(LR_PREFIX):]
                if group.isdigit() and point[2] >= last.get(int(group), (-1, 0.0))[0]:
                    last[int(group)] = (point[2], float(point[1]))
    if last and sorted(last) == list(range(len(last))):
        step = max(s for s, _ in last.values())
        run.sampler.seed(step, [last[g][1] for g in range(len(last))], redo_until)
    elif redo_until >= 0:
        run.sampler.rewind(redo_until)


def current_policy(paths: RunPaths) -> tuple[str, int, str | None]:
    """(sha256, version) of the policy the run's events end with, and the kind of its
    last event; ("", 0, None) for a new run."""
    sha, version, last = "", 0, None
    for line in read_lines(paths.stream("events")):
        last = line.record.get("event")
        if last == "policy":
            sha = str(line.record.get("policy_sha256", ""))
            version = int(line.record.get("policy_version", version))
    return sha, version, last if isinstance(last, str) else None


DedupKey = tuple[str, str, str, tuple[str, ...], int]


def dedup_key(record: Mapping[str, Any], place: int) -> DedupKey:
    """What makes a decision distinct within its step, ``place`` its place among the
    step's decisions. A controller restarted re-makes the decisions of the observations
    its hook replays, the same records in the same order, so those of the journal's last
    step match, and are not journaled twice. Anything else is another decision: several
    reloads between two observations (their new sha tells them apart), or operator
    actions (a ``set-lr`` of 0.05 then of 0.02, a pause, a resume and a pause again: their
    LRs or places do; before, each after the first was dropped as its replay)."""
    evidence = record.get("evidence")
    version = str(evidence.get("new_sha256", "")) if isinstance(evidence, Mapping) else ""
    lrs = tuple(str(lr) for lr in record.get("new_lrs") or ())  # (str: as json_safe keeps them)
    return str(record.get("policy")), str(record.get("action")), version, lrs, place


def save_policy(paths: RunPaths, info: RunInfo, *, sync: bool = True) -> str:
    """Keep the policy text, content-addressed; return its file's hash."""
    digest = hashlib.sha256(info.policy_text.encode("utf-8")).hexdigest()
    path = paths.policy_file(digest)
    if not path.exists():
        atomic_write_text(path, info.policy_text, sync=sync)
    return digest
