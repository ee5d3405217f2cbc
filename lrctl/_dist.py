"""The hook under ``torch.distributed``: rank 0 talks to the controller, every rank
applies the same LRs, broadcast on a CPU (gloo) group so no step waits for a device."""

from __future__ import annotations

import sys
from typing import Any

__all__ = ["Distributed"]


class Distributed:
    """Rank and world size, and a CPU (gloo) group to broadcast LRs without a device sync."""

    def __init__(self, rank: int = 0, world_size: int = 1, group: Any = None) -> None:
        self.rank = rank
        self.world_size = world_size
        self.group = group

    @classmethod
    def detect(cls) -> Distributed:
        torch = sys.modules.get("torch")
        if torch is None:
            return cls()
        dist = torch.distributed
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return cls()
        group = None if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")
        return cls(dist.get_rank(), dist.get_world_size(), group)

    def broadcast(self, values: list[float]) -> list[float]:
        torch = sys.modules["torch"]
        buf = torch.tensor(values, dtype=torch.float64)
        torch.distributed.broadcast(buf, src=0, group=self.group)
        return [float(v) for v in buf.tolist()]

    def share(self, values: list[float], flag: bool) -> tuple[list[float], bool]:
        """Rank 0's ``values`` on every rank, and whether any rank raised ``flag``: one
        all-reduce (a sum: the other ranks add zeros, exactly, to rank 0's values)."""
        torch = sys.modules["torch"]
        mine = values if self.rank == 0 else [0.0] * len(values)
        buf = torch.tensor([*mine, 1.0 if flag else 0.0], dtype=torch.float64)
        torch.distributed.all_reduce(buf, group=self.group)
        out = [float(v) for v in buf.tolist()]
        return out[:-1], out[-1] > 0

    def agree(self, ok: bool) -> bool:
        """True on every rank only if rank 0 says ``ok``."""
        return self.broadcast([1.0 if ok else 0.0])[0] > 0
