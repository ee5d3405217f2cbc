"""What the MLflow UI shows of a run besides its metrics: the description, the
decisions table, the full decisions file, and the experiment's kind.

Used by the MLflow worker thread only (mlflow is importable there).

*Description.* The run's ``mlflow.note.content`` (Markdown on the run's Overview)
is rewritten from the run's :class:`~lrctl.sinks.run_views.RunSummary` once per
shipping round, when it changed. lrctl marks what it wrote with the tag
``lrctl.note_sha256``; a description that is there without that mark, or that no
longer matches it (someone edited it in the UI), belongs to a person and is never
overwritten again.

*Files.* ``lrctl/decisions.jsonl`` (the complete records) and
``lrctl/decisions_table.json`` (a table in ``MlflowClient.log_table``'s format,
registered in the ``mlflow.loggedArtifacts`` tag) are whole files: an MLflow
artifact cannot be appended to. They are uploaded together, from the acknowledged
part of the journal, when it has grown by an eighth since their last upload, at
least every ``snapshot_interval`` seconds while they are behind, and whenever they
are behind at run end and at a worker's first round for the run (a controller that
stopped mid-run may have left them behind; the next one catches up). Ahead of the
journal's records they hold those the MLflow run held before this journal shipped
into it (a run continued from another controller state directory: see
:mod:`._mlflow_prior`), which the description counts too. What a run
uploads thus stays within ~9× the files' final size, however many flushes it takes
(re-uploading on each flush grew as decisions × flushes), while the latest
decisions reach the UI with every flush through the description, the
``lrctl.last_decision`` tag and the metrics.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import time
from collections.abc import Mapping
from typing import Any

from mlflow.entities import RunTag
from mlflow.exceptions import MlflowException

from ._mlflow_files import RunFiles
from ._mlflow_prior import DECISIONS_JSONL, Prior, prior_points
from ._ship_state import RunState
from .journal import read_lines
from .run_views import TABLE_COLUMNS, RunSummary, decision_row

__all__ = ["DECISIONS_JSONL", "DECISIONS_TABLE", "EXPERIMENT_KIND", "JOURNAL_TAG", "NOTE",
           "NOTE_MARK", "SUPERSEDED",
           "TRAINING_KIND", "RunViews", "mark_training"]

log = logging.getLogger("lrctl.sinks.mlflow")

DECISIONS_TABLE = "lrctl/decisions_table.json"
#: Tag: the journal that began shipping into the MLflow run last (see RunViews.superseded).
JOURNAL_TAG = "lrctl.journal"
SUPERSEDED = "superseded"  # cursor key: the journal that took the MLflow run over
NOTE = "mlflow.note.content"  # MLflow's run description
NOTE_MARK = "lrctl.note_sha256"  # sha256 of the description lrctl wrote last
LOGGED_ARTIFACTS = "mlflow.loggedArtifacts"  # MLflow's register of table artifacts
EXPERIMENT_KIND = "mlflow.experimentKind"
TRAINING_KIND = "custom_model_development"  # "Machine learning" / model training
_GROWTH = 8  # re-upload the files once the journal grew by 1/_GROWTH since the last time


def note_sha(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


class RunViews:
    """The description, table and decisions file of one run (cursor-backed)."""

    def __init__(self, client: Any, state: RunState, run_id: str,
                 snapshot_interval: float, files: RunFiles) -> None:
        self.client = client
        self.st = state
        self.run_id = run_id
        self.snapshot_interval = snapshot_interval
        self.files = files
        self.prior = Prior(client, state, run_id)
        self._journal_id: str | None = None
        self.summary = RunSummary.from_json(state.cursor.get("summary"))
        if "summary" not in state.cursor:  # a cursor from an older lrctl: count what it sent
            acked = state.streams["decisions"].acked_offset
            for line in read_lines(state.paths.stream("decisions")):
                if line.end > acked:
                    break
                self.summary.add_decision(line.seq, line.record)
            for line in read_lines(state.paths.stream("events")):
                if line.end > state.streams["events"].acked_offset:
                    break
                if line.record.get("event") == "policy":
                    self.fold_policy(line.record)
            state.cursor["summary"] = self.summary.to_json()

    # -- folded in by ship_once, saved with the cursor --------------------------------
    def fold_decision(self, seq: int, record: Mapping[str, Any]) -> None:
        if self.summary.add_decision(seq, record):
            self.st.cursor["summary"] = self.summary.to_json()

    def fold_policy(self, record: Mapping[str, Any]) -> None:
        self.summary.set_policy(str(record.get("policy_source", "")),
                                str(record.get("policy_sha256", "")),
                                int(record.get("policy_version", 1)))
        self.st.cursor["summary"] = self.summary.to_json()

    def ensure_prior(self) -> Prior:
        """The records the MLflow run held before this journal (looked at once per
        journal and MLflow run; see :mod:`._mlflow_prior`), counted by the description:
        the look and the count are saved with the cursor together. A file operation:
        not made while the run's files are down (see :mod:`._mlflow_files`)."""
        if not self.prior.checked and self.files.attempt("a look at the run's files",
                                                         self.prior.check):
            self.summary.add_prior(self.prior.records("decisions"))
            self.st.cursor["summary"] = self.summary.to_json()
            self.st.save()
        return self.prior

    def journal_id(self) -> str:
        """This journal's name in its MLflow run's :data:`JOURNAL_TAG`: of its directory
        on this machine (host, path, device and inode), so that no lost cursor can make
        it another's, and a journal elsewhere (another node, another state directory) is."""
        if self._journal_id is None:
            root = self.st.paths.root
            st = os.stat(root)
            self._journal_id = hashlib.sha256(
                f"{socket.gethostname()}\0{os.path.realpath(root)}\0{st.st_dev}\0"
                f"{st.st_ino}".encode()).hexdigest()[:16]
        return self._journal_id

    def superseded(self, tags: Mapping[str, str] | None = None) -> bool:
        """Whether a journal of another controller has begun shipping into this MLflow run
        since this one did (the run continued from another state directory while this
        controller still held it: its hook vanished with its node, say). From then on the
        run's files, description, picture and end are that journal's (they hold this
        one's decisions, read at its start: :mod:`._mlflow_prior`); this one ships its
        metric points only, which MLflow keeps side by side. With one ``get_run`` (or
        the ``tags`` read already) until it is known, once per upload at most."""
        other = self.st.cursor.get(SUPERSEDED)
        if other is None:
            if not self.st.cursor.get("tagged"):
                return False  # it has not said so yet: its first batch does
            if tags is None:
                tags = self.client.get_run(self.run_id).data.tags
            other = tags.get(JOURNAL_TAG)
            if other is None or other == self.journal_id():
                return False
            self.st.cursor[SUPERSEDED] = other
            self.st.save()
            log.warning("lrctl: run %s: another controller's journal (%s) ships into MLflow "
                        "run %s now; this one leaves the run's files, description and end "
                        "to it", self.st.paths.run_key, other, self.run_id)
        return True

    def decisions_total(self, seq: int) -> int:
        """The run's decisions in MLflow up to the journal's decision ``seq``."""
        return self.ensure_prior().count("decisions") + seq

    def timeline_prior(self) -> dict[str, Any]:
        """What the run's picture needs beyond the journal: the prior decisions and
        MLflow's points before the journal's first step (a run begun elsewhere)."""
        prior = self.ensure_prior()
        if not (prior.count("decisions") or prior.count("events")):
            return {}
        first = None
        for line in read_lines(self.st.paths.stream("metrics"), 0, limit=1):
            first = min((int(p[2]) for p in line.record["points"]), default=None)
        return {"prior_decisions": prior.records("decisions"),
                "prior_points": list(prior_points(self.client, self.run_id, first))}

    # -- once per shipping round ------------------------------------------------------
    def refresh(self, *, complete: bool = False) -> None:
        """Upload the files if due (if behind at all when ``complete``: the run's end, a
        worker's first round for the run) and the description if it changed.

        What the run's tags must say then (the description, the table's entry in
        ``mlflow.loggedArtifacts``) is read with one ``get_run`` and written with one
        ``log_batch``, the cursor saved once."""
        self.ensure_prior()
        changed = self._files(complete)
        register = (not self.st.cursor.get("table_registered")
                    and int(self.st.cursor.get("snapshot", {}).get("offset", 0)) > 0)
        note = self._note_due()
        if (register or note is not None) and not self.st.cursor.get(SUPERSEDED):
            tags = self.client.get_run(self.run_id).data.tags
            if self.superseded(tags):
                return
            out = self._table_entry(tags) if register else []
            if note is not None:
                out += self._note(tags, *note)
            if out:
                self.client.log_batch(self.run_id, tags=out)
            if register:
                self.st.cursor["table_registered"] = True
            if note is not None and self.st.cursor["note"].get("owner") != "user":
                self.st.cursor["note"].update(owner="lrctl", sha256=note[1])
            changed = True
        if changed:
            self.st.save()

    def _files(self, complete: bool) -> bool:
        """Upload the decisions files if due; True if it did (the cursor says how far)."""
        snap = self.st.cursor.setdefault("snapshot", {"offset": 0, "at": 0.0})
        acked = self.st.streams["decisions"].acked_offset
        done = int(snap.get("offset", 0))
        if acked <= done:
            return False
        due = (complete or acked - done >= done / _GROWTH
               or time.time() - float(snap.get("at", 0.0)) >= self.snapshot_interval)
        if not due or self.superseded() or not self.prior.checked:
            return False  # (the prior records unknown: the files wait, see _mlflow_files)
        with open(self.st.paths.stream("decisions"), "rb") as f:
            # whole lines: ``acked`` is where a line ends; those MLflow held before first
            data = self.prior.data("decisions") + f.read(acked)
        rows = [decision_row(json.loads(raw)) for raw in data.splitlines() if raw.strip()]
        table = json.dumps({"columns": list(TABLE_COLUMNS), "data": rows},
                           separators=(",", ":"), allow_nan=False)

        def upload() -> None:
            self.client.log_text(self.run_id, table, DECISIONS_TABLE)
            self.client.log_text(self.run_id, data.decode("utf-8"), DECISIONS_JSONL)

        if not self.files.attempt("the decisions files", upload):
            return False
        snap.update(offset=acked, at=time.time())
        return True

    @staticmethod
    def _table_entry(tags: Mapping[str, str]) -> list[RunTag]:
        """The table added to ``mlflow.loggedArtifacts`` as ``log_table`` does (keeping
        the entries already there), so the UI shows it as a table and
        ``mlflow.load_table`` finds it; nothing if it is there."""
        try:
            entries = json.loads(tags.get(LOGGED_ARTIFACTS, "[]"))
        except ValueError:
            entries = []
        entry = {"path": DECISIONS_TABLE, "type": "table"}
        if not isinstance(entries, list):
            entries = []
        if entry in entries:
            return []
        return [RunTag(LOGGED_ARTIFACTS, json.dumps([*entries, entry]))]

    def _note_due(self) -> tuple[str, str] | None:
        """The description and its sha256 if lrctl should write it (it changed)."""
        state = self.st.cursor.setdefault("note", {})
        if state.get("owner") == "user":
            return None
        text = self.summary.markdown(self.st.cursor.get("experiment_id"))
        sha = note_sha(text)
        return None if state.get("sha256") == sha else (text, sha)

    def _note(self, tags: Mapping[str, str], text: str, sha: str) -> list[RunTag]:
        """The description's tags, unless the run's description is someone else's."""
        current = tags.get(NOTE)
        if current and tags.get(NOTE_MARK) != note_sha(current):
            log.info("lrctl: run %s has a description lrctl did not write; it is left alone "
                     "(the decisions are in the run's artifacts and tags)",
                     self.st.paths.run_key)
            self.st.cursor["note"]["owner"] = "user"
            return []
        return [RunTag(NOTE, text), RunTag(NOTE_MARK, sha)]


def mark_training(client: Any, experiment_id: str) -> None:
    """Tag the experiment as model training unless it already has a kind of its own.

    A refusal (say, no permission on someone else's experiment) costs the tag, not
    the audit trail."""
    try:
        exp = client.get_experiment(experiment_id)
        if EXPERIMENT_KIND not in (exp.tags or {}):
            client.set_experiment_tag(experiment_id, EXPERIMENT_KIND, TRAINING_KIND)
    except MlflowException as exc:
        if exc.error_code not in ("PERMISSION_DENIED", "INVALID_PARAMETER_VALUE",
                                  "INVALID_STATE"):
            raise
        log.warning("lrctl: experiment %s not tagged %s=%s: %s", experiment_id,
                    EXPERIMENT_KIND, TRAINING_KIND, exc)
