"""The hook's side of the conversation with its controller: the hello it sends, the
link it opens (starting a controller when none answers, or its own when another
version holds the socket), what it does with each message, and the snapshot of
its run that ``state_dict`` asks for.

A mixin of :class:`~lrctl.hook.Controller`, whose attributes these methods use.
"""

from __future__ import annotations

import math
import os
import secrets
import sys
import weakref
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import _spawn, paths
from ._hook_probe import address_fits, mlflow_info, stop_command, version_on
from ._link import Link
from ._resume import sanitize_run_name
from ._sources import policy_payload
from ._version import __version__
from .wire.messages import float_in
from .wire.token import token_from_env

if TYPE_CHECKING:
    from collections import deque

    from ._batching import Batching
    from ._dist import Distributed
    from ._guard import StepGuard
    from ._rollback import Rollbacks
    from ._writer import LRWriter

__all__ = ["LinkSide", "PolicyRejected", "RunConflict"]

#: Decisions that say a policy cannot act as configured (a metric the loop does not
#: report, a schedule with no length): the hook warns with them, once each.
NOTICES = frozenset({"metric_missing", "wsd_inactive", "anneal_inactive"})
#: The active MLflow runs hooks of this process log into, each to the hook that holds it:
#: one MLflow run holds one lrctl run (two would mix their LR charts and refuse each
#: other's params).
_MLFLOW_HOLDERS: weakref.WeakValueDictionary[str, Any] = weakref.WeakValueDictionary()


class PolicyRejected(ValueError):
    """The controller found the policy invalid; the message reads ``file:line: key: message``."""


class RunConflict(PolicyRejected):
    """The controller refused the run: another connection serves it (two scripts with one
    run name?), or it exists with another policy or other initial LRs."""


class LinkSide:
    """Connecting, and the controller's messages (see the module docstring)."""

    _link: Link | None
    _warned: set[str]
    _closed: bool

    if TYPE_CHECKING:  # what it uses of the Controller (for type checkers only)
        total_steps: int | None
        sync: bool
        every: int
        timeout: float
        should_stop: bool
        should_skip: bool
        mode: str
        run_key: str | None
        _watch: bool
        _initial: list[float]
        _target: list[float]
        _writer: LRWriter
        _frozen: int
        _step: int
        _resume: str | None
        _reported: int
        _acked: int
        _held: dict[int, list[float]]
        _late: bool
        _after_order: bool
        _said_ran: bool
        _records: deque[dict[str, Any]]
        _got_error: bool
        _dist: Distributed
        _batch: Batching | None
        _rollbacks: Rollbacks | None
        _controller_version: str | None
        _attached: bool
        _saved_session: dict[str, Any] | None
        _resume_token: str | None
        _snapshot: dict[str, Any] | None
        _awaiting_snapshot: bool
        _guard: StepGuard
        _state_refused: bool

        def _drain_staged(self, block: bool) -> None: ...
        def _flush_pending(self) -> None: ...
        def _usable_step(self) -> int: ...
        def _used_at(self, step: int) -> list[float] | None: ...
        def _warn(self, key: str, message: str) -> None: ...

    def _check_default_store(self, mlflow: dict[str, str | None]) -> None:
        """A local sqlite store (MLflow's default is ``./mlflow.db`` of this script) that
        cannot be made, its directory read-only: said at once, not only in ``lrctl
        status``."""
        uri = mlflow.get("tracking_uri") or "sqlite:///mlflow.db"
        if not uri.startswith("sqlite:///"):
            return
        store = os.path.abspath(uri[len("sqlite:///"):].split("?", 1)[0])
        where = os.path.dirname(store)
        if (os.path.isdir(where) and not os.access(where, os.W_OK)
                and not os.path.exists(store)
                and not os.path.isdir(os.path.join(where, "mlruns"))):
            self._warn("mlflow-store", f"lrctl: the MLflow store would be {store}, but "
                                       f"{where} is not writable: decisions stay in lrctl's "
                                       "journal (lrctl decisions RUN) but cannot reach "
                                       "MLflow; set MLFLOW_TRACKING_URI (e.g. "
                                       "sqlite:////somewhere/writable/mlflow.db)")

    def _hold_mlflow_run(self, mlflow: dict[str, str | None], name: str) -> None:
        """Log into the script's active MLflow run unless another open hook of this
        process does (two optimizers, a GAN's say): this run then gets its own."""
        run_id = mlflow["run_id"]
        if run_id is None:
            return
        holder = _MLFLOW_HOLDERS.get(run_id)
        if (holder is not None and holder is not self and holder._attached
                and not holder._closed):  # (an attach refused never held it)
            mlflow["run_id"] = None
            self._warn("mlflow-run-held", f"lrctl: the active MLflow run {run_id} holds the "
                       f"decisions of run {holder.run_key} (another hook in this process); "
                       f"this run's go to an MLflow run of their own, named {name!r} "
                       "(start a nested run around each attach() to choose where)")
            return
        _MLFLOW_HOLDERS[run_id] = self

    def _connect(self, policy: Any, run_name: str | None, address: str | None, spawn: bool,
                 token: str | None, spawn_timeout: float, max_backoff: float) -> None:
        address = address or paths.default_socket()
        text, source = policy_payload(policy)
        name = sanitize_run_name(run_name or os.environ.get("LRCTL_RUN_NAME")
                                 or Path(sys.argv[0] or "run").stem)
        self.run_key = self._resume or f"{name}-{secrets.token_hex(4)}"
        mlflow = mlflow_info()
        self._hold_mlflow_run(mlflow, name)
        self._check_default_store(mlflow)
        hello: dict[str, Any] = {
            "run": self.run_key, "run_name": name, "policy": {"text": text, "source": source},
            "lrs": list(self._initial), "groups": len(self._initial),
            "world_size": self._dist.world_size, "mlflow": mlflow, "cwd": os.getcwd(),
            "watch": self._watch, "sync": self.sync, "lrctl": __version__,
            # Each report's answer is due a step later: the controller may read it on a
            # timer that follows its steps (every=N's too: it knows N), so its sends wake
            # nobody (see daemon/pacing.py). Not with "auto": its reports come when a step
            # stands out, and such a report's answer is awaited at the next step. Nor
            # under torch.distributed: rank 0 awaits each answer inside step(), which
            # with step() after optimizer.step() is the one to the step it just reported.
            "pace": (not self.sync and self._batch is None and self._dist.world_size == 1),
            "compact": 1,  # it reads compact lr answers (see lrctl.wire.compact)
        }
        if self.total_steps is not None:
            hello["total_steps"] = self.total_steps
        if self.every > 1:  # ("auto" reports every step's values: 1)
            hello["every"] = self.every
        if self._rollbacks is not None:
            hello["snapshots"] = self._rollbacks.hello()
        if self._saved_session is not None:
            hello["session"] = self._saved_session  # the run as the checkpoint left it
            # This hook's: a reconnect sends it again, and a controller that took it
            # already (the run went on from it) keeps the run as it is (see handshake.py).
            hello["session_id"] = secrets.token_hex(8)
        if self._step > 0:
            hello["start_step"] = self._step  # a new run's first LRs are for this step
        if self._resume_token is not None and self._resume is not None:
            hello["resume_token"] = self._resume_token
        # Asked before any hello: a controller of another version must not get this run
        # (it would keep it, a phantom beside the one ours serves).
        answered, other = version_on(address)
        link: Link | None = None
        if not answered or other == __version__:
            link = self._open_link(address, hello, token, spawn, spawn_timeout, max_backoff)
            answered, other = link.connected, self._controller_version
            if answered and other != __version__:
                link.close(bye=False)
        if answered and other != __version__:
            # A controller from another install or checkout holds the shared socket: it may
            # not know this version's policies or protocol. Use (or start) our own.
            unix = not address.startswith("tcp://")
            versioned = _spawn.versioned_socket(address)
            stop = stop_command(address)
            if spawn and unix and not address_fits(versioned):
                self._link = None
                self._warn("version", f"lrctl: the controller on {address} runs lrctl "
                                      f"{other or '< 0.2'}, this hook is lrctl {__version__}, "
                                      f"and no socket for this version's fits beside it "
                                      f"({versioned} is too long); training continues at the "
                                      f"optimizer's LRs (stop the old one with '{stop}'"
                                      ", or choose a shorter socket)")
                return
            if spawn and unix:
                self._warn("version", f"lrctl: the controller on {address} runs lrctl "
                                      f"{other or '< 0.2'}, this hook is lrctl {__version__}: "
                                      f"using a controller on {versioned} instead, its state "
                                      f"and log in {paths.state_dir(socket=versioned)} "
                                      f"('{stop}' stops the old one)")
                self._controller_version = None
                link = self._open_link(versioned, hello, token, spawn, spawn_timeout,
                                       max_backoff)
                address = versioned
            else:
                self._link = None
                self._warn("version", f"lrctl: the controller on {address} runs lrctl "
                                      f"{other or '< 0.2'}, this hook is lrctl {__version__}; "
                                      "training continues at the optimizer's LRs (stop it "
                                      f"with '{stop}', or attach with spawn=True)")
                return
        assert link is not None
        if link.fatal is not None:
            self._link = None
            code, message = link.fatal.get("code"), str(link.fatal.get("message"))
            if code == "unauthorized":
                raise PermissionError(f"lrctl: the controller at {address} refused us: {message}")
            if code == "run_conflict":
                raise RunConflict(message)
            raise PolicyRejected(message)
        if not link.connected and "unavailable" not in self._warned:
            why = f" ({self._spawn_failure})" if self._spawn_failure else ""
            self._warn("down", f"lrctl: no controller answers at {address}{why}; training "
                               "continues at the optimizer's LRs and the hook keeps trying to "
                               "connect")

    def _open_link(self, address: str, hello: dict[str, Any], token: str | None, spawn: bool,
                   spawn_timeout: float, max_backoff: float) -> Link:
        """Connect (starting a controller on ``address`` if allowed) and wait for the welcome."""
        link = Link(address, hello, self._on_message, warn=self._warn,
                    max_backoff=max_backoff, token=token or token_from_env()
                    if address.startswith("tcp://") else None)
        if spawn and link.kind == "unix":
            link.respawn = lambda resumable: _spawn.respawn(address, resumable)
        rollbacks = self._rollbacks

        def refresh_hello(hello: dict[str, Any]) -> None:
            """Each (re)connect's hello: the snapshots held now, and the loop's order once
            known (the first report after it says it otherwise: see Reporting._send)."""
            if rollbacks is not None:
                hello["snapshots"] = rollbacks.hello()
            if self._after_order:
                hello["ran"] = True
            self._said_ran = self._after_order

        link.refresh_hello = refresh_hello
        link.used_at = self._used_at  # what each replayed step ran on (lrctl._lr_history)
        self._link = link
        self._spawn_failure: str | None = None
        opened = link.open(timeout=2.0)
        if not opened and spawn and link.kind == "unix":
            self._spawn_failure = _spawn.spawn_and_open(link, spawn_timeout)
            opened = self._spawn_failure is None
        if opened:
            link.wait(lambda: link.state != "handshake", max(self.timeout, 10.0))
        return link

    def _on_message(self, msg: dict[str, Any]) -> None:
        t = msg["t"]
        if t == "lr":  # the answer to an observation (or a push): every step, first
            self._on_lr(msg)
        elif t == "welcome":
            if self._link is not None:
                _spawn.served(self._link.address)
            version = msg.get("version")
            self._controller_version = version if isinstance(version, str) else None
            self._adopt_initial(msg.get("initial_lrs"))
            self._take_lrs(msg, None)
            if self._resume is not None and msg.get("restored") is False:
                self._warn("not-restored", f"lrctl: the controller has no state for run "
                                           f"{self._resume!r}; its policies start afresh (a "
                                           "run that ended, by close() or a finished 'with' "
                                           "block, is gone, and so is one left resumable "
                                           "whose checkpoint was removed 30 days after its "
                                           "hook went; a run key is NAME-xxxxxxxx, as "
                                           "'lrctl runs --all' lists it)")
            last = msg.get("last_step")
            if isinstance(last, int) and not isinstance(last, bool) and last >= self._step:
                # Rejoined at a step before the controller's: it answers such steps as
                # already seen, observing none.
                fix = ("resume from the ctl.state_dict() saved with the checkpoint your loop "
                       "resumed from (resume=state): it holds the run as of that step"
                       if self._step > 0 else
                       "give attach(..., start_step=N) the step your loop resumes at, or "
                       "resume from ctl.state_dict() (resume=state)")
                self._warn("behind", f"lrctl: the controller has run {self.run_key!r} up to "
                                     f"step {last}, and this hook counts from step "
                                     f"{self._step}: its steps up to {last} are answered as "
                                     f"already seen and observed by no policy; {fix}")
        elif t == "snapshot":
            self._snapshot = msg
        elif t == "error":
            self._got_error = True
            stale = msg.get("s")
            if (msg.get("code") == "stale_step" and isinstance(stale, int)
                    and not isinstance(stale, bool) and stale > self._acked):
                self._acked = stale  # answered as already seen: nothing to apply, no wait
                if stale >= self._reported:
                    self._late = False
            if msg.get("retry"):  # out of descriptors, say: it tries again later
                self._warn("unavailable", f"lrctl: the controller cannot serve this run now "
                                          f"({msg.get('message')})")
            elif msg.get("fatal"):
                if self._attached:
                    self._warn("refused", f"lrctl: the controller refused this run "
                                          f"({msg.get('message')}); training continues at the "
                                          "last LR")
            elif self._awaiting_snapshot and msg.get("code") == "state_too_large":
                self._state_refused = True
                self._warn("state-too-large", f"lrctl: state_dict(): "
                                              f"{msg.get('message')!s:.400}")
            elif msg.get("code") != "stale_step" and not self._awaiting_snapshot:
                self._warn(f"error:{msg.get('code')}",
                           f"lrctl: the controller says: {msg.get('message')}")

    def _on_lr(self, msg: dict[str, Any]) -> None:
        s = msg.get("s")
        self._take_lrs(msg, s)
        if not isinstance(s, int):
            return
        if s < 0 or s > self._acked:  # fresh: its decisions are new
            for d in msg.get("d") or ():
                if isinstance(d, dict):
                    self._records.append(d)
                    action = d.get("action")
                    if self._rollbacks is not None and action == "rollback":
                        self._rollbacks.on_decision(d, self._dist.world_size > 1)
                    elif action in NOTICES:  # a policy that cannot act as configured
                        policy = f"{d.get('policy')!s:.80}"
                        self._warn(f"notice:{action}:{policy}", f"lrctl: policy {policy}: "
                                                                f"{d.get('reason')!s:.400}")
        if s > self._acked:
            self._acked = s
            if s >= self._reported:
                # Caught up (also when step() itself read this answer, and no pre-step
                # hook saw the answers due): a late answer may be waited for again.
                self._late = False
        if s == self._reported and s == self._step - 1 and msg.get("skip") is True:
            # The verdict on the step being taken (sync; async answers come a step later,
            # when the step they judge has run: a flag then would skip the next, good one).
            self.should_skip = True
            if self.sync:
                self._guard.veto()  # in time for this step's optimizer.step(): carry it out
        if msg.get("stop") is True:
            self.should_stop = True

    def _take_lrs(self, msg: dict[str, Any], s: Any) -> None:
        """The LRs of a ``welcome`` or an ``lr`` answer to step ``s`` (``None``, -1: a push),
        held until the optimizer step they are meant for; and the run's mode."""
        lrs = msg.get("lrs")
        if isinstance(lrs, list) and len(lrs) == len(self._target):
            values = _lr_values(lrs)
            if values is not None:
                if isinstance(s, int) and s > self._usable_step():
                    self._held[s] = values  # for the optimizer step after step s's
                elif self._reported_coming_step(s):
                    # Read after the coming optimizer step's report (during its send, a
                    # state_dict() before optimizer.step()), and not in what the controller
                    # records for that step: it applies a step later, as recorded.
                    self._held.clear()
                    self._held[self._step - 1] = values
                else:
                    self._held.clear()  # an operator push or reload supersedes them
                    self._target = values
        mode = msg.get("mode")
        if isinstance(mode, str):
            self.mode = mode

    def _reported_coming_step(self, s: Any) -> bool:
        """Whether LRs read now, for step ``s`` (a push: None or -1), are for the optimizer
        step after the coming one: async, in torch's order, the coming step reported, and
        its report said its LRs (see Reporting._finalize), or they are a push read after
        the answer to that report (the controller recorded the step before it took the
        push; a push that comes first was taken first, and the step records it)."""
        if self.sync or self._after_order or self._reported != self._step - 1 or self._step < 1:
            return False
        if self._frozen == self._step - 1:
            return True
        return (not isinstance(s, int) or s < 0) and self._acked >= self._reported

    def _adopt_initial(self, initial: Any) -> None:
        """The run's initial LRs, as the welcome gives them: a resume by run key after
        ``optimizer.load_state_dict()`` attached with the checkpoint's LRs as its own, and
        the multipliers (``base="loop"``) and ``state_dict()`` go by the run's."""
        if not isinstance(initial, list) or len(initial) != len(self._initial):
            return
        values = [float_in(v, "initial_lrs") for v in initial]
        if values != self._initial and all(math.isfinite(v) and v >= 0 for v in values):
            self._initial = values
            self._writer.initial = list(values)

    def _token(self) -> str | None:
        """The run's resume token, as the latest welcome gave it."""
        link = self._link
        token = link.hello.get("resume_token") if link is not None else None
        return token if isinstance(token, str) else self._resume_token

    def _fetch_session(self) -> dict[str, Any] | None:
        """The controller's state of this run after every step reported so far."""
        link = self._link
        self._state_refused = False  # (the controller says why it cannot answer)
        if link is None or not link.connected:
            if self._dist.rank == 0:
                closed = self._closed
                self._warn("state-offline", "lrctl: state_dict() " + (
                    "after close() (or after leaving the 'with' block) holds only the run key "
                    "and step: call it while the run is attached" if closed else
                    "without a controller holds only the run key and step") + "; a resume "
                    "then relies on the controller's own checkpoint")
            return None
        self._flush_pending()  # every="auto": held steps are part of the run's state
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


def _lr_values(lrs: list[Any]) -> list[float] | None:
    """An answer's LRs as floats, or None unless each is finite and >= 0 (the usual
    compact answer's list as it is: one pass, no copy; it runs every step)."""
    for v in lrs:
        if type(v) is not float or not 0.0 <= v < math.inf:
            break
    else:
        return lrs
    values = [float_in(v, "lrs") for v in lrs]
    return values if all(math.isfinite(v) and v >= 0 for v in values) else None
