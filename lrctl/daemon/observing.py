"""The controller's hot path: an observation in, its answer out (a mixin of
:class:`~lrctl.daemon.server.Server`, whose attributes these are).

An observation is checked (step, loss, grad norm, metrics, the held steps of a
batched ``obs``), observed by its run's session, recorded in the sink (the
journal, then MLflow), noted for the run's next checkpoint, and answered with the
run's LRs; a plain answer with no decision goes out as pre-encoded bytes, without
``json.dumps``. ``snapshot`` (the run's state for ``ctl.state_dict()``) is answered
here too.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import Any

from ..policy import ObservationError
from ..policy._capacity import held_values
from ..policy._inputs import check_metrics
from ..wire.compact import encode_lr_compact
from ..wire.errors import ProtocolError
from ..wire.frames import MAX_HELLO, encode
from ..wire.messages import (
    encode_lr,
    float_in,
    gap_used,
    get_int,
    late_steps,
    lr_list,
    prior_steps,
    prior_used,
)
from . import operator
from .checkpoints import Checkpoints
from .conn import Conn
from .guarded_sink import GuardedSink
from .session import Session, Step
from .transport import Transport

__all__ = ["Observing"]

_NO_METRICS: Mapping[str, float] = MappingProxyType({})


class Observing:
    """See the module docstring."""

    sessions: dict[str, Session]
    transport: Transport
    sink: GuardedSink
    checkpoints: Checkpoints
    _last_seen: dict[str, float]
    decided: int  # replies that carried decisions (the runs table's generation)
    _now: float

    # -- the hot path ------------------------------------------------------------------
    def _snapshot(self, conn: Conn) -> None:
        """The run's state for the user's checkpoint (``ctl.state_dict()``)."""
        session = self.sessions.get(conn.run or "")
        if session is None:
            raise ProtocolError("snapshot before hello", "bad_message")
        # A state found too large is not encoded again (tens of milliseconds on the loop
        # for each request) until its policies hold fewer values (a reload).
        held = sum(map(held_values, session.engine.policies))
        too_large = session.snapshot_too_large_at
        try:
            if too_large is not None and held >= too_large:
                raise ProtocolError("known too large")
            frame = encode({"t": "snapshot", "s": session.last_step,
                            "session": session.to_state()}, MAX_HELLO)
        except ProtocolError:  # (a hello carries it back: the same limit binds both ways)
            session.snapshot_too_large_at = held
            raise ProtocolError(
                f"the run's state is larger than {MAX_HELLO >> 20} MiB (its policies' "
                "windows: a shorter window or patience fits), so the checkpoint holds the "
                "hook's state alone, and a resume from it relies on the controller's own "
                "checkpoint of the run", "state_too_large") from None
        session.snapshot_too_large_at = None
        self.transport.send_frame(conn, frame)

    def _obs(self, conn: Conn, msg: Mapping[str, Any]) -> None:
        """One observation: the hot path (a plain one allocates next to nothing here)."""
        key = conn.run
        if key is None:
            raise ProtocolError("obs before hello", "bad_message")
        session = self.sessions.get(key)
        if session is None:
            raise ProtocolError(f"run {key} is no longer served; reconnect", "no_such_run")
        self._last_seen[key] = self._now
        step = msg.get("s")
        if type(step) is not int or not 0 <= step <= 2**62:
            step = get_int(msg, "s")  # raises the error that names the problem
            assert step is not None
        loss = msg.get("l")
        grad = msg.get("g")
        raw_metrics = msg.get("m")
        metrics: Mapping[str, float] = _NO_METRICS
        if raw_metrics:
            if not isinstance(raw_metrics, dict):
                raise ProtocolError("m must be an object of named metrics", "bad_message")
            metrics = {str(k): float_in(v, f"metric {k!r:.40}") for k, v in raw_metrics.items()}
        # The step whose weights the metrics measured (the loop's last before report()).
        metrics_step = None if msg.get("ms") is None else get_int(msg, "ms", lo=-1, hi=step)
        # The hook carried out a rollback before this step: the snapshot step it restored.
        restored = None if msg.get("r") is None else get_int(msg, "r", hi=step)
        prior = prior_steps(msg, step)  # every="auto": the steps held back, oldest first
        # The run's end: metrics reported after its last step, on a step that never runs
        # (the policies see them; the record gets no LRs or statistics for that step).
        end = msg.get("e") is not None and get_int(msg, "e", lo=1, hi=1) == 1
        if msg.get("a") == 1:  # the hook reports its steps after their optimizer steps
            session.engine.steps_ran = True  # (for this connection: see its hello)
        if step <= session.last_step:
            # A replay that overlaps what the restored session has seen, or a hook counting
            # from behind it: answered (with its step, so the hook waits for it no longer),
            # not applied.
            self.transport.send(conn, {"t": "error", "code": "stale_step", "s": step,
                                       "fatal": False, "message": f"step {step} already "
                                       f"observed (last step {session.last_step})"})
            return
        try:
            # (A float that is not finite came as a number too large: float_in refuses it.)
            loss = None if loss is None else loss if (
                type(loss) is float and loss - loss == 0.0) else float_in(loss, "loss")
            grad = None if grad is None else grad if (
                type(grad) is float and grad - grad == 0.0) else float_in(grad, "grad_norm")
            # The LRs the optimizer used at this step: an async hook applies the answer to
            # step t at step t + 1 (so step t ran on what was decided before it); a sync
            # hook waits for the answer to t and applies it to t's own optimizer step. An
            # async hook's report says what its step ran on where it knows (u: see
            # lrctl._lr_history), which the record follows.
            groups = len(session.engine.initial_lrs)
            given = msg.get("u")
            used = (lr_list(given, groups, "u") if given is not None
                    else None if session.sync else session.lrs())
            # every=N: where the LRs changed in the steps since the last report
            gap = gap_used(msg, session.last_step, step, groups) if "gu" in msg else None
            if (gap is None and given is None and used is not None
                    and step > session.last_step + 1 > 0):
                # An async every=N hook that says neither (more than MAX_USED groups, an
                # older hook): it applies the answer to its last report from the step after
                # that report, so the LRs of the steps between changed there, if at all.
                gap = [(session.last_step + 1, used)]
            base = msg.get("b")
            if base is not None:  # base="loop": the loop's own LRs, scaled by lrctl's
                base = session.loop_base = lr_list(base, groups, "b")
            if metrics and prior:  # the frame is refused whole, before its held steps move
                metrics = check_metrics(metrics)  # the LRs (their decisions would be lost)
            held = self._observe_held(
                key, session, prior, prior_used(msg, len(prior), groups)
                or [None if session.sync else session.lrs()] * len(prior)) if prior else None
            # A sync hook says what a step ran on only once it has run (a replay): a skip
            # decided on it is recorded as advisory.
            result = session.observe(step, loss, grad, metrics, metrics_step,
                                     session.sync and given is not None)
        except ObservationError as exc:
            raise ProtocolError(str(exc), "bad_observation") from None
        if msg.get("o") is True:
            session.overflows += 1  # a GradScaler overflow: counted, never divergence
        if restored is not None:
            result.decisions.append(session.rolled_back(step, restored))
            session.engine.restored(step)  # step + 1's loss is the restored weights' own
        used = result.lrs if used is None else used
        if base is not None:
            used = session.used_lrs(used, base)
        if gap:
            for changed, lrs in gap:
                self.sink.lr_change(key, changed, lrs)
        if not end or loss is not None or grad is not None:
            self.sink.observation(key, step, loss, grad, used)
            # (what a sync hook's late may correct: see _late)
            session.recorded_step, session.recorded_used = step, used
            session.recorded_stats, session.recorded_decisions = (loss, grad), result.decisions
        for d in result.decisions:
            self.sink.decision(key, {**d, "wall_time": time.time()})
        self.checkpoints.observed(key, session, self._now)
        decisions, stop = result.decisions, result.stop
        if held is not None:  # (their decisions journaled with their steps, above)
            decisions, stop = held.decisions + decisions, stop or held.stop
        if session.unsent:  # records made since the last answer (see _late)
            decisions, session.unsent = session.unsent + decisions, []
        self.reply(conn, session, step, result.lrs, decisions, result.skip, stop)

    def _late(self, conn: Conn, msg: Mapping[str, Any]) -> None:
        """A sync hook's steps that ran without their answer (its wait for it ran out, or
        it did not wait while the answers were late: a stalled controller), each with the
        LRs it ran on, told before its next report: the observation just recorded was
        recorded with the LRs decided for it, and a skip decided for it as carried out.
        Its LR points are logged again, as it ran (later: where a step has two points, the
        later one stands), and what of its answer did not reach it is recorded
        (``not_applied``, policy ``hook``), a record of its own: the journal is
        append-only. A step other than the last recorded (a replay said what it ran on:
        ``u``; a restarted controller) is left as recorded."""
        key = conn.run
        if key is None:
            raise ProtocolError("late before hello", "bad_message")
        session = self.sessions.get(key)
        if session is None:
            raise ProtocolError(f"run {key} is no longer served; reconnect", "no_such_run")
        for step, lrs in late_steps(msg, len(session.engine.initial_lrs)):
            if step != session.recorded_step:
                continue
            session.recorded_step = -1  # (corrected once)
            ran = session.used_lrs(lrs, session.loop_base)
            if ran != session.recorded_used:
                self.sink.lr_ran(key, step, ran)
            record = session.not_applied(step, ran)
            if record is not None:
                self.sink.decision(key, {**record, "wall_time": time.time()})
                session.unsent.append(record)  # (the hook hears of it with the next answer)

    def _observe_held(self, key: str, session: Session,
                      prior: list[tuple[int, float | None, float | None]],
                      used: Sequence[list[float] | None]) -> Step:
        """The held steps of a batched ``obs``, each observed in order; ``used``: the LRs
        each ran on, as the hook says (``pu``), else those in effect before the frame."""
        held = Step([], [], False, False)
        for (s, loss, grad), lrs in zip(prior, used, strict=True):
            if s <= session.last_step:
                continue  # a replay overlapping what a restored session has seen
            result = session.observe(s, loss, grad, _NO_METRICS, None,
                                     session.sync and lrs is not None)
            self.sink.observation(key, s, loss, grad, result.lrs if lrs is None else lrs)
            for d in result.decisions:  # recorded beside their step (its loss and grad norm)
                self.sink.decision(key, {**d, "wall_time": time.time()})
            held.decisions += result.decisions
            held.stop = held.stop or result.stop
        return held

    def reply(self, conn: Conn, session: Session, step: int, lrs: list[float],
              decisions: list[dict[str, Any]], skip: bool, stop: bool) -> None:
        if not decisions:  # (the usual reply; one with decisions changes `lrctl runs`)
            frame = (encode_lr_compact if conn.compact else encode_lr)(
                step, lrs, skip, stop, session.mode, session.saved_step)
            if frame is not None:  # the usual reply, the same bytes without json.dumps
                self.transport.send_frame(conn, frame)
                return
        self.decided += 1
        per_frame = operator.MAX_DECISIONS_PER_FRAME
        for i in range(0, max(len(decisions), 1), per_frame):
            self.transport.send(conn, {"t": "lr", "s": step, "lrs": lrs, "skip": skip,
                                       "stop": stop, "mode": session.mode,
                                       "saved_step": session.saved_step,
                                       "d": decisions[i:i + per_frame]})
