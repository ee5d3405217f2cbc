"""The audit sink against a real ``mlflow server`` subprocess (sqlite backend)."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from mlflow.tracking import MlflowClient
from sinks_helpers import (
    FAST,
    MlflowServer,
    assert_exactly_once,
    decision,
    drive,
    journal_decisions,
    lr_curve,
    mlflow_run_id,
    run_info,
)

from lrctl.sinks import AuditSink


def test_active_run_on_a_server_gets_the_decisions_and_the_exact_lr_curve(
        mlflow_server: MlflowServer, tmp_path: Path) -> None:
    client = MlflowClient(mlflow_server.uri)
    exp = client.create_experiment(f"script-{time.time_ns()}")
    active = client.create_run(exp, run_name="script")  # the training script's own run
    sink = AuditSink(tmp_path / "state", FAST, env={})
    sink.open_run(run_info("s1", cwd=str(tmp_path), tracking_uri=mlflow_server.uri,
                           mlflow_run_id=active.info.run_id))
    used: dict[int, list[float]] = {}
    lrs = [0.1, 0.01]
    for step in range(300):
        used[step] = lrs
        sink.observation("s1", step, 1.0, 0.1, lrs)
        if step % 41 == 40:
            new = [lr * 0.5 for lr in lrs]
            sink.decision("s1", decision(step, lrs, new))
            lrs = new
    sink.close_run("s1")
    assert sink.flush(60)
    sink.close()
    assert mlflow_run_id(tmp_path / "state", "s1") == active.info.run_id
    assert_exactly_once(client, active.info.run_id, tmp_path / "state", "s1", tmp_path)
    for g in (0, 1):
        at = lr_curve(client, active.info.run_id, g)
        assert [at(s) for s in used] == [v[g] for v in used.values()]
    assert client.get_run(active.info.run_id).info.status == "RUNNING"


def test_server_stopped_mid_run_and_started_again_loses_and_repeats_nothing(
        tmp_path: Path) -> None:
    with tempfile.TemporaryDirectory(prefix="lrctl-mlflow-") as root:
        server = MlflowServer(Path(root))
        server.start()
        try:
            sink = AuditSink(tmp_path / "state", FAST, env={})
            sink.open_run(run_info("s2", cwd=str(tmp_path), tracking_uri=server.uri))
            lrs = drive(sink, "s2", range(0, 150), [0.1, 0.01])
            assert sink.flush(60)
            shipped = len(journal_decisions(tmp_path / "state", "s2"))

            server.stop()  # an outage mid-run: training and decisions go on
            lrs = drive(sink, "s2", range(150, 300), lrs)
            assert not sink.flush(1.0)
            assert len(journal_decisions(tmp_path / "state", "s2")) > shipped

            server.start()
            lrs = drive(sink, "s2", range(300, 400), lrs)
            sink.close_run("s2")
            assert sink.flush(60)
            sink.close()
            client = MlflowClient(server.uri)
            run_id = mlflow_run_id(tmp_path / "state", "s2")
            assert_exactly_once(client, run_id, tmp_path / "state", "s2", tmp_path)
            run = client.get_run(run_id)
            assert run.info.run_name == "name-s2" and run.info.status == "FINISHED"
            steps = {m.step for m in client.get_metric_history(run_id, "lrctl/lr/g0")}
            assert {160, 250, 399} <= steps  # points logged during the outage arrived
        finally:
            server.stop()
