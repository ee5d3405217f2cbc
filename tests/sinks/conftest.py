"""Fixtures of the sink tests: one real ``mlflow server`` for the session, state dirs."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from sinks_helpers import MlflowServer


@pytest.fixture(scope="session")
def mlflow_server() -> Iterator[MlflowServer]:
    """Started before any test's leak guard looks, stopped after the last test."""
    with tempfile.TemporaryDirectory(prefix="lrctl-mlflow-") as root:
        server = MlflowServer(Path(root))
        server.start()
        try:
            yield server
        finally:
            server.stop()


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A training script's working directory, with no MLflow configuration around."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return tmp_path
