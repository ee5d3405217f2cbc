"""One run's batches: journal lines in, MLflow entities out, cursor advanced on success.

Per decision: the ``lrctl/decision`` metric (new/old LR, every action on one chart,
kept for compatibility) and ``lrctl/event/<action>`` (the same value on a chart of
its own per action, so a back-off or a plateau cut shows as points where it acted).
The description, the decisions table and file are :mod:`._mlflow_views`'.

Used by the MLflow worker thread only (mlflow is already importable there).
Every call may raise; the caller backs off and calls again, and because the
cursor moves only after a batch is fully acknowledged, the retry re-sends the
same entities, which MLflow deduplicates.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence
from typing import Any

from mlflow.entities import Metric, RunTag
from mlflow.exceptions import MlflowException

from ..policy._base import float_from_json
from ..policy._decision import record_ratio as decision_ratio
from ._mlflow_files import RunFiles
from ._mlflow_limits import MAX_METRICS_PER_BATCH, MAX_PARAMS_TAGS_PER_BATCH, MAX_TAG_CHARS
from ._mlflow_policy import batches, log_policy, log_policy_files, shipped_policies
from ._mlflow_prior import POLICY_EVENTS
from ._mlflow_views import (
    EXPERIMENT_KIND,
    JOURNAL_TAG,
    SUPERSEDED,
    TRAINING_KIND,
    RunViews,
    mark_training,
)
from ._ship_state import FILES_DOWN, TIMELINE_DUE, Experiments, RunState
from .journal import DISCARDED, JournalLine, discarded_end
from .sampling import DECISION, event_key

__all__ = ["RunShipper"]

log = logging.getLogger("lrctl.sinks.mlflow")

CONTINUED_IN = "lrctl.continued_in"  # on a run left for another: the run followed
END_REASON = "lrctl.end_reason"  # why lrctl ended a run that it did not finish
_TAG_ROOM = 8  # tags of a batch count towards MLflow's 1 000 entities


class RunShipper:
    """Sends one run's pending journal lines to MLflow, one batch per call."""

    def __init__(self, client: Any, state: RunState, *, timeline: bool,
                 snapshot_interval: float = 60.0,
                 experiments: Experiments | None = None,
                 files_backoff_max: float = 30.0) -> None:
        self.client = client
        self.st = state
        self.timeline = timeline
        self.snapshot_interval = snapshot_interval
        self.experiments = experiments if experiments is not None else Experiments()
        self.files = RunFiles(state, files_backoff_max,
                              probe=lambda: self.client.get_run(self.run_id))
        self._views: RunViews | None = None

    @property
    def run_id(self) -> str:
        return str(self.st.cursor["run_id"])

    @property
    def views(self) -> RunViews:
        if self._views is None:
            self._views = RunViews(self.client, self.st, self.run_id, self.snapshot_interval,
                                   self.files)
        return self._views

    def discarded_unseen(self, max_pending: int) -> bool:
        """Whether this run ended before its first observation (``outcome: discarded``)
        and MLflow has not seen it: its lines up to that end are then acknowledged and
        the run finished here, no MLflow run created (see :meth:`_finish` for one created
        before it ended). Looked up in the events file's last line, and only while
        MLflow has no run for it; a line written after that end (the key resumed) is
        left for the usual way."""
        st = self.st
        if st.cursor.get("run_id"):
            return False
        end = discarded_end(st.paths)
        if end is None:
            return False
        st.top_up(max_pending)
        if st.streams["metrics"].pending or st.streams["decisions"].pending:
            return False  # (never, for a discarded run: the usual way, to be sure)
        events = st.streams["events"]
        st.ack("events", [line for line in events.pending if line.seq <= end.seq])
        if events.acked_seq >= end.seq and not st.cursor.get("finished"):
            st.cursor["finished"] = True
            log.info("lrctl: run %s ended before its first step: no MLflow run for it",
                     st.paths.run_key)
        st.save()
        return True  # (the rest of its lines, if any are still to come: the next rounds)

    def deleted_idle(self, max_pending: int) -> bool:
        """Whether this run's MLflow run was deleted at its discard (see :meth:`_finish`)
        and its journal holds nothing after that end: a nudge then (a ``more`` that came
        after the end was shipped, a new shipper child told every run again) has nothing to
        ship, and must not make a new MLflow run for it (:meth:`ensure_run` makes one once
        lines come after that end: its key resumed)."""
        st = self.st
        if st.cursor.get("ended") != "DELETED":
            return False
        st.top_up(max_pending)
        return not any(s.pending for s in st.streams.values())

    def ensure_run(self) -> None:
        """Find or create the MLflow run once, and remember it in the cursor.

        A run lrctl creates is tagged with its run key and looked up by that tag
        first, so a crash between ``create_run`` and saving the cursor cannot
        leave two MLflow runs for one training run. Its experiment is tagged as
        model training once (see :func:`mark_training`; once per worker and experiment).
        """
        back = self.st.cursor.get("ended") == "DELETED"
        if back:
            # Deleted at a discard (see _finish) and now back (its key resumed): a new
            # MLflow run, as for a new run (a search by its key finds no deleted one),
            # with nothing of what the deleted one was sent counted as sent.
            for key in ("run_id", "created", "experiment_id", "kind_checked", "ended",
                        "tagged", "note", "snapshot", "table_registered", SUPERSEDED):
                self.st.cursor.pop(key, None)
            self.st.cursor["params"] = {}
            self._views = None
        if self.st.cursor.get("run_id"):
            if not self.st.cursor.get("kind_checked"):  # a cursor from an older lrctl
                if not self.st.cursor.get("experiment_id"):
                    run = self.client.get_run(self.run_id)
                    self.st.cursor["experiment_id"] = str(run.info.experiment_id)
                self._mark_training()
            return
        target = self.st.meta.get("mlflow") or {}
        if target.get("run_id"):
            run = self.client.get_run(target["run_id"])  # fails clearly if it does not exist
            self.st.cursor.update(run_id=target["run_id"], created=False,
                                  experiment_id=str(run.info.experiment_id))
        else:
            exp_id, run_id = self._created_run(target)
            self.st.cursor.update(run_id=run_id, created=True, experiment_id=exp_id)
        self._mark_training()
        if back:  # its policy went to the deleted run: the new one gets it too
            policies = shipped_policies(self.st)
            if policies:
                log_policy(self.client, self.st, self.views, policies[-1])

    def _mark_training(self) -> None:
        exp_id = str(self.st.cursor["experiment_id"])
        if exp_id not in self.experiments.marked:
            mark_training(self.client, exp_id)
            self.experiments.marked.add(exp_id)
        self.st.cursor["kind_checked"] = True
        self.st.save()

    def _experiment_id(self, name: str, artifact_root: str | None) -> str:
        exp = self.client.get_experiment_by_name(name)
        if exp is not None:
            return str(exp.experiment_id)
        try:
            exp_id = str(self.client.create_experiment(
                name, artifact_location=artifact_root,
                tags={EXPERIMENT_KIND: TRAINING_KIND}))
        except MlflowException:
            exp = self.client.get_experiment_by_name(name)  # another worker won the race
            if exp is None:
                raise
            return str(exp.experiment_id)
        self.experiments.marked.add(exp_id)  # made with the tag
        return exp_id

    def _created_run(self, target: dict[str, Any]) -> tuple[str, str]:
        """``(experiment id, run id)`` of the run lrctl made for this run key, found by its
        tag or made now. The experiment's id is asked for once per worker; if the store
        refuses it (the experiment was deleted meanwhile), it is asked for again."""
        name, key = target.get("experiment", "lrctl"), self.st.paths.run_key
        cached = self.experiments.ids.get(name)
        exp_id = cached or self._experiment_id(name, target.get("artifact_root"))
        try:
            found = self.client.search_runs([exp_id], f"tags.`lrctl.run_key` = '{key}'",
                                            max_results=1)
            if found:
                return exp_id, str(found[0].info.run_id)
            run = self.client.create_run(exp_id, tags={"lrctl.run_key": key},
                                         run_name=target.get("run_name") or key)
        except MlflowException:
            if cached is None:
                raise
            del self.experiments.ids[name]
            return self._created_run(target)
        self.experiments.ids[name] = exp_id
        return exp_id, str(run.info.run_id)

    # -- one batch ---------------------------------------------------------------------
    def ship_once(self) -> bool:
        """Send the next batch and advance the cursor; False when nothing was pending."""
        st = self.st
        self.views.ensure_prior()  # (its cursor save: before this batch changes the cursor)
        metrics: list[Metric] = []
        budget = MAX_METRICS_PER_BATCH - _TAG_ROOM
        decisions: list[JournalLine] = []
        last_ts = int(st.cursor["decision_ts"])
        for line in st.streams["decisions"].pending:
            if len(metrics) + 2 > budget:
                break
            rec = line.record
            # Unique per run, so two decisions in one millisecond stay two points.
            last_ts = max(int(float(rec.get("wall_time", 0.0)) * 1000), last_ts + 1)
            ratio, step = decision_ratio(rec), int(rec["step"])
            metrics.append(Metric(DECISION, ratio, last_ts, step))
            metrics.append(Metric(event_key(str(rec.get("action", ""))), ratio, last_ts, step))
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
        if decisions and not st.cursor.get(SUPERSEDED):  # (else the other journal's tags)
            last = decisions[-1].record
            tags["lrctl.decisions"] = str(self.views.decisions_total(decisions[-1].seq))
            tags["lrctl.last_decision"] = _summary(last)
        if not st.cursor.get("tagged"):
            tags["lrctl.run_key"] = st.paths.run_key
            tags[JOURNAL_TAG] = self.views.journal_id()  # it ships here now (superseded())
        # One call: the tags ride with the (last) metrics.
        run_tags = [RunTag(k, v) for k, v in tags.items()]
        chunks = list(batches(metrics, MAX_METRICS_PER_BATCH - len(run_tags))) or [[]]
        for i, chunk in enumerate(chunks):
            final = i == len(chunks) - 1
            if chunk or (final and run_tags):
                self.client.log_batch(self.run_id, metrics=chunk, tags=run_tags if final else [])
        for line in decisions:
            self.views.fold_decision(line.seq, line.record)
        # Acknowledged in memory now (MLflow has them), so that a run end in this batch
        # uploads the decisions files with them; saved with the events' progress below.
        st.ack("decisions", decisions)
        st.ack("metrics", points)
        st.cursor["decision_ts"] = last_ts
        st.cursor["tagged"] = True
        for line in events:
            kind = line.record.get("event")
            if kind == "follow" and line.record.get("run_id") != self.run_id:
                self._upload_prefix("events", line.end)
                self._follow(str(line.record["run_id"]))
                return True  # the whole journal again, into the run followed
            if kind == "end":
                self._finish(line.record)
            elif kind == "resume":
                self._resume()
            elif kind == "policy":
                log_policy(self.client, self.st, self.views, line.record)
        if events:
            self._upload_prefix("events", events[-1].end)
        st.ack("events", events)
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

    def refresh_views(self, *, catch_up: bool = False) -> None:
        """After a shipping round: the decisions files if due (if behind at all when
        ``catch_up``), the description if it changed."""
        self.views.refresh(complete=catch_up)

    def retry_files(self) -> None:
        """The run's files after its artifact store failed them (see :mod:`._mlflow_files`):
        each again, whole, from the journal; the mark cleared once all are stored (an
        exception in between leaves it, and them due)."""
        st = self.st
        with self.files.retrying():
            self.views.ensure_prior()
            self.views.refresh(complete=True)
            if st.files_retrying and st.streams["events"].acked_offset:
                self._upload_prefix("events", st.streams["events"].acked_offset)
            if st.files_retrying and not self.views.superseded():
                for policy in shipped_policies(st):
                    log_policy_files(self.client, st, self.files, policy)
            if self.files.failed_while_retrying():
                return
        shipped = st.streams["decisions"].acked_seq
        if shipped and self.views.prior.count("decisions") and not st.cursor.get(SUPERSEDED):
            # Counted without the prior records while they were not known: the whole count.
            self.client.set_tag(self.run_id, "lrctl.decisions",
                                str(self.views.decisions_total(shipped)))
        self.files.stored()

    def _follow(self, run_id: str) -> None:
        """The resumed job logs to another MLflow run: end this one (if it still runs,
        as KILLED: the job that owned it is gone) pointing at the next, and ship the
        run's whole journal into the next one."""
        if self.st.files_down:
            self.retry_files()  # this run's files, while it is this run's
        if self.st.files_down:
            log.warning("lrctl: run %s: MLflow run %s keeps the files it had (its artifact "
                        "store: %s); every decision is in the files of MLflow run %s",
                        self.st.paths.run_key, self.run_id, self.st.cursor.get(FILES_DOWN),
                        run_id)
        self.views.refresh(complete=True)
        left = self.run_id
        tags = [RunTag(CONTINUED_IN, run_id)]
        if self.client.get_run(left).info.status == "RUNNING":
            tags.append(RunTag(END_REASON, f"the training job resumed into MLflow run {run_id}"))
            self.client.log_batch(left, tags=tags)
            self.client.set_terminated(left, "KILLED")
        else:
            self.client.log_batch(left, tags=tags)
        experiment = str(self.client.get_run(run_id).info.experiment_id)
        self.st.restart_into(run_id, experiment, left)
        self._views = None
        log.info("lrctl: run %s: follows MLflow run %s (was %s)", self.st.paths.run_key,
                 run_id, left)

    def _resume(self) -> None:
        """A run that had ended is back (its hook resumed it): running again, if lrctl
        ended it."""
        ended = self.st.cursor.pop("ended", None)
        self.st.cursor["finished"] = False
        self.st.cursor.pop(TIMELINE_DUE, None)  # drawn at the run's next end
        if ended:
            self.client.update_run(self.run_id, status="RUNNING")
            with contextlib.suppress(MlflowException):  # a FINISHED run has none
                self.client.delete_tag(self.run_id, END_REASON)

    def _finish(self, end: dict[str, Any]) -> None:
        if end.get("outcome") == DISCARDED:
            # Ended before its first step, after MLflow had seen it (see discarded_unseen):
            # a run lrctl created is deleted (gone from the UI; MLflow keeps it until its
            # garbage collection), the script's own is left as it is.
            if self.st.cursor.get("created"):
                self.client.delete_run(self.run_id)
                self.st.cursor["ended"] = "DELETED"
                self.st.forget_files()  # (a deleted run needs none)
            self.st.cursor["finished"] = True
            return
        if self.views.superseded():  # the run goes on, shipped by another journal
            self.st.cursor["finished"] = True
            return
        self.views.refresh(complete=True)
        if self.timeline:  # drawn once no run has lines to ship (see draw_timeline)
            self.st.cursor[TIMELINE_DUE] = True
        if end.get("outcome") == "orphaned":
            # Nobody else will end it: the process that owned it is gone.
            if self.client.get_run(self.run_id).info.status == "RUNNING":
                self.client.set_tag(self.run_id, END_REASON, str(end.get("reason", ""))[
                    :MAX_TAG_CHARS])
                self.client.set_terminated(self.run_id, "KILLED")
                self.st.cursor["ended"] = "KILLED"
        elif self.st.cursor.get("created"):
            self.client.set_terminated(self.run_id, "FINISHED")
            self.st.cursor["ended"] = "FINISHED"
        self.st.cursor["finished"] = True

    def draw_timeline(self) -> None:
        """The picture of an ended run, from its journal, as ``lrctl/timeline.png``.

        Drawing costs far more than shipping a run (a few hundred ms of CPU), so the
        worker draws only when no run has lines to ship: decisions never wait behind
        pictures. Until then the cursor keeps it due, across restarts."""
        if self.st.files_down:
            return  # drawn once the files are stored again (it stays due)
        if self.timeline and not self.views.superseded():
            png = self.st.paths.root / "timeline.png"
            prior = self.views.timeline_prior()  # (MLflow's calls: retried if they fail)
            if self.st.files_down:
                return  # (its look just failed: drawn once the files are stored again)
            try:
                from ..timeline import render_run

                render_run(self.st.paths.root, png, private=True, **prior)
            except Exception as exc:  # a picture must not block the audit trail
                log.warning("lrctl: run %s: timeline not drawn: %s", self.st.paths.run_key, exc)
            else:
                if not self.files.attempt("the timeline picture", lambda: (
                        self.client.log_artifact(self.run_id, str(png), "lrctl"))):
                    return  # (it stays due)
                # MLflow holds it now: the run's folder keeps its journal, not a second copy
                # (~70 KB, nine tenths of an ended run's folder; `lrctl report` draws anew).
                with contextlib.suppress(OSError):
                    png.unlink()
        self.st.cursor.pop(TIMELINE_DUE, None)
        self.st.save()

    def _upload_prefix(self, stream: str, end: int) -> None:
        """Upload the events stream's first ``end`` bytes: everything acknowledged, whole,
        once more (a file operation: see :mod:`._mlflow_files`)."""
        if self.views.superseded():
            return
        prior = self.views.ensure_prior()  # (what MLflow held before the journal)
        if not prior.checked:
            return  # (not known: the file waits, see _mlflow_files)
        with open(self.st.paths.stream(stream), "rb") as f:
            data = prior.data(stream) + f.read(end)
        self.files.attempt(POLICY_EVENTS, lambda: self.client.log_text(
            self.run_id, data.decode("utf-8"), POLICY_EVENTS))


def _summary(rec: dict[str, Any]) -> str:
    ratio = decision_ratio(rec)
    text = (f"step {rec.get('step')}: {rec.get('policy')} {rec.get('action')} "
            f"x{ratio:.4g} - {rec.get('reason', '')}")
    return text[:MAX_TAG_CHARS]
