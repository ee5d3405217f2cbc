"""The wire protocol between hooks, operator verbs and the controller (version 1).

Pure: frames in, frames out; no sockets here (see :mod:`lrctl._link` and
:mod:`lrctl.daemon`), so the format is testable by round trip.

Framing
-------
Every frame is a 4-byte big-endian length followed by that many bytes of UTF-8
JSON encoding one object. JSON is strict: no ``NaN``/``Infinity`` literals; a
non-finite number travels as the string ``"nan"``, ``"inf"`` or ``"-inf"``.
Frames are capped: :data:`MAX_HELLO` for a connection's first frame (it carries
the policy text), :data:`MAX_FRAME` for every later one. A receiver that gets an
oversized length, bad UTF-8, bad JSON or a non-object answers with an ``error``
frame and closes the connection. Every frame carries ``"v": 1``; a frame of an
unknown version is refused with an ``error`` frame naming both versions.

Messages (field ``t`` is the type)
----------------------------------
Hook → controller:

* ``hello``: ``run`` (run key), ``run_name``, ``policy`` ``{text, source}``,
  ``lrs`` (initial LR per param group), ``groups``, ``world_size``, ``mlflow``
  ``{run_id, tracking_uri}``, ``cwd``, ``watch`` (optional, default true:
  ``false`` pins the run to the policy version it starts with), ``total_steps``
  (optional: the run's length, for ``anneal``), ``session`` (optional: the
  run's state from ``snapshot``, kept in the user's checkpoint: the run resumes
  from it), ``token`` (TCP only).
* ``obs``: ``s`` step, ``l`` loss, ``g`` grad norm (each may be absent or null),
  ``m`` named metrics (optional object), ``o`` (optional, true: a mixed-precision
  overflow step that the ``GradScaler`` skipped; never divergence), ``b``
  (optional: the loop's own LR per group for this step, ``base="loop"``).
* ``snapshot``: the run's state after every observation so far → ``snapshot``
  ``{s, session}``.
* ``bye``: the run ended; the controller closes the session.

Controller → hook:

* ``welcome``: ``run``, ``last_step`` (-1 before any observation), ``saved_step``,
  ``lrs``, ``mode``, ``restored``, ``policy_sha256``. The hook replays the
  observations it holds with a step greater than ``last_step``.
* ``lr``: ``s`` (the observation step it answers, or -1 for a push from an
  operator or a live policy reload), ``lrs`` for the next step, ``skip``, ``stop``, ``mode``,
  ``saved_step`` (the last step checkpointed to disk), ``d`` (new decisions,
  each a ``Decision.to_dict()``).

Operator → controller (one request, one answer, on its own connection; over
TCP each request carries ``token``):

* ``runs`` → ``runs`` ``{runs: [{run, run_name, step, lrs, mode, connected,
  override, last_decision, policy_source, policy_sha256, watching, reloads,
  reload_error, store_error}]}``
* ``set_lr`` ``{run, lr, steps}`` (``steps`` null: until cleared), ``clear_lr``
  ``{run}``, ``pause`` ``{run}``, ``resume`` ``{run}`` → ``ok`` ``{message}``
* ``reload`` ``{run}`` (``run`` absent: every watched run) → ``ok``
  ``{message, decisions}``; a pinned run answers ``error`` ``pinned``
* ``status`` → ``status`` ``{pid, version, runs, connected, uptime_s, socket,
  state_dir, watching, errors}``

Either side: ``error`` ``{code, message, fatal}``. ``fatal`` means the sender
closes the connection after it.
"""

from __future__ import annotations

import json
import math
import re
import struct
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = [
    "MAX_FRAME",
    "MAX_HELLO",
    "VERSION",
    "FrameDecoder",
    "ProtocolError",
    "encode",
    "encode_lr",
    "encode_obs",
    "float_in",
    "float_out",
    "get_float",
    "get_int",
    "get_str",
]

VERSION = 1
MAX_HELLO = 1 << 20
MAX_FRAME = 64 << 10
_HEADER = struct.Struct(">I")


class ProtocolError(ValueError):
    """A frame or a message that breaks the protocol; ``code`` is machine-readable."""

    def __init__(self, message: str, code: str = "bad_frame") -> None:
        super().__init__(message)
        self.code = code


def float_out(x: float | None) -> float | str | None:
    """A float for strict JSON: non-finite values become strings."""
    if x is None or math.isfinite(x):
        return x
    return "nan" if math.isnan(x) else ("inf" if x > 0 else "-inf")


def float_in(x: Any, name: str) -> float:
    """The inverse of :func:`float_out`, rejecting anything that is not a number."""
    if isinstance(x, str):
        if x in ("nan", "inf", "-inf"):
            return float(x)
    elif isinstance(x, (int, float)) and not isinstance(x, bool):
        try:
            return float(x)
        except OverflowError:  # a JSON integer of hundreds of digits
            raise ProtocolError(f"{name} is too large: {str(x)[:20]}…", "bad_message") from None
    raise ProtocolError(f"{name} must be a number, but got {x!r}", "bad_message")


def encode(msg: Mapping[str, Any], limit: int = MAX_FRAME) -> bytes:
    """One frame. ``msg`` gets ``v`` added; non-finite floats must already be strings."""
    body = json.dumps({"v": VERSION, **msg}, separators=(",", ":"), allow_nan=False,
                      ensure_ascii=False).encode("utf-8")
    if len(body) > limit:
        raise ProtocolError(f"frame of {len(body)} bytes exceeds the limit of {limit}",
                            "too_large")
    return _HEADER.pack(len(body)) + body


def encode_obs(step: int, loss: float | None, grad_norm: float | None,
               metrics: Mapping[str, float] | None = None, *, overflow: bool = False,
               base: Sequence[float] | None = None) -> bytes:
    """An ``obs`` frame, formatted by hand: this runs once per training step.

    ``repr`` of a finite float is valid JSON; the rare fields go through
    :func:`encode`: metrics (``m``), a mixed-precision overflow step (``o``: the
    ``GradScaler`` skipped it; no grad norm), and the loop's own LRs for this step
    (``b``, ``attach(..., base="loop")``: the controller records ``b × lrs /
    initial_lrs`` as the LRs used).
    """
    if metrics or overflow or base is not None:
        msg: dict[str, Any] = {"t": "obs", "s": step, "l": float_out(loss),
                               "g": float_out(grad_norm)}
        if metrics:
            msg["m"] = {k: float_out(float(v)) for k, v in metrics.items()}
        if overflow:
            msg["o"] = True
        if base is not None:
            msg["b"] = [float_out(float(v)) for v in base]
        return encode(msg)
    body = f'{{"v":1,"t":"obs","s":{int(step)},"l":{_num(loss)},"g":{_num(grad_norm)}}}'.encode(
        "ascii")
    return _HEADER.pack(len(body)) + body


def encode_lr(step: int, lrs: list[float], skip: bool, stop: bool, mode: str,
              saved_step: int, limit: int = MAX_FRAME) -> bytes | None:
    """A plain ``lr`` frame (no decisions), formatted by hand: the controller sends one
    per observation. The bytes are exactly what :func:`encode` writes for
    ``{"t": "lr", "s": step, "lrs": lrs, "skip": skip, "stop": stop, "mode": mode,
    "saved_step": saved_step, "d": []}`` (``repr`` of a finite float is what
    ``json.dumps`` writes); ``None`` for anything unusual (a non-finite or non-float
    LR, an odd mode, a frame over ``limit``): :func:`encode` handles, or refuses, those.
    """
    if (type(step) is not int or type(saved_step) is not int or type(skip) is not bool
            or type(stop) is not bool or type(mode) is not str or not _PLAIN_MODE(mode)):
        return None
    isfinite = math.isfinite
    for x in lrs:
        if type(x) is not float or not isfinite(x):
            return None
    body = (f'{{"v":1,"t":"lr","s":{step!r},"lrs":[{",".join(map(repr, lrs))}],'
            f'"skip":{"true" if skip else "false"},"stop":{"true" if stop else "false"},'
            f'"mode":"{mode}","saved_step":{saved_step!r},"d":[]}}').encode("ascii")
    if len(body) > limit:
        return None
    return _HEADER.pack(len(body)) + body


_PLAIN_MODE = re.compile(r"[A-Za-z_]{1,32}").fullmatch


def _num(x: float | None) -> str:
    if x is None:
        return "null"
    if math.isfinite(x):
        return repr(float(x))
    return '"nan"' if math.isnan(x) else ('"inf"' if x > 0 else '"-inf"')


class FrameDecoder:
    """Incremental decoder: feed bytes, get whole messages.

    The first frame may be up to ``first_limit`` bytes, later ones up to ``limit``.
    ``gated``: return the first frame alone and decode nothing after it until
    :meth:`open_gate` (the controller checks a TCP peer's token before it parses
    anything large). Errors are :class:`ProtocolError`; after one the stream is unusable.
    """

    def __init__(self, limit: int = MAX_FRAME, first_limit: int | None = None, *,
                 gated: bool = False) -> None:
        self.limit = limit
        self._next_limit = first_limit if first_limit is not None else limit
        self._buf = bytearray()
        self._gated = gated
        self._decoded = 0  # frames decoded while gated (at most one)

    @property
    def buffered(self) -> int:
        """Bytes held: an unfinished frame (or, while gated, what followed the first)."""
        return len(self._buf)

    def open_gate(self, next_limit: int) -> list[dict[str, Any]]:
        """Decode on: the next frame may be up to ``next_limit`` bytes. Returns the whole
        messages already buffered."""
        self._gated = False
        self._next_limit = next_limit
        return self.feed(b"")

    def feed(self, data: bytes) -> list[dict[str, Any]]:
        buf = self._buf
        if buf:  # the rest of a frame: copy out only once a whole frame is in
            buf += data
            if len(buf) < 4 or len(buf) < 4 + _HEADER.unpack_from(buf)[0] <= (
                    self._next_limit + 4):
                return []
            data = bytes(buf)
            buf.clear()
        out = []
        pos, end = 0, len(data)
        while end - pos >= 4 and not (self._gated and self._decoded):
            (size,) = _HEADER.unpack_from(data, pos)
            if size > self._next_limit:
                raise ProtocolError(
                    f"frame of {size} bytes exceeds the limit of {self._next_limit}", "too_large")
            if end - pos - 4 < size:
                break
            body = data[pos + 4:pos + 4 + size]
            pos += 4 + size
            self._next_limit = self.limit
            self._decoded += self._gated
            out.append(decode_body(body))
        if pos < end:
            self._buf += data[pos:] if pos else data
        return out


# The plain ``obs`` frame as :func:`encode_obs` writes it for finite values or none:
# ``repr`` of a finite float always has a fraction or an exponent. The numbers follow
# JSON's grammar (bounded in length), so ``float`` of the matched text is what
# ``json.loads`` gives. Anything else (integers, non-finite values, metrics, spaces,
# another key order, long numbers) goes through ``json.loads``.
_JSON_FLOAT = (rb'(null|-?(?:0|[1-9][0-9]{0,30})'
               rb'(?:\.[0-9]{1,40}(?:[eE][-+]?[0-9]{1,4})?|[eE][-+]?[0-9]{1,4}))')
_PLAIN_OBS = re.compile(rb'\{"v":1,"t":"obs","s":(0|[1-9][0-9]{0,17}),"l":' + _JSON_FLOAT
                        + rb',"g":' + _JSON_FLOAT + rb'\}').fullmatch


def decode_body(body: bytes) -> dict[str, Any]:
    """One frame's JSON body → a message with a known version and a string type."""
    m = _PLAIN_OBS(body)
    if m is not None:  # the frame of (nearly) every step: the same dict, no json.loads
        s, loss, grad = m.groups()
        return {"v": 1, "t": "obs", "s": int(s), "l": None if loss == b"null" else float(loss),
                "g": None if grad == b"null" else float(grad)}
    try:
        msg = json.loads(body.decode("utf-8"), parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError) as exc:
        raise ProtocolError(f"frame is not UTF-8 JSON: {exc}") from None
    except RecursionError:
        raise ProtocolError("frame nests too deeply") from None
    if not isinstance(msg, dict):
        raise ProtocolError(f"frame must be a JSON object, but got {type(msg).__name__}")
    version = msg.get("v")
    if version != VERSION:
        raise ProtocolError(f"unsupported protocol version {version!r}: this side speaks "
                            f"version {VERSION}; upgrade lrctl on both sides", "bad_version")
    if not isinstance(msg.get("t"), str):
        raise ProtocolError("message has no type ('t')", "bad_message")
    return msg


def _reject_constant(name: str) -> Any:
    raise ValueError(f"non-standard JSON constant {name}")


# -- field access with validation (for receivers) -------------------------------------
def get_str(msg: Mapping[str, Any], key: str, *, max_len: int = 256,
            optional: bool = False) -> str | None:
    value = msg.get(key)
    if value is None and optional:
        return None
    if not isinstance(value, str) or len(value) > max_len:
        raise ProtocolError(f"{key} must be a string of at most {max_len} characters, "
                            f"but got {_short(value)}", "bad_message")
    return value


def get_int(msg: Mapping[str, Any], key: str, *, lo: int = 0, hi: int = 2**62,
            optional: bool = False) -> int | None:
    value = msg.get(key)
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise ProtocolError(f"{key} must be an integer in [{lo}, {hi}], but got "
                            f"{_short(value)}", "bad_message")
    return value


def get_float(msg: Mapping[str, Any], key: str, *, optional: bool = False) -> float | None:
    value = msg.get(key)
    if value is None and optional:
        return None
    return float_in(value, key)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
