"""Real controllers for the daemon tests: ``lrctl serve`` subprocesses on private sockets.

Sockets live in a short directory under /tmp (``sun_path`` holds 107 bytes;
pytest's tmp_path can be longer). Every controller a test starts is killed when
the test ends, whatever happens; the suite-wide guard then checks nothing leaked.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from daemon_helpers import ControllerProc


@pytest.fixture
def short_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="lrctl-", dir="/tmp"))
    os.chmod(path, 0o700)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(autouse=True)
def private_env(short_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No test may touch the real user's socket or state directory."""
    monkeypatch.setenv("LRCTL_SOCKET", str(short_dir / "run" / "c.sock"))
    monkeypatch.setenv("LRCTL_STATE_DIR", str(short_dir / "state"))
    # Nor the working directory's MLflow store, which two workers would create at once.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{short_dir}/mlflow.db")
    monkeypatch.delenv("LRCTL_TOKEN", raising=False)
    monkeypatch.delenv("LRCTL_TOKEN_FILE", raising=False)


@pytest.fixture
def controllers(short_dir: Path) -> Iterator[list[ControllerProc]]:
    """A list the test appends its controllers to; all are killed at the end."""
    procs: list[ControllerProc] = []
    try:
        yield procs
    finally:
        for proc in procs:
            proc.ensure_dead()


@pytest.fixture
def make_controller(short_dir: Path, controllers: list[ControllerProc]):  # type: ignore[no-untyped-def]
    def make(extra: list[str] | None = None, start: bool = True,
             env: dict[str, str] | None = None, audit: bool = False,
             nofile: int | None = None) -> ControllerProc:
        proc = ControllerProc(os.environ["LRCTL_SOCKET"], os.environ["LRCTL_STATE_DIR"],
                              extra, env, audit, nofile)
        controllers.append(proc)
        return proc.start() if start else proc
    return make


@pytest.fixture
def controller(make_controller) -> ControllerProc:  # type: ignore[no-untyped-def]
    return make_controller()


@pytest.fixture
def reap_spawned() -> Iterator[None]:
    """Kill the controllers that attach(spawn=True) started during the test."""
    from lrctl import _spawn

    before = len(_spawn.spawned)
    try:
        yield
    finally:
        for proc in _spawn.spawned[before:]:
            if proc.poll() is None:
                proc.kill()
            proc.wait(10)
        del _spawn.spawned[before:]
        _spawn._respawned.clear()  # (each test's sockets are its own)


@pytest.fixture
def private_cwd() -> Iterator[None]:
    """The test may chdir (a spawned controller's MLflow store goes to the hook's working
    directory); the previous one comes back."""
    before = os.getcwd()
    try:
        yield
    finally:
        os.chdir(before)
