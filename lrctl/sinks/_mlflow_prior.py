"""What an MLflow run already held when this journal began shipping into it.

The artifacts ``lrctl/decisions.jsonl`` (with its table) and ``lrctl/policy_events.jsonl``
are whole files uploaded from the journal: an MLflow artifact cannot be appended to. A
training run can continue into the same MLflow run from another controller state
directory (a job resumed on another node from ``ctl.state_dict()``, its MLflow run
resumed with ``mlflow.start_run(run_id=...)``; a controller started with another
``--state-dir``): that journal begins where it took over, and its uploads would replace
the records of the controllers before it.

So the first time a journal ships a run's views into an MLflow run it looks, once, at
what that run holds: one ``list_artifacts`` (nothing more when the files are absent, the
usual case), then a download of each file that is there. The records that come before
this journal's own first one are the run's *prior* records (all of them, unless this
journal's first record is among them: a journal that shipped there before, its cursor
since lost). They are written beside the journal, ``prior-<run>-<stream>.jsonl`` (0600,
never through a symlink), before the cursor records the look (``prior``), and from then
on every upload is the prior records followed by the journal. What is shipped thus stays
a pure function of the journal, the cursor and these files: an upload repeated after a
crash sends the same bytes, and the look is not repeated.

Used by the MLflow worker only (mlflow is importable there).
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import logging
import re
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from mlflow.exceptions import MlflowException

from ._ship_state import RunState
from .journal import atomic_write_text, read_lines
from .run_views import decision_row
from .sampling import GRAD_NORM, LOSS

__all__ = ["DECISIONS_JSONL", "POLICY_EVENTS", "PRIOR", "Prior", "prior_points"]

log = logging.getLogger("lrctl.sinks.mlflow")

DECISIONS_JSONL = "lrctl/decisions.jsonl"
POLICY_EVENTS = "lrctl/policy_events.jsonl"
#: The journal stream each whole-file artifact is uploaded from.
ARTIFACTS = {"decisions": DECISIONS_JSONL, "events": POLICY_EVENTS}
#: Cursor key: ``{"run_id": ..., "decisions": n, "events": n}``, the prior records' counts.
PRIOR = "prior"
_RUN_ID = re.compile(r"[0-9A-Za-z_-]{1,64}")
_LR = re.compile(r"lrctl/lr/g\d+")
# Refusals that retrying a download cannot fix: the file is left out (logged), not the run.
_UNREADABLE = frozenset({"RESOURCE_DOES_NOT_EXIST", "PERMISSION_DENIED",
                         "INVALID_PARAMETER_VALUE"})


class Prior:
    """The prior records of one MLflow run, as this run's journal directory keeps them."""

    def __init__(self, client: Any, state: RunState, run_id: str) -> None:
        self.client = client
        self.st = state
        self.run_id = run_id

    @property
    def checked(self) -> bool:
        seen = self.st.cursor.get(PRIOR)
        return isinstance(seen, dict) and seen.get("run_id") == self.run_id

    def count(self, stream: str) -> int:
        """How many prior records precede the journal's ``stream`` (0 until checked)."""
        return int(self.st.cursor[PRIOR].get(stream, 0)) if self.checked else 0

    def check(self) -> None:
        """Look at the MLflow run's files once and keep their prior records (in memory:
        the caller saves the cursor). May raise as any MLflow call does; the look is made
        again (a file operation: see :mod:`._mlflow_files`)."""
        try:
            listed = {f.path for f in self.client.list_artifacts(self.run_id, "lrctl")}
        except MlflowException as exc:
            if exc.error_code not in _UNREADABLE:
                raise  # MLflow down or busy: looked at again (see _mlflow_files)
            log.warning("lrctl: run %s: the artifacts of MLflow run %s cannot be listed (%s); "
                        "what it held before this journal is not kept in its files",
                        self.st.paths.run_key, self.run_id, exc)
            listed = set()
        counts: dict[str, int] = {}
        for stream, artifact in ARTIFACTS.items():
            lines = self._download(artifact, stream) if artifact in listed else []
            lines = _before_own(lines, self._first_own(stream))
            if lines:
                atomic_write_text(self._file(stream), "".join(lines))
            counts[stream] = len(lines)
        if any(counts.values()):
            log.info("lrctl: run %s: MLflow run %s held %d decision(s) and %d policy event(s) "
                     "from before this journal (another controller's state directory); its "
                     "artifacts keep them ahead of the journal's", self.st.paths.run_key,
                     self.run_id, counts["decisions"], counts["events"])
        self.st.cursor[PRIOR] = {"run_id": self.run_id, **counts}

    def data(self, stream: str) -> bytes:
        """The prior records of ``stream`` as uploaded: whole lines, possibly none."""
        if not self.count(stream):
            return b""
        try:
            with open(self._file(stream), "rb") as f:
                return f.read()
        except FileNotFoundError:
            log.warning("lrctl: run %s: %s is gone; the records MLflow run %s held before "
                        "this journal are no longer uploaded with it", self.st.paths.run_key,
                        self._file(stream), self.run_id)
            self.st.cursor[PRIOR][stream] = 0
            return b""

    def records(self, stream: str) -> list[dict[str, Any]]:
        out = []
        for line in self.data(stream).splitlines():
            with contextlib.suppress(ValueError):  # (written whole by check(): never)
                out.append(json.loads(line))
        return out

    def _file(self, stream: str) -> Path:
        name = self.run_id if _RUN_ID.fullmatch(self.run_id) else hashlib.sha256(
            self.run_id.encode()).hexdigest()[:32]
        return self.st.paths.root / f"prior-{name}-{stream}.jsonl"

    def _first_own(self, stream: str) -> dict[str, Any] | None:
        for line in read_lines(self.st.paths.stream(stream), 0, limit=1):
            return line.record
        return None

    def _download(self, artifact: str, stream: str) -> list[str]:
        """The artifact's lines that are JSON objects (decisions: that make a table row;
        others are skipped, logged once)."""
        with tempfile.TemporaryDirectory(prefix="lrctl-prior-") as tmp:
            try:
                local = self.client.download_artifacts(self.run_id, artifact, tmp)
                with open(local, "rb") as f:
                    raw = f.read()
            except MlflowException as exc:
                if exc.error_code not in _UNREADABLE:
                    raise  # MLflow down or busy: looked at again (see _mlflow_files)
                log.warning("lrctl: run %s: %s of MLflow run %s could not be read (%s); "
                            "the records in it are not kept", self.st.paths.run_key,
                            artifact, self.run_id, exc)
                return []
            finally:
                gc.collect()  # ends the threads of MLflow's artifact repository
        kept, bad = [], 0
        for line in raw.splitlines():
            try:  # kept as written (the journal's own line)
                text = line.decode("utf-8").strip()
                record = json.loads(text)
                if stream == "decisions" and isinstance(record, dict):
                    decision_row(record)  # (a step that is no number, say)
            except (ValueError, TypeError, OverflowError):  # (UnicodeDecodeError is one)
                record = None
            if isinstance(record, dict):
                kept.append(text + "\n")
            elif line.strip():
                bad += 1
        if bad:
            log.warning("lrctl: run %s: %d line(s) of %s in MLflow run %s are not lrctl "
                        "records; the %d that are were kept", self.st.paths.run_key, bad,
                        artifact, self.run_id, len(kept))
        return kept


def _before_own(lines: list[str], first: dict[str, Any] | None) -> list[str]:
    """``lines`` up to this journal's first record, if it is among them."""
    if first is not None:
        for i, line in enumerate(lines):
            if json.loads(line) == first:
                return lines[:i]
    return lines


def prior_points(client: Any, run_id: str, before_step: int | None,
                 ) -> Iterable[tuple[str, float, int]]:
    """The run's loss, grad-norm and LR points in MLflow before ``before_step`` (the
    journal's first step; all of them if ``None``): the part of a picture that a journal
    begun mid-run does not hold. Asked only for a run with prior decisions."""
    keys = [k for k in client.get_run(run_id).data.metrics
            if k in (LOSS, GRAD_NORM) or _LR.fullmatch(k)]
    for key in sorted(keys):
        points = sorted((m.step, m.timestamp, m.value)
                        for m in client.get_metric_history(run_id, key))
        for step, _, value in points:
            if before_step is None or step < before_step:
                yield key, float(value), int(step)
