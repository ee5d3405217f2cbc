"""Helpers for the reliability tests: raw protocol clients, polling, RSS, figures."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lrctl.protocol import MAX_FRAME, FrameDecoder, encode, encode_obs

#: name -> figure, printed at the end of the session (see conftest.py).
FIGURES: dict[str, Any] = {}
#: A hang guard, never what a test measures: under load (3 busy loops on 2 cores) the
#: MLflow shipper's child took 40 s and more to import MLflow and create a store.
TIMEOUT_S = 300.0
#: ``LRCTL_TEST_FULL=1``: the load and fuzz tests at their full sizes (CI runs smaller
#: ones that check the same things; see test_load.py and test_fuzz.py).
FULL = os.environ.get("LRCTL_TEST_FULL") == "1"


def until(what: str, check: Callable[[], bool], timeout: float = TIMEOUT_S) -> None:
    """Poll ``check``; fail after a generous timeout (never a timing assertion)."""
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError(f"no VmRSS for pid {pid}")


def hello(run: str, text: str, lrs: list[float], **extra: Any) -> dict[str, Any]:
    return {"t": "hello", "run": run, "run_name": run,
            "policy": {"text": text, "source": "<string>"}, "lrs": lrs, "groups": len(lrs),
            **extra}


class RawClient:
    """A blocking protocol client: what a hook does, without the hook."""

    def __init__(self, path: str, timeout: float = TIMEOUT_S) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(path)  # blocking: waits for room in a full backlog
        self.sock.settimeout(timeout)
        self.decoder = FrameDecoder(MAX_FRAME * 16)
        self.pending: list[dict[str, Any]] = []

    def send(self, msg: dict[str, Any]) -> None:
        self.sock.sendall(encode(msg, 1 << 20))

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def obs(self, step: int, loss: float | None, grad: float | None = None) -> None:
        self.sock.sendall(encode_obs(step, loss, grad))

    def recv(self) -> dict[str, Any] | None:
        """The next frame, or None when the controller closed the connection."""
        while not self.pending:
            try:
                data = self.sock.recv(1 << 16)
            except ConnectionResetError:
                data = b""
            if not data:
                return None
            self.pending.extend(self.decoder.feed(data))
        return self.pending.pop(0)

    def answer(self) -> dict[str, Any]:
        """The next reply that is not an operator push (``s`` = -1)."""
        while True:
            msg = self.recv()
            assert msg is not None, "the controller closed the connection"
            if not (msg["t"] == "lr" and msg["s"] == -1):
                return msg

    def close(self) -> None:
        self.sock.close()


def fds_of(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def store_client(uri: str) -> Any:
    """An ``MlflowClient`` on the controller's sqlite store, once its shipper has created
    it: two processes creating one sqlite store at once can break its migration
    ("duplicate column name"), and a test must never be the second creator."""
    from mlflow.tracking import MlflowClient

    db = Path(uri.removeprefix("sqlite:///"))
    until(f"the shipper to create the MLflow store {db}", db.exists)
    return MlflowClient(uri)


def until_shipped(client: Any, state: Path, key: str, decisions: int) -> str:
    """Wait until the run's MLflow run holds ``decisions`` decisions and has ended;
    return its id (the run must end FINISHED: lrctl created it)."""
    from sinks_helpers import mlflow_run_id

    def shipped() -> bool:
        try:
            run = client.get_run(mlflow_run_id(state, key))
        except Exception:
            return False
        return (run.data.tags.get("lrctl.decisions") == str(decisions)
                and run.info.status == "FINISHED")

    until("MLflow to have every decision and the run's end", shipped)
    return mlflow_run_id(state, key)
