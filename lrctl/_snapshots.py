"""Snapshots of a run's parameters, optimizer state and module buffers, in host memory.

The hook takes one every ``snapshot_every`` steps (``attach(..., snapshot_every=N,
keep=K)``) and keeps the newest ``K``, for a rollback (see :mod:`lrctl._rollback`).

Cost. The copies go into host buffers allocated once per slot and reused as the ring
turns, so a steady run allocates nothing. On CUDA the buffers are pinned and the
copies ``non_blocking``: they are queued on the current stream behind the backward
pass that produced the gradients and ahead of the optimizer step, so they capture
the weights before that step without the host waiting for the device. On the CPU
they are plain copies. Restoring copies back in place (the parameters, and the
optimizer's state tensors where they still exist), so the optimizer's references to
its parameters and state stay valid.

Torch is used through ``sys.modules`` (the caller handed us an optimizer).
"""

from __future__ import annotations

import copy
import sys
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from typing import TypeGuard

__all__ = ["Snapshot", "SnapshotRing"]


@dataclass
class Snapshot:
    """One snapshot: host copies, in the optimizer's parameter order."""

    step: int
    params: list[Any] = field(default_factory=list)
    # Per parameter: its optimizer state (tensors as host copies), or None: it had none.
    state: list[dict[str, Any] | None] = field(default_factory=list)
    buffers: list[Any] = field(default_factory=list)
    event: Any = None  # CUDA: recorded after the copies were queued

    @property
    def nbytes(self) -> int:
        tensors = [*self.params, *self.buffers]
        tensors += [v for st in self.state if st for v in st.values() if _is_tensor(v)]
        return sum(t.numel() * t.element_size() for t in tensors)


class SnapshotRing:
    """The newest ``keep`` snapshots of ``optimizer``'s parameters and state (and of
    ``model``'s buffers, such as BatchNorm statistics, when given)."""

    def __init__(self, optimizer: Any, keep: int, model: Any = None) -> None:
        self.optimizer = optimizer
        self.keep = keep
        self.model = model
        self.ring: deque[Snapshot] = deque()
        self._spare: list[Snapshot] = []  # dropped snapshots whose buffers are reused

    @property
    def steps(self) -> list[int]:
        return [s.step for s in self.ring]

    @property
    def nbytes(self) -> int:
        """Host memory the snapshots hold."""
        return sum(s.nbytes for s in self.ring)

    def _params(self) -> list[Any]:
        return [p for g in self.optimizer.param_groups for p in g["params"]]

    def _buffers(self) -> list[Any]:
        return list(self.model.buffers()) if self.model is not None else []

    def take(self, step: int) -> Snapshot:
        """Copy the current state as the snapshot of ``step`` (the state before that
        step's optimizer update); the oldest is dropped beyond ``keep``."""
        torch = sys.modules["torch"]
        if len(self.ring) >= self.keep:
            self._spare.append(self.ring.popleft())
        snap = self._spare.pop() if self._spare else Snapshot(step)
        snap.step = step
        on_cuda = False
        with torch.no_grad():
            params = self._params()
            snap.params = _copy_list(snap.params, params)
            states = []
            old = snap.state
            for i, p in enumerate(params):
                st = self.optimizer.state.get(p)
                mine = old[i] if i < len(old) else None
                states.append(None if not st else _copy_state(mine, st))
                on_cuda = on_cuda or p.is_cuda
            snap.state = states
            snap.buffers = _copy_list(snap.buffers, self._buffers())
        if on_cuda:
            snap.event = torch.cuda.Event()
            snap.event.record()
        self.ring.append(snap)
        return snap

    def newest_at_or_before(self, step: int) -> Snapshot | None:
        found = [s for s in self.ring if s.step <= step]
        return found[-1] if found else None

    def fits(self, snap: Snapshot) -> bool:
        """Whether ``snap`` covers the optimizer's parameters as they are now (not after
        ``add_param_group``: a snapshot from before holds fewer)."""
        params = self._params()
        return len(params) == len(snap.params) and all(
            p.shape == saved.shape for p, saved in zip(params, snap.params, strict=True))

    def drop_after(self, step: int) -> None:
        """Forget the snapshots after ``step`` (after a rollback they hold the weights
        that were thrown away)."""
        while self.ring and self.ring[-1].step > step:
            self._spare.append(self.ring.pop())

    def restore(self, snap: Snapshot) -> None:
        """Put ``snap`` back into the parameters, the optimizer's state and the buffers.
        Between steps only: never while an optimizer step runs."""
        torch = sys.modules["torch"]
        if snap.event is not None:
            snap.event.synchronize()  # rare: a rollback may wait for the device
        with torch.no_grad():
            params = self._params()
            if len(params) != len(snap.params):
                raise RuntimeError(f"the optimizer has {len(params)} parameters, the "
                                   f"snapshot of step {snap.step} {len(snap.params)}")
            for p, saved in zip(params, snap.params, strict=True):
                p.copy_(saved, non_blocking=p.is_cuda)
            for p, saved_state in zip(params, snap.state, strict=True):
                if saved_state is None:
                    self.optimizer.state.pop(p, None)
                else:
                    self.optimizer.state[p] = _restore_state(
                        self.optimizer.state.get(p) or {}, saved_state, p.device)
            for b, saved in zip(self._buffers(), snap.buffers, strict=False):
                b.copy_(saved, non_blocking=b.is_cuda)


def _is_tensor(value: Any) -> TypeGuard[Any]:
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(value, torch.Tensor)


def _host_copy(buf: Any, src: Any) -> Any:
    """``src`` copied into host buffer ``buf`` (a new one when it does not fit)."""
    torch = sys.modules["torch"]
    src = src.detach()
    if buf is None or buf.shape != src.shape or buf.dtype != src.dtype:
        buf = torch.empty(src.shape, dtype=src.dtype, device="cpu", pin_memory=src.is_cuda)
    buf.copy_(src, non_blocking=src.is_cuda)
    return buf


def _copy_list(bufs: list[Any], tensors: list[Any]) -> list[Any]:
    return [_host_copy(bufs[i] if i < len(bufs) else None, t) for i, t in enumerate(tensors)]


def _copy_state(mine: dict[str, Any] | None, state: dict[str, Any]) -> dict[str, Any]:
    """One parameter's optimizer state: tensors into host buffers, the rest copied."""
    mine = mine or {}
    return {k: (_host_copy(mine.get(k), v) if _is_tensor(v) else copy.deepcopy(v))
            for k, v in state.items()}


def _restore_state(current: dict[str, Any], saved: dict[str, Any],
                   device: Any) -> dict[str, Any]:
    """The saved state, copied into the current tensors where they fit (the optimizer
    may hold references to them), else into new ones on the parameter's device (a
    scalar ``step`` tensor stays on the host, as torch keeps it)."""
    out: dict[str, Any] = {}
    for k, v in saved.items():
        if not _is_tensor(v):
            out[k] = copy.deepcopy(v)
            continue
        cur = current.get(k)
        if _is_tensor(cur) and cur.shape == v.shape and cur.dtype == v.dtype:
            cur.copy_(v, non_blocking=cur.is_cuda)
            out[k] = cur
        else:
            target = device if v.dim() > 0 else "cpu"
            out[k] = v.to(target, copy=True)
    return out
