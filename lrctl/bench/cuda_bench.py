"""``lrctl bench cuda``: what the hook costs a GPU training step, and that it never syncs.

Runs where torch sees a CUDA device (``--device cpu`` runs the same arms on the CPU, as a
smoke test of the suite; without a device it says so and measures nothing). Against a
real ``lrctl serve`` (no audit trail), for each model size of :mod:`._gpt` (``tiny``, a
step bound by its kernel launches; ``small``, GPT-2 small's depth and width over 1 024
tokens, bound by the GPU):

* **step ratio**: wall time per step, the async hook computing the grad norm against
  the bare step, and the hook handed ``clip_grad_norm_``'s norm against the bare step
  that clips; interleaved blocks (the device synchronised around each), medians of the
  per-round ratios (see :mod:`._timing`). Target: ≤ 1.02× on ``small``;
* **host syncs**: both hooked loops step under ``torch.cuda.set_sync_debug_mode("error")``
  (which raises on any host-device synchronisation) once the first steps are past (they
  may sync: pinned buffers, optimizer state, cuBLAS workspaces). Target: none.
"""

from __future__ import annotations

import argparse
import functools
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ._suite import Progress, Suite
from ._targets import Target, row_targets
from ._timing import Row, interleave, ratios, rows_table, summary

__all__ = ["SUITE", "CudaConfig", "run_cuda"]

TARGET_STEP = 1.02  # the hook on the GPU-bound GPT's step
TARGET_SIZE = "small"
WARMUP = 5
BARE, HOOK = "bare step", "lrctl async (computes the grad norm)"
CLIPPED, GIVEN = "bare + clip_grad_norm_", "lrctl async, grad_norm=clip_grad_norm_(...)"
#: (arm, hooked, clips)
ARMS = ((BARE, False, False), (HOOK, True, False), (CLIPPED, False, True),
        (GIVEN, True, True))


@dataclass
class CudaConfig:
    device: str = "cuda"
    sizes: tuple[str, ...] = ("tiny", "small")
    rounds: int = 9
    steps: dict[str, int] | None = None  # per block (default: tiny 30, small 10)
    sync_steps: int = 40  # steps under the sync debug mode, per hooked arm
    shape: dict[str, int] | None = None  # a smaller model (the CPU smoke test)
    policy: Any = None

    @classmethod
    def quick(cls) -> CudaConfig:
        return cls(rounds=3, steps={"tiny": 5, "small": 3}, sync_steps=5)


def _block(run: Any, hook: Callable[..., Any] | None, clip: bool, steps: int,
           sync: Callable[[], None]) -> float:
    """Milliseconds per step over one block of ``steps`` steps."""
    sync()
    began = time.perf_counter()
    for _ in range(steps):
        run.step(hook, clip=clip)
    sync()
    return (time.perf_counter() - began) / steps * 1e3


def _syncs(run: Any, hook: Callable[..., Any], clip: bool, steps: int) -> str | None:
    """None when ``steps`` hooked steps ran without a host sync (nor any other error the
    hook caught: a sync inside it is caught there, see :mod:`._nosync`), else what."""
    from ._nosync import NoHostSync

    try:
        with NoHostSync() as check:
            for _ in range(steps):
                run.step(hook, clip=clip)
    except RuntimeError as exc:  # in the model or the optimizer
        return str(exc).splitlines()[0][:200]
    return f"in the hook: {check.failures[0]}" if check.failures else None


def _one_size(size: str, cfg: CudaConfig, socket: str, progress: Progress | None
              ) -> dict[str, Any]:
    import torch

    import lrctl

    from ._gpt import GptRun

    cuda = cfg.device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    steps = (cfg.steps or {}).get(size, 30 if size == "tiny" else 10)
    runs = {name: GptRun(size, cfg.device, shape=cfg.shape) for name, _, _ in ARMS}
    ctls = {name: lrctl.attach(runs[name].opt, policy=cfg.policy, socket=socket, spawn=False,
                               run_name=f"bench-cuda-{size}-{i}")
            for i, (name, hooked, _) in enumerate(ARMS) if hooked}
    try:
        hooks = {name: ctls[name].step if name in ctls else None for name, _, _ in ARMS}
        for name, _, clip in ARMS:
            for _ in range(WARMUP):
                runs[name].step(hooks[name], clip=clip)
        syncs = ({name: _syncs(runs[name], hooks[name], clip, cfg.sync_steps)  # type: ignore[arg-type]
                  for name, hooked, clip in ARMS if hooked} if cuda else None)
        times = interleave({name: functools.partial(_block, runs[name], hooks[name], clip,
                                                    steps, sync)
                            for name, _, clip in ARMS}, cfg.rounds, progress, f"{size}: ")
        connected = all(ctl.connected for ctl in ctls.values())
    finally:
        for ctl in ctls.values():
            ctl.close()
    return {"size": size, "parameters": runs[BARE].parameters, "steps": steps,
            "times_ms": times, "syncs": syncs, "connected": connected}


def run_cuda(cfg: CudaConfig, progress: Progress | None = None) -> dict[str, Any]:
    import torch

    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        return {"skipped": f"no CUDA device (torch {torch.__version__}): nothing measured"}
    from ._controller import ServeProcess

    torch.manual_seed(0)
    device_name = (torch.cuda.get_device_name(cfg.device) if cfg.device.startswith("cuda")
                   else "cpu")
    with ServeProcess() as srv:
        sizes = [_one_size(size, cfg, srv.socket, progress) for size in cfg.sizes]
    return {"device": device_name, "torch": torch.__version__,
            "config": {"rounds": cfg.rounds, "sync_steps": cfg.sync_steps,
                       "device": cfg.device},
            "sizes": sizes, "rows": {s["size"]: [r.to_dict() for r in _rows(s)]
                                     for s in sizes}}


def _rows(size: dict[str, Any]) -> list[Row]:
    t = size["times_ms"]
    judged = size["size"] == TARGET_SIZE
    rows = [Row(BARE, summary(t[BARE]), "ms"), Row(CLIPPED, summary(t[CLIPPED]), "ms")]
    for arm, vs in ((HOOK, BARE), (GIVEN, CLIPPED)):
        r = summary(ratios(t[arm], t[vs]))
        rows.append(Row(arm, summary(t[arm]), "ms", r, vs,
                        f"≤ {TARGET_STEP:g}×" if judged else "",
                        (size["connected"] and r["median"] <= TARGET_STEP) if judged else None))
    return rows


def _render(result: dict[str, Any], out: Path) -> str:
    if "skipped" in result:
        return f"{result['skipped']}\n"
    parts = [f"Device: {result['device']}, torch {result['torch']}; "
             f"{result['config']['rounds']} interleaved rounds per size.\n"]
    for size in result["sizes"]:
        parts.append(f"**{size['size']} GPT** ({size['parameters']:,} parameters, blocks of "
                     f"{size['steps']} steps)\n")
        parts.append(rows_table(result["rows"][size["size"]]) + "\n")
        syncs = size["syncs"]
        if syncs is None:
            parts.append("Host syncs: not checked (not a CUDA device).\n")
        else:
            parts.append("Host syncs under `set_sync_debug_mode(\"error\")`, "
                         f"{result['config']['sync_steps']} steps each: " + "; ".join(
                             f"{arm}: {'none' if why is None else why}"
                             for arm, why in syncs.items()) + "\n")
    return "\n".join(parts)


def _targets(result: dict[str, Any]) -> list[Target]:
    if "skipped" in result:
        return []
    targets = []
    for size in result["sizes"]:
        if not size["connected"]:  # hooks that never reached the controller cost nothing
            targets.append(Target(f"{size['size']} GPT: the hooks reached the controller",
                                  "all", "not all", False))
        targets += row_targets(result["rows"][size["size"]], f"{size['size']} GPT step: ")
        if size["syncs"] is not None:
            caught = [arm for arm, why in size["syncs"].items() if why is not None]
            targets.append(Target(
                f"{size['size']} GPT: host syncs in hooked steps", "none",
                "none" if not caught else "in " + ", ".join(caught), not caught))
    return targets


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="cuda",
                   help="torch device (default cuda; cpu: the suite's smoke run)")
    p.add_argument("--sizes", nargs="+", default=None, choices=("tiny", "small"),
                   help="model sizes (default: tiny small; on a CPU, tiny)")
    p.add_argument("--rounds", type=_positive, default=None,
                   help="interleaved rounds (default 9)")


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def _run(args: argparse.Namespace, progress: Progress) -> dict[str, Any]:
    cfg = CudaConfig.quick() if args.quick else CudaConfig()
    cfg.device = args.device
    cfg.policy = args.policy
    if args.sizes:
        cfg.sizes = tuple(args.sizes)
    elif not cfg.device.startswith("cuda"):
        cfg.sizes = ("tiny",)  # (GPT-2 small's step takes minutes on a CPU)
    if args.rounds:
        cfg.rounds = args.rounds
    return run_cuda(cfg, progress)


SUITE = Suite("cuda", "the hook's cost on a GPU training step and its host syncs (needs CUDA)",
              _add_arguments, _run, _render, _targets)
