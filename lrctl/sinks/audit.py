"""The controller's default sink: the durable journal first, then MLflow.

Every call runs on the controller's owner thread and costs a JSON encode and a
buffered write. Decisions and policy events are made durable by :meth:`AuditSink.commit`
(group commit: one fsync per journal file however many lines it took since the
last commit), and only then handed to MLflow, which is reached only through a
shipper: by default :class:`~lrctl.sinks.shipper_proxy.ShipperProcess`, a child
process that reads what the journal already holds (mlflow is never imported here).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..policy._base import float_to_json
from ..policy._decision import json_safe
from ._group_commit import GroupCommit
from ._held import HeldLines
from ._open_run import OpenRun, dedup_key, save_policy
from ._prepared import Preparations, PreparedRun, close_all, prepare_open
from ._run_sync import RunSync
from ._syncer import Syncer, SyncJob
from .base import RunInfo, Shipper, Sink
from .journal import (
    DISCARDED,
    JournalLine,
    StreamWriter,
    atomic_write_json,
    atomic_write_text,
    private_dirs,
    sync_all,
)
from .sampling import MetricSampler
from .shipper_proxy import ShipperProcess

__all__ = ["AuditSettings", "AuditSink"]

log = logging.getLogger("lrctl.sinks")


@dataclass(frozen=True)
class AuditSettings:
    """Knobs of the audit trail (``lrctl serve`` options)."""

    log_every: int = 50  # LR, loss and grad-norm points between changes, in steps
    experiment: str = "lrctl"  # where lrctl creates runs when the script has none
    mlflow: bool = True  # False: journal only
    flush_interval: float = 1.0  # seconds; MLflow sees a record within about this
    queue_size: int = 10_000  # journal lines buffered in memory before spilling
    timeline: bool = True  # draw lrctl/timeline.png at run end
    backoff_max: float = 30.0  # seconds between retries while MLflow is down


class AuditSink(GroupCommit, RunSync, Sink):
    """Journals every record under ``state_dir`` and ships it to MLflow in the background.

    ``env`` (default ``os.environ``) is where ``MLFLOW_TRACKING_URI`` is looked
    up when the hook passed no URI; ``shipper`` and ``fsync_fd`` (``os.fsync``) may be
    injected (tests).

    Decisions and policy events are durable once :meth:`commit` returns;
    :meth:`flush`, :meth:`close_run` and :meth:`close` commit first.
    """

    def __init__(self, state_dir: str | os.PathLike[str], settings: AuditSettings | None = None,
                 *, shipper: Shipper | None = None,
                 env: Mapping[str, str] | None = None,
                 fsync_fd: Callable[[int], None] = os.fsync) -> None:
        self.state_dir = Path(state_dir)
        self.settings = settings or AuditSettings()
        MetricSampler(self.settings.log_every)  # validate early, with the bad value
        self._env = os.environ if env is None else env
        self._fsync_fd = fsync_fd
        self._runs: dict[str, OpenRun] = {}
        # Appended to a durable stream since the last commit: each line with its writer.
        self._uncommitted: list[tuple[str, str, JournalLine, StreamWriter]] = []
        # Files (and directories) written by open_run without an fsync of their own: made
        # durable by the next commit, with the journal lines, before any is acknowledged.
        self._unsynced_paths: dict[Path, None] = {}
        # What a failing disk refused, written in order once it takes writes again;
        # runs ended meanwhile keep their writers open here until then.
        self._held = HeldLines(self.settings.queue_size)
        self._closing: dict[str, OpenRun] = {}
        # The state dir was made again and not every open run's files could be written
        # back yet (a full disk): a run that ends meanwhile waits in _closing, its files
        # open, so that the next try writes them back too.
        self._restore_due = False
        # A run's start and end made durable off the owner thread (see _syncer).
        self._syncer = Syncer(fsync_fd)
        # Runs opened by prepare_run on the hello worker, waiting for open_run to claim them.
        self._prepared = Preparations()
        self.shipper: Shipper | None = shipper
        if shipper is None and self.settings.mlflow:
            self.shipper = ShipperProcess(
                self.state_dir, flush_interval=self.settings.flush_interval,
                queue_size=self.settings.queue_size, timeline=self.settings.timeline,
                backoff_max=self.settings.backoff_max)
        if self.shipper is not None:
            self.shipper.recover()  # backlog of runs a previous controller left behind

    # -- Sink ------------------------------------------------------------------------
    def open_run(self, info: RunInfo) -> None:
        if info.run_key in self._runs:
            self._close_writers(self._runs.pop(info.run_key))
        if self._syncer.busy(info.run_key):  # its end in flight: shipped before it reopens
            self._syncer.wait(info.run_key)
            self._reap()
        if info.run_key in self._closing:
            self.tick()
            if info.run_key in self._closing:
                raise OSError(f"run {info.run_key}: its journal still has records the disk "
                              f"refused ({self._held.error})")
        prepared = self._prepared.take(info) or self._prepare(info)
        run = prepared.run
        run.fresh = prepared.last_event is None
        self._runs[info.run_key] = run
        fds, prepared.sync_fds = prepared.sync_fds, []
        try:
            if self.shipper is not None:
                self.shipper.attend(info.run_key, run.meta["mlflow"]["tracking_uri"])
            if prepared.last_event == "end":  # ended (or given up on) and now back
                self._append(run, "events", {"event": "resume", "wall_time": time.time(),
                                             "step": run.last_step})
            if prepared.follow is not None:
                self._append(run, "events", {"event": "follow", "wall_time": time.time(),
                                             "step": run.last_step, **prepared.follow})
            if run.policy_sha256 != info.policy_sha256:
                event = "open" if run.policy_version == 0 else "restore"
                self._policy_event(run, info, prepared.policy_file,
                                   {"event": event, "policy_sha256": info.policy_sha256})
        except BaseException:
            close_all(fds)  # the syncer never gets them
            raise
        self._unsynced_paths.update(dict.fromkeys(prepared.unsynced))
        self._start_sync(run, fds)

    def prepare_run(self, info: RunInfo) -> None:
        """Open a new run's files on the hello worker's thread (see :mod:`._prepared`);
        :meth:`open_run` then only registers it. Not for a run this sink has open or is
        ending: that one opens on the owner thread."""
        self._prepared.make(info, self._busy, self._prepare)

    def discard_prepared(self, info: RunInfo) -> None:
        """``info``'s hello was not answered after all: undo :meth:`prepare_run`."""
        self._prepared.discard(info)

    def _busy(self, run_key: str) -> bool:
        # (Called on the worker thread: membership tests of the owner thread's dicts are
        # atomic under the GIL, and a run only becomes open or ending on the owner thread
        # by open_run of this very run, which waits for its hello, hence this preparation.)
        return (run_key in self._runs or run_key in self._closing
                or self._syncer.busy(run_key))

    def hold_journal(self, run_key: str) -> bool:
        """(Owner thread) See :meth:`Sink.hold_journal`: not a run open or ending here,
        nor one the hello worker is preparing (which it does not start meanwhile)."""
        return self._prepared.hold(run_key, self._busy)

    def release_journal(self, run_key: str) -> None:
        self._prepared.release(run_key)

    def _prepare(self, info: RunInfo) -> PreparedRun:
        return prepare_open(self.state_dir, info, env=self._env,
                            experiment=self.settings.experiment,
                            log_every=self.settings.log_every, fsync_fd=self._fsync_fd)

    def observation(self, run_key: str, step: int, loss: float | None,
                    grad_norm: float | None, lrs: Sequence[float]) -> None:
        run = self._run(run_key)
        if run.last_step is not None and step <= run.last_step:
            return  # a replayed observation whose points are already journaled
        run.last_step = step
        points = run.sampler.observe(step, loss, grad_norm, lrs)
        if points:
            self._metrics(run, points)

    def lr_change(self, run_key: str, step: int, lrs: Sequence[float]) -> None:
        run = self._run(run_key)
        if run.last_step is not None and step <= run.last_step:
            return  # replayed: already journaled
        run.last_step = step
        points = run.sampler.lr_change(step, lrs)
        if points:
            self._metrics(run, points)

    def lr_ran(self, run_key: str, step: int, lrs: Sequence[float]) -> None:
        run = self._run(run_key)
        if run.last_step != step:
            return  # (only the last observed step's: see Sink.lr_ran)
        points = run.sampler.ran(step, lrs)
        if points:
            self._metrics(run, points, later=True)

    def decision(self, run_key: str, record: Mapping[str, Any]) -> None:
        run = self._run(run_key)
        step = int(record["step"])
        if step != run.decided_step:
            run.decided_step, run.decided_at_step = step, 0
        key = dedup_key(record, run.decided_at_step)
        run.decided_at_step += 1
        if step < run.journaled_step or (step == run.journaled_step
                                         and key in run.journaled_at_step):
            return  # re-made while replaying after a controller restart: already journaled
        if step > run.journaled_step:
            run.journaled_step, run.journaled_at_step = step, set()
        run.journaled_at_step.add(key)
        rec = dict(json_safe(record))
        rec.setdefault("wall_time", time.time())
        rec.setdefault("policy_sha256", run.policy_sha256)
        rec["policy_version"] = run.policy_version
        rec.pop("seq", None)
        self._append(run, "decisions", rec)
        points = run.sampler.decision(int(rec["step"]))
        if points:
            self._metrics(run, points)

    def rewind(self, run_key: str, step: int) -> None:
        """Observations and decisions after ``step`` are journaled again (see
        :meth:`Sink.rewind`): a resumed run's are new, though their steps were seen."""
        run = self._run(run_key)
        if run.last_step is not None and run.last_step > step:
            run.sampler.rewind(run.last_step)
            run.last_step, run.rewound_to = step, step
        if run.journaled_step > step:
            run.journaled_step, run.journaled_at_step = step, set()
            run.decided_step = -1

    def policy_changed(self, run_key: str, info: RunInfo, record: Mapping[str, Any]) -> None:
        run = self._run(run_key)
        policy_file = save_policy(run.paths, info)
        run.policy_texts[policy_file] = info.policy_text
        self._policy_event(run, info, policy_file, dict(record))

    def close_run(self, run_key: str) -> None:
        self._end(run_key, {})

    def discard_run(self, run_key: str) -> None:
        """Ended before its first observation: if its journal holds nothing else either
        (a journal this life began, no observation, no decision, an operator's or a
        reload's included), the journal says so (``outcome: discarded``), the shipper
        creates no MLflow run for it (and deletes one it had already created), and
        ``lrctl runs --all`` leaves it out. Any other run (rejoined after its end, or
        rewound to before its first step) ends as usual."""
        run = self._runs.get(run_key)
        if run is None or not run.fresh or run.last_step is not None or any(
                run.writers[s].seq for s in ("metrics", "decisions")):
            self.close_run(run_key)
            return
        log.info("run %s ended before its first step: discarded (no MLflow run)", run_key)
        self._end(run_key, {"outcome": DISCARDED})

    def drop_run(self, run_key: str, reason: str) -> None:
        """The hook is gone for good: end the run as orphaned, saying why (the MLflow
        run ends KILLED with the tag ``lrctl.end_reason``; a later resume reopens it)."""
        self._end(run_key, {"outcome": "orphaned", "reason": reason})

    def _end(self, run_key: str, extra: dict[str, Any]) -> None:
        run = self._runs.pop(run_key, None)
        if run is None:
            return
        # A record a reply waits for (a decision in this wake-up): committed here, as before.
        waited_for = any(w in run.writers.values() for *_, w in self._uncommitted)
        points = run.sampler.finish()
        if points:
            self._metrics(run, points)
        self._append(run, "events", {"event": "end", "wall_time": time.time(),
                                     "last_step": run.last_step, **extra})
        if self._restore_due or any(self._held.holds(w) for w in run.writers.values()):
            self._closing[run_key] = run  # closed once the disk has taken the rest
            return
        if waited_for:
            self._close_writers(run)
            return
        # Its last lines and the streams' fsyncs to the syncer, with their descriptors.
        self._hand_over(run, SyncJob(run_key, []), close=True)

    def restore(self) -> None:
        """The state dir was deleted and made again: each open run's files written back
        (meta and policies from memory, the streams from the files still held open, byte
        for byte, so the shipper's offsets hold)."""
        self._prepared.invalidate()  # their files went with the directory
        failed: OSError | None = None
        runs = [*self._runs.values(), *self._closing.values()]
        for run in runs:  # each run, each file, whatever the others' fate
            try:
                private_dirs(run.paths.policies)
                for sha, text in run.policy_texts.items():
                    if not run.paths.policy_file(sha).exists():
                        atomic_write_text(run.paths.policy_file(sha), text)
                if not run.paths.meta.exists():
                    atomic_write_json(run.paths.meta, run.meta)
            except OSError as exc:
                failed = failed or exc
            for writer in run.writers.values():
                try:
                    writer.restore_file()
                except OSError as exc:
                    failed = failed or exc
        self._restore_due = failed is not None
        if failed is not None:
            # (The controller calls this again every second until it succeeds: a state dir
            # deleted to make room frees nothing while its files are held open here, so
            # the first write-back often finds the disk full. Before, that one failure
            # was final: the journals went on into the deleted files and were lost.)
            raise OSError(failed.errno, "the journals of the open runs are not all written "
                          f"back yet ({failed.strerror or failed}); tried again every second")
        catch_up = getattr(self.shipper, "catch_up", None)
        if catch_up is not None:  # (it may have read their paths while no file was there)
            for run in runs:
                catch_up(run.paths.run_key)
            self.shipper.pass_on()  # type: ignore[union-attr]
        for key, run in list(self._closing.items()):  # those that ended meanwhile
            if not any(self._held.holds(w) for w in run.writers.values()):
                del self._closing[key]
                self._close_writers(run)
        log.info("journals of %d open run(s) written back", len(runs))

    def tick(self) -> None:
        """Retry what a failing disk refused, ship what the syncer made durable (the
        controller calls this once a second)."""
        if self._held:
            self.commit()
        self._reap()
        self._prepared.expire()

    def close(self, timeout: float = 0.5) -> None:
        """Controller shutdown: runs are not ended (their sessions come back on restart).

        Decisions and policy events are committed (durable) first. Then, within
        ``timeout`` seconds in all (a SIGTERM must end the controller within two seconds,
        whatever MLflow's state and however many runs): the metrics streams are fsynced,
        all at once, and MLflow takes what it can of the backlog; what it does not take
        stays in the journal for the next controller.
        """
        deadline = time.monotonic() + timeout
        self._prepared.clear()
        self.commit()
        self._syncer.wait(deadline=deadline)
        self._syncer.stop()
        self._reap()
        lost = sum(self._held.forget(w) for w in self._held.writers())
        if lost:
            log.error("shutdown: %d journal record(s) lost: the disk still refuses writes",
                      lost)
        self._runs.update(self._closing)
        self._closing.clear()
        writers = [w for run in self._runs.values() for w in run.writers.values()]
        errors, left = sync_all(writers, deadline)
        if left:
            log.warning("shutdown: %d journal stream(s) not fsynced in time; their lines "
                        "are written and the OS writes them back", left)
        for w in writers:
            w.close(sync=False)
        self._runs.clear()
        if self.shipper is not None:
            self.shipper.close(max(0.05, deadline - time.monotonic()))
        if errors:
            raise errors[0]

    def status(self) -> dict[str, Any]:
        """The shipper's process (pid, state, restarts, resident memory), MLflow on; the
        journal's trouble with the disk, while it lasts (and what it cost)."""
        out: dict[str, Any] = {} if self.shipper is None else {"shipper": self.shipper.status()}
        if self._held.error or self._held.dropped:
            out["journal"] = {"error": self._held.error, "held": len(self._held),
                              "since": self._held.since, "dropped": self._held.dropped}
        return out

    def run_errors(self) -> dict[str, str]:
        return {} if self.shipper is None else self.shipper.run_errors()

    def flush(self, timeout: float = 10.0) -> bool:
        """Commit, then wait until MLflow has acknowledged everything so far (tests,
        orderly shutdown)."""
        self.commit()
        self._syncer.wait()
        self._reap()
        return True if self.shipper is None else self.shipper.flush(timeout)

    # -- internals -------------------------------------------------------------------
    def _run(self, run_key: str) -> OpenRun:
        try:
            return self._runs[run_key]
        except KeyError:
            raise KeyError(f"run {run_key!r} is not open in the audit sink; "
                           "call open_run(info) first") from None

    def _append(self, run: OpenRun, stream: str, record: dict[str, Any]) -> None:
        writer = run.writers[stream]
        for line in self._held.append(writer, record):
            self._written(run.paths.run_key, stream, line, writer)

    def _written(self, run_key: str, stream: str, line: JournalLine,
                 writer: StreamWriter) -> None:
        if stream != "metrics":  # durable: shipped once commit() has fsynced it
            self._uncommitted.append((run_key, stream, line, writer))
        elif self.shipper is not None:
            self.shipper.submit(run_key, stream, line)

    def _metrics(self, run: OpenRun, points: list[tuple[str, float, int]],
                 later: bool = False) -> None:
        """``later``: points that correct ones logged before at their steps: their time is
        after those's (MLflow's latest value of a step is that of its latest time)."""
        ts = int(time.time() * 1000)
        if later:
            ts = max(ts, run.metrics_ts + 1)
        run.metrics_ts = max(run.metrics_ts, ts)
        record: dict[str, Any] = {"ts": ts,
                                  "points": [[k, float_to_json(v), s] for k, v, s in points]}
        if run.rewound_to is not None:  # readers drop the points of later steps before it
            record["rewind"], run.rewound_to = run.rewound_to, None
        self._append(run, "metrics", record)

    def _policy_event(self, run: OpenRun, info: RunInfo, policy_file: str,
                      record: dict[str, Any]) -> None:
        if info.policy_sha256 != run.policy_sha256:
            run.policy_sha256 = info.policy_sha256
            run.policy_version += 1
        self._append(run, "events", {
            "event": "policy", "wall_time": time.time(), "step": run.last_step,
            "policy_version": run.policy_version, "policy_sha256": info.policy_sha256,
            "policy_source": info.policy_source, "policy_file": policy_file,
            "params": dict(info.params),
            "record": json_safe(record)})
