"""A run that ends before its first step leaves nothing behind in MLflow.

``lrctl.Scheduler(opt)`` attaches (a new run), then ``load_state_dict(state)`` rejoins
the saved one and ends the new run, still empty: every resume left an empty FINISHED
run of the same name in the experiment (a second "first" beside the real one), and
``lrctl runs --all`` listed it. Now such a run is discarded: the shipper creates no
MLflow run for it, deletes one it had created already, and ``runs --all`` leaves it
out. A real controller (with its journal and MLflow shipper) and a real sqlite store.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from daemon_helpers import POLICIES, ControllerProc, until
from mlflow.entities import ViewType
from mlflow.tracking import MlflowClient
from sqlite_store import made_sqlite_store

import lrctl

POLICY = str(POLICIES / "default.yaml")


@pytest.fixture
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
          make_controller: Callable[..., ControllerProc]) -> MlflowClient:
    """A sqlite store made once, here, before the controller (its shipper) opens it."""
    monkeypatch.chdir(tmp_path)
    uri, client = made_sqlite_store(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    make_controller(audit=True)
    return client


def _opt() -> torch.optim.Optimizer:
    return torch.optim.SGD([torch.nn.Parameter(torch.ones(3))], lr=0.1)


def _runs(client: MlflowClient, view: int = ViewType.ACTIVE_ONLY) -> list[Any]:
    experiments = client.search_experiments(view_type=ViewType.ALL)
    return client.search_runs([e.experiment_id for e in experiments], run_view_type=view)


def _journal_runs() -> list[dict[str, Any]]:
    out = subprocess.run([sys.executable, "-m", "lrctl", "runs", "--all", "--json"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def _trained_state(steps: int) -> tuple[str, dict[str, Any]]:
    """A run trained for ``steps`` and left resumable: its key and its state."""
    opt = _opt()
    scheduler = lrctl.Scheduler(opt, policy=POLICY, spawn=False, run_name="first",
                                timeout=30.0)
    for i in range(steps):
        opt.step()
        scheduler.step(1.0 - 0.01 * i)
    state = scheduler.state_dict()
    scheduler.close(end_run=False)
    return scheduler.controller.run_key or "", state


def _finished(client: MlflowClient, key: str) -> bool:
    return any(r.data.tags.get("lrctl.run_key") == key and r.info.status == "FINISHED"
               for r in _runs(client))


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # (no gradients: no grad norm)
def test_a_scheduler_resume_leaves_no_empty_run(store: MlflowClient) -> None:
    key, state = _trained_state(20)
    opt = _opt()
    scheduler = lrctl.Scheduler(opt, policy=POLICY, spawn=False, run_name="first",
                                timeout=30.0)
    empty = scheduler.controller.run_key
    scheduler.load_state_dict(state)
    assert scheduler.controller.run_key == key != empty
    for i in range(20, 40):
        opt.step()
        scheduler.step(1.0 - 0.01 * i)
    scheduler.close()
    until(lambda: _finished(store, key), "the resumed run to finish in MLflow")
    # The empty run: journaled as discarded, not listed, and not in MLflow's UI.
    until(lambda: [r["run"] for r in _journal_runs()] == [key], "runs --all: one run")
    active = _runs(store)
    assert [(r.data.tags.get("lrctl.run_key"), r.info.run_name) for r in active] == [
        (key, "first")]
    for run in _runs(store, ViewType.ALL):  # created before its end only by a race
        if run.data.tags.get("lrctl.run_key") != key:
            assert run.info.lifecycle_stage == "deleted"


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_an_empty_run_mlflow_had_seen_is_deleted(store: MlflowClient) -> None:
    """The shipper had created the MLflow run before the hook rejoined another run (an
    attach that waited before load_state_dict): that run is deleted, not FINISHED."""
    key, state = _trained_state(10)
    opt = _opt()
    ctl = lrctl.attach(opt, policy=POLICY, spawn=False, run_name="second", timeout=30.0)
    empty = ctl.run_key

    def created() -> list[Any]:
        return [r for r in _runs(store) if r.data.tags.get("lrctl.run_key") == empty]
    [seen] = until(created, "the empty run's MLflow run")
    empty_state = ctl.state_dict()
    ctl.load_state_dict(state["lrctl"])  # (the hook's state, in the scheduler's)
    assert ctl.run_key == key
    ctl.step(0.5)
    opt.step()
    ctl.close()
    until(lambda: store.get_run(seen.info.run_id).info.lifecycle_stage == "deleted",
           "the empty run's deletion")
    until(lambda: _finished(store, key), "the resumed run to finish in MLflow")
    assert [r.data.tags.get("lrctl.run_key") for r in _runs(store)] == [key]
    # (The journal's file may take its end line a moment after the shipper had it.)
    until(lambda: [r["run"] for r in _journal_runs()] == [key], "runs --all: one run")
    # Its key back (resumed from a state taken before it was discarded) is a run again: a
    # new MLflow run (MLflow refused every write into the deleted one, for good).
    opt = _opt()
    with lrctl.attach(opt, policy=POLICY, spawn=False, resume=empty_state,
                      timeout=30.0) as back:
        for i in range(5):
            back.step(1.0 - 0.01 * i)
            opt.step()
    until(lambda: _finished(store, empty), "the discarded key's new run to finish")
    [again] = [r for r in _runs(store) if r.data.tags.get("lrctl.run_key") == empty]
    assert again.info.run_id != seen.info.run_id and again.data.metrics
    until(lambda: sorted(r["run"] for r in _journal_runs()) == sorted([key, empty]),
           "runs --all: both runs")


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("how", ["by key after its end", "from a state before its start"])
def test_a_run_with_steps_is_never_discarded(store: MlflowClient, how: str) -> None:
    """A run rejoined and closed before a step of its new life has steps in its journal:
    it ends as usual. (Both were discarded and their MLflow runs deleted: the check saw
    only the controller's new or rewound session, which had no step.)"""
    opt = _opt()
    ctl = lrctl.attach(opt, policy=POLICY, spawn=False, run_name="real", timeout=30.0)
    before = ctl.state_dict()
    for i in range(30):
        ctl.step(1.0 - 0.01 * i)
        opt.step()
    key = ctl.run_key
    ctl.close(end_run=how == "by key after its end")
    until(lambda: any(r.data.tags.get("lrctl.run_key") == key for r in _runs(store)),
           "the run in MLflow")
    resume = key if how == "by key after its end" else before
    lrctl.attach(_opt(), policy=POLICY, spawn=False, resume=resume, start_step=30,
                 timeout=30.0).close()
    until(lambda: _finished(store, key), "the run to finish in MLflow")
    [run] = [r for r in _runs(store) if r.data.tags.get("lrctl.run_key") == key]
    assert run.info.lifecycle_stage == "active" and run.data.metrics
    until(lambda: [r["run"] for r in _journal_runs()] == [key], "runs --all: the run")


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_decisions_by_name_skip_the_discarded_run(store: MlflowClient) -> None:
    """`lrctl decisions NAME` took the latest run of that name: after a Scheduler resume,
    the discarded empty one."""
    key, state = _trained_state(20)
    scheduler = lrctl.Scheduler(_opt(), policy=POLICY, spawn=False, run_name="first",
                                timeout=30.0)
    empty = scheduler.controller.run_key or ""
    scheduler.load_state_dict(state)
    scheduler.close()
    until(lambda: [r["run"] for r in _journal_runs()] == [key], "runs --all: one run")
    out = subprocess.run([sys.executable, "-m", "lrctl", "decisions", "first"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "names 2 runs" not in out.stderr and empty not in out.stdout + out.stderr
    by_key = subprocess.run([sys.executable, "-m", "lrctl", "decisions", empty],
                            capture_output=True, text=True, timeout=60)
    assert by_key.returncode == 0, by_key.stderr  # its own key still finds it
