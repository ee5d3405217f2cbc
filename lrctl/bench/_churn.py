"""``lrctl bench throughput``'s churn arm: a controller with its audit trail and MLflow
shipper, runs starting and ending all the time (see :mod:`.throughput`), and the
check that every journaled decision reached MLflow exactly once."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .._sources import policy_payload
from ..wire.operator import request
from ._simrun import SimSpec, collect, spawn
from ._timing import quantile, summary

if TYPE_CHECKING:
    from .throughput import ThroughputConfig

__all__ = ["CHURN_CPU", "CHURN_P99_US", "SHIP_WAIT_S", "churn_row", "churn_window"]

CHURN_P99_US = 10_000.0  # answer latency, 64 runs at 20 Hz with churn and MLflow
CHURN_CPU = 0.50  # of one core, the controller process alone
SHIP_WAIT_S = 240.0  # after the churn window, how long MLflow may take to catch up
#: The churn arm's policy: a plateau that decides every ~60 steps on the simulated
#: curve (a slow fall under noise), i.e. a few decisions in each run's life.
CHURN_POLICY = {"version": 1, "policies": [
    {"kind": "plateau", "metric": "loss", "mode": "min", "factor": 0.9, "patience": 60,
     "threshold": 0.05, "threshold_mode": "rel", "cooldown": 0, "min_lr": 0.0}]}


def _children_cpu_seconds(pid: int) -> float:
    """CPU time of ``pid``'s live child processes (the MLflow shipper)."""
    total = 0.0
    kids: list[str] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):  # a child is its spawning thread's
        with contextlib.suppress(OSError):
            kids += (task / "children").read_text().split()
    for kid in kids:
        try:
            with open(f"/proc/{kid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except (OSError, IndexError, ValueError):
            pass
    return total


def _journaled_decisions(state_dir: Path) -> dict[str, list[int]]:
    """Run key -> the steps of its journaled decisions."""
    out: dict[str, list[int]] = {}
    for path in sorted((state_dir / "runs").glob("*/decisions.jsonl")):
        steps = []
        for line in path.read_text().splitlines():
            try:
                steps.append(int(json.loads(line)["step"]))
            except (ValueError, KeyError, TypeError):
                continue
        if steps:
            out[path.parent.name] = sorted(steps)
    return out


def _mlflow_decisions(uri: str) -> dict[str, list[int]]:
    """Run key -> the steps of its ``lrctl/decision`` points in MLflow."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    out: dict[str, list[int]] = {}
    exps = [e.experiment_id for e in client.search_experiments()]
    token = None
    while True:
        page = client.search_runs(exps, max_results=1000, page_token=token)
        for run in page:
            key = run.data.tags.get("lrctl.run_key")
            if key is None:
                continue
            hist = client.get_metric_history(run.info.run_id, "lrctl/decision")
            if hist:
                out.setdefault(key, []).extend(m.step for m in hist)
        token = page.token
        if not token:
            break
    return {k: sorted(v) for k, v in out.items()}


def churn_window(cfg: ThroughputConfig, workers_max: int, tag: str) -> dict[str, Any]:
    """One controller with the audit trail and a fresh sqlite store, runs churning."""
    from ._controller import ServeProcess
    from .mlflow_bench import _store

    srv = ServeProcess(audit=True)
    try:
        # The store is created once, here, before the controller and its shipper use it.
        uri = _store(srv.root / "mlflow.db")
        srv.env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
        work = srv.root / "work"
        work.mkdir()
        text = policy_payload(CHURN_POLICY)[0]
        with srv:
            rss0 = srv.rss_mib()
            workers = min(cfg.churn_runs, workers_max)
            start_at = time.time() + 1.5 + 0.02 * cfg.churn_runs
            procs = []
            for i in range(workers):
                share = cfg.churn_runs // workers + (i < cfg.churn_runs % workers)
                spec = SimSpec(srv.socket, share, text, start_at, cfg.churn_seconds, cfg.churn_hz,
                               f"{tag}-{i}",
                               lifetime=cfg.churn_lifetime, cwd=str(work), tracking_uri=uri,
                               seed=1000 * i + 1 + int(tag[1:]))
                procs.append(spawn(spec))
            time.sleep(max(0.0, start_at - time.time()))
            cpu0, kid0 = srv.cpu_seconds(), _children_cpu_seconds(srv.pid)
            t0 = time.perf_counter()
            time.sleep(cfg.churn_seconds)
            cpu1, kid1 = srv.cpu_seconds(), _children_cpu_seconds(srv.pid)
            t1 = time.perf_counter()
            rss1 = srv.rss_mib()
            parts = collect(procs)
            status = request({"t": "status"}, srv.socket, timeout=10.0)
            shipper_rss = ((status.get("shipper") or {}).get("rss_kib") or 0) / 1024
            # Shipping done: every journaled decision in MLflow, or give up after a while.
            t_end = time.perf_counter()
            journaled = _journaled_decisions(Path(srv.state_dir))
            shipped = _mlflow_decisions(uri)
            while shipped != journaled and time.perf_counter() - t_end < cfg.ship_wait_s:
                time.sleep(1.0)
                journaled = _journaled_decisions(Path(srv.state_dir))
                shipped = _mlflow_decisions(uri)
            ship_lag = time.perf_counter() - t_end
    finally:
        shutil.rmtree(srv.root, ignore_errors=True)
    answered = sum(p["answered"] for p in parts)
    seconds = max(p["seconds"] for p in parts)
    n_journaled = sum(len(v) for v in journaled.values())
    n_shipped = sum(len(v) for v in shipped.values())
    return {"runs": cfg.churn_runs, "rate_hz": cfg.churn_hz, "answered": answered,
            "per_s": answered / seconds, "offered_per_s": cfg.churn_runs * cfg.churn_hz,
            "latencies_us": [x for p in parts for x in p["latencies_us"]],
            "handshakes_us": [x for p in parts for x in p["handshakes_us"]],
            "max_us": max(p["max_us"] for p in parts),
            "cpu_share": (cpu1 - cpu0) / (t1 - t0),
            "cpu_us_per_obs": (cpu1 - cpu0) / max(answered, 1) * 1e6 * seconds / (t1 - t0),
            "shipper_cpu_share": (kid1 - kid0) / (t1 - t0),
            "late": sum(p["late"] for p in parts),
            "started": sum(p["started"] for p in parts), "ended": sum(p["ended"] for p in parts),
            "rss_mib": rss1, "rss_before_mib": rss0, "shipper_rss_mib": shipper_rss,
            "decisions_journaled": n_journaled, "decisions_mlflow": n_shipped,
            "decisions_exact": shipped == journaled, "runs_journaled": len(journaled),
            "ship_lag_s": ship_lag}


def churn_row(name: str, ws: list[dict[str, Any]]) -> dict[str, Any]:
    lat = [x for w in ws for x in w["latencies_us"]]
    hs = [x for w in ws for x in w["handshakes_us"]]
    row: dict[str, Any] = {
        "arm": name, "per_s": summary([w["per_s"] for w in ws]),
        "offered_per_s": ws[0]["offered_per_s"],
        "latency_us": {"p50": quantile(lat, 0.5), "p99": quantile(lat, 0.99),
                       "max": max(w["max_us"] for w in ws)},
        "p99_rounds_us": summary([quantile(w["latencies_us"], 0.99) for w in ws]),
        "handshake_us": {"p50": quantile(hs, 0.5), "p99": quantile(hs, 0.99),
                         "max": max(hs, default=float("nan"))},
        "cpu_share": summary([w["cpu_share"] for w in ws]),
        "cpu_us_per_obs": summary([w["cpu_us_per_obs"] for w in ws]),
        "shipper_cpu_share": summary([w["shipper_cpu_share"] for w in ws]),
        "late": sum(w["late"] for w in ws),
        "rss_mib": max(w["rss_mib"] for w in ws),
        "rss_before_mib": max(w["rss_before_mib"] for w in ws),
        "shipper_rss_mib": max(w["shipper_rss_mib"] for w in ws),
        "started": summary([float(w["started"]) for w in ws]),
        "ended": summary([float(w["ended"]) for w in ws]),
        "decisions_journaled": sum(w["decisions_journaled"] for w in ws),
        "decisions_mlflow": sum(w["decisions_mlflow"] for w in ws),
        "decisions_exact": all(w["decisions_exact"] for w in ws),
        "ship_lag_s": summary([w["ship_lag_s"] for w in ws]),
        "churn": True,
        "target": f"p99 ≤ {CHURN_P99_US / 1000:g} ms, controller CPU ≤ {CHURN_CPU:.0%} of a "
                  "core, every decision in MLflow once"}
    row["cpu_share_at_offered"] = row["cpu_us_per_obs"]["median"] * row["offered_per_s"] / 1e6
    row["ok"] = (row["latency_us"]["p99"] <= CHURN_P99_US
                 and row["cpu_share"]["median"] <= CHURN_CPU
                 and row["cpu_share_at_offered"] <= CHURN_CPU and row["decisions_exact"])
    return row
