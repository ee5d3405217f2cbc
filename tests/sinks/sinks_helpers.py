"""Shared pieces of the sink tests: a real ``mlflow server``, RunInfo builders, checks."""

from __future__ import annotations

import dataclasses
import gc
import hashlib
import json
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mlflow.tracking import MlflowClient
from mlflow_server import MLFLOW_BIN, MlflowServer, free_port  # noqa: F401 (re-exported)

from lrctl.sinks import AuditSettings, AuditSink, RunInfo
from lrctl.sinks.journal import RunPaths, read_json, read_lines

POLICY = Path(__file__).resolve().parents[2] / "lrctl" / "data" / "policies" / "default.yaml"
FAST = AuditSettings(log_every=10, flush_interval=0.2, backoff_max=0.5, timeline=False)
FAST_WITH_TIMELINE = dataclasses.replace(FAST, timeline=True)


class GatedClient:
    """A real client whose calls wait while ``gate`` is closed, or fail while ``down``.

    ``calls`` records each call as ``(method name, args, kwargs)``: what lrctl sent."""

    def __init__(self, uri: str) -> None:
        self.real = MlflowClient(uri)
        self.gate = threading.Event()
        self.gate.set()
        self.down = False
        self.waiting = threading.Event()
        self.calls: list[tuple[str, tuple[Any, ...], dict[str, Any]]] = []

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.real, name)

        def call(*args: Any, **kwargs: Any) -> Any:
            self.waiting.set()
            self.gate.wait()
            if self.down:
                raise OSError("connection refused (test)")
            self.calls.append((name, args, kwargs))
            return attr(*args, **kwargs)
        return call

    def uploads(self, artifact_file: str) -> list[int]:
        """Sizes, in characters, of each upload of ``artifact_file`` (``log_text``)."""
        return [len(args[1]) for name, args, _ in self.calls
                if name == "log_text" and args[2] == artifact_file]

    def tag_writes(self, key: str) -> list[str]:
        """Each value lrctl sent for the run tag ``key`` (``log_batch`` or ``set_tag``)."""
        out = []
        for name, args, kwargs in self.calls:
            if name == "log_batch":
                out += [t.value for t in kwargs.get("tags") or () if t.key == key]
            elif name == "set_tag" and args[1] == key:
                out.append(args[2])
        return out


def run_info(key: str, **kw: Any) -> RunInfo:
    text = kw.pop("policy_text", POLICY.read_text())
    defaults: dict[str, Any] = {
        "run_name": f"name-{key}", "policy_source": "policies/default.yaml",
        "policy_text": text, "policy_sha256": hashlib.sha256(text.encode()).hexdigest(),
        "group_count": 2, "params": {"plateau.factor": "0.5", "warmup.steps": "100"}}
    defaults.update(kw)
    return RunInfo(run_key=key, **defaults)


def decision(step: int, old: list[float], new: list[float], **kw: Any) -> dict[str, Any]:
    rec = {"step": step, "policy": "plateau", "kind": "plateau", "action": "reduce",
           "old_lrs": old, "new_lrs": new, "reason": f"loss flat for 10 steps at {step}",
           "evidence": {"metric": "loss", "value": 1.0, "threshold": 1e-3, "window": 10},
           "policy_sha256": "", "shadow": False, "wall_time": time.time()}
    rec.update(kw)
    return rec


def drive(sink: AuditSink, key: str, steps: range, lrs: list[float],
          every: int = 37) -> list[float]:
    """Observations for ``steps``; every ``every`` steps a decision halves the LRs."""
    for step in steps:
        sink.observation(key, step, 2.0 / (step + 1), 0.5 + step % 3, lrs)
        if step % every == every - 1:
            new = [x * 0.5 for x in lrs]
            sink.decision(key, decision(step, lrs, new))
            lrs = new
    return lrs


def mlflow_run_id(state_dir: Path, key: str) -> str:
    return str(read_json(RunPaths.of(state_dir, key).cursor)["run_id"])


def journal_decisions(state_dir: Path, key: str) -> list[dict[str, Any]]:
    return [line.record for line in read_lines(RunPaths.of(state_dir, key).stream("decisions"))]


def assert_exactly_once(client: Any, run_id: str, state_dir: Path, key: str,
                        tmp: Path) -> list[dict[str, Any]]:
    """Every journaled decision is in the MLflow run exactly once: in the decisions
    file and table, as a ``lrctl/decision`` and a ``lrctl/event/<action>`` metric
    point, and in the count tag."""
    journal = journal_decisions(state_dir, key)
    assert journal, "the test should have made decisions"
    uploaded = [json.loads(line) for line in
                download(client, run_id, "lrctl/decisions.jsonl", tmp).splitlines()]
    assert uploaded == journal
    assert [r["seq"] for r in uploaded] == list(range(1, len(journal) + 1))
    history = client.get_metric_history(run_id, "lrctl/decision")
    assert sorted((m.step, m.value) for m in history) == sorted(
        (r["step"], r["new_lrs"][0] / r["old_lrs"][0]) for r in journal)
    for action in {r["action"] for r in journal}:  # one chart per kind of decision
        events = client.get_metric_history(run_id, f"lrctl/event/{action}")
        assert sorted((m.step, m.value) for m in events) == sorted(
            (r["step"], r["new_lrs"][0] / r["old_lrs"][0]) for r in journal
            if r["action"] == action)
    table = json.loads(download(client, run_id, "lrctl/decisions_table.json", tmp))
    assert table["columns"] == ["step", "policy", "action", "old_lr", "new_lr", "reason"]
    assert table["data"] == [[r["step"], r["policy"], r["action"], r["old_lrs"][0],
                              r["new_lrs"][0], r["reason"]] for r in journal]
    tags = client.get_run(run_id).data.tags
    assert tags["lrctl.decisions"] == str(len(journal))
    assert {"path": "lrctl/decisions_table.json", "type": "table"} in json.loads(
        tags["mlflow.loggedArtifacts"])
    return journal


def download(client: Any, run_id: str, path: str, tmp: Path) -> str:
    """An artifact's text. MLflow's artifact repositories start thread pools they never
    shut down; collecting the repository ends its threads (the leak guard checks)."""
    local = client.download_artifacts(run_id, path, str(tmp))
    gc.collect()
    return Path(local).read_text(encoding="utf-8", errors="replace")


def lr_curve(client: Any, run_id: str, group: int) -> Callable[[int], float]:
    """The LR at any step as MLflow's chart shows it: the last point at or before it."""
    points = sorted((m.step, m.timestamp, m.value)
                    for m in client.get_metric_history(run_id, f"lrctl/lr/g{group}"))
    assert len({(s, v) for s, _, v in points}) == len(points), "repeated LR points"

    def at(step: int) -> float:
        before = [v for s, _, v in points if s <= step]
        assert before, f"no LR point at or before step {step}"
        return before[-1]
    return at


def close_for_good(sink: AuditSink) -> None:
    """Close ``sink`` and wait for its MLflow worker threads to end. A controller's exit
    ends them; in a test process one that outlived ``close()``'s short budget would go on
    shipping the journal beside the next sink, as no restarted controller does (a stale
    decisions file uploaded after the new one's)."""
    shipper = sink.shipper
    workers = list(getattr(shipper, "_workers", {}).values())
    sink.close()
    for worker in workers:
        worker.join(30)
        assert not worker.is_alive(), f"{worker.name} did not stop"
