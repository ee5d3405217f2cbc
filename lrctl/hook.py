"""The training-side hook: ``ctl = lrctl.attach(optimizer)``, then ``ctl.step(loss)``.

Imports only the stdlib and the pure protocol at module level; torch is used
only through ``sys.modules`` (it is loaded, since the caller hands us an
optimizer) and mlflow only if the training script imported it.

Timing. Put ``ctl.step(loss)`` after ``backward()`` and before
``optimizer.step()``. The LRs the controller returns for an observation apply
to the next optimizer step after they arrive: in sync mode that is the step
right after the observation (so ``should_skip`` can veto it); in async mode an
optimizer pre-step hook applies whatever has arrived, so a decision made from
step ``t`` is in effect by step ``t + 1`` when the controller keeps up. On
CUDA (async), statistics are copied to a pinned buffer and sent one step later
when the copy's event has completed, so no step waits for the device; their
decisions land one step later too.

Fail-open: after ``attach`` returns, nothing raised inside lrctl reaches the
training loop. A missing, killed or slow controller costs one warning; the LRs
stay where they were and the hook reconnects with back-off, resuming its session.
"""

from __future__ import annotations

import logging
import math
import os
import re
import secrets
import sys
import warnings
from collections import deque
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any

from . import _spawn, paths
from ._dist import Distributed
from ._guard import StepGuard
from ._link import Link, token_from_env
from ._rollback import Rollbacks
from ._sources import policy_payload
from ._staging import DeviceStaging
from ._torchutil import (
    is_number,
    lr_value,
    on_device,
    register_pre_step,
    scaler_enabled,
    to_float,
    total_grad_norm,
    unscaled_norm,
)
from ._version import __version__
from ._writer import LRWriter
from .policy import Decision
from .protocol import encode_obs, float_in

__all__ = ["Controller", "PolicyRejected", "attach", "sanitize_run_name", "total_grad_norm"]

log = logging.getLogger("lrctl")

MAX_DECISIONS = 10_000
_NAME_BAD = re.compile(r"[^A-Za-z0-9._-]+")
_NO_METRICS: Mapping[str, Any] = MappingProxyType({})


class PolicyRejected(ValueError):
    """The controller found the policy invalid; the message reads ``file:line: key: message``."""


class RunConflict(PolicyRejected):
    """The controller refused the run: another connection serves it (two scripts with one
    run name?), or it exists with another policy or other initial LRs."""


def attach(optimizer: Any, policy: Any = None, run_name: str | None = None, sync: bool = False,
           every: int = 1, socket: str | None = None, spawn: bool = True,
           **options: Any) -> Controller:
    """Connect ``optimizer`` to a controller; see :class:`Controller`."""
    return Controller(optimizer, policy=policy, run_name=run_name, sync=sync, every=every,
                      socket=socket, spawn=spawn, **options)


class Controller:
    """One training run's hook.

    ``policy``: a path, YAML text or a dict (``None``: the packaged default).
    ``sync``: wait up to ``timeout`` seconds for each decision, then fail open.
    ``every``: report every N-th step (and any step after :meth:`report`).
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
                 sync: bool = False, every: int = 1, socket: str | None = None,
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
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be an integer >= 1, but got {every=}")
        if isinstance(start_step, bool) or not isinstance(start_step, int) or start_step < 0:
            raise ValueError(f"start_step must be an integer >= 0, but got {start_step=}")
        if total_steps is not None and (isinstance(total_steps, bool)
                                        or not isinstance(total_steps, int) or total_steps < 1):
            raise ValueError(f"total_steps must be a positive integer or None, but got "
                             f"{total_steps=}")
        saved = _resume_state(resume)
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
        self.every = every
        self.timeout = float(timeout)
        initial = [lr_value(g["lr"]) for g in groups]
        if saved is not None:
            if len(saved["initial_lrs"]) != len(initial):
                raise ValueError(f"the saved lrctl state has {len(saved['initial_lrs'])} param "
                                 f"group(s), this optimizer has {len(initial)}")
            initial = list(saved["initial_lrs"])  # the run's, not the restored groups' LRs
        self._initial = initial
        self._target = list(initial)  # the latest LRs from the controller
        self._writer = LRWriter(optimizer, initial, base, self._warn)
        self.scaler = scaler
        self.overflows = 0  # GradScaler overflow steps seen (reported as such)
        self._calls_without_step = 0  # ctl.step() calls with no optimizer step between
        self._excused = False  # the last step() saw a step the loop may rightly not take
        self._last_stepped = -1
        self._step = start_step
        self._compute_grad_norm = bool(compute_grad_norm)
        self._resume = resume
        self._reported = -1  # the last step sent (or staged)
        self._prev_reported = -1  # the one before it
        self._acked = -1  # the last step whose answer arrived
        # Answers too new to apply yet (step -> LRs): the answer to step t is meant for
        # the optimizer step after t's, never t's own (async; see _usable_step).
        self._held: dict[int, list[float]] = {}
        self._late = False  # an answer missed its step: no waiting until they catch up
        self.late_waits = 0  # waits that timed out (a slow or stopped controller)
        self._after_order = False  # the loop calls step() after optimizer.step()
        self._metrics: dict[str, Any] = {}
        self._records: deque[dict[str, Any]] = deque(maxlen=MAX_DECISIONS)
        self._warned: set[str] = set()
        self._got_error = False
        self._staging = DeviceStaging()
        self._hook_handle: Any = None
        self.should_stop = False
        self.should_skip = False
        self.mode = "active"
        self.run_key: str | None = None
        self._dist = Distributed.detect()
        self._rollbacks = Rollbacks.create(optimizer, snapshot_every, keep, model, on_snapshot,
                                           on_rollback, self._warn)
        self.rolled_back: int | None = None
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
        # Installed last: a refused attach leaves the optimizer untouched.
        self._guard = StepGuard(optimizer)
        self._order_known = False  # does the loop call step() before optimizer.step()?
        if self._dist.world_size > 1:
            self._broadcast()  # the welcome's LRs (warmup's first step) on every rank
        else:
            self._apply()
            self._hook_handle = register_pre_step(optimizer, self._pre_step)
        if self._writer.loop_mode:
            self._guard.after = self._after_step

    # -- public API ------------------------------------------------------------------------
    @property
    def lr(self) -> list[float]:
        """The LR per param group the next optimizer step uses."""
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
        try:
            t = self._step
            self._step = t + 1
            self.should_skip = False
            if scaler is not None:
                self.scaler = scaler
            self._count_calls()
            if self._writer.loop_mode:
                self._apply()  # read the LR the loop set for this step: it is reported
            overflows = self.overflows
            loss, grad_norm = self._guard_step(t, loss, grad_norm)
            self.rolled_back = self._rollbacks.step(t) if self._rollbacks else None
            if self.rolled_back is not None:  # this step's gradients are of the old weights
                self.should_skip = True
                self._guard.veto()
            link = self._link
            if link is not None and link.fatal is None:
                if t % self.every == 0 or self._metrics:
                    self._report(t, loss, grad_norm)
                # Between reports with every answer in, there is nothing to read: such
                # steps cost next to nothing, so every=N divides the hook's cost by N.
                if self._acked < self._reported or self._staging or not link.idle:
                    self._pump()
                if self.sync and self._reported == t:
                    self._wait_for(t)
            # A step the loop may rightly not take (a scaler overflow, should_skip).
            self._excused = self.should_skip or self.overflows != overflows
        except Exception as exc:  # fail-open: the training loop must not see lrctl's bugs
            self._warn("internal", f"lrctl: hook error ({exc!r}); training continues at the "
                                   "last LR")
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
        except Exception as exc:
            self._warn("apply", f"lrctl: could not apply the LRs ({exc!r}); training "
                                "continues at the last LR")

    def report(self, **metrics: Any) -> None:
        """Named metrics (``val_loss=0.31``), sent with the next step's observation."""
        for name, value in metrics.items():
            if not is_number(value):
                self._warn(f"metric:{name}", f"lrctl: metric {name}={value!r} is not a number; "
                                             "ignored")
                continue
            self._metrics[name] = value

    def state_dict(self) -> dict[str, Any]:
        """What to keep in your own checkpoint to resume this run exactly.

        Plain data (``torch.save`` and JSON both hold it): the run key, the step
        count, the run's initial LRs and, when the controller answers, its policies'
        state as of the last reported step (it waits up to ``timeout`` for the
        answers still due). Pass it back with ``attach(..., resume=state)`` or
        :meth:`load_state_dict` in the restarted process: the LRs then continue as
        if the run had not stopped, wherever the controller had got to since.
        """
        state: dict[str, Any] = {"format": STATE_FORMAT, "run_key": self.run_key,
                                 "step": self._step, "initial_lrs": list(self._initial)}
        token = self._token()
        if token is not None:
            state["token"] = token  # a resume may take the run over from a hung process
        try:
            session = self._fetch_session()
        except Exception as exc:
            session = None
            self._warn("internal", f"lrctl: could not read the run's state ({exc!r})")
        if session is not None:
            state["session"] = session
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Rejoin the run that :meth:`state_dict` saved (call it before the first step).

        Equivalent to ``attach(..., resume=state)``: either order relative to the
        optimizer's own ``load_state_dict`` works (the hook rewrites the LRs into
        restored param groups). The session this attach opened, still empty, ends.
        """
        saved = _resume_state(state)
        assert saved is not None
        if len(saved["initial_lrs"]) != len(self._initial):
            raise ValueError(f"the saved lrctl state has {len(saved['initial_lrs'])} param "
                             f"group(s), this optimizer has {len(self._initial)}")
        if self._reported >= 0:
            raise RuntimeError("load_state_dict() must come before the first ctl.step() "
                               "(or pass the state to attach(..., resume=state))")
        self._step = max(self._step, saved["step"])
        if saved["run_key"] == self.run_key and saved.get("session") is None:
            return
        self._initial = list(saved["initial_lrs"])
        self._target = list(self._initial)
        self._writer.initial = list(self._initial)
        self._resume = saved["run_key"]
        self._saved_session = saved.get("session")
        self._resume_token = saved.get("token") or (
            self._token() if saved["run_key"] == self.run_key else None)
        if self._dist.rank == 0:
            if self._link is not None:
                self._link.close(bye=saved["run_key"] != self.run_key)
                self._link = None
            self._controller_version = None
            self._connect(*self._connect_args)
        if self._dist.world_size > 1:
            self._broadcast()
        else:
            self._apply()

    def close(self, end_run: bool = True) -> None:
        """Flush what the controller should see, unhook, disconnect.

        ``end_run=True`` says goodbye: the controller ends the session (and the
        MLflow run it created). ``end_run=False`` only disconnects, leaving the
        session resumable with ``attach(..., resume=run_key)`` — for a training
        process that is being interrupted rather than finishing. It waits up to
        ``timeout`` (1 s) for the answers still due, so that :attr:`decisions`
        holds those made from the last observations; a controller that is gone
        costs no wait.
        """
        if self._hook_handle is not None:
            self._hook_handle.remove()
            self._hook_handle = None
        guard = getattr(self, "_guard", None)
        if guard is not None:
            guard.remove()
        if self._link is None:
            return
        try:
            self._drain_staged(block=True)
            if self._link.connected and self._acked < self._reported:
                self._got_error = False
                self._link.wait(lambda: self._acked >= self._reported or self._got_error,
                                self.timeout)
            self._link.close(bye=end_run)
        except Exception as exc:
            self._warn("internal", f"lrctl: error while closing ({exc!r})")
        self._link = None

    def __enter__(self) -> Controller:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        # Leaving by an exception (a crash, Ctrl-C, a preemption) keeps the session
        # resumable; only a block that finishes ends the run.
        self.close(end_run=exc_type is None)

    # -- connecting --------------------------------------------------------------------------
    def _connect(self, policy: Any, run_name: str | None, address: str | None, spawn: bool,
                 token: str | None, spawn_timeout: float, max_backoff: float) -> None:
        address = address or paths.default_socket()
        text, source = policy_payload(policy)
        name = sanitize_run_name(run_name or os.environ.get("LRCTL_RUN_NAME")
                                 or Path(sys.argv[0] or "run").stem)
        self.run_key = self._resume or f"{name}-{secrets.token_hex(4)}"
        hello: dict[str, Any] = {
            "run": self.run_key, "run_name": name, "policy": {"text": text, "source": source},
            "lrs": list(self._initial), "groups": len(self._initial),
            "world_size": self._dist.world_size, "mlflow": _mlflow_info(), "cwd": os.getcwd(),
            "watch": self._watch, "sync": self.sync, "lrctl": __version__,
        }
        if self.total_steps is not None:
            hello["total_steps"] = self.total_steps
        if self._rollbacks is not None:
            hello["snapshots"] = self._rollbacks.hello()
        if self._saved_session is not None:
            hello["session"] = self._saved_session  # the run as the checkpoint left it
        if self._step > 0:
            hello["start_step"] = self._step  # a new run's first LRs are for this step
        if self._resume_token is not None and self._resume is not None:
            hello["resume_token"] = self._resume_token
        link = self._open_link(address, hello, token, spawn, spawn_timeout, max_backoff)
        other = self._controller_version
        if link.connected and other != __version__:
            # A controller from another install or checkout holds the shared socket: it may
            # not know this version's policies or protocol. Use (or start) our own.
            link.close(bye=False)
            versioned = _spawn.versioned_socket(address)
            if spawn and link.kind == "unix":
                self._warn("version", f"lrctl: the controller on {address} runs lrctl "
                                      f"{other or '< 0.2'}, this hook is lrctl {__version__}: "
                                      f"using a controller on {versioned} instead ('lrctl stop "
                                      f"--socket {address}' stops the old one)")
                self._controller_version = None
                link = self._open_link(versioned, hello, token, spawn, spawn_timeout,
                                       max_backoff)
                address = versioned
            else:
                self._link = None
                self._warn("version", f"lrctl: the controller on {address} runs lrctl "
                                      f"{other or '< 0.2'}, this hook is lrctl {__version__}; "
                                      "training continues at the optimizer's LRs (stop it "
                                      "with 'lrctl stop', or attach with spawn=True)")
                return
        if link.fatal is not None:
            self._link = None
            code, message = link.fatal.get("code"), str(link.fatal.get("message"))
            if code == "unauthorized":
                raise PermissionError(f"lrctl: the controller at {address} refused us: {message}")
            if code == "run_conflict":
                raise RunConflict(message)
            raise PolicyRejected(message)
        if not link.connected and "unavailable" not in self._warned:
            self._warn("down", f"lrctl: no controller answers at {address}; training continues "
                               "at the optimizer's LRs and the hook keeps trying to connect")

    def _open_link(self, address: str, hello: dict[str, Any], token: str | None, spawn: bool,
                   spawn_timeout: float, max_backoff: float) -> Link:
        """Connect (starting a controller on ``address`` if allowed) and wait for the welcome."""
        link = Link(address, hello, self._on_message, warn=self._warn,
                    max_backoff=max_backoff, token=token or token_from_env()
                    if address.startswith("tcp://") else None)
        if spawn and link.kind == "unix":
            link.respawn = lambda: _spawn.respawn(address)
        self._link = link
        opened = link.open(timeout=2.0)
        if not opened and spawn and link.kind == "unix":
            opened = _spawn.spawn_and_open(link, spawn_timeout)
        if opened:
            link.wait(lambda: link.state != "handshake", max(self.timeout, 10.0))
        return link

    def _on_message(self, msg: dict[str, Any]) -> None:
        t = msg["t"]
        if t == "snapshot":
            self._snapshot = msg
            return
        if t == "welcome":
            version = msg.get("version")
            self._controller_version = version if isinstance(version, str) else None
        if t in ("welcome", "lr"):
            lrs = msg.get("lrs")
            if isinstance(lrs, list) and len(lrs) == len(self._target):
                values = [float_in(v, "lrs") for v in lrs]
                if all(math.isfinite(v) and v >= 0 for v in values):
                    s = msg.get("s") if t == "lr" else None
                    if isinstance(s, int) and s > self._usable_step():
                        self._held[s] = values  # for the optimizer step after step s's
                    else:
                        self._held.clear()  # an operator push or reload supersedes them
                        self._target = values
            if isinstance(msg.get("mode"), str):
                self.mode = msg["mode"]
        if t == "welcome" and self._resume is not None and msg.get("restored") is False:
            self._warn("not-restored", f"lrctl: the controller has no state for run "
                                       f"{self._resume!r}; its policies start afresh")
        if t == "lr":
            s = msg.get("s")
            if not isinstance(s, int):
                return
            fresh = s < 0 or s > self._acked
            if fresh:
                for d in msg.get("d") or ():
                    if isinstance(d, dict):
                        self._records.append(d)
                        if self._rollbacks is not None and d.get("action") == "rollback":
                            self._rollbacks.on_decision(d, self._dist.world_size > 1)
            if s >= 0:
                self._acked = max(self._acked, s)
            if s == self._reported and msg.get("skip") is True:
                self.should_skip = True
                if self.sync and s == self._step - 1:
                    self._guard.veto()  # in time for this step's optimizer.step(): carry it out
            if msg.get("stop") is True:
                self.should_stop = True
        elif t == "error":
            self._got_error = True
            if msg.get("retry"):  # out of descriptors, say: it tries again later
                self._warn("unavailable", f"lrctl: the controller cannot serve this run now "
                                          f"({msg.get('message')})")
            elif msg.get("fatal"):
                if self._attached:
                    self._warn("refused", f"lrctl: the controller refused this run "
                                          f"({msg.get('message')}); training continues at the "
                                          "last LR")
            elif msg.get("code") != "stale_step" and not self._awaiting_snapshot:
                self._warn(f"error:{msg.get('code')}",
                           f"lrctl: the controller says: {msg.get('message')}")

    # -- the step --------------------------------------------------------------------------
    def _guard_step(self, t: int, loss: Any, grad_norm: Any) -> tuple[Any, Any]:
        """The local non-finite guard (see :mod:`lrctl._guard`); returns the statistics
        to report, as floats where they are on the host."""
        guard = self._guard
        guard.clear()  # a verdict whose optimizer step never came (the loop skipped it)
        if not self._order_known:
            self._order_known = True
            if guard.stepped:
                guard.enabled = False
                self._after_order = True
                self._warn("order", "lrctl: ctl.step() runs after optimizer.step(), so a "
                                    "NaN/inf step has already reached the weights when the hook "
                                    "sees it; call ctl.step(loss) after backward() and before "
                                    "optimizer.step() to have such steps skipped")
        reporting = t % self.every == 0 or bool(self._metrics)
        if grad_norm is None and self._compute_grad_norm and reporting:
            grad_norm = total_grad_norm(self.optimizer)
            if grad_norm is None:
                self._warn("no-grad", "lrctl: ctl.step() found no gradients (call it after "
                                      "loss.backward()); the grad norm is not reported")
            elif self.scaler is not None:
                grad_norm = unscaled_norm(self.scaler, self.optimizer, grad_norm)
        if (on_device(loss) or on_device(grad_norm)) and not self.sync:
            if not scaler_enabled(self.scaler):  # an enabled scaler skips such steps
                guard.check_on_device(loss, grad_norm)  # no host sync on CUDA
            return loss, grad_norm
        loss, grad_norm = to_float(loss), to_float(grad_norm)
        if scaler_enabled(self.scaler):  # it skips non-finite steps itself, and must:
            bad = not all(v is None or math.isfinite(v) for v in (loss, grad_norm))
            self.should_skip = self.should_skip or bad  # its unscale state is per step
        elif guard.check(loss, grad_norm):
            self.should_skip = True
        return loss, grad_norm

    def _report(self, t: int, loss: Any, grad_norm: Any) -> None:
        if grad_norm is None and self._compute_grad_norm:
            grad_norm = total_grad_norm(self.optimizer)
        metrics: Mapping[str, Any] = _NO_METRICS  # no allocation on the usual step
        if self._metrics:
            metrics, self._metrics = self._metrics, {}
        if (loss is None or type(loss) is float) and (grad_norm is None
                                                      or type(grad_norm) is float):
            self._send(t, loss, grad_norm, metrics)
            return
        loss_dev, grad_dev = on_device(loss), on_device(grad_norm)
        if (loss_dev or grad_dev) and not self.sync:
            self._stage(t, loss, grad_norm, (loss_dev, grad_dev), metrics)
            return
        self._send(t, to_float(loss), to_float(grad_norm), metrics)

    def _send(self, t: int, loss: float | None, grad: float | None,
              metrics: Mapping[str, Any]) -> None:
        assert self._link is not None
        clean = {k: float(to_float(v) or 0.0) for k, v in metrics.items()} if metrics else None
        overflow = False
        if grad is not None and not math.isfinite(grad) and scaler_enabled(self.scaler):
            # The scaler skips this step and lowers its scale: normal in fp16 training.
            overflow, grad = True, None
            self.overflows += 1
        try:
            frame = encode_obs(t, loss, grad, clean, overflow=overflow,
                               base=self._writer.base if self._writer.loop_mode else None)
        except ValueError as exc:  # e.g. too many metrics for one frame
            self._warn("encode", f"lrctl: step {t} not reported: {exc}")
            return
        self._prev_reported, self._reported = self._reported, t
        self._link.send_obs(t, frame)

    def _pump(self) -> None:
        if self._staging:
            self._drain_staged(block=False)
        assert self._link is not None
        self._link.pump()

    def _wait_for(self, t: int) -> None:
        assert self._link is not None
        self._got_error = False
        ok = self._link.wait(lambda: self._acked >= t or self._got_error, self.timeout)
        if not ok and not self._got_error and self._link.state != "down":
            self._warn("slow", f"lrctl: no decision within {self.timeout:g} s (sync mode); "
                               "continuing at the last LR")

    def _pre_step(self, *_: Any) -> None:
        """Optimizer pre-step hook: apply whatever arrived since :meth:`step`.

        It reads only while an answer is awaited (a zero-timeout poll when nothing came).
        It reads even right after ``step()``: skipping that saves one poll syscall, but on a
        busy machine the reply can land in the gap, and the decision would then be late.
        """
        try:
            if self._link is not None and (self._acked < self._reported or self._staging):
                self._pump()
                self._await_due()
            if self._held:
                self._promote()
            self._apply()
        except Exception as exc:
            self._warn("internal", f"lrctl: hook error ({exc!r}); training continues at the "
                                   "last LR")

    def _usable_step(self) -> int:
        """The newest step whose answer may set the LRs of the next optimizer step.

        Async: the optimizer step of step ``t`` uses the answer to ``t - 1`` (a decision
        made from step ``t`` takes effect at ``t + 1``, exactly: never earlier, so a
        seeded run is reproducible). When the loop calls ``step()`` before
        ``optimizer.step()``, step ``t``'s call has counted ``t + 1`` steps. Sync: the
        answer to ``t`` applies at once (that is what the loop waited for).
        """
        if self.sync:
            return self._step - 1
        return self._step - 1 if self._after_order else self._step - 2

    def _await_due(self) -> None:
        """Async: wait (at most ``timeout``) for the answer the next optimizer step needs.

        It has almost always arrived (a whole forward and backward pass has passed since
        it was asked); on CUDA statistics are read a step late by design, so no wait.
        """
        link = self._link
        if self.sync or self._staging.used or link is None or not link.connected:
            return
        limit = self._usable_step()
        due = self._reported if self._reported <= limit else self._prev_reported
        if due < 0 or self._acked >= due:
            self._late = False  # caught up: exact t+1 again
            return
        if self._late:
            return  # a wait already timed out: no step waits again until answers catch up
        self._got_error = False
        if not link.wait(lambda: self._acked >= due or self._got_error, self.timeout) \
                and not self._got_error and link.connected:
            self._late = True
            self.late_waits += 1
            self._warn("slow", f"lrctl: the decision for step {due} did not arrive within "
                               f"{self.timeout:g} s; continuing at the last LR (decisions "
                               "apply as they arrive until the controller catches up)")

    def _promote(self) -> None:
        """Held answers whose optimizer step has come become the target."""
        limit = self._usable_step()
        ready = [s for s in self._held if s <= limit]
        if ready:
            self._target = self._held[max(ready)]
            for s in ready:
                del self._held[s]

    def _apply(self) -> None:
        self._writer.apply(self._target)

    def _token(self) -> str | None:
        """The run's resume token, as the latest welcome gave it."""
        link = self._link
        token = link.hello.get("resume_token") if link is not None else None
        return token if isinstance(token, str) else self._resume_token

    def _fetch_session(self) -> dict[str, Any] | None:
        """The controller's state of this run after every step reported so far."""
        link = self._link
        if link is None or not link.connected:
            if self._dist.rank == 0:
                self._warn("state-offline", "lrctl: state_dict() without a controller holds "
                                            "only the run key and step; a resume then relies "
                                            "on the controller's own checkpoint")
            return None
        self._drain_staged(block=True)
        self._got_error = False
        if self._acked < self._reported and not link.wait(
                lambda: self._acked >= self._reported or self._got_error, self.timeout):
            return None
        self._snapshot = None
        self._got_error = False
        self._awaiting_snapshot = True  # a controller too old to know it answers an error
        try:
            link.send({"t": "snapshot"})
            link.wait(lambda: self._snapshot is not None or self._got_error, self.timeout)
        finally:
            self._awaiting_snapshot = False
        reply, self._snapshot = self._snapshot, None
        if reply is None or not isinstance(reply.get("session"), dict):
            return None
        return dict(reply["session"])

    def _after_step(self) -> None:
        """Loop mode, after every optimizer step: the loop gets its own LRs back."""
        try:
            self._writer.restore()
        except Exception as exc:
            self._warn("internal", f"lrctl: hook error ({exc!r}); training continues")

    def _count_calls(self) -> None:
        """Notice a loop that calls ``step()`` per micro-batch (gradient accumulation)."""
        # 0: the guard never saw a step (a wrapper such as accelerate's steps the inner
        # optimizer directly), so no evidence either way.
        stepped = self._guard.stepped if getattr(self, "_guard", None) else 0
        if stepped == self._last_stepped and stepped > 0 and not self._excused:
            self._calls_without_step += 1
            if self._calls_without_step >= 3:
                self._warn("accumulation", "lrctl: ctl.step() was called several times "
                                           "between optimizer steps; each call counts one "
                                           "step. With gradient accumulation, call it once "
                                           "per optimizer step, after the last micro-batch's "
                                           "backward(), with the mean micro-batch loss")
        else:
            self._calls_without_step = 0
        self._last_stepped = stepped

    def _broadcast(self) -> None:
        """Rank 0's LRs and flags to every rank, on a CPU group: identical LRs every step."""
        try:
            rollback = self._rollbacks.wire() if self._rollbacks is not None else []
            values = self._dist.broadcast(
                [*self._target, float(self.should_skip), float(self.should_stop), *rollback])
        except Exception as exc:
            self._warn("broadcast", f"lrctl: LR broadcast failed ({exc!r}); LRs unchanged")
            return
        n = len(self._target)
        self._target = values[:n]
        self.should_skip = values[n] > 0
        self.should_stop = values[n + 1] > 0
        if self._rollbacks is not None:
            self._rollbacks.agree(values[n + 2], values[n + 3])
        self._apply()

    # -- statistics --------------------------------------------------------------------------
    def _stage(self, t: int, loss: Any, grad: Any, on_dev: tuple[bool, bool],
               metrics: Mapping[str, Any]) -> None:
        """CUDA, async: copy the statistics to the host without a sync; sent when ready."""
        self._staging.stage(t, loss, grad, on_dev, metrics, self._send_staged)
        self._prev_reported, self._reported = self._reported, t

    def _send_staged(self, t: int, loss: float | None, grad: float | None,
                     metrics: Mapping[str, Any]) -> None:
        if self._link is not None:
            self._send(t, loss, grad, metrics)

    def _drain_staged(self, block: bool) -> None:
        self._staging.drain(self._send_staged, block)

    def _warn(self, key: str, message: str) -> None:
        """Warn once per kind (a ``RuntimeWarning``, which Python prints once); the log
        gets every occurrence at INFO, so a script's own logging sees them all without
        the console showing each message twice."""
        log.info("%s", message)
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, RuntimeWarning, stacklevel=3)


def sanitize_run_name(name: str) -> str:
    """A name safe as a file name and an MLflow name: letters, digits and ``._-``."""
    clean = _NAME_BAD.sub("-", str(name)).strip("._-")[:64].strip("._-")
    return clean or "run"


def _mlflow_info() -> dict[str, str | None]:
    info: dict[str, str | None] = {"run_id": None,
                                   "tracking_uri": os.environ.get("MLFLOW_TRACKING_URI")}
    mlflow = sys.modules.get("mlflow")  # only if the script uses it: never import it here
    if mlflow is not None:
        try:
            run = mlflow.active_run()
            info["run_id"] = run.info.run_id if run is not None else None
            info["tracking_uri"] = mlflow.get_tracking_uri()
        except Exception:
            pass
    return info


STATE_FORMAT = "lrctl.hook/1"


def _resume_state(resume: Any) -> dict[str, Any] | None:
    """A :meth:`Controller.state_dict` checked; ``None`` when ``resume`` is not one."""
    if not isinstance(resume, Mapping):
        return None
    if resume.get("format") != STATE_FORMAT:
        raise ValueError(f"not an lrctl hook state (format {resume.get('format')!r}, expected "
                         f"{STATE_FORMAT!r})")
    key, step, lrs = resume.get("run_key"), resume.get("step"), resume.get("initial_lrs")
    if not isinstance(key, str) or sanitize_run_name(key) != key:
        raise ValueError(f"the saved lrctl state has a bad run key {key!r:.80}")
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"the saved lrctl state has a bad step {step!r:.40}")
    if not isinstance(lrs, (list, tuple)) or not lrs:
        raise ValueError("the saved lrctl state has no initial LRs")
    session = resume.get("session")
    if session is not None and not isinstance(session, Mapping):
        raise ValueError("the saved lrctl state's session is not a mapping")
    token = resume.get("token")
    return {"run_key": key, "step": step, "initial_lrs": [lr_value(v) for v in lrs],
            "session": dict(session) if session is not None else None,
            "token": token if isinstance(token, str) else None}
