"""An MLflow store that is broken or half-made (issue #18, item 2).

Before: a ``kill -9`` while MLflow created a new sqlite store's tables (the shipper
process dies with its controller) left it half-migrated for good; a store that could
not be opened made the worker retry ten times a second with a full traceback each
time, nothing shipped, and ``lrctl status`` said nothing. Now a new sqlite store is
built whole under a temporary name and linked into place; a store that cannot be
opened is retried with exponential back-off, logged with one traceback and then rate
limited, shown as "MLflow unavailable: <reason>" by ``status`` and ``runs``, and once
it is fixed the journal is shipped with nothing lost.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from daemon_helpers import REPO, ControllerProc
from rel_helpers import FIGURES, store_client, until, until_shipped

import lrctl
from lrctl.client import request
from lrctl.sinks._mlflow_store import open_store

QUIET = "version: 1\npolicies:\n  - kind: plateau\n    metric: loss\n    patience: 100000\n"

# Opens the store as the shipper does, and is killed after the Nth migration step.
KILLED_MID_MIGRATION = textwrap.dedent("""
    import os, signal, sys
    from sqlalchemy import event
    from sqlalchemy.engine import Engine
    steps = [0]

    @event.listens_for(Engine, "before_cursor_execute")
    def _step(conn, cursor, statement, *args):
        if statement.lstrip().upper().startswith("UPDATE ALEMBIC_VERSION"):
            steps[0] += 1
            if steps[0] == int(sys.argv[2]):
                os.kill(os.getpid(), signal.SIGKILL)

    from lrctl.sinks.mlflow_sink import _default_client
    _default_client(sys.argv[1]).search_experiments(max_results=1)
""")


@pytest.mark.parametrize("killed_at", [3, 30])
def test_kill_9_during_the_first_table_creation_leaves_no_half_migrated_store(
        tmp_path: Path, killed_at: int) -> None:
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    out = subprocess.run([sys.executable, "-c", KILLED_MID_MIGRATION, uri, str(killed_at)],
                         cwd=REPO, capture_output=True, timeout=120)
    assert out.returncode == -signal.SIGKILL, out.stderr.decode()[-2000:]
    # Whoever opens the store next (a user's script, the next shipper) finds none, or a
    # whole one; the next shipper removes the killed one's temporary file.
    client = MlflowClient(uri)
    exp = client.create_experiment("after-the-kill")
    assert client.get_experiment(exp).name == "after-the-kill"
    open_store(uri)
    assert sorted(p.name for p in tmp_path.iterdir() if "mlflow.db" in p.name) == [
        "mlflow.db"], "a temporary store was left behind"


# The shipper's own retry after a first creation that failed half-way (a disk that
# filled mid-migration: sqlite says "database or disk is full"), in one process.
FULL_MID_MIGRATION = textwrap.dedent("""
    import sqlite3, sys
    from sqlalchemy import event
    from sqlalchemy.engine import Engine
    from lrctl.sinks._mlflow_store import open_store
    state = {"full": True, "steps": 0}

    @event.listens_for(Engine, "before_cursor_execute")
    def _step(conn, cursor, statement, *args):
        if state["full"] and statement.lstrip().upper().startswith("UPDATE ALEMBIC_VERSION"):
            state["steps"] += 1
            if state["steps"] == 5:
                raise sqlite3.OperationalError("database or disk is full")

    try:
        open_store(sys.argv[1])
    except Exception as exc:
        print("refused:", str(exc).splitlines()[0])
    state["full"] = False  # the disk has room again
    client = open_store(sys.argv[1])
    print("made:", client.get_experiment(client.create_experiment("after")).name)
""")


def test_a_first_creation_cut_by_a_full_disk_is_made_whole_by_the_same_process(
        tmp_path: Path) -> None:
    """Before: MLflow keeps the temporary store's engine by URI from before its tables
    are made; the failed attempt's pooled connections pointed at the file it then
    unlinked, and each retry of the shipper (same pid, same temporary name) went through
    them and failed ("table latest_metrics already exists"; on a real full tmpfs,
    "attempt to write a readonly database"), so MLflow got nothing until the shipper
    restarted."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    out = subprocess.run([sys.executable, "-c", FULL_MID_MIGRATION, uri], cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "refused: (sqlite3.OperationalError) database or disk is full" in out.stdout
    assert "made: after" in out.stdout
    assert sorted(p.name for p in tmp_path.iterdir() if "mlflow.db" in p.name) == [
        "mlflow.db"], "a temporary store was left behind"


def _log_lines(controller: ControllerProc, needle: str) -> int:
    return controller.log.read_text(errors="replace").count(needle)


def test_a_store_that_cannot_be_opened_is_reported_retried_with_back_off_and_caught_up(
        make_controller: Callable[..., ControllerProc], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    from sinks_helpers import assert_exactly_once, mlflow_run_id

    db = tmp_path / "mlflow.db"
    db.write_bytes(b"this is not an sqlite database\n" * 64)  # a corrupt store
    uri = f"sqlite:///{db}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)
    controller = make_controller(audit=True)
    state = Path(os.environ["LRCTL_STATE_DIR"])
    opt = torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=0.1)
    made: list[dict] = []
    with lrctl.attach(opt, policy=QUIET, sync=True, spawn=False) as ctl:
        key = ctl.run_key
        for i in range(3):
            for _ in range(5):
                ctl.step(1.0, grad_norm=1.0)
            made.append(request({"t": "set_lr", "run": key, "lr": 0.01 * (i + 1)})["decision"])

        def unavailable() -> list[str]:
            return [e for e in request({"t": "status"})["errors"]
                    if e.startswith("MLflow unavailable: ")]

        until("status to say MLflow is unavailable", lambda: bool(unavailable()))
        assert "DatabaseError" in unavailable()[0]
        runs = {r["run"]: r for r in request({"t": "runs"})["runs"]}
        assert (runs[key]["sink_error"] or "").startswith("MLflow unavailable: ")
        # Several attempts, backed off: the one-line report that follows the traceback.
        until("a rate-limited report", lambda: _log_lines(controller, "still unavailable") > 0)
        # One traceback (a chained exception prints one per link), then one-line reports.
        tracebacks = _log_lines(controller, "Traceback") - _log_lines(
            controller, "The above exception was") - _log_lines(controller, "During handling")
        reports = _log_lines(controller, "MLflow unavailable at") + _log_lines(
            controller, "still unavailable")
        assert tracebacks == 1, controller.log.read_text()[-3000:]
        assert reports <= 4, controller.log.read_text()[-3000:]  # before: ten a second
        db.unlink()  # the cause fixed: the next attempt makes a new store
        until("status to say MLflow answers again", lambda: not unavailable())
    client = store_client(uri)

    until_shipped(client, state, key, len(made))
    controller.stop()
    uploaded = assert_exactly_once(client, mlflow_run_id(state, key), state, key, tmp_path)
    FIGURES["MLflow store unavailable"] = {"tracebacks": tracebacks, "reports": reports,
                                           "decisions": len(made), "mlflow": len(uploaded)}
