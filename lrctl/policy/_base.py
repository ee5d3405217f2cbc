"""The policy contract: observations in, learning-rate effects and actions out.

A policy is pure: it does no I/O and reads no clock. Everything it needs (the
step number, the statistics, the current learning rates) arrives in the
:class:`Observation`, which makes policies deterministic, replayable from a
journal and testable with tables.

Two roles combine in the engine (see :mod:`lrctl.policy._engine`):

* a **schedule** gives a factor on each group's initial learning rate as a
  function of the step (warmup, decay, cyclical); factors of several schedules
  multiply, as in torch's ``ChainedScheduler``;
* a **reactive** policy keeps a multiplier that it changes in answer to what it
  observes (divergence back-off, plateau decay).

The learning rate of group ``g`` for step ``t`` is
``clamp(initial_lr[g] * prod(schedule factors at t) * prod(reactive multipliers))``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, ClassVar

from ..wire.floats import float_from_json, float_to_json
from ._params import Param, bind_params

__all__ = [
    "Action",
    "Observation",
    "Policy",
    "ReactivePolicy",
    "Role",
    "StepContext",
    "float_from_json",
    "float_to_json",
]


class Role(str, Enum):
    """What a policy does in the engine (see the module docstring). A ``str``, so a
    role still equals its name: ``role == "schedule"``, and prints as it (as
    ``enum.StrEnum``, which Python 3.10 lacks)."""

    SCHEDULE = "schedule"  # a factor on the initial LRs, a function of the step
    REACTIVE = "reactive"  # a multiplier changed in answer to what it observes

    def __str__(self) -> str:
        return str(self.value)

    def __format__(self, spec: str) -> str:
        return format(str(self.value), spec)


SCHEDULE = Role.SCHEDULE
REACTIVE = Role.REACTIVE


@dataclass(frozen=True, init=False)
class Observation:
    """What the training loop reported for one step."""

    step: int
    loss: float | None = None
    grad_norm: float | None = None
    metrics: Mapping[str, float] = field(default_factory=dict)
    lrs: Sequence[float] = ()  # the learning rates used for this step, per group
    #: The step whose weights the metrics measured: a loop evaluates after a step and
    #: reports with the next one (the hook says which; ``None``: this one).
    metrics_step: int | None = None

    def __init__(self, step: int, loss: float | None = None, grad_norm: float | None = None,
                 metrics: Mapping[str, float] | None = None,
                 lrs: Sequence[float] = (), metrics_step: int | None = None) -> None:
        # The engine builds one per step. A frozen dataclass's own __init__ sets each field
        # through object.__setattr__, which costs as much as the rest of a plain policy
        # step; writing the instance dict directly is the same result (still frozen).
        fields = self.__dict__
        fields["step"] = step
        fields["loss"] = loss
        fields["grad_norm"] = grad_norm
        fields["metrics"] = {} if metrics is None else metrics
        fields["lrs"] = lrs
        fields["metrics_step"] = metrics_step

    def measured_at(self, name: str) -> int:
        """The step the named statistic measured: this one for ``loss`` and
        ``grad_norm``, :attr:`metrics_step` (if given) for a reported metric."""
        if name in ("loss", "grad_norm") or self.metrics_step is None:
            return self.step
        return self.metrics_step

    def value(self, name: str) -> float | None:
        """The named statistic: ``loss``, ``grad_norm`` or a reported metric."""
        if name == "loss":
            return self.loss
        if name == "grad_norm":
            return self.grad_norm
        return self.metrics.get(name)


@dataclass
class StepContext:
    """Facts shared between the policies of one stack during one observation.

    ``flags`` lets an earlier policy tell later ones about the step: the
    divergence guard sets ``"spike"`` or ``"nonfinite"``, and plateau detection
    then does not count the step as a bad one (pytorch#30873); an LR range test
    sets ``"lr_sweep"`` while it sweeps, so an anneal waits for it; plateau
    decay sets ``"lr_reduced"`` when it cuts the LR and a WSD cooldown when it
    starts, so that early stopping can decay first and give up after.
    ``total_steps`` is the run's length when the training script said it
    (``attach(total_steps=...)``), else ``None``. ``snapshots`` is the
    :class:`~lrctl.policy._rollback.SnapshotBook` of a run whose hook keeps
    snapshots (else ``None``: no rollback is possible); a policy that rolls back
    sets ``rollback`` to the snapshot's step. The engine keeps one context per
    stack and clears it for each observation: read it during ``observe()`` only.
    ``prev_step`` is the step of the stack's previous observation (``None`` before the
    first): with ``every=N`` the steps in between were never reported.
    """

    initial_lrs: Sequence[float]
    total_steps: int | None = None
    flags: set[str] = field(default_factory=set)
    skip: bool = False
    stop: bool = False
    snapshots: Any = None
    rollback: int | None = None
    prev_step: int | None = None


@dataclass(frozen=True)
class Action:
    """Something a policy did at a step, with the reason and the numbers behind it."""

    action: str  # backoff, regrow, reduce, restart, skip, stop, rollback, warmup_done, ...
    reason: str
    evidence: Mapping[str, Any] = field(default_factory=dict)


class Policy(ABC):
    """Base class of every policy.

    Derive a schedule from :class:`~lrctl.policy._schedule.Schedule` and a reactive
    policy from :class:`ReactivePolicy` (a direct subclass of ``Policy`` is reactive,
    as before). Subclasses set ``kind`` (the YAML name) and ``PARAMS`` (their knobs).
    The constructor validates the knobs and stores them on ``self.params``;
    subclasses read them from there.
    """

    kind: ClassVar[str] = ""
    role: ClassVar[Role] = Role.REACTIVE
    PARAMS: ClassVar[tuple[Param, ...]] = ()
    #: Reactive policies act in increasing ``priority``: divergence (0) acts first.
    priority: ClassVar[int] = 100
    #: Operator commands this policy takes through :meth:`Engine.command` (``"decay"``…).
    COMMANDS: ClassVar[tuple[str, ...]] = ()
    #: Whether :meth:`observe` may keep the :class:`Observation` it gets past the call.
    #: When no policy of a stack does (none of lrctl's own), the engine refills one
    #: observation object at every step instead of building a new one. A subclass of
    #: a built-in policy that keeps observations sets this back to True.
    keeps_observations: ClassVar[bool] = True

    def __init__(self, **params: Any) -> None:
        self.params: dict[str, Any] = bind_params(self.kind, self.PARAMS, params)

    # -- schedule role -------------------------------------------------------
    def factor(self, step: int, group: int, initial_lr: float) -> float:
        """Multiplier on ``initial_lr`` for ``step``. Schedules override this."""
        return 1.0

    # -- reactive role -------------------------------------------------------
    def multiplier(self) -> float:
        """The multiplier this policy applies now. Reactive policies override this."""
        return 1.0

    @abstractmethod
    def observe(self, obs: Observation, ctx: StepContext) -> list[Action]:
        """Take one observation; return what was done (usually nothing)."""

    def observe_plain(self, step: int, loss: float | None, grad_norm: float | None) -> bool:
        """A shortcut for the usual observation, which the engine tries before
        :meth:`observe` when it can (a plain observation: no metrics, the statistics
        finite floats or absent, no schedules, no snapshots, no policy before this one
        that did anything).

        ``True``: this policy observed ``step`` exactly as :meth:`observe` would have
        (the same state afterwards), and that observation would have returned no
        action, set no flag, skip, stop or rollback, and left :meth:`multiplier` the
        same object. ``False``: nothing changed, and the engine calls :meth:`observe`.
        The default always declines; a policy that overrides it must keep both ways
        equal (``tests/policy/test_engine_plain.py`` checks lrctl's own). A subclass
        that overrides :meth:`observe` but not this one is not asked: its ``observe``
        sees every observation.
        """
        return False

    def command(self, name: str, args: Mapping[str, Any], step: int) -> list[Action]:
        """Carry out operator command ``name`` (one of :attr:`COMMANDS`) after the
        observation of ``step`` (-1: none yet); ``ValueError`` (state unchanged) when
        it cannot be done now. The engine recomputes the LRs afterwards."""
        raise ValueError(f"{self.kind}: no operator command {name!r}")

    @abstractmethod
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume, as JSON-compatible values."""

    @abstractmethod
    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""

    def describe(self) -> str:
        knobs = ", ".join(f"{k}={v!r}" for k, v in self.params.items())
        return f"{self.kind}({knobs})"


class ReactivePolicy(Policy):
    """A policy that keeps a multiplier (:meth:`multiplier`) and changes it in answer to
    what it observes (divergence back-off, plateau decay, the range test...)."""

    role = Role.REACTIVE

    def multiplier(self) -> float:
        """The multiplier this policy applies now (1.0 for one that only skips or stops,
        such as early stopping)."""
        return 1.0


