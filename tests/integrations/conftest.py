"""Fixtures of the integration tests: a real controller on a private socket."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from live_controller import LiveController, live_controller


@pytest.fixture
def controller(monkeypatch: pytest.MonkeyPatch) -> Iterator[LiveController]:
    """A controller on a private socket; in-process attaches find it through the env."""
    with live_controller() as ctl:
        for key, value in ctl.env_vars.items():
            monkeypatch.setenv(key, value)
        monkeypatch.delenv("LRCTL_TOKEN", raising=False)
        monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
        yield ctl
