"""A real ``lrctl serve`` for the integration, example and browser tests.

Shared by tests/integrations, tests/examples and tests/browser (pytest puts
``tests/`` on ``sys.path`` because of tests/conftest.py). Sockets live in a
short directory under /tmp: ``sun_path`` holds 107 bytes and pytest's
tmp_path can be longer.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from lrctl.client import request

REPO = Path(__file__).resolve().parents[1]
START_TIMEOUT_S = 60.0


def wait_until_serving(proc: subprocess.Popen[bytes], socket: str, log: Path) -> None:
    """Return once the controller ``proc`` answers ``status`` on ``socket`` as itself;
    ``AssertionError`` (with the tail of its ``log``) if it exits or stays silent."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"controller exited with {proc.returncode}:\n"
                                 f"{log.read_text()[-3000:]}")
        try:
            if request({"t": "status"}, socket, timeout=1.0)["pid"] == proc.pid:
                return
        except OSError:
            pass
        time.sleep(0.05)
    raise AssertionError(f"controller not ready:\n{log.read_text()[-3000:]}")


class LiveController:
    """One ``lrctl serve --foreground`` on a private socket and state directory."""

    def __init__(self, root: Path, audit: bool = False,
                 env: dict[str, str] | None = None, args: Sequence[str] = ()) -> None:
        self.root = root
        self.socket = str(root / "run" / "c.sock")
        self.state_dir = str(root / "state")
        self.log = root / "serve.out"
        self.audit = audit
        self.env = env
        self.args = list(args)  # more options of ``lrctl serve``
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def env_vars(self) -> dict[str, str]:
        """What a training subprocess needs so that it talks to this controller only."""
        return {"LRCTL_SOCKET": self.socket, "LRCTL_STATE_DIR": self.state_dir}

    def start(self) -> LiveController:
        (self.root / "run").mkdir(mode=0o700, parents=True, exist_ok=True)
        args = [sys.executable, "-m", "lrctl", "serve", "--foreground", "--socket",
                self.socket, "--state-dir", self.state_dir]
        if not self.audit:
            args.append("--no-audit")
        args += self.args
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT,
                                         env=self.env, cwd=REPO)
        try:
            wait_until_serving(self.proc, self.socket, self.log)
        except AssertionError:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """SIGTERM (state flushed, journal shipped), then SIGKILL if it hangs."""
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


@contextmanager
def live_controller(audit: bool = False, env: dict[str, str] | None = None,
                    args: Sequence[str] = ()) -> Iterator[LiveController]:
    """A started controller in a fresh private directory; stopped and removed afterwards."""
    root = Path(tempfile.mkdtemp(prefix="lrctl-", dir="/tmp"))
    os.chmod(root, 0o700)
    ctl = LiveController(root, audit=audit, env=env, args=args)
    try:
        yield ctl.start()
    finally:
        ctl.stop()
        shutil.rmtree(root, ignore_errors=True)


def subprocess_env(ctl: LiveController, **extra: str) -> dict[str, str]:
    """The environment of a training subprocess: this controller, one thread, no MLflow
    configuration from the caller unless ``extra`` gives one."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("LRCTL_", "MLFLOW_"))}
    env.update(ctl.env_vars)
    env.update({"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
                "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
                "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
                "WANDB_DISABLED": "true", "DISABLE_MLFLOW_INTEGRATION": "TRUE"})
    env.update(extra)
    return env
