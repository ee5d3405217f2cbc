"""Suite-wide guards: a test that leaks a thread or a child process fails.

(After watchdog's tests/conftest.py.) A controller project that leaks a daemon
process or a non-daemon thread in its tests will leak them in production too.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator

import pytest

GRACE_S = 5.0


def _children() -> set[int]:
    pids: set[int] = set()
    task_dir = f"/proc/{os.getpid()}/task"
    try:
        tasks = os.listdir(task_dir)
    except OSError:
        return pids
    for tid in tasks:
        try:
            with open(f"{task_dir}/{tid}/children") as f:
                pids.update(int(p) for p in f.read().split())
        except OSError:
            continue
    return {pid for pid in pids if _alive(pid)}


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.fixture(autouse=True)
def no_leaked_threads_or_processes() -> Iterator[None]:
    threads_before = set(threading.enumerate())
    children_before = _children()
    yield
    deadline = time.monotonic() + GRACE_S
    while True:
        threads = [t for t in threading.enumerate()
                   if t not in threads_before and t.is_alive() and not t.daemon]
        children = _children() - children_before
        if (not threads and not children) or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert not threads, f"test leaked non-daemon threads: {[t.name for t in threads]}"
    assert not children, f"test leaked child processes: {sorted(children)}"
