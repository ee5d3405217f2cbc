"""Paced reading (lrctl/daemon/pacing.py): a fast async hook's connection is read on a
timer, so that its sends wake nobody; decisions stay exactly where they were.

The schedule is a known-answer table over a fake clock; the rest runs real hooks
against a real controller and asks it (``status``) which connections it paces.
"""

from __future__ import annotations

import math
import socket
import time
from collections.abc import Callable, Iterator

import pytest
import torch
from daemon_helpers import POLICIES, ControllerProc, QuietHandler, losses, serve_until

import lrctl
from lrctl.client import request
from lrctl.daemon.conn import Conn
from lrctl.daemon.limits import Limits
from lrctl.daemon.pacing import (
    AFTER_DATA,
    AFTER_NOTHING,
    IDLE_INTERVALS,
    LEAD,
    MAX_SLACK_S,
    PAUSE,
    SLACK,
    WINDOW,
    Pacing,
    slack,
)
from lrctl.daemon.transport import Transport
from lrctl.wire.frames import encode

DEADLINE_S = 30.0


class _Conn:
    """What Pacing reads of a connection: its socket and whether it is paced."""

    def __init__(self, sock: socket.socket, every: int = 1) -> None:
        self.sock = sock
        self.paced = False
        self.every = every


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair()
    yield a, b
    a.close()
    b.close()


def test_paced_after_a_measured_window_of_fast_messages(pair: tuple[socket.socket, ...]) -> None:
    """Not before its interval is measured (a window of messages) and ``after`` fast ones
    in a row; a gap past the interval starts the streak again."""
    pacing = Pacing(interval_s=0.004, after=4)
    conn = _Conn(pair[0])
    assert not pacing.heard(conn, 100.0, 1)  # the first message starts the window
    answers = [pacing.heard(conn, 100.0 + i * 0.001, 1) for i in range(1, WINDOW + 2)]
    assert answers.index(True) == WINDOW - 1  # 16 messages 1 ms apart: 1 ms, paced
    other = _Conn(pair[1])
    pacing.heard(other, 0.0, 1)
    t = 0.0
    for _ in range(WINDOW):
        t += 0.001
        pacing.heard(other, t, 1)
    t += 0.010  # a 10 ms pause: the streak starts over
    assert not pacing.heard(other, t, 1)
    answers = []
    for _ in range(4):
        t += 0.001
        answers.append(pacing.heard(other, t, 1))
    assert answers == [False, False, False, True]


def _window_then_paced(pacing: Pacing, conn: _Conn, t: float, gap: float) -> float:
    """A first message at ``t``, a window of them ``gap`` apart, then paced (``after=1``);
    the time of the last."""
    pacing.heard(conn, t, 1)
    for _ in range(WINDOW):
        t += gap
        paced = pacing.heard(conn, t, 1)
    assert paced
    pacing.pace(conn, t)
    return t


def _look(at: float, intervals: float, interval: float) -> float:
    """When the loop wakes for a look due ``intervals`` mean intervals after ``at``: at
    its latest, its slack after it."""
    return at + intervals * interval + slack(interval)


def test_the_looks_follow_the_connection(pair: tuple[socket.socket, ...]) -> None:
    """Known answers: a look AFTER_DATA intervals after data, AFTER_NOTHING after an empty
    one (each at its latest, SLACK later); data queued up (two messages in one read)
    shortens the interval at once; silence for IDLE_INTERVALS intervals hands the
    connection back; slower than interval_s too."""
    a, b = pair
    pacing = Pacing(interval_s=0.004, after=1)
    conn = _Conn(a)
    t = _window_then_paced(pacing, conn, 10.0, 0.002)
    assert conn.paced and len(pacing) == 1
    assert pacing.next_due == pytest.approx(_look(t, AFTER_DATA, 0.002))
    assert pacing.due(t + 0.0001) == ([], [], [])  # before the look: nothing, no syscall
    look = pacing.next_due
    assert pacing.due(look) == ([], [], [])  # nothing came: the next look comes sooner
    pacing.reschedule()
    assert pacing.next_due == pytest.approx(_look(look, AFTER_NOTHING, 0.002))
    b.send(b"x")
    assert pacing.due(pacing.next_due) == ([conn], [], [])
    a.recv(1)
    now = pacing.next_due
    assert pacing.heard(conn, now, 2)  # two queued up: the interval is the gap now
    pacing.reschedule()
    gap = (now - t) / 2
    assert pacing.next_due == pytest.approx(_look(now, AFTER_DATA, gap))
    silent = now + IDLE_INTERVALS * gap + 0.0081  # and past 2 x interval_s
    assert pacing.due(silent) == ([], [conn], [])
    pacing.unpace(conn)
    pacing.reschedule()
    assert not conn.paced and len(pacing) == 0 and pacing.next_due == math.inf
    slow = Pacing(interval_s=0.004, after=1)
    conn.paced = False
    slow.heard(conn, 0.0, 1)
    for i in range(1, WINDOW + 1):
        slow.heard(conn, i * 0.002, 1)
    slow.pace(conn, WINDOW * 0.002)
    still = [slow.heard(conn, WINDOW * 0.002 + i * 0.006, 1) for i in range(1, WINDOW + 1)]
    assert still[-1] is False and all(still[:-1])  # 6 ms apart: back to the selector


def test_an_every_n_hook_is_paced_around_each_report(pair: tuple[socket.socket, ...]) -> None:
    """Known answers, every=4, reports 4 ms apart (a step a millisecond): read as its
    frames come after a report; out of the selector LEAD steps before the next is due,
    a look every quarter step until it is read (then back, the next period measured from
    that read), or back LINGER steps after it was due when it did not come."""
    a, b = pair
    pacing = Pacing(interval_s=0.020, after=1)
    conn = _Conn(a, every=4)
    t = 5.0
    pacing.heard(conn, t, 1)
    for _ in range(WINDOW):
        t += 0.004
        assert not pacing.heard(conn, t, 1)  # every=N: read as its frames come...
    assert len(pacing) == 1 and not conn.paced
    pacing.reschedule()
    leave = t + 0.004 - LEAD * 0.001  # ...until LEAD steps before the next report
    assert pacing.next_due == pytest.approx(leave)
    assert pacing.due(leave) == ([], [], [conn])
    pacing.pace(conn, leave)  # (the transport takes it out of the selector)
    looks = []
    while True:
        pacing.reschedule()
        looks.append(round((pacing.next_due - t) * 1e3, 6))
        read, idle, _ = pacing.due(pacing.next_due)
        if idle:
            break
        assert read == []
    assert looks == [3.5, 3.75, 4.0, 4.25, 4.5, 4.75, 5.0] and idle == [conn]
    pacing.unpace(conn)  # back in the selector: the late report wakes the loop
    assert not pacing.heard(conn, t + 0.0055, 1)
    pacing.reschedule()
    leave = t + 0.0055 + 0.004 - LEAD * 0.001
    assert pacing.next_due == pytest.approx(leave)
    assert pacing.due(pacing.next_due) == ([], [], [conn])
    pacing.pace(conn, pacing.next_due)
    b.send(b"x")  # the report, found by a look: read, and back to the selector
    pacing.reschedule()
    now = pacing.next_due
    assert pacing.due(now) == ([conn], [], [])
    a.recv(1)
    assert not pacing.heard(conn, now, 1)
    pacing.unpace(conn)
    pacing.reschedule()
    assert pacing.next_due == pytest.approx(now + 0.004 - LEAD * 0.001)
    pacing.forget(conn)
    pacing.reschedule()
    assert len(pacing) == 0 and pacing.next_due == math.inf


def test_an_every_n_hook_near_the_pacing_limit_stays_paced(
        pair: tuple[socket.socket, ...]) -> None:
    """A review's find: reports 19.9 ms apart (every=4, limit 20 ms), read at a look a
    little after they came: that gap, our lag, reset the run's streak, so it went back to
    being read as its reports came for a window, over and over. The window's mean says."""
    a, _ = pair
    pacing = Pacing(interval_s=0.020, after=8)
    conn = _Conn(a, every=4)
    t = 1.0
    for _ in range(WINDOW + 9):
        pacing.heard(conn, t, 1)
        t += 0.0199
    assert len(pacing) == 1  # paced around its next report
    assert pacing.due(t - 0.0199 + 0.0199 - LEAD * 0.0199 / 4) == ([], [], [conn])
    conn.paced = True  # (taken out of the selector, as the transport does)
    pacing.heard(conn, t + 0.0008, 1)  # read at a look 0.8 ms after it came: a 20.7 ms gap
    conn.paced = False
    assert len(pacing) == 1  # still paced around the next one


def _steps(pacing: Pacing, conn: _Conn, t: float, gap: float, n: int) -> float:
    """``n`` messages ``gap`` apart after ``t``, each read as it comes (paced or not, as
    ``pacing`` says); returns the time of the last."""
    for _ in range(n):
        t += gap
        if pacing.heard(conn, t, 1) and not conn.paced:
            pacing.pace(conn, t)
    return t


@pytest.mark.parametrize("pause", [0.010, 0.060])
def test_a_pause_is_not_taken_for_the_run_s_rhythm(pair: tuple[socket.socket, ...],
                                                   pause: float) -> None:
    """Known answers: a 0.5 ms run pauses (an evaluation; here 10 ms, paced throughout,
    and 60 ms, handed back to the selector in between) and steps on. Its interval stays
    0.5 ms, so its looks stay 0.3 ms after its reads: with the pause in the mean (8 ms
    after 60 ms) they were 5-7 ms apart, and its hook waited ~2 ms at each of its next
    few steps (36 waits in 1800 steps, 2.2 ms each, in blocks of 150 steps)."""
    pacing = Pacing(interval_s=0.020, after=8)
    conn = _Conn(pair[0])
    t = 50.0
    pacing.heard(conn, t, 1)
    t = _steps(pacing, conn, t, 0.0005, 4 * WINDOW)
    assert conn.paced and pacing._rates[conn].interval == pytest.approx(0.0005)  # type: ignore[arg-type]
    if pause > max(IDLE_INTERVALS * 0.0005, 2 * 0.020):
        pacing.unpace(conn)  # silent that long: the transport hands it back (see due())
    # The window holding the pause ends at its WINDOW-th message; the next is paced by it.
    t = _steps(pacing, conn, t + pause - 0.0005, 0.0005, WINDOW + 1)
    assert conn.paced and pacing._rates[conn].interval == pytest.approx(0.0005)  # type: ignore[arg-type]
    pacing.reschedule()
    assert pacing.next_due == pytest.approx(_look(t, AFTER_DATA, 0.0005))


def _reports(pacing: Pacing, conn: _Conn, t: float, gap: float, n: int) -> float:
    """``n`` every=N reports ``gap`` apart after ``t``, each read as it comes; returns the
    time of the last."""
    for _ in range(n):
        t += gap
        assert not pacing.heard(conn, t, 1)  # (every=N: read as its frames come)
    return t


@pytest.mark.parametrize("second_gap", [0.004, 0.060])
def test_an_every_n_hook_keeps_its_streak_through_one_pause(
        pair: tuple[socket.socket, ...], second_gap: float) -> None:
    """Known answers, every=4, reports 4 ms apart, pace_after 8: after a 60 ms pause (an
    evaluation) the run is paced around its next report at once, not after 8 more
    reports (32 steps), each of which woke the loop: in the overhead bench's blocks of
    200 steps, every=16's reports were nearly all read as they came, each send waking
    the controller (~80 µs of the training thread on a loaded 2-core VM). A second slow
    gap in a row is a slower rhythm: the streak ends."""
    a, _ = pair
    pacing = Pacing(interval_s=0.020, after=8)
    conn = _Conn(a, every=4)
    t = 5.0
    pacing.heard(conn, t, 1)
    t = _reports(pacing, conn, t, 0.004, WINDOW + 8)
    assert conn in pacing._leaving
    t = _reports(pacing, conn, t, 0.060, 1)  # the pause (in the selector by then)
    assert conn in pacing._leaving
    pacing.reschedule()
    assert pacing.next_due == pytest.approx(t + 0.004 - LEAD * 0.001)
    t = _reports(pacing, conn, t, second_gap, 1)
    assert (conn in pacing._leaving) is (second_gap == 0.004)
    if second_gap == 0.004:  # fast again: a later pause is one pause again
        t = _reports(pacing, conn, t, 0.060, 1)
        assert conn in pacing._leaving
    else:  # a new streak: pace_after fast reports
        t = _reports(pacing, conn, t, 0.004, 7)
        assert conn not in pacing._leaving
        _reports(pacing, conn, t, 0.004, 1)
        assert conn in pacing._leaving


def test_a_run_that_slows_down_is_measured_as_it_goes_now(
        pair: tuple[socket.socket, ...]) -> None:
    """Steps PAUSE-plus times longer than before, all of them: the new rhythm, not one
    pause after another. A run gone from 2 ms to 10 ms steps is handed back to the
    selector (slower than interval_s) after a window, as before the pause rule."""
    pacing = Pacing(interval_s=0.004, after=1)
    conn = _Conn(pair[0])
    pacing.heard(conn, 0.0, 1)
    t = _steps(pacing, conn, 0.0, 0.002, 2 * WINDOW)
    assert conn.paced
    slower = 0.002 * (PAUSE + 1)
    still = [pacing.heard(conn, t + i * slower, 1) for i in range(1, WINDOW + 1)]
    assert still[-1] is False and all(still[:-1])
    assert pacing._rates[conn].interval == pytest.approx(slower)  # type: ignore[arg-type]


def _paced_at(pacing: Pacing, conn: _Conn, start: float, gap: float) -> float:
    """Messages ``gap`` apart from ``start`` until ``pacing`` would pace ``conn``; it is
    paced then. Returns the time of the last."""
    t = start
    pacing.heard(conn, t, 1)
    for _ in range(WINDOW + pacing.after):
        t += gap
        if pacing.heard(conn, t, 1):
            pacing.pace(conn, t)
            return t
    raise AssertionError(f"not paced at {gap * 1000:g} ms apart")


def test_many_runs_share_a_wakeup(pair: tuple[socket.socket, ...]) -> None:
    """Looks due close together share one wake-up: the loop wakes at the earliest look's
    latest time (its due time plus SLACK of its interval, at most MAX_SLACK_S) and looks
    at every connection due by then; a look due later waits for its own. At 64 runs x
    100 Hz one look per run and observation, each a wake-up, cost the controller's
    CPU more than the observations did. Runs under SLACK_FROM_S a step get no slack
    (the looks of the test above): a late look had their hooks wait."""
    assert slack(0.002) == 0.0 and slack(0.0039) == 0.0
    a, b = pair
    c, d = socket.socketpair()
    try:
        pacing = Pacing(interval_s=0.02, after=1)
        first, second, third = _Conn(a), _Conn(b), _Conn(c)
        t1 = _paced_at(pacing, first, 0.0, 0.010)
        t2 = _paced_at(pacing, second, 0.0015, 0.010)  # due 1.5 ms later
        t3 = _paced_at(pacing, third, 0.004, 0.010)  # due 4 ms later
        late = slack(0.010)
        assert late == min(SLACK * 0.010, MAX_SLACK_S) > 0.0015  # (the second's inside it)
        wake = pacing.next_due
        assert wake == pytest.approx(t1 + AFTER_DATA * 0.010 + late)
        assert t2 + AFTER_DATA * 0.010 < wake < t3 + AFTER_DATA * 0.010
        assert pacing.due(wake) == ([], [], [])  # nothing came: both looked at, rescheduled
        pacing.reschedule()
        after = [_look(wake, AFTER_NOTHING, 0.010), _look(t3, AFTER_DATA, 0.010)]
        assert pacing.next_due == pytest.approx(min(after))
        d.send(b"x")  # data for the third: read at the next wake-up, whoever it is for
        assert pacing.due(pacing.next_due) == ([third], [], [])
    finally:
        c.close()
        d.close()


def test_a_100_hz_run_is_paced_by_default(pair: tuple[socket.socket, ...]) -> None:
    """An async hook at 100 Hz (10 ms steps) is read on a timer with the default limits;
    it was read as its frames came (4 ms at most), so each of 64 such runs' sends woke
    the controller: 39 % of a core. A run at 40 Hz (25 ms) still is."""
    limits = Limits()
    assert _paced_at(Pacing(limits.pace_interval_s, limits.pace_after), _Conn(pair[0]),
                     0.0, 0.010)
    with pytest.raises(AssertionError, match="not paced"):
        _paced_at(Pacing(limits.pace_interval_s, limits.pace_after), _Conn(pair[1]), 0.0,
                  0.025)


def _status(controller: ControllerProc) -> dict:
    return request({"t": "status"}, controller.socket, timeout=5.0)


def _loop(ctl: lrctl.Controller, opt: torch.optim.Optimizer, until: Callable[[], bool],
          curve: list[float], compute_s: float = 0.0) -> list[float]:
    """Step until ``until()`` (checked every 25 steps) or the curve ends; the LR each
    optimizer step used. ``compute_s``: each step's forward and backward, spent busy."""
    used = []
    for t, loss in enumerate(curve):
        end = time.perf_counter() + compute_s
        while time.perf_counter() < end:
            pass
        ctl.step(loss, grad_norm=1.0 + (t % 5) * 0.1)
        opt.step()
        used.append(opt.param_groups[0]["lr"])
        if t % 25 == 24 and until():
            break
    return used


def _sampling(controller: ControllerProc, into: list[int]) -> Callable[[], bool]:
    """An ``until`` for :func:`_loop` that never stops it and notes how many connections
    the controller paces."""
    def sample() -> bool:
        into.append(_status(controller)["paced"])
        return False
    return sample


def _until_paced(controller: ControllerProc, into: list[int]) -> Callable[[], bool]:
    """An ``until`` for :func:`_loop` that stops it once the controller paces a hook (what
    it said last is in ``into``: the loop's last answer, not a second question asked
    when the hook may already have gone quiet)."""
    def paced() -> bool:
        into.append(_status(controller)["paced"])
        return into[-1] == 1
    return paced


def _opt() -> torch.optim.Optimizer:
    return torch.optim.SGD([torch.nn.Parameter(torch.ones(3))], lr=0.1)


def test_a_fast_async_hook_is_paced_and_decides_exactly_as_unpaced(
        make_controller: Callable[..., ControllerProc]) -> None:
    """The same seeded run against a pacing controller and a ``--no-pacing`` one: the
    same LR at every optimizer step (a policy that moves it every step: each answer is
    applied at exactly the next step either way), the same decisions."""
    policy = str(POLICIES / "rangetest.yaml")
    curve = losses(600, seed=4, spikes=(300,))
    runs = []
    for extra in ([], ["--no-pacing"]):
        controller = make_controller(extra)
        opt = _opt()
        seen_paced = []
        with lrctl.attach(opt, policy=policy, spawn=False, run_name="paced",
                          socket=controller.socket, timeout=30.0) as ctl:
            used = _loop(ctl, opt, _sampling(controller, seen_paced), curve)
        runs.append((used, [d.to_dict() for d in ctl.decisions], seen_paced))
        controller.stop()
    (paced_lrs, paced_decisions, paced_seen), (plain_lrs, plain_decisions, plain_seen) = runs
    assert max(paced_seen) == 1 and set(plain_seen) == {None}  # None: pacing off
    assert paced_lrs == plain_lrs and len(set(paced_lrs)) > 100
    assert paced_decisions == plain_decisions and paced_decisions


def test_an_every_n_hook_is_paced_and_decides_exactly_as_unpaced(
        make_controller: Callable[..., ControllerProc]) -> None:
    """every=4 against a pacing controller and a ``--no-pacing`` one: the same LR at every
    optimizer step and the same decisions, though each report's answer is due the next
    step and the reports come four steps apart; a NaN between reports (reported at once,
    its back-off awaited at the next step) too."""
    policy = str(POLICIES / "rangetest.yaml")
    curve = losses(1200, seed=6, spikes=(401, 702, 703))  # 401, 703: NaN, off the beat
    runs = []
    for extra in ([], ["--no-pacing"]):
        controller = make_controller(extra)
        opt = _opt()
        seen_paced: list[int] = []
        with lrctl.attach(opt, policy=policy, spawn=False, run_name="paced-every",
                          socket=controller.socket, timeout=30.0, every=4) as ctl:
            # A millisecond a step: the looks around each report come in time (a step
            # of tens of µs is read as its reports come, timer slack being that long).
            used = _loop(ctl, opt, _sampling(controller, seen_paced), curve, 0.001)
            reads = _status(controller)["paced_reads"]
        runs.append((used, [d.to_dict() for d in ctl.decisions], seen_paced, reads))
        controller.stop()
    (paced_lrs, paced_decisions, paced_seen, reads), (plain_lrs, plain_decisions, plain_seen,
                                                      no_reads) = runs
    assert max(paced_seen) == 1 and set(plain_seen) == {None} and no_reads is None
    # Reports were read at looks (how many is the machine's load: the bench measures it).
    assert reads > 0
    assert paced_lrs == plain_lrs and len(set(paced_lrs)) > 100
    assert paced_decisions == plain_decisions
    assert {d["step"] for d in paced_decisions if d["action"] == "skip"} >= {401, 703}


@pytest.mark.parametrize("options", [{"sync": True}, {"every": "auto"}])
def test_sync_and_auto_hooks_are_never_paced(controller: ControllerProc,
                                            options: dict) -> None:
    """Sync hooks wait for each answer; every="auto" reports at once a step that stands
    out, and awaits its answer at the next step (a timer that followed its batches would
    have it wait)."""
    opt = _opt()
    paced = []
    with lrctl.attach(opt, policy=str(POLICIES / "default.yaml"), spawn=False,
                      run_name="unpaced", **options) as ctl:
        _loop(ctl, opt, _sampling(controller, paced), losses(800))
    assert paced and max(paced) == 0


def _wait_for(what: Callable[[], bool]) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while not what():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_a_silent_hook_goes_back_to_the_selector_and_a_dead_one_is_seen(
        controller: ControllerProc) -> None:
    """An evaluation pause: read as its frames come again (its next observation is
    answered as before). A hook whose process dies while paced: its hang-up is seen."""
    opt = _opt()
    ctl = lrctl.attach(opt, policy=str(POLICIES / "default.yaml"), spawn=False,
                       run_name="pause", timeout=30.0)
    try:
        paced: list[int] = []
        _loop(ctl, opt, _until_paced(controller, paced), losses(20_000))
        assert paced[-1] == 1  # (asking again would race its going quiet)
        _wait_for(lambda: _status(controller)["paced"] == 0)  # silent: back, no looks
        ctl.step(1.0, grad_norm=1.0)
        assert ctl._link is not None
        assert ctl._link.wait(lambda: ctl._acked >= ctl._reported, DEADLINE_S)
        paced.clear()
        _loop(ctl, opt, _until_paced(controller, paced), losses(20_000))
        assert paced[-1] == 1
        ctl._link._sock.close()  # type: ignore[union-attr]  # the process died, say
        ctl._link._sock = None

        def detached() -> bool:
            runs = request({"t": "runs"}, controller.socket, timeout=5.0)["runs"]
            return [r["connected"] for r in runs] == [False]
        _wait_for(detached)
        assert _status(controller)["paced"] == 0
    finally:
        ctl.close(end_run=False)


class _Echo(QuietHandler):
    """A handler that answers each ``obs`` (the transport's side, in process)."""

    def __init__(self) -> None:
        self.transport: Transport | None = None
        self.handled: list[int] = []

    def handle(self, conn: object, msg: dict) -> None:
        self.handled.append(msg["s"])
        assert self.transport is not None
        self.transport.send(conn, {"t": "lr", "s": msg["s"]})  # type: ignore[arg-type]


@pytest.fixture
def transport() -> Iterator[tuple[Transport, _Echo]]:
    echo = _Echo()
    t = Transport([], echo, limits=Limits(max_messages_per_wake=4))
    echo.transport = t
    yield t, echo
    t.close()


def _peer(t: Transport, paceable: bool = True) -> tuple[Conn, socket.socket]:
    ours, theirs = socket.socketpair()
    conn = t.open_conn(ours, True, "peer")
    conn.run, conn.paceable = "peer", paceable
    return conn, theirs



def test_a_peer_that_hangs_up_has_all_it_sent_handled(
        transport: tuple[Transport, _Echo]) -> None:
    """Past max_messages_per_wake, the rest waited in the connection's backlog, and a
    hang-up dropped it (26 of 30 lost)."""
    t, echo = transport
    conn, theirs = _peer(t)
    theirs.sendall(b"".join(encode({"t": "obs", "s": s}) for s in range(30)))
    theirs.close()
    serve_until(t, lambda: conn.sock.fileno() < 0)
    assert echo.handled == list(range(30))


def test_still_open_sees_a_peer_that_closed(transport: tuple[Transport, _Echo]) -> None:
    """A peer that closed cleanly was still open (a hello without the run's resume token
    could then be refused run_conflict, its hook long gone)."""
    t, _ = transport
    conn, theirs = _peer(t)
    theirs.close()
    assert not t.still_open(conn) and conn.sock.fileno() < 0


def test_the_loop_never_sleeps_deaf(transport: tuple[Transport, _Echo],
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """With a look due in under a millisecond the loop slept in time.sleep, hearing no
    one (a sync hook's answer waited out the sleep); it waits on the selector now."""
    t, echo = transport
    conn, theirs = _peer(t)
    assert t.pacing is not None
    t.pacing.heard(conn, 0.0, 1)
    for i in range(1, WINDOW + 1):
        t.pacing.heard(conn, i * 0.001, 1)
    t.sel.unregister(conn.sock)
    t.pacing.pace(conn, time.monotonic())
    t.pacing.next_due = time.monotonic() + 0.0005
    monkeypatch.setattr(time, "sleep", lambda s: pytest.fail(f"slept {s} s deaf"))
    other, them = _peer(t, paceable=False)
    them.sendall(encode({"t": "obs", "s": 7}))
    ready = t.select(1.0)
    assert [key.data[1] for key, _ in ready] == [other]
    t.serve(ready)
    assert echo.handled == [7]
    t.pacing.next_due = time.monotonic() + 0.0005
    assert t.select(1.0) == []  # nothing came: it returns at the look, still awake
    theirs.close()
    them.close()


def test_many_hooks_paced_at_once_each_apply_every_answer_at_the_next_step(
        controller: ControllerProc) -> None:
    """Four fast async hooks, one process taking turns: the controller paces them all at
    once, and each optimizer step of each run uses exactly the answer to the step
    before (a policy that moves the LR every step), as an in-process engine gives."""
    policy = str(POLICIES / "rangetest.yaml")
    curve = losses(800, seed=5)
    engine = lrctl.load_policy(policy, [0.1])
    expected = [list(engine.applied_lrs)]
    for t, loss in enumerate(curve[:-1]):
        expected.append(engine.observe(t, loss, 1.0))
    opts = [_opt() for _ in range(4)]
    hooks = [lrctl.attach(opt, policy=policy, spawn=False, run_name=f"many-{i}", timeout=30.0)
             for i, opt in enumerate(opts)]
    paced = []
    used: list[list[list[float]]] = [[] for _ in hooks]
    try:
        for t, loss in enumerate(curve):
            for ctl, opt, lrs in zip(hooks, opts, used, strict=True):
                ctl.step(loss, grad_norm=1.0)
                opt.step()
                lrs.append([g["lr"] for g in opt.param_groups])
            if t % 50 == 49:
                paced.append(_status(controller)["paced"])
    finally:
        for ctl in hooks:
            ctl.close()
    assert max(paced) == 4, paced
    assert all(lrs == expected for lrs in used)
    made = [[(d.step, d.action, d.new_lrs) for d in ctl.decisions] for ctl in hooks]
    assert made[0] and all(m == made[0] for m in made)  # the same decisions, every run
