"""The training-side hook: ``ctl = lrctl.attach(optimizer)``, then ``ctl.step(loss)``.

Imports only the stdlib and the pure protocol at module level; torch is used
only through ``sys.modules`` (it is loaded, since the caller hands us an
optimizer) and mlflow only if the training script imported it.

Timing. Put ``ctl.step(loss)`` after ``backward()`` and before
``optimizer.step()``. The LRs the controller returns for an observation apply
to the next optimizer step after they arrive: in sync mode that is the step
right after the observation (so ``should_skip`` can veto it); in async mode an
optimizer pre-step hook applies whatever has arrived, waiting for the answer due, so
a decision made from step ``t`` is in effect at step ``t + 1`` when the controller
keeps up (where that answer is already in when ``step()`` of ``t + 1`` reports, the
report says which LRs the step runs on and the pre-step hook reads nothing more: see
``Reporting._finalize``). On
CUDA (async), statistics are copied to a pinned buffer and sent one step later
when the copy's event has completed, so no step waits for the device; their
decisions land one step later too.

Fail-open: after ``attach`` returns, nothing raised inside lrctl reaches the
training loop. A missing, killed or slow controller costs one warning; the LRs
stay where they were and the hook reconnects with back-off, resuming its session.
"""

from __future__ import annotations

import logging
import warnings
import weakref
from collections import deque
from typing import Any, cast

from ._batching import Batching
from ._callers import callers_level
from ._dist import Distributed
from ._guard import StepGuard, close_earlier_attach
from ._hook_apply import Applying
from ._hook_close import Closing
from ._hook_link import LinkSide, PolicyRejected, RunConflict
from ._hook_quiet import QuietSteps
from ._hook_report import Reporting
from ._hook_used import UsedLRs
from ._link import Link
from ._lr_history import LRHistory
from ._resume import STATE_FORMAT, Resuming, checkpoint_lrs, resume_state, sanitize_run_name
from ._rollback import Rollbacks
from ._staging import DeviceStaging
from ._torchutil import (
    is_number,
    lr_value,
    on_device,
    register_pre_step,
    shape_problem,
    to_float,
    total_grad_norm,
)
from ._writer import LRWriter
from .policy import Decision

__all__ = ["STATE_FORMAT", "Controller", "PolicyRejected", "RunConflict", "attach",
           "sanitize_run_name", "total_grad_norm"]

log = logging.getLogger("lrctl")

MAX_DECISIONS = 10_000


def attach(optimizer: Any, policy: Any = None, run_name: str | None = None, sync: bool = False,
           every: int | str = 1, socket: str | None = None, spawn: bool = True,
           **options: Any) -> Controller:
    """Connect ``optimizer`` to a controller; see :class:`Controller`."""
    return Controller(optimizer, policy=policy, run_name=run_name, sync=sync, every=every,
                      socket=socket, spawn=spawn, **options)


class Controller(Resuming, LinkSide, QuietSteps, Reporting, UsedLRs, Applying, Closing):
    """One training run's hook.

    ``policy``: a path, YAML text or a dict (``None``: the packaged default).
    ``sync``: wait up to ``timeout`` seconds for each decision, then fail open.
    ``every``: report every N-th step (and any step after :meth:`report`);
    ``"auto"``: report every step's values, batched so that reporting costs
    about 1 % of the step time, a standing-out step at once (see
    :mod:`lrctl._batching`).
    ``socket``: a Unix socket path or ``tcp://HOST:PORT`` (default:
    ``$LRCTL_SOCKET`` or the per-user runtime directory). ``spawn``: start a
    controller in the background when none answers (Unix sockets only).
    ``compute_grad_norm``: compute the grad norm from the optimizer's gradients
    when :meth:`step` is not given one (``False`` for integrations that pass
    the framework's own value whenever it has one).
    ``resume``: what :meth:`state_dict` returned in an earlier process (kept
    in your checkpoint), or the ``run_key`` of an earlier attach, to rejoin that
    run (see :meth:`load_state_dict`); ``start_step``: the step number the loop
    resumes at (the controller ignores observations it already has).
    ``base``: ``"controller"`` (default) — the controller's LRs are the LRs, and
    an LR written by anything else is overwritten, with a warning; ``"loop"`` —
    keep the loop's own schedule (its ``param_group['lr'] = ...`` or a torch
    scheduler) and let the policies scale it (see :mod:`lrctl._writer`).
    ``scaler``: the loop's ``torch.amp.GradScaler``: its overflow steps (inf
    gradients, which it skips) are reported as overflows, never as divergence,
    and the grad norm is unscaled (see :meth:`step`).
    ``watch``: ``False`` pins this run to the policy version it starts with (no
    live reloads when the file is edited). ``total_steps``: the run's length in
    steps, when known; policies that anneal to the end of the run (``kind:
    anneal``) need it. A reconnect or ``resume`` may give a new value (a run
    extended from a checkpoint): the controller takes it.
    ``snapshot_every``, ``keep``, ``model``, ``on_snapshot``, ``on_rollback``:
    snapshots for rollback-and-skip, off by default (see :mod:`lrctl._rollback`);
    :attr:`rolled_back` is the step restored by the last :meth:`step`, or None.
    """

    def __init__(self, optimizer: Any, *, policy: Any = None, run_name: str | None = None,
                 sync: bool = False, every: int | str = 1, socket: str | None = None,
                 spawn: bool = True, timeout: float = 1.0, token: str | None = None,
                 spawn_timeout: float = 60.0, max_backoff: float = 5.0,
                 compute_grad_norm: bool = True, resume: str | None = None,
                 start_step: int = 0, watch: bool = True,
                 total_steps: int | None = None, base: str = "controller",
                 scaler: Any = None, snapshot_every: int | None = None, keep: int = 2,
                 model: Any = None, on_snapshot: Any = None, on_rollback: Any = None) -> None:
        groups = getattr(optimizer, "param_groups", None)
        if not isinstance(groups, list) or not groups or not all(
                isinstance(g, dict) and "lr" in g for g in groups):
            raise TypeError("attach() needs a torch optimizer (param_groups with an 'lr'), "
                            f"but got {type(optimizer).__name__}")
        auto = every == "auto"
        if not auto and (isinstance(every, bool) or not isinstance(every, int) or every < 1):
            raise ValueError(f"every must be an integer >= 1 or 'auto', but got {every=}")
        if isinstance(start_step, bool) or not isinstance(start_step, int) or start_step < 0:
            raise ValueError(f"start_step must be an integer >= 0, but got {start_step=}")
        if total_steps is not None and (isinstance(total_steps, bool)
                                        or not isinstance(total_steps, int) or total_steps < 1):
            raise ValueError(f"total_steps must be a positive integer or None, but got "
                             f"{total_steps=}")
        saved = resume_state(resume)
        if saved is not None:
            resume = saved["run_key"]
            start_step = max(start_step, saved["step"])
        elif resume is not None and (not isinstance(resume, str)
                                     or sanitize_run_name(resume) != resume):
            raise ValueError(f"resume must be ctl.state_dict() or a run key from an earlier "
                             f"attach, but got {resume=}")
        if not (isinstance(timeout, (int, float)) and timeout > 0):
            raise ValueError(f"timeout must be > 0 seconds, but got {timeout=}")
        self.optimizer = optimizer
        self._watch = bool(watch)
        self.total_steps = total_steps
        self.sync = bool(sync)
        self.every = 1 if auto else cast(int, every)  # (an int >= 1, checked above)
        self.timeout = float(timeout)
        # base="loop": the run's LRs are the schedule's reference, which torch's schedulers
        # keep as initial_lr: one made before attach (a warmup from 0) has already set lr.
        initial = [lr_value(g.get("initial_lr", g["lr"]) if base == "loop" else g["lr"])
                   for g in groups]
        if saved is not None:
            if len(saved["initial_lrs"]) > len(initial):
                raise ValueError(f"the saved lrctl state has {len(saved['initial_lrs'])} param "
                                 f"group(s), this optimizer has {len(initial)}")
            # The run's, not the restored groups' LRs. Groups the run gained after its
            # attach (add_param_group, unfreezing layers) keep their own LRs, as they did
            # before the checkpoint (the first apply warns of them).
            initial = list(saved["initial_lrs"])
        self._initial = initial
        # The latest LRs from the controller; until one answers a resume, the checkpoint's.
        self._target = (checkpoint_lrs(saved) if saved is not None else None) or list(initial)
        self._writer = LRWriter(optimizer, initial, base, self._warn)
        self._history = LRHistory(start_step, self._target)  # for the audit (lrctl._lr_history)
        self._history_cap = LRHistory.PRUNE_AT
        # base="loop", every=N: the LRs each optimizer step ran on in the loop's own terms
        # (the loop's schedule times lrctl's factor), for a report's unreported steps.
        self._applied = (LRHistory(start_step, list(initial))
                         if base == "loop" and self.every > 1 else None)
        self._frozen = -1  # the step whose LRs its report said (see Reporting._finalize)
        self.scaler = scaler
        self.overflows = 0  # GradScaler overflow steps seen (reported as such)
        self._calls_without_step = 0  # ctl.step() calls with no optimizer step between
        self._intervals_with_extra = 0  # ... in intervals between optimizer steps in a row
        self._excused = False  # the last step() saw a step the loop may rightly not take
        self._last_scale: float | None = None  # a CPU GradScaler's scale at the last step()
        self._last_stepped = -1
        self._step = start_step
        self._compute_grad_norm = bool(compute_grad_norm)
        self._resume = resume
        self._reported = -1  # the last step sent (or staged)
        self._prev_reported = -1  # the one before it
        self._sent = -1  # the last step sent (a staged one once it goes out: see _send's gu)
        # every=N: the latest unreported step's loss and given grad norm (see close)
        self._unreported_loss: Any = None
        self._unreported_grad: Any = None
        self._acked = -1  # the last step whose answer arrived
        # Answers too new to apply yet (step -> LRs): the answer to step t is meant for
        # the optimizer step after t's, never t's own (async; see _usable_step).
        self._held: dict[int, list[float]] = {}
        self._late = False  # an answer missed its step: no waiting until they catch up
        # Sync: reported steps that ran without their answer (told to the controller as
        # late, with the LRs each ran on, before the next report: see Reporting._tell_late)
        self._unanswered: list[int] = []
        self.late_waits = 0  # waits that timed out (a slow or stopped controller)
        self._after_order = False  # the loop calls step() after optimizer.step()
        self._said_ran = False  # ... and this connection was told so (see Reporting._send)
        self._metrics: dict[str, Any] = dict(saved["metrics"]) if saved is not None else {}
        self._records: deque[dict[str, Any]] = deque(maxlen=MAX_DECISIONS)
        self._warned: set[str] = set()
        if base == "loop" and 0.0 in initial:
            self._warn("loop-zero", f"lrctl: param group {initial.index(0.0)} has LR 0 at "
                       "attach and no scheduler's initial_lr: under base='loop' lrctl's "
                       "multipliers (a back-off, a decay) scale the loop's LR relative to "
                       "the initial one, so they cannot act on that group; attach after the "
                       "optimizer holds its configured LR (or create the scheduler first)")
        self._got_error = False
        self._staging = DeviceStaging()
        self._hook_handle: Any = None
        self._quiet_allowed = False  # decided once attached (see below)
        self._closed = False
        self.should_stop = False
        self.should_skip = False
        self.mode = "active"
        self.run_key: str | None = None
        self._dist = Distributed.detect()
        # every="auto": batched reports where they can apply (see lrctl._batching)
        # every="auto": the last two reports of steps that stood out (the answer due is to
        # one of the last two reports: a NaN, then the highest loss yet, are both awaited)
        self._urgent_steps = (-1, -1)
        self._batch = Batching() if (auto and not self.sync and base != "loop"
                                     and self._dist.world_size == 1) else None
        self._rollbacks = Rollbacks.create(optimizer, snapshot_every, keep, model, on_snapshot,
                                           on_rollback, self._warn)
        self.rolled_back: int | None = None
        self._restored_unreported: int | None = None  # told to the controller with an obs
        self._link: Link | None = None
        self._controller_version: str | None = None  # from the welcome
        self._attached = False
        self._saved_session = saved.get("session") if saved is not None else None
        # From the run's welcome (or the saved state): lets a hello take the run over
        # from a connection the controller still serves (see handshake.py).
        self._resume_token: str | None = saved.get("token") if saved is not None else None
        self._snapshot: dict[str, Any] | None = None
        self._awaiting_snapshot = False
        self._connect_args = (policy, run_name, socket, spawn, token, spawn_timeout,
                              max_backoff)
        refused: Exception | None = None
        if self._dist.rank == 0:
            try:
                self._connect(*self._connect_args)
            except Exception as exc:  # raised below, once every rank knows
                refused = exc
        if self._dist.world_size > 1 and not self._dist.agree(refused is None):
            raise refused or PolicyRejected("rank 0 could not attach to the controller")
        if refused is not None:
            raise refused
        self._attached = True
        # Installed last: a refused attach leaves the optimizer, and an earlier attach of
        # it, untouched.
        close_earlier_attach(optimizer)
        self._guard = StepGuard(optimizer)
        self._guard.owner = weakref.ref(self)
        self._order_known = False  # does the loop call step() before optimizer.step()?
        self._after_order_expected = False  # lrctl.Scheduler: torch's order, documented
        if self._dist.world_size > 1:
            self._broadcast()  # the welcome's LRs (warmup's first step) on every rank
        else:
            self._apply()
            self._hook_handle = register_pre_step(optimizer, self._pre_step)
            if self._hook_handle is not None:  # (as the optimizer step it stands in for)
                self._guard.on_skip = self._pre_step
        if self._writer.loop_mode:
            self._guard.after = self._after_step
        # Steps may take the quiet way (see QuietSteps._quietly) only with none of these,
        # which cannot change while the run is attached.
        self._quiet_allowed = (self._hook_handle is not None and self._rollbacks is None
                               and not self._writer.loop_mode and not self.sync
                               and self._dist.world_size == 1)

    # -- public API ------------------------------------------------------------------------
    @property
    def lr(self) -> list[float]:
        """The LR per param group as the hook last applied it. In sync mode, after
        :meth:`step`, the LRs the next optimizer step uses; in async mode an answer may
        still arrive before that step, and its pre-step hook applies it (the decision's
        own step is then the one after): read ``ctl.lr`` after ``optimizer.step()`` for
        the LRs that step ran on."""
        return list(self._writer.applied)

    @property
    def foreign_lr_writes(self) -> int:
        """How often something else wrote an LR that the hook then overwrote
        (``base="controller"``; see :mod:`lrctl._writer`)."""
        return self._writer.foreign_writes

    @property
    def decisions(self) -> list[Decision]:
        """The decision records this run has received (the latest 10 000)."""
        return [Decision.from_dict(d) for d in self._records]

    @property
    def steps_taken(self) -> int:
        """How many steps this run has counted (``start_step`` plus calls to :meth:`step`)."""
        return self._step

    @property
    def connected(self) -> bool:
        return self._link is not None and self._link.connected

    def step(self, loss: Any = None, grad_norm: Any = None, *, scaler: Any = None) -> None:
        """Report one optimizer step (every ``every``-th) and apply the latest LRs.

        Call it once per optimizer step, after the last ``backward()`` and before
        ``optimizer.step()``. With gradient accumulation that is after the last
        micro-batch, with the loss of the whole batch (the mean of the micro-batch
        losses: the sum of nanoGPT's ``loss / gradient_accumulation_steps``).
        ``grad_norm``: the value ``clip_grad_norm_`` returned, if the loop has it
        (the hook then computes none). ``scaler``: the ``GradScaler`` (or give it
        to :func:`attach`); a step whose gradients overflowed is reported as an
        overflow, which no policy counts as divergence.
        """
        if self._closed:
            self._warn("closed", "lrctl: ctl.step() after close(): nothing is reported and "
                                 "the optimizer's LRs are left alone")
            return
        batch = self._batch
        raised: Warning | None = None
        try:
            if scaler is None and (batch is not None or self.every > 1):
                # The quiet ways judge each step on the host: a CPU tensor is read once here
                # (the full way would read it too), a device value takes the full way, and
                # so does a value that cannot be read (it counts, and says why, there).
                try:
                    host_loss = loss if type(loss) is float else _host(loss)
                    host_grad = grad_norm if grad_norm is None or type(
                        grad_norm) is float else _host(grad_norm)
                except (TypeError, ValueError, RuntimeError):
                    host_loss, host_grad = loss, grad_norm
                if type(host_loss) is float and (
                        host_grad is None or type(host_grad) is float) and self._quietly(
                        batch, host_loss, host_grad):
                    return  # nothing went out: the pre-step hook checks the LRs
                loss, grad_norm = host_loss, host_grad
            self._step_fully(batch, loss, grad_norm, scaler)
        except Warning as warning:  # the loop's filters made one of ours an error: raised as
            raised = warning  # it is, once the LRs are in (every rank in the collective)
        except Exception as exc:  # fail-open: the training loop must not see lrctl's bugs
            problem = shape_problem(loss, grad_norm)  # a per-sample loss: the caller's to fix
            if problem is not None:
                self._warn("loss-shape", problem)
            else:
                self._warn("internal", f"lrctl: hook error ({exc!r}); training continues at "
                                       "the last LR")
        try:
            if self._dist.world_size > 1:
                if self._link is not None and self._acked < self._reported:
                    self._await_due()  # rank 0: the LRs every rank uses next
                if self._held:
                    self._promote()
                self._broadcast()
            else:
                if self._held:
                    self._promote()
                self._apply()
        except Warning:  # the loop's filters made one of ours an error: as it is
            raise
        except Exception as exc:
            self._warn("apply", f"lrctl: could not apply the LRs ({exc!r}); training "
                                "continues at the last LR")
        if raised is not None:
            raise raised

    def report(self, **metrics: Any) -> None:
        """Named metrics (``val_loss=0.31``), sent with the next step's observation."""
        for name, value in metrics.items():
            if not is_number(value):
                self._warn(f"metric:{name}", f"lrctl: metric {name}={value!r} is not a number; "
                                             "ignored")
                continue
            self._metrics[name] = value

    def __enter__(self) -> Controller:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        # Leaving by an exception (a crash, Ctrl-C, a preemption) keeps the session
        # resumable; only a block that finishes ends the run.
        self.close(end_run=exc_type is None)

    def _warn(self, key: str, message: str) -> None:
        """Warn once per kind (a ``RuntimeWarning``, which Python prints once); the log
        gets every occurrence at INFO, so a script's own logging sees them all without
        the console showing each message twice."""
        log.info("%s", message, extra={"lrctl_warning": key})
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, RuntimeWarning, stacklevel=callers_level())


def _host(value: Any) -> Any:
    """A CPU tensor (or number) as a float; a float, ``None`` or a device value as it is."""
    if type(value) is float or value is None or on_device(value):
        return value
    return to_float(value)

