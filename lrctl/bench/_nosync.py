"""Steps under ``torch.cuda.set_sync_debug_mode("error")``, and the hook's own failures.

The debug mode raises at the call that synchronises the host. A sync inside the hook is
therefore caught by the hook itself (it fails open: a warning, once per kind, and an INFO
log line each time) and never reaches the loop: a check that only waited for the
exception proved that the model and the optimizer do not sync, not the hook. So
:class:`NoHostSync` also listens to lrctl's log for the hook's failures while it is on.
"""

from __future__ import annotations

import logging
from types import TracebackType

__all__ = ["NoHostSync"]

#: The kinds of the hook's warnings that say it caught an error of its own (the
#: ``lrctl_warning`` of its log records: see ``Controller._warn``).
_HOOK_FAILED = frozenset({"internal", "apply"})


class _Failures(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if getattr(record, "lrctl_warning", None) in _HOOK_FAILED:
            self.lines.append(record.getMessage().splitlines()[0][:300])


class NoHostSync:
    """``with NoHostSync() as check: <steps>``; then ``check.failures`` lists what the
    hook caught meanwhile (empty: no sync, nor any other error, inside it). A sync outside
    the hook raises as the debug mode makes it. ``cuda=False``: the hook's failures only
    (a machine without a GPU)."""

    def __init__(self, cuda: bool = True) -> None:
        self.cuda = cuda
        self.failures: list[str] = []
        self._handler = _Failures()
        self._level = logging.NOTSET

    def __enter__(self) -> NoHostSync:
        logger = logging.getLogger("lrctl")
        self._level = logger.level
        if not logger.isEnabledFor(logging.INFO):
            logger.setLevel(logging.INFO)
        logger.addHandler(self._handler)
        if self.cuda:
            import torch

            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        try:
            if self.cuda:
                import torch

                torch.cuda.set_sync_debug_mode(0)
                torch.cuda.synchronize()
        finally:
            logger = logging.getLogger("lrctl")
            logger.removeHandler(self._handler)
            logger.setLevel(self._level)
            self.failures = self._handler.lines
