"""Suite-wide guards: a test that leaks a thread or a child process fails.

(After watchdog's tests/conftest.py.) A controller project that leaks a daemon
process or a non-daemon thread in its tests will leak them in production too.

Also the reliability figures (``rel_helpers.FIGURES``), printed at the end of the
run: the suite runs under pytest-xdist, so each worker hands its figures to the
controlling process, which prints them all.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

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


_WORKER_FIGURES: dict[str, Any] = {}


def _figures() -> dict[str, Any]:
    """This process's figures (rel_helpers is imported only where reliability tests ran)."""
    return dict(getattr(sys.modules.get("rel_helpers"), "FIGURES", None) or {})


def pytest_sessionfinish(session: pytest.Session) -> None:
    workeroutput = getattr(session.config, "workeroutput", None)
    if workeroutput is not None:  # an xdist worker: its figures go to the controller
        workeroutput["lrctl_figures"] = json.dumps(_figures())


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node: Any, error: Any) -> None:
    output = getattr(node, "workeroutput", None) or {}
    _WORKER_FIGURES.update(json.loads(output.get("lrctl_figures", "{}")))


def pytest_terminal_summary(terminalreporter: Any) -> None:
    figures = {**_WORKER_FIGURES, **_figures()}
    if not figures:
        return
    terminalreporter.section("lrctl reliability figures")
    for name in sorted(figures):
        terminalreporter.write_line(f"{name}: {json.dumps(figures[name])}")
