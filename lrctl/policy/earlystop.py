"""Early stopping: ask the run to stop once its metric has stopped improving.

The stop is a decision like any other (``stop``, with the best value, the step
it was seen at, the patience used and the LR reductions seen); the hook sets
``ctl.should_stop`` and the integrations stop their trainers. The policy never
moves the LR (its multiplier is 1), so it composes with everything.

Two ways to judge "improving", counted in observations of ``metric`` (steps
where it is reported, e.g. once per epoch for ``val_loss``):

* ``smoothing: none`` — Keras' ``EarlyStopping`` rule, exactly (Lightning's
  agrees with it wherever both are defined): a value improves when it beats the
  best so far by more than ``min_delta``; ``wait`` counts observations since
  the last improvement and the run stops at a non-improving observation once
  ``wait >= patience`` (never at the very first). With ``baseline``, an
  improvement restarts ``wait`` only if it also beats the baseline by
  ``min_delta``, so a run that never beats it stops after ``patience``. Meant
  for per-epoch metrics: on a noisy per-step metric the best single value is a
  low outlier that later values rarely beat.
* ``smoothing: trend`` — the statistics core's two-half trend test (see
  :mod:`lrctl.policy.stats`): over the last ``window`` observations the newer
  half's mean must sit significantly (level ``alpha``, autocorrelation
  accounted for) below the older half's by more than ``min_delta``; that is an
  improvement. The test is taken every ``window / 8`` observations once the
  window is full, and the run stops at a test that finds no significant fall
  once ``wait >= patience``. Values more than ``outlier_z`` robust σ worse than
  the rolling median are clipped to that bound before they are judged, so one
  bad sample (a spike of a per-step loss) can neither start nor end a stall.

Either way: observations before step ``start_after`` are ignored (Keras'
``start_from_epoch``, in steps); steps that the divergence guard flagged do not
count when the metric is the training loss or grad norm; and with
``after_reductions: N`` the run stops only once the LR has been cut N times
(by plateau decay, or by a WSD cooldown starting) since the metric last
improved, each cut giving the lower LR ``patience`` fresh observations: decay
first, then give up.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from ._base import Action, Observation, ReactivePolicy, StepContext, float_from_json, float_to_json
from ._metric_watch import MissingMetric
from ._params import MAX_WINDOW, Param, ParamError
from ._registry import register_policy
from .stats import RobustWindow, TrendWindow

FLAGS_NOT_COUNTED = frozenset({"spike", "nonfinite"})
_FLAGGED_STATISTICS = frozenset({"loss", "grad_norm"})
MIN_ROBUST = 16  # values in the rolling median before outliers are clipped


@register_policy("earlystop")
class EarlyStop(ReactivePolicy):
    priority = 60  # after plateau (50) and wsd (45): it sees this step's LR cuts
    keeps_observations = False
    PARAMS = (
        Param("metric", "str", "val_loss", "statistic to watch: a reported metric (val_loss, "
              "val_acc…), loss or grad_norm"),
        Param("mode", "str", "min", "min: lower is better; max: higher is better",
              choices=("min", "max")),
        Param("min_delta", "float", 0.0, "least change (absolute) that counts as an "
              "improvement", ge=0),
        Param("patience", "int", 3, "observations of the metric without improvement before "
              "the stop", ge=0),
        Param("baseline", "float", None, "an improvement restarts the patience only if it "
              "also beats this value (Keras' baseline)", optional=True),
        Param("start_after", "int", 0, "observations at earlier steps are ignored", ge=0),
        Param("after_reductions", "int", 0, "stop only once the LR was cut this many times "
              "since the last improvement (plateau decay, a WSD cooldown)", ge=0),
        Param("smoothing", "str", "none", "none: each value as reported (Keras/Lightning "
              "rule); trend: the statistics core's two-half test over `window` observations",
              choices=("none", "trend")),
        Param("window", "int", 200, "trend: observations in the two-half test", ge=8,
              le=MAX_WINDOW),
        Param("alpha", "float", 0.01, "trend: one-sided level of the 'still improving' test",
              ge=1e-6, lt=0.5),
        Param("outlier_z", "float", 6.0, "trend: values worse than the rolling median by more "
              "than this many robust σ are clipped to that bound", gt=0),
        Param("restore_best", "bool", False, "not supported: keep the best checkpoint in the "
              "training script (the stop decision names best_step)"),
    )

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        if self.params["restore_best"]:
            raise ParamError("restore_best", "is not supported: lrctl's snapshots are for "
                             "rollbacks (recent steps, see Rollback), not for the best "
                             "weights; keep the best checkpoint in the training script "
                             "(the stop decision names the best step: best_step)")
        self._sign = 1.0 if self.params["mode"] == "min" else -1.0  # judged: lower is better
        self._best = math.inf  # signed
        self._best_step: int | None = None
        self._wait = 0
        self._reductions = 0  # LR cuts since the last improvement
        self._seen = 0  # observations judged
        self._missing = MissingMetric(self.params["metric"])  # (a notice: see _metric_watch)
        self._stopped = False
        trend = self.params["smoothing"] == "trend"
        self._trend = TrendWindow(self.params["window"]) if trend else None
        self._robust = RobustWindow(self.params["window"]) if trend else None
        self._test_wait = 0

    def observe(self, obs: Observation, ctx: StepContext) -> list[Action]:
        if self._stopped:
            return []
        actions = self._judge(obs, ctx)
        if "lr_reduced" in ctx.flags:  # after the judgement: the cut's own value is old news
            self._reductions += 1
            if self.params["after_reductions"]:
                self._wait = 0  # the lower LR gets `patience` fresh observations
        return actions

    def _judge(self, obs: Observation, ctx: StepContext) -> list[Action]:
        metric = self.params["metric"]
        raw = obs.value(metric)
        if raw is None:
            return self._missing.absent(obs)
        if self._missing.active:
            self._missing.seen()
        if obs.step < self.params["start_after"]:
            return []
        if metric in _FLAGGED_STATISTICS and ctx.flags & FLAGS_NOT_COUNTED:
            return []
        if self._trend is not None:
            return self._judge_trend(raw, obs, ctx)
        value = self._sign * raw
        self._seen += 1
        self._wait += 1
        if value + self.params["min_delta"] < self._best:  # beats the best by more than δ
            self._best, self._best_step = value, obs.measured_at(metric)
            if self._beats_baseline(value):
                self._wait = 0
                self._reductions = 0
            return []
        if self._seen <= 1:  # Keras never stops at epoch 0
            return []
        return self._maybe_stop(obs, ctx, {"value": raw})

    def _beats_baseline(self, value: float) -> bool:
        baseline = self.params["baseline"]
        return baseline is None or value + self.params["min_delta"] < self._sign * baseline

    def _judge_trend(self, raw: float, obs: Observation, ctx: StepContext) -> list[Action]:
        window, robust = self._trend, self._robust
        assert window is not None and robust is not None
        value = self._sign * raw
        if not math.isfinite(value):
            return []  # a NaN cannot be averaged; the divergence guard's business
        judged = value
        if len(robust) >= MIN_ROBUST:
            median, sigma = robust.stats()
            judged = min(value, median + self.params["outlier_z"] * max(sigma, 1e-12))
        robust.add(value)  # unclipped: a lasting new level moves the median and is accepted
        window.push(judged)
        self._seen += 1
        self._wait += 1
        if not window.full:
            return []
        if self._test_wait > 0:  # tested every window / 8 observations once full
            self._test_wait -= 1
            return []
        self._test_wait = max(1, window.window // 8) - 1
        result = window.test(self.params["alpha"], delta=self.params["min_delta"])
        assert result is not None
        if result.newer < self._best:
            self._best, self._best_step = result.newer, obs.measured_at(self.params["metric"])
        if result.verdict == "fell":
            if self._beats_baseline(result.newer):
                self._wait = 0
                self._reductions = 0
            return []
        evidence = {"value": self._sign * result.newer, "window": window.window,
                    "alpha": self.params["alpha"], **result.evidence(),
                    "older_mean": self._sign * result.older,
                    "newer_mean": self._sign * result.newer}
        return self._maybe_stop(obs, ctx, evidence)

    def _maybe_stop(self, obs: Observation, ctx: StepContext,
                    evidence: dict[str, Any]) -> list[Action]:
        p = self.params
        if self._wait < p["patience"] or self._reductions < p["after_reductions"]:
            return []
        self._stopped = True
        ctx.stop = True
        best = self._sign * self._best
        what = "its best" if self._trend is None else "its best half-window mean"
        cuts = (f" and {self._reductions} LR reduction(s) (after_reductions "
                f"{p['after_reductions']})" if p["after_reductions"] else "")
        reason = (f"{p['metric']} has not improved on {what} {best:.6g} (step "
                  f"{self._best_step}) for {self._wait} observations (patience "
                  f"{p['patience']}){cuts}: stop training")
        return [Action("stop", reason, {
            "statistic": p["metric"], **evidence, "best": best, "best_step": self._best_step,
            "patience": p["patience"], "wait": self._wait, "reductions": self._reductions,
            "after_reductions": p["after_reductions"], "min_delta": p["min_delta"],
            "baseline": p["baseline"], "smoothing": p["smoothing"], "mode": p["mode"]})]

    def state_dict(self) -> dict[str, Any]:
        return {
            "best": float_to_json(self._best),
            "best_step": self._best_step,
            "wait": self._wait,
            "reductions": self._reductions,
            "seen": self._seen,
            "stopped": self._stopped,
            "trend": None if self._trend is None else self._trend.values(),
            "robust": None if self._robust is None else self._robust.values(),
            "test_wait": self._test_wait,
            "missing": self._missing.state_dict(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._best = float_from_json(state["best"])
        step = state["best_step"]
        self._best_step = None if step is None else int(step)
        self._wait = int(state["wait"])
        self._reductions = int(state["reductions"])
        self._seen = int(state["seen"])
        self._stopped = bool(state["stopped"])
        if self._trend is not None and self._robust is not None:
            self._trend.load([float(v) for v in state.get("trend") or []])
            self._robust.load([float(v) for v in state.get("robust") or []])
        self._test_wait = int(state.get("test_wait", 0))
        self._missing.load_state_dict(state.get("missing"))
