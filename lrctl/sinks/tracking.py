"""Which MLflow store a run's records go to, decided without importing mlflow.

The controller runs in its own process and working directory, so MLflow's own
default ("``sqlite:///mlflow.db`` in the current directory, or ``./mlruns`` if
that already holds runs") must be evaluated in the *training script's* working
directory, which the hook reports as ``RunInfo.cwd``. Relative local URIs are
resolved against it for the same reason.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import urlparse

__all__ = ["artifact_root_for", "is_local_uri", "resolve_tracking_uri"]


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
