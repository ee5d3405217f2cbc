"""One run's batches: journal lines in, MLflow entities out, cursor advanced on success.

Used by the MLflow worker thread only (mlflow is already importable there).
Every call may raise; the caller backs off and calls again, and because the
cursor moves only after a batch is fully acknowledged, the retry re-sends the
same entities, which MLflow deduplicates.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator, Sequence
from typing import Any

from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException

from ..policy._base import float_from_json
from ._ship_state import RunState
from .journal import JournalLine
from .mlflow_sink import (
    MAX_METRICS_PER_BATCH,
    MAX_PARAMS_TAGS_PER_BATCH,
    MAX_TAG_CHARS,
    decision_ratio,
)
from .sampling import DECISION

__all__ = ["RunShipper"]

log = logging.getLogger("lrctl.sinks.mlflow")

_TAG_ROOM = 8  # tags of a batch count towards MLflow's 1 000 entities
_BAD_PARAM_CHARS = re.compile(r"[^A-Za-z0-9_\-. /:]")


class RunShipper:
    """Sends one run's pending journal lines to MLflow, one batch per call."""

    def __init__(self, client: Any, state: RunState, *, timeline: bool) -> None:
        self.client = client
        self.st = state
        self.timeline = timeline

    @property
    def run_id(self) -> str:
        return str(self.st.cursor["run_id"])

    def ensure_run(self) -> None:
        """Find or create the MLflow run once, and remember it in the cursor.

        A run lrctl creates is tagged with its run key and looked up by that tag
        first, so a crash between ``create_run`` and saving the cursor cannot
        leave two MLflow runs for one training run.
        """
        if self.st.cursor.get("run_id"):
            return
        target = self.st.meta.get("mlflow") or {}
        key = self.st.paths.run_key
        if target.get("run_id"):
            self.client.get_run(target["run_id"])  # fails clearly if it does not exist
            self.st.cursor.update(run_id=target["run_id"], created=False)
        else:
            exp_id = self._experiment_id(target.get("experiment", "lrctl"),
                                         target.get("artifact_root"))
            found = self.client.search_runs([exp_id], f"tags.`lrctl.run_key` = '{key}'",
                                            max_results=1)
            if found:
                run_id = found[0].info.run_id
            else:
                run = self.client.create_run(exp_id, tags={"lrctl.run_key": key},
                                             run_name=target.get("run_name") or key)
                run_id = run.info.run_id
            self.st.cursor.update(run_id=run_id, created=True, experiment_id=exp_id)
        self.st.save()

    def _experiment_id(self, name: str, artifact_root: str | None) -> str:
        exp = self.client.get_experiment_by_name(name)
        if exp is not None:
            return str(exp.experiment_id)
        try:
            return str(self.client.create_experiment(name, artifact_location=artifact_root))
        except MlflowException:
            exp = self.client.get_experiment_by_name(name)  # another worker won the race
            if exp is None:
                raise
            return str(exp.experiment_id)

    # -- one batch ---------------------------------------------------------------------
    def ship_once(self) -> bool:
        """Send the next batch and advance the cursor; False when nothing was pending."""
        st = self.st
        metrics: list[Metric] = []
        budget = MAX_METRICS_PER_BATCH - _TAG_ROOM
        decisions: list[JournalLine] = []
        last_ts = int(st.cursor["decision_ts"])
        for line in st.streams["decisions"].pending:
            if len(metrics) >= budget:
                break
            rec = line.record
            # Unique per run, so two decisions in one millisecond stay two points.
            last_ts = max(int(float(rec.get("wall_time", 0.0)) * 1000), last_ts + 1)
            metrics.append(Metric(DECISION, decision_ratio(rec), last_ts, int(rec["step"])))
            decisions.append(line)
        points: list[JournalLine] = []
        for line in st.streams["metrics"].pending:
            pts = line.record["points"]
            if metrics and len(metrics) + len(pts) > budget:
                break
            ts = int(line.record["ts"])
            metrics.extend(Metric(k, float_from_json(v), ts, int(s)) for k, v, s in pts)
            points.append(line)
        events = self._ready_events(decisions, points)
        if not (metrics or events):
            return False

        tags: dict[str, str] = {}
        if decisions:
            last = decisions[-1].record
            tags["lrctl.decisions"] = str(decisions[-1].seq)
            tags["lrctl.last_decision"] = _summary(last)
        if not st.cursor.get("tagged"):
            tags["lrctl.run_key"] = st.paths.run_key
        for chunk in _chunks(metrics, MAX_METRICS_PER_BATCH):
            self.client.log_batch(self.run_id, metrics=chunk)
        if tags:
            self.client.log_batch(self.run_id, tags=[RunTag(k, v) for k, v in tags.items()])
        if decisions:
            self._upload_prefix("decisions", decisions[-1].end, "lrctl/decisions.jsonl")
        for line in events:
            if line.record.get("event") == "end":
                self._finish()
            else:
                self._policy(line.record)
        if events:
            self._upload_prefix("events", events[-1].end, "lrctl/policy_events.jsonl")

        st.ack("decisions", decisions)
        st.ack("metrics", points)
        st.ack("events", events)
        st.cursor["decision_ts"] = last_ts
        st.cursor["tagged"] = True
        st.save()
        return True

    def _ready_events(self, decisions: Sequence[JournalLine],
                      points: Sequence[JournalLine]) -> list[JournalLine]:
        """Events to send now: all up to an ``end``, which waits until nothing else is left."""
        out: list[JournalLine] = []
        rest_empty = all(
            not s.behind and len(s.pending) == len(taken)
            for s, taken in ((self.st.streams["decisions"], decisions),
                             (self.st.streams["metrics"], points)))
        for line in self.st.streams["events"].pending:
            if line.record.get("event") == "end" and not rest_empty:
                break
            out.append(line)
            if line.record.get("event") == "end" or len(out) >= MAX_PARAMS_TAGS_PER_BATCH // 4:
                break
        return out

    def _policy(self, rec: dict[str, Any]) -> None:
        sha = str(rec.get("policy_sha256", ""))
        version = int(rec.get("policy_version", 1))
        try:
            text = self.st.paths.policy_file(str(rec.get("policy_file", sha))).read_text(
                encoding="utf-8")
        except (OSError, ValueError):
            text = None
        if text is not None:
            self.client.log_text(self.run_id, text, "lrctl/policy.yaml")
            self.client.log_text(self.run_id, text, f"lrctl/policies/v{version}-{sha[:12]}.yaml")
        tags = {"lrctl.policy_sha256": sha, "lrctl.policy": str(rec.get("policy_source", "")),
                "lrctl.policy_version": str(version)}
        self.client.log_batch(self.run_id,
                              tags=[RunTag(k, v[:MAX_TAG_CHARS]) for k, v in tags.items()])
        self._params(rec.get("params") or {})

    def _params(self, params: dict[str, Any]) -> None:
        """Knobs as params. MLflow params cannot change, so a reload that changes a knob
        keeps the first value as the param; every version is in the policy artifacts."""
        logged: dict[str, str] = self.st.cursor["params"]
        new = {}
        for k, v in params.items():
            key = _param_key(str(k))
            if key not in logged:
                new[key] = str(v)
        for chunk in _chunks(list(new.items()), MAX_PARAMS_TAGS_PER_BATCH):
            try:
                self.client.log_batch(self.run_id, params=[Param(k, v) for k, v in chunk])
            except MlflowException as exc:
                if exc.error_code != "INVALID_PARAMETER_VALUE":
                    raise
                log.warning("lrctl: run %s: params not logged: %s", self.st.paths.run_key, exc)
        logged.update(new)

    def _finish(self) -> None:
        if self.timeline:
            png = self.st.paths.root / "timeline.png"
            try:
                from ..timeline import render_run

                render_run(self.st.paths.root, png)
            except Exception as exc:  # a picture must not block the audit trail
                log.warning("lrctl: run %s: timeline not drawn: %s", self.st.paths.run_key, exc)
            else:
                self.client.log_artifact(self.run_id, str(png), "lrctl")
        if self.st.cursor.get("created"):
            self.client.set_terminated(self.run_id, "FINISHED")
        self.st.cursor["finished"] = True

    def _upload_prefix(self, stream: str, end: int, artifact_file: str) -> None:
        """Upload the stream's first ``end`` bytes: everything acknowledged, whole, once more."""
        with open(self.st.paths.stream(stream), "rb") as f:
            data = f.read(end)
        self.client.log_text(self.run_id, data.decode("utf-8"), artifact_file)


def _summary(rec: dict[str, Any]) -> str:
    ratio = decision_ratio(rec)
    text = (f"step {rec.get('step')}: {rec.get('policy')} {rec.get('action')} "
            f"x{ratio:.4g} - {rec.get('reason', '')}")
    return text[:MAX_TAG_CHARS]


def _param_key(key: str) -> str:
    key = key if key.startswith("lrctl") else f"lrctl.{key}"
    return _BAD_PARAM_CHARS.sub("_", key)[:250]


def _chunks(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for i in range(0, len(items), size):
        yield items[i:i + size]
