"""A notice, once, that the metric a policy acts on has not come.

A policy that watches a reported metric (``earlystop``'s ``val_loss``, a ``plateau``
on ``val_loss``) does nothing until the loop reports it (``ctl.report(val_loss=...)``).
A loop that reports it under another name (Hugging Face's ``eval_loss``) or not at all
would otherwise leave the policy silently unarmed for the whole run. After
``MISSING_AFTER`` observations without it, the policy records ``metric_missing`` (no LR
change), naming the metrics the loop did report; the hook warns with it. A metric that
comes later is used as ever: the notice is information, never a decision about the LR.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ._base import Action, Observation

__all__ = ["MISSING_AFTER", "MissingMetric"]

#: Observations without the metric before the notice: past the first evaluation of
#: common loops (Hugging Face's every 500 steps, nanoGPT's at step 0 and every 2 000).
MISSING_AFTER = 2_000
_MAX_NAMES = 10  # other metrics named in the notice
_STATISTICS = ("loss", "grad_norm")  # in every observation: never missing


class MissingMetric:
    """Counts the observations without ``metric`` until the notice or the metric comes."""

    __slots__ = ("active", "count", "metric", "others")

    def __init__(self, metric: str) -> None:
        self.metric = metric
        self.active = metric not in _STATISTICS  # False: nothing (more) to watch
        self.count = 0
        self.others: list[str] = []

    def seen(self) -> None:
        """The metric came: no notice, ever."""
        self.active = False

    def absent(self, obs: Observation) -> list[Action]:
        """``obs`` lacks the metric: the notice when it is due."""
        if not self.active:
            return []
        self.count += 1
        if obs.metrics and len(self.others) < _MAX_NAMES:
            self.others += [n[:64] for n in obs.metrics if n[:64] not in self.others][
                :_MAX_NAMES - len(self.others)]
        if self.count < MISSING_AFTER:
            return []
        self.active = False
        reported = (f"the loop reported {', '.join(self.others)}" if self.others
                    else "the loop reported no metric")
        return [Action("metric_missing",
                       f"no {self.metric} in the first {self.count} observations ({reported}): "
                       f"this policy acts only on it; report it with ctl.report("
                       f"{self.metric}=...), or name the one reported in the policy's "
                       "`metric`", {"metric": self.metric, "observations": self.count,
                                    "reported": list(self.others)})]

    def plain(self) -> bool:
        """A plain observation (no metrics) lacks it: True when nothing is to be said
        (counted), False when the notice is due (the policy's ``observe`` says it)."""
        if not self.active:
            return True
        if self.count + 1 < MISSING_AFTER:
            self.count += 1
            return True
        return False

    def state_dict(self) -> dict[str, Any]:
        return {"active": self.active, "count": self.count, "others": list(self.others)}

    def load_state_dict(self, state: Mapping[str, Any] | None) -> None:
        """From :meth:`state_dict`; ``None`` (a checkpoint from before the notice): as if
        the metric had come (a resumed run is not told late)."""
        if state is None:
            self.active = False
            return
        self.active = bool(state["active"]) and self.metric not in _STATISTICS
        self.count = int(state["count"])
        self.others = [str(n) for n in state["others"]][:_MAX_NAMES]
