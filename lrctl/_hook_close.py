"""How a run's hook ends: :meth:`Closing.close` flushes what the controller should
see (the pending batch, the last unreported step, staged device values, metrics
reported after the last step), waits briefly for the answers still due, and says
goodbye (or only disconnects, leaving the run resumable).

A mixin of :class:`~lrctl.hook.Controller`, whose attributes these methods use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Mapping

    from ._link import Link

__all__ = ["Closing"]


class Closing:
    """The end of a run's hook (see the module docstring)."""

    if TYPE_CHECKING:  # what it uses of the Controller (for type checkers only)
        timeout: float
        _quiet_allowed: bool
        _closed: bool
        _hook_handle: Any
        _link: Link | None
        _metrics: dict[str, Any]
        _step: int
        _acked: int
        _reported: int
        _got_error: bool

        def _flush_pending(self) -> None: ...
        def _tell_late(self) -> None: ...
        def _report_last_step(self) -> None: ...
        def _drain_staged(self, block: bool) -> None: ...
        def _send(self, t: int, loss: float | None, grad: float | None,
                  metrics: Mapping[str, Any], end: bool = False) -> None: ...
        def _warn(self, key: str, message: str) -> None: ...

    def close(self, end_run: bool = True) -> None:
        """Flush what the controller should see, unhook, disconnect.

        ``end_run=True`` says goodbye: the controller ends the session (and the
        MLflow run it created). ``end_run=False`` only disconnects, leaving the
        session resumable with ``attach(..., resume=run_key)`` — for a training
        process that is being interrupted rather than finishing. It waits up to
        ``timeout`` (1 s) for the answers still due, so that :attr:`decisions`
        holds those made from the last observations; a controller that is gone
        costs no wait. A hook that lost its controller tries once more, at once: one
        restarted meanwhile (the hook's back-off may have outlasted it) gets the
        observations it missed and the goodbye.
        """
        self._quiet_allowed = False
        self._closed = True
        if self._hook_handle is not None:
            self._hook_handle.remove()
            self._hook_handle = None
        guard = getattr(self, "_guard", None)
        if guard is not None:
            guard.remove()
        if self._link is None:
            return
        try:
            self._flush_pending()
            if end_run:  # (resumable: unreported, as between reports, so a resume is exact)
                self._report_last_step()
            self._drain_staged(block=True)
            self._send_last_metrics(end_run)
            if not self._link.connected:  # its back-off may have outlasted a restart: one
                self._link.reconnect_now(self.timeout)  # last try, so the run ends as it is
            if self._link.connected and self._acked < self._reported:
                self._got_error = False
                self._link.wait(lambda: self._acked >= self._reported or self._got_error,
                                self.timeout)
            self._tell_late()  # the last step's, had its answer not come (a stall)
            self._link.close(bye=end_run)
        except Exception as exc:
            self._warn("internal", f"lrctl: error while closing ({exc!r})")
        self._link = None

    def _send_last_metrics(self, end_run: bool) -> None:
        """Metrics reported after the last step (a final evaluation) go with the next
        step's observation, which never comes: a run that ends sends them on an
        observation of their own, of the step after the last (no loss, no grad norm),
        marked as the end (that step never runs: the audit records no LRs for it), so
        the policies see them. A run left resumable keeps its steps for the resume."""
        if not self._metrics:
            return
        metrics, self._metrics = self._metrics, {}
        if end_run:
            self._send(self._step, None, None, metrics, end=True)
        else:
            self._warn("late-metrics", f"lrctl: {', '.join(metrics)} reported after the "
                       "last step were not sent (the run was left resumable): a "
                       "ctl.state_dict() taken after the report keeps them for the resume; "
                       "otherwise report them again after resuming")
