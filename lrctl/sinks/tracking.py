"""Which MLflow store a run's records go to, decided without importing mlflow.

The controller runs in its own process and working directory, so MLflow's own
default ("``sqlite:///mlflow.db`` in the current directory, or ``./mlruns`` if
that already holds runs") must be evaluated in the *training script's* working
directory, which the hook reports as ``RunInfo.cwd``. Relative local URIs are
resolved against it for the same reason.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

if TYPE_CHECKING:
    from .base import RunInfo

__all__ = ["artifact_root_for", "is_local_uri", "resolve_tracking_uri", "run_target"]


log = logging.getLogger("lrctl.sinks")


def resolve_tracking_uri(explicit: str | None, env: Mapping[str, str],
                         cwd: str | os.PathLike[str] | None) -> str:
    """Explicit URI (from the hook) > ``MLFLOW_TRACKING_URI`` > MLflow's default in ``cwd``."""
    base = Path(cwd) if cwd else Path.cwd()
    uri = explicit or env.get("MLFLOW_TRACKING_URI")
    if uri:
        return _absolute(uri, base)
    mlruns = base / "mlruns"
    if _has_mlruns_data(mlruns):
        return mlruns.resolve().as_uri()
    return f"sqlite:///{(base / 'mlflow.db').resolve()}"


def is_local_uri(uri: str) -> bool:
    return urlparse(uri).scheme in ("sqlite", "file", "")


def artifact_root_for(uri: str, cwd: str | os.PathLike[str] | None,
                      experiment: str) -> str | None:
    """Where an experiment lrctl creates keeps artifacts, for a local sqlite store.

    MLflow would use ``./mlruns`` of the creating process, which for us is the
    controller's directory: use the training script's instead, as the script's
    own ``mlflow`` would. Servers and file stores choose for themselves (None).
    """
    if urlparse(uri).scheme != "sqlite":
        return None
    base = Path(cwd) if cwd else Path.cwd()
    return (base / "mlruns" / experiment).resolve().as_uri()


def _absolute(uri: str, base: Path) -> str:
    parsed = urlparse(uri)
    if parsed.scheme == "sqlite" and uri.startswith("sqlite:///") and not uri.startswith(
            "sqlite:////"):
        return f"sqlite:///{(base / uri[len('sqlite:///'):]).resolve()}"
    if parsed.scheme == "file" and not parsed.path.startswith("/"):
        return (base / uri[len("file:"):]).resolve().as_uri()
    if parsed.scheme == "" or (len(parsed.scheme) == 1 and os.name == "nt"):
        return (base / uri).resolve().as_uri()
    return uri


def _has_mlruns_data(mlruns: Path) -> bool:
    """MLflow's test for an existing file store: a numbered experiment with its meta.yaml."""
    try:
        with os.scandir(mlruns) as entries:
            return any(e.is_dir() and e.name.isdigit()
                       and os.path.lexists(os.path.join(e.path, "meta.yaml")) for e in entries)
    except OSError:
        return False

def _fresh_target(info: RunInfo, env: Mapping[str, str], experiment: str) -> dict[str, Any]:
    uri = resolve_tracking_uri(info.tracking_uri, env, info.cwd)
    return {"tracking_uri": uri, "run_id": info.mlflow_run_id,
            "run_name": info.run_name or info.run_key, "experiment": experiment,
            "artifact_root": artifact_root_for(uri, info.cwd, experiment)}


def run_target(old: dict[str, Any] | None, info: RunInfo, env: Mapping[str, str],
               experiment: str) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """The MLflow target of an opened run (``old``: the one it had), and the ``follow``
    event if it moves.

    A restored run keeps its MLflow run (one training run, one MLflow run) unless the
    resumed job has an active MLflow run of its own on the same tracking server (the
    Hugging Face Trainer opens a new one on every resume): then lrctl follows it, ships
    the run's whole history there, and ends the one it leaves (see
    :mod:`lrctl.sinks._mlflow_run`).
    """
    if not old:
        return _fresh_target(info, env, experiment), None
    wanted = info.mlflow_run_id
    if not wanted or wanted == old.get("run_id"):
        return old, None
    fresh = _fresh_target(info, env, experiment)
    if fresh["tracking_uri"] != old.get("tracking_uri"):
        log.warning("lrctl: run %s: the resumed job logs to MLflow run %s at %s; lrctl "
                    "keeps its run at %s (it follows a new run on the same server only)",
                    info.run_key, wanted, fresh["tracking_uri"], old.get("tracking_uri"))
        return old, None
    return {**old, "run_id": wanted}, {"run_id": wanted, "previous": old.get("run_id")}
