"""A run's policy in MLflow: its file as artifacts, its source and sha256 as tags, its
knobs as params (MLflow params cannot change: a reload keeps the first value as the
param, and every version is in the policy artifacts).

Used by the MLflow worker thread only (see :mod:`._mlflow_run`).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator, Sequence
from typing import Any

from mlflow.entities import Param, RunTag
from mlflow.exceptions import MlflowException

from ._mlflow_files import RunFiles
from ._mlflow_limits import MAX_PARAMS_TAGS_PER_BATCH, MAX_TAG_CHARS
from ._mlflow_views import RunViews
from ._ship_state import RunState
from .journal import read_lines

__all__ = ["batches", "log_params", "log_policy", "log_policy_files", "shipped_policies"]

log = logging.getLogger("lrctl.sinks.mlflow")

_BAD_PARAM_CHARS = re.compile(r"[^A-Za-z0-9_\-. /:]")


def log_policy(client: Any, st: RunState, views: RunViews, rec: dict[str, Any]) -> None:
    """A ``policy`` event of the journal (the run's start, a reload): the file, the tags,
    the params."""
    sha = str(rec.get("policy_sha256", ""))
    version = int(rec.get("policy_version", 1))
    views.fold_policy(rec)
    log_policy_files(client, st, views.files, rec)
    tags = {"lrctl.policy_sha256": sha, "lrctl.policy": str(rec.get("policy_source", "")),
            "lrctl.policy_version": str(version)}
    # As params too, so that runs compare by policy (a param keeps its first value:
    # the policy the run started with; the tags follow reloads).
    log_params(client, st, {"policy_sha256": sha, "policy": str(rec.get("policy_source", "")),
                            **(rec.get("params") or {})},
               [RunTag(k, v[:MAX_TAG_CHARS]) for k, v in tags.items()])


def log_policy_files(client: Any, st: RunState, files: RunFiles, rec: dict[str, Any]) -> None:
    """The policy file of a ``policy`` event, as ``lrctl/policy.yaml`` and under its
    version (a file operation: see :mod:`._mlflow_files`)."""
    run_id = str(st.cursor["run_id"])
    sha = str(rec.get("policy_sha256", ""))
    try:
        text = st.paths.policy_file(str(rec.get("policy_file", sha))).read_text(
            encoding="utf-8")
    except (OSError, ValueError):
        return
    version = int(rec.get("policy_version", 1))

    def upload() -> None:
        client.log_text(run_id, text, "lrctl/policy.yaml")
        client.log_text(run_id, text, f"lrctl/policies/v{version}-{sha[:12]}.yaml")

    files.attempt("the policy file", upload)


def shipped_policies(st: RunState) -> list[dict[str, Any]]:
    """The run's ``policy`` events MLflow acknowledged, in order."""
    shipped = st.streams["events"].acked_offset
    out = []
    for line in read_lines(st.paths.stream("events")):
        if line.end > shipped:
            break
        if line.record.get("event") == "policy":
            out.append(line.record)
    return out


def log_params(client: Any, st: RunState, params: dict[str, Any], tags: list[RunTag]) -> None:
    """Knobs as params, with ``tags`` in the first call. Params MLflow refuses are left
    out (logged); the tags go all the same."""
    run_id = str(st.cursor["run_id"])
    logged: dict[str, str] = st.cursor["params"]
    new = {}
    for k, v in params.items():
        key = _param_key(str(k))
        if key not in logged:
            new[key] = str(v)
    items = list(new.items())
    first = MAX_PARAMS_TAGS_PER_BATCH - len(tags)
    for chunk, with_tags in [(items[:first], tags),
                             *((c, []) for c in batches(items[first:],
                                                        MAX_PARAMS_TAGS_PER_BATCH))]:
        try:
            client.log_batch(run_id, params=[Param(k, v) for k, v in chunk], tags=with_tags)
        except MlflowException as exc:
            if exc.error_code != "INVALID_PARAMETER_VALUE" or not chunk:
                raise
            log.warning("lrctl: run %s: params not logged: %s", st.paths.run_key, exc)
            if with_tags:
                client.log_batch(run_id, tags=with_tags)
    logged.update(new)


def batches(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    """``items`` in slices of ``size`` (MLflow's per-call limits)."""
    for i in range(0, len(items), size):
        yield items[i:i + size]


def _param_key(key: str) -> str:
    key = key if key.startswith("lrctl") else f"lrctl.{key}"
    return _BAD_PARAM_CHARS.sub("_", key)[:250]
