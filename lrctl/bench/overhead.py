"""``lrctl bench overhead``: what the hook adds to a training step, as ratios.

Two measurements, both inside a real training loop of a benchmark task (one
torch thread), every arm interleaved with the others (see :mod:`._timing`):

* **whole step**: wall time per step of the loop with the hook (async, default
  options: it computes the grad norm itself) over the bare loop; the loop that
  clips its gradients and hands the hook ``clip_grad_norm_``'s return value
  (the documented fast path: no second norm) over the same loop without the
  hook; also the sync hook, torch's cosine scheduler and lrctl's in-process
  engine for orientation, and the async hook against a controller running under
  ``SCHED_BATCH`` and one started with ``--no-pacing`` (each observation wakes it:
  what paced reading saves, side by side).
* **per-call cost**, each call timed in place inside a digits loop, with the
  statistics already floats (the grad norm excluded): the policy engine's
  ``observe`` (shipped ``default.yaml`` and ``divergence.yaml``, the LR written
  into the optimizer) over ``ReduceLROnPlateau.step(loss)`` timed the same way;
  ``ctl.step(loss, grad_norm=g)`` plus the optimizer pre-step hook's work over an
  in-loop ``CosineAnnealingLR.step()``, and the same for ``every=N``, whose cost
  should fall as 1/N. Two floors beside them: an echo process (each frame wakes it)
  and the least any socket hook does per step against the paced controller
  (:mod:`._floor`): what is left above it is the hook's own bookkeeping. That
  socket floor is a whole-step arm too (it reads the loss, computes no grad norm).

Each arm trains its own copy of the model from the same initial weights. The
whole-step arms restore them at every block, so every arm does the same arithmetic
(a loss driven to zero on the task's fixed batch would bring denormals into the
timed steps). The per-call arms time only the call, so each trains on across its
blocks, as a real run does: a restart every block put the policies and the hook in
a run whose loss jumped back to its start every 200 steps (a back-off and its
cooldown each time, every="auto" reporting each restart's first steps at once),
which no training loop is.
"""

from __future__ import annotations

import argparse
import functools
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .._defaults import DEFAULT_POLICY, POLICIES
from ._echo import Echo
from ._floor import SocketFloor
from ._suite import LEGACY_TASKS, Progress, Suite
from ._targets import Target, row_targets
from ._timing import Row, interleave, ratios, rows_table, summary
from ._trainer import Trainer, timed_loop

__all__ = ["SUITE", "OverheadConfig", "run_overhead"]

TARGET_STEP = {"digits": 1.05, "charlm": 1.02}  # the async hook, its own grad norm
TARGET_STEP_NORM_GIVEN = 1.02  # the async hook given clip_grad_norm_'s value, any task
TARGET_HOOK = 3.0  # × an in-loop CosineAnnealingLR.step()
#: The in-process engine per observation, × an in-loop ReduceLROnPlateau.step(loss).
TARGET_ENGINE = {"default.yaml": 3.0, "divergence.yaml": 2.0}
EVERY_SLACK = 2.0  # every=N passes when its cost is at most 2/N of every=1's
PLATEAU = "ReduceLROnPlateau.step(loss)"
CLIPPED = "bare + clip_grad_norm_"
NORM_GIVEN = "lrctl async, grad_norm=clip_grad_norm_(...)"
AUTO = 'lrctl async, every="auto"'
HOOK_AUTO = 'lrctl hook every="auto"'
UNPACED = "lrctl async, controller --no-pacing"  # every observation wakes the controller
HOOK_UNPACED = "lrctl hook every=1, controller --no-pacing"
AUTO_NORM_GIVEN = 'lrctl async, every="auto", grad_norm=clip_grad_norm_(...)'
ECHO_FLOOR = "I/O floor: send a frame, poll, recv (echo process)"
#: What no socket hook can avoid per step, against the paced controller (see ._floor).
SOCKET_FLOOR = "socket floor: recv the answer, set the LR, send the obs (paced controller)"
STEP_FLOOR = "socket floor: float(loss), recv the answer, set the LR, send the obs"


#: Snapshot intervals whose step-time ratio the suite measures (rollback-and-skip).
SNAPSHOT_EVERY = (1, 10)


@dataclass
class OverheadConfig:
    tasks: tuple[str, ...] = LEGACY_TASKS
    rounds: int = 15
    steps: dict[str, int] = field(default_factory=lambda: {"digits": 150, "charlm": 30})
    micro_rounds: int = 15
    micro_steps: int = 200
    every: tuple[int, ...] = (1, 4, 16)
    policy: Any = None

    @classmethod
    def quick(cls) -> OverheadConfig:
        return cls(tasks=("digits",), rounds=2, steps={"digits": 10, "charlm": 3},
                   micro_rounds=2, micro_steps=20, every=(1, 4))


def _step_arms(task: str, cfg: OverheadConfig, sockets: dict[str, str],
               stack: list[Any]) -> dict[str, Callable[[], float]]:
    import torch

    import lrctl

    steps = cfg.steps[task]
    arms: dict[str, Callable[[], float]] = {}

    bare = Trainer(task)
    arms["bare"] = lambda: timed_loop(bare, steps, lambda loss: None)

    cos_tr = Trainer(task)
    cos = torch.optim.lr_scheduler.CosineAnnealingLR(cos_tr.opt, 10**9)
    arms["cosine scheduler"] = lambda: timed_loop(cos_tr, steps, lambda loss: None, cos.step)

    eng_tr = Trainer(task)
    engine = lrctl.load_policy(cfg.policy or DEFAULT_POLICY, [1e-3])
    counter = iter(range(10**12))

    def engine_step(loss: Any) -> None:
        g = float(torch.nn.utils.get_total_norm([p.grad for p in eng_tr.params
                                                  if p.grad is not None]))
        lrs = engine.observe(next(counter), float(loss.detach()), g)
        eng_tr.opt.param_groups[0]["lr"] = lrs[0]

    arms["lrctl in-process engine"] = lambda: timed_loop(eng_tr, steps, engine_step)

    clip_tr = Trainer(task)
    arms[CLIPPED] = lambda: timed_loop(clip_tr, steps, lambda loss: _clip(clip_tr))
    floor_tr = Trainer(task)
    floor = SocketFloor(sockets["normal"], floor_tr.opt.param_groups[0],
                        _policy_text(cfg.policy))
    stack.append(floor)
    arms[STEP_FLOOR] = lambda: timed_loop(
        floor_tr, steps, lambda loss: floor.call(float(loss.detach()), 1.0))
    given_tr = Trainer(task)
    given = lrctl.attach(given_tr.opt, policy=cfg.policy, socket=sockets["normal"], spawn=False,
                         run_name=f"bench-{task}")
    stack.append(given)
    arms[NORM_GIVEN] = lambda: timed_loop(
        given_tr, steps, lambda loss: given.step(loss, grad_norm=_clip(given_tr)))
    auto_tr = Trainer(task)
    auto_given = lrctl.attach(auto_tr.opt, policy=cfg.policy, socket=sockets["normal"],
                              spawn=False, run_name=f"bench-{task}", every="auto")
    stack.append(auto_given)
    arms[AUTO_NORM_GIVEN] = lambda: timed_loop(
        auto_tr, steps, lambda loss: auto_given.step(loss, grad_norm=_clip(auto_tr)))

    for name, sock, sync, every in (
            ("lrctl async", sockets["normal"], False, 1),
            (AUTO, sockets["normal"], False, "auto"),
            ("lrctl async, controller SCHED_BATCH", sockets["batch"], False, 1),
            (UNPACED, sockets["unpaced"], False, 1),
            ("lrctl sync", sockets["normal"], True, 1)):
        tr = Trainer(task)
        ctl = lrctl.attach(tr.opt, policy=cfg.policy, socket=sock, spawn=False, sync=sync,
                           run_name=f"bench-{task}", every=every)
        stack.append(ctl)
        arms[name] = functools.partial(timed_loop, tr, steps, ctl.step)
    for every in SNAPSHOT_EVERY:  # rollback-and-skip's host copies (see lrctl._snapshots)
        tr = Trainer(task)
        ctl = lrctl.attach(tr.opt, policy=cfg.policy, socket=sockets["normal"], spawn=False,
                           run_name=f"bench-{task}", snapshot_every=every, keep=2)
        stack.append(ctl)
        arms[f"lrctl async, snapshot_every={every}"] = functools.partial(
            timed_loop, tr, steps, ctl.step)
    return arms


def _policy_text(policy: Any) -> str:
    """The policy text a hook given ``policy=`` sends (a path, a shipped name, None)."""
    from .._sources import policy_payload

    return policy_payload(policy)[0]


def _clip(tr: Trainer) -> Any:
    """What a loop that clips does: the total norm, returned by clip_grad_norm_ (a huge
    max_norm, so that every arm trains alike)."""
    import torch

    return torch.nn.utils.clip_grad_norm_(tr.params, 1e9)


def _snapshot_memory(stack: list[Any]) -> dict[str, float]:
    """Host memory of the snapshots (keep=2, snapshot_every=1: the steady state) / the
    bytes of the parameters and optimizer state they copy."""
    import torch

    out: dict[str, float] = {}
    for ctl in stack:
        rollbacks = getattr(ctl, "_rollbacks", None)
        ring = getattr(rollbacks, "ring", None)
        # every=1: both slots hold a trained state
        if ring is None or rollbacks is None or rollbacks.every != 1:
            continue
        params = [p for g in ctl.optimizer.param_groups for p in g["params"]]
        live = sum(p.numel() * p.element_size() for p in params)
        live += sum(v.numel() * v.element_size() for p in params
                    for v in ctl.optimizer.state.get(p, {}).values() if torch.is_tensor(v))
        out[ctl.run_key.rsplit("-", 1)[0]] = ring.nbytes / live
    return out


def _hook_arms(cfg: OverheadConfig, sockets: dict[str, str],
               stack: list[Any]) -> dict[str, Callable[[], float]]:
    """Per-call cost in a digits loop; statistics are floats, so the grad norm is excluded."""
    import torch

    import lrctl

    arms: dict[str, Callable[[], float]] = {}

    def micro(tr: Trainer, call: Callable[[float, float], None]) -> float:
        spent = 0.0  # (no reset: each arm trains on, see the module docstring)
        for _ in range(cfg.micro_steps):
            loss = float(tr.loss().detach())
            g = float(torch.nn.utils.get_total_norm([p.grad for p in tr.params
                                                      if p.grad is not None]))
            t0 = time.perf_counter()
            call(loss, g)
            spent += time.perf_counter() - t0
            tr.opt.step()
        return spent / cfg.micro_steps * 1e6

    cos_tr = Trainer("digits")
    cos = torch.optim.lr_scheduler.CosineAnnealingLR(cos_tr.opt, 10**9)
    arms["CosineAnnealingLR.step()"] = lambda: micro(cos_tr, lambda loss, g: cos.step())
    pl_tr = Trainer("digits")
    plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(pl_tr.opt)
    arms[PLATEAU] = lambda: micro(pl_tr, lambda loss, g: plateau.step(loss))
    for name in TARGET_ENGINE:
        arms[f"lrctl engine.observe, {name}"] = _engine_arm(name, micro)
    echo = Echo()
    stack.append(echo)
    echo_tr = Trainer("digits")
    arms[ECHO_FLOOR] = lambda: micro(echo_tr, echo.call)
    floor_tr = Trainer("digits")
    floor = SocketFloor(sockets["normal"], floor_tr.opt.param_groups[0],
                        _policy_text(cfg.policy))
    stack.append(floor)
    arms[SOCKET_FLOOR] = lambda: micro(floor_tr, floor.call)
    variants: list[tuple[str, str, int | str]] = [
        (f"lrctl hook every={n}", sockets["normal"], n) for n in cfg.every]
    variants.append((HOOK_AUTO, sockets["normal"], "auto"))
    variants.append(("lrctl hook every=1, controller SCHED_BATCH", sockets["batch"], 1))
    variants.append((HOOK_UNPACED, sockets["unpaced"], 1))
    for name, socket, every in variants:
        tr = Trainer("digits")
        ctl = lrctl.attach(tr.opt, policy=cfg.policy, socket=socket, spawn=False, every=every,
                           run_name="bench-hook")
        stack.append(ctl)
        # The pre-step hook is timed by calling it here, next to step(); unregistered so
        # that optimizer.step() (outside the timer) does not run it a second time. The
        # hook still counts as installed (its handle stands in): the quiet ways of
        # every=N and every="auto" rely on it, as in a real loop.
        ctl._hook_handle.remove()
        ctl._hook_handle = _StandIn()

        def call(loss: float, g: float, ctl: Any = ctl) -> None:
            ctl.step(loss, grad_norm=g)
            ctl._pre_step()

        arms[name] = functools.partial(micro, tr, call)
    return arms


class _StandIn:
    """The handle of a pre-step hook the bench calls itself (see ``_hook_arms``)."""

    def remove(self) -> None:
        return None


def _engine_arm(name: str, micro: Callable[[Trainer, Callable[[float, float], None]], float],
                ) -> Callable[[], float]:
    """The in-process engine of a shipped policy file, as a loop would use it: observe,
    then write the LR it returns into the optimizer (what ReduceLROnPlateau does too)."""
    from ..config import load_policy

    tr = Trainer("digits")
    engine = load_policy(POLICIES / name, [g["lr"] for g in tr.opt.param_groups])
    steps = iter(range(10**12))
    group = tr.opt.param_groups[0]

    def call(loss: float, g: float) -> None:
        group["lr"] = engine.observe(next(steps), loss, g)[0]

    return lambda: micro(tr, call)


def run_overhead(cfg: OverheadConfig, progress: Progress | None = None) -> dict[str, Any]:
    import warnings

    from ._controller import ServeProcess

    warnings.filterwarnings("ignore", category=UserWarning)  # torch's scheduler-order notice
    result: dict[str, Any] = {"config": {"tasks": list(cfg.tasks), "rounds": cfg.rounds,
                                         "steps": cfg.steps, "micro_rounds": cfg.micro_rounds,
                                         "micro_steps": cfg.micro_steps,
                                         "every": list(cfg.every)},
                              "step": {}, "hook": {}}
    stack: list[Any] = []
    with ServeProcess() as normal, ServeProcess(batch=True) as batch, \
            ServeProcess(pacing=False) as unpaced:
        sockets = {"normal": normal.socket, "batch": batch.socket, "unpaced": unpaced.socket}
        try:
            for task in cfg.tasks:
                data = interleave(_step_arms(task, cfg, sockets, stack), cfg.rounds, progress,
                                  f"overhead {task} ")
                result["step"][task] = _step_rows(task, data)
            data = interleave(_hook_arms(cfg, sockets, stack), cfg.micro_rounds,
                              progress, "hook cost ")
            result["hook"] = _hook_rows(data, cfg.every)
            result["snapshot_memory"] = _snapshot_memory(stack)
            result["socket_floor"] = [{"steps": f.step, "waits": f.waits, "late": f.late}
                                      for f in stack if isinstance(f, SocketFloor)]
        finally:
            for ctl in stack:
                ctl.close()
    return result


def _step_rows(task: str, data: dict[str, list[float]]) -> list[dict[str, Any]]:
    rows = [Row("bare AdamW step", summary([x * 1e3 for x in data["bare"]]), "ms")]
    for arm, xs in data.items():
        if arm == "bare":
            continue
        # The loop that hands the hook clip_grad_norm_'s value is compared with the same
        # loop without the hook: the norm is the loop's own work either way.
        given = arm in (NORM_GIVEN, AUTO_NORM_GIVEN)
        ref, vs = (CLIPPED, "clipped") if given else ("bare", "bare")
        r = summary(ratios(xs, data[ref]))
        target = {"lrctl async": TARGET_STEP[task], AUTO: TARGET_STEP[task],
                  NORM_GIVEN: TARGET_STEP_NORM_GIVEN,
                  AUTO_NORM_GIVEN: TARGET_STEP_NORM_GIVEN}.get(arm)
        rows.append(Row(arm, summary([x * 1e3 for x in xs]), "ms", r, vs,
                        f"≤ {target}×" if target else "",
                        None if target is None else r["median"] <= target))
    return [row.to_dict() for row in rows]


def _hook_rows(data: dict[str, list[float]], every: tuple[int, ...]) -> list[dict[str, Any]]:
    cos = data["CosineAnnealingLR.step()"]
    plateau = data[PLATEAU]
    rows = [Row("CosineAnnealingLR.step()", summary(cos), "µs"),
            Row(PLATEAU, summary(plateau), "µs", summary(ratios(plateau, cos)), "cosine")]
    for name, limit in TARGET_ENGINE.items():
        xs = data[f"lrctl engine.observe, {name}"]
        r = summary(ratios(xs, plateau))
        rows.append(Row(f"lrctl engine.observe, {name}", summary(xs), "µs", r, "plateau",
                        f"≤ {limit:g}×", r["median"] <= limit))
    for name in (ECHO_FLOOR, SOCKET_FLOOR):
        floor = data[name]
        rows.append(Row(name, summary(floor), "µs", summary(ratios(floor, cos)), "cosine"))
    one = data[f"lrctl hook every={every[0]}"]
    for n in every:
        xs = data[f"lrctl hook every={n}"]
        if n == every[0]:
            r = summary(ratios(xs, cos))
            rows.append(Row(f"lrctl hook every={n}", summary(xs), "µs", r, "cosine",
                            f"≤ {TARGET_HOOK:g}×", r["median"] <= TARGET_HOOK))
        else:
            r = summary(ratios(xs, one))
            limit = EVERY_SLACK / n
            rows.append(Row(f"lrctl hook every={n}", summary(xs), "µs", r, "every=1",
                            f"≤ {limit:.3g}× (1/N: {1 / n:.3g})", r["median"] <= limit))
    auto = data[HOOK_AUTO]
    r = summary(ratios(auto, cos))
    rows.append(Row(HOOK_AUTO, summary(auto), "µs", r, "cosine", f"≤ {TARGET_HOOK:g}×",
                    r["median"] <= TARGET_HOOK))
    batch = data["lrctl hook every=1, controller SCHED_BATCH"]
    r = summary(ratios(batch, cos))
    rows.append(Row("lrctl hook every=1, controller SCHED_BATCH", summary(batch), "µs", r,
                    "cosine", f"≤ {TARGET_HOOK:g}×", r["median"] <= TARGET_HOOK))
    unpaced = data[HOOK_UNPACED]  # what paced reading saves: the same hook, woken per send
    rows.append(Row(HOOK_UNPACED, summary(unpaced), "µs", summary(ratios(unpaced, one)),
                    "every=1"))
    return [row.to_dict() for row in rows]


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tasks", nargs="+", choices=LEGACY_TASKS, default=None)
    p.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 15)")


def _run(args: argparse.Namespace, progress: Progress) -> dict[str, Any]:
    cfg = OverheadConfig.quick() if args.quick else OverheadConfig()
    if args.tasks:
        cfg.tasks = tuple(args.tasks)
    if args.rounds:
        cfg.rounds = cfg.micro_rounds = args.rounds
    cfg.policy = args.policy
    return run_overhead(cfg, progress)


def _render(result: dict[str, Any], out: Path) -> str:
    parts = []
    for task, rows in result["step"].items():
        steps = result["config"]["steps"][task]
        parts.append(f"**Whole training step, {task}** (blocks of {steps} steps, "
                     f"{result['config']['rounds']} interleaved rounds)\n\n{rows_table(rows)}\n")
    parts.append(f"**Cost per call inside a digits loop** (engine vs ReduceLROnPlateau, hook vs "
                 f"CosineAnnealingLR), grad norm excluded (blocks of "
                 f"{result['config']['micro_steps']} steps, {result['config']['micro_rounds']} "
                 f"rounds)\n\n{rows_table(result['hook'])}\n")
    floors = result.get("socket_floor") or []
    if floors:
        parts.append("**Socket floor's waits** (answers not in at the step that uses them, "
                     "then waited for; late: not within 1 s): " + ", ".join(
                         f"{f['waits']} of {f['steps']} steps ({f['late']} late)"
                         for f in floors) + "\n")
    memory = result.get("snapshot_memory") or {}
    if memory:
        parts.append("**Snapshot memory** (keep=2, host): " + ", ".join(
            f"{run.removeprefix('bench-')} {ratio:.2f}× its parameters and optimizer state"
            for run, ratio in memory.items()) + "\n")
    return "\n".join(parts)


def _targets(result: dict[str, Any]) -> list[Target]:
    out = [t for task, rows in result["step"].items() for t in row_targets(rows, f"{task} step: ")]
    return out + row_targets(result["hook"], "per call in a digits loop: ")


SUITE = Suite("overhead", "what the hook adds to a training step (ratios to a bare step and "
                          "to an in-loop scheduler)", _add_arguments, _run, _render, _targets)
