"""A stuck controller is loud and ends: the loop's heartbeat, and SIGTERM that always works.

The known-answer tests drive :class:`LoopMonitor` with a hand-moved clock; the
process tests run a real controller whose event loop (or a side thread) gets
stuck, and check its exit status and the stack dump in its log.
"""

from __future__ import annotations

import logging
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from live_controller import wait_until_serving
from rel_helpers import RawClient, hello, until

from lrctl.daemon.liveness import EXIT_SHUTDOWN_OVERRUN, EXIT_STALLED, LoopMonitor

HERE = Path(__file__).resolve().parent
POLICY = "version: 1\npolicies:\n  - kind: divergence\n"


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


@pytest.mark.parametrize(("quiet", "expected"), [(0.0, None), (29.9, None), (30.0, None),
                                                  (30.1, EXIT_STALLED), (500.0, EXIT_STALLED)])
def test_stall_verdict_known_answers(quiet: float, expected: int | None) -> None:
    clock = Clock()
    monitor = LoopMonitor(lambda: 100.0, stall_s=30.0, clock=clock)
    clock.t = 100.0 + quiet
    assert monitor.check() == expected


def test_stop_request_switches_to_the_grace_deadline(caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    wake = [100.0]
    monitor = LoopMonitor(lambda: wake[0], stall_s=30.0, grace_s=2.0, clock=clock)
    monitor.stop_requested()
    clock.t = 101.9
    assert monitor.check() is None
    monitor.stop_requested()  # a second request does not move the deadline
    clock.t = 102.1
    with caplog.at_level(logging.ERROR, logger="lrctl.daemon"):
        assert monitor.check() == EXIT_SHUTDOWN_OVERRUN
    assert "shutdown did not finish within 2.0 s" in caplog.text
    assert "--- thread MainThread" in caplog.text  # the stack dump names the threads


def test_a_pause_of_the_whole_process_is_no_stall(caplog: pytest.LogCaptureFixture) -> None:
    """An adversarial pass's find: a controller SIGSTOPped for longer than stall_s exited
    70 on SIGCONT (its monitor, paused too, saw the loop's old stamp first). Looks far
    apart mean the monitor itself did not run: the loop is judged from the resume."""
    clock, cpu = Clock(), Clock()
    wake = [100.0]
    monitor = LoopMonitor(lambda: wake[0], stall_s=30.0, clock=clock, cpu_clock=cpu)
    assert monitor.check() is None
    clock.t = 100.0 + 45.0  # stopped for 45 s, loop and monitor alike (no CPU used)
    with caplog.at_level(logging.WARNING, logger="lrctl.daemon"):
        assert monitor.check() is None
    assert "paused for 45.0 s" in caplog.text
    clock.t += monitor.period  # looks resume at their pace; the loop stays stuck
    for _ in range(29):
        assert monitor.check() is None
        clock.t += monitor.period
    clock.t += monitor.period
    assert monitor.check() == EXIT_STALLED  # a stall after the resume is still caught
    monitor = LoopMonitor(lambda: wake[0], stall_s=30.0, grace_s=2.0, clock=Clock(),
                          cpu_clock=Clock())
    monitor.stop_requested()
    assert monitor._clock() == 100.0 and monitor.check() is None
    monitor._clock.t = 110.0  # type: ignore[attr-defined]  (paused 10 s in the grace)
    assert monitor.check() is None
    # A review's point: looks far apart while the process was busy (a loop holding the
    # interpreter in a long call) are no pause: the stall is still caught.
    clock, cpu = Clock(), Clock()
    busy = LoopMonitor(lambda: 100.0, stall_s=30.0, clock=clock, cpu_clock=cpu)
    assert busy.check() is None
    clock.t += 45.0
    cpu.t += 40.0
    assert busy.check() == EXIT_STALLED


def test_second_signal_exits_at_once() -> None:
    exits: list[int] = []
    monitor = LoopMonitor(lambda: 0.0, exit=exits.append)
    monitor.on_signal()
    assert exits == []
    monitor.on_signal()
    assert exits == [EXIT_SHUTDOWN_OVERRUN]


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan")])
def test_bad_limits_are_refused(bad: float) -> None:
    with pytest.raises(ValueError, match="stall_s"):
        LoopMonitor(lambda: 0.0, stall_s=bad)
    with pytest.raises(ValueError, match="grace_s"):
        LoopMonitor(lambda: 0.0, grace_s=bad)


def test_monitor_thread_calls_exit_on_a_stall() -> None:
    exits: list[int] = []
    monitor = LoopMonitor(lambda: time.monotonic() - 10.0, stall_s=0.2, exit=exits.append)
    monitor.start()
    try:
        until("the monitor to call exit", lambda: bool(exits), timeout=30)
    finally:
        monitor.close()
    assert exits == [EXIT_STALLED]


class Stuck:
    """A real controller from stuck_controller.py on the test's private socket."""

    def __init__(self, root: Path, stall_s: float, grace_s: float, *extra: str) -> None:
        self.socket = str(root / "run" / "c.sock")
        self.state = root / "state"
        self.log = root / "stuck.out"
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, str(HERE / "stuck_controller.py"), self.socket,
                 str(self.state), str(stall_s), str(grace_s), *extra],
                stdout=out, stderr=subprocess.STDOUT)
        wait_until_serving(self.proc, self.socket, self.log)

    def hang_the_loop(self) -> RawClient:
        client = RawClient(self.socket)
        client.send(hello("hang", POLICY, [0.1]))
        until("the loop to be stuck in the sink", (self.state / "stuck").exists)
        return client

    def wait(self, timeout: float = 60.0) -> int:
        return self.proc.wait(timeout)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture
def stuck(short_dir: Path) -> Iterator[list[Stuck]]:
    made: list[Stuck] = []
    try:
        yield made
    finally:
        for s in made:
            s.kill()


def test_a_stalled_loop_dumps_stacks_and_exits(short_dir: Path, stuck: list[Stuck]) -> None:
    s = Stuck(short_dir, 1.0, 5.0)
    stuck.append(s)
    client = s.hang_the_loop()
    assert s.wait() == EXIT_STALLED
    client.close()
    log = s.log.read_text()
    assert "the event loop has not turned" in log
    assert "in open_run" in log  # the stack dump shows where the loop is stuck
    assert "--- thread MainThread" in log


def test_sigterm_ends_a_controller_whose_loop_is_stuck(short_dir: Path,
                                                       stuck: list[Stuck]) -> None:
    s = Stuck(short_dir, 600.0, 1.0)
    stuck.append(s)
    client = s.hang_the_loop()
    s.proc.send_signal(signal.SIGTERM)
    assert s.wait() == EXIT_SHUTDOWN_OVERRUN
    client.close()
    assert "shutdown did not finish" in s.log.read_text()


def test_sigterm_ends_a_controller_with_a_stuck_thread(short_dir: Path,
                                                       stuck: list[Stuck]) -> None:
    """The loop shuts down cleanly; a non-daemon thread that never ends cannot hold the exit."""
    s = Stuck(short_dir, 600.0, 1.0, "--stuck-thread")
    stuck.append(s)
    s.proc.send_signal(signal.SIGTERM)
    assert s.wait() == EXIT_SHUTDOWN_OVERRUN
    log = s.log.read_text()
    assert "controller stopped" in log  # state was flushed before the forced exit
    assert "stuck-worker" in log


def test_a_healthy_controller_exits_zero_on_sigterm(short_dir: Path,
                                                    stuck: list[Stuck]) -> None:
    s = Stuck(short_dir, 1.0, 5.0)  # a short stall limit: an idle loop still beats
    stuck.append(s)
    client = RawClient(s.socket)
    client.send(hello("fine", POLICY, [0.1]))
    assert client.answer()["t"] == "welcome"
    for t in range(5):
        client.obs(t, 1.0, 1.0)
        assert client.answer()["s"] == t
    # Idle for several stall limits: the heartbeat comes from the poll, not from traffic.
    deadline = time.monotonic() + 3.0
    while time.monotonic() < deadline:
        assert s.proc.poll() is None
        time.sleep(0.1)
    client.close()
    s.proc.send_signal(signal.SIGTERM)
    assert s.wait() == 0
