"""The audit sink against MLflow's default store: a sqlite ``mlflow.db`` in the
training script's working directory (RunInfo.cwd), no tracking URI configured."""

from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path

import mlflow
import pytest
from mlflow.entities import ViewType
from mlflow.tracking import MlflowClient
from sinks_helpers import (
    FAST,
    FAST_WITH_TIMELINE,
    GatedClient,
    assert_exactly_once,
    decision,
    download,
    drive,
    journal_decisions,
    lr_curve,
    mlflow_run_id,
    run_info,
)

import lrctl
from lrctl.sinks import AuditSink, build_sink
from lrctl.sinks.journal import RunPaths, read_json
from lrctl.sinks.mlflow_sink import MlflowShipper
from lrctl.timeline import render_run

#: How long a flush may take: a deadline, not what is tested. The first flush waits for
#: the shipper child to import MLflow and create the store's tables: ~8 s on an idle
#: machine, 43 s to over 60 s (the old deadline) under load.
FLUSH_S = 300.0


def sqlite_uri(cwd: Path) -> str:
    return f"sqlite:///{cwd / 'mlflow.db'}"


def test_default_store_gets_a_run_named_after_the_session_with_the_full_audit_trail(
        workdir: Path, tmp_path: Path) -> None:
    state = tmp_path / "state"
    sink = AuditSink(state, FAST_WITH_TIMELINE, env={})
    sink.open_run(run_info("r1", cwd=str(workdir)))
    drive(sink, "r1", range(200), [0.1, 0.01])
    sink.close_run("r1")
    assert sink.flush(FLUSH_S)
    sink.close()

    assert (workdir / "mlflow.db").exists()  # the script's directory, not the controller's
    client = MlflowClient(sqlite_uri(workdir))
    exp = client.get_experiment_by_name("lrctl")
    assert exp is not None and exp.artifact_location.startswith((workdir / "mlruns").as_uri())
    [run] = client.search_runs([exp.experiment_id])
    assert run.info.run_name == "name-r1" and run.info.status == "FINISHED"
    assert run.info.run_id == mlflow_run_id(state, "r1")
    journal = assert_exactly_once(client, run.info.run_id, state, "r1", tmp_path)
    tags, params = run.data.tags, run.data.params
    assert tags["lrctl.policy_sha256"] == run_info("r1").policy_sha256
    assert tags["lrctl.policy"] == "policies/default.yaml"
    assert tags["lrctl.last_decision"].startswith(f"step {journal[-1]['step']}: plateau reduce")
    assert params == {"lrctl.plateau.factor": "0.5", "lrctl.warmup.steps": "100",
                      "lrctl.policy_sha256": run_info("r1").policy_sha256,
                      "lrctl.policy": "policies/default.yaml"}
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    note = tags["mlflow.note.content"]  # the run's description, on its Overview
    assert note.startswith("**lrctl** · policy `default.yaml`, sha256 "
                           f"`{run_info('r1').policy_sha256[:12]}` · "
                           f"{len(journal)} decisions: {len(journal)} reduce")
    assert f"| {journal[-1]['step']} | plateau | reduce |" in note
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "lrctl")}
    assert {"lrctl/decisions.jsonl", "lrctl/policy.yaml", "lrctl/timeline.png"} <= artifacts
    policy = download(client, run.info.run_id, "lrctl/policy.yaml", tmp_path)
    assert policy == run_info("r1").policy_text
    png = download(client, run.info.run_id, "lrctl/timeline.png", tmp_path)
    assert png.startswith("\ufffdPNG")
    # Once in MLflow, the run's directory keeps no second copy (a long-lived controller's
    # probe: nine tenths of an ended run's folder). Drawn there, it is private, as the
    # journal is (an adversarial pass: 0644).
    (root,) = (state / "runs").glob("r1*/")
    assert not (root / "timeline.png").exists()
    render_run(root, root / "again.png", private=True)
    assert (root / "again.png").stat().st_mode & 0o777 == 0o600
    # Each decision shows with the numbers next to it.
    losses = {m.step for m in client.get_metric_history(run.info.run_id, "lrctl/loss")}
    assert {r["step"] for r in journal} <= losses


def test_decisions_go_into_the_scripts_own_active_run(workdir: Path, tmp_path: Path) -> None:
    uri = sqlite_uri(workdir)
    mlflow.set_tracking_uri(uri)
    try:
        with mlflow.start_run(run_name="script") as active:
            mlflow.log_param("batch_size", 64)
            sink = AuditSink(tmp_path / "state", FAST, env={})
            sink.open_run(run_info("r2", cwd=str(workdir), tracking_uri=uri,
                                   mlflow_run_id=active.info.run_id))
            drive(sink, "r2", range(120), [0.3, 0.03])
            sink.close_run("r2")
            assert sink.flush(FLUSH_S)
            sink.close()
            client = MlflowClient(uri)
            run = client.get_run(active.info.run_id)
            assert run.info.status == "RUNNING"  # the script's run is the script's to end
    finally:
        mlflow.set_tracking_uri(None)
    assert_exactly_once(client, active.info.run_id, tmp_path / "state", "r2", tmp_path)
    assert run.data.params["batch_size"] == "64"
    assert run.data.tags["lrctl.run_key"] == "r2"
    assert client.get_experiment_by_name("lrctl") is None  # no second run anywhere


def test_the_lr_curve_in_mlflow_equals_the_lrs_the_optimizer_used(
        workdir: Path, tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    opt = torch.optim.SGD([{"params": [model.weight], "lr": 0.1},
                           {"params": [model.bias], "lr": 0.02}])
    policy = {"version": 1, "policies": [
        {"kind": "warmup", "steps": 25, "mode": "linear", "start_factor": 0.1},
        {"kind": "plateau", "metric": "loss", "patience": 15, "factor": 0.5,
         "threshold": 0.5, "cooldown": 5}]}
    engine = lrctl.load_policy(policy, base_lrs=[0.1, 0.02])
    for group, lr in zip(opt.param_groups, engine.applied_lrs, strict=True):
        group["lr"] = lr
    sink = AuditSink(tmp_path / "state", FAST, env={})
    sink.open_run(run_info("r3", cwd=str(workdir)))
    used: dict[int, list[float]] = {}
    x, y = torch.randn(64, 4), torch.randn(64, 1)
    for step in range(240):
        loss = torch.nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        used[step] = [g["lr"] for g in opt.param_groups]
        sink.observation("r3", step, loss.item(), None, used[step])
        new = engine.observe(step, loss.item())
        for d in engine.last_decisions:
            sink.decision("r3", {**d.to_dict(), "wall_time": time.time()})
        for group, lr in zip(opt.param_groups, new, strict=True):
            group["lr"] = lr
    sink.close_run("r3")
    assert sink.flush(FLUSH_S)
    sink.close()

    client = MlflowClient(sqlite_uri(workdir))
    run_id = mlflow_run_id(tmp_path / "state", "r3")
    assert len({tuple(v) for v in used.values()}) > 20  # warmup ramp and plateau cuts
    assert any(r["kind"] == "plateau" for r in journal_decisions(tmp_path / "state", "r3"))
    for g in (0, 1):
        at = lr_curve(client, run_id, g)
        assert [at(s) for s in used] == [lrs[g] for lrs in used.values()]
    # ... with far fewer points than steps once the LR holds still.
    assert len(client.get_metric_history(run_id, "lrctl/lr/g0")) < 120


def test_the_hot_path_never_waits_and_a_full_queue_spills_to_the_journal(
        workdir: Path, tmp_path: Path) -> None:
    client = GatedClient(sqlite_uri(workdir))
    client.gate.clear()  # MLflow hangs
    shipper = MlflowShipper(tmp_path / "state", flush_interval=0.2, queue_size=4,
                            max_pending=16, backoff_max=0.5, client_factory=lambda uri: client)
    sink = AuditSink(tmp_path / "state", FAST, shipper=shipper, env={})
    sink.open_run(run_info("r4", cwd=str(workdir)))
    drive(sink, "r4", range(0, 100), [0.1, 0.01], every=3)
    assert client.waiting.wait(10)  # the worker is stuck inside MLflow ...
    drive(sink, "r4", range(100, 400), [0.1, 0.01], every=3)  # ... and the loop went on
    assert not sink.flush(0.5)
    assert len(journal_decisions(tmp_path / "state", "r4")) == 133
    client.gate.set()
    sink.close_run("r4")
    assert sink.flush(FLUSH_S)
    sink.close()
    assert_exactly_once(client.real, mlflow_run_id(tmp_path / "state", "r4"),
                        tmp_path / "state", "r4", tmp_path)


def test_a_discarded_run_mlflow_had_seen_gets_no_new_run_from_a_later_nudge(
        workdir: Path, tmp_path: Path) -> None:
    """A run discarded after the shipper had made its MLflow run: that run is deleted, and
    a nudge that comes after (the controller's ``more`` for the end, read already by an
    earlier round; every run told again to a new shipper child) has nothing to ship. It
    made a new, empty MLflow run, RUNNING for good (taken for the key's resume)."""
    state = tmp_path / "state"
    shipper = MlflowShipper(state, flush_interval=0.2, backoff_max=0.5, timeline=False)
    sink = AuditSink(state, FAST, shipper=shipper, env={})
    sink.open_run(run_info("d1", cwd=str(workdir)))
    assert sink.flush(FLUSH_S)
    seen = mlflow_run_id(state, "d1")  # made before the run ends
    sink.discard_run("d1")
    assert sink.flush(FLUSH_S)
    client = MlflowClient(sqlite_uri(workdir))
    assert client.get_run(seen).info.lifecycle_stage == "deleted"
    shipper.catch_up("d1")
    assert sink.flush(FLUSH_S)
    sink.close()
    exp = client.get_experiment_by_name("lrctl")
    assert exp is not None
    runs = client.search_runs([exp.experiment_id], run_view_type=ViewType.ALL)
    assert [r.info.run_id for r in runs] == [seen]


def test_a_discarded_run_whose_key_comes_back_gets_its_policy_in_the_new_mlflow_run(
        workdir: Path, tmp_path: Path) -> None:
    """The key of a run discarded after MLflow had seen it resumes: its new MLflow run
    had no policy tags, no params and no lrctl/policy.yaml (all sent to the deleted run,
    and counted as sent)."""
    state = tmp_path / "state"
    shipper = MlflowShipper(state, flush_interval=0.2, backoff_max=0.5, timeline=False)
    sink = AuditSink(state, FAST, shipper=shipper, env={})
    sink.open_run(run_info("d2", cwd=str(workdir)))
    assert sink.flush(FLUSH_S)
    deleted = mlflow_run_id(state, "d2")
    sink.discard_run("d2")
    assert sink.flush(FLUSH_S)
    sink.open_run(run_info("d2", cwd=str(workdir)))  # the key resumes, the same policy
    drive(sink, "d2", range(40), [0.1, 0.01], every=10)
    sink.close_run("d2")
    assert sink.flush(FLUSH_S)
    sink.close()
    client = MlflowClient(sqlite_uri(workdir))
    run_id = mlflow_run_id(state, "d2")
    assert run_id != deleted
    run = client.get_run(run_id)
    assert run.info.lifecycle_stage == "active"
    assert {"lrctl.policy_sha256", "lrctl.policy", "lrctl.journal"} <= set(run.data.tags)
    assert {"lrctl.policy_sha256", "lrctl.policy"} <= set(run.data.params)
    assert "lrctl/policy.yaml" in {f.path for f in client.list_artifacts(run_id, "lrctl")}


def _sink_while_mlflow_is_down(state: Path, workdir: Path) -> AuditSink:
    """An audit sink whose MLflow (the sqlite store in ``workdir``) refuses every call:
    what it is given waits in the journal."""
    down = GatedClient(sqlite_uri(workdir))
    down.down = True
    shipper = MlflowShipper(state, flush_interval=0.2, backoff_max=0.2,
                            client_factory=lambda uri: down)
    return AuditSink(state, FAST, shipper=shipper, env={})


def test_backlog_is_replayed_by_the_next_controller_exactly_once(
        workdir: Path, tmp_path: Path) -> None:
    state = tmp_path / "state"
    first = _sink_while_mlflow_is_down(state, workdir)
    first.open_run(run_info("r5", cwd=str(workdir)))
    drive(first, "r5", range(150), [0.1, 0.01])
    assert not first.flush(0.5)
    first.close(timeout=0.2)  # controller stops while MLflow is down: nothing shipped
    assert not RunPaths.of(state, "r5").cursor.exists() or not read_json(
        RunPaths.of(state, "r5").cursor).get("streams", {}).get("decisions")

    second = build_sink(str(state))  # a restarted controller: replays on its own
    assert isinstance(second, AuditSink)
    assert second.flush(FLUSH_S)
    second.open_run(run_info("r5", cwd=str(workdir)))  # the session is restored
    drive(second, "r5", range(150, 300), [0.025, 0.0025])
    second.close_run("r5")
    assert second.flush(FLUSH_S)
    second.close()
    client = MlflowClient(sqlite_uri(workdir))
    run_id = mlflow_run_id(state, "r5")
    assert_exactly_once(client, run_id, state, "r5", tmp_path / "a")
    g0 = client.get_metric_history(run_id, "lrctl/lr/g0")

    # A crash after MLflow acknowledged but before the cursor was saved: replay
    # from an old cursor sends everything again, and MLflow ends up the same.
    cursor = RunPaths.of(state, "r5").cursor
    saved = read_json(cursor)
    saved["streams"] = {}
    saved["decision_ts"] = 0
    saved.pop("finished")
    shutil.copy(cursor, tmp_path / "cursor.bak")
    from lrctl.sinks.journal import atomic_write_json
    atomic_write_json(cursor, saved)
    third = build_sink(str(state))
    assert third.flush(FLUSH_S)
    third.close()
    assert_exactly_once(client, run_id, state, "r5", tmp_path / "b")
    assert len(client.get_metric_history(run_id, "lrctl/lr/g0")) == len(g0)
    assert len(client.search_runs([client.get_experiment_by_name("lrctl").experiment_id])) == 1


def test_a_reload_uploads_the_new_version_and_moves_the_tags(workdir: Path,
                                                             tmp_path: Path) -> None:
    sink = AuditSink(tmp_path / "state", FAST, env={})
    sink.open_run(run_info("r6", cwd=str(workdir)))
    sink.observation("r6", 0, 1.0, None, [0.1, 0.01])
    new_text = run_info("r6").policy_text.replace("factor: 0.5", "factor: 0.25")
    info = run_info("r6", cwd=str(workdir), policy_text=new_text,
                    params={"plateau.factor": "0.25", "plateau.extra": "1"})
    sink.policy_changed("r6", info, {"event": "reload", "ok": True, "step": 0})
    sink.decision("r6", decision(1, [0.1, 0.01], [0.05, 0.005]))
    sink.close_run("r6")
    assert sink.flush(FLUSH_S)
    sink.close()
    client = MlflowClient(sqlite_uri(workdir))
    run = client.get_run(mlflow_run_id(tmp_path / "state", "r6"))
    assert run.data.tags["lrctl.policy_sha256"] == info.policy_sha256
    assert run.data.tags["lrctl.policy_version"] == "2"
    assert run.data.params["lrctl.plateau.factor"] == "0.5"  # MLflow params cannot change
    assert run.data.params["lrctl.plateau.extra"] == "1"
    versions = {a.path for a in client.list_artifacts(run.info.run_id, "lrctl/policies")}
    assert len(versions) == 2
    assert download(client, run.info.run_id, "lrctl/policy.yaml", tmp_path) == new_text
    [rec] = journal_decisions(tmp_path / "state", "r6")
    assert rec["policy_version"] == 2


def test_many_runs_with_different_tracking_uris_ship_concurrently(tmp_path: Path) -> None:
    sink = AuditSink(tmp_path / "state", FAST, env={})
    dirs = [tmp_path / f"w{i}" for i in range(3)]
    for i, d in enumerate(dirs):
        d.mkdir()
        sink.open_run(run_info(f"m{i}", cwd=str(d)))
    for step in range(100):
        for i in range(3):
            sink.observation(f"m{i}", step, 1.0, 1.0, [0.1 * (i + 1)])
            if step == 50:
                sink.decision(f"m{i}", decision(step, [0.1 * (i + 1)], [0.05 * (i + 1)]))
    for i in range(3):
        sink.close_run(f"m{i}")
    assert sink.flush(FLUSH_S)
    sink.close()
    assert not [t for t in threading.enumerate() if t.name.startswith("lrctl-mlflow")]
    for i, d in enumerate(dirs):
        client = MlflowClient(sqlite_uri(d))
        assert_exactly_once(client, mlflow_run_id(tmp_path / "state", f"m{i}"),
                            tmp_path / "state", f"m{i}", tmp_path / f"dl{i}")


def test_one_runs_damaged_journal_costs_the_other_runs_nothing(
        workdir: Path, tmp_path: Path) -> None:
    """An adversarial pass's find: a line no writer of ours wrote (``[1]``) at the end of
    one run's events stream stopped every controller from starting on that state
    directory, and a garbage line in one run's decisions stream was taken for an outage
    of the whole MLflow store: no run was shipped."""
    state = tmp_path / "state"
    first = _sink_while_mlflow_is_down(state, workdir)
    for key in ("r-bad", "r-good", "r-worse"):
        first.open_run(run_info(key, cwd=str(workdir)))
        drive(first, key, range(100), [0.1, 0.01])
    first.close(timeout=0.2)  # MLflow was down: everything waits in the journals
    with open(RunPaths.of(state, "r-bad").stream("events"), "ab") as f:
        f.write(b"[1]\n")
    with open(RunPaths.of(state, "r-worse").stream("decisions"), "ab") as f:
        f.write(b"\x84\x99garbage\xff\n")
    second = build_sink(str(state))  # a restarted controller (it died here before)
    assert isinstance(second, AuditSink)
    assert second.flush(FLUSH_S)
    second.close()
    client = MlflowClient(sqlite_uri(workdir))
    run_id = mlflow_run_id(state, "r-good")
    assert_exactly_once(client, run_id, state, "r-good", tmp_path / "a")
    cursor = read_json(RunPaths.of(state, "r-worse").cursor, {})
    assert "damaged" in cursor.get("failed", "") or "bad" in cursor.get("failed", "")


def test_a_fifo_in_a_runs_directory_is_refused_not_waited_on(tmp_path: Path) -> None:
    """A FIFO at a journal stream's or a run file's name hung its reader (the controller
    at its start, ``lrctl runs --all``) in ``open()`` for ever."""
    import os

    from lrctl.sinks.journal import JournalError, last_line, read_lines, tail_records

    fifo = tmp_path / "events.jsonl"
    os.mkfifo(fifo)
    for read in (last_line, lambda p: list(read_lines(p)), tail_records):
        with pytest.raises(JournalError, match="not a regular file"):
            read(fifo)
    assert read_json(fifo, {}) == {}  # read as damaged: empty
    bad = tmp_path / "decisions.jsonl"
    bad.write_bytes(b'{"seq": 1}\n[1]\n')
    with pytest.raises(JournalError, match="bad last line"):
        last_line(bad)
    assert tail_records(bad) == [{"seq": 1}]
