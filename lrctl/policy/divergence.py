"""Divergence guard: back off on non-finite values and loss / grad-norm spikes.

The behaviour of a mixed-precision loss scaler, applied to the learning rate:

* A non-finite loss or grad norm backs off at once, and (``skip_nonfinite``)
  asks the hook to skip that optimizer step ("reduce LR on NaN": keras#8332).
* A spike is a value more than ``z_threshold`` robust standard deviations above
  the median of the last ``window`` accepted values (robust: median and
  inter-quartile range, so one outlier does not move them), on a log scale:
  the noise of per-batch losses and grad norms is multiplicative and heavy
  tailed, and on a linear scale easy batches (loss 0.002) make ordinary hard
  ones (loss 0.2) look like 100σ events. Losses that can be zero or negative
  set ``loss_scale: linear``. ``min_sigma`` keeps a very smooth series from
  tripping on small wiggles; ``grad_norm_min_sigma`` sets it apart for the grad
  norm, whose ordinary swings are wider (a 2–3× step-to-step jump is common in
  language-model training and is no divergence). Detection arms after
  ``min_samples`` values.
  Spikes never enter the window they are judged against.
* ``tolerance`` spikes are tolerated before a back-off; the count resets after
  ``regrow_after`` clean observations. ``grad_norm_tolerance`` does the same for
  spikes of the grad norm alone (the loss ordinary): one burst of gradient noise
  is one sample, and an ordinary loss says the step did no harm; the spike is
  still flagged and (``skip_spikes``) skipped.
* A back-off multiplies the LR by ``factor``. For ``cooldown`` observations
  after it, spikes are still flagged (and kept out of the statistics) but do not
  back off again; non-finite values still do. If most of the cooldown was
  spikes, the run has moved to a new level rather than blown up, and the
  statistics re-baseline on the cooldown's values (``level_shift``: plateau
  decay judges a fresh window); unless the loss stays more than ``max_shift`` ×
  its old median (or the grad norm does, with the loss up 1.5× too): an LR set
  ×100 by mistake (or a change to harder data: the skipped steps of a cooldown
  cannot tell them apart). Then the back-off did not take, and the guard backs
  off again, harder (``factor`` squared), after each cooldown, at most three
  times in a row, before it accepts the level. Its high losses are then no
  longer skipped, so the model can train its way back. An accepted level moves
  the window to it with its spread kept (detection stays armed). If the loss
  stayed within 1.5× of its first level through those harder back-offs and
  ``min_samples`` observations at the cut LR after them (a blow-up climbs on,
  or comes down as the cuts take), the LR did not cause it: a change of data.
  The LR is then given back, to its value before the incident (a ``regrow``
  decision saying so). An accepted level is the cooldown's newer half's: a
  burst that ended within it is no new level.
* ``skip_spikes`` also asks the hook to skip the optimizer step of a spike (one
  ×1e4 gradient would otherwise poison Adam's second moment for thousands of
  steps); the hook can act on it in sync mode or in-process.
* After ``regrow_after`` clean observations the multiplier grows by
  ``regrow_factor`` toward its pre-incident value (1.0), one step at a time.
  An observation with nothing the guard watches (no loss, no grad norm) is
  neither clean nor a spike: it counts toward nothing.
* More than ``max_backoffs`` back-offs in one incident, or a back-off below the
  ``min_multiplier`` floor, escalates to ``stop``.
* Rollback (only when the hook keeps snapshots: ``attach(..., snapshot_every=N)``;
  otherwise none of this happens). Where the guard would back off harder because
  the back-off did not take, or at a second non-finite observation in a row (the
  weights themselves are broken), it rolls back instead: the training process
  restores the newest snapshot taken before the incident's first back-off, and
  the LR is cut as the harder back-off would have cut it. The step counter moves
  on (the batches in between are skipped). The LR then regrows no higher than the
  rollback left it (what needed a rollback was no passing spike). At most
  ``max_rollbacks`` per run; one more would-be rollback asks the run to stop.
  Unless the restored weights show the broken run's loss themselves: when the loss of
  the step after the restore (the snapshot's weights, before any update at the cut
  LR; the hook says when it restored, ``Engine.restored``; in process, lag 0, the step
  after the decision) is a spike by the window's test, and the first cooldown's median loss is
  within 1.5× of the level the broken run sat at, what the rollback undid did not
  cause the rise (a change to harder data: a blow-up from a too-high LR starts
  again from the old level). The level is then accepted and the LR given back to
  its value before the incident (a ``regrow`` decision saying so, the ceiling
  lifted); the rollback still counts toward ``max_rollbacks``.
"""

from __future__ import annotations

import math
from types import MappingProxyType
from typing import Any

from ._base import Action, Observation, ReactivePolicy, StepContext
from ._divergence_actions import GuardActions
from ._divergence_params import DIVERGENCE_PARAMS
from ._divergence_rollback import RollbackEscalation
from ._divergence_shift import LOSS_CONFIRMS, MAX_ESCALATIONS, LevelShift
from ._divergence_state import GuardState
from ._params import ParamError
from ._registry import register_policy
from .stats import RobustWindow

__all__ = ["LOSS_CONFIRMS", "MAX_ESCALATIONS", "Divergence"]

_MIN_SIGMA = 1e-12
log = math.log


@register_policy("divergence")
class Divergence(GuardState, GuardActions, LevelShift, RollbackEscalation, ReactivePolicy):
    priority = 0
    keeps_observations = False
    KEPT_PER_KNOB = MappingProxyType({"cooldown": 2})  # a cooldown's (loss, grad norm) pairs
    PARAMS = DIVERGENCE_PARAMS

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        # What observe_plain() reads at every step, set first (for real below): the first
        # entries of the instance's dict, a few cache lines (see the engine's).
        self._log_both = False
        self._cooldown = 0
        self._stopped = False
        self._nonfinite_run = 0  # non-finite observations in a row
        self._clean = 0  # consecutive clean observations
        self._regrow_at = 0
        if self.params["min_samples"] > self.params["window"]:
            raise ParamError("min_samples", f"must be <= window ({self.params['window']}), "
                             f"but got {self.params['min_samples']}: detection would never arm")
        size = self.params["window"]
        self._loss = RobustWindow(size)  # the judged losses
        self._gnorm = RobustWindow(size)  # log grad norms
        self._scale = 1.0
        self._spikes = 0  # spikes since the last back-off or clean interval
        self._grad_spikes = 0  # of them, tolerated spikes of the grad norm alone
        self._loss_run = 0  # loss spikes in a row not yet confirmed (loss_confirm)
        self._backoffs = 0  # back-offs in the current incident
        self._cooldown_seen: list[tuple[float | None, float | None]] = []
        self._cooldown_spikes = 0  # of them, spikes
        self._escalation = 0  # back-offs in a row that did not take
        self._incident_level: float | None = None  # the first cooldown's median loss
        self._level_held = False  # ... and every later cooldown's stayed near it
        self._level_shift = False  # a new level was accepted at this observation
        self._after: list[float] | None = None  # losses since a level accepted the hard way
        self._accepted: dict[str, Any] | None = None  # that level's evidence
        self._before_incident = 1.0  # the multiplier before the incident's first back-off

        self._total_backoffs = 0
        self._rollbacks = 0  # rollbacks this run
        self._ceiling = 1.0  # the multiplier regrows to this (lower after a rollback)
        self._incident = -1  # the step of the current incident's first back-off
        # After a rollback decided at t, the steps up to t + lag ran on the weights being
        # thrown away (the hook restores at t + lag): nothing they show is a new incident.
        self._discard_until = -1
        # After a rollback decided on a loss level (see _restored_shows_it): that level,
        # the snapshot, the ceiling before it and the restored weights' first loss.
        self._restored: dict[str, Any] | None = None
        self._cooldown_level: float | None = None  # the last shifted cooldown's median loss
        self._data_after_rollback: dict[str, Any] | None = None  # its give-back, once due
        self._now = -1  # the step being observed
        self._told_nonpositive = False  # a loss <= 0 on the log scale was noted
        self._with_snapshots = False  # has backed off in a run whose hook keeps snapshots
        # The knobs read at every observation, as plain attributes (params are fixed).
        p = self.params
        self._linear = p["loss_scale"] == "linear"
        self._watch_loss, self._watch_grad = p["watch_loss"], p["watch_grad_norm"]
        self._min_samples, self._z = p["min_samples"], p["z_threshold"]
        self._loss_floor = max(p["min_sigma"], _MIN_SIGMA)  # the log scale's
        self._grad_floor = max(p["min_sigma"] if p["grad_norm_min_sigma"] is None
                               else p["grad_norm_min_sigma"], _MIN_SIGMA)
        self._regrow_after = p["regrow_after"]
        self._grad_tolerance = p["grad_norm_tolerance"]
        self._loss_confirm = p["loss_confirm"]
        self._regrow_at = self._regrow_after - 1  # clean ones before this one: regrow now
        # The screens of observe()'s shortcut: log-scale statistics, both watched.
        self._log_both = not self._linear and self._watch_loss and self._watch_grad
        if not self._linear:  # (the linear rule's floor follows the median: no screen)
            self._loss.screen(self._z, self._loss_floor, self._min_samples)
        self._gnorm.screen(self._z, self._grad_floor, self._min_samples)

    def multiplier(self) -> float:
        return self._scale

    # -- detection -----------------------------------------------------------
    def observe(self, obs: Observation, ctx: StepContext) -> list[Action]:
        loss, gnorm = obs.loss, obs.grad_norm
        if ((loss is None or loss - loss == 0.0) and (gnorm is None or gnorm - gnorm == 0.0)
                and self.observe_plain(obs.step, loss, gnorm)):  # (finite, as it needs)
            return []
        return self._observe(obs, ctx)

    def observe_plain(self, step: int, loss: float | None, grad_norm: float | None) -> bool:
        """The usual observation without the full rule (:meth:`_observe`), to the same
        verdict: positive statistics on the log scale, both watched, no incident, no
        regrowth due, no spike (below each window's screen, else by its own test, as
        :meth:`_judge` judges). Both join their windows; the observation is clean."""
        if (not self._log_both or self._cooldown or self._stopped or self._nonfinite_run
                or self._clean >= self._regrow_at or loss is None or not loss > 0.0
                or self._after is not None):
            return False
        # (On the linear scale: the windows take the logs later, many at once: add_log.)
        window, gwindow = self._loss, self._gnorm
        if not (loss < window.exp_limit or self._clear(window, log(loss), self._loss_floor)):
            return False
        if grad_norm is not None:
            if not (grad_norm > 0.0 and (grad_norm < gwindow.exp_limit or self._clear(
                    gwindow, log(grad_norm), self._grad_floor))):
                return False
            gwindow.add_log(grad_norm)
        window.add_log(loss)
        self._clean += 1
        self._loss_run = 0
        return True

    def _clear(self, window: RobustWindow, value: float, floor: float) -> bool:
        """No spike in ``value`` (a log): below the screen (or not armed), or not by the
        window's own test."""
        return value < window.limit or window.outlier(value, self._z, floor) is None

    def _observe(self, obs: Observation, ctx: StepContext) -> list[Action]:
        """The full rule (:meth:`_rule`), and the one note of a loss it cannot judge."""
        actions = self._rule(obs, ctx)
        loss = obs.loss
        if (loss is not None and -math.inf < loss <= 0.0 and not self._linear
                and self._watch_loss and not self._told_nonpositive):
            self._told_nonpositive = True
            fix = ("nothing to change for a batch the model fits exactly (a loss of 0); "
                   "for a loss that can be negative (a critic's, a negative "
                   "log-likelihood's) set loss_scale: linear" if loss == 0.0 else
                   "set loss_scale: linear for a loss that can be negative (a critic's, a "
                   "negative log-likelihood's)")
            actions.insert(0, Action(
                "loss_not_judged", f"a loss of {loss:.6g} cannot be judged on the log scale "
                f"(loss_scale: log): this guard judges no loss <= 0, only the grad norm "
                f"(said once); {fix}", {"statistic": "loss", "value": loss}))
        return actions

    def _rule(self, obs: Observation, ctx: StepContext) -> list[Action]:
        """The full rule for one observation (``observe`` takes a shortcut to the same
        verdict for the usual one)."""
        loss, gnorm = obs.loss, obs.grad_norm
        self._now = obs.step
        if self._restored is not None:  # (its own loss may fall in the discarded steps)
            self._note_restored(obs.step, loss)
        if obs.step <= self._discard_until:
            return self._discarded(obs, ctx)
        if ((loss is not None and not math.isfinite(loss))
                or (gnorm is not None and not math.isfinite(gnorm))):
            return self._nonfinite(obs, ctx)
        if self._nonfinite_run:
            self._nonfinite_run = 0
        if loss is None:  # the loss on the scale it is judged on (None: not judged)
            judged_loss = None
        elif self._linear:
            judged_loss = loss
        else:
            judged_loss = math.log(loss) if loss > 0 else None
        log_gnorm = math.log(gnorm) if gnorm is not None and gnorm > 0 else None
        if not ((judged_loss is not None and self._watch_loss)
                or (log_gnorm is not None and self._watch_grad)):
            # Nothing this guard watches was reported: no verdict, and not a clean
            # observation either (a run reporting no loss must not regrow its LR).
            return []
        evidence = None if self._stopped else self._judge(judged_loss, log_gnorm)
        if self._loss_run and (evidence is None or evidence["statistic"] != "loss"):
            self._loss_run = 0  # a run of loss spikes ended unconfirmed
        if evidence is None:
            if judged_loss is not None and self._watch_loss:
                self._loss.add(judged_loss)
            if log_gnorm is not None and self._watch_grad:
                self._gnorm.add(log_gnorm)
        in_cooldown = self._cooldown > 0
        if in_cooldown:
            self._cooldown_seen.append((judged_loss, log_gnorm))
            self._cooldown_spikes += evidence is not None
            self._cooldown -= 1
            if self._cooldown == 0:
                still = self._end_cooldown()
                if still is not None:
                    return self._escalate(obs, ctx, evidence, still)
                if self._level_shift:  # later policies judge afresh from here
                    self._level_shift = False
                    ctx.flags.add("level_shift")
                    evidence = None  # this value is of the level accepted (in its window)
                    given, self._data_after_rollback = self._data_after_rollback, None
                    if given is not None:
                        return self._give_back(given)
        elif (self._after is not None and evidence is None and judged_loss is not None
              and self._watch_loss and not self._stopped):
            settled = self._settle(judged_loss)
            if settled:
                return settled
        if evidence is not None:
            ctx.flags.add("spike")
            ctx.skip = ctx.skip or self._skips_spikes()
            self._clean = 0
            what = evidence["statistic"]
            reason = (f"{what} spike: {evidence['value']:.6g} is {evidence['z']:.1f} robust σ "
                      f"above the median {evidence['median']:.6g} of the last "
                      f"{evidence['window']} values (threshold {self.params['z_threshold']:g}σ)")
            if in_cooldown:  # the back-off is still taking effect: flag, do not cut again
                self._loss_run = 0
                return ([Action("skip", f"skip this optimizer step: {reason}", evidence)]
                        if ctx.skip else [])
            if what == "loss" and self._loss_run + 1 < self._loss_confirm:
                self._loss_run += 1  # not confirmed yet: one bad batch is no divergence
                return ([Action("skip", f"skip this optimizer step: {reason} (not confirmed: "
                                        f"{self._loss_run} of {self._loss_confirm} in a row)",
                                evidence)] if ctx.skip else [])
            self._loss_run = 0
            if (what == "grad_norm" and self._grad_spikes < self._grad_tolerance
                    and judged_loss is not None and self._watch_loss
                    and self._loss.count >= self._min_samples):  # (the loss is judged)
                self._grad_spikes += 1  # the grad norm alone: tolerated (skipped, flagged)
                return ([Action("skip", f"skip this optimizer step: {reason} (the loss is "
                                        f"ordinary: tolerated, "
                                        f"{self._grad_spikes} of {self._grad_tolerance})",
                                evidence)] if ctx.skip else [])
            self._spikes += 1
            if self._spikes <= self.params["tolerance"]:
                return ([Action("skip", f"skip this optimizer step: {reason}", evidence)]
                        if ctx.skip else [])
            return self._back_off(ctx, reason, evidence, force=False)
        if self._stopped:  # a run told to stop that goes on anyway stays at the low LR
            return []
        self._clean += 1
        return self._regrow() if self._clean >= self._regrow_after else []

    def _nonfinite(self, obs: Observation, ctx: StepContext) -> list[Action]:
        """A NaN or infinite loss or grad norm: back off at once (and skip the step)."""
        name = next(name for name, v in (("loss", obs.loss), ("grad_norm", obs.grad_norm))
                    if v is not None and not math.isfinite(v))
        ctx.flags.add("nonfinite")
        ctx.skip = ctx.skip or self.params["skip_nonfinite"]
        value = obs.value(name)
        reason = f"{name} is {value}"
        evidence = {"statistic": name, "value": value, "threshold": "finite"}
        self._nonfinite_run += 1
        self._loss_run = 0
        if self._nonfinite_run >= 2:  # persisting: the weights themselves may be broken
            rolled = self._rollback(ctx, f"{reason} again ({self._nonfinite_run} in a row)",
                                    {**evidence, "in_a_row": self._nonfinite_run},
                                    self.params["rollback_factor"])
            if rolled is not None:
                return rolled
        return self._back_off(ctx, reason, evidence, force=True)

    def _discarded(self, obs: Observation, ctx: StepContext) -> list[Action]:
        """A step of the weights a rollback throws away (see ``_discard_until``): not
        judged, not counted; a non-finite one is still flagged and skipped (its
        gradients must not reach the optimizer)."""
        if not all(v is None or math.isfinite(v) for v in (obs.loss, obs.grad_norm)):
            ctx.flags.add("nonfinite")
            if self.params["skip_nonfinite"]:
                ctx.skip = True
                return [Action("skip", f"skip this optimizer step: step {obs.step} ran on "
                                       "the weights being rolled back, and its statistics "
                                       "are not finite", {"rolled_back_weights": True})]
        return []

    def _skips_spikes(self) -> bool:
        """Whether a spike now asks the hook to skip its step: not once a back-off did
        not take: the model must then train its way back at the lower LR."""
        return self.params["skip_spikes"] and self._escalation == 0

    def _judge(self, loss: float | None, log_gnorm: float | None) -> dict[str, Any] | None:
        """Evidence of a spike in the (judged) loss, else in the log grad norm; or None."""
        window = self._loss
        if loss is not None and self._watch_loss and window.count >= self._min_samples:
            linear = self._linear
            floor = (max(self.params["min_sigma"] * abs(window.median()), _MIN_SIGMA)
                     if linear else self._loss_floor)
            # Below the screen (log scale: the screen's own floor) it is surely none, and
            # the window's copy need not be brought up to date (a sort of the window).
            hit = None if not linear and loss < window.limit else window.outlier(
                loss, self._z, floor)
            if hit is not None:
                median, sigma, z = hit
                if linear:
                    return {"statistic": "loss", "value": loss, "median": median,
                            "sigma": sigma, "z": z, "threshold": self._z,
                            "window": window.count}
                return {"statistic": "loss", "value": math.exp(loss),
                        "median": math.exp(median), "sigma_log": sigma, "z": z,
                        "threshold": self._z, "window": window.count}
        window = self._gnorm
        if log_gnorm is not None and self._watch_grad and window.count >= self._min_samples:
            hit = None if log_gnorm < window.limit else window.outlier(
                log_gnorm, self._z, self._grad_floor)
            if hit is not None:
                median, sigma, z = hit
                return {"statistic": "grad_norm", "value": math.exp(log_gnorm),
                        "median": math.exp(median), "sigma_log": sigma, "z": z,
                        "threshold": self._z, "window": window.count}
        return None
