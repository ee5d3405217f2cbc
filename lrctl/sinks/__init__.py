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
    journaled but could not ship. The controller's own environment chooses no MLflow
    store: a run goes where its training script's MLflow would have put it (the URI
    its hook sent, else MLflow's default in the script's directory). A controller a
    script started inherits that script's ``MLFLOW_TRACKING_URI`` and serves later
    scripts for minutes: their runs landed in the first one's store.
    """
    return AuditSink(state_dir, settings, env={})
