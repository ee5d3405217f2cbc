"""Helpers shared by the daemon tests: a real controller process and test curves."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

from live_controller import wait_until_serving

REPO = Path(__file__).resolve().parents[2]
POLICIES = REPO / "policies"


class ControllerProc:
    """One ``lrctl serve --foreground`` process; restartable on the same socket and state."""

    def __init__(self, socket_path: str, state_dir: str, extra: list[str] | None = None,
                 env: dict[str, str] | None = None, audit: bool = False) -> None:
        self.audit = audit  # False: --no-audit (no journal, no MLflow)
        self.socket = socket_path
        self.state_dir = state_dir
        self.extra = list(extra or [])
        self.env = env
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = Path(state_dir).parent / "serve.out"

    def start(self, wait: bool = True) -> ControllerProc:
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "lrctl", "serve", "--foreground",
                 *([] if self.audit else ["--no-audit"]),
                 "--socket", self.socket, "--state-dir", self.state_dir, *self.extra],
                stdout=out, stderr=subprocess.STDOUT, env=self.env, cwd=REPO)
        if wait:
            self.wait_ready()
        return self

    def wait_ready(self) -> None:
        assert self.proc is not None
        wait_until_serving(self.proc, self.socket, self.log)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> int:
        """SIGTERM and wait: the clean shutdown path."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode

    def ensure_dead(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def losses(n: int, seed: int = 0, spikes: tuple[int, ...] = ()) -> list[float]:
    """A deterministic, noisy, decaying loss curve with optional spikes and a NaN."""
    import random

    rng = random.Random(seed)
    out = []
    for t in range(n):
        loss = 2.0 / (1 + t / 50) + rng.random() * 0.05
        if t in spikes:
            loss = float("nan") if t % 2 else loss * 40
        out.append(loss)
    return out
