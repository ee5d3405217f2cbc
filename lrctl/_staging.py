"""Statistics on a CUDA device, read without stalling the step.

Async hooks copy the loss and grad norm to a pinned host buffer with a
non-blocking copy and an event; the values are sent once the event has
completed (usually by the next step), so no step waits for the device. Their
decisions therefore land one step later than on the CPU path.
"""

from __future__ import annotations

import sys
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any

from ._torchutil import to_float

__all__ = ["DeviceStaging"]

#: Copies pending at most; a reporting step waits for the oldest beyond this.
MAX_PENDING = 8

Send = Callable[[int, "float | None", "float | None", Mapping[str, Any]], None]


class DeviceStaging:
    """A ring of pinned buffers holding the statistics of steps not yet sent."""

    def __init__(self) -> None:
        self._pending: deque[tuple[int, Any, Any, tuple[bool, bool], tuple[Any, Any],
                                   Mapping[str, Any]]] = deque()
        self._pinned: list[Any] = []
        self._slot = 0
        self.used = False  # statistics have gone through this path

    def __bool__(self) -> bool:
        return bool(self._pending)

    @property
    def oldest(self) -> int | None:
        """The step of the oldest statistics not sent yet."""
        return self._pending[0][0] if self._pending else None

    def stage(self, t: int, loss: Any, grad: Any, on_dev: tuple[bool, bool],
              metrics: Mapping[str, Any], send: Send) -> None:
        """Start a device→pinned copy of step ``t``'s statistics."""
        torch = sys.modules["torch"]
        device = loss.device if on_dev[0] else grad.device
        parts = [loss.detach().reshape(()).to(device, torch.float64) if on_dev[0]
                 else torch.zeros((), dtype=torch.float64, device=device),
                 grad.detach().reshape(()).to(device, torch.float64) if on_dev[1]
                 else torch.zeros((), dtype=torch.float64, device=device)]
        if len(self._pending) >= MAX_PENDING:
            self.drain(send, block=True)  # the device is far behind: a reporting step waits
        if not self._pinned:
            self._pinned = [torch.empty(2, dtype=torch.float64, pin_memory=True)
                            for _ in range(MAX_PENDING + 1)]
        # Slots in staging order: at most MAX_PENDING copies are pending, so the ring never
        # hands out a buffer whose copy has not been read (t % 9 would, with every=9).
        self._slot = (self._slot + 1) % len(self._pinned)
        buf = self._pinned[self._slot]
        buf.copy_(torch.stack(parts), non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        host = (None if on_dev[0] else to_float(loss), None if on_dev[1] else to_float(grad))
        self._pending.append((t, event, buf, on_dev, host, metrics))
        self.used = True

    def drain(self, send: Send, block: bool) -> None:
        """Send the staged statistics whose copies are done (all of them if ``block``)."""
        while self._pending:
            t, event, buf, on_dev, host, metrics = self._pending[0]
            if not block and not event.query():
                return
            if block:
                event.synchronize()
            self._pending.popleft()
            values = buf.tolist()
            send(t, values[0] if on_dev[0] else host[0], values[1] if on_dev[1] else host[1],
                 metrics)
