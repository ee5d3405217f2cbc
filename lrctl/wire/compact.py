"""Compact frames: the two per-step messages in binary, for peers that agreed to them.

Every training step sends an ``obs`` and gets an ``lr`` answer. As JSON, formatting
and parsing them cost a few µs a side, on the training thread and on the controller's
loop alike (two to three times the warm figures inside a training loop, where caches
are cold). Measured warm: an ``obs`` takes 0.40 µs to write and 0.57 µs to read compact,
against 2.37 and 2.12 µs as JSON; an ``lr`` answer 1.48 and 2.38 µs, against 2.39 and
2.79 µs (building its dict is most of what is left).

A hook says ``"compact": 1`` in its hello; a controller that speaks them answers
``"compact": 1`` in its welcome (the integer 1: ``true`` or ``1.0`` is no), and from
then on each side sends the plain per-step messages compact (and JSON for anything
else: an ``obs`` with metrics or a non-finite value, an ``lr`` answer that carries
decisions). Peers that did not agree never get one. Both sides' decoders read both
kinds from any peer: a compact frame is the same message as its JSON one, so a peer
that sends one unasked gains nothing (a broken one closes its connection, as a broken
JSON frame does).

A compact frame's 4-byte big-endian length has its top bit set (no JSON frame comes
near 2 GiB); the body, little-endian:

* ``obs``: ``u8 1``, ``u8 flags`` (1: a loss, 2: a grad norm, 4: the LRs used follow,
  8: held steps follow), ``i64 step``, ``f64 loss``, ``f64 grad norm`` (0.0 where
  absent): 26 bytes; with flag 4, ``u16 n`` and ``n × f64``: the LRs the step runs on
  (``u``); then with flag 8, the steps an ``every="auto"`` hook held since its last
  report: ``u16 k`` (1 to ``MAX_HELD``), ``u8 held flags`` (1: grad norms follow),
  ``k × f64`` losses (``pl``), with held flag 1 ``k × f64`` grad norms (``pg``; NaN
  where a step had none, which reads as null: a held value is never NaN), ``u16 r``
  and ``r`` runs of the LRs they ran on (``pu``), each ``u16 count``, then ``u16 n``
  and ``n × f64`` as for ``u``.
* ``lr``: ``u8 2``, ``u8 flags`` (1: skip, 2: stop), ``i64 step``, ``i64 saved_step``,
  ``u8 len(mode)``, the mode (ASCII letters and ``_``), ``u16 n``, ``n × f64`` LRs.

Numbers are finite (but for that NaN); anything else, any unknown kind or flag, a
wrong length, is a protocol error. The decoded message is exactly the dict the JSON
frame gives (see :func:`~lrctl.wire.messages.plain_message`), so nothing downstream
can tell. A batch report was JSON until the held steps' form: for 20 held steps ~25 µs
to write and ~13 µs to read warm, and 137 µs to write timed in place inside a digits
loop, a third of the report step's cost.
"""

from __future__ import annotations

import functools
import math
import struct
from collections.abc import Sequence
from typing import Any

from .errors import ProtocolError
from .frames import HEADER, MAX_FRAME
from .messages import MAX_HELD, encode_obs

__all__ = ["COMPACT_BIT", "MAX_GROUPS", "compact_agreed", "decode_compact", "encode_lr_compact",
           "encode_obs_compact", "to_json_frame"]

COMPACT_BIT = 0x8000_0000
MAX_GROUPS = 4096  # LRs one compact lr frame may carry (more: the JSON frame)
_OBS = struct.Struct("<BBqdd")
_LR_HEAD = struct.Struct("<BBqqB")
_COUNT = struct.Struct("<H")
_HELD = struct.Struct("<HB")  # held steps, held flags
_NO_GRAD = math.nan  # a held step without a grad norm (a held value is always finite)
_MAX_STEP = 2**62
_MODE_CHARS = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz_")
_OBS_HEADER = HEADER.pack(COMPACT_BIT | _OBS.size)


def compact_agreed(value: object) -> bool:
    """Whether a hello's or a welcome's ``compact`` says yes: the integer 1, nothing else."""
    return type(value) is int and value == 1


def encode_obs_compact(step: int, loss: float | None, grad_norm: float | None,
                       used: list[float] | None = None,
                       prior: Sequence[float] | None = None,
                       prior_grads: Sequence[float | None] | None = None,
                       prior_used: Sequence[tuple[int, Sequence[float]]] | None = None,
                       ) -> bytes | None:
    """A compact plain ``obs`` frame (with the LRs the step runs on, ``used``, and the
    steps held before it, ``prior``, ``prior_grads``, ``prior_used``, as for
    :func:`~lrctl.wire.messages.encode_obs`); ``None`` for anything else (a non-finite
    value, a step out of range, too many groups): the JSON frame carries those."""
    flags = 0
    if loss is not None:
        if type(loss) is not float or loss - loss != 0.0:
            return None
        flags = 1
    else:
        loss = 0.0
    if grad_norm is not None:
        if type(grad_norm) is not float or grad_norm - grad_norm != 0.0:
            return None
        flags |= 2
    else:
        grad_norm = 0.0
    if type(step) is not int or not 0 <= step <= _MAX_STEP:
        return None
    held = b""
    if prior:
        steps = _held_steps(prior, prior_grads, prior_used)
        if steps is None:
            return None
        held = steps
        flags |= 8
    if used is None:
        if not held:
            return _OBS_HEADER + _OBS.pack(1, flags, step, loss, grad_norm)
        size = _OBS.size + len(held)
        if size > MAX_FRAME:  # (the controller would close the connection: JSON says why)
            return None
        return (HEADER.pack(COMPACT_BIT | size)
                + _OBS.pack(1, flags, step, loss, grad_norm) + held)
    n = len(used)
    if n > MAX_GROUPS or not _all_finite(used):
        return None
    layout = _obs_layout(n)
    size = layout.size + len(held)
    if size > MAX_FRAME:
        return None
    return HEADER.pack(COMPACT_BIT | size) + layout.pack(
        1, flags | 4, step, loss, grad_norm, n, *used) + held


def _all_finite(values: Sequence[float]) -> bool:
    for x in values:  # noqa: SIM110 (a loop: all() of a generator costs twice as much)
        if type(x) is not float or x - x != 0.0:
            return False
    return True


def _held_steps(losses: Sequence[float], grads: Sequence[float | None] | None,
                runs: Sequence[tuple[int, Sequence[float]]] | None) -> bytes | None:
    """The held steps' part of a compact ``obs`` body (flag 8); ``None`` where the JSON
    frame must carry them (a non-finite value, too many of them)."""
    k = len(losses)
    if k > MAX_HELD or not _all_finite(losses):
        return None
    values = list(losses)
    if grads is not None:
        if len(grads) != k:
            return None
        for g in grads:
            if g is None:
                values.append(_NO_GRAD)
            elif type(g) is not float or g - g != 0.0:
                return None
            else:
                values.append(g)
    runs = runs or ()
    if len(runs) > k:
        return None
    parts = [_HELD.pack(k, 1 if grads is not None else 0), _floats(len(values)).pack(*values),
             _COUNT.pack(len(runs))]
    for count, lrs in runs:
        n = len(lrs)
        if type(count) is not int or not 0 < count <= k or n > MAX_GROUPS \
                or not _all_finite(lrs):
            return None
        parts.append(_COUNT.pack(count) + _COUNT.pack(n) + _floats(n).pack(*lrs))
    return b"".join(parts)


@functools.lru_cache(maxsize=256)
def _floats(n: int) -> struct.Struct:
    return struct.Struct(f"<{n}d")


@functools.lru_cache(maxsize=64)
def _obs_layout(n: int) -> struct.Struct:
    """The whole ``obs`` body with ``n`` LRs used."""
    return struct.Struct(f"<BBqddH{n}d")


def encode_lr_compact(step: int, lrs: list[float], skip: bool, stop: bool, mode: str,
                      saved_step: int) -> bytes | None:
    """A compact plain ``lr`` frame (no decisions); ``None`` for anything unusual."""
    if (type(step) is not int or type(saved_step) is not int or type(skip) is not bool
            or type(stop) is not bool or not -1 <= step <= _MAX_STEP
            or not -1 <= saved_step <= _MAX_STEP or len(lrs) > MAX_GROUPS):
        return None
    for x in lrs:
        if type(x) is not float or x - x != 0.0:  # (finite)
            return None
    name = _MODE_BYTES.get(mode) if type(mode) is str else None
    if name is None:
        name = _mode_bytes(mode)
        if name is None:
            return None
    layout = _lr_layout(len(name), len(lrs))
    return HEADER.pack(COMPACT_BIT | layout.size) + layout.pack(
        2, skip | stop << 1, step, saved_step, len(name), name, len(lrs), *lrs)


@functools.lru_cache(maxsize=64)
def _lr_layout(mode_size: int, n: int) -> struct.Struct:
    """The whole ``lr`` body for a mode of ``mode_size`` bytes and ``n`` LRs."""
    return struct.Struct(f"<BBqqB{mode_size}sH{n}d")


# Modes seen valid, both ways (a run has two or three): checked once, not per frame.
_MODE_BYTES: dict[str, bytes] = {}
_MODE_NAMES: dict[bytes, str] = {}
_MAX_MODES = 64


def _mode_bytes(mode: object) -> bytes | None:
    if type(mode) is not str or not 0 < len(mode) <= 32 or not mode.isascii():
        return None
    name = mode.encode("ascii")
    if not _MODE_CHARS.issuperset(name):
        return None
    if len(_MODE_BYTES) < _MAX_MODES:
        _MODE_BYTES[mode] = name
    return name


def _mode_name(name: bytes) -> str | None:
    mode = _MODE_NAMES.get(name)
    if mode is None and 0 < len(name) <= 32 and _MODE_CHARS.issuperset(name):
        mode = name.decode("ascii")
        if len(_MODE_NAMES) < _MAX_MODES:
            _MODE_NAMES[name] = mode
    return mode


def decode_compact(body: bytes) -> dict[str, Any]:
    """A compact frame's body → its message (the dict its JSON frame gives)."""
    kind = body[0] if body else 0
    if kind == 1 and len(body) >= _OBS.size:
        _, flags, step, loss, grad = _OBS.unpack_from(body)
        if flags & ~15 or not 0 <= step <= _MAX_STEP or loss - loss != 0.0 \
                or grad - grad != 0.0:
            raise ProtocolError("bad compact obs frame", "bad_message")
        msg = {"v": 1, "t": "obs", "s": step, "l": loss if flags & 1 else None,
               "g": grad if flags & 2 else None}
        at = _OBS.size
        used = None
        if flags & 4:
            used, at = _lrs_at(body, at, "obs")
        if flags & 8:
            at = _held_at(body, at, msg)
        if at != len(body):
            raise ProtocolError("bad compact obs frame", "bad_message")
        if used is not None:
            msg["u"] = used  # (after the held steps: the keys in the JSON frame's order)
        return msg
    if kind == 2 and len(body) >= _LR_HEAD.size:
        _, flags, step, saved, size = _LR_HEAD.unpack_from(body)
        at = _LR_HEAD.size + size
        if flags & ~3 or not 0 < size <= 32 or len(body) < at + _COUNT.size:
            raise ProtocolError("bad compact lr frame", "bad_message")
        (n,) = _COUNT.unpack_from(body, at)
        if n > MAX_GROUPS or len(body) != at + _COUNT.size + 8 * n:
            raise ProtocolError("bad compact lr frame", "bad_message")
        values = _lr_layout(size, n).unpack(body)
        mode = _mode_name(values[5])
        if mode is None:
            raise ProtocolError("bad compact lr frame", "bad_message")
        lrs = list(values[7:])
        for x in lrs:
            if x - x != 0.0:
                raise ProtocolError("compact lr frame with a non-finite LR", "bad_message")
        return {"v": 1, "t": "lr", "s": step, "lrs": lrs, "skip": bool(flags & 1),
                "stop": bool(flags & 2), "mode": mode, "saved_step": saved,
                "d": []}
    raise ProtocolError(f"unknown compact frame (kind {kind}, {len(body)} bytes)",
                        "bad_message")


def _lrs_at(body: bytes, at: int, kind: str) -> tuple[list[float], int]:
    """``u16 n`` and ``n`` finite f64 at ``at``; and where they end."""
    if len(body) < at + _COUNT.size:
        raise ProtocolError(f"bad compact {kind} frame", "bad_message")
    (n,) = _COUNT.unpack_from(body, at)
    at += _COUNT.size
    if n > MAX_GROUPS or len(body) < at + 8 * n:
        raise ProtocolError(f"bad compact {kind} frame", "bad_message")
    values = list(_floats(n).unpack_from(body, at))
    if not _all_finite(values):
        raise ProtocolError(f"compact {kind} frame with a non-finite LR", "bad_message")
    return values, at + 8 * n


def _held_at(body: bytes, at: int, msg: dict[str, Any]) -> int:
    """The held steps (flag 8) at ``at`` into ``msg`` (``pl``, ``pg``, ``pu``, as the
    JSON frame has them); where they end."""
    if len(body) < at + _HELD.size:
        raise ProtocolError("bad compact obs frame", "bad_message")
    k, held_flags = _HELD.unpack_from(body, at)
    at += _HELD.size
    width = 2 * k if held_flags & 1 else k
    if not 0 < k <= MAX_HELD or held_flags & ~1 or len(body) < at + 8 * width:
        raise ProtocolError("bad compact obs frame: its held steps", "bad_message")
    values = _floats(width).unpack_from(body, at)
    at += 8 * width
    losses = list(values[:k])
    if not _all_finite(losses):
        raise ProtocolError("compact obs frame with a non-finite held loss", "bad_message")
    msg["pl"] = losses
    if held_flags & 1:
        grads: list[float | None] = []
        for g in values[k:]:
            if g != g:
                grads.append(None)
            elif g - g != 0.0:
                raise ProtocolError("compact obs frame with an infinite held grad norm",
                                    "bad_message")
            else:
                grads.append(g)
        msg["pg"] = grads
    if len(body) < at + _COUNT.size:
        raise ProtocolError("bad compact obs frame: its held steps", "bad_message")
    (r,) = _COUNT.unpack_from(body, at)
    at += _COUNT.size
    if r > k:
        raise ProtocolError("bad compact obs frame: more runs than held steps",
                            "bad_message")
    runs: list[list[Any]] = []
    for _ in range(r):
        if len(body) < at + _COUNT.size:
            raise ProtocolError("bad compact obs frame: its held steps", "bad_message")
        (count,) = _COUNT.unpack_from(body, at)
        lrs, at = _lrs_at(body, at + _COUNT.size, "obs")
        runs.append([count, lrs])
    if runs:
        msg["pu"] = runs
    return at


def to_json_frame(frame: bytes) -> bytes:
    """``frame`` as its JSON frame (a JSON frame as it is): for a peer that does not
    speak compact frames, such as a controller the hook reconnected to."""
    (raw,) = HEADER.unpack_from(frame)
    if not raw & COMPACT_BIT:
        return frame
    msg = decode_compact(frame[HEADER.size:])
    if msg["t"] != "obs":
        raise ProtocolError("only obs frames are replayed", "bad_message")
    return encode_obs(msg["s"], msg["l"], msg["g"], used=msg.get("u"), prior=msg.get("pl"),
                      prior_grads=msg.get("pg"), prior_used=msg.get("pu"))
