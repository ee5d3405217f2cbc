"""The reload path under the churn users create: the watcher can never hang the controller.

A controller whose policy watcher deadlocked stopped answering for good and
ignored SIGTERM. These tests reproduce the conditions that caused it (watched
policy files in directories full of other writes, runs attaching and leaving all
the while) and check that every run is answered, edits still reach live runs,
and SIGTERM still stops the controller cleanly.

``LRCTL_STRESS_S`` lengthens the churn (default 25 s, to keep CI short).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

from daemon_helpers import ControllerProc
from rel_helpers import FIGURES, RawClient, hello, until

from lrctl.client import request

HERE = Path(__file__).resolve().parent
STRESS_S = float(os.environ.get("LRCTL_STRESS_S", "25"))
DIRS = 3
CLIENTS = 4
STEPS_PER_RUN = 12


def _policy(factor: float) -> str:
    return (f"version: 1\npolicies:\n  - kind: divergence\n  - kind: plateau\n"
            f"    metric: loss\n    factor: {factor}\n    patience: 50\n")


def _save(path: Path, text: str) -> None:
    """An editor's atomic save (a reader never sees half a file)."""
    tmp = path.with_name(f".{path.name}.swp")
    tmp.write_text(text)
    os.replace(tmp, path)


def test_watcher_churn_in_process_does_not_deadlock(tmp_path: Path) -> None:
    """The in-process reproduction of the lock-order inversion (hung within seconds before)."""
    proc = subprocess.run([sys.executable, str(HERE / "watcher_churn.py"), str(tmp_path), "8"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["cycles"] > 100 and result["reloads"] >= 1, result
    FIGURES["watcher churn"] = result


def test_runs_churn_beside_busy_policy_dirs(controller: ControllerProc, tmp_path: Path) -> None:
    dirs = [tmp_path / f"exp{i}" for i in range(DIRS)]
    for d in dirs:
        d.mkdir()
        (d / "policy.yaml").write_text(_policy(0.5))
    stop = threading.Event()
    errors: list[str] = []
    counts = {"runs": 0, "answers": 0, "writes": 0, "edits": 0}
    lock = threading.Lock()

    def scribble() -> None:  # logs, an sqlite journal, checkpoints: ~150 writes/s in all
        i = 0
        while not stop.is_set():
            d = dirs[i % DIRS]
            (d / f"train{i % 5}.log").write_text(f"step {i}\n")
            if i % 7 == 0:
                (d / "mlflow.db-journal").write_bytes(os.urandom(64))
            i += 1
            with lock:
                counts["writes"] += 1
            stop.wait(0.006)

    def run_clients(worker: int) -> None:
        n = 0
        while not stop.is_set():
            d = dirs[(worker + n) % DIRS]
            path = d / "policy.yaml"
            try:
                c = RawClient(controller.socket, timeout=60)
                msg = hello(f"stress-{worker}-{n}", path.read_text(), [0.1])
                msg["policy"]["source"] = str(path)
                c.send(msg)
                welcome = c.answer()
                assert welcome["t"] == "welcome", welcome
                for t in range(STEPS_PER_RUN):
                    c.obs(t, 1.0 + 0.01 * (t % 3), 1.0)
                    assert c.answer()["s"] == t
                c.send({"t": "bye"})
                c.close()
            except Exception as exc:  # reported below, with the run that failed
                errors.append(f"stress-{worker}-{n}: {exc!r}")
                return
            n += 1
            with lock:
                counts["runs"] += 1
                counts["answers"] += STEPS_PER_RUN

    threads = [threading.Thread(target=scribble, daemon=True)]
    threads += [threading.Thread(target=run_clients, args=(w,), daemon=True)
                for w in range(CLIENTS)]
    # One long-lived run per directory sees the edits made during the churn.
    keepers = []
    for i, d in enumerate(dirs):
        c = RawClient(controller.socket, timeout=60)
        msg = hello(f"keeper-{i}", (d / "policy.yaml").read_text(), [0.1])
        msg["policy"]["source"] = str(d / "policy.yaml")
        c.send(msg)
        assert c.answer()["t"] == "welcome"
        keepers.append(c)
    started = time.monotonic()
    for t in threads:
        t.start()
    try:
        edit = 0
        while time.monotonic() - started < STRESS_S and not errors:
            edit += 1
            d = dirs[edit % DIRS]
            _save(d / "policy.yaml", _policy(0.5 if edit % 2 else 0.25))
            with lock:
                counts["edits"] += 1
            stop.wait(0.5)
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    assert not errors, errors[:5]
    assert controller.proc is not None and controller.proc.poll() is None
    assert counts["runs"] >= 50, counts  # hundreds on a quiet machine; reported below

    # Every directory's last edit reaches its long-lived run (the watcher still works).
    for i, d in enumerate(dirs):
        want = hashlib.sha256((d / "policy.yaml").read_bytes()).hexdigest()

        def current(key: str = f"keeper-{i}", want: str = want) -> bool:
            runs = {r["run"]: r for r in request({"t": "runs"})["runs"]}
            return runs[key]["policy_sha256"] == want
        until(f"keeper-{i} to run its file's last edit", current)
    for c in keepers:
        c.send({"t": "bye"})
        c.close()
    until("every run to leave", lambda: request({"t": "status"})["runs"] == 0)
    assert controller.stop() == 0  # SIGTERM, clean exit within the helper's timeout
    FIGURES["reload stress"] = {"seconds": round(time.monotonic() - started, 1), **counts}
