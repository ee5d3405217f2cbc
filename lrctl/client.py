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

import json
import logging
import math
import os
import re
import secrets
import subprocess
import sys
import time
import warnings
from collections import deque
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any

from . import paths
from ._defaults import DEFAULT_POLICY
from ._guard import StepGuard
from ._link import Link, token_from_env
from ._sources import looks_like_path
from ._version import __version__
from .policy import Decision
from .protocol import MAX_FRAME, FrameDecoder, encode, encode_obs, float_in

__all__ = ["Controller", "ControllerError", "PolicyRejected", "attach", "request",
           "total_grad_norm"]

log = logging.getLogger("lrctl")

MAX_POLICY_BYTES = 64 * 1024
MAX_DECISIONS = 10_000
#: A controller that attach() started exits after this long with no hook connected.
SPAWNED_IDLE_EXIT_S = 600
_NAME_BAD = re.compile(r"[^A-Za-z0-9._-]+")
_spawned: list[subprocess.Popen[bytes]] = []  # kept so their handles outlive the caller's frame
_NO_METRICS: Mapping[str, Any] = MappingProxyType({})


class ControllerError(RuntimeError):
    """The controller answered an operator request with an error."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class PolicyRejected(ValueError):
    """The controller found the policy invalid; the message reads ``file:line: key: message``."""


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
    ``resume``: the ``run_key`` of an earlier attach to rejoin (a training
    process restarted from a checkpoint); ``start_step``: the step number the
    loop resumes at (the controller ignores observations it already has).
    ``watch``: ``False`` pins this run to the policy version it starts with (no
    live reloads when the file is edited). ``total_steps``: the run's length in
    steps, when known; policies that anneal to the end of the run (``kind:
    anneal``) need it. A reconnect or ``resume`` may give a new value (a run
    extended from a checkpoint): the controller takes it.
    """

    def __init__(self, optimizer: Any, *, policy: Any = None, run_name: str | None = None,
                 sync: bool = False, every: int = 1, socket: str | None = None,
                 spawn: bool = True, timeout: float = 1.0, token: str | None = None,
                 spawn_timeout: float = 60.0, max_backoff: float = 5.0,
                 compute_grad_norm: bool = True, resume: str | None = None,
                 start_step: int = 0, watch: bool = True,
                 total_steps: int | None = None) -> None:
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
        if resume is not None and (not isinstance(resume, str)
                                   or sanitize_run_name(resume) != resume):
            raise ValueError(f"resume must be a run key from an earlier attach, but got {resume=}")
        if not (isinstance(timeout, (int, float)) and timeout > 0):
            raise ValueError(f"timeout must be > 0 seconds, but got {timeout=}")
        self.optimizer = optimizer
        self._watch = bool(watch)
        self.total_steps = total_steps
        self.sync = bool(sync)
        self.every = every
        self.timeout = float(timeout)
        self._groups: list[dict[str, Any]] = groups
        self._applied = [_lr_value(g["lr"]) for g in groups]
        self._target = list(self._applied)  # the latest LRs from the controller
        self._step = start_step
        self._compute_grad_norm = bool(compute_grad_norm)
        self._resume = resume
        self._reported = -1  # the last step sent (or staged)
        self._prev_reported = -1  # the one before it
        self._acked = -1  # the last step whose answer arrived
        # Answers too new to apply yet (step -> LRs): the answer to step t is meant for
        # the optimizer step after t's, never t's own (async; see _usable_step).
        self._held: dict[int, list[float]] = {}
        self._device_stats = False  # statistics went through the CUDA staging path
        self._late = False  # an answer missed its step: no waiting until they catch up
        self.late_waits = 0  # waits that timed out (a slow or stopped controller)
        self._after_order = False  # the loop calls step() after optimizer.step()
        self._metrics: dict[str, Any] = {}
        self._records: deque[dict[str, Any]] = deque(maxlen=MAX_DECISIONS)
        self._warned: set[str] = set()
        self._got_error = False
        self._staged: deque[tuple[int, Any, Any, tuple[bool, bool], dict[str, Any]]] = deque()
        self._pinned: list[Any] = []
        self._slot = 0
        self._hook_handle: Any = None
        self.should_stop = False
        self.should_skip = False
        self.mode = "active"
        self.run_key: str | None = None
        self._dist = _Distributed.detect()
        self._link: Link | None = None
        self._controller_version: str | None = None  # from the welcome
        self._attached = False
        refused: Exception | None = None
        if self._dist.rank == 0:
            try:
                self._connect(policy, run_name, socket, spawn, token, spawn_timeout,
                              max_backoff)
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
            self._hook_handle = _register_pre_step(optimizer, self._pre_step)

    # -- public API ------------------------------------------------------------------------
    @property
    def lr(self) -> list[float]:
        """The LR per param group now in the optimizer."""
        return list(self._applied)

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

    def step(self, loss: Any = None, grad_norm: Any = None) -> None:
        """Report one training step (every ``every``-th) and apply the latest LRs."""
        try:
            t = self._step
            self._step = t + 1
            self.should_skip = False
            loss, grad_norm = self._guard_step(t, loss, grad_norm)
            link = self._link
            if link is not None and link.fatal is None:
                if t % self.every == 0 or self._metrics:
                    self._report(t, loss, grad_norm)
                # Between reports with every answer in, there is nothing to read: such
                # steps cost next to nothing, so every=N divides the hook's cost by N.
                if self._acked < self._reported or self._staged or not link.idle:
                    self._pump()
                if self.sync and self._reported == t:
                    self._wait_for(t)
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
            if not _is_number(value):
                self._warn(f"metric:{name}", f"lrctl: metric {name}={value!r} is not a number; "
                                             "ignored")
                continue
            self._metrics[name] = value

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
        text, source = _policy_payload(policy)
        name = sanitize_run_name(run_name or os.environ.get("LRCTL_RUN_NAME")
                                 or Path(sys.argv[0] or "run").stem)
        self.run_key = self._resume or f"{name}-{secrets.token_hex(4)}"
        hello: dict[str, Any] = {
            "run": self.run_key, "run_name": name, "policy": {"text": text, "source": source},
            "lrs": list(self._applied), "groups": len(self._applied),
            "world_size": self._dist.world_size, "mlflow": _mlflow_info(), "cwd": os.getcwd(),
            "watch": self._watch, "sync": self.sync, "lrctl": __version__,
        }
        if self.total_steps is not None:
            hello["total_steps"] = self.total_steps
        link = self._open_link(address, hello, token, spawn, spawn_timeout, max_backoff)
        other = self._controller_version
        if link.connected and other != __version__:
            # A controller from another install or checkout holds the shared socket: it may
            # not know this version's policies or protocol. Use (or start) our own.
            link.close(bye=False)
            versioned = _versioned_socket(address)
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
            raise PolicyRejected(message)
        if not link.connected:
            self._warn("down", f"lrctl: no controller answers at {address}; training continues "
                               "at the optimizer's LRs and the hook keeps trying to connect")

    def _open_link(self, address: str, hello: dict[str, Any], token: str | None, spawn: bool,
                   spawn_timeout: float, max_backoff: float) -> Link:
        """Connect (starting a controller on ``address`` if allowed) and wait for the welcome."""
        link = Link(address, {**hello, "token": token or token_from_env()} if
                    address.startswith("tcp://") else hello, self._on_message,
                    warn=self._warn, max_backoff=max_backoff)
        if spawn and link.kind == "unix":
            link.respawn = lambda: _respawn(address)
        self._link = link
        opened = link.open(timeout=2.0)
        if not opened and spawn and link.kind == "unix":
            opened = _spawn_and_open(link, spawn_timeout)
        if opened:
            link.wait(lambda: link.state != "handshake", max(self.timeout, 10.0))
        return link

    def _on_message(self, msg: dict[str, Any]) -> None:
        t = msg["t"]
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
            if s >= 0:
                self._acked = max(self._acked, s)
            if s == self._reported and msg.get("skip") is True:
                self.should_skip = True
            if msg.get("stop") is True:
                self.should_stop = True
        elif t == "error":
            self._got_error = True
            if msg.get("fatal"):
                if self._attached:
                    self._warn("refused", f"lrctl: the controller refused this run "
                                          f"({msg.get('message')}); training continues at the "
                                          "last LR")
            elif msg.get("code") != "stale_step":
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
        if (_on_device(loss) or _on_device(grad_norm)) and not self.sync:
            guard.check_on_device(loss, grad_norm)  # no host sync on CUDA
            return loss, grad_norm
        loss, grad_norm = _to_float(loss), _to_float(grad_norm)
        if guard.check(loss, grad_norm):
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
        loss_dev, grad_dev = _on_device(loss), _on_device(grad_norm)
        if (loss_dev or grad_dev) and not self.sync:
            self._stage(t, loss, grad_norm, (loss_dev, grad_dev), metrics)
            return
        self._send(t, _to_float(loss), _to_float(grad_norm), metrics)

    def _send(self, t: int, loss: float | None, grad: float | None,
              metrics: Mapping[str, Any]) -> None:
        assert self._link is not None
        clean = {k: float(_to_float(v) or 0.0) for k, v in metrics.items()} if metrics else None
        try:
            frame = encode_obs(t, loss, grad, clean)
        except ValueError as exc:  # e.g. too many metrics for one frame
            self._warn("encode", f"lrctl: step {t} not reported: {exc}")
            return
        self._prev_reported, self._reported = self._reported, t
        self._link.send_obs(t, frame)

    def _pump(self) -> None:
        if self._staged:
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
            if self._link is not None and (self._acked < self._reported or self._staged):
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
        if self.sync or self._device_stats or link is None or not link.connected:
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
        target = self._target
        groups = self.optimizer.param_groups
        if groups is not self._groups:
            # optimizer.load_state_dict() replaced the group dicts (a resume): write anew.
            self._groups, self._applied = groups, []
        if target == self._applied:
            return
        if len(groups) != len(target):  # add_param_group() after attach
            self._warn("groups", f"lrctl: the optimizer has {len(groups)} param groups but "
                                 f"the run was attached with {len(target)}; LRs are applied "
                                 "to the first ones only")
        for group, lr in zip(groups, target, strict=False):
            current = group["lr"]
            if hasattr(current, "fill_"):
                current.fill_(lr)  # tensor LRs (capturable optimizers): in place, no sync
            else:
                group["lr"] = lr
        self._applied = list(target)

    def _broadcast(self) -> None:
        """Rank 0's LRs and flags to every rank, on a CPU group: identical LRs every step."""
        try:
            values = self._dist.broadcast(
                [*self._target, float(self.should_skip), float(self.should_stop)])
        except Exception as exc:
            self._warn("broadcast", f"lrctl: LR broadcast failed ({exc!r}); LRs unchanged")
            return
        n = len(self._target)
        self._target = values[:n]
        self.should_skip = values[n] > 0
        self.should_stop = values[n + 1] > 0
        self._apply()

    # -- statistics --------------------------------------------------------------------------
    def _stage(self, t: int, loss: Any, grad: Any, on_dev: tuple[bool, bool],
               metrics: Mapping[str, Any]) -> None:
        """Start a device→pinned copy of the statistics; :meth:`_drain_staged` sends it."""
        torch = sys.modules["torch"]
        device = loss.device if on_dev[0] else grad.device
        parts = [loss.detach().reshape(()).to(device, torch.float64) if on_dev[0]
                 else torch.zeros((), dtype=torch.float64, device=device),
                 grad.detach().reshape(()).to(device, torch.float64) if on_dev[1]
                 else torch.zeros((), dtype=torch.float64, device=device)]
        if len(self._staged) >= 8:
            self._drain_staged(block=True)  # the device is far behind: a reporting step may wait
        if not self._pinned:
            self._pinned = [torch.empty(2, dtype=torch.float64, pin_memory=True)
                            for _ in range(9)]
        # Slots in staging order: at most 8 copies are pending, so the 9-slot ring never
        # hands out a buffer whose copy has not been read (t % 9 would, with every=9).
        self._slot = (self._slot + 1) % len(self._pinned)
        buf = self._pinned[self._slot]
        buf.copy_(torch.stack(parts), non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        host = (None if on_dev[0] else _to_float(loss), None if on_dev[1] else _to_float(grad))
        self._staged.append((t, event, buf, on_dev, {"host": host, "metrics": metrics}))
        self._prev_reported, self._reported = self._reported, t
        self._device_stats = True

    def _drain_staged(self, block: bool) -> None:
        while self._staged:
            t, event, buf, on_dev, extra = self._staged[0]
            if not block and not event.query():
                return
            if block:
                event.synchronize()
            self._staged.popleft()
            values = buf.tolist()
            loss = values[0] if on_dev[0] else extra["host"][0]
            grad = values[1] if on_dev[1] else extra["host"][1]
            if self._link is not None:
                self._send(t, loss, grad, extra["metrics"])

    def _warn(self, key: str, message: str) -> None:
        """Warn once per kind (a ``RuntimeWarning``, which Python prints once); the log
        gets every occurrence at INFO, so a script's own logging sees them all without
        the console showing each message twice."""
        log.info("%s", message)
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, RuntimeWarning, stacklevel=3)


class _Distributed:
    """Rank and world size, and a CPU (gloo) group to broadcast LRs without a device sync."""

    def __init__(self, rank: int = 0, world_size: int = 1, group: Any = None) -> None:
        self.rank = rank
        self.world_size = world_size
        self.group = group

    @classmethod
    def detect(cls) -> _Distributed:
        torch = sys.modules.get("torch")
        if torch is None:
            return cls()
        dist = torch.distributed
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return cls()
        group = None if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")
        return cls(dist.get_rank(), dist.get_world_size(), group)

    def broadcast(self, values: list[float]) -> list[float]:
        torch = sys.modules["torch"]
        buf = torch.tensor(values, dtype=torch.float64)
        torch.distributed.broadcast(buf, src=0, group=self.group)
        return [float(v) for v in buf.tolist()]

    def agree(self, ok: bool) -> bool:
        return self.broadcast([1.0 if ok else 0.0])[0] > 0


# -- helpers ------------------------------------------------------------------------------
def _register_pre_step(optimizer: Any, hook: Any) -> Any:
    """Register ``hook`` to run before each ``optimizer.step()``.

    Wrappers such as accelerate's ``AcceleratedOptimizer`` subclass torch's
    ``Optimizer`` without its hook tables; their ``.optimizer`` is the real one.
    """
    for candidate in (optimizer, getattr(optimizer, "optimizer", None)):
        register = getattr(candidate, "register_step_pre_hook", None)
        if register is None:
            continue
        try:
            return register(hook)
        except (AttributeError, TypeError):
            continue
    return None


def total_grad_norm(optimizer: Any) -> Any:
    """The 2-norm of all gradients of ``optimizer``'s parameters, as a tensor (no sync).

    Uses torch's foreach kernels (``get_total_norm``, grouped by device and
    dtype); ``None`` when torch is not loaded or no parameter has a gradient.
    """
    torch = sys.modules.get("torch")
    if torch is None:
        return None
    grads = [p.grad for g in optimizer.param_groups for p in g["params"]
             if getattr(p, "grad", None) is not None]
    if not grads:
        return None
    total_norm = getattr(torch.nn.utils, "get_total_norm", None)
    if total_norm is not None:
        return total_norm(grads, 2.0)
    per_device: dict[Any, list[Any]] = {}
    for grad in grads:
        per_device.setdefault((grad.device, grad.dtype), []).append(grad)
    norms = [torch.linalg.vector_norm(torch.stack(torch._foreach_norm(gs)))
             for gs in per_device.values()]
    return torch.linalg.vector_norm(torch.stack([n.to(grads[0].device) for n in norms]))


def sanitize_run_name(name: str) -> str:
    """A name safe as a file name and an MLflow name: letters, digits and ``._-``."""
    clean = _NAME_BAD.sub("-", str(name)).strip("._-")[:64].strip("._-")
    return clean or "run"


def _policy_payload(policy: Any) -> tuple[str, str]:
    """``(text, source)`` for the hello. Dicts travel as JSON, which YAML reads as is."""
    if policy is None:
        policy = DEFAULT_POLICY
    if isinstance(policy, Mapping):
        try:
            return json.dumps(dict(policy), indent=2, allow_nan=False), "<dict>"
        except (TypeError, ValueError) as exc:
            raise ValueError(f"policy dict is not plain data: {exc}") from None
    if isinstance(policy, os.PathLike) or (isinstance(policy, str) and looks_like_path(policy)):
        path = os.path.abspath(os.fspath(policy))
        try:
            with open(path, "rb") as f:
                data = f.read(MAX_POLICY_BYTES + 1)
        except OSError as exc:
            raise FileNotFoundError(f"cannot read policy file {path}: "
                                    f"{exc.strerror or exc}") from None
        if len(data) > MAX_POLICY_BYTES:
            raise ValueError(f"policy file {path} is larger than {MAX_POLICY_BYTES} bytes")
        return data.decode("utf-8", "replace"), path
    if isinstance(policy, str):
        return policy, "<string>"
    raise TypeError(f"policy must be a path, YAML text or a dict, but got "
                    f"{type(policy).__name__}")


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


def _start_controller(address: str) -> subprocess.Popen[bytes]:
    """Start ``lrctl serve`` on ``address`` in its own session, logging to the state dir.

    Two runs may start one at once: the loser's controller exits (the socket's lock
    is taken) and both connect to the winner.
    """
    state = paths.ensure_private_dir(paths.state_dir())
    with open(state / "controller.out", "ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "lrctl", "serve", "--foreground", "--socket", address,
             "--state-dir", str(state), "--idle-exit", str(SPAWNED_IDLE_EXIT_S)],
            stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True, close_fds=True)
    _spawned.append(proc)
    log.info("lrctl: started a controller (pid %d) on %s", proc.pid, address)
    return proc


def _versioned_socket(address: str) -> str:
    """Where this version's own controller listens when another holds ``address``."""
    base = address[:-5] if address.endswith(".sock") else address
    return f"{base}-{__version__}.sock"


def _respawn(address: str) -> None:
    """The controller this run used is gone: start another (it restores the sessions)."""
    _start_controller(address)
    warnings.warn(f"lrctl: the controller on {address} did not come back; started a new one",
                  RuntimeWarning, stacklevel=2)


def _spawn_and_open(link: Link, timeout: float) -> bool:
    """Start a controller and wait until it answers."""
    proc = _start_controller(link.address)
    deadline = time.monotonic() + timeout
    delay = 0.02
    while time.monotonic() < deadline:
        if link.open(timeout=1.0):
            return True
        proc.poll()
        time.sleep(delay)
        delay = min(delay * 1.5, 0.25)
    return False


def _lr_value(lr: Any) -> float:
    value = float(lr)  # a tensor LR is read once here, at attach
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"param group LRs must be finite and >= 0, but got {value!r}")
    return value


def _is_number(x: Any) -> bool:
    if isinstance(x, bool):
        return False
    if isinstance(x, (int, float)):
        return True
    return hasattr(x, "item") and getattr(x, "numel", lambda: 0)() == 1


def _on_device(x: Any) -> bool:
    device = getattr(x, "device", None)
    return device is not None and getattr(device, "type", "cpu") != "cpu"


def _to_float(x: Any) -> float | None:
    if x is None:
        return None
    if type(x) is float:
        return x
    return float(x.item()) if hasattr(x, "item") else float(x)


# -- operator requests (used by the CLI verbs) ---------------------------------------------
def request(msg: Mapping[str, Any], address: str | None = None, *, token: str | None = None,
            timeout: float = 5.0) -> dict[str, Any]:
    """One request, one answer. Raises ``OSError`` when no controller answers and
    :class:`ControllerError` for an ``error`` answer."""
    import socket as _socket

    address = address or paths.default_socket()
    kind, addr = paths.parse_address(address)
    if kind == "unix":
        sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect(addr)
        except OSError:
            sock.close()
            raise
    else:
        sock = _socket.create_connection(addr, timeout=timeout)  # type: ignore[arg-type]
    with sock:
        payload = dict(msg)
        if kind == "tcp":
            payload["token"] = token or token_from_env()
        sock.sendall(encode(payload))
        decoder = FrameDecoder(MAX_FRAME * 16)
        while True:
            data = sock.recv(1 << 16)
            if not data:
                raise ConnectionError(f"the controller at {address} closed the connection")
            for reply in decoder.feed(data):
                if reply["t"] == "error":
                    raise ControllerError(str(reply.get("code")), str(reply.get("message")))
                return reply
