"""WSD: warmup, a stable LR for as long as the run needs, then a short cooldown.

The warmup-stable-decay schedule (transformers' ``get_wsd_schedule``): the LR
ramps up over ``warmup_steps`` from ``min_lr_ratio`` × the LR, holds the LR you
gave, and at the end falls to ``min_lr_ratio`` × it over the cooldown's length
(``decay_steps``, or ``decay_fraction`` × the run's length), in the shape
``decay_shape``: ``linear``, ``cosine`` (half a wave) or ``1-sqrt``. With the
run's length known and ``start_on: schedule`` the LR of every step is
transformers' (tested for parity). What a fixed schedule cannot do:

* **Start the cooldown when you decide.** ``lrctl decay RUN --steps N`` (or
  ``engine.command("decay", steps=N)``) starts it after the last observed step
  ``L``: steps ``L+1 … L+N`` decay and step ``L+N`` trains at ``min_lr_ratio`` ×
  the LR. A cooldown already under way restarts from its current level over
  the new length. ``lrctl decay RUN --cancel`` before it ends returns to the
  stable LR, and the policy then starts no cooldown by itself again, except a
  scheduled one still in the future. Both are decisions of this policy, kept
  in its state: they survive a controller restart and a hot reload.
* **Start it on a plateau** (``start_on: plateau``): when the statistics core's
  trend test (as plateau decay's ``test: trend``) finds no significant fall of
  ``metric`` over the last ``window`` observations of the stable phase, or at
  the scheduled point, whichever comes first. The first ``burn_in`` observations
  of the stable phase (by default half of ``window``) are not judged: a run's
  first fast fall is a curve no line fits, and inside a window the test reads it
  as noise and calls a tenfold fall "not significant" (as plateau decay's
  ``burn_in``). ``test: stall`` starts it only when the window *shows* the fall
  smaller than ``threshold`` (plateau decay's equivalence test): a slow fall lost
  in the noise is inconclusive, and the stable LR stands. A new level of the loss
  accepted by the divergence guard (``level_shift``) restarts the window and the
  burn-in.
* ``start_on: operator``: only ``lrctl decay`` starts it.

The warmup wins over a cooldown that starts inside it (as in transformers). It
is a multiplier, so the divergence guard's back-offs and plateau's reductions
still act on top; starting the cooldown counts as an LR cut for early
stopping's ``after_reductions``. ``stop_after_decay`` asks the run to stop
when the cooldown ends. Decisions: ``warmup_done``, ``decay_start`` (its
evidence says who started it), ``decay_cancel``, ``decay_done``,
``wsd_inactive`` (once, when nothing but an operator can start the cooldown).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

from ._base import Action, Observation, ReactivePolicy, StepContext
from ._params import MAX_WINDOW, Param, ParamError
from ._registry import register_policy
from .stats import TrendWindow

SHAPES: dict[str, Callable[[float], float]] = {  # progress 0 → 1 to a factor 1 → 0
    "linear": lambda p: 1.0 - p,
    "cosine": lambda p: 0.5 * (1.0 + math.cos(math.pi * p)),
    "1-sqrt": lambda p: 1.0 - math.sqrt(p),
}
WARMUPS: dict[str, Callable[[float], float]] = {  # progress 0 → 1 to a factor 0 → 1
    "linear": lambda p: p,
    "cosine": lambda p: 0.5 * (1.0 - math.cos(math.pi * p)),
    "1-sqrt": lambda p: 1.0 - math.sqrt(1.0 - p),
}
FLAGS_NOT_COUNTED = frozenset({"spike", "nonfinite"})


@register_policy("wsd")
class WSD(ReactivePolicy):
    priority = 45  # after the divergence guard, before plateau and early stopping
    keeps_observations = False
    COMMANDS = ("decay", "cancel")
    PARAMS = (
        Param("warmup_steps", "int", 0, "steps of warmup from min_lr_ratio × the LR", ge=0),
        Param("warmup_shape", "str", "linear", "shape of the warmup",
              choices=tuple(WARMUPS)),
        Param("decay_steps", "int", None, "length of the cooldown in steps", ge=1,
              optional=True),
        Param("decay_fraction", "float", None, "or: the cooldown's length as a fraction of "
              "total_steps", gt=0, le=1, optional=True),
        Param("decay_shape", "str", "1-sqrt", "shape of the cooldown", choices=tuple(SHAPES)),
        Param("min_lr_ratio", "float", 0.0, "multiplier at the end of the cooldown (and at "
              "the warmup's start)", ge=0, le=1),
        Param("total_steps", "int", None, "length of the run in steps (default: the "
              "total_steps the hook gave)", ge=1, optional=True),
        Param("start_on", "str", "schedule", "schedule: total_steps minus the cooldown's "
              "length; plateau: also earlier, when `metric` stalls; operator: only "
              "`lrctl decay`", choices=("schedule", "plateau", "operator")),
        Param("metric", "str", "loss", "start_on plateau: the statistic whose stall starts "
              "the cooldown"),
        Param("window", "int", 400, "start_on plateau: observations in the trend test", ge=8,
              le=MAX_WINDOW),
        Param("alpha", "float", 0.01, "start_on plateau: one-sided level of the 'still "
              "falling' test", ge=1e-6, lt=0.5),
        Param("threshold", "float", 1e-3, "start_on plateau: a fall must exceed this fraction "
              "of the level to count", ge=0),
        Param("test", "str", "trend", "start_on plateau: trend — start when the fall is not "
              "significant; stall — only when it is shown smaller than `threshold` (as "
              "plateau decay's)", choices=("trend", "stall")),
        Param("confirm", "int", 1, "start_on plateau: tests in a row (one every window / 8 "
              "observations) that must find the stall before the cooldown starts early",
              ge=1, le=MAX_WINDOW),
        Param("burn_in", "int", None, "start_on plateau: observations at the start of the "
              "stable phase that are not judged (default: half of `window`)", ge=0,
              optional=True),
        Param("stop_after_decay", "bool", False, "ask the run to stop when the cooldown ends"),
    )

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        p = self.params
        if p["decay_steps"] is not None and p["decay_fraction"] is not None:
            raise ParamError("decay_fraction", "give decay_steps or decay_fraction, not both")
        if p["start_on"] != "operator" and p["decay_steps"] is None and (
                p["decay_fraction"] is None):
            raise ParamError("decay_steps", f"required by start_on {p['start_on']!r}: give "
                                            "decay_steps or decay_fraction")
        self._total: int | None = p["total_steps"]
        self._next = 0  # the step whose LR multiplier() gives
        # The cooldown under way (or finished): start step (its factor is `from`),
        # length, starting level, shape, and who started it.
        self._start: int | None = None
        self._length = 0
        self._from = 1.0
        self._shape = p["decay_shape"]
        self._source = ""
        self._done = False
        self._cancelled_at: int | None = None  # no automatic start at or before this step
        self._told_inactive = False
        self._cut_pending = False  # an operator's cooldown, for early stopping to count
        self._trend = TrendWindow(p["window"]) if p["start_on"] == "plateau" else None
        self._test_wait = 0
        self._stalls = 0  # tests in a row that found the stall (see `confirm`)
        # Observations of the stable phase still to pass unjudged (see the docstring).
        self._burn_left = 0 if self._trend is None else self._burn_in()
        self._scale = self._factor(0)

    def _burn_in(self) -> int:
        p = self.params
        return p["window"] // 2 if p["burn_in"] is None else p["burn_in"]

    def multiplier(self) -> float:
        return self._scale

    # -- the schedule --------------------------------------------------------------------
    def decay_length(self) -> int | None:
        """The cooldown's length from the knobs (None: ``decay_fraction`` of an unknown
        run length, or neither knob)."""
        if self.params["decay_steps"] is not None:
            return int(self.params["decay_steps"])
        if self.params["decay_fraction"] is None or self._total is None:
            return None
        return max(1, round(self.params["decay_fraction"] * self._total))

    def _scheduled_start(self) -> int | None:
        length = self.decay_length()
        if self.params["start_on"] == "operator" or self._total is None or length is None:
            return None
        start = self._total - length
        return None if self._cancelled_at is not None and start <= self._cancelled_at \
            else start

    def _factor(self, t: int) -> float:
        p = self.params
        low = p["min_lr_ratio"]
        if t < p["warmup_steps"]:
            ramp = WARMUPS[p["warmup_shape"]](t / p["warmup_steps"])
            return max(0.0, ramp * (1.0 - low) + low)
        start, length, level, shape = self._start, self._length, self._from, self._shape
        if start is None:
            scheduled = self._scheduled_start()
            if scheduled is None:
                return 1.0
            start, length, level, shape = scheduled, self.decay_length() or 1, 1.0, \
                p["decay_shape"]
        if t < start:
            return level
        if t >= start + length:
            return low
        return max(0.0, low + (level - low) * SHAPES[shape]((t - start) / length))

    # -- observations ----------------------------------------------------------------------
    def observe(self, obs: Observation, ctx: StepContext) -> list[Action]:
        extended: list[Action] | None = None  # (no list on the usual observation)
        if self.params["total_steps"] is None and ctx.total_steps is not None:
            if self._total is not None and ctx.total_steps > self._total:
                extended = self._extended(ctx.total_steps, obs.step)
            self._total = ctx.total_steps
        if self._cut_pending:  # an operator started a cooldown since the last observation
            self._cut_pending = False
            ctx.flags.add("lr_reduced")
        actions = self._inactive_note() + self._phase_events(obs, ctx)
        if extended:
            actions[:0] = extended
        self._next = obs.step + 1
        self._scale = self._factor(self._next)
        if self._start is not None and not self._done and self._next >= \
                self._start + self._length:
            self._done = True
            actions.append(Action("decay_done", f"cooldown finished: multiplier "
                                  f"{self._scale:.6g} from step {self._next}",
                                  {"statistic": "step", "value": self._next,
                                   "multiplier": self._scale, "started": self._start}))
            if self.params["stop_after_decay"]:
                ctx.stop = True
                actions.append(Action("stop", "the cooldown is over (stop_after_decay)",
                                      {"statistic": "step", "value": self._next}))
        return actions

    def _extended(self, total: int, step: int) -> list[Action]:
        """The run was made longer (``max_steps`` raised on a resume) after the schedule
        began its cooldown: the cooldown is stretched to end at the new last step, at the
        point of its curve it had reached (it would otherwise end early and leave the
        added steps at the floor). A cooldown already over, or an operator's, stays."""
        if self._start is None or self._source != "schedule" or self._done:
            return []
        old_end = self._start + self._length
        done = min(max((step - self._start) / self._length, 0.0), 0.99)
        length = max(1, round((total - step) / (1.0 - done)))
        self._start, self._length = total - length, length
        level = self._factor(step)
        return [Action("decay_extended", f"the run now ends at step {total} (was "
                       f"{old_end}): the cooldown is stretched over steps "
                       f"{self._start + 1}-{total}, going on from {level:.6g} × the LR",
                       {"statistic": "total_steps", "value": total, "threshold": old_end,
                        "from": level, "decay_steps": length})]

    def _inactive_note(self) -> list[Action]:
        """Said once, when nothing but an operator can start the cooldown."""
        mode = self.params["start_on"]
        if self._told_inactive or mode == "operator":
            return []
        if self.decay_length() is not None and (mode == "plateau" or self._total is not None):
            return []
        self._told_inactive = True
        if self.decay_length() is None:
            need = ("decay_fraction needs the run's length, for the cooldown's length (and "
                    "so a stall cannot start one either)")
            start = "`lrctl decay RUN --steps N` starts one"
        else:
            need = "start_on: schedule needs the run's length"
            start = "`lrctl decay RUN` starts one"
        return [Action("wsd_inactive", f"no cooldown is scheduled: {need}; pass total_steps= "
                       f"to lrctl.attach, or set total_steps in the policy file; {start}",
                       {"statistic": "total_steps", "value": None})]

    def _phase_events(self, obs: Observation, ctx: StepContext) -> list[Action]:
        p = self.params
        warmup = p["warmup_steps"]
        # (with every=N, recorded by the first report at or after the step)
        since = obs.step + 1 if ctx.prev_step is None else min(ctx.prev_step + 2, obs.step + 1)
        if warmup and since <= warmup <= obs.step + 1:
            return [Action("warmup_done", f"warmup complete after {warmup} steps: "
                           "stable phase", {"statistic": "step", "value": warmup})]
        if self._start is not None:
            return []
        scheduled = self._scheduled_start()
        if scheduled is not None and obs.step >= scheduled:
            length = self.decay_length() or 1
            return self._begin(scheduled, length, 1.0, p["decay_shape"], "schedule", ctx,
                               f"scheduled: the last {length} of {self._total} steps")
        if obs.step < p["warmup_steps"]:
            return []
        return self._plateau_test(obs, ctx)

    def _plateau_test(self, obs: Observation, ctx: StepContext) -> list[Action]:
        window = self._trend
        raw = obs.value(self.params["metric"])
        if window is None or self._cancelled_at is not None:
            return []
        if "level_shift" in ctx.flags:  # a new level of the loss: judge afresh (as plateau)
            window.clear()
            self._test_wait = self._stalls = 0
            self._burn_left = max(self._burn_left, self._burn_in())
        if raw is None:
            return []
        if ctx.flags & FLAGS_NOT_COUNTED or not math.isfinite(raw):
            return []
        if self._burn_left > 0:
            self._burn_left -= 1
            return []
        window.push(raw)
        if not window.full:
            return []
        if self._test_wait > 0:  # tested every window / 8 observations once full
            self._test_wait -= 1
            return []
        self._test_wait = max(1, window.window // 8) - 1
        threshold = self.params["threshold"]
        result = window.test(self.params["alpha"], threshold)
        length = self.decay_length()
        if (result is None or result.verdict == "fell" or length is None
                or (self.params["test"] == "stall" and not result.stalled(threshold))):
            self._stalls = 0  # still falling, or inconclusive: the stable LR stands
            return []
        self._stalls += 1
        if self._stalls < self.params["confirm"]:
            return []  # found once: the next test (window / 8 observations on) must agree
        self._stalls = 0
        window.clear()
        return self._begin(obs.step, length, 1.0, self.params["decay_shape"], "plateau", ctx,
                           f"{self.params['metric']} stalled over the last {window.window} "
                           f"observations (mean {result.older:.6g} → {result.newer:.6g}, z "
                           f"{result.z:.2f})", result.evidence())

    def _begin(self, start: int, length: int, level: float, shape: str, source: str,
               ctx: StepContext | None, why: str,
               evidence: Mapping[str, Any] | None = None) -> list[Action]:
        self._start, self._length, self._from, self._shape = start, length, level, shape
        self._source, self._done = source, False
        if ctx is not None:
            ctx.flags.add("lr_reduced")
        return [Action("decay_start", f"{shape} cooldown over steps {start + 1}-{start + length}"
                       f" to {self.params['min_lr_ratio']:g} × the LR ({why})",
                       {"statistic": "step", "value": start, "source": source,
                        "decay_steps": length, "shape": shape, "from": level,
                        "min_lr_ratio": self.params["min_lr_ratio"], **(evidence or {})})]

    # -- operator commands -----------------------------------------------------------------
    def command(self, name: str, args: Mapping[str, Any], step: int) -> list[Action]:
        if self._done and self._start is not None:
            raise ValueError(f"the cooldown finished at step {self._start + self._length}; "
                             "nothing to " + ("cancel" if name == "cancel" else "start"))
        running = self._start is not None
        if name == "cancel":
            if not running:
                raise ValueError("no cooldown is under way; nothing to cancel")
            assert self._start is not None
            level = self._factor(step + 1)
            started, source = self._start, self._source
            self._start, self._cancelled_at = None, step
            if self._trend is not None:
                self._trend.clear()
            self._stalls = 0
            self._scale = self._factor(step + 1)
            return [Action("decay_cancel", f"cooldown (started at step {started} by "
                           f"{source}) cancelled by an operator at multiplier {level:.6g}: "
                           "back to the stable LR",
                           {"statistic": "step", "value": step, "source": "operator",
                            "started": started, "level": level})]
        if step + 1 < self.params["warmup_steps"]:
            raise ValueError(f"the warmup runs until step {self.params['warmup_steps']}; "
                             "start the cooldown after it")
        length = args.get("steps") or self.decay_length()
        if length is None:
            raise ValueError("give the cooldown's length (--steps): this policy has no "
                             "decay_steps, and decay_fraction needs the run's length")
        shape = args.get("shape") or self.params["decay_shape"]
        if shape not in SHAPES:
            raise ValueError(f"shape must be one of {', '.join(SHAPES)}, but got {shape!r}")
        level = self._factor(step + 1)
        why = (f"restarted by an operator from multiplier {level:.6g}" if running
               else "started by an operator")
        actions = self._begin(step, int(length), level, shape, "operator", None, why)
        self._cut_pending = True
        self._scale = self._factor(step + 1)
        return actions

    # -- state -------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"scale": self._scale, "next": self._next, "total": self._total,
                "start": self._start, "length": self._length, "from": self._from,
                "shape": self._shape, "source": self._source, "done": self._done,
                "cancelled_at": self._cancelled_at, "told_inactive": self._told_inactive,
                "cut_pending": self._cut_pending,
                "trend": None if self._trend is None else self._trend.values(),
                "test_wait": self._test_wait, "burn_left": self._burn_left,
                **({"stalls": self._stalls} if self._stalls else {})}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._scale = float(state["scale"])
        self._next = int(state["next"])
        total = state["total"]
        self._total = self.params["total_steps"] or (None if total is None else int(total))
        start = state["start"]
        self._start = None if start is None else int(start)
        self._length = int(state["length"])
        self._from = float(state["from"])
        if state["shape"] not in SHAPES:
            raise ValueError(f"wsd: unknown shape {state['shape']!r} in state")
        self._shape = str(state["shape"])
        self._source = str(state["source"])
        self._done = bool(state["done"])
        cancelled = state["cancelled_at"]
        self._cancelled_at = None if cancelled is None else int(cancelled)
        self._told_inactive = bool(state["told_inactive"])
        self._cut_pending = bool(state.get("cut_pending", False))
        if self._trend is not None:
            self._trend.load([float(v) for v in state.get("trend") or []])
        self._test_wait = int(state.get("test_wait", 0))
        self._burn_left = int(state.get("burn_left", 0))  # (older states: a run under way)
        self._stalls = int(state.get("stalls", 0))
