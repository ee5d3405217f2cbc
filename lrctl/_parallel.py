"""Many blocking calls at once, until a deadline: the fsyncs of a shutdown with many runs.

One fsync takes milliseconds (tens under load); a thousand in a row took the
controller seconds to stop. Issued together they overlap (the filesystem commits
them in batches). The threads are daemon threads, so a call still blocked at the
deadline is abandoned rather than waited for: give only calls that are safe to
abandon (a write beside a file, renamed into place only once done; an fsync).
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

__all__ = ["NOT_DONE", "in_parallel"]

NOT_DONE: Any = object()  # the result of a call not finished (or not begun) by the deadline


def in_parallel(calls: Sequence[Callable[[], Any]], deadline: float = math.inf,
                workers: int = 16) -> list[Any]:
    """Run ``calls`` on up to ``workers`` threads; return once all are done or
    ``deadline`` (``time.monotonic()``) has passed. Each result is the call's value, the
    exception it raised, or :data:`NOT_DONE`; a call not begun by the deadline is skipped."""
    results: list[Any] = [NOT_DONE] * len(calls)
    if not calls:
        return results
    lock = threading.Condition()
    state = {"next": 0, "done": 0}

    def worker() -> None:
        while True:
            with lock:
                i = state["next"]
                if i >= len(calls) or time.monotonic() > deadline:
                    return
                state["next"] = i + 1
            try:
                value: Any = calls[i]()
            except Exception as exc:
                value = exc
            with lock:
                results[i] = value
                state["done"] += 1
                lock.notify_all()

    for _ in range(min(workers, len(calls))):
        threading.Thread(target=worker, name="lrctl-parallel", daemon=True).start()
    with lock:
        while state["done"] < len(calls):
            left = deadline - time.monotonic()
            if left <= 0:
                break
            lock.wait(None if left == math.inf else left)
        return list(results)
