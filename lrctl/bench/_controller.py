"""A real ``lrctl serve --foreground`` process for the speed suites, and its /proc figures.

The suites measure what a user gets: the hook talks to a separate controller
process over a Unix socket in a private temporary directory, never to an
in-process stand-in. ``--no-audit`` unless a suite asks for the audit trail.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import TracebackType

from ..wire.operator import request

__all__ = ["ServeProcess"]

_TICKS = os.sysconf("SC_CLK_TCK")


class ServeProcess:
    """``with ServeProcess() as srv: lrctl.attach(opt, socket=srv.socket, spawn=False)``.

    ``batch``: run the controller under ``SCHED_BATCH`` (no wake-up preemption of
    the training process on a busy machine), to measure what that policy buys.
    ``pacing=False``: ``--no-pacing`` (every observation wakes the controller).
    """

    def __init__(self, *, audit: bool = False, batch: bool = False, pacing: bool = True,
                 env: dict[str, str] | None = None, root: str | None = None) -> None:
        self.root = Path(root or tempfile.mkdtemp(prefix="lrctl-bench-"))
        self._own_root = root is None
        self.socket = str(self.root / "c.sock")
        self.state_dir = str(self.root / "state")
        self.audit = audit
        self.batch = batch
        self.pacing = pacing
        self.env = env
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> ServeProcess:
        cmd = [sys.executable, "-m", "lrctl", "serve", "--foreground", "--socket", self.socket,
               "--state-dir", self.state_dir, *(() if self.audit else ("--no-audit",)),
               *(() if self.pacing else ("--no-pacing",))]
        with open(self.root / "serve.out", "ab") as out:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out,
                                         stderr=subprocess.STDOUT, env=self.env)
        if self.batch:
            os.sched_setscheduler(self.proc.pid, os.SCHED_BATCH, os.sched_param(0))
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"lrctl serve exited with {self.proc.returncode}: "
                                   f"{(self.root / 'serve.out').read_text()[-2000:]}")
            try:
                request({"t": "status"}, self.socket, timeout=1.0)
                return self
            except OSError:
                time.sleep(0.05)
        self.__exit__(None, None, None)
        raise RuntimeError("lrctl serve did not answer within 60 s")

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        if self._own_root:
            shutil.rmtree(self.root, ignore_errors=True)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def cpu_seconds(self) -> float:
        """User plus system CPU time the controller has used so far."""
        with open(f"/proc/{self.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / _TICKS

    def rss_mib(self) -> float:
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        return float("nan")
