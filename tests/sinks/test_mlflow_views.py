"""What the MLflow UI shows of a run beyond its charts, against real sqlite stores:
the experiment's kind, the run description, the decisions table and how the
decisions files are uploaded, and two runs compared by policy."""

from __future__ import annotations

import gc
import hashlib
import json
import math
from pathlib import Path

import mlflow
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient
from sinks_helpers import (
    FAST,
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
from lrctl.sinks import AuditSink
from lrctl.sinks.journal import RunPaths, atomic_write_json, read_json
from lrctl.sinks.mlflow_sink import MlflowShipper

KIND = "mlflow.experimentKind"
NOTE = "mlflow.note.content"


def sqlite_uri(cwd: Path) -> str:
    return f"sqlite:///{cwd / 'mlflow.db'}"


def note_of(client: MlflowClient, run_id: str) -> str:
    return str(client.get_run(run_id).data.tags.get(NOTE, ""))


def test_experiments_are_tagged_as_model_training_unless_they_have_a_kind(
        workdir: Path, tmp_path: Path) -> None:
    uri = sqlite_uri(workdir)
    client = MlflowClient(uri)
    genai = client.create_experiment("theirs-genai", tags={KIND: "genai_development"})
    plain = client.create_experiment("theirs-plain")
    sink = AuditSink(tmp_path / "state", FAST, env={})
    sink.open_run(run_info("k1", cwd=str(workdir)))  # lrctl creates experiment `lrctl`
    for key, exp in (("k2", genai), ("k3", plain)):  # the scripts' own runs
        run = client.create_run(exp)
        sink.open_run(run_info(key, cwd=str(workdir), tracking_uri=uri,
                               mlflow_run_id=run.info.run_id))
    for key in ("k1", "k2", "k3"):
        drive(sink, key, range(40), [0.1, 0.01])
        sink.close_run(key)
    assert sink.flush(60)
    sink.close()
    ours = client.get_experiment_by_name("lrctl")
    assert ours is not None and ours.tags[KIND] == "custom_model_development"
    assert client.get_experiment(plain).tags[KIND] == "custom_model_development"
    assert client.get_experiment(genai).tags[KIND] == "genai_development"  # the user's choice


def test_the_description_tells_the_story_and_follows_operators_and_reloads(
        workdir: Path, tmp_path: Path) -> None:
    state = tmp_path / "state"
    sink = AuditSink(state, FAST, env={})
    first = run_info("n1", cwd=str(workdir), policy_source="policies/plateau.yaml")
    sink.open_run(first)
    sink.observation("n1", 0, 1.0, None, [0.1, 0.01])
    sink.decision("n1", decision(10, [0.1, 0.01], [0.05, 0.005], reason="loss flat, cut 1"))
    assert sink.flush(60)
    client = MlflowClient(sqlite_uri(workdir))
    run_id = mlflow_run_id(state, "n1")
    note = note_of(client, run_id)  # current during the run, not only at its end
    assert note.startswith("**lrctl** · policy `plateau.yaml`, sha256 "
                           f"`{first.policy_sha256[:12]}` · 1 decision: 1 reduce · ")
    assert "| 10 | plateau | reduce | 0.1 → 0.05 | loss flat, cut 1 |" in note

    sink.decision("n1", decision(20, [0.05, 0.005], [0.2, 0.02], policy="operator",
                                 kind="operator", action="set_lr",
                                 reason="manual LR 0.2 set by an operator, held until cleared"))
    text = first.policy_text.replace("factor: 0.5", "factor: 0.25")
    second = run_info("n1", cwd=str(workdir), policy_text=text,
                      policy_source="policies/plateau.yaml")
    sink.policy_changed("n1", second, {"event": "reload", "ok": True, "step": 20})
    sink.decision("n1", decision(20, [0.2, 0.02], [0.2, 0.02], policy="reload", kind="reload",
                                 action="reload", reason="reloaded plateau.yaml: changed plateau"))
    sink.close_run("n1")
    assert sink.flush(60)
    sink.close()
    note = note_of(client, run_id)
    exp_id = client.get_run(run_id).info.experiment_id
    assert note.splitlines()[0] == (
        f"**lrctl** · policy `plateau.yaml` v2, sha256 `{second.policy_sha256[:12]}` · "
        "3 decisions: 1 reduce, 1 reload, 1 set\\_lr · [training runs of this experiment]"
        f"(#/experiments/{exp_id}/runs?workflowType=machine_learning)")
    rows = [line for line in note.splitlines() if line.startswith("| 2") or
            line.startswith("| 1")]
    assert rows == [
        "| 20 | reload | reload | 0.2 → 0.2 | reloaded plateau.yaml: changed plateau |",
        "| 20 | operator | set\\_lr | 0.05 → 0.2 | manual LR 0.2 set by an operator, held "
        "until cleared |",
        "| 10 | plateau | reduce | 0.1 → 0.05 | loss flat, cut 1 |"]
    tags = client.get_run(run_id).data.tags
    assert tags["lrctl.note_sha256"] == hashlib.sha256(note.encode()).hexdigest()


def test_a_description_someone_wrote_is_never_overwritten(workdir: Path,
                                                          tmp_path: Path) -> None:
    uri = sqlite_uri(workdir)
    client = MlflowClient(uri)
    exp = client.create_experiment("script")
    theirs = client.create_run(exp, tags={NOTE: "baseline run, batch 64"})
    sink = AuditSink(tmp_path / "state", FAST, env={})
    sink.open_run(run_info("u1", cwd=str(workdir), tracking_uri=uri,
                           mlflow_run_id=theirs.info.run_id))
    sink.open_run(run_info("u2", cwd=str(workdir), tracking_uri=uri))
    drive(sink, "u1", range(80), [0.1, 0.01], every=20)
    drive(sink, "u2", range(80), [0.1, 0.01], every=20)
    assert sink.flush(60)
    ours = mlflow_run_id(tmp_path / "state", "u2")
    assert note_of(client, ours).startswith("**lrctl**")
    client.set_tag(ours, NOTE, "edited in the UI: this run is the one")  # a person takes over
    drive(sink, "u1", range(80, 200), [0.1, 0.01], every=20)
    drive(sink, "u2", range(80, 200), [0.1, 0.01], every=20)
    for key in ("u1", "u2"):
        sink.close_run(key)
    assert sink.flush(60)
    sink.close()
    assert note_of(client, theirs.info.run_id) == "baseline run, batch 64"
    assert note_of(client, ours) == "edited in the UI: this run is the one"
    for key, run_id in (("u1", theirs.info.run_id), ("u2", ours)):
        assert_exactly_once(client, run_id, tmp_path / "state", key, tmp_path / key)


def test_the_decisions_table_loads_as_a_dataframe_beside_the_users_own_tables(
        workdir: Path, tmp_path: Path) -> None:
    uri = sqlite_uri(workdir)
    client = MlflowClient(uri)
    exp = client.create_experiment("script")
    run_id = client.create_run(exp).info.run_id
    client.log_table(run_id, {"x": [1, 2]}, "eval/predictions.json")  # the script's own
    sink = AuditSink(tmp_path / "state", FAST, env={})
    sink.open_run(run_info("t1", cwd=str(workdir), tracking_uri=uri, mlflow_run_id=run_id))
    drive(sink, "t1", range(150), [0.1, 0.01], every=30)
    sink.decision("t1", decision(150, ["nan", "nan"], [0.01, 0.001], policy="operator",
                                 action="set_lr", reason="manual LR | after a NaN"))
    sink.close_run("t1")
    assert sink.flush(60)
    sink.close()
    mlflow.set_tracking_uri(uri)  # load_table searches runs through the fluent API
    try:
        table = client.load_table(exp, "lrctl/decisions_table.json", run_ids=[run_id])
    finally:
        mlflow.set_tracking_uri(None)
        gc.collect()  # ends the thread pools of MLflow's artifact repositories (leak guard)
    journal = journal_decisions(tmp_path / "state", "t1")
    assert isinstance(table, pd.DataFrame)
    assert list(table.columns) == ["step", "policy", "action", "old_lr", "new_lr", "reason"]
    assert table["step"].tolist() == [r["step"] for r in journal]
    assert table["reason"].tolist() == [r["reason"] for r in journal]
    # pandas parses JSON floats to within an ulp or so (read_json's precise_float=False)
    assert table["new_lr"].tolist() == pytest.approx([r["new_lrs"][0] for r in journal])
    assert table["old_lr"].tolist()[:-1] == pytest.approx([r["old_lrs"][0]
                                                           for r in journal[:-1]])
    assert math.isnan(table["old_lr"].tolist()[-1])
    logged = json.loads(client.get_run(run_id).data.tags["mlflow.loggedArtifacts"])
    assert logged == [{"path": "eval/predictions.json", "type": "table"},
                      {"path": "lrctl/decisions_table.json", "type": "table"}]


def test_description_and_files_go_once_per_flush_and_uploads_stay_linear(
        workdir: Path, tmp_path: Path) -> None:
    client = GatedClient(sqlite_uri(workdir))
    state = tmp_path / "state"
    shipper = MlflowShipper(state, flush_interval=0.2, backoff_max=0.5,
                            snapshot_interval=3600.0, client_factory=lambda uri: client)
    sink = AuditSink(state, FAST, shipper=shipper, env={})
    client.gate.clear()  # MLflow stalls while 60 decisions are made: one flush takes them
    sink.open_run(run_info("b1", cwd=str(workdir)))
    drive(sink, "b1", range(120), [0.1, 0.01], every=2)
    assert client.waiting.wait(10)
    client.gate.set()
    assert sink.flush(60)
    assert len(journal_decisions(state, "b1")) == 60
    assert len(client.tag_writes(NOTE)) == 1
    assert len(client.uploads("lrctl/decisions.jsonl")) == 1

    lrs = [0.1 * 0.5 ** 60, 0.01 * 0.5 ** 60]
    for step in range(120, 360):  # then one decision per flush, 120 flushes
        sink.observation("b1", step, 1.0, None, lrs)
        if step % 2:
            sink.decision("b1", decision(step, lrs, [x * 0.5 for x in lrs]))
            lrs = [x * 0.5 for x in lrs]
            assert sink.flush(60)
    sink.close_run("b1")
    assert sink.flush(60)
    sink.close()
    run_id = mlflow_run_id(state, "b1")
    assert_exactly_once(client.real, run_id, state, "b1", tmp_path)
    final = RunPaths.of(state, "b1").stream("decisions").stat().st_size
    sizes = client.uploads("lrctl/decisions.jsonl")
    # Whole-file uploads on a geometric schedule: far fewer than the 121 flushes, and
    # fewer bytes in all than 10 times the file (re-uploading on every flush sent ~60x).
    assert sizes[-1] == final and len(sizes) < 40, sizes
    assert sum(sizes) < 10 * final, (sum(sizes), final)
    assert len(client.uploads("lrctl/decisions_table.json")) == len(sizes)
    # The description follows every flush that brought decisions, once each.
    notes = client.tag_writes(NOTE)
    assert 120 <= len(notes) <= 122 and len(set(notes)) == len(notes)
    assert " · 180 decisions: 180 reduce · " in notes[-1].splitlines()[0]
    assert read_json(RunPaths.of(state, "b1").cursor)["snapshot"]["offset"] == final


def test_files_left_behind_by_a_stopped_controller_are_caught_up_by_the_next(
        workdir: Path, tmp_path: Path) -> None:
    state = tmp_path / "state"
    client = MlflowClient(sqlite_uri(workdir))

    def shipper() -> MlflowShipper:
        return MlflowShipper(state, flush_interval=0.2, backoff_max=0.5,
                             snapshot_interval=3600.0)
    first = AuditSink(state, FAST, shipper=shipper(), env={})
    first.open_run(run_info("c1", cwd=str(workdir)))
    lrs = drive(first, "c1", range(400), [0.1, 0.01], every=4)  # 100 decisions
    assert first.flush(60)
    lrs = drive(first, "c1", range(400, 420), lrs, every=4)  # 5 more: 5 %, not yet due
    assert first.flush(60)
    first.close()  # the controller stops; the run goes on elsewhere or never comes back
    run_id = mlflow_run_id(state, "c1")

    def uploaded() -> int:
        return len(download(client, run_id, "lrctl/decisions.jsonl", tmp_path).splitlines())
    assert uploaded() == 100
    assert len(journal_decisions(state, "c1")) == 105
    assert "105 decisions" in note_of(client, run_id)  # the description is current

    second = AuditSink(state, FAST, shipper=shipper(), env={})  # recovers on its own
    assert second.flush(60)
    second.close()
    assert uploaded() == 105


def test_a_run_shipped_by_an_older_lrctl_gets_its_description_and_files(
        workdir: Path, tmp_path: Path) -> None:
    """Its cursor knows nothing of descriptions or snapshots: the next controller
    counts the decisions MLflow already has from the journal and catches up."""
    state = tmp_path / "state"
    client = MlflowClient(sqlite_uri(workdir))
    first = AuditSink(state, FAST, env={})
    first.open_run(run_info("o1", cwd=str(workdir)))
    drive(first, "o1", range(300), [0.1, 0.01], every=30)
    assert first.flush(60)
    first.close()  # the run is not over
    run_id = mlflow_run_id(state, "o1")
    cursor = RunPaths.of(state, "o1").cursor
    old = {k: v for k, v in read_json(cursor).items()
           if k not in ("summary", "snapshot", "note", "kind_checked", "table_registered")}
    atomic_write_json(cursor, old)
    for key in (NOTE, "lrctl.note_sha256"):
        client.delete_tag(run_id, key)

    second = AuditSink(state, FAST, env={})
    assert second.flush(60)
    second.close()
    assert " · 10 decisions: 10 reduce · " in note_of(client, run_id).splitlines()[0]
    assert_exactly_once(client, run_id, state, "o1", tmp_path)


POLICY = """\
version: 1
policies:
  - kind: plateau
    metric: loss
    patience: 15
    factor: {factor}
    threshold: 0.5
    cooldown: 5
"""


def test_two_runs_of_one_script_with_different_policies_compare_by_sha_and_lr_curve(
        workdir: Path, tmp_path: Path) -> None:
    """What MLflow's compare view shows of two runs: the policy sha as a param each,
    and the ``lrctl/lr/g0`` curves, each the LRs its own policy chose."""
    sink = AuditSink(tmp_path / "state", FAST, env={})
    used: dict[str, list[float]] = {}
    shas = {}
    for key, factor in (("cmp-a", 0.5), ("cmp-b", 0.2)):
        text = POLICY.format(factor=factor)
        info = run_info(key, cwd=str(workdir), policy_text=text, run_name="train",
                        policy_source=f"policies/plateau-{factor}.yaml",
                        params={"plateau.factor": str(factor)})
        shas[key] = info.policy_sha256
        engine = lrctl.load_policy(text, base_lrs=[0.1, 0.01])
        sink.open_run(info)
        lrs, used[key] = engine.applied_lrs, []
        for step in range(200):  # the same script: the same losses
            loss = 1.0 + 0.01 * math.sin(step)
            used[key].append(lrs[0])
            sink.observation(key, step, loss, None, lrs)
            lrs = engine.observe(step, loss)
            for d in engine.last_decisions:
                sink.decision(key, d.to_dict())
        sink.close_run(key)
    assert sink.flush(60)
    sink.close()

    client = MlflowClient(sqlite_uri(workdir))
    exp = client.get_experiment_by_name("lrctl")
    assert exp is not None
    assert shas["cmp-a"] != shas["cmp-b"] and used["cmp-a"] != used["cmp-b"]
    for key, sha in shas.items():
        [run] = client.search_runs([exp.experiment_id],
                                   f"params.`lrctl.policy_sha256` = '{sha}'")
        assert run.info.run_id == mlflow_run_id(tmp_path / "state", key)
        assert run.data.params["lrctl.policy"].endswith(".yaml")
        at = lr_curve(client, run.info.run_id, 0)
        assert [at(step) for step in range(200)] == used[key]
