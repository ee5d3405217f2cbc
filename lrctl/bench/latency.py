"""``lrctl bench latency``: how long a decision takes to reach the training loop.

* **sync**: the time ``ctl.step(loss, grad_norm=g)`` blocks in sync mode (send,
  controller, reply), per step inside a digits training loop, as a
  distribution; next to it the same round trip back to back (no training in
  between), which shows what the loop's cold caches and vCPU wake-ups add, and
  the loop again with a hook that sleeps in ``poll`` at once instead of checking
  for the answer for up to ``SPIN_S`` first (what waking the hook costs).
* **async**: the share of steps at whose ``optimizer.step()`` the answer to the
  previous step's observation is in hand (and so its LRs are in effect: the
  pre-step hook applies them), for both orders of ``ctl.step`` and
  ``optimizer.step()``.

Each is measured against a controller as ``lrctl serve`` runs it and one put
under ``SCHED_BATCH``, in interleaved blocks.
"""

from __future__ import annotations

import argparse
import functools
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ._suite import Progress, Suite
from ._targets import Target
from ._timing import interleave, quantile, summary

__all__ = ["SUITE", "LatencyConfig", "run_latency"]

SYNC_P50_US = 100.0
SYNC_P99_US = 1000.0
ASYNC_IN_TIME = 0.995
#: The loop arm again with a hook that blocks in ``poll`` at once (no spin before it):
#: what :data:`lrctl._link.SPIN_S` buys, side by side.
NO_SPIN = "sync, same loop, hook without its spin (sleeps in poll at once)"


@dataclass
class LatencyConfig:
    rounds: int = 10
    steps: int = 300

    @classmethod
    def quick(cls) -> LatencyConfig:
        return cls(rounds=2, steps=20)


def _sync_arm(ctl: Any, tr: Any, steps: int, in_loop: bool, sink: list[float]) -> float:
    import torch

    tr.reset()
    spent = []
    loss = g = 1.0
    for _ in range(steps):
        if in_loop:
            loss = float(tr.loss().detach())
            g = float(torch.nn.utils.get_total_norm([p.grad for p in tr.params]))
        t0 = time.perf_counter()
        ctl.step(loss, grad_norm=g)
        spent.append((time.perf_counter() - t0) * 1e6)
        if in_loop:
            tr.opt.step()
    sink.extend(spent)
    return quantile(spent, 0.5)


def _async_arm(ctl: Any, tr: Any, steps: int, before: bool, sink: list[int]) -> float:
    """Share of optimizer steps at which the previous observation's answer is in."""
    import torch

    tr.reset()
    hits = total = 0
    state = {"need": -1}

    def check(*_: Any) -> None:  # runs after the hook's own pre-step hook (registered later)
        nonlocal hits, total
        if state["need"] >= 0:
            total += 1
            hits += ctl._acked >= state["need"]

    handle = tr.opt.register_step_pre_hook(check)
    try:
        for _ in range(steps):
            loss = tr.loss()
            g = float(torch.nn.utils.get_total_norm([p.grad for p in tr.params]))
            if before:
                state["need"] = ctl._reported - 0  # the last step's report, sent last iteration
                ctl.step(float(loss.detach()), grad_norm=g)
                tr.opt.step()
            else:
                state["need"] = ctl._reported
                tr.opt.step()
                ctl.step(float(loss.detach()), grad_norm=g)
    finally:
        handle.remove()
    sink.extend((hits, total))
    return hits / total if total else math.nan


def run_latency(cfg: LatencyConfig, progress: Progress | None = None) -> dict[str, Any]:
    import lrctl

    from ._controller import ServeProcess
    from ._trainer import Trainer

    result: dict[str, Any] = {"config": {"rounds": cfg.rounds, "steps": cfg.steps}}
    ctls: list[Any] = []
    sync_samples: dict[str, list[float]] = {}
    async_counts: dict[str, list[int]] = {}
    with ServeProcess() as normal, ServeProcess(batch=True) as batch:
        try:
            arms: dict[str, Callable[[], float]] = {}
            for label, srv in (("", normal), (", controller SCHED_BATCH", batch)):
                for in_loop in (True, False):
                    tr = Trainer("digits")
                    ctl = lrctl.attach(tr.opt, socket=srv.socket, spawn=False, sync=True,
                                       run_name="bench-latency")
                    ctls.append(ctl)
                    name = f"sync, {'in a training loop' if in_loop else 'back to back'}{label}"
                    sync_samples[name] = []
                    arms[name] = functools.partial(_sync_arm, ctl, tr, cfg.steps, in_loop,
                                                   sync_samples[name])
                if not label:  # the same loop with a hook that sleeps in poll at once
                    tr = Trainer("digits")
                    ctl = lrctl.attach(tr.opt, socket=srv.socket, spawn=False, sync=True,
                                       run_name="bench-latency")
                    ctls.append(ctl)
                    if ctl._link is not None:
                        ctl._link.spin_s = 0.0
                    name = NO_SPIN
                    sync_samples[name] = []
                    arms[name] = functools.partial(_sync_arm, ctl, tr, cfg.steps, True,
                                                   sync_samples[name])
                for before in (True, False):
                    tr = Trainer("digits")
                    ctl = lrctl.attach(tr.opt, socket=srv.socket, spawn=False,
                                       run_name="bench-latency")
                    ctls.append(ctl)
                    order = "step() before" if before else "step() after"
                    name = f"async, {order} optimizer.step(){label}"
                    async_counts[name] = []
                    arms[name] = functools.partial(_async_arm, ctl, tr, cfg.steps, before,
                                                   async_counts[name])
            blocks = interleave(arms, cfg.rounds, progress, "latency ")
        finally:
            for ctl in ctls:
                ctl.close()
    result["sync"] = []
    for name, xs in sync_samples.items():
        s = summary(xs)
        s["p90"] = quantile(xs, 0.9)
        gated = "training loop" in name
        result["sync"].append({
            "arm": name, "us": s, "block_p50": summary(blocks[name]),
            "ok_p50": (s["median"] <= SYNC_P50_US) if gated else None,
            "ok_p99": (s["p99"] <= SYNC_P99_US) if gated else None})
    result["async"] = []
    for name, counts in async_counts.items():
        hits, total = sum(counts[0::2]), sum(counts[1::2])
        share = hits / total if total else math.nan
        result["async"].append({"arm": name, "in_time": hits, "steps": total, "share": share,
                                "block_share": summary(blocks[name]),
                                "ok": share >= ASYNC_IN_TIME})
    return result


def _verdict(ok: bool | None) -> str:
    return "" if ok is None else ("pass" if ok else "**miss**")


def _render(result: dict[str, Any], out: Path) -> str:
    cfg = result["config"]
    lines = [f"**Sync round trip** per `ctl.step()` ({cfg['rounds']} interleaved rounds of "
             f"{cfg['steps']} steps; targets: p50 ≤ {SYNC_P50_US:g} µs, p99 ≤ "
             f"{SYNC_P99_US:g} µs in a loop)\n",
             "| arm | p50 | IQR | p90 | p99 | block p50 spread | p50 target | p99 target |",
             "|---|---|---|---|---|---|---|---|"]
    for r in result["sync"]:
        s, b = r["us"], r["block_p50"]
        lines.append(f"| {r['arm']} | {s['median']:.0f} µs | {s['q1']:.0f}–{s['q3']:.0f} | "
                     f"{s['p90']:.0f} µs | {s['p99']:.0f} µs | {b['q1']:.0f}–{b['q3']:.0f} | "
                     f"{_verdict(r['ok_p50'])} | {_verdict(r['ok_p99'])} |")
    lines += ["", f"**Async: decisions in effect at t+1** (target ≥ {ASYNC_IN_TIME:.1%})\n",
              "| arm | in effect at t+1 | share | per-block IQR | result |",
              "|---|---|---|---|---|"]
    for r in result["async"]:
        b = r["block_share"]
        lines.append(f"| {r['arm']} | {r['in_time']}/{r['steps']} | {r['share']:.2%} | "
                     f"{b['q1']:.2%}–{b['q3']:.2%} | {_verdict(r['ok'])} |")
    return "\n".join(lines) + "\n"


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 10)")
    p.add_argument("--steps", type=int, default=None, help="steps per block (default 300)")


def _run(args: argparse.Namespace, progress: Progress) -> dict[str, Any]:
    cfg = LatencyConfig.quick() if args.quick else LatencyConfig()
    if args.rounds:
        cfg.rounds = args.rounds
    if args.steps:
        cfg.steps = args.steps
    return run_latency(cfg, progress)


def _targets(result: dict[str, Any]) -> list[Target]:
    out = []
    for r in result["sync"]:
        if r["ok_p50"] is not None:
            out += [Target(f"{r['arm']}: p50", f"≤ {SYNC_P50_US:g} µs",
                           f"{r['us']['median']:.0f} µs", r["ok_p50"]),
                    Target(f"{r['arm']}: p99", f"≤ {SYNC_P99_US:g} µs",
                           f"{r['us']['p99']:.0f} µs", r["ok_p99"])]
    return out + [Target(f"{r['arm']}: decisions in effect at t+1", f"≥ {ASYNC_IN_TIME:.1%}",
                         f"{r['in_time']}/{r['steps']} ({r['share']:.2%})", r["ok"])
                  for r in result["async"]]


SUITE = Suite("latency", "sync round trip in a training loop; async decisions in effect at t+1",
              _add_arguments, _run, _render, _targets)
