"""What the hook tells the controller about the LRs its optimizer steps ran on, where
the controller cannot know them: a report's own (``u``), an ``every=N`` report's
unreported steps where their LRs changed (``gu``), and a sync hook's reported steps
that ran without their answer (``late``). The controller records these, so the audit
says what ran, not what it decided.

A mixin of :class:`~lrctl.hook.Controller`, whose attributes these methods use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ._lr_history import LRHistory
from .wire.errors import ProtocolError
from .wire.messages import MAX_PRIOR

if TYPE_CHECKING:
    from ._link import Link

__all__ = ["MAX_USED", "UsedLRs"]

#: Param groups up to which a report says its LRs (``u``): beyond, a JSON frame with them
#: (and ``b``) could pass the frame limit; the controller then records its own view.
MAX_USED = 512


class UsedLRs:
    """The LRs steps ran on, for the controller (see the module docstring)."""

    if TYPE_CHECKING:  # what it uses of the Controller (for type checkers only)
        sync: bool
        _link: Link | None
        _target: list[float]
        _frozen: int
        _unanswered: list[int]
        _history: LRHistory
        _applied: LRHistory | None

        def _next_optimizer_step(self) -> int: ...
        def _used_at(self, step: int) -> list[float] | None: ...
        def _warn(self, key: str, message: str) -> None: ...

    def _used_for(self, t: int) -> list[float] | None:
        """The LRs optimizer step ``t`` runs on, for its report (``u``): this step's as
        :meth:`_finalize` settled them, an earlier one's from the history; None for a step
        not settled, and in sync mode for a step still to run (the answer to ``t`` sets
        its LRs; a step that has run, in torch's order or reported by ``close()``, says
        what it ran on)."""
        if not self._link_says_used() or len(self._target) > MAX_USED:
            return None
        used = self._used_at(t)  # a step that has run (a staged or flushed report)
        if self.sync:
            return used
        return self._target if used is None and self._frozen == t else used

    def _link_says_used(self) -> bool:
        link = self._link
        return link is not None and link.says_used

    def _tell_late(self) -> None:
        """Sync: the reported steps that ran without their answer (the wait for it timed out,
        or was not made while the answers were late), each with the LRs it ran on: a
        ``late`` message, before the next report (or the goodbye). The controller recorded
        the LRs it decided as those of such a step, and a skip decided for it as carried
        out; it corrects the one and records the other as not carried out. A link that
        is down drops them: the replay after the reconnect says what each step ran on
        (``u``)."""
        steps, self._unanswered = self._unanswered, []
        link = self._link
        if link is None or not link.connected or len(self._target) > MAX_USED:
            return
        told = []
        for s in steps[-MAX_PRIOR:]:
            lrs = self._used_at(s)
            if lrs is not None:
                told.append([s, [float(v) for v in lrs]])
        if told:
            try:
                link.send({"t": "late", "steps": told})
            except ProtocolError as exc:  # (too large a frame: hundreds of groups' LRs)
                self._warn("late", f"lrctl: the steps that ran without their answer are "
                                   f"not told to the controller: {exc}")

    def _gap_changes(self, first: int, end: int) -> list[tuple[int, list[float]]] | None:
        """``every=N``: where the LRs of the unreported steps ``first`` to ``end - 1``
        changed, as ``(step, LRs)`` (the controller records them: ``gu``); None when they
        did not, or the history no longer holds them. Under ``base="loop"`` they are the
        LRs those steps ran on in the loop's own terms (the loop's schedule moves them at
        every step, and the controller knows it only at reported steps: ``b``)."""
        history = self._history if self._applied is None else self._applied
        first = max(first, history.oldest)  # (a resumed run's first steps: none)
        if (first >= end or history.newest < first or not self._link_says_used()
                or len(self._target) > MAX_USED):
            return None  # (newest < first: no change since the step before them)
        runs = self._runs_of_used(first, end, history)
        if runs is None:
            return None
        changes = []
        before, step = history.at(first - 1), first
        for count, lrs in runs:
            if lrs != before:
                changes.append((step, lrs))
            before, step = lrs, step + count
        return changes[-MAX_PRIOR:] or None

    def _runs_of_used(self, first: int, end: int, history: LRHistory | None = None,
                      ) -> list[tuple[int, list[float]]] | None:
        """The LRs optimizer steps ``first`` to ``end - 1`` ran on, as runs of ``(count,
        LRs)`` (None if the history no longer holds them all: the controller then
        records the LRs in effect before the report, as it did before it was told)."""
        if end - 1 > self._next_optimizer_step() or self._used_at(end - 1) is None:
            return None  # (the last has run, then so have the others)
        return (history or self._history).runs(first, end)
