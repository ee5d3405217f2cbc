"""Plateau decay: torch ``ReduceLROnPlateau``'s rule, made composable.

The rule is torch's, knob for knob (``mode``, ``factor``, ``patience``,
``threshold``, ``threshold_mode``, ``cooldown``, ``min_lr``, ``eps``), counted
in observations of ``metric``: per-step ``loss``, or a named metric such as
``val_loss`` on the steps where it is reported. What differs:

* The reduction is a multiplier on whatever the schedules give, so plateau
  decay composes with warmup (pytorch#68978) and keeps per-group LR ratios: a
  reduction stops at the ``min_lr`` of the first group to reach it.
* Steps that the divergence guard flagged (spikes, non-finite values) are not
  counted as bad, so the recovery after a spike is not mistaken for a plateau
  (pytorch#30873).
* Optional smoothing (``ema`` or ``mean`` over ``smoothing_window``) for noisy
  per-step losses.
* ``test: trend`` replaces "no observation beat the best one" — a verdict taken
  on the extreme of a noisy series — with the statistics core's trend test
  (:class:`~lrctl.policy.stats.TrendWindow`): over the last ``patience``
  observations, the newer half's mean must sit significantly (one-sided level
  ``alpha``, autocorrelation accounted for) below the older half's by more than
  ``threshold``; when it does not, the metric has stalled and the LR is
  reduced. The window then starts afresh (after ``cooldown``). The test is
  taken every ``patience / 8`` observations once the window is full. On a
  falling metric it fires also when the fall is lost in the noise: a verdict
  on the absence of evidence. ``test: best`` (the default) is torch's rule,
  exactly.
* ``test: stall`` turns that question round (an equivalence test): the LR is
  reduced only when the window *shows* that the fall is smaller than
  ``threshold`` × the level — the upper confidence bound (level ``alpha``) of
  the older half's mean minus the newer half's lies below it. A slow real fall
  hidden in the noise is inconclusive, and then the LR you gave stands; a flat
  or rising metric with noise small enough to tell is reduced as with
  ``trend``. ``threshold`` is then the smallest fall per half window worth the
  LR (the default policy's 0.5 % over 200 observations).
* When the divergence guard accepts a new level of the loss (``level_shift``: a
  change to harder data), the window, the best value and the smoothing start
  afresh, after a new ``burn_in``: a window across the change would read it as
  a rise.
* ``burn_in``: the first observations of a run are not judged (by default with
  ``test: trend``, half of ``patience``). A run starts with a fast fall that no
  straight line fits; inside a window, the test would read that curve as noise
  (large, autocorrelated residuals) and could call a tenfold fall "not
  significant". As after a reduction, the window fills once the fall has settled.
* ``restart_lr``: when a reduction is due but the LR already sits at its floor,
  restart at that LR (group 0's; others keep their ratio) instead of stalling.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping
from typing import Any

from ._base import Action, Observation, ReactivePolicy, StepContext, float_from_json, float_to_json
from ._metric_watch import MissingMetric
from ._params import MAX_MEAN_WINDOW, MAX_WINDOW, Param, ParamError
from ._registry import register_policy
from ._schedule import per_group
from .stats import TrendWindow

FLAGS_NOT_COUNTED = frozenset({"spike", "nonfinite"})


@register_policy("plateau")
class Plateau(ReactivePolicy):
    priority = 50
    keeps_observations = False
    PARAMS = (
        Param("metric", "str", "loss", "statistic to watch: loss, grad_norm or a reported metric"),
        Param("mode", "str", "min", "min: lower is better; max: higher is better",
              choices=("min", "max")),
        Param("factor", "float", 0.1, "multiply the LR by this on a plateau", gt=0, lt=1),
        Param("patience", "int", 10, "bad observations tolerated before a reduction", ge=0),
        Param("threshold", "float", 1e-4, "least change that counts as an improvement", ge=0),
        Param("threshold_mode", "str", "rel", "rel: relative to best; abs: absolute",
              choices=("rel", "abs")),
        Param("cooldown", "int", 0, "observations to wait after a reduction", ge=0),
        Param("min_lr", "float_or_list", 0.0, "floor of the LR, one or one per group", ge=0),
        Param("eps", "float", 1e-8, "reductions smaller than this are skipped", ge=0),
        Param("smoothing", "str", "none", "smooth the metric before judging it",
              choices=("none", "ema", "mean")),
        Param("smoothing_window", "int", 20, "ema span / mean window for smoothing",
              ge=1, le=MAX_MEAN_WINDOW),
        Param("restart_lr", "float", None, "restart at this LR (group 0) when at the floor",
              gt=0, optional=True),
        Param("test", "str", "best", "best: torch's rule (no observation beat the best); "
              "trend: reduce when the fall over the last `patience` observations is not "
              "significant; stall: only when it is shown smaller than `threshold`",
              choices=("best", "trend", "stall")),
        Param("alpha", "float", 0.01, "test: trend or stall — one-sided level of the test",
              ge=1e-6, lt=0.5),
        Param("burn_in", "int", None, "observations at the start of the policy's life that "
              "are not judged (default: test: trend or stall, half of `patience`; test: "
              "best, none)",
              ge=0, optional=True),
    )

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        self._mode_worse = math.inf if self.params["mode"] == "min" else -math.inf
        self._windowed = self.params["test"] in ("trend", "stall")
        if self._windowed and self.params["patience"] > MAX_WINDOW:  # the window's size
            raise ParamError("patience", f"must be <= {MAX_WINDOW} with test: "
                             f"{self.params['test']} (the test's window), but got "
                             f"{self.params['patience']}")
        self._scale = 1.0
        self._best = self._mode_worse
        self._num_bad = 0
        # The start of a run counts as a cooldown: its first fast fall (a curve no line
        # fits) is not judged, so it is neither mistaken for noise nor compared with the
        # level it falls to (see the module docstring).
        burn_in = self.params["burn_in"]
        if burn_in is None:
            burn_in = self.params["patience"] // 2 if self._windowed else 0
        self._burn_in = burn_in
        self._cooldown_counter = burn_in
        self._ema: float | None = None
        self._recent: deque[float] = deque(maxlen=self.params["smoothing_window"])
        self._reductions = 0
        self._restarts = 0
        self._trend = (TrendWindow(max(8, self.params["patience"]))
                       if self._windowed else None)
        self._equivalence = self.params["test"] == "stall"
        self._test_wait = 0
        self._metric = self.params["metric"]  # read at every observation
        self._missing = MissingMetric(self._metric)  # (a notice: see _metric_watch)
        self._minimize = self.params["mode"] == "min"
        # The trend test's threshold: relative (a fraction of the level), or absolute.
        relative = self.params["threshold_mode"] == "rel"
        self._margin = self.params["threshold"] if relative else 0.0
        self._delta = 0.0 if relative else self.params["threshold"]
        # observe_plain's way: 1 the loss, 2 the grad norm (test: trend/stall), 0 a named metric
        # (never in a plain observation), -1 none (the loss or grad norm, test: best).
        self._pick = {"loss": 1, "grad_norm": 2}.get(self._metric, 0)
        if self._pick and self._trend is None:
            self._pick = -1

    def multiplier(self) -> float:
        return self._scale

    def _is_better(self, a: float, best: float) -> bool:
        threshold = self.params["threshold"]
        if self.params["mode"] == "min":
            if self.params["threshold_mode"] == "rel":
                return a < best * (1.0 - threshold)
            return a < best - threshold
        if self.params["threshold_mode"] == "rel":
            return a > best * (threshold + 1.0)
        return a > best + threshold

    def _smooth(self, value: float) -> float:
        how = self.params["smoothing"]
        if how == "none" or not math.isfinite(value):
            return value
        if how == "ema":
            alpha = 2.0 / (self.params["smoothing_window"] + 1.0)
            self._ema = value if self._ema is None else alpha * value + (1 - alpha) * self._ema
            return self._ema
        self._recent.append(value)
        return sum(self._recent) / len(self._recent)

    def observe(self, obs: Observation, ctx: StepContext) -> list[Action]:
        raw = obs.value(self._metric)
        if ctx.flags and "level_shift" in ctx.flags:
            self._restart()
        if raw is None:
            return self._missing.absent(obs)
        if self._missing.active:
            self._missing.seen()
        if ctx.flags and not ctx.flags.isdisjoint(FLAGS_NOT_COUNTED):
            return []
        if self._trend is not None:
            return self._observe_trend(raw, obs, ctx)
        current = self._smooth(raw)
        if self._is_better(current, self._best):
            self._best = current
            self._num_bad = 0
        else:
            self._num_bad += 1
        if self._cooldown_counter > 0:
            self._cooldown_counter -= 1
            self._num_bad = 0
        if self._num_bad <= self.params["patience"]:
            return []
        bad = self._num_bad
        self._cooldown_counter = self.params["cooldown"]
        self._num_bad = 0
        evidence = {
            "statistic": self.params["metric"],
            "value": current,
            "best": self._best,
            "threshold": self.params["threshold"],
            "threshold_mode": self.params["threshold_mode"],
            "window": self.params["patience"],
            "bad_observations": bad,
        }
        return self._act(obs, ctx, evidence,
                         f"{self.params['metric']} has not improved on its best "
                         f"{self._best:.6g} for {bad} observations (patience "
                         f"{self.params['patience']})")

    def _restart(self) -> None:
        """The divergence guard accepted a new level of the loss (a change of data): what
        came before it says nothing about a plateau after it. Judge afresh, after a
        burn-in, as at the start of a run."""
        self._best = self._mode_worse
        self._num_bad = 0
        self._ema = None
        self._recent.clear()
        if self._trend is not None:
            self._trend.clear()
            self._test_wait = 0
        self._cooldown_counter = max(self._cooldown_counter, self._burn_in)

    def observe_plain(self, step: int, loss: float | None, grad_norm: float | None) -> bool:
        """``test: trend`` on the usual observation (no flags: nothing before this policy
        acted), as :meth:`_observe_trend` takes it, when no test is due or the test
        surely says "fell" (TrendWindow.surely_fell); a named metric is never in it."""
        pick = self._pick
        if pick == 1:
            raw = loss
        elif pick == 2:
            raw = grad_norm
        else:
            # A named metric: observe() finds none (unless its notice is due); test: best
            # declines.
            return pick == 0 and self._missing.plain()
        if raw is None:
            return True
        if self._cooldown_counter > 0:
            self._cooldown_counter -= 1
            return True
        value = raw if self._minimize else -raw
        window: TrendWindow = self._trend  # type: ignore[assignment]
        if self._test_wait:  # the wait runs down once the window is full
            if window.push(value):
                self._test_wait -= 1
            return True
        if window.push_short(value):
            return True  # (not full yet: no test)
        # A test is due with this value in: take it here only when it surely says "fell".
        if not window.surely_fell(self.params["alpha"], self._margin, self._delta,
                                  pushing=value):
            return False  # the test may act: observe() takes it
        window.push(value)
        self._test_wait = max(1, window.window // 8) - 1
        return True

    def _observe_trend(self, raw: float, obs: Observation, ctx: StepContext) -> list[Action]:
        """``test: trend``: reduce when the window's fall is not significant; ``test:
        stall``: when it is shown smaller than the threshold."""
        window = self._trend
        assert window is not None
        if not math.isfinite(raw):
            return []  # the divergence guard's business; a NaN cannot be averaged
        if self._cooldown_counter > 0:
            self._cooldown_counter -= 1
            return []
        window.push(raw if self._minimize else -raw)
        if not window.full:
            return []
        if self._test_wait > 0:  # tested every window / 8 observations once full
            self._test_wait -= 1
            return []
        self._test_wait = max(1, window.window // 8) - 1
        alpha, margin, delta = self.params["alpha"], self._margin, self._delta
        if window.surely_fell(alpha, margin, delta):  # (the test's verdict, cheaper)
            return []
        result = window.test(alpha, margin, delta)
        if result is None or result.verdict == "fell":
            return []
        if self._equivalence and not result.stalled(margin, delta):
            return []  # inconclusive: the LR stands
        sign = 1.0 if self.params["mode"] == "min" else -1.0
        evidence = {"statistic": self.params["metric"], "test": self.params["test"],
                    "window": window.window, "alpha": self.params["alpha"],
                    "threshold": self.params["threshold"], **result.evidence(),
                    "older_mean": sign * result.older, "newer_mean": sign * result.newer}
        window.clear()
        self._test_wait = 0
        self._cooldown_counter = self.params["cooldown"]
        if result.verdict == "rose":
            what = "rose"
        elif self._equivalence:
            moved = "fell" if self._minimize else "rose"
            if self._delta or not result.older:  # an absolute threshold (or a level of 0)
                what = (f"{moved} by at most {result.fall_upper:.6g} (less than the threshold "
                        f"{self._delta:g})")
            else:
                what = (f"{moved} by at most {result.fall_upper / abs(result.older):.3%} "
                        f"(less than the threshold {self.params['threshold']:.3%})")
        else:
            what = "did not fall significantly"
        return self._act(obs, ctx, evidence,
                         f"{self.params['metric']} {what} over the last {window.window} "
                         f"observations (mean {sign * result.older:.6g} → "
                         f"{sign * result.newer:.6g}, z {result.z:.2f}, level "
                         f"{self.params['alpha']:g})")

    def _act(self, obs: Observation, ctx: StepContext, evidence: dict[str, Any],
             why: str) -> list[Action]:
        """A plateau was found: reduce the LR (torch's rule), or restart at the floor."""
        ratio = self._reduction_ratio(obs.lrs)
        if ratio is not None:
            self._scale *= ratio
            self._reductions += 1
            ctx.flags.add("lr_reduced")  # early stopping's after_reductions counts these
            return [Action("reduce", f"{why}: LR × {ratio:.6g}", {**evidence, "factor": ratio})]
        restart_lr = self.params["restart_lr"]
        if restart_lr is None or not obs.lrs or obs.lrs[0] <= 0:
            return []
        self._scale *= restart_lr / obs.lrs[0]
        self._best = self._mode_worse
        self._restarts += 1
        return [Action("restart",
                       f"{self.params['metric']} plateaued at the LR floor: restart at "
                       f"{restart_lr:.6g}", {**evidence, "restart_lr": restart_lr})]

    def _reduction_ratio(self, lrs: Any) -> float | None:
        """torch's per-group rule, as one ratio so that group ratios are kept.

        torch: ``new = max(old * factor, min_lr)``, applied when ``old - new > eps``.
        """
        factor = self.params["factor"]
        if not lrs:
            return factor
        ratio = factor
        for g, old in enumerate(lrs):
            floor = per_group(self.params["min_lr"], g, 0.0)
            if old > 0:
                ratio = max(ratio, floor / old)
        if ratio >= 1.0:
            return None
        if not any(old - old * ratio > self.params["eps"] for old in lrs):
            return None
        return ratio

    def state_dict(self) -> dict[str, Any]:
        return {
            "scale": self._scale,
            "best": float_to_json(self._best),
            "num_bad": self._num_bad,
            "cooldown_counter": self._cooldown_counter,
            "ema": None if self._ema is None else float_to_json(self._ema),
            "recent": [float_to_json(v) for v in self._recent],
            "reductions": self._reductions,
            "restarts": self._restarts,
            "trend": None if self._trend is None else self._trend.values(),
            "test_wait": self._test_wait,
            "missing": self._missing.state_dict(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._scale = float(state["scale"])
        self._best = float_from_json(state["best"])
        self._num_bad = int(state["num_bad"])
        self._cooldown_counter = int(state["cooldown_counter"])
        ema = state["ema"]
        self._ema = None if ema is None else float_from_json(ema)
        self._recent = deque((float_from_json(v) for v in state["recent"]),
                             maxlen=self.params["smoothing_window"])
        self._reductions = int(state["reductions"])
        self._restarts = int(state["restarts"])
        if self._trend is not None:
            self._trend.load([float(v) for v in state.get("trend") or []])
        self._test_wait = int(state.get("test_wait", 0))
        self._missing.load_state_dict(state.get("missing"))
