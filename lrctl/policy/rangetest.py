"""Online LR range test: find the learning rate in the first steps of the real run.

Back-off and decay can only lower a learning rate, so a run started ten times
too low stays too low. This policy fixes the starting LR from below and above
without a separate pre-run and without resetting the model:

* The multiplier starts at ``start_factor`` and grows by ``growth`` every
  observation with a finite loss: an exponential warmup that keeps going (the
  sweep of Smith's range test, done while training). An observation without a
  loss (or with a non-finite one) holds the multiplier: the sweep never grows
  the LR on a step it cannot judge.
* The sweep ends when the training loss says the LR is high enough: its EMA
  (span ``smoothing_window``) rises more than ``rise`` (relative) above its best
  value for ``patience`` observations in a row (a short patch of hard data is
  not a too-high LR; and while the loss has not yet fallen clearly, the rise must
  also beat ``noise_z`` standard deviations of the smoothed loss's own noise); or
  the divergence guard flags a spike or a non-finite value at this step; or
  (``slowdown`` > 0) the loss falls more slowly than ``slowdown`` × the
  steepest fall seen, after a fall of at least ``min_rate``. The fall is
  the relative drop of the EMA over one ``smoothing_window``. It also ends at
  ``max_factor`` × the initial LR.
* The LR then settles at ``settle`` × the multiplier the sweep stopped at
  (``anchor: stop``), at which the smoothed loss was lowest (``anchor: best``)
  or at which it fell fastest (``anchor: steepest``), and stays there; other
  policies act on top.

Why the slowdown test: a sweep that waits for the loss to *rise* has already
trained a few steps at a too-high LR, and on small models that leaves lasting
damage (large weights, over-confident predictions) that a lower LR afterwards
does not undo. The steepest fall comes before the rise (Smith's own advice is
to pick the LR of the steepest fall), so stopping when the fall slows keeps the
overshoot small.

A sweep that ends before the smoothed loss has fallen clearly (:meth:`RangeTest._has_fallen`:
10 % below the median of the first ``min_steps`` losses, and by a factor beyond its noise)
is inconclusive: the LR the user gave stands.

Because the sweep is relative to the initial LR, the settled LR does not depend
on the starting guess as long as the good LR lies between ``start_factor`` and
``max_factor`` times it. The EMA is judged only after ``min_steps``
observations, so the first noisy losses cannot end the sweep.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from collections.abc import Mapping
from typing import Any

from ._base import Action, Observation, ReactivePolicy, StepContext, float_from_json, float_to_json
from ._params import MAX_MEAN_WINDOW, Param
from ._registry import register_policy

_STOP_FLAGS = frozenset({"spike", "nonfinite"})
NOISE_ALPHA = 0.1  # the noise estimate averages over ~20 observations
EARLY_FALL = 0.1  # the smoothed loss's fall from its start that ends the noise guard


@register_policy("rangetest")
class RangeTest(ReactivePolicy):
    priority = 20  # after the divergence guard (its flags end the sweep), before plateau
    keeps_observations = False
    PARAMS = (
        Param("start_factor", "float", 0.01, "multiplier on the initial LR at step 0",
              gt=0, le=1),
        Param("growth", "float", 1.07, "growth of the multiplier per observation during the sweep",
              gt=1, le=10),
        Param("max_factor", "float", 1.0e4, "the sweep ends at this multiplier", ge=1),
        Param("smoothing_window", "int", 5, "EMA span of the loss during the sweep", ge=1,
              le=MAX_MEAN_WINDOW),
        Param("rise", "float", 0.05, "relative rise of the smoothed loss above its best that "
              "ends the sweep", gt=0),
        Param("min_steps", "int", 10, "observations before the smoothed loss is judged "
              "(the sweep's start is the median of their losses)", ge=1, le=MAX_MEAN_WINDOW),
        Param("patience", "int", 1, "consecutive observations above the rise limit that end "
              "the sweep (a short hard patch of data is not a too-high LR)", ge=1),
        Param("noise_z", "float", 6.0, "until the smoothed loss has fallen clearly (10 % "
              "below its start and by a factor of e^(noise_z σ)), the rise must also exceed "
              "this many standard deviations of its own noise, and a sweep that ends before "
              "is inconclusive: the given LR stands (0: off)", ge=0),
        Param("stop_on_flags", "bool", True,
              "a spike or non-finite flag from the divergence guard ends the sweep"),
        Param("slowdown", "float", 0.0, "end the sweep when the fall of the smoothed loss "
              "drops below this fraction of its steepest (0: off)", ge=0, lt=1),
        Param("min_rate", "float", 0.05, "least steepest fall (relative, per smoothing "
              "window) before the slowdown test applies", gt=0),
        Param("anchor", "str", "stop", "settle relative to the multiplier where the sweep "
              "stopped, where the smoothed loss was lowest or where it fell fastest",
              choices=("stop", "best", "steepest")),
        Param("settle", "float", 0.2, "final multiplier = settle × the anchor multiplier",
              gt=0, le=1),
    )

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        self._scale: float = self.params["start_factor"]
        self._sweeping = True
        self._seen = 0  # loss observations during the sweep
        self._ema = 0.0  # biased EMA; divided by (1 - (1 - alpha)^seen) when read
        self._best = math.inf
        self._best_scale = self._scale
        self._history: deque[float] = deque(maxlen=self.params["smoothing_window"] + 1)
        self._steepest = 0.0  # steepest relative fall of the EMA over one window
        self._steepest_scale = self._scale
        self._above = 0  # consecutive observations above the rise limit
        self._dev = 0.0  # biased EMA of |loss - smoothed| / |smoothed|: the loss's noise
        self._start: float | None = None  # the median of the first min_steps losses
        # ... those losses until then (None: a state from before they were kept)
        self._first: list[float] | None = []
        self._fallen = False  # the loss has fallen clearly: the noise guard is over

    def multiplier(self) -> float:
        return self._scale

    def observe(self, obs: Observation, ctx: StepContext) -> list[Action]:
        if not self._sweeping:
            return []
        flagged = sorted(ctx.flags & _STOP_FLAGS) if self.params["stop_on_flags"] else []
        if flagged:
            return self._settle(obs, f"the divergence guard flagged a {flagged[0]}",
                                {"statistic": "flag", "value": flagged[0]})
        loss = obs.loss
        if loss is None or not math.isfinite(loss):
            # Nothing to judge the LR by at this step: the sweep holds. Growing blind (a
            # framework that reports the loss only every N steps) would run the LR away.
            ctx.flags.add("lr_sweep")
            return []
        smoothed = self._smooth(loss)
        if self._start is None:
            # The level the sweep starts from: the median of the first min_steps losses,
            # not one smoothed value (an EMA of 5 keeps a third of a loss's noise: a start
            # that happened high made noise look like a fall), nor their mean (an odd
            # first batch, a transient of a few steps at any LR, would make a fall).
            first = self._first
            if first is not None:
                first.append(loss)
            if self._seen >= self.params["min_steps"]:
                self._start = (statistics.median(first) if first is not None
                               and len(first) == self._seen else smoothed)
                self._first = []  # (not needed any more)
        # "Lowest so far" only from a smoothed estimate past its warm-up: the
        # first raw losses are single samples, and a lucky first batch would
        # otherwise become a best that noise alone "rises" from.
        if self._seen >= self.params["min_steps"] and smoothed < self._best:
            self._best, self._best_scale = smoothed, self._scale
        slowed = self._judge_rate(smoothed)
        if slowed is not None:
            return self._settle(obs, slowed[0], slowed[1])
        rise = self._rise()
        limit = self._best + rise * abs(self._best)
        above = (self._seen > self.params["min_steps"] and math.isfinite(self._best)
                 and smoothed > limit)
        self._above = self._above + 1 if above else 0
        if self._above >= self.params["patience"]:
            return self._settle(
                obs, f"smoothed loss {smoothed:.6g} rose above {limit:.6g} "
                f"({rise:.3g} over its best {self._best:.6g})",
                {"statistic": "loss_ema", "value": smoothed, "best": self._best,
                 "threshold": limit, "rise": rise,
                 "window": self.params["smoothing_window"]})
        if self._scale * self.params["growth"] > self.params["max_factor"]:
            return self._settle(obs, f"the sweep reached max_factor {self.params['max_factor']:g}",
                                {"statistic": "multiplier", "value": self._scale,
                                 "threshold": self.params["max_factor"]})
        self._scale *= self.params["growth"]
        ctx.flags.add("lr_sweep")  # still sweeping: an anneal waits
        return []

    def _judge_rate(self, smoothed: float) -> tuple[str, dict[str, Any]] | None:
        """(reason, evidence) when the fall of the smoothed loss has slowed, else None."""
        self._history.append(smoothed)
        if len(self._history) < self._history.maxlen or self._history[0] <= 0:  # type: ignore[operator]
            return None
        rate = (self._history[0] - smoothed) / self._history[0]
        if rate > self._steepest:
            self._steepest, self._steepest_scale = rate, self._scale
        slowdown = self.params["slowdown"]
        if (slowdown <= 0 or self._seen < self.params["min_steps"]
                or self._steepest < self.params["min_rate"] or rate >= slowdown * self._steepest):
            return None
        return (f"the smoothed loss fell {rate:.3g} over the last "
                f"{self.params['smoothing_window']} steps, under {slowdown:g} × its steepest "
                f"fall {self._steepest:.3g}",
                {"statistic": "loss_fall", "value": rate, "steepest": self._steepest,
                 "threshold": slowdown * self._steepest,
                 "window": self.params["smoothing_window"]})

    def _smooth(self, loss: float) -> float:
        alpha = 2.0 / (self.params["smoothing_window"] + 1.0)
        if self._seen:
            before = self._ema / (1.0 - (1.0 - alpha) ** self._seen)
            if before != 0:
                self._dev = NOISE_ALPHA * abs(loss - before) / abs(before) + (
                    1.0 - NOISE_ALPHA) * self._dev
        self._seen += 1
        self._ema = alpha * loss + (1.0 - alpha) * self._ema
        return self._ema / (1.0 - (1.0 - alpha) ** self._seen)

    def _rise(self) -> float:
        """The relative rise that ends the sweep: ``rise``, or more on a noisy loss.

        While the LR is still too small to move the loss, a per-step loss that
        wobbles ±10 % makes its smoothed curve wobble too, and the best value of a
        wobbling curve is a low outlier: a fixed 8 % rise over it is then reached by
        noise alone, and the sweep would settle far too low. Until the smoothed loss
        has fallen beyond its noise (:meth:`_has_fallen`), the limit is therefore at
        least ``noise_z`` standard deviations of the smoothed loss, estimated from
        the mean absolute deviation of the raw losses from it. Once the loss falls,
        the plain ``rise`` rules: by then a rise is the LR's doing, and waiting for a
        noise-sized one would overshoot.
        """
        if self._has_fallen() or self._start is None or self.params["noise_z"] <= 0:
            return self.params["rise"]
        return max(self.params["rise"], self._noise_bound())

    def _noise_bound(self) -> float:
        """``noise_z`` standard deviations of the smoothed loss (relative to its level)."""
        alpha = 2.0 / (self.params["smoothing_window"] + 1.0)
        seen = max(self._seen - 1, 1)
        dev = self._dev / (1.0 - (1.0 - NOISE_ALPHA) ** seen)  # unbiased early on
        sigma = 1.2533 * dev * math.sqrt(alpha / (2.0 - alpha))  # mean |x| → σ, then EMA
        return self.params["noise_z"] * sigma

    def _has_fallen(self) -> bool:
        """Whether the smoothed loss has fallen clearly: its best below its start by
        :data:`EARLY_FALL` and (``noise_z`` > 0) by a factor of ``exp(noise_z σ)``, σ the
        relative noise of the smoothed loss, judged once that estimate is worth the name
        (``min_steps``). The best of a wobbling curve sits low, so a fall no larger than
        the noise is no evidence. Once fallen, it stays so: near zero, a loss's relative
        noise means nothing."""
        if self._fallen:
            return True
        if self._start is None or self._seen < self.params["min_steps"]:
            return False
        # (A negative loss falls away from zero: below start * 1.1, not start * 0.9.)
        sign = 1.0 if self._start >= 0 else -1.0
        fell = self._best < self._start * (1.0 - sign * EARLY_FALL)
        if fell and self.params["noise_z"] > 0:
            noisy = self._noise_bound()
            # Beyond the noise on a log scale where the loss is positive: a loss whose
            # noise is as large as itself (heavy-tailed batches, a fall of 99 % in a
            # sweep) can still fall clearly by a factor, never by more than 100 %.
            fell = (self._best < self._start * math.exp(-noisy) if self._start > 0
                    else self._best < self._start * (1.0 - sign * noisy))
        self._fallen = fell
        return fell

    def _settle(self, obs: Observation, why: str, evidence: dict[str, Any]) -> list[Action]:
        self._sweeping = False
        old = self._scale
        lr_at_stop = obs.lrs[0] if obs.lrs else None
        if self.params["noise_z"] > 0 and not self._has_fallen():
            # The sweep ended before the smoothed loss had fallen by more than its
            # noise (10 % at least): there is no evidence of where the good LR is.
            # The LR the user gave stands.
            self._scale = 1.0
            return [Action(
                "range_test_done",
                f"LR range test ended at step {obs.step}: {why}, but the smoothed loss had "
                f"not yet fallen beyond its noise: inconclusive, so the given LR stands "
                f"(LR × {1.0 / old:.6g})",
                {**evidence, "conclusive": False, "lr_at_stop": lr_at_stop,
                 "stop_multiplier": old, "multiplier": 1.0, "factor": 1.0 / old,
                 "observations": self._seen})]
        anchor = {"stop": self._scale, "best": self._best_scale,
                  "steepest": self._steepest_scale}[self.params["anchor"]]
        self._scale = anchor * self.params["settle"]
        return [Action(
            "range_test_done",
            f"LR range test ended at step {obs.step}: {why}; LR × {self._scale / old:.6g} "
            f"(settle {self.params['settle']:g} × the {self.params['anchor']} multiplier "
            f"{anchor:.6g})",
            {**evidence, "conclusive": True, "lr_at_stop": lr_at_stop, "stop_multiplier": old,
             "best_multiplier": self._best_scale, "steepest_multiplier": self._steepest_scale,
             "multiplier": self._scale,
             "factor": self._scale / old, "observations": self._seen})]

    def state_dict(self) -> dict[str, Any]:
        return {
            "scale": self._scale,
            "sweeping": self._sweeping,
            "seen": self._seen,
            "ema": self._ema,
            "best": float_to_json(self._best),
            "best_scale": self._best_scale,
            "history": list(self._history),
            "steepest": self._steepest,
            "steepest_scale": self._steepest_scale,
            "above": self._above,
            "dev": self._dev,
            "start": self._start,
            "first": None if self._first is None else list(self._first),
            "fallen": self._fallen,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._scale = float(state["scale"])
        self._sweeping = bool(state["sweeping"])
        self._seen = int(state["seen"])
        self._ema = float(state["ema"])
        self._best = float_from_json(state["best"])
        self._best_scale = float(state["best_scale"])
        self._history = deque((float(v) for v in state["history"]),
                              maxlen=self.params["smoothing_window"] + 1)
        self._steepest = float(state["steepest"])
        self._steepest_scale = float(state["steepest_scale"])
        self._above = int(state.get("above", 0))
        self._dev = float(state.get("dev", 0.0))
        start = state.get("start")
        self._start = None if start is None else float(start)
        # (A state from before the first losses were kept: a start still to come takes
        # the smoothed loss.)
        first = state.get("first")
        self._first = None if first is None else [float(v) for v in first]
        self._fallen = bool(state.get("fallen", False))
