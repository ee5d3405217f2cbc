"""``lrctl bench mlflow``: shipping capacity into MLflow, and a slow MLflow off the hot path.

* **shipping**: the controller's audit sink (journal, then MLflow in its worker
  thread) fed every observation of several runs with ``log_every=1`` (three
  points per observation: LR, loss, grad norm; every other one past step 2 000,
  where the periodic points thin out), as fast as the feeding thread
  goes, into a fresh sqlite store; points per second from the first
  observation until ``flush`` returns, counted in the store's ``metrics``
  table, so only points that really landed count.
* **slow MLflow**: the async hook's whole-step overhead on a digits loop with a
  controller that journals and ships to an sqlite store made slow on purpose
  (another process holds an exclusive lock on it 75 % of the time, 0.3 s at a
  time, so MLflow's reads and writes wait in sqlite's busy handler, and now and
  then give up with "database is locked"), against a controller without the audit
  trail and one shipping to an unobstructed store. The slowdown is measured
  too: ``log_metric`` calls on each store.
"""

from __future__ import annotations

import argparse
import functools
import os
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ._suite import Progress, Suite
from ._targets import Target, row_targets
from ._timing import Row, interleave, ratios, rows_table, summary

__all__ = ["SUITE", "MlflowConfig", "run_mlflow"]

POINTS_MIN = 5_000.0
SLOW_RATIO = 1.05
_LOCKER = ("import sqlite3, sys, time\n"
           "c = sqlite3.connect(sys.argv[1], isolation_level=None, timeout=60)\n"
           "while True:\n"
           "    c.execute('BEGIN EXCLUSIVE')\n"
           "    time.sleep(0.3)\n"
           "    c.execute('COMMIT')\n"
           "    time.sleep(0.1)\n")


@dataclass
class MlflowConfig:
    ship_rounds: int = 3
    ship_runs: int = 4
    ship_steps: int = 2500  # per run and round: 4 × 2250 × 3 = 27 000 points (thinned)
    rounds: int = 10
    steps: int = 150

    @classmethod
    def quick(cls) -> MlflowConfig:
        return cls(ship_rounds=1, ship_runs=2, ship_steps=100, rounds=2, steps=10)


def _store(path: Path) -> str:
    """A fresh sqlite tracking store with MLflow's schema in place."""
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{path}"
    MlflowClient(uri).search_experiments()
    return uri


def _points(path: Path) -> int:
    with sqlite3.connect(path, timeout=60) as db:
        return int(db.execute("SELECT COUNT(*) FROM metrics").fetchone()[0])


def _ship_round(root: Path, uri: str, db: Path, cfg: MlflowConfig, tag: str) -> dict[str, Any]:
    import hashlib

    from .._defaults import DEFAULT_POLICY
    from ..sinks import AuditSettings, AuditSink, RunInfo

    text = DEFAULT_POLICY.read_text()
    sha = hashlib.sha256(text.encode()).hexdigest()
    sink = AuditSink(root / f"state-{tag}", AuditSettings(log_every=1, timeline=False),
                     env={"MLFLOW_TRACKING_URI": uri})
    keys = [f"ship-{tag}-{i}" for i in range(cfg.ship_runs)]
    for key in keys:
        sink.open_run(RunInfo(key, key, "<bench>", text, sha, 1, tracking_uri=uri,
                              cwd=str(root)))
    assert sink.shipper is not None
    sink.shipper.flush(120)  # run creation is not what is measured
    before = _points(db)
    t0 = time.perf_counter()
    for step in range(cfg.ship_steps):
        for key in keys:
            sink.observation(key, step, 2.0 / (1 + step), 1.0 + step % 7, [1e-3])
    fed = time.perf_counter() - t0
    flushed = sink.shipper.flush(600)
    seconds = time.perf_counter() - t0
    landed = _points(db) - before
    sink.close()
    return {"points": landed, "seconds": seconds, "per_s": landed / seconds,
            "feed_seconds": fed, "flushed": flushed,
            "expected": 3 * cfg.ship_runs * _periodic(cfg.ship_steps)}


def _periodic(steps: int) -> int:
    """Observations of ``steps`` with points at log_every=1: every one up to step 2 000,
    thinned after (see lrctl.sinks.sampling.periodic_step)."""
    from ..sinks.sampling import periodic_step

    return sum(periodic_step(step, 1) for step in range(steps))


def _log_metric_ms(uri: str, run_id: str, calls: int = 8) -> dict[str, Any]:
    """Milliseconds per ``log_metric`` call (a failed call counts with its time)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    out, failed = [], 0
    for i in range(calls):
        t0 = time.perf_counter()
        try:
            client.log_metric(run_id, "probe", float(i), step=i)
        except Exception:
            failed += 1
        out.append((time.perf_counter() - t0) * 1e3)
        time.sleep(0.137)  # spread the calls over the locker's cycle, not one open window
    return {**summary(out), "failed": failed}


def _probe_run(uri: str) -> str:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    return str(client.create_run(client.create_experiment("probe")).info.run_id)


def run_mlflow(cfg: MlflowConfig, progress: Progress | None = None) -> dict[str, Any]:
    import lrctl

    from ._controller import ServeProcess
    from ._trainer import Trainer, timed_loop

    result: dict[str, Any] = {"config": vars(cfg).copy()}
    with tempfile.TemporaryDirectory(prefix="lrctl-bench-mlflow-") as tmp:
        root = Path(tmp)
        ship_db = root / "ship.db"
        ship_uri = _store(ship_db)
        _ship_round(root, ship_uri, ship_db, MlflowConfig.quick(), "warmup")
        ship = []
        for r in range(cfg.ship_rounds):
            ship.append(_ship_round(root, ship_uri, ship_db, cfg, f"r{r}"))
            if progress is not None:
                progress(f"mlflow shipping round {r + 1}: {ship[-1]['per_s']:,.0f} points/s "
                         f"({ship[-1]['points']} points)", r + 1, cfg.ship_rounds)
        rates = [s["per_s"] for s in ship]
        result["shipping"] = {"rounds": ship, "per_s": summary(rates),
                              "ok": summary(rates)["median"] >= POINTS_MIN}

        fast_uri, slow_db = _store(root / "fast.db"), root / "slow.db"
        slow_uri = _store(slow_db)
        probes = {"fast": _probe_run(fast_uri), "slow": _probe_run(slow_uri)}
        locker = subprocess.Popen([sys.executable, "-c", _LOCKER, str(slow_db)])
        old_uri = os.environ.get("MLFLOW_TRACKING_URI")
        ctls: list[Any] = []
        try:
            time.sleep(0.2)
            result["log_metric_ms"] = {"fast": _log_metric_ms(fast_uri, probes["fast"]),
                                       "slow": _log_metric_ms(slow_uri, probes["slow"])}
            with ServeProcess() as plain, \
                    ServeProcess(audit=True, env={**os.environ,
                                                  "MLFLOW_TRACKING_URI": fast_uri}) as fast, \
                    ServeProcess(audit=True, env={**os.environ,
                                                  "MLFLOW_TRACKING_URI": slow_uri}) as slow:
                arms: dict[str, Callable[[], float]] = {}
                bare = Trainer("digits")
                arms["bare"] = lambda: timed_loop(bare, cfg.steps, lambda loss: None)
                for name, srv, uri in (("no audit", plain, None), ("MLflow sqlite", fast, fast_uri),
                                       ("MLflow sqlite, slowed", slow, slow_uri)):
                    if uri:
                        os.environ["MLFLOW_TRACKING_URI"] = uri  # what the hello carries
                    tr = Trainer("digits")
                    ctl = lrctl.attach(tr.opt, socket=srv.socket, spawn=False,
                                       run_name="bench-mlflow")
                    ctls.append(ctl)
                    arms[f"lrctl async, {name}"] = functools.partial(
                        timed_loop, tr, cfg.steps, ctl.step)
                data = interleave(arms, cfg.rounds, progress, "mlflow overhead ")
                for ctl in ctls:
                    ctl.close()
                ctls.clear()
        finally:
            for ctl in ctls:
                ctl.close()
            locker.kill()
            locker.wait(10)
            if old_uri is None:
                os.environ.pop("MLFLOW_TRACKING_URI", None)
            else:
                os.environ["MLFLOW_TRACKING_URI"] = old_uri
    base = data["lrctl async, no audit"]
    rows = [Row("bare AdamW step", summary([x * 1e3 for x in data["bare"]]), "ms"),
            Row("lrctl async, no audit", summary([x * 1e3 for x in base]), "ms",
                summary(ratios(base, data["bare"])), "bare")]
    for name in ("lrctl async, MLflow sqlite", "lrctl async, MLflow sqlite, slowed"):
        ratio = summary(ratios(data[name], base))
        gated = name.endswith("slowed")
        rows.append(Row(name, summary([x * 1e3 for x in data[name]]), "ms", ratio, "no audit",
                        f"≤ {SLOW_RATIO}×" if gated else "",
                        (ratio["median"] <= SLOW_RATIO) if gated else None))
    result["overhead"] = [row.to_dict() for row in rows]
    return result


def _render(result: dict[str, Any], out: Path) -> str:
    s = result["shipping"]
    cfg = result["config"]
    rounds = ", ".join(f"{r['per_s']:,.0f}" for r in s["rounds"])
    landed = sum(r["points"] for r in s["rounds"])
    expected = sum(r["expected"] for r in s["rounds"])
    lm = result["log_metric_ms"]
    return (f"**Shipping into sqlite**: {cfg['ship_runs']} runs × {cfg['ship_steps']} "
            f"observations ({_periodic(cfg['ship_steps'])} with points: 3 each) per round, "
            f"log_every=1: median "
            f"{s['per_s']['median']:,.0f} points/s (rounds: {rounds}; {landed}/{expected} "
            f"points landed); target ≥ {POINTS_MIN:,.0f}/s: "
            f"{'pass' if s['ok'] else '**miss**'}.\n\n"
            f"**Hook overhead while MLflow is slow** (digits, blocks of {cfg['steps']} steps, "
            f"{cfg['rounds']} interleaved rounds). `log_metric` takes "
            f"{lm['fast']['median']:.1f} ms on the plain store and {lm['slow']['median']:.0f} ms "
            f"(p99 {lm['slow']['p99']:.0f} ms, {lm['slow']['failed']} of "
            f"{lm['slow']['n']:.0f} failed) on the slowed one.\n\n"
            f"{rows_table(result['overhead'])}\n")


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 10)")


def _run(args: argparse.Namespace, progress: Progress) -> dict[str, Any]:
    cfg = MlflowConfig.quick() if args.quick else MlflowConfig()
    if args.rounds:
        cfg.rounds = args.rounds
    return run_mlflow(cfg, progress)


def _targets(result: dict[str, Any]) -> list[Target]:
    ship = result["shipping"]
    return [Target("points shipped into a sqlite store", f"≥ {POINTS_MIN:,.0f}/s",
                   f"{ship['per_s']['median']:,.0f}/s", ship["ok"]),
            *row_targets(result["overhead"], "while MLflow is slow: ")]


SUITE = Suite("mlflow", "points/s shipped into MLflow; hook overhead while MLflow is slow",
              _add_arguments, _run, _render, _targets)
