"""A benchmark task's training loop, resettable and timed: what the overhead, latency and
MLflow suites measure the hook inside."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

__all__ = ["Trainer", "timed_loop"]


class Trainer:
    """One arm's model, optimizer and batch stream, resettable to the shared start."""

    def __init__(self, task: str, seed: int = 0) -> None:
        import torch

        from .tasks import TASKS

        self.inst = TASKS[task].build(seed)
        self.params = [p for p in self.inst.model.parameters() if p.requires_grad]
        self.start = [p.detach().clone() for p in self.params]
        self.opt = torch.optim.AdamW(self.params, lr=1e-3)
        self.batch = self.inst.next_batch()

    def reset(self) -> None:
        """The shared start's weights and a fresh optimizer state. The LR is left as it
        is: an arm's lrctl hook owns it (writing it here was a foreign LR write, with its
        warning), and what a step costs does not depend on it."""
        import torch

        with torch.no_grad():
            for p, p0 in zip(self.params, self.start, strict=True):
                p.copy_(p0)
        self.opt.state.clear()

    def loss(self) -> Any:
        self.opt.zero_grad(set_to_none=True)
        loss = self.inst.loss(self.inst.model, self.batch)
        loss.backward()
        return loss


def timed_loop(tr: Trainer, steps: int, after_backward: Callable[[Any], None],
                after_step: Callable[[], None] | None = None) -> float:
    """Seconds per step of ``steps`` training steps with the given extra work."""
    tr.reset()
    began = time.perf_counter()
    for _ in range(steps):
        loss = tr.loss()
        after_backward(loss)
        tr.opt.step()
        if after_step is not None:
            after_step()
    return (time.perf_counter() - began) / steps
