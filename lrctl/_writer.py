"""Writing the LRs into the optimizer, and noticing who else writes them.

Two modes (``attach(..., base=...)``):

* ``"controller"`` (default): the controller's LRs are the LRs. If something
  else wrote a param group's ``lr`` since the hook last did (a loop's own
  ``param_group['lr'] = lr`` left in place, a torch LR scheduler still
  stepping), the hook warns once, naming the fix, and writes the controller's
  LR back before the optimizer steps: the LR used is the LR recorded.
* ``"loop"``: keep your schedule, add lrctl's protection. Whatever LR the loop
  set for this step is the *base*; the optimizer steps with ``base × m``, where
  ``m`` is the controller's LR over the run's initial LR (the product of the
  reactive policies' multipliers: a back-off halves it, a plateau decay cuts
  it). After the step the loop's own value is put back, so a chainable torch
  scheduler (``StepLR``, ``ExponentialLR``) keeps computing from its own LR and
  the loop sees the LR it wrote.

Tensor LRs are written in place. One on the CPU is read back like a float (no sync),
so a scheduler's writes to it are seen in either mode; one on an accelerator
(capturable optimizers) is never read back (reading would synchronise with the
device): foreign writes to it go unseen.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

__all__ = ["BASES", "LRWriter"]

BASES = ("controller", "loop")


class LRWriter:
    """The LRs the optimizer steps with, from the controller's target LRs."""

    def __init__(self, optimizer: Any, initial: list[float], base: str,
                 warn: Callable[[str, str], None]) -> None:
        if base not in BASES:
            raise ValueError(f"base must be one of {', '.join(map(repr, BASES))}, "
                             f"but got {base!r}")
        self.optimizer = optimizer
        self.initial = list(initial)
        self.loop_mode = base == "loop"
        # What the groups hold at attach counts as written: a resume attaches to groups
        # holding a checkpoint's LRs (no one's foreign write), and the loop's LR is that.
        now = [_float(g["lr"]) for g in optimizer.param_groups[:len(initial)]]
        now += self.initial[len(now):]
        self.base = list(now)  # loop mode: the LRs the loop set for this step
        self.applied = list(now)  # the LRs the next optimizer step uses
        self.foreign_writes = 0  # controller mode: writes by someone else, overwritten
        self._warn = warn
        self.groups: Any = optimizer.param_groups  # the group dicts written to
        self.written: list[float | None] = list(now)  # what each group's lr holds
        self._target = list(initial)
        # The target whose LRs the groups hold as apply() last wrote them (None: not yet,
        # or the loop's own LRs are back in: restore())
        self.settled_on: list[float] | None = None

    def apply(self, target: list[float]) -> None:
        """Make the optimizer's LRs what ``target`` (the controller's LRs) says."""
        groups = self.optimizer.param_groups
        if self.settled_on is target and groups is self.groups:
            # The usual call: nothing changed since the last one if every group's ``lr``
            # is still the very float this writer left there (no one wrote since; a
            # tensor LR, never read back, always takes the full way). The hook's
            # pre-step makes the same test itself before calling here (Applying._pre_step).
            left = self.written
            if len(groups) == len(left):
                for group, lr in zip(groups, left):  # noqa: B905 (the lengths are equal)
                    if group["lr"] is not lr:
                        break
                else:
                    return
        # Until this write completes the groups hold no one target's LRs: one cut short by
        # an error (the loop's filters made a warning one) must not read as settled on the
        # target before it, whose LRs some groups no longer hold.
        self.settled_on = None
        if groups is not self.groups:
            # optimizer.load_state_dict() replaced the group dicts (a resume): their LRs are
            # the checkpoint's, written by no one in this process. Take them as the loop's
            # (loop mode) or overwrite them (controller mode), without a warning.
            self.groups = groups
            self.written = [None] * len(groups)
            if self.loop_mode:
                self.base = [_float(g["lr"]) for g in groups[:len(self.base)]] + \
                    self.base[len(groups):]
        if len(groups) != len(target):  # add_param_group() after attach
            self._warn("groups", f"lrctl: the optimizer has {len(groups)} param groups but "
                                 f"the run was attached with {len(target)}; LRs are applied "
                                 "to the first ones only")
        self._target = target
        applied = self.applied
        for i, (group, lr) in enumerate(zip(groups, target)):  # noqa: B905 (hot: a keyword costs)
            current = group["lr"]
            tensor = hasattr(current, "fill_")
            # A CPU tensor is read like a float (its own precision: what fill_ left there);
            # an accelerator's is not read at all.
            now = (float(current) if getattr(current, "is_cpu", False) else None) \
                if tensor else current
            written = self.written[i]
            if now is not None and written is not None and now != written:
                self._foreign(i, float(now), written)
            want = self._effective(i, lr)
            if tensor:
                if want != written or now is not None:
                    current.fill_(want)  # in place, no sync
                self.written[i] = float(current) if now is not None else want
            else:
                group["lr"] = want  # even when equal: apply() goes by identity
                self.written[i] = want
            applied[i] = want
        self.settled_on = target

    def restore(self) -> None:
        """Loop mode, after the optimizer stepped: give the loop back its own LRs."""
        if not self.loop_mode:
            return
        groups = self.optimizer.param_groups
        if groups is not self.groups:
            return
        self.settled_on = None  # the next apply() writes base × multiplier again
        for i, group in enumerate(groups[:len(self.base)]):
            current = group["lr"]
            if hasattr(current, "fill_"):
                if not getattr(current, "is_cpu", False) or float(current) != self.written[i]:
                    continue  # an accelerator's, or someone wrote it during the step
                current.fill_(self.base[i])
                self.written[i] = float(current)
                continue
            if current != self.written[i]:
                continue  # someone wrote it during the step: leave it
            group["lr"] = self.base[i]
            self.written[i] = self.base[i]

    def multipliers(self) -> list[float]:
        """The controller's LR over the initial LR, per group (1.0 where the initial is 0)."""
        return [t / i if i > 0 else 1.0 for t, i in zip(self._target, self.initial,
                                                         strict=False)]

    # -- internals -------------------------------------------------------------------
    def _effective(self, i: int, lr: float) -> float:
        if not self.loop_mode or i >= len(self.base):
            return lr
        initial = self.initial[i]
        return self.base[i] * (lr / initial) if initial > 0 else self.base[i]

    def _foreign(self, i: int, current: float, written: float) -> None:
        if self.loop_mode:
            self.base[i] = current  # the loop's schedule for this step
            return
        self.foreign_writes += 1
        self._warn("foreign-lr",
                   f"lrctl: something else set the LR of param group {i} to {current:.6g} "
                   f"(lrctl had set {written:.6g}): a loop's own param_group['lr'] = ... or "
                   "an LR scheduler still stepping. lrctl writes its own LR back before each "
                   "optimizer step, and that is the LR used and recorded. Remove that code, "
                   "or attach(..., base='loop') to keep your schedule and have lrctl's "
                   "policies scale it.")


def _float(x: Any) -> float:
    return float(x)
