"""The interface between the controller and where its records go.

The controller calls a :class:`Sink` from its single owner thread. A sink must
never block that thread on a slow backend: the journal appends one line per
decision and fsyncs once per :meth:`Sink.commit` (once per loop wake-up), the
MLflow sink queues and batches in its own worker.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from .journal import JournalLine

__all__ = ["NullSink", "RunInfo", "Shipper", "Sink"]


@dataclass(frozen=True)
class RunInfo:
    """What a sink needs to know about one training run (one controller session)."""

    run_key: str  # unique, filesystem- and MLflow-safe id of the session
    run_name: str  # the human name (MLflow run name when lrctl creates the run)
    policy_source: str  # a path, or "<string>" / "<dict>"
    policy_text: str
    policy_sha256: str
    group_count: int
    params: Mapping[str, str] = field(default_factory=dict)  # flattened policy knobs
    mlflow_run_id: str | None = None  # the training script's active run, if any
    tracking_uri: str | None = None  # explicit URI from the hook, else env / default
    cwd: str | None = None  # the training script's working directory (default sqlite store)


class Shipper(Protocol):
    """What :class:`~lrctl.sinks.audit.AuditSink` asks of whatever carries its journal to
    MLflow: in the controller, a child process
    (:class:`~lrctl.sinks.shipper_proxy.ShipperProcess`); in tests, possibly the in-process
    engine (:class:`~lrctl.sinks.mlflow_sink.MlflowShipper`). Called from one owner thread;
    only ``flush`` and ``close`` wait, at most their ``timeout``."""

    def attend(self, run_key: str, tracking_uri: str) -> None: ...

    def submit(self, run_key: str, stream: str, line: JournalLine) -> None: ...

    def pass_on(self) -> None:
        """The end of a commit: what was submitted since the last one may be sent on."""

    def recover(self) -> list[str]: ...

    def flush(self, timeout: float = 10.0) -> bool: ...

    def close(self, timeout: float = 1.0) -> bool: ...

    def status(self) -> dict[str, Any]: ...

    def run_errors(self) -> dict[str, str]: ...


class Sink(ABC):
    """Receives a controller's records. Methods must return quickly."""

    @abstractmethod
    def open_run(self, info: RunInfo) -> None:
        """A session started (or was restored after a controller restart)."""

    def prepare_run(self, info: RunInfo) -> None:
        """Called on a worker thread (the hello's) before :meth:`open_run` of a new run,
        so that a sink can do slow file work there; :meth:`open_run` follows with an
        equal ``info`` on the owner thread, unless the hello is not answered after all:
        then :meth:`discard_prepared` gets this very ``info``. It must touch nothing the
        owner thread uses. The default does nothing."""
        return None

    def discard_prepared(self, info: RunInfo) -> None:
        """Undo :meth:`prepare_run` (see there). The default does nothing."""
        return None

    @abstractmethod
    def observation(self, run_key: str, step: int, loss: float | None,
                    grad_norm: float | None, lrs: Sequence[float]) -> None:
        """Every observation; the sink downsamples as configured."""

    def lr_change(self, run_key: str, step: int, lrs: Sequence[float]) -> None:
        """The LRs changed at ``step``, between two observations (``every=N``)."""
        return None

    def lr_ran(self, run_key: str, step: int, lrs: Sequence[float]) -> None:
        """Step ``step``, the last observed, ran on ``lrs``, not on the LRs its observation
        said (a sync hook ran it without its answer): its LR points again, later than the
        first (where a step has two points, the later one stands). The default does
        nothing."""
        return None

    @abstractmethod
    def decision(self, run_key: str, record: Mapping[str, Any]) -> None:
        """One decision (``Decision.to_dict()`` plus ``wall_time``); durable once the next
        :meth:`commit` returns (or sooner)."""

    @abstractmethod
    def policy_changed(self, run_key: str, info: RunInfo, record: Mapping[str, Any]) -> None:
        """A hot reload (or a failed one): ``record`` is the audited event."""

    @abstractmethod
    def close_run(self, run_key: str) -> None:
        """The session ended; flush what belongs to it."""

    def rewind(self, run_key: str, step: int) -> None:
        """The run was resumed from the user's checkpoint of ``step``: what comes after is
        new, even at steps already recorded (a replay after a controller restart is not).
        The default does nothing."""
        return None

    def discard_run(self, run_key: str) -> None:
        """The session ended (``bye``) before its first observation, with no decision: a
        run with nothing to show, which MLflow need not see. The default treats it as
        an end."""
        self.close_run(run_key)

    def drop_run(self, run_key: str, reason: str) -> None:
        """The session's hook vanished without a ``bye`` and did not come back within
        the controller's ``session_timeout``: the run is orphaned (``reason`` says
        why). The default treats it as an end."""
        self.close_run(run_key)

    def commit(self) -> None:
        """Make every decision and policy event passed so far durable (group commit).

        The controller calls this once per loop wake-up, before it sends the replies
        that tell the hooks of those decisions. The default does nothing: right for a
        sink whose records are durable when its methods return.
        """
        return None

    def status(self) -> dict[str, Any]:
        """Fields for ``lrctl status`` (the MLflow shipper's process, for one)."""
        return {}

    def run_errors(self) -> dict[str, str]:
        """``run key -> what is wrong with its records`` (for ``lrctl runs``)."""
        return {}

    def tick(self) -> None:
        """Once a second, from the controller's loop: retry what failed (a full disk)."""
        return None

    def restore(self) -> None:
        """The state dir was deleted and made again: write back what belongs there."""
        return None

    def hold_journal(self, run_key: str) -> bool:
        """(Owner thread) Whether ``run_key``'s journal directory is none of this sink's
        business now (not open, ending, prepared or being prepared), so that ``lrctl
        prune`` may move it away; if so, the sink prepares no such run on another thread
        until :meth:`release_journal` (the owner thread, busy moving it, opens none). The
        default (a sink that keeps no journal): True."""
        return True

    def release_journal(self, run_key: str) -> None:
        """The end of :meth:`hold_journal`'s hold. The default does nothing."""
        return None

    @abstractmethod
    def close(self) -> None:
        """Controller shutdown: flush everything that can be flushed, stop workers."""


class NullSink(Sink):
    """Drops everything (tests, and ``lrctl serve --no-audit``)."""

    def open_run(self, info: RunInfo) -> None:
        return None

    def observation(self, run_key: str, step: int, loss: float | None,
                    grad_norm: float | None, lrs: Sequence[float]) -> None:
        return None

    def decision(self, run_key: str, record: Mapping[str, Any]) -> None:
        return None

    def policy_changed(self, run_key: str, info: RunInfo, record: Mapping[str, Any]) -> None:
        return None

    def close_run(self, run_key: str) -> None:
        return None

    def close(self) -> None:
        return None
