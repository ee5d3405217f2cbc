"""What a hook keeps in the user's checkpoint (``ctl.state_dict()``), checked on the way
back in (``attach(resume=...)``, ``ctl.load_state_dict``), and the run-name rule its run
key follows. :class:`Resuming` is a mixin of :class:`~lrctl.hook.Controller`."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from ._torchutil import lr_value, to_float

if TYPE_CHECKING:
    from ._dist import Distributed
    from ._link import Link
    from ._writer import LRWriter

__all__ = ["STATE_FORMAT", "Resuming", "checkpoint_lrs", "resume_state", "sanitize_run_name"]

_NAME_BAD = re.compile(r"[^A-Za-z0-9._-]+")


def sanitize_run_name(name: str) -> str:
    """A name safe as a file name and an MLflow name: letters, digits and ``._-``."""
    clean = _NAME_BAD.sub("-", str(name)).strip("._-")[:64].strip("._-")
    return clean or "run"


STATE_FORMAT = "lrctl.hook/1"


def resume_state(resume: Any) -> dict[str, Any] | None:
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
    metrics = resume.get("metrics") or {}
    # (A diverged evaluation's NaN included: it is what the loop reported.)
    if not isinstance(metrics, Mapping) or not all(
            isinstance(k, str) and isinstance(v, (int, float)) and not isinstance(v, bool)
            for k, v in metrics.items()):
        raise ValueError("the saved lrctl state's metrics are not numbers by name")
    return {"run_key": key, "step": step, "initial_lrs": [lr_value(v) for v in lrs],
            "session": dict(session) if session is not None else None,
            "token": token if isinstance(token, str) else None,
            "metrics": {k: float(v) for k, v in metrics.items()}}


def checkpoint_lrs(saved: Mapping[str, Any]) -> list[float] | None:
    """The LRs the run was at in a checked state (its policies' LRs as the checkpoint left
    them), for a resume that no controller answers; ``None`` when the state holds none."""
    session = saved.get("session") or {}
    engine = session.get("engine") if isinstance(session, Mapping) else None
    lrs = engine.get("lrs") if isinstance(engine, Mapping) else None
    if (not isinstance(lrs, list) or len(lrs) != len(saved["initial_lrs"])
            or not all(type(v) in (int, float) and math.isfinite(v) and v >= 0 for v in lrs)):
        return None
    return [float(v) for v in lrs]


class Resuming:
    """``state_dict`` and ``load_state_dict`` of the hook (see the module docstring)."""

    if TYPE_CHECKING:  # what it uses of the Controller (for type checkers only)
        timeout: float
        run_key: str | None
        _initial: list[float]
        _target: list[float]
        _writer: LRWriter
        _step: int
        _resume: str | None
        _reported: int
        _metrics: dict[str, Any]
        _dist: Distributed
        _link: Link | None
        _controller_version: str | None
        _saved_session: dict[str, Any] | None
        _resume_token: str | None
        _connect_args: tuple[Any, str | None, str | None, bool, str | None, float, float]
        _state_refused: bool

        def _apply(self) -> None: ...
        def _broadcast(self) -> None: ...
        def _connect(self, policy: Any, run_name: str | None, address: str | None,
                     spawn: bool, token: str | None, spawn_timeout: float,
                     max_backoff: float) -> None: ...
        def _fetch_session(self) -> dict[str, Any] | None: ...
        def _token(self) -> str | None: ...
        def _warn(self, key: str, message: str) -> None: ...

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
        pending = {k: to_float(v) for k, v in self._metrics.items()}
        if pending:
            # Reported after the last step (an evaluation before this checkpoint): they go
            # with the next step's observation, the resumed run's first if it comes to that.
            state["metrics"] = pending
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
        elif self._link is not None and self._link.connected and not self._state_refused:
            self._warn("state-timeout", f"lrctl: state_dict() got no answer from the "
                       f"controller within {self.timeout:g} s: it holds only the run key and "
                       "step, and a resume from it relies on the controller's own checkpoint "
                       "(attach(..., timeout=...) waits longer)")
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Rejoin the run that :meth:`state_dict` saved (call it before the first step).

        Equivalent to ``attach(..., resume=state)``: either order relative to the
        optimizer's own ``load_state_dict`` works (the hook rewrites the LRs into
        restored param groups). The session this attach opened, still empty, ends.
        """
        saved = resume_state(state)
        if saved is None:
            raise TypeError(f"load_state_dict() takes what ctl.state_dict() returned, not "
                            f"{type(state).__name__} (a run key: attach(..., resume=run_key))")
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
        # Until a controller answers: the checkpoint's LRs, not the run's first ones.
        self._target = checkpoint_lrs(saved) or list(self._initial)
        self._writer.initial = list(self._initial)
        self._resume = saved["run_key"]
        self._saved_session = saved.get("session")
        self._metrics = {**saved["metrics"], **self._metrics}
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
