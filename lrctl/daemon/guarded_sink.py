"""The controller's view of its sink: failures are logged, never fatal; records wait for commit.

A sink's failure (a full disk, a bug in a plugin sink) is logged (at most once per
ten seconds per method, with a count) and shown by ``lrctl status`` until that
method succeeds again; the run goes on. A run whose records cannot be opened at all
(its journal files, when the controller is out of file descriptors) is not served:
:meth:`GuardedSink.open_run` says why, and the server refuses the hello. Every
record but an observation calls ``on_record`` first (the transport's
:meth:`~lrctl.daemon.transport.Transport.hold`), so that the replies acknowledging
it wait for :meth:`GuardedSink.commit`: the controller's group commit, one per loop
wake-up.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from ..sinks import RunInfo, Sink
from .ratelog import RateLog

__all__ = ["GuardedSink"]

log = logging.getLogger("lrctl.daemon")


class GuardedSink:
    def __init__(self, sink: Sink, on_record: Callable[[], None]) -> None:
        self.sink = sink
        self._on_record = on_record
        self._errors: dict[str, str] = {}  # method -> its latest failure, until it succeeds
        self._rlog = RateLog(log)

    def open_run(self, info: RunInfo) -> Exception | None:
        """Open (or reopen) the run's records; why not, if they cannot be."""
        self._on_record()
        try:
            self.sink.open_run(info)
        except Exception as exc:
            self._failed("open_run", exc)
            return exc
        return None

    def prepare_run(self, info: RunInfo) -> None:
        """(The hello worker's thread.) A failure is only logged: :meth:`open_run`, on
        the loop, does the work again and says why it fails."""
        try:
            self.sink.prepare_run(info)
        except Exception as exc:
            self._rlog.log(logging.WARNING, "prepare_run", "preparing run %s's records "
                           "failed (the loop opens them): %s", info.run_key, exc)

    def discard_prepared(self, info: RunInfo) -> None:
        self._call("discard_prepared", info)

    def hold_journal(self, run_key: str) -> bool:
        """See :meth:`Sink.hold_journal`; a sink that fails to say is taken to hold it."""
        try:
            return bool(self.sink.hold_journal(run_key))
        except Exception as exc:
            self._failed("hold_journal", exc)
            return False

    def release_journal(self, run_key: str) -> None:
        self._call("release_journal", run_key)

    @property
    def error(self) -> str | None:
        """The latest failure of a method that has not succeeded since, for status."""
        return next(reversed(self._errors.values()), None)

    def observation(self, run_key: str, step: int, loss: float | None,
                    grad_norm: float | None, lrs: Sequence[float]) -> None:
        try:  # the hot path: no getattr, no *args
            self.sink.observation(run_key, step, loss, grad_norm, lrs)
        except Exception as exc:
            self._failed("observation", exc)
        else:
            if self._errors:
                self._errors.pop("observation", None)

    def lr_change(self, run_key: str, step: int, lrs: Sequence[float]) -> None:
        self._call("lr_change", run_key, step, lrs)

    def lr_ran(self, run_key: str, step: int, lrs: Sequence[float]) -> None:
        self._call("lr_ran", run_key, step, lrs)

    def decision(self, run_key: str, record: Mapping[str, Any]) -> None:
        self._on_record()
        self._call("decision", run_key, record)

    def policy_changed(self, run_key: str, info: RunInfo, record: Mapping[str, Any]) -> None:
        self._on_record()
        self._call("policy_changed", run_key, info, record)

    def close_run(self, run_key: str) -> None:
        self._call("close_run", run_key)

    def rewind(self, run_key: str, step: int) -> None:
        self._call("rewind", run_key, step)

    def discard_run(self, run_key: str) -> None:
        self._call("discard_run", run_key)

    def drop_run(self, run_key: str, reason: str) -> None:
        self._call("drop_run", run_key, reason)

    def commit(self) -> None:
        self._call("commit")

    def tick(self) -> None:
        self._call("tick")

    def restore(self) -> None:
        self._call("restore")

    def close(self) -> None:
        self._call("close")

    def status(self) -> dict[str, Any]:
        try:
            return dict(self.sink.status())
        except Exception as exc:
            self._failed("status", exc)
            return {}

    def run_errors(self) -> dict[str, str]:
        try:
            return dict(self.sink.run_errors())
        except Exception as exc:
            self._failed("run_errors", exc)
            return {}

    def failing(self, method: str) -> bool:
        """Whether ``method``'s latest call failed (shown by ``status`` until one succeeds)."""
        return method in self._errors

    def _call(self, method: str, *args: Any) -> None:
        try:
            getattr(self.sink, method)(*args)
        except Exception as exc:
            self._failed(method, exc)
        else:
            if self._errors:
                self._errors.pop(method, None)

    def _failed(self, method: str, exc: Exception) -> None:
        self._rlog.log(logging.ERROR, method, "sink %s failed", method, exc_info=exc)
        self._errors.pop(method, None)  # (re-inserted last: the latest)
        self._errors[method] = f"{method} failed: {exc}"
