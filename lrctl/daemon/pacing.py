"""Paced reading: a fast async hook's observations wake nobody.

A ``send`` to a socket that a sleeping process waits on wakes that process inside
the sender's system call; on a VM that is an inter-processor interrupt, 20–100 µs
of the *training* thread's time. Profiled in a 0.5 ms digits step (py-spy), that
send was 70 % of an async hook's cost; the same send costs ~4 µs when nobody waits
on the socket. An async hook does not wait for its answers: the answer to step
``t`` is due at step ``t + 1``'s ``optimizer.step()``, a whole step later.

So a connection whose hook said ``pace`` in its hello (async hooks do, every=1 and
every=N alike; see *every=N* below) and whose
observations come fast — its mean interval, measured over a window of ``WINDOW``
messages, within ``Limits.pace_interval_s``, and ``Limits.pace_after`` in a row each
within it of the last — leaves the selector: the transport reads it on a timer
instead, and the hook's sends wake nobody. The timer follows the connection's own
rhythm: after a read that found data, the next look is ``AFTER_DATA`` (0.6) of the
mean interval later; after one that found nothing, ``AFTER_NOTHING`` (¼) of it
later; a read that finds messages queued up (the run sped up) shortens the interval
at once, and a pause inside a window (an evaluation, a checkpoint: its longest gap,
``PAUSE`` times the others' mean) is left out of the window's mean. A look may come
up to ``SLACK`` of the interval (at most ``MAX_SLACK_S``)
after it is due: the loop wakes at the earliest look's latest time and looks at every
connection due by then, and reads every paced connection that has data, so that many
runs share a wake-up (64 runs at 100 Hz: a few hundred wake-ups a second, not one or
two per observation). Runs faster than ``SLACK_FROM_S`` get no slack: a late look
made their hooks wait. An observation so waits about a quarter of a step, plus that
slack and the timer's (~80 µs on the project's VMs), for its read, and is answered at
once, long before the hook needs the answer; a hook that does wait (a late answer,
``state_dict()``, ``close()``) waits about as long more. Decisions are the same either
way: the hook applies the answer to step ``t`` at step ``t + 1`` exactly, waiting for
it if need be.

**every=N.** Such a hook reports every N-th step, and the answer to each report is due
the step after it. Its connection is read as its frames come between reports, and
paced only around the next report: from ``LEAD`` (¾) of a step before it is due (the
last read plus the measured interval between reports; a step is that interval over N)
until it is read, a look every quarter of a step (plus ``SLACK`` for steps of
``SLACK_FROM_S`` and more); not read ``LINGER`` (1) step after it was due, the
connection goes back to the selector to wait for it. One pause between fast reports
(an evaluation: one gap more than ``PAUSE`` mean intervals) keeps the run's streak of
fast reports: the report after it wakes the loop, and the next is paced around again
(a new streak took ``pace_after`` reports, N steps each); a second slow gap in a row
ends the streak. So the report's send wakes
nobody, while between reports a frame out of turn (a non-finite step reported at once,
one with metrics, a ``bye``, a ``snapshot`` request) wakes the loop as it comes, and so
does a report that comes early (the run sped up); inside the window they wait for the
next look. Each period starts again from a read, so an error in the measured interval
does not add up. The controller pays a few timer wake-ups a report (about four), not
one a step. (Two
schedules were tried first. Looks a fraction of a step before each expected report,
measured from the one before, drifted late with any error in the interval, and under
load a third to half of every=4's reports were answered late. A look every step, out
of the selector throughout, cost the controller five to ten times the wake-ups and
CPU of reading the reports as they came (an adversarial pass: 16 every=4 hooks, 3.9 k
wake-ups a second against 1.5 k; the hooks no faster on a 2-core machine), answered
3-10 % of the steps out of turn after the next step had begun, and after a sudden
speed-up a window of reports late.)

A paced connection goes back to the selector when it falls silent
(``IDLE_INTERVALS`` mean intervals, and at least ``2 × pace_interval_s``: an
evaluation pause, the end of a run), when its observations slow down past
``pace_interval_s``, and when the transport must wait for it (a reply it cannot take
now, a close). A hang-up is seen at the next look (``poll`` reports it).

The controller pays for this in wake-ups of its own (a timer per look, on its own
CPU, one to two per observation), not the training thread. Sync hooks, hooks under
``torch.distributed`` (rank 0 waits for each answer inside ``step()``: the hook does
not say ``pace``), and clients that do not say it (a raw protocol client that waits
for each answer before its next frame would only be slowed by a timer) are read as
their frames come.
"""

from __future__ import annotations

import math
import select
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .conn import Conn

__all__ = ["Pacing"]


WINDOW = 8  # messages per estimate of a connection's mean interval
AFTER_DATA = 0.6  # next look after a read that found data, in mean intervals
AFTER_NOTHING = 0.25  # ... after one that found nothing
MIN_LOOK_S = 50e-6  # looks are never closer than this (a burst of replayed frames)
# A look may come this share of the mean interval late (at most MAX_SLACK_S): the loop
# wakes at the earliest such deadline and looks at every connection due by then, so many
# runs' looks share one wake-up instead of one each. Not for runs under SLACK_FROM_S a
# step: their looks come soon anyway, and a late one had their hooks wait for answers
# (measured in a 0.5 ms digits step: 5 % of steps waited, against 2 % without).
SLACK = 0.3
MAX_SLACK_S = 0.003
SLACK_FROM_S = 0.004
IDLE_INTERVALS = 8.0  # silent this many mean intervals: back to the selector
LEAD = 0.75  # every=N: paced from this many steps before the next report is due
LINGER = 1.0  # ... until it is read, or this many steps after it was due
# A window's longest gap, when it is this many times the mean of the others, is a pause
# (an evaluation, a checkpoint, the bench's other arms), not the run's rhythm: it is left
# out of the mean. Counted in, a 60 ms pause made a 0.5 ms run's interval 8 ms, its looks
# 5-7 ms apart, and its hook wait ~2 ms at each of its next few steps.
PAUSE = 4.0
_READY = select.POLLIN | select.POLLPRI | select.POLLERR | select.POLLHUP


@dataclass(slots=True)
class _Rate:
    last: float  # when data last came from the connection (its read)
    interval: float  # mean seconds between its messages, over the last window
    since: float  # the current window's start (see heard)
    streak: int = 0  # fast messages in a row (read as they came)
    msgs: int = 0  # messages read since the window's start
    longest: float = 0.0  # the window's longest gap between messages (see PAUSE)
    due: float = math.inf  # paced: when to look next, at the earliest
    latest: float = math.inf  # ... and at the latest (see SLACK)
    every: int = 1  # the hook reports every N-th step (see every=N in the docstring)
    paused: bool = False  # every=N: the last slow gap was a pause (see _heard_report)
    leave: float = math.inf  # every=N, in the selector: when to pace it (see LEAD)


def _mean_interval(span: float, msgs: int, longest: float) -> float:
    """The mean interval of a window of ``msgs`` messages over ``span`` seconds, its
    longest gap left out when that was a pause (see PAUSE)."""
    rest = (span - longest) / (msgs - 1)
    return rest if longest > PAUSE * rest else span / msgs


def slack(interval: float) -> float:
    """How late a look at a connection ``interval`` seconds apart may come (see SLACK)."""
    return min(interval * SLACK, MAX_SLACK_S) if interval >= SLACK_FROM_S else 0.0


class Pacing:
    """Which connections are read on a timer, and when (see the module docstring)."""

    def __init__(self, interval_s: float, after: int) -> None:
        self.interval_s = interval_s
        self.after = after
        self.next_due = math.inf  # the earliest look due (inf: no paced connection)
        self._rates: dict[Conn, _Rate] = {}
        self._paced: dict[int, Conn] = {}  # fd -> connection
        self._leaving: dict[Conn, _Rate] = {}  # every=N in the selector, paced at its leave
        self.found = 0  # looks that found a connection readable (status: paced_reads)
        self._poll = select.poll()

    def __len__(self) -> int:
        """Connections read on this schedule: paced now, or every=N ones paced around
        each report."""
        return len(self._paced) + len(self._leaving)

    def heard(self, conn: Conn, now: float, count: int) -> bool:
        """``count`` messages were read from ``conn`` at ``now``. Returns whether it should
        be paced from now on (read as they come) or stay paced (paced)."""
        rate = self._rates.get(conn)
        if rate is None:  # measured after a window
            self._rates[conn] = _Rate(now, math.inf, now, every=max(conn.every, 1))
            return False
        gap = (now - rate.last) / max(count, 1)
        rate.last = now
        # The mean interval over a window of messages: a paced connection's reads happen
        # at our looks, so the gap between two reads measures our schedule, not its pace.
        rate.msgs += count
        rate.longest = max(rate.longest, gap)
        if rate.msgs >= WINDOW:
            rate.interval = _mean_interval(now - rate.since, rate.msgs, rate.longest)
            rate.since, rate.msgs, rate.longest = now, 0, 0.0
        if conn.paced and count > 1:  # they queued up: it has sped up, look sooner at once
            rate.interval = max(min(rate.interval, gap), MIN_LOOK_S)
            rate.since, rate.msgs, rate.longest = now, 0, 0.0
        if rate.every > 1:
            return self._heard_report(conn, rate, now, gap, count)
        if conn.paced:
            self._look_after(rate, now, True)
            return rate.interval <= self.interval_s
        rate.streak = rate.streak + count if gap <= self.interval_s else 0
        return rate.streak >= self.after and rate.interval <= self.interval_s

    def _heard_report(self, conn: Conn, rate: _Rate, now: float, gap: float,
                      count: int) -> bool:
        """every=N: a read found data (a report, as a rule). Read as its frames come from
        now on (False), and paced again ``LEAD`` steps before the next report is due, if
        its reports come fast (see the module docstring)."""
        # (A read at a look comes up to a look's spacing after the report: its gap is our
        # lag, not the run's; the window's mean says whether it is still fast.)
        if gap <= self.interval_s or conn.paced:
            rate.streak += count
            rate.paused = False
        elif (not rate.paused and rate.interval <= self.interval_s
              and gap > PAUSE * rate.interval):
            # One pause (an evaluation, a checkpoint) between fast reports keeps the streak,
            # as it is left out of the mean: reset, AFTER reports (AFTER × N steps) woke
            # the loop after every pause. A second slow gap in a row is a slower rhythm.
            rate.paused = True
        else:
            rate.streak = 0
        rate.due = rate.latest = math.inf
        if rate.streak >= self.after and rate.interval <= self.interval_s:
            step = rate.interval / rate.every
            rate.leave = now + max(rate.interval - LEAD * step, MIN_LOOK_S)
            self._leaving[conn] = rate
            self.next_due = min(self.next_due, rate.leave)
        else:
            rate.leave = math.inf
            self._leaving.pop(conn, None)
        return False

    def pace(self, conn: Conn, now: float) -> None:
        rate = self._rates[conn]
        self._look_after(rate, now, True)
        fd = conn.sock.fileno()
        self._paced[fd] = conn
        self._poll.register(fd, _READY)
        conn.paced = True
        self.next_due = min(self.next_due, rate.latest)

    def unpace(self, conn: Conn) -> None:
        """``conn`` goes back to the selector (the caller registers it)."""
        conn.paced = False
        for fd, other in list(self._paced.items()):
            if other is conn:
                del self._paced[fd]
                self._poll.unregister(fd)
        rate = self._rates.get(conn)
        if rate is not None:
            if rate.every == 1:  # (every=N: its next report's read says, see leave)
                rate.streak = 0
            rate.due = rate.latest = math.inf

    def forget(self, conn: Conn) -> None:
        """``conn`` is closed."""
        if conn.paced:
            self.unpace(conn)
        self._rates.pop(conn, None)
        self._leaving.pop(conn, None)

    def due(self, now: float) -> tuple[list[Conn], list[Conn], list[Conn]]:
        """The paced connections to read now (something came, or they hung up), those to
        hand back to the selector (silent too long; every=N: its report not come
        ``LINGER`` steps after it was due), and the every=N ones to take out of it and
        :meth:`pace` (its next report is due in ``LEAD`` steps). Empty before
        :attr:`next_due`."""
        if now < self.next_due:
            return [], [], []
        leaving = [conn for conn, rate in self._leaving.items() if rate.leave <= now]
        for conn in leaving:
            self._leaving.pop(conn).leave = math.inf
        readable = {fd for fd, _ in self._poll.poll(0)} if self._paced else set()
        read: list[Conn] = []
        idle: list[Conn] = []
        for fd, conn in self._paced.items():
            rate = self._rates[conn]
            if fd in readable:
                self.found += 1
                read.append(conn)  # heard() moves its next look, if the read finds data
                self._look_after(rate, now, False)
            elif rate.due <= now:
                if now - rate.last > max(IDLE_INTERVALS * rate.interval, 2 * self.interval_s) \
                        or (rate.every > 1 and now - rate.last >= rate.interval * (
                            1.0 + LINGER / rate.every)):
                    idle.append(conn)
                else:
                    self._look_after(rate, now, False)
        return read, idle, leaving

    def reschedule(self) -> None:
        """Recompute :attr:`next_due`, the loop's next wake-up for a look (after
        :meth:`due`'s connections were handled): the earliest of the looks' latest times
        and of the every=N connections' times to leave the selector."""
        self.next_due = min(min((self._rates[c].latest for c in self._paced.values()),
                                default=math.inf),
                            min((r.leave for r in self._leaving.values()), default=math.inf))

    @staticmethod
    def _look_after(rate: _Rate, now: float, found: bool) -> None:
        """The next look at a connection read at ``now``: ``found``, whether that read
        found data (see the module docstring)."""
        step = rate.interval / rate.every  # (every=N: paced only around a report)
        wait = step * (AFTER_DATA if found and rate.every == 1 else AFTER_NOTHING)
        rate.due = now + max(wait, MIN_LOOK_S)
        rate.latest = rate.due + slack(step)
