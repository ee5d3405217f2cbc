"""The policy stack and its arbiter.

Arbitration, in this order, at every observation of step ``t``:

1. Reactive policies observe, in increasing ``priority``: the divergence guard
   first (it flags spikes for the others), then the range test, anneal, WSD,
   plateau decay, early stopping (it sees this step's LR cuts), then user
   policies (priority 100 unless they say otherwise); ties keep file order.
   Each may change its multiplier.
2. Schedules report phase events for step ``t + 1`` (warmup done, restarts).
3. The LR of group ``g`` for step ``t + 1`` is
   ``initial_lr[g] × Π schedule factors(t + 1) × Π reactive multipliers``,
   clamped to ``[min_lr, max_lr]``. One multiplier for all groups keeps their
   ratios (the clamp, when it bites, is the only exception).

Every action yields a :class:`Decision` whose ``old_lrs`` and ``new_lrs`` are
the LRs for ``t + 1`` without and with that action.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from ._arbiter import LRArbiter
from ._base import SCHEDULE, Observation, Policy, StepContext
from ._capacity import check_kept
from ._decision import Decision
from ._engine_state import EngineState
from ._inputs import (
    NO_METRICS,
    ObservationError,
    check_lrs,
    check_observation,
    check_total_steps,
    make_observation,
    unique_names,
)
from ._operator import OperatorControls, OperatorVerbs
from ._rollback import SnapshotBook, Snapshotting

__all__ = ["Engine", "ObservationError", "unique_names"]

MAX_DECISIONS_KEPT = 10_000


class Engine(EngineState, OperatorVerbs, LRArbiter, Snapshotting):
    """A stack of policies driving the LRs of one run's param groups.

    ``observe`` returns the LRs to use for the next step. ``mode="shadow"``
    runs the policies and records their decisions without acting: the returned
    LRs hold at those in effect when shadow mode began (the initial ones for an
    engine built in shadow). An operator's manual LR (:meth:`set_lr`) overrides
    both (see :mod:`._operator`).
    """

    def __init__(
        self,
        policies: Sequence[Policy],
        base_lrs: Sequence[float],
        *,
        names: Sequence[str] | None = None,
        min_lr: float = 0.0,
        max_lr: float | None = None,
        mode: str = "active",
        policy_sha256: str = "",
        total_steps: int | None = None,
    ) -> None:
        # What observe() reads at every step, set first (placeholders, set for real
        # below): the first entries of the instance's dict, a few cache lines that a
        # training loop's other work has not evicted as surely as a dozen scattered ones.
        self._plain: list[Callable[[int, float | None, float | None], bool]] = []
        self.last_step: int | None = None
        #: The snapshots the training process holds (None: it keeps none, so no policy
        #: rolls back); see :meth:`enable_snapshots`.
        self.snapshots: SnapshotBook | None = None
        #: The multipliers must be asked before the next observation: a verb of the engine
        #: (command, reload, restored state) may have changed them in between.
        self._stale = False
        self._unusable = False  # the policies' LR is non-finite: held or clamped (recorded)
        # The multiplier object the current LRs were computed from (None: not from it
        # alone; see _run()), and the product of the reactive multipliers as last seen.
        self._lrs_multiplier: float | None = None
        self._product = 1.0
        self.operator = OperatorControls()
        self._plain_rest = False
        self.should_skip = False
        #: The decisions of the latest observation.
        self.last_decisions: list[Decision] = []
        self._lrs: tuple[float, ...] = ()
        self.initial_lrs = tuple(check_lrs(base_lrs))
        if names is None:
            names = unique_names([p.kind for p in policies])
        if len(names) != len(policies):
            raise ValueError(f"{len(names)} names for {len(policies)} policies")
        if len(set(names)) != len(names):
            raise ValueError(f"policy names must be unique, but got {list(names)}")
        if mode not in ("active", "shadow"):
            raise ValueError(f"mode must be 'active' or 'shadow', but got {mode=}")
        if max_lr is not None and max_lr < min_lr:
            raise ValueError(f"max_lr must be >= min_lr, but got {min_lr=}, {max_lr=}")
        self.policies: list[Policy] = list(policies)
        check_kept(self.policies)
        self.names: list[str] = list(names)
        self.min_lr = float(min_lr)
        self.max_lr = math.inf if max_lr is None else float(max_lr)
        self._mode = mode
        if mode == "shadow":
            self.operator.hold = self.initial_lrs
        self.policy_sha256 = policy_sha256
        self.total_steps = check_total_steps(total_steps)
        self._reactive = [p for p in self.policies if p.role != SCHEDULE]
        self._schedules = [p for p in self.policies if p.role == SCHEDULE]
        self._order = sorted(range(len(self.policies)),
                             key=lambda i: (self.policies[i].role == SCHEDULE,
                                            self.policies[i].priority, i))
        # The observe order, with each policy's places among the reactive ones (where
        # update() keeps its multiplier): worked out once, not at every observation.
        self._plan = [(i, self.policies[i],
                       tuple(j for j, p in enumerate(self._reactive) if p is self.policies[i]))
                      for i in self._order]
        # One context, reset at each observation (policies see it only during one), and
        # one observation, refilled at each, when no policy keeps observations (building
        # a frozen dataclass costs a good part of a whole observation's work).
        self._ctx = StepContext(initial_lrs=self.initial_lrs)
        self._reused: Observation | None = (
            None if any(p.keeps_observations for p in self.policies) else Observation(-1))
        # Its fields, written in place (Observation is frozen to the policies only).
        self._reused_fields: dict[str, Any] | None = (
            None if self._reused is None else self._reused.__dict__)
        # The plain observers (Policy.observe_plain) leading the observe plan, and none of
        # it when there are schedules (their factors move the LRs at every step).
        if not self._schedules:
            for _, policy, _ in self._plan:
                if (not _plain_observer(type(policy))
                        or policy.observe_plain in self._plain):  # (each once: see observe)
                    break
                self._plain.append(policy.observe_plain)
        self._plain_rest = len(self._plain) < len(self._plan)  # policies after them
        self.should_stop = False
        #: Whether a skip decided here reaches the optimizer step it names. An async hook
        #: hears the answer after that step ran: its spike skips are recorded as advisory.
        #: (Non-finite steps are skipped by the hook's own guard either way.)
        self.skips_enforced = True
        #: The hook reports each step after its optimizer step (``ctl.step()`` after
        #: ``optimizer.step()``): no skip can be carried out, non-finite steps' neither.
        self.steps_ran = False
        #: The observation being decided is of a step the hook has already run, as it
        #: says (the LRs it ran on): a replay after a reconnect, or one sent by close().
        #: A sync hook's skip of it cannot be carried out: recorded as advisory. Set per
        #: observation by the controller; never part of the state.
        self.already_ran = False
        #: The hook applies the LRs answered to an observation to that step's own
        #: optimizer step (sync, ``ctl.step()`` before ``optimizer.step()``), not to the
        #: next: a manual LR held through step ``until`` is released one observation later.
        #: Set by the controller; never part of the state.
        self.answers_same_step = False
        self.decision_count = 0
        #: The snapshot step the latest observation rolled back to, or None.
        self.rollback_to: int | None = None
        self._decisions: deque[Decision] = deque(maxlen=MAX_DECISIONS_KEPT)
        self._saw_unusable = False
        # The reactive multipliers as last seen, and their product.
        self._multipliers: list[float] = [p.multiplier() for p in self._reactive]
        self._product = _product(self._multipliers)
        self._lrs = tuple(self._compute(0))

    # -- public API ------------------------------------------------------------
    @property
    def lrs(self) -> list[float]:
        """The LRs the policies want for the next step (ignores shadow mode)."""
        return list(self._lrs)

    @property
    def applied_lrs(self) -> list[float]:
        """The LRs to put into the optimizer: an operator's manual LR, else the LRs held in
        shadow mode, else :attr:`lrs`."""
        op = self.operator
        if op.override is None and op.hold is None:
            return list(self._lrs)
        return op.applied(self._lrs)

    @property
    def decisions(self) -> list[Decision]:
        """The most recent decisions (at most 10 000; ``decision_count`` counts all)."""
        return list(self._decisions)

    def observe(
        self,
        step: int,
        loss: float | None = None,
        grad_norm: float | None = None,
        **metrics: float,
    ) -> list[float]:
        """Take the statistics of ``step``; return the LRs for step ``step + 1``."""
        # The plain way (see Policy.observe_plain): an int step after the last one, finite
        # float statistics or none, no metrics, and an engine with nothing to do at this
        # step beyond its policies (no schedules, no snapshots, no manual LR that ends,
        # no stale multiplier, the LRs those of the current multiplier). The policies
        # that take the shortcut go first; the first that declines, and those after it,
        # observe the full way (update), which would have found the same.
        plain = self._plain
        last = self.last_step
        if (plain and not metrics and type(step) is int
                and (step > last if last is not None else step >= 0)
                and (loss is None or (type(loss) is float and loss - loss == 0.0))
                and (grad_norm is None
                     or (type(grad_norm) is float and grad_norm - grad_norm == 0.0))
                and self.snapshots is None and not self._stale and not self._unusable
                and self._lrs_multiplier is self._product and self.operator.until is None):
            for observe_plain in plain:
                if not observe_plain(step, loss, grad_norm):
                    return self._run(step, loss, grad_norm, NO_METRICS,
                                     plain.index(observe_plain))
            if self._plain_rest:
                return self._run(step, loss, grad_norm, NO_METRICS, len(plain))
            # Nothing decided, flagged or changed: the same LRs, no decisions.
            self.last_step = step
            self.should_skip = False
            if self.last_decisions:
                self.last_decisions = []
            op = self.operator
            if op.override is None and op.hold is None:
                return [*self._lrs]
            return op.applied(self._lrs)
        return self.update(step, loss, grad_norm, metrics)

    def update(
        self,
        step: int,
        loss: float | None,
        grad_norm: float | None,
        metrics: Mapping[str, float],
        metrics_step: int | None = None,
    ) -> list[float]:
        """:meth:`observe` with the metrics as a mapping (any names, checked here);
        ``metrics_step``: the step whose weights they measured (default: ``step``)."""
        # The usual observation (an int step after the last one, float or absent
        # statistics, no metrics) needs no checks beyond these: anything else takes the
        # full checks, which say what is wrong.
        last = self.last_step
        if (type(step) is int and (step > last if last is not None else step >= 0)
                and not metrics and (loss is None or type(loss) is float)
                and (grad_norm is None or type(grad_norm) is float)):
            metrics = NO_METRICS
        else:
            loss, grad_norm, metrics = check_observation(step, loss, grad_norm, metrics, last)
        return self._run(step, loss, grad_norm, metrics, 0, metrics_step)

    def _run(self, step: int, loss: float | None, grad_norm: float | None,
             metrics: Mapping[str, float], first: int,
             metrics_step: int | None = None) -> list[float]:
        """The observation of ``step`` (its statistics checked) by the policies of the
        observe plan from ``first`` on: those before it took it plainly (no action, no
        flag, the same multiplier), and would have done the same here."""
        fields = self._reused_fields
        if fields is None:
            obs = Observation(step, loss, grad_norm, metrics, self._lrs, metrics_step)
        else:  # the one reused observation, refilled (as Observation.__init__ does)
            obs = self._reused  # type: ignore[assignment]
            fields["step"] = step
            fields["loss"] = loss
            fields["grad_norm"] = grad_norm
            fields["metrics"] = metrics
            fields["lrs"] = self._lrs
            fields["metrics_step"] = metrics_step
        ctx = self._ctx  # the stack's one context, cleared for this observation
        ctx.initial_lrs = self.initial_lrs
        ctx.total_steps = self.total_steps
        if ctx.flags:
            ctx.flags.clear()
        ctx.skip = ctx.stop = False
        ctx.prev_step = self.last_step
        book = self.snapshots
        if book is not None:
            book.advance(step)
            ctx.rollback = None
        new_decisions: list[Decision] | None = None  # built only when something is decided
        factors = self._schedule_factors(step + 1) if self._schedules else None
        multiplier = self._refresh_multipliers() if self._stale else self._product
        multipliers = self._multipliers
        for i, policy, places in (self._plan[first:] if first else self._plan):
            actions = policy.observe(obs, ctx)
            before_multiplier = multiplier
            # A policy's multiplier changes only in its own observe() (or through the
            # engine's command, reload and state verbs, which mark them stale): ask it
            # again, and redo the product only when its value changed.
            if places:
                value = policy.multiplier()
                for j in places:
                    if multipliers[j] is not value:
                        multipliers[j] = value
                        multiplier = self._product = _product(multipliers)
            if actions:
                if new_decisions is None:
                    new_decisions = []
                new_decisions += self._decisions_of(i, actions, obs, before_multiplier,
                                                    multiplier, factors)
        # Non-finite statistics (x - x is NaN for ±inf and NaN, 0.0 for any finite float).
        if not ctx.skip and ((loss is not None and loss - loss != 0.0)
                             or (grad_norm is not None and grad_norm - grad_norm != 0.0)):
            # Every path skips a non-finite step (the hook refuses it in the training
            # process whatever the policies say): the record says so.
            ctx.skip = True
            if new_decisions is None:
                new_decisions = []
            new_decisions.append(self._nonfinite_skip(obs, multiplier, factors))
        self.last_step = step
        if book is not None:  # a shadow rollback is recorded, never carried out
            self.rollback_to = ctx.rollback if self.mode == "active" else None
            if self.rollback_to is not None:
                book.rolled_back(self.rollback_to, step)
        self.should_skip = ctx.skip
        if ctx.stop and self.mode == "active":  # a shadow stop is recorded, never acted on
            self.should_stop = True
        self._saw_unusable = False
        if multiplier is self._lrs_multiplier and factors is None:
            lrs = self._lrs  # the same multiplier object and no schedules: the same LRs
        else:
            lrs = tuple(self._lrs_from(multiplier, factors))
            # Usable LRs from the multiplier alone are a function of it (and of the fixed
            # initial LRs and bounds): kept for the next observation's shortcut above.
            self._lrs_multiplier = (multiplier if factors is None and not self._saw_unusable
                                    else None)
        if self._unusable or self._saw_unusable:
            record = self._unusable_record(step, multiplier, factors, self._lrs, lrs)
            if record is not None:
                if new_decisions is None:
                    new_decisions = []
                new_decisions.append(record)
        self._lrs = lrs
        op = self.operator
        if op.until is not None and op.expires_after(step, self.same_step_answers):
            before = op.override or ()
            until = op.until
            op.clear_override()
            if new_decisions is None:
                new_decisions = []
            new_decisions.append(self._operator_decision(
                "release_lr", before, f"manual override ended after step {until}",
                {"until": until}, step=step))
        if new_decisions:
            self._decisions.extend(new_decisions)
            self.decision_count += len(new_decisions)
            self.last_decisions = new_decisions
        elif self.last_decisions:
            self.last_decisions = []
        if op.override is None and op.hold is None:
            return list(lrs)
        return op.applied(lrs)

    def _refresh_multipliers(self) -> float:
        """The product of the reactive multipliers, as :meth:`_multiplier` computes it,
        redone only when one of them is another value than at the last observation (a
        command, a reload or a restored state changed it in between)."""
        multipliers = self._multipliers
        changed = False
        for j, p in enumerate(self._reactive):
            value = p.multiplier()
            if multipliers[j] is not value:
                multipliers[j] = value
                changed = True
        if changed:
            self._product = _product(multipliers)
        self._stale = False
        return self._product

    def start_at(self, step: int) -> None:
        """A run whose loop numbers its first step ``step`` (the HF Trainer's first is 1):
        the LRs before any observation are those for that step. Also a run resumed past
        its last observed step (the steps between never reached the engine: a controller
        killed before its checkpoint): its schedules are at ``step``, not at the step
        after the last observed. No-op otherwise."""
        last = self.last_step
        if (last is None and step > 0) or (last is not None and step > last + 1):
            self._lrs = tuple(self._compute(step))

    def _make_observation(self, step: Any, loss: Any, grad_norm: Any,
                          metrics: Mapping[str, Any]) -> Observation:
        return make_observation(step, loss, grad_norm, metrics, self.last_step, self._lrs)


def _plain_observer(cls: type) -> bool:
    """Whether ``cls`` observes the plain way: it overrides Policy.observe_plain, and no
    later than ``observe`` (a subclass that overrides only ``observe`` has it called)."""
    def owner(name: str) -> type:
        return next(c for c in cls.__mro__ if name in c.__dict__)
    plain = owner("observe_plain")
    return plain is not Policy and issubclass(plain, owner("observe"))


def _product(values: list[float]) -> float:
    out = 1.0
    for v in values:
        out *= v
    return out

