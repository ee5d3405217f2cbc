"""The MLflow shipper's own process: ``python -m lrctl.sinks.shipper_proc --state-dir DIR``.

The controller (:class:`~lrctl.sinks.shipper_proxy.ShipperProcess`) starts this as
its child so that mlflow, its memory and its GIL time stay out of the event loop's
process. It runs :class:`~lrctl.sinks.mlflow_sink.MlflowShipper` unchanged.

Protocol: one small JSON object a line, both ways, no pickle. The controller says
which runs to attend and which journals grew, never the lines themselves: the
journal is the source of truth, and the shipper reads it from its cursor.

controller → shipper::

    {"op": "attend", "run": KEY, "uri": URI}
    {"op": "more", "runs": [KEY, ...]}          the journals of these runs grew
    {"op": "flush", "id": N, "timeout": S}      answered by {"ack": N, "ok": BOOL}
    {"op": "close", "timeout": S}               answered by {"closed": BOOL}, then exit
    {"op": "forget", "run": KEY}                the run ended and is shipped: drop it
    {"op": "ping", "id": N}                      answered at once by {"pong": N}

shipper → controller, besides those answers: ``{"log": LEVELNO, "msg": TEXT}``, the
shipper's log records, which the controller writes to its own log, and
``{"mlflow": URI, "error": TEXT | null}`` when MLflow at URI becomes unavailable
(and why) or answers again, ``{"files": KEY, "error": TEXT | null}`` when a run's files
wait for its artifact store (see ``_mlflow_files``) or are stored again, and
``{"done": KEY, "events_seq": N, "failed": BOOL}``
when the shipper has no more work for a run that ended (shipped up to line N of its
events) or that MLflow refused for good; the controller then forgets the run.

End of input (the controller died) ends the shipper at once; the journal keeps the rest.

The shipper runs at a lower CPU priority than the controller (:data:`NICE`): MLflow is
a replica that may lag, the controller's answers to the training runs come first.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import sys
import threading
from collections.abc import Sequence
from typing import IO, Any

from .mlflow_sink import MlflowShipper

__all__ = ["NICE", "main"]

#: Added to the shipper's nice value at start: on a busy machine it yields the CPU to the
#: controller (and to training); still about a tenth of a contended core, ample for
#: shipping, where nice 19 would starve it.
NICE = 10

log = logging.getLogger("lrctl.sinks.mlflow")


class _Out:
    """Writes JSON lines to the controller; one writer at a time."""

    def __init__(self, stream: IO[bytes]) -> None:
        self._stream = stream
        self._lock = threading.Lock()

    def send(self, msg: dict[str, Any]) -> None:
        data = (json.dumps(msg, separators=(",", ":")) + "\n").encode()
        # The controller gone (OSError, or ValueError on a closed stream): our end of
        # input follows, and with it our exit.
        with self._lock, contextlib.suppress(OSError, ValueError):
            self._stream.write(data)
            self._stream.flush()


class _Forward(logging.Handler):
    """Hands log records to the controller, which keeps the one log."""

    def __init__(self, out: _Out) -> None:
        super().__init__()
        self._out = out

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self._out.send({"log": record.levelno, "msg": self.format(record)})
        except Exception:
            self.handleError(record)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m lrctl.sinks.shipper_proc")
    p.add_argument("--state-dir", required=True)
    p.add_argument("--flush-interval", type=float, default=1.0)
    p.add_argument("--queue-size", type=int, default=10_000)
    p.add_argument("--backoff-max", type=float, default=30.0)
    p.add_argument("--no-timeline", dest="timeline", action="store_false")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    with contextlib.suppress(OSError):
        os.nice(NICE)
    # Ctrl-C reaches the whole foreground group: the controller decides when we stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    out = _Out(sys.stdout.buffer)
    handler = _Forward(out)
    handler.setFormatter(logging.Formatter("%(message)s"))
    root = logging.getLogger("lrctl")
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    shipper = MlflowShipper(args.state_dir, flush_interval=args.flush_interval,
                            queue_size=args.queue_size, timeline=args.timeline,
                            backoff_max=args.backoff_max,
                            on_state=lambda uri, why: out.send({"mlflow": uri, "error": why}),
                            on_done=lambda key, seq, failed: out.send(
                                {"done": key, "events_seq": seq, "failed": failed}),
                            on_files=lambda key, why: out.send({"files": key, "error": why}))
    for raw in sys.stdin.buffer:
        try:
            _handle(shipper, out, json.loads(raw))
        except (ValueError, KeyError, TypeError):
            log.error("lrctl shipper: ignored a bad message %.200r", raw)
    # End of input: the controller died (kill -9). Stop at once, as its threads would
    # have: the next controller's shipper reads the journals from the cursors, and two
    # shippers on one run, even for a second, would only send the same batches twice.
    os._exit(0)


def _handle(shipper: MlflowShipper, out: _Out, msg: dict[str, Any]) -> None:
    op = msg["op"]
    if op == "attend":
        shipper.attend(str(msg["run"]), str(msg["uri"]))
    elif op == "more":
        for key in msg["runs"]:
            shipper.catch_up(str(key))
    elif op == "flush":  # in a thread: reading our input must never wait on MLflow
        threading.Thread(target=_flush, args=(shipper, out, msg), daemon=True,
                         name="lrctl-shipper-flush").start()
    elif op == "forget":
        shipper.forget(str(msg["run"]))
    elif op == "ping":  # still reading (a stopped or hung child answers nothing)
        out.send({"pong": msg["id"]})
    elif op == "close":
        _close(shipper, out, float(msg.get("timeout", 1.0)))
    else:
        raise ValueError(f"unknown op {op!r:.40}")


def _flush(shipper: MlflowShipper, out: _Out, msg: dict[str, Any]) -> None:
    out.send({"ack": msg["id"], "ok": shipper.flush(float(msg.get("timeout", 10.0)))})


def _close(shipper: MlflowShipper, out: _Out, timeout: float) -> None:
    """Ship within ``timeout``, answer, and exit at once: cursors are written atomically,
    and a worker stuck in a hung MLflow call must not hold the exit."""
    ok = shipper.close(timeout)
    out.send({"closed": ok})
    os._exit(0)


if __name__ == "__main__":
    sys.exit(main())
