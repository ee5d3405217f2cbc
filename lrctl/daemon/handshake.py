"""A hook's hello, answered: which session it joins, built off the loop, and who may take
a connected run over.

* A run in memory whose hook reconnects is answered at once: nothing to parse.
* Otherwise the session is built on the :class:`~.session_builder.SessionBuilder`'s
  thread, within ``Limits.hello_budget_s``: from the run's state in the hello (a resume
  from the user's checkpoint, ``ctl.state_dict()``), else from its checkpoint on disk
  (a run evicted from memory), else new from the policy text. The loop serves everyone
  else meanwhile; what the hook sends before its welcome waits, undecoded (``Conn.decoder``), and
  another hello for the same run is refused until this one is answered.
* **Taking a run over.** Every run has a random *resume token*, handed to its hook in
  the welcome (``resume_token``) and kept in the run's checkpoint and state. A hello
  for a run whose hook is still connected is refused (``run_conflict``) unless it shows
  that token: the same hook reconnecting before the controller saw its old connection
  close, or a resume from ``ctl.state_dict()`` while the old process hangs on. The
  displaced connection is told ``run_taken_over`` (its hook stops reconnecting) and the
  token changes. A run whose hook is gone is resumed by its key alone, as always.
"""

from __future__ import annotations

import dataclasses
import functools
import hmac
import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from .._version import __version__
from ..config import ConfigError, parse_text
from ..sinks.journal import RunPaths, tail_records
from ..wire.errors import ProtocolError
from .hello import Hello, parse_hello
from .session import Session, new_resume_token, text_sha256
from .session_builder import BuildJob, SessionBuilder
from .transport import Conn, Refused, Unavailable

if TYPE_CHECKING:
    from .server import Server

__all__ = ["Handshakes"]

log = logging.getLogger("lrctl.daemon")


class Handshakes:
    """The hellos of ``server``'s connections."""

    def __init__(self, server: Server) -> None:
        self.server = server
        limits = server.limits
        self.budget_s = limits.hello_budget_s
        self.pending: dict[str, BuildJob] = {}  # run key -> the hello being answered
        self.builder = SessionBuilder(self._build, budget_s=limits.hello_budget_s,
                                      max_pending=limits.max_pending_hellos,
                                      max_bytes=limits.max_pending_hello_bytes,
                                      notify=server.transport.wake)

    # -- on the loop -------------------------------------------------------------------
    def hello(self, conn: Conn, msg: Mapping[str, Any]) -> None:
        if conn.run is not None or conn.pending:
            raise ProtocolError("hello sent twice on one connection", "bad_message")
        hello = parse_hello(msg)
        key = hello.run
        if key in self.pending:
            raise Refused(f"run {key}: another hello for it is being answered", "run_conflict")
        takeover = self._takeover(conn, hello)
        session = self.server.sessions.get(key)
        foreign = self.server.state_watch.foreign
        if session is not None and (hello.session is None or _adopted(session, hello)) and (
                foreign is None or hello.mlflow_run_id in (None, session.info.mlflow_run_id)):
            # (Another controller's directory: a rejoin whose records would open there, a
            # resumed job's own MLflow run, is refused as a new run is, below.)
            self._join(conn, hello, session, True, takeover)
            return
        refused = self.server.state_watch.error
        if refused is not None:  # a new run's files would go through what is there now
            raise Unavailable(f"{refused}; no new run starts here until it is fixed")
        job = BuildJob(conn, hello, takeover, size=conn.decoder.last_size,
                       ended=self.server.checkpoints.ended(key), held=session is not None)
        self.builder.submit(job)
        self.pending[key] = job
        conn.pending = True

    def _takeover(self, conn: Conn, hello: Hello) -> bool:
        """True when ``hello`` may take over a run served on another live connection (it
        shows the run's resume token); :class:`Refused` when it may not."""
        srv = self.server
        old = srv.conns.get(hello.run)
        if old is None or old is conn:
            return False
        # Its hook may have hung up a moment ago (a reconnect, a process restarted from
        # its checkpoint): apply what it sent, and see.
        if not srv.transport.still_open(old) or srv.conns.get(hello.run) is not old:
            return False
        token = srv.sessions[hello.run].resume_token
        if hello.resume_token is not None and hmac.compare_digest(
                hello.resume_token.encode("utf-8"), token.encode("utf-8")):
            return True
        raise Refused(f"run {hello.run} is being served to another connection; a hello for it "
                      "must show the run's resume token (its own hook's reconnect, or "
                      "attach(resume=ctl.state_dict())). Two scripts with one run name? Give "
                      "each its own", "run_conflict")

    def finished(self) -> None:
        """Answer the hellos whose sessions the worker has built (the loop was woken)."""
        for job in self.builder.finished():
            if self.pending.get(job.hello.run) is not job:
                self._unprepare(job)  # its connection closed, or it was refused as too slow
                continue
            del self.pending[job.hello.run]
            transport = self.server.transport
            transport.call(job.conn, "hello", functools.partial(self._built, job))
            transport.resume(job.conn)

    def _built(self, job: BuildJob) -> None:
        conn, hello, result = job.conn, job.hello, job.result
        if conn.sock.fileno() < 0:
            self._unprepare(job)
            return
        if isinstance(result, Exception):
            raise result
        assert result is not None
        session, restored = result
        srv = self.server
        rewound = None
        from_state = hello.session is not None and not job.adopted
        if restored and from_state:
            rewound = _rewound(srv.sessions.get(hello.run), session, job.prior)
        if restored:
            _follow_mlflow(session, hello)  # opened below with the job's MLflow run
            srv.adopt(hello.run, session)
            if from_state:
                session.adopted = hello.session_id
                srv.sink.rewind(hello.run, session.last_step)  # its records go on from here
                srv.checkpoints.save(hello.run)
                log.info("run %s resumed from the hook's saved state at step %d", hello.run,
                         session.last_step)
            else:
                log.info("run %s restored from disk at step %d", hello.run, session.last_step)
        else:
            session.watch = hello.watch
            session.engine.start_at(hello.start_step)  # the welcome's LRs: its first step's
            srv.start(session)
            # A run rejoined by key after its end (its checkpoint gone) starts afresh at the
            # hook's first step: its journal goes on from there, as after a resume from an
            # earlier state, not dropping the steps (and decisions) it already had as replays.
            # Not a reconnect (it shows the token of its welcome): its hello is the one its
            # hook first sent, start_step and all, and the loop is where it was; a rewind to
            # that start_step would have readers of the journal drop every step it had.
            if hello.resume_token is None:
                srv.sink.rewind(hello.run, hello.start_step - 1)
        self._join(conn, hello, session, restored, job.takeover)
        if rewound is not None:
            log.info("run %s: %s", hello.run, rewound["reason"])
            srv.publish(session, rewound)
        if job.reloaded is not None:  # the checkpoint's policy, edited since: journaled
            log.info("run %s: %s", hello.run, job.reloaded["reason"])
            srv.publish(session, job.reloaded, True)

    def _join(self, conn: Conn, hello: Hello, session: Session, restored: bool,
              takeover: bool) -> None:
        """``conn``'s hook joins ``session``: checked, registered, welcomed."""
        srv = self.server
        key = hello.run
        if text_sha256(hello.policy_text) not in (session.hello_sha256,
                                                  session.info.policy_sha256):
            # After a live reload the hook still sends the text it started with.
            raise Refused(f"run {key} exists with another policy ({session.info.policy_source}"
                          f", sha256 {session.info.policy_sha256[:12]}): attach with that "
                          "policy to rejoin it, or resume from its ctl.state_dict() to go on "
                          "under this one (a reload)", "run_conflict")
        initial = list(session.engine.initial_lrs)
        if len(initial) != len(hello.lrs):
            raise Refused(f"run {key} has {len(initial)} param group(s), this optimizer "
                          f"{len(hello.lrs)}", "run_conflict")
        if initial != hello.lrs:
            # attach(resume=run_key) after optimizer.load_state_dict(): the groups hold the
            # checkpoint's LRs, not the run's initial ones. The run's stand (the welcome
            # tells the hook), so its schedules and multipliers go on from where they were.
            log.info("run %s rejoined with LRs %s in its optimizer; its initial LRs %s "
                     "stand", key, hello.lrs, initial)
        if hello.total_steps is not None and hello.total_steps != session.total_steps:
            # A run resumed with a new length (max_steps raised): the anneal follows it.
            log.info("run %s: total_steps %s -> %d", key, session.total_steps,
                     hello.total_steps)
            session.set_total_steps(hello.total_steps)
            srv.checkpoints.save(key)
        session.sync = hello.sync  # which LRs the optimizer used at a step (see _obs)
        session.engine.steps_ran = hello.ran  # (else its first report after the order says)
        # The hook can roll back (or no longer), to the snapshots it holds.
        session.set_snapshots(hello.snapshots, hello.snapshots_held)
        # A loop resumed past the run's last observed step (those steps never reached
        # it): the welcome's LRs are its first step's, as for a new run's start_step. Not
        # when they are only the steps an every=N hook does not report: its LRs between
        # reports are those decided at the last one, and so are a resumed run's.
        if session.last_step < 0 or hello.start_step > session.last_step + hello.every:
            session.engine.start_at(hello.start_step)
        if _follow_mlflow(session, hello):  # a live session rejoined by a resumed job
            srv.open_records(session)
            srv.checkpoints.save(key)
        srv.heard(key)
        old = srv.conns.get(key)
        if old is not None and old is not conn:
            if takeover:
                session.resume_token = new_resume_token()  # the old hook cannot take it back
                srv.checkpoints.save(key)
                log.warning("run %s taken over by a hello with its resume token", key)
                srv.transport.fail(old, "run_taken_over", f"run {key} was taken over by "
                                   "another connection with its resume token (a resume from "
                                   "ctl.state_dict()); this one trains on at its last LRs")
            else:
                log.info("run %s reconnected; dropping its old connection", key)
                srv.transport.close_conn(old, save=False)
        if conn.sock.fileno() < 0 or conn.failed:
            # Told to go while its hello was answered (it sent too much meanwhile), or
            # closed as the old one's replies went out (Limits.max_outbuf_total): not
            # registered for the run; its hook comes back. (One that only ended its input
            # is answered: what it sent is handled first.)
            return
        conn.run = key
        conn.paceable = hello.pace
        conn.every = hello.every
        srv.conns[key] = conn
        welcome = {"t": "welcome", "version": __version__, "run": key,
                   "last_step": session.last_step, "saved_step": session.saved_step,
                   "lrs": session.lrs(), "initial_lrs": initial, "mode": session.mode,
                   "restored": restored, "policy_sha256": session.info.policy_sha256,
                   "resume_token": session.resume_token,
                   "used": 1,  # it records the LRs a report says its step ran on (u, pu)
                   "late": 1}  # and reads late: the steps that ran without their answer
        if hello.compact:
            welcome["compact"] = 1  # either side may now send the per-step frames compact
        srv.transport.send(conn, welcome)
        conn.compact = hello.compact  # (after the welcome: its answers follow it)

    def _unprepare(self, job: BuildJob) -> None:
        """A new run's records prepared by the worker (see ``_build``) are not needed."""
        if isinstance(job.result, tuple) and not job.result[1]:
            self.server.sink.discard_prepared(job.result[0].info)

    def dropped(self, conn: Conn) -> None:
        """``conn`` closed: its hello, if pending, is not answered."""
        if conn.pending and conn.run is None:
            for key, job in list(self.pending.items()):
                if job.conn is conn:
                    del self.pending[key]

    def expire(self, now: float) -> None:
        """Refuse hellos whose session takes too long: one whose policy the worker has
        parsed for past twice the budget (a stuck plugin), or one waiting (behind such, or
        for a slow disk to open its files) for ten budgets, retryably."""
        for key, job in list(self.pending.items()):
            waited = now - job.submitted
            if (job.started is not None and not job.parsed
                    and now - job.started > 2 * self.budget_s):
                error: Refused = Refused(f"run {key}: its policy took longer than "
                                         f"{self.budget_s:g} s to build", "bad_policy")
            elif waited > 10 * self.budget_s:
                error = Unavailable(f"run {key}: the controller is busy answering other hellos")
            else:
                continue
            del self.pending[key]
            self.server.transport.fail(job.conn, error.code, str(error), retry=error.retry)

    def stop(self) -> None:
        self.builder.stop()

    # -- on the worker thread ----------------------------------------------------------
    def _prior(self, key: str, resumed_at: int) -> tuple[int, list[dict[str, Any]]] | None:
        """How far the run had got (its checkpoint on disk, else, for a run that ended, its
        journal's last sample), and the journal's decisions after ``resumed_at`` up to
        there (for a run no longer in memory; see :func:`_rewound`)."""
        store, paths = self.server.store, RunPaths.of(self.server.state_dir, key)
        store.reattach(key)  # (evicted: set aside; the hook's state replaces it from now)
        try:
            seen = store.read_file(store.path(key))["engine"]["last_step"]
        except (OSError, ValueError, KeyError, TypeError):
            seen = max((p[2] for r in tail_records(paths.stream("metrics"))
                        for p in r.get("points", ()) if isinstance(p, list) and len(p) == 3
                        and isinstance(p[2], int)), default=None)
        if not isinstance(seen, int) or seen <= resumed_at:
            return None
        stream = paths.stream("decisions")
        undone = [r for r in tail_records(stream) if isinstance(r.get("step"), int)
                  and resumed_at < r["step"] <= seen and isinstance(r.get("action"), str)]
        return seen, undone

    def _adopted_on_disk(self, hello: Hello) -> Session | None:
        """The run from its checkpoint (set aside after an eviction, too) when that was
        last resumed from ``hello``'s saved state (see :func:`_adopted`), else None."""
        store = self.server.store
        try:
            store.reattach(hello.run)
            state = store.load(hello.run)
            if state is None or state.get("adopted_session") != hello.session_id:
                return None
            return Session.restore(state)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.error("cannot restore run %s: %s", hello.run, exc)
            return None

    def _build(self, job: BuildJob) -> tuple[Session, bool]:
        """The session ``job``'s hello joins, and whether it was restored. Touches nothing
        the loop owns (the store reads a file that no one writes while the run is out of
        memory)."""
        hello = job.hello
        if (hello.session is not None and hello.session_id is not None and not job.ended
                and not job.held):
            held = self._adopted_on_disk(hello)
            if held is not None:
                job.adopted = True
                return held, True
        if hello.session is not None:
            session, job.reloaded = _from_hook(hello)
            job.prior = self._prior(hello.run, session.last_step)
            return session, True
        try:
            state = None if job.ended else self.server.store.load(hello.run)
            if state is not None:
                return Session.restore(state), True
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.error("cannot restore run %s: %s", hello.run, exc)
        try:
            session = Session.create(
                key=hello.run, run_name=hello.run_name, policy_text=hello.policy_text,
                policy_source=hello.policy_source, lrs=hello.lrs,
                world_size=hello.world_size, total_steps=hello.total_steps,
                mlflow_run_id=hello.mlflow_run_id, tracking_uri=hello.tracking_uri,
                cwd=hello.cwd)
        except ConfigError as exc:
            raise Refused(str(exc), "bad_policy") from None
        job.parsed = True  # a slow disk from here on is not the policy's fault
        # Its files too (the loop's open_run then only registers them): a dozen
        # filesystem calls that take milliseconds on a busy disk.
        self.server.sink.prepare_run(session.info)
        return session, False


def _adopted(session: Session, hello: Hello) -> bool:
    """Whether ``hello``'s saved state is the one ``session`` was last resumed from: the
    same hook reconnecting (a dropped connection, a controller restarted, which restored
    the run from its own checkpoint). The run went on from that state, and the hook
    replays what it sent since, so it is joined as it is: taking the state again would
    take the run back to it, and the audit would call the steps since undone."""
    return hello.session_id is not None and session.adopted == hello.session_id


def _follow_mlflow(session: Session, hello: Hello) -> bool:
    """A resumed job that logs to an MLflow run of its own (the Hugging Face Trainer
    opens a new one on every resume): the run's records follow it (see
    :meth:`~lrctl.sinks.audit.AuditSink.open_run`). True if the session's target moved."""
    if hello.mlflow_run_id is None or hello.mlflow_run_id == session.info.mlflow_run_id:
        return False
    session.info = dataclasses.replace(session.info, mlflow_run_id=hello.mlflow_run_id,
                                       tracking_uri=hello.tracking_uri)
    return True


def _rewound(held: Session | None, resumed: Session,
             prior: tuple[int, list[dict[str, Any]]] | None) -> dict[str, Any] | None:
    """The ``resumed`` decision when the run the controller ``held`` in memory (else, as
    its checkpoint and journal on disk left it: ``prior``) had seen steps after the
    checkpoint's (the training process died after it): those steps, and the decisions
    made there, are undone, and the audit trail says so."""
    if held is not None:
        seen = held.last_step
        undone = [d.to_dict() for d in held.engine.decisions if d.step > resumed.last_step]
    elif prior is not None:
        seen, undone = prior
    else:
        return None
    if seen <= resumed.last_step:
        return None
    return resumed.rewound(seen, undone)


def _from_hook(hello: Hello) -> tuple[Session, dict[str, Any] | None]:
    """The run as the user's checkpoint left it (``ctl.state_dict()``): it replaces whatever
    the controller holds for the run, which may have seen later steps before the training
    process died. A policy edited since the checkpoint (a live edit of its file after it,
    or a new version in the resumed script) is then reloaded as a live edit would be: the
    reload decision is returned, to be published once the hook has joined."""
    state = hello.session
    assert state is not None
    if state.get("run") != hello.run:
        raise Refused(f"the saved state is of run {state.get('run')!r:.100}, not "
                      f"{hello.run}", "run_conflict")
    try:
        session = Session.restore(state)
    except Exception as exc:  # the peer's data: any failure refuses it, nothing else
        raise Refused(f"the saved lrctl state of run {hello.run} is not usable: "
                      f"{exc!r:.300}", "bad_state") from None
    if list(session.engine.initial_lrs) != hello.lrs:
        raise Refused(f"the saved state of run {hello.run} has other initial LRs "
                      f"({list(session.engine.initial_lrs)}) than this optimizer's "
                      f"({hello.lrs})", "run_conflict")
    if text_sha256(hello.policy_text) in (session.hello_sha256, session.info.policy_sha256):
        return session, None
    try:
        policy = parse_text(hello.policy_text, hello.policy_source)
        decision = session.reload(policy)
    except (ConfigError, ValueError) as exc:
        raise Refused(f"run {hello.run}: the saved state cannot take this policy: {exc}",
                      "bad_policy") from None
    session.hello_sha256 = policy.sha256  # the text this hook sends on its reconnects
    return session, decision
