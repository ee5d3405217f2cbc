"""An MLflow run's life across resumes and vanished hooks, against a real ``mlflow server``.

* A resumed job with an MLflow run of its own (the Hugging Face Trainer opens one on
  every resume) is followed: the run lrctl leaves ends KILLED with
  ``lrctl.continued_in``, and the followed run gets the whole history exactly once.
* A run whose hook vanished for good (the controller's ``session_timeout``) is
  orphaned: it ends KILLED with ``lrctl.end_reason``; a later resume makes it
  RUNNING again, and a clean end FINISHED.
"""

from __future__ import annotations

import time
from pathlib import Path

from mlflow.tracking import MlflowClient
from sinks_helpers import (
    FAST,
    MlflowServer,
    assert_exactly_once,
    drive,
    mlflow_run_id,
    run_info,
)

from lrctl.sinks import AuditSink
from lrctl.sinks.journal import RunPaths, read_lines


def events(state: Path, key: str) -> list[str]:
    return [str(line.record["event"]) for line in
            read_lines(RunPaths.of(state, key).stream("events"))]


def test_a_resumed_job_with_its_own_mlflow_run_is_followed_with_the_whole_history(
        mlflow_server: MlflowServer, tmp_path: Path) -> None:
    client = MlflowClient(mlflow_server.uri)
    exp = client.create_experiment(f"trainer-{time.time_ns()}")
    first = client.create_run(exp, run_name="job-1").info.run_id
    state = tmp_path / "state"
    sink = AuditSink(state, FAST, env={})
    info = {"cwd": str(tmp_path), "tracking_uri": mlflow_server.uri}
    sink.open_run(run_info("f1", mlflow_run_id=first, **info))
    lrs = drive(sink, "f1", range(0, 120), [0.1, 0.01])
    assert sink.flush(60)
    sink.close()  # the job is killed: nothing ends its run

    second = client.create_run(exp, run_name="job-2").info.run_id  # the resumed job's
    sink = AuditSink(state, FAST, env={})
    sink.open_run(run_info("f1", mlflow_run_id=second, **info))
    drive(sink, "f1", range(120, 260), lrs)
    sink.close_run("f1")
    assert sink.flush(60)
    sink.close()

    assert events(state, "f1")[-2:] == ["follow", "end"]
    assert mlflow_run_id(state, "f1") == second
    left = client.get_run(first)
    assert left.info.status == "KILLED"
    assert left.data.tags["lrctl.continued_in"] == second
    assert second in left.data.tags["lrctl.end_reason"]
    journal = assert_exactly_once(client, second, state, "f1", tmp_path)
    assert min(r["step"] for r in journal) < 120 < max(r["step"] for r in journal)
    lr_steps = {m.step for m in client.get_metric_history(second, "lrctl/lr/g0")}
    assert min(lr_steps) == 0 and max(lr_steps) == 259  # from the first step to the last
    assert client.get_run(second).info.status == "RUNNING"  # the job's own run: its to end


def test_an_orphaned_run_ends_killed_saying_why_and_a_resume_reopens_it(
        mlflow_server: MlflowServer, tmp_path: Path) -> None:
    client = MlflowClient(mlflow_server.uri)
    state = tmp_path / "state"
    sink = AuditSink(state, FAST, env={})
    info = run_info("o1", cwd=str(tmp_path), tracking_uri=mlflow_server.uri)
    sink.open_run(info)
    lrs = drive(sink, "o1", range(0, 80), [0.1, 0.01])
    sink.drop_run("o1", "no hook for 600 s")
    assert sink.flush(60)
    run_id = mlflow_run_id(state, "o1")
    run = client.get_run(run_id)
    assert run.info.status == "KILLED"
    assert run.data.tags["lrctl.end_reason"] == "no hook for 600 s"

    sink.open_run(info)  # the job resumed its run after all
    drive(sink, "o1", range(80, 160), lrs)
    assert sink.flush(60)
    run = client.get_run(run_id)
    assert run.info.status == "RUNNING"
    assert "lrctl.end_reason" not in run.data.tags

    sink.close_run("o1")
    assert sink.flush(60)
    sink.close()
    assert events(state, "o1") == ["policy", "end", "resume", "end"]
    assert client.get_run(run_id).info.status == "FINISHED"
    assert_exactly_once(client, run_id, state, "o1", tmp_path)


def test_an_orphaned_run_of_the_script_is_ended_only_while_it_still_runs(
        mlflow_server: MlflowServer, tmp_path: Path) -> None:
    client = MlflowClient(mlflow_server.uri)
    exp = client.create_experiment(f"script-{time.time_ns()}")
    active = client.create_run(exp, run_name="script").info.run_id
    client.set_terminated(active, "FINISHED")  # the script ended it before vanishing
    state = tmp_path / "state"
    sink = AuditSink(state, FAST, env={})
    sink.open_run(run_info("o2", cwd=str(tmp_path), tracking_uri=mlflow_server.uri,
                           mlflow_run_id=active))
    drive(sink, "o2", range(0, 60), [0.1, 0.01])
    sink.drop_run("o2", "no hook for 600 s")
    assert sink.flush(60)
    sink.close()
    run = client.get_run(active)
    assert run.info.status == "FINISHED"
    assert "lrctl.end_reason" not in run.data.tags
