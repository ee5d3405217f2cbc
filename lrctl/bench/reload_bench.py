"""``lrctl bench reload``: edit-to-effect time of live policy editing, at the optimizer.

A real ``lrctl serve`` watches the policy file of a run whose hook steps a
tiny optimizer about once a millisecond (async, as in training). Each edit
rewrites the file with a new ``max_lr`` clamp, which moves the LR at once. The
clock runs from the write to the first step at which the optimizer holds the
new LR: the watcher's debounce (150 ms by design), the reload, the pushed
``lr`` frame and the hook's next step are all inside it. Edits are spaced
beyond the debounce so that each one is a reload of its own.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ._suite import Progress, Suite
from ._targets import Target
from ._timing import summary

__all__ = ["SUITE", "ReloadConfig", "run_reload"]

P99_MS = 500.0
BASE_LR = 0.1
CLAMPS = (0.05, 0.02)  # alternated: every edit moves the LR
STEP_EVERY_S = 0.001
GIVE_UP_S = 10.0


@dataclass
class ReloadConfig:
    edits: int = 40
    gap_s: float = 0.4  # between an edit taking effect and the next edit

    @classmethod
    def quick(cls) -> ReloadConfig:
        return cls(edits=3, gap_s=0.3)


def _policy(max_lr: float) -> str:
    return (f"version: 1\nmax_lr: {max_lr!r}\npolicies:\n"
            "  - kind: plateau\n    patience: 1000000\n")


def run_reload(cfg: ReloadConfig, progress: Progress | None = None) -> dict[str, Any]:
    import torch

    import lrctl

    from ._controller import ServeProcess

    waits_ms: list[float] = []
    missed = 0
    with ServeProcess() as srv, tempfile.TemporaryDirectory(prefix="lrctl-reload-") as tmp:
        path = Path(tmp) / "policy.yaml"
        path.write_text(_policy(1.0))
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=BASE_LR)
        with lrctl.attach(opt, policy=str(path), socket=srv.socket, spawn=False,
                          run_name="bench-reload") as ctl:
            for i in range(cfg.edits):
                want = CLAMPS[i % len(CLAMPS)]
                _spin(ctl, opt, cfg.gap_s)
                started = time.perf_counter()
                path.write_text(_policy(want))
                took = _until(ctl, opt, want, started + GIVE_UP_S)
                if took is None:
                    missed += 1
                else:
                    waits_ms.append((took - started) * 1000.0)
                if progress is not None:
                    last = f"{waits_ms[-1]:.0f} ms" if took is not None else "no effect"
                    progress(f"reload edit {i + 1}/{cfg.edits}: {last}", i + 1, cfg.edits)
            reloads = sum(d.action == "reload" for d in ctl.decisions)
    s = summary(waits_ms)
    return {"config": {"edits": cfg.edits, "gap_s": cfg.gap_s},
            "ms": s, "max_ms": max(waits_ms, default=float("nan")), "missed": missed,
            "reload_decisions": reloads,
            "ok": missed == 0 and s["p99"] <= P99_MS}


def _spin(ctl: Any, opt: Any, seconds: float) -> None:
    """Training steps (async hook, ~1 ms each) for ``seconds``."""
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        ctl.step(1.0, grad_norm=1.0)
        opt.step()
        time.sleep(STEP_EVERY_S)


def _until(ctl: Any, opt: Any, lr: float, deadline: float) -> float | None:
    """Step until the optimizer holds ``lr``; the time it first does, or None."""
    while time.perf_counter() < deadline:
        ctl.step(1.0, grad_norm=1.0)
        opt.step()  # the pre-step hook has applied whatever arrived
        if opt.param_groups[0]["lr"] == lr:
            return time.perf_counter()
        time.sleep(STEP_EVERY_S)
    return None


def _render(result: dict[str, Any], out: Path) -> str:
    s = result["ms"]
    verdict = "pass" if result["ok"] else "**miss**"
    return "\n".join([
        f"**Edit-to-effect** of a watched policy file, at the optimizer "
        f"({result['config']['edits']} edits, hook stepping every ~1 ms; "
        f"target p99 ≤ {P99_MS:g} ms)\n",
        "| edits in effect | p50 | IQR | p99 | max | reload decisions | target |",
        "|---|---|---|---|---|---|---|",
        f"| {int(s['n'])}/{result['config']['edits']} | {s['median']:.0f} ms | "
        f"{s['q1']:.0f}–{s['q3']:.0f} | {s['p99']:.0f} ms | {result['max_ms']:.0f} ms | "
        f"{result['reload_decisions']} | {verdict} |",
    ]) + "\n"


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--edits", type=int, default=None, help="edits to time (default 40)")


def _run(args: argparse.Namespace, progress: Progress) -> dict[str, Any]:
    cfg = ReloadConfig.quick() if args.quick else ReloadConfig()
    if args.edits:
        cfg.edits = args.edits
    return run_reload(cfg, progress)


def _targets(result: dict[str, Any]) -> list[Target]:
    s = result["ms"]
    return [Target("policy file edit to effect at the optimizer",
                   f"p99 ≤ {P99_MS:g} ms, no edit missed",
                   f"p50 {s['median']:.0f} ms, p99 {s['p99']:.0f} ms over "
                   f"{int(s['n'])} edits, {result['missed']} missed", result["ok"])]


SUITE = Suite("reload", "edit-to-effect time of a watched policy file, at the optimizer",
              _add_arguments, _run, _render, _targets)
