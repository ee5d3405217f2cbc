"""One training run as the controller sees it: its policy stack plus operator state.

A session is plain data and logic, no I/O: the server feeds it observations and
operator commands and persists :meth:`Session.to_state` through the store.

Operator actions (:mod:`~lrctl.daemon.session_operator`) sit on top of the
policies and are recorded as decisions of the policy ``operator``:

* ``set_lr``: a manual LR for group 0 (the other groups keep their ratio to it)
  held for ``steps`` steps, then released back to the policies;
* ``pause`` / ``resume``: shadow mode. The policies keep observing and record
  what they would do (``shadow: true``) but the LRs hold at the values in
  effect when shadow mode began, rather than jumping to the initial LRs.

``decay`` (``lrctl decay``) is different: it is a command to a policy of the
stack (``kind: wsd`` starts or cancels its cooldown), decided by the engine and
kept in the policy's state, so the in-process engine and the controller decide
the same LRs from it and a checkpoint carries it across a restart.

A hot reload (:meth:`Session.reload`) swaps in a new policy stack built from
the new file and carries the old one's state over with ``Engine.inherit``.
Operator state sits above the policies, so it survives the swap: a manual LR
stays in force and a paused run stays paused.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
import secrets
from collections.abc import Mapping, Sequence
from typing import Any

from ..config import PolicyFile, parse_text
from ..policy import Decision, Engine
from ..policy._operator import OPERATOR
from ..policy._rollback import ASYNC_LAG
from ..sinks import RunInfo
from ..wire.errors import ProtocolError
from ._knobs import flatten_params, knob_changes, said_changes
from .session_operator import OperatorActions

__all__ = ["OPERATOR", "RELOAD", "Session", "Step", "new_resume_token", "text_sha256"]

RELOAD = "reload"


_TOKEN = re.compile(r"[A-Za-z0-9_-]{16,64}").fullmatch


def new_resume_token() -> str:
    """A run's resume token: what a hello must show to take over a connected run."""
    return secrets.token_urlsafe(18)


def text_sha256(text: str) -> str:
    """The sha256 a policy text gets in a ``PolicyFile`` (to compare hellos)."""
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


_INFER = object()  # a checkpoint from before the operator's mode was kept


class Step:
    """What the hook needs after one observation."""

    __slots__ = ("decisions", "lrs", "skip", "stop")

    def __init__(self, lrs: list[float], decisions: list[dict[str, Any]], skip: bool,
                 stop: bool) -> None:
        self.lrs = lrs
        self.decisions = decisions
        self.skip = skip
        self.stop = stop


class Session(OperatorActions):
    def __init__(self, info: RunInfo, policy: PolicyFile, initial_lrs: Sequence[float],
                 world_size: int = 1, total_steps: int | None = None) -> None:
        self.info = info
        self.key = info.run_key
        self.policy = policy
        self.world_size = world_size
        self.total_steps = total_steps  # the run's length, when the hook said it
        # The policies, and above them the operator's manual LR and shadow mode's hold.
        self.engine: Engine = policy.build(list(initial_lrs), total_steps)
        self.last_decision: dict[str, Any] | None = None
        self.saved_step = -1
        self.unsaved = 0  # observations since the last checkpoint
        # Live editing: the hook may opt out (attach(watch=False)); so may the file.
        self.watch = True
        # The policy the hook sent: a reconnecting hook sends it again even after reloads.
        self.hello_sha256 = info.policy_sha256
        self.reload_error: str | None = None  # the last failed reload, shown by ``runs``
        self._sync = False
        self.sync = False  # the connected hook waits for each answer (set by each hello)
        self.reloads = 0
        # lrctl pause/resume's mode where it differs from the file's: it outlasts reloads
        # (inferred from the engine's mode it was lost once an edit's mode matched it).
        self.operator_mode: str | None = None
        # The values its policies held when its snapshot was too large (see Observing)
        self.snapshot_too_large_at: int | None = None
        self.overflows = 0  # mixed-precision overflow steps the hook reported
        # base="loop": the loop's own LRs at the last observation (runs shows them scaled)
        self.loop_base: list[float] | None = None
        # Handed to the run's hook in its welcome; a hello for the run while another
        # connection serves it must show it (see handshake.py). Kept in the checkpoint.
        self.resume_token = new_resume_token()
        # The session_id of the hook's saved state this run was last resumed from (see
        # handshake.py): that hook's reconnects, sending it again, keep the run as it is.
        self.adopted: str | None = None
        # The last observation as recorded (its step, the LRs recorded as used there, its
        # loss and grad norm, its decisions): what a sync hook's late corrects (Observing).
        self.recorded_step = -1
        self.recorded_used: list[float] = []
        self.recorded_stats: tuple[float | None, float | None] = (None, None)
        self.recorded_decisions: list[dict[str, Any]] = []
        # Records made between observations, for the hook with the next answer.
        self.unsent: list[dict[str, Any]] = []

    # -- construction ------------------------------------------------------------------
    @classmethod
    def create(cls, *, key: str, run_name: str, policy_text: str, policy_source: str,
               lrs: Sequence[float], world_size: int = 1, mlflow_run_id: str | None = None,
               tracking_uri: str | None = None, cwd: str | None = None,
               total_steps: int | None = None) -> Session:
        """A new session; raises ``ConfigError`` for an invalid policy."""
        policy = parse_text(policy_text, policy_source)
        info = RunInfo(
            run_key=key, run_name=run_name, policy_source=policy_source,
            policy_text=policy_text, policy_sha256=policy.sha256, group_count=len(lrs),
            params=flatten_params(policy), mlflow_run_id=mlflow_run_id,
            tracking_uri=tracking_uri, cwd=cwd)
        return cls(info, policy, lrs, world_size, total_steps)

    @classmethod
    def restore(cls, state: Mapping[str, Any]) -> Session:
        """A session from :meth:`to_state`; raises ``ValueError`` (or ``KeyError``) if unusable
        (a checkpoint, or the state a hook saved: its fields are checked, not trusted)."""
        s = cls.create(key=_text(state, "run"), run_name=_text(state, "run_name"),
                       policy_text=_text(state, "policy_text"),
                       policy_source=_text(state, "policy_source"),
                       lrs=state["initial_lrs"], world_size=state.get("world_size", 1),
                       mlflow_run_id=_text(state, "mlflow_run_id", optional=True),
                       tracking_uri=_text(state, "tracking_uri", optional=True),
                       cwd=_text(state, "cwd", optional=True),
                       total_steps=state.get("total_steps"))
        s.engine.load_state_dict(state["engine"])
        if "operator" not in state["engine"]:  # a checkpoint from before they moved there
            override = state.get("override") or {}
            s.engine.operator.load_state_dict({
                "hold": state.get("hold_lrs"), "override": override.get("lrs"),
                "until": override.get("until")})
        s.last_decision = state.get("last_decision")
        s.watch = bool(state.get("watch", True))
        s.hello_sha256 = str(state.get("hello_sha256") or s.info.policy_sha256)
        error = state.get("reload_error")
        s.reload_error = None if error is None else str(error)
        s.reloads = int(state.get("reloads", 0))
        mode = state.get("operator_mode", _INFER)
        s.operator_mode = (mode if mode in ("shadow", "active") else None) if mode is not _INFER \
            else s.engine.mode if s.engine.mode != s.policy.mode else None  # (an older one)
        s.overflows = int(state.get("overflows", 0))
        base = state.get("loop_base")
        if isinstance(base, list) and len(base) == len(s.engine.initial_lrs):
            s.loop_base = [float(v) for v in base]
        token = state.get("resume_token")
        if isinstance(token, str) and _TOKEN(token):
            s.resume_token = token
        adopted = state.get("adopted_session")
        if isinstance(adopted, str) and len(adopted) <= 64:
            s.adopted = adopted
        s.saved_step = s.last_step
        return s

    def to_state(self) -> dict[str, Any]:
        return {
            "run": self.key,
            "run_name": self.info.run_name,
            "policy_text": self.info.policy_text,
            "policy_source": self.info.policy_source,
            "initial_lrs": list(self.engine.initial_lrs),
            "world_size": self.world_size,
            "total_steps": self.total_steps,
            "mlflow_run_id": self.info.mlflow_run_id,
            "tracking_uri": self.info.tracking_uri,
            "cwd": self.info.cwd,
            "engine": self.engine.state_dict(),
            "last_decision": self.last_decision,
            "watch": self.watch,
            "hello_sha256": self.hello_sha256,
            "reload_error": self.reload_error,
            "reloads": self.reloads,
            "operator_mode": self.operator_mode,
            "overflows": self.overflows,
            "resume_token": self.resume_token,
            "loop_base": self.loop_base,
            "adopted_session": self.adopted,
        }

    def set_snapshots(self, spec: tuple[int, int] | None,
                      held: tuple[int, ...] | None = None) -> None:
        """The connected hook keeps snapshots (``(every, keep)``) or none (``None``), and
        holds those of the steps ``held`` now (``None``: it does not say)."""
        if spec is None:
            self.engine.disable_snapshots()
            return
        self.engine.enable_snapshots(spec[0], spec[1], ASYNC_LAG)
        if held is not None and self.engine.snapshots is not None:
            # A process resumed from a checkpoint holds none of its predecessor's.
            self.engine.snapshots.held_by_hook(held)

    def rollback(self, to: int | None) -> dict[str, Any]:
        """``lrctl rollback RUN [--to STEP]``: the hook restores the newest snapshot at or
        before ``to`` (default: its newest) at its next step. ``ProtocolError`` when it
        holds none (nothing changes then)."""
        try:
            decision = self.engine.rollback(to, ASYNC_LAG)
        except ValueError as exc:
            raise ProtocolError(f"run {self.key}: {exc}", "bad_request") from None
        return self._record(decision.to_dict())

    def rolled_back(self, step: int, restored: int) -> dict[str, Any]:
        """The hook says it restored the snapshot of step ``restored`` before ``step``: the
        record that the rollback decided earlier was carried out, and to which snapshot."""
        lrs = tuple(self.lrs())
        return self._record(Decision(
            step=step, policy="hook", kind="hook", action="rolled_back", old_lrs=lrs,
            new_lrs=lrs, reason=f"the hook restored the snapshot of step {restored} before "
                                f"step {step} ({step - restored} steps lost)",
            evidence={"snapshot_step": restored, "at_step": step,
                      "steps_lost": step - restored},
            policy_sha256=self.info.policy_sha256).to_dict())

    def not_applied(self, step: int, ran: list[float]) -> dict[str, Any] | None:
        """A sync hook ran ``step``, the last observation, without its answer (its wait ran
        out: the controller was stalled), on the LRs ``ran``: the record of what of that
        answer did not reach the step, if anything: a skip (the hook's own guard skips a
        non-finite step whatever the answer), an LR change when ``ran`` is not what was
        decided. None when all of it did (or nothing was decided)."""
        decided = self.recorded_used
        loss, grad = self.recorded_stats
        finite = all(v is None or v - v == 0.0 for v in (loss, grad))
        missed = []
        for d in self.recorded_decisions:
            evidence = d.get("evidence") or {}
            if d.get("policy") == "hook" or d.get("shadow") or d.get("action") == "stop":
                continue  # (a stop reaches the hook whenever its answer does)
            if d.get("action") == "skip":
                if finite and not evidence.get("advisory"):
                    missed.append(d)
            elif (d.get("old_lrs") != d.get("new_lrs") and not evidence.get("overridden")
                  and ran != decided):
                missed.append(d)
        if not missed:
            return None
        what = "; ".join(
            f"{d['policy']}'s skip was not carried out (the step ran)" if d["action"] == "skip"
            else f"{d['policy']}'s {d['action']} to {_lrs_text(d['new_lrs'])} did not apply to "
                 "it (it applied from the step its answer reached, as lrctl/lr shows)"
            for d in missed)
        lrs = tuple(self.lrs())
        return self._record(Decision(
            step=step, policy="hook", kind="hook", action="not_applied", old_lrs=lrs,
            new_lrs=lrs, reason=f"the hook ran step {step} without its answer (its wait for "
                                f"it ran out: the controller answered late), at LR "
                                f"{_lrs_text(ran)}: {what}",
            evidence={"ran_lrs": list(ran), "decided_lrs": list(decided),
                      "not_applied": [{"policy": d["policy"], "action": d["action"]}
                                      for d in missed]},
            policy_sha256=self.info.policy_sha256).to_dict())

    def rewound(self, seen_up_to: int, undone: list[dict[str, Any]]) -> dict[str, Any]:
        """A resume from the user's checkpoint (``ctl.state_dict()``) replaced this run as
        the controller held it, up to step ``seen_up_to``: the record that the steps after
        the checkpoint's, and the decisions made there (``undone``), no longer count."""
        lrs = tuple(self.lrs())
        step = max(self.last_step, 0)
        what = ", ".join(f"{d['action']}@{d['step']}" for d in undone[:10])
        what += f" and {len(undone) - 10} more" if len(undone) > 10 else ""
        return self._record(Decision(
            step=step, policy="hook", kind="hook", action="resumed", old_lrs=lrs,
            new_lrs=lrs, reason=f"resumed from the checkpoint's state at step {step}: the "
                                f"steps {step + 1}-{seen_up_to} seen before are undone"
                                + (f", with their decisions ({what})" if undone else ""),
            evidence={"checkpoint_step": step, "seen_up_to": seen_up_to,
                      "undone": [{"step": d["step"], "action": d["action"]}
                                 for d in undone[:100]]},
            policy_sha256=self.info.policy_sha256).to_dict())

    def set_total_steps(self, total_steps: int) -> None:
        """A new run length from a reconnecting hook (a run extended on resume)."""
        self.total_steps = total_steps
        self.engine.total_steps = total_steps

    # -- live editing ------------------------------------------------------------------
    @property
    def watch_path(self) -> str | None:
        """The file to watch, or None: not a file, pinned by the hook, or ``watch: false``."""
        source = self.info.policy_source
        if not (self.watch and self.policy.watch and os.path.isabs(source)):
            return None
        return os.path.normpath(source)

    def reload(self, policy: PolicyFile, forced: bool = False) -> dict[str, Any]:
        """Swap in ``policy``, keeping the policies' and the operator's state.

        Raises ``ConfigError`` or ``ValueError`` when the new file cannot drive
        this run (e.g. per-group lists of the wrong length); the session is
        unchanged then.
        """
        old = self.engine
        new = policy.build(list(old.initial_lrs), self.total_steps)
        before = self.lrs()
        summary = new.inherit(old)  # with the manual LR and the hold
        new.set_mode(self.operator_mode or policy.mode, holding=before)
        old_sha, old_params = self.info.policy_sha256, self.info.params
        new.skips_enforced, new.steps_ran = self._sync, old.steps_ran
        new.answers_same_step = self._sync
        self.engine = new
        self.policy = policy
        # Its source too: a resume from the hook's state may bring the policy of another
        # file (the run then watches that one).
        self.info = dataclasses.replace(
            self.info, policy_text=policy.text, policy_sha256=policy.sha256,
            policy_source=policy.source, params=flatten_params(policy))
        self.reload_error = None
        self.reloads += 1
        parts = [f"{k} {', '.join(v)}" for k, v in summary.items() if v]
        what = "; ".join(parts) or "no policies"
        knobs = knob_changes(old_params, self.info.params)
        if knobs:
            what += f" ({said_changes(knobs)})"
        verb = "forced reload" if forced else "reloaded"
        return self._record(Decision(
            step=max(self.last_step, 0), policy=RELOAD, kind=RELOAD, action="reload",
            old_lrs=tuple(before), new_lrs=tuple(self.lrs()),
            reason=f"{verb} {os.path.basename(policy.source)}: {what}",
            evidence={"old_sha256": old_sha, "new_sha256": policy.sha256,
                      "source": policy.source, "forced": forced, **summary,
                      "knobs": knobs},
            policy_sha256=policy.sha256).to_dict())

    def reload_failed(self, error: str, sha256: str | None) -> dict[str, Any]:
        """Record a rejected new version; the current policy keeps running."""
        self.reload_error = error
        lrs = tuple(self.lrs())
        return self._record(Decision(
            step=max(self.last_step, 0), policy=RELOAD, kind=RELOAD, action="reload_failed",
            old_lrs=lrs, new_lrs=lrs,
            reason=f"new version rejected, the current policy keeps running: {error}",
            evidence={"old_sha256": self.info.policy_sha256, "new_sha256": sha256,
                      "error": error},
            policy_sha256=self.info.policy_sha256).to_dict())

    @property
    def sync(self) -> bool:
        """The connected hook waits for each answer, so a skip reaches its optimizer step
        (an async hook's spike skips are recorded as advisory)."""
        return self._sync

    @sync.setter
    def sync(self, value: bool) -> None:
        self._sync = value
        self.engine.skips_enforced = value
        self.engine.answers_same_step = value  # (a manual LR's last step: see the engine)

    def used_lrs(self, decided: Sequence[float], base: Sequence[float] | None) -> list[float]:
        """The LRs the optimizer used: ``decided`` (the controller's), or with a hook in
        ``base="loop"`` mode, the loop's own LRs ``base`` scaled by decided / initial."""
        if base is None:
            return list(decided)
        initial = self.engine.initial_lrs
        return [b * (d / i) if i > 0 else b
                for b, d, i in zip(base, decided, initial, strict=False)]

    # -- the hot path --------------------------------------------------------------------
    @property
    def last_step(self) -> int:
        return -1 if self.engine.last_step is None else self.engine.last_step

    @property
    def mode(self) -> str:
        return self.engine.mode

    def lrs(self) -> list[float]:
        """The LRs in effect for the step after :attr:`last_step`."""
        return self.engine.applied_lrs

    @property
    def override(self) -> dict[str, Any] | None:
        """The operator's manual LR in force: ``{"lrs": [...], "until": step or None}``."""
        op = self.engine.operator
        return None if op.override is None else {"lrs": list(op.override), "until": op.until}

    def observe(self, step: int, loss: float | None, grad_norm: float | None,
                metrics: Mapping[str, float], metrics_step: int | None = None,
                ran: bool = False) -> Step:
        """Raises ``ObservationError`` for a bad observation (the session is unchanged).
        ``ran``: the hook says the step has already run (the LRs it ran on)."""
        engine = self.engine
        engine.already_ran = ran
        lrs = engine.update(step, loss, grad_norm, metrics, metrics_step)
        decisions = [d.to_dict() for d in engine.last_decisions]
        self.unsaved += 1
        if decisions:
            self.last_decision = decisions[-1]
        acting = engine.mode == "active"
        return Step(lrs, decisions, acting and engine.should_skip,
                    acting and engine.should_stop)

    def _record(self, decision: dict[str, Any]) -> dict[str, Any]:
        self.last_decision = decision
        return decision

    def summary(self) -> dict[str, Any]:
        return {
            "run": self.key,
            "run_name": self.info.run_name,
            "step": self.last_step,
            "lrs": self.used_lrs(self.lrs(), self.loop_base),
            "mode": self.mode,
            "override": self.override,
            "last_decision": self.last_decision,
            "policy_source": self.info.policy_source,
            "policy_sha256": self.info.policy_sha256,
            "watching": self.watch_path is not None,
            "reloads": self.reloads,
            "reload_error": self.reload_error,
            "overflows": self.overflows,
        }


def _lrs_text(lrs: Sequence[float]) -> str:
    return ", ".join(f"{v:g}" for v in lrs[:4]) + (f" (and {len(lrs) - 4} more)"
                                                  if len(lrs) > 4 else "")


def _text(state: Mapping[str, Any], key: str, optional: bool = False) -> Any:
    """A string field of a saved session (None too, when ``optional``)."""
    value = state.get(key) if optional else state[key]
    if not (isinstance(value, str) or (optional and value is None)):
        raise ValueError(f"{key} must be a string{' or null' if optional else ''}, "
                         f"but got {value!r:.40}")
    return value
