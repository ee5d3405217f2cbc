"""Pieces of the browser test: a real ``mlflow server``, headless Chromium, polling."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
MLFLOW_BIN = Path(sys.executable).with_name("mlflow")
T = TypeVar("T")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class MlflowServer:
    """``mlflow server`` on 127.0.0.1 with a sqlite backend, in its own process group."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 120.0) -> MlflowServer:
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / "server.log", "ab") as log:
            self.proc = subprocess.Popen(
                [str(MLFLOW_BIN), "server", "--backend-store-uri",
                 f"sqlite:///{self.root / 'server.db'}", "--artifacts-destination",
                 str(self.root / "artifacts"), "--host", "127.0.0.1", "--port", str(self.port),
                 "--workers", "1"],
                cwd=self.root, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited: {self.log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=1) as r:
                    if r.status == 200:
                        return self
            except OSError:
                time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"mlflow server did not answer within {timeout}s: {self.log_tail()}")

    def log_tail(self) -> str:
        return (self.root / "server.log").read_text(errors="replace")[-3000:]

    def stop(self) -> None:
        """SIGTERM to the whole group (server, uvicorn); SIGKILL if it lingers."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                os.killpg(proc.pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGKILL)


def wait_for(what: str, probe: Callable[[], T | None], timeout: float = 120.0,
             interval: float = 0.5) -> T:
    """Poll ``probe`` until it returns something; fail saying ``what`` never came."""
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = probe()
        except Exception as exc:  # the server may still be writing: try again
            last_error = exc
            value = None
        if value is not None:
            return value
        time.sleep(interval)
    raise AssertionError(f"{what} did not appear within {timeout:.0f}s"
                         + (f" (last error: {last_error!r})" if last_error else ""))


def chromium(profile_dir: Path, width: int = 1400, height: int = 1000) -> Any:
    """Headless Chromium through the Debian chromedriver (Selenium Manager never runs:
    both paths are given, so nothing is downloaded)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic",
                "--no-first-run", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
                f"--user-data-dir={profile_dir}", f"--window-size={width},{height}"):
        options.add_argument(arg)
    service = Service(executable_path=str(CHROMEDRIVER))
    return webdriver.Chrome(options=options, service=service)
