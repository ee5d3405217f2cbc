"""Where the controller's records go: the durable journal and MLflow.

``import lrctl.sinks`` does not import mlflow: the MLflow worker threads import
it when they first ship something.
"""

from __future__ import annotations

import os

from .audit import AuditSettings, AuditSink
from .base import NullSink, RunInfo, Sink

__all__ = ["AuditSettings", "AuditSink", "NullSink", "RunInfo", "Sink", "build_sink"]


def build_sink(state_dir: str | os.PathLike[str],
               settings: AuditSettings | None = None) -> Sink:
    """The controller's default sink for a state directory: journal, then MLflow.

    Building it also starts replaying into MLflow whatever a previous controller
    journaled but could not ship. A run whose script names no MLflow store goes to
    the controller's ``MLFLOW_TRACKING_URI`` (an operator's choice for ``lrctl serve``;
    a controller a hook starts does not inherit the script's, see
    :func:`lrctl._spawn.spawned_env`), else to MLflow's default in the script's
    directory.
    """
    return AuditSink(state_dir, settings)
