"""Where the controller's records go: the durable journal and MLflow."""

from __future__ import annotations

from .base import NullSink, RunInfo, Sink

__all__ = ["NullSink", "RunInfo", "Sink", "build_sink"]


def build_sink(state_dir: str) -> Sink:
    """The controller's default sink for a state directory."""
    return NullSink()
