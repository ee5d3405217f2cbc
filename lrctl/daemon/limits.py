"""The controller's tunable limits, in one place: pass your own to :class:`Server` (tests do)."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

__all__ = ["DEFAULT_SESSION_TIMEOUT", "Limits"]

DEFAULT_SESSION_TIMEOUT = 600.0  # seconds a hook-less run stays in memory


@dataclass(frozen=True)
class Limits:
    """How much the controller holds, and how often it does its periodic work."""

    # Observations between a run's hot-path checkpoints, whatever the time: it bounds what
    # a hook replays after a controller crash (its buffer holds 100 000). Most runs are
    # checkpointed by save_interval first; at 256, a run sending thousands a second was
    # checkpointed ~11 times a second, a fifth of the controller's CPU at 16 unpaced runs.
    save_every: int = 4096
    save_interval: float = 1.0  # seconds unsaved observations wait for a checkpoint at most
    # ... stretched with many runs so that they take at most this many timed checkpoints a
    # second in all (64 runs: one each every 4 s). Each costs the loop ~0.5 ms (encoding
    # the policies' windows) and the writer thread its fsyncs: at 64 runs x 100 Hz, once a
    # second each was 6-7 % of a core.
    timed_saves_per_s: float = 16.0
    # Timed checkpoints encoded in one loop wake-up; the rest wait for the next ones (after a
    # stall every run is due at once: their encodes in one go held every answer).
    max_saves_per_wake: int = 8
    # -- connections (see admission.py) ---------------------------------------------------
    max_connections: int = 1024  # at the cap, the oldest peer without a run makes room
    max_remote_connections: int = 256  # TCP peers may not take the slots local hooks need
    quiet_timeout_s: float = 10.0  # a peer without a run, silent this long, is closed
    accept_pause_s: float = 0.5  # out of file descriptors: stop accepting for this long
    # -- memory per peer ------------------------------------------------------------------
    max_unauthed_frame: int = 4096  # bytes a TCP peer may send in a frame before its token
    # bytes of unfinished frames, and of frames sent before the welcome, held for peers
    # without a run, all such peers together
    max_partial_bytes: int = 32 << 20
    # JSON objects and arrays a frame may hold: decoded, an empty one takes twenty times
    # its bytes, and decoding is C code that holds the loop (a hook's frames hold a few,
    # a hello with a run's state a few dozen: its windows are lists of numbers)
    max_frame_containers: int = 4096
    # bytes a peer may send after its hello before the welcome (held undecoded; a hook
    # sends nothing then)
    max_early_bytes: int = 1 << 20
    max_outbuf: int = 8 << 20  # bytes of replies a peer may leave unread before it is closed
    # ... and all peers together: past this, the peer with the most unread is closed (so
    # that many peers that never read, each under max_outbuf, cannot exhaust the memory
    # every run's controller lives in: 1 024 of them at 8 MiB each would be 8 GiB). Checked
    # as a peer's unread passes each 64 KiB: it may run past by under 64 KiB a peer.
    max_outbuf_total: int = 128 << 20
    linger_s: float = 2.0  # a closed peer's last frames wait this long for a read of them
    max_drain: int = 16 << 20  # bytes read from a hook that hung up, to apply what it sent
    # Messages of one peer handled per loop wake-up, and the loop's time spent on them; the
    # rest wait for the next wake-up, so a peer that sends thousands at once (2 000
    # 'status' requests, batched observations under a costly policy, snapshots of a large
    # session) cannot stall others.
    max_messages_per_wake: int = 256
    max_wake_share_s: float = 0.005
    # ... and with many peers busy at once, the wake-up's time is split among them (each
    # still gets at least min_wake_share_s): so many peers, one user's or several, cannot
    # keep a hook's answer waiting for a wake-up of seconds either.
    wake_busy_s: float = 0.02
    min_wake_share_s: float = 0.0002
    # -- hellos (see handshake.py) --------------------------------------------------------
    hello_budget_s: float = 2.0  # a hello's policy must parse (off the loop) within this
    max_pending_hellos: int = 1024  # hellos waiting for their policy to parse (or refused)
    # ... and their frames' bytes, all together (a waiting hello is held decoded: a run's
    # state in it can take twenty times its bytes); one hello is always taken
    max_pending_hello_bytes: int = 4 << 20
    housekeeping_interval: float = 1.0  # seconds between evictions and socket checks
    # An evicted run's checkpoint (its hook gone: a training process killed) is kept this
    # long since it was last written, for its hook's return; a start does not restore it.
    detached_keep_s: float = 30 * 86400.0
    prune_interval_s: float = 3600.0  # between looks for detached checkpoints past it
    # Values the policies of runs without a hook may hold, all together (~40 bytes each in
    # memory): past it the longest gone are evicted (checkpointed, resumable). A hello may
    # bring a run's saved state, ~20 times its bytes in memory, and the run was held for
    # --session-timeout after its peer left: a flood of them took 811 MiB in 8 s.
    max_hookless_values: int = 1 << 22
    # Checkpoints of runs with a hook stop being written this long after a SIGTERM.
    shutdown_budget_s: float = 0.5
    # -- paced reading (see pacing.py) ----------------------------------------------------
    # An async hook whose observations come at least this often, pace_after in a row, is
    # read on a timer: its sends stop waking the controller (20-100 us each of the training
    # thread's time on a VM), and the looks of many runs share its wake-ups. 20 ms: a run at
    # 50 Hz or more (at 4 ms, 64 runs at 100 Hz were read as their frames came, each
    # observation a wake-up: 39 % of a core); a slower run is read as its frames come.
    pace_interval_s: float = 0.02
    pace_after: int = 8

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
                raise ValueError(f"Limits.{f.name} must be a positive number, but got "
                                 f"{f.name}={value!r}.")
