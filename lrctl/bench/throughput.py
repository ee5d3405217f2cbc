"""``lrctl bench throughput``: how many runs one controller serves, and at what cost.

Simulated runs (:mod:`._simrun`, raw protocol clients in two worker processes)
talk to a real ``lrctl serve`` (no audit trail). Two measurements, repeated in
interleaved rounds:

* **unpaced**: N ∈ {1, 4, 16, 64} runs, each sending its next observation as
  soon as the last one is answered: observations answered per second, the
  answer latency distribution, and the controller's CPU time per observation
  (from ``/proc/PID/stat``, so the figure does not depend on how many cores the
  clients take);
* **paced**: 64 runs at 100 observations/s each, the controller's CPU share
  over the window, and its resident memory (``VmRSS``) before and after. These
  runs behave as the asynchronous hook does (see :func:`._simrun.drive_async`):
  they say ``pace`` in their hello, and each step reads the answer to the step
  before without waiting on the socket in between, so the controller reads them on
  its timer (:mod:`lrctl.daemon.pacing`) and its answers wake no one. The tables
  up to ``4a8b48b`` measured runs that were read as their frames came and slept on
  their sockets for the answers: every observation woke the controller and every
  answer a worker, which a hook's loop does not do. Instead of latencies: how many
  answers were in by their run's next step, and the waits for those that were not;
* **churn, MLflow on**: a controller *with* its audit trail (journal, group
  commit, the MLflow shipper child) shipping to a sqlite store, 64 runs at 20 Hz
  where each run ends (``bye``) after a random 5–15 s and a new one takes its
  place, under a plateau policy that decides every few seconds per run. Besides
  the figures above: the time to each new run's welcome, the shipper's CPU
  apart, runs started and ended, and whether every journaled decision reached
  MLflow exactly once (``lrctl/decision`` points per run, once shipping is done).
  A fresh controller and store per round.

On a 2-core machine the clients compete with the controller for CPU, so the
unpaced rates are a floor of what the controller alone could do.
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ._churn import SHIP_WAIT_S, churn_row, churn_window
from ._simrun import SimSpec, collect, spawn
from ._suite import Progress, Suite
from ._targets import Target, row_targets
from ._timing import quantile, summary

__all__ = ["SUITE", "ThroughputConfig", "run_throughput"]

UNPACED_MIN = 50_000.0  # observations/s at N=16
UNPACED_P99_US = 2000.0
PACED_CPU = 0.30  # of one core, 64 runs at 100 Hz
WORKERS = 2
ARMS = ("unpaced", "paced", "churn")


@dataclass
class ThroughputConfig:
    runs: tuple[int, ...] = (1, 4, 16, 64)
    seconds: float = 3.0
    rounds: int = 3
    paced_runs: int = 64
    paced_hz: float = 100.0
    policy: Any = None
    churn_runs: int = 64  # 0: no churn arm
    churn_hz: float = 20.0
    churn_seconds: float = 30.0
    churn_rounds: int = 3
    churn_lifetime: tuple[float, float] = (5.0, 15.0)
    arms: tuple[str, ...] = ARMS  # which of them to run (``--only``)
    ship_wait_s: float = SHIP_WAIT_S

    @classmethod
    def quick(cls) -> ThroughputConfig:
        return cls(runs=(1, 4), seconds=0.5, rounds=1, paced_runs=4, churn_runs=4,
                   churn_seconds=2.0, churn_rounds=1, churn_lifetime=(0.5, 1.5))


def _policy_text(policy: Any) -> str:
    from .._sources import policy_payload

    return policy_payload(policy)[0]


def _one(socket: str, n: int, cfg: ThroughputConfig, text: str, rate: float | None, srv: Any,
         tag: str) -> dict[str, Any]:
    """One measurement window: N runs split over the workers, controller CPU around it."""
    workers = min(n, WORKERS)
    start_at = time.time() + 1.5 + 0.02 * n  # worker start-up and handshakes come first
    procs = []
    for i in range(workers):
        spec = SimSpec(socket, n // workers + (i < n % workers), text, start_at, cfg.seconds,
                       rate, f"{tag}-{i}", pace=rate is not None)
        procs.append(spawn(spec))
    time.sleep(max(0.0, start_at - time.time()))
    cpu0, t0 = srv.cpu_seconds(), time.perf_counter()
    time.sleep(cfg.seconds)
    cpu1, t1 = srv.cpu_seconds(), time.perf_counter()
    parts = collect(procs)
    answered = sum(p["answered"] for p in parts)
    seconds = max(p["seconds"] for p in parts)
    lat = [x for p in parts for x in p["latencies_us"]]
    cpu = (cpu1 - cpu0) / (t1 - t0)
    hooklike = {}
    if rate is not None:  # (see _simrun.drive_async)
        hooklike = {"in_time": sum(p["in_time"] for p in parts),
                    "waited": sum(p["waited"] for p in parts),
                    "waits_us": [x for p in parts for x in p["waits_us"]]}
    return {"runs": n, "rate_hz": rate, "answered": answered, "per_s": answered / seconds,
            "latencies_us": lat, "cpu_share": cpu, **hooklike,
            "cpu_us_per_obs": (cpu1 - cpu0) / max(answered, 1) * 1e6 * seconds / (t1 - t0),
            "late": sum(p["late"] for p in parts), "rss_mib": srv.rss_mib()}


def run_throughput(cfg: ThroughputConfig, progress: Progress | None = None) -> dict[str, Any]:
    from ._controller import ServeProcess

    text = _policy_text(cfg.policy)
    windows: dict[str, list[dict[str, Any]]] = {}
    plan: list[tuple[str, int, float | None]] = []
    if "unpaced" in cfg.arms:
        plan += [(f"unpaced N={n}", n, None) for n in cfg.runs]
    if "paced" in cfg.arms:
        plan.append((f"paced {cfg.paced_runs} × {cfg.paced_hz:g} Hz", cfg.paced_runs,
                     cfg.paced_hz))
    churn = cfg.churn_runs > 0 and "churn" in cfg.arms
    total = cfg.rounds * len(plan) + (cfg.churn_rounds if churn else 0)
    done = 0
    rss_idle: float | None = None
    rss_end: float | None = None
    if plan:
        with ServeProcess() as srv:
            rss_idle = srv.rss_mib()
            for r in range(cfg.rounds):
                k = r % len(plan)
                for name, n, rate in plan[k:] + plan[:k]:
                    w = _one(srv.socket, n, cfg, text, rate, srv, f"r{r}")
                    windows.setdefault(name, []).append(w)
                    done += 1
                    if progress is not None:
                        answers = (f"p99 {quantile(w['latencies_us'], 0.99):.0f} µs"
                                   if rate is None else f"{w['in_time']:,} answers in by "
                                   f"the next step, {w['waited']} waited for")
                        progress(f"throughput {name}: {w['per_s']:,.0f} obs/s, controller "
                                 f"CPU {w['cpu_share']:.0%}, {answers}", done, total)
            rss_end = srv.rss_mib()
    rows = [_row(name, ws, cfg) for name, ws in windows.items()]
    if churn:
        name = (f"paced {cfg.churn_runs} × {cfg.churn_hz:g} Hz, churn, MLflow on")
        ws = []
        for r in range(cfg.churn_rounds):
            w = churn_window(cfg, WORKERS, f"c{r}")
            ws.append(w)
            done += 1
            if progress is not None:
                progress(f"throughput {name}: {w['per_s']:,.0f} obs/s, controller CPU "
                         f"{w['cpu_share']:.0%}, shipper {w['shipper_cpu_share']:.0%}, p99 "
                         f"{quantile(w['latencies_us'], 0.99):.0f} µs, decisions "
                         f"{w['decisions_mlflow']}/{w['decisions_journaled']} in MLflow",
                         done, total)
        rows.append(churn_row(name, ws))
    return {"config": {"runs": list(cfg.runs), "seconds": cfg.seconds, "rounds": cfg.rounds,
                       "paced_runs": cfg.paced_runs, "paced_hz": cfg.paced_hz,
                       "workers": WORKERS, "churn_runs": cfg.churn_runs,
                       "churn_hz": cfg.churn_hz, "churn_seconds": cfg.churn_seconds,
                       "churn_rounds": cfg.churn_rounds,
                       "churn_lifetime": list(cfg.churn_lifetime), "arms": list(cfg.arms)},
            "rows": rows,
            "rss_mib": {"idle": rss_idle, "end": rss_end}}


def _row(name: str, ws: list[dict[str, Any]], cfg: ThroughputConfig) -> dict[str, Any]:
    lat = [x for w in ws for x in w["latencies_us"]]
    row: dict[str, Any] = {
        "arm": name, "per_s": summary([w["per_s"] for w in ws]),
        "latency_us": {"p50": quantile(lat, 0.5), "p99": quantile(lat, 0.99)},
        "cpu_share": summary([w["cpu_share"] for w in ws]),
        "cpu_us_per_obs": summary([w["cpu_us_per_obs"] for w in ws]),
        "late": sum(w["late"] for w in ws), "rss_mib": max(w["rss_mib"] for w in ws),
        "target": "", "ok": None}
    n, rate = ws[0]["runs"], ws[0]["rate_hz"]
    if rate is None and n == 16:
        row["target"] = f"≥ {UNPACED_MIN:,.0f}/s, p99 ≤ {UNPACED_P99_US:g} µs"
        row["ok"] = (row["per_s"]["median"] >= UNPACED_MIN
                     and row["latency_us"]["p99"] <= UNPACED_P99_US)
    if rate is not None:
        # When the clients fall behind the offered rate, the CPU share they caused
        # understates the load: judge the controller's CPU per observation at the full rate.
        row["offered_per_s"] = n * rate
        waits = [x for w in ws for x in w["waits_us"]]
        row["in_time"] = sum(w["in_time"] for w in ws)
        row["waited"] = sum(w["waited"] for w in ws)
        row["wait_us"] = {"p50": quantile(waits, 0.5), "max": max(waits, default=math.nan)}
        row["cpu_share_at_offered"] = row["cpu_us_per_obs"]["median"] * n * rate / 1e6
        if n == 64:
            row["target"] = f"CPU ≤ {PACED_CPU:.0%} of a core at {n * rate:,.0f} obs/s"
            row["ok"] = (row["cpu_share"]["median"] <= PACED_CPU
                         and row["cpu_share_at_offered"] <= PACED_CPU)
    return row


def _render(result: dict[str, Any], out: Path) -> str:
    cfg = result["config"]
    lines = [f"{cfg['rounds']} interleaved rounds of {cfg['seconds']:g} s windows; clients in "
             f"{cfg['workers']} worker processes on the same machine.\n",
             "| arm | answered/s (IQR) | latency p50 | p99 | controller CPU (IQR) | "
             "CPU µs/obs | RSS | target | result |", "|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        p, c, u = r["per_s"], r["cpu_share"], r["cpu_us_per_obs"]
        verdict = "" if r["ok"] is None else ("pass" if r["ok"] else "**miss**")
        lat = r["latency_us"]
        lines.append(f"| {r['arm']} | {p['median']:,.0f} ({p['q1']:,.0f}–{p['q3']:,.0f}) | "
                     f"{_us(lat['p50'])} | {_us(lat['p99'])} | "
                     f"{c['median']:.0%} ({c['q1']:.0%}–{c['q3']:.0%}) | {u['median']:.1f} | "
                     f"{r['rss_mib']:.0f} MiB | {r['target']} | {verdict} |")
    for r in result["rows"]:
        if r.get("churn"):
            h, sh, st, en = r["handshake_us"], r["shipper_cpu_share"], r["started"], r["ended"]
            lines.append(
                f"\n{r['arm']} ({cfg.get('churn_rounds')} rounds of "
                f"{cfg.get('churn_seconds'):g} s, each run living "
                f"{cfg['churn_lifetime'][0]:g}–{cfg['churn_lifetime'][1]:g} s, a fresh "
                f"controller and sqlite store per round): {r['per_s']['median']:,.0f} of "
                f"{r['offered_per_s']:,.0f} offered observations/s answered ({r['late']} sends "
                f"late); answer latency max {r['latency_us']['max'] / 1000:.1f} ms (p99 per "
                f"round {r['p99_rounds_us']['q1'] / 1000:.1f}–"
                f"{r['p99_rounds_us']['q3'] / 1000:.1f} ms); hello to welcome p50 "
                f"{h['p50'] / 1000:.1f} ms, p99 {h['p99'] / 1000:.1f} ms; "
                f"{st['median']:.0f} runs started and {en['median']:.0f} ended per window; "
                f"controller {r['cpu_share']['median']:.0%} of a core "
                f"({r['cpu_share_at_offered']:.0%} at the full rate), the MLflow shipper "
                f"{sh['median']:.0%} ({sh['q1']:.0%}–{sh['q3']:.0%}); controller RSS "
                f"{r['rss_before_mib']:.0f} → {r['rss_mib']:.0f} MiB, shipper "
                f"{r['shipper_rss_mib']:.0f} MiB; decisions: {r['decisions_journaled']} "
                f"journaled, {r['decisions_mlflow']} in MLflow "
                f"({'each exactly once' if r['decisions_exact'] else '**not exact**'}, "
                f"shipped {r['ship_lag_s']['median']:.1f} s after the load stopped); "
                f"{r['target']}: {'pass' if r['ok'] else '**miss**'}.")
        elif "offered_per_s" in r:
            waited = (f"{r['waited']} waited for (p50 {r['wait_us']['p50']:.0f} µs, max "
                      f"{r['wait_us']['max']:.0f} µs)" if r["waited"] else "none waited for")
            lines.append(f"\n{r['arm']}: {r['per_s']['median']:,.0f} of {r['offered_per_s']:,.0f} "
                         f"offered observations/s answered ({r['late']} sends late); at the "
                         f"full rate the controller would use {r['cpu_share_at_offered']:.0%} "
                         f"of a core. Its runs behave as asynchronous hooks do (no latency "
                         f"is measured: see lrctl.bench._simrun.drive_async): "
                         f"{r['in_time']:,} answers were in by their run's next step, "
                         f"{waited}.")
    rss = result["rss_mib"]
    if rss["idle"] is not None:  # (not with --only churn: that arm reports its own)
        lines.append(f"\nController RSS: {rss['idle']:.0f} MiB idle, {rss['end']:.0f} MiB at "
                     "the end.")
    return "\n".join(lines) + "\n"


def _us(x: float) -> str:
    return "—" if math.isnan(x) else f"{x:.0f} µs"


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seconds", type=float, default=None, help="window length (default 3)")
    p.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 3)")
    p.add_argument("--only", default=None, metavar="ARMS",
                   help=f"comma-separated arms to run, of {', '.join(ARMS)} (default: all)")
    p.add_argument("--churn-rounds", type=int, default=None,
                   help="rounds of the churn arm, each with a fresh controller (default 3)")
    p.add_argument("--churn-seconds", type=float, default=None,
                   help="the churn arm's window (default 30)")
    p.add_argument("--ship-wait", type=float, default=None, metavar="S",
                   help="after a churn window, how long MLflow may take to catch up before "
                        f"its decisions are counted (default {SHIP_WAIT_S:g})")


def _run(args: argparse.Namespace, progress: Progress) -> dict[str, Any]:
    cfg = ThroughputConfig.quick() if args.quick else ThroughputConfig()
    if args.seconds:
        cfg.seconds = args.seconds
    if args.rounds:
        cfg.rounds = args.rounds
    if args.only:
        arms = tuple(a.strip() for a in args.only.split(",") if a.strip())
        unknown = [a for a in arms if a not in ARMS]
        if unknown or not arms:
            raise SystemExit(f"lrctl bench throughput: --only takes arms of {', '.join(ARMS)}, "
                             f"but got {args.only!r}")
        cfg.arms = arms
    if args.churn_rounds:
        cfg.churn_rounds = args.churn_rounds
    if args.churn_seconds:
        cfg.churn_seconds = args.churn_seconds
    if args.ship_wait is not None:
        cfg.ship_wait_s = args.ship_wait
    cfg.policy = args.policy
    return run_throughput(cfg, progress)


def _measured(r: Mapping[str, Any]) -> str:
    lat, cpu = r["latency_us"], r["cpu_share"]["median"]
    if r.get("churn"):
        return (f"p99 {lat['p99'] / 1000:.1f} ms (max {lat['max'] / 1000:.0f} ms), controller "
                f"{cpu:.0%} of a core, {r['decisions_mlflow']} of {r['decisions_journaled']} "
                f"decisions in MLflow ({'exactly once' if r['decisions_exact'] else 'not exact'})")
    if "offered_per_s" in r:
        return (f"{cpu:.0%} of a core ({r['cpu_share_at_offered']:.0%} at the full rate), "
                f"{r['per_s']['median']:,.0f} of {r['offered_per_s']:,.0f} obs/s answered")
    return (f"{r['per_s']['median']:,.0f} obs/s, p99 {lat['p99']:,.0f} µs, "
            f"{r['cpu_us_per_obs']['median']:.1f} µs of controller CPU per observation")


def _targets(result: dict[str, Any]) -> list[Target]:
    return row_targets(result["rows"], measured=_measured)


SUITE = Suite("throughput", "observations/s and controller CPU with many concurrent runs",
              _add_arguments, _run, _render, _targets)
