"""The messages of every training step, each hand-formatted fast path beside the JSON it
equals, and the validated field access receivers use.

``obs`` (hook → controller) and the plain ``lr`` reply (controller → hook) travel
once per step, so they are written by hand and read back by a regular expression
instead of ``json.dumps``/``json.loads``. Each fast path gives exactly the bytes
(or the dict) the JSON path gives, and only for the plain case; anything else goes
through :func:`~lrctl.wire.frames.encode` / ``json.loads``: a fast path only skips
work, it never changes results.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

from .errors import ProtocolError
from .floats import NON_FINITE, float_to_json
from .frames import HEADER, MAX_FRAME, decode_json, encode

__all__ = [
    "MAX_HELD",
    "MAX_PRIOR",
    "decode_body",
    "encode_lr",
    "encode_obs",
    "float_in",
    "float_out",
    "gap_used",
    "get_float",
    "get_int",
    "get_str",
    "late_steps",
    "lr_list",
    "plain_message",
    "prior_steps",
    "prior_used",
    "says_used",
    "with_used",
]



def float_out(x: float | None) -> float | str | None:
    """A float (or None) for strict JSON: non-finite values become strings."""
    return x if x is None else float_to_json(x)


def float_in(x: Any, name: str) -> float:
    """The inverse of :func:`float_out`, rejecting anything that is not a number."""
    if isinstance(x, str):
        if x in NON_FINITE:
            return float(x)
    elif isinstance(x, (int, float)) and not isinstance(x, bool):
        try:
            value = float(x)
        except OverflowError:  # a JSON integer of hundreds of digits
            raise ProtocolError(f"{name} is too large: {str(x)[:20]}…", "bad_message") from None
        if value - value == 0.0:
            return value
        # A JSON number past the float range (1e400) reads as inf: non-finite values
        # travel as the strings "nan", "inf", "-inf" (see float_out), never as numbers.
        raise ProtocolError(f"{name} is out of the float range (a non-finite value is "
                            "sent as the string \"nan\", \"inf\" or \"-inf\")",
                            "bad_message")
    raise ProtocolError(f"{name} must be a number, but got {x!r}", "bad_message")


# -- obs ------------------------------------------------------------------------------
def encode_obs(step: int, loss: float | None, grad_norm: float | None,
               metrics: Mapping[str, float] | None = None, *, overflow: bool = False,
               base: Sequence[float] | None = None, restored: int | None = None,
               prior: Sequence[float] | None = None,
               prior_grads: Sequence[float | None] | None = None,
               metrics_step: int | None = None,
               prior_used: Sequence[tuple[int, Sequence[float]]] | None = None,
               used: Sequence[float] | None = None,
               gap_used: Sequence[tuple[int, Sequence[float]]] | None = None,
               end: bool = False, ran: bool = False) -> bytes:
    """An ``obs`` frame, formatted by hand: this runs once per training step.

    ``repr`` of a finite float is valid JSON; the rare fields go through
    :func:`encode`: metrics (``m``), a mixed-precision overflow step (``o``: the
    ``GradScaler`` skipped it; no grad norm), and the loop's own LRs for this step
    (``b``, ``attach(..., base="loop")``: the controller records ``b × lrs /
    initial_lrs`` as the LRs used), and the snapshot step the hook has just
    restored (``r``: a rollback carried out, before this step), and the steps held
    since the previous report (``every="auto"``): ``pl``, the losses of steps
    ``s - len(pl)`` to ``s - 1``, and ``pg``, their grad norms (null where none),
    when the loop gave any, and ``pu``, the LRs they ran on, as runs of ``[count, lrs]``
    oldest first (see :mod:`lrctl._lr_history`). With metrics, ``ms``: the step whose
    weights they measured (the loop's last step before ``report()``; the observation's
    own when absent). ``u``: the LRs the optimizer step of ``s`` runs on (an async hook
    says; see :mod:`lrctl._lr_history`). ``gu`` (``every=N``): where the LRs changed in
    the steps since the previous report, which were not reported: ``[step, lrs]`` pairs,
    oldest first, each the LRs from that step on. ``e`` (1): the run's end: metrics
    reported after its last step, on a step ``s`` that never runs. ``a`` (1): the hook
    reports each step after its optimizer step, so no skip can reach it.
    """
    if (metrics or overflow or base is not None or restored is not None or prior
            or used is not None or gap_used or end or ran):
        msg: dict[str, Any] = {"t": "obs", "s": step, "l": float_out(loss),
                               "g": float_out(grad_norm)}
        if metrics:
            msg["m"] = {k: float_out(float(v)) for k, v in metrics.items()}
            if metrics_step is not None and metrics_step != step:
                msg["ms"] = int(metrics_step)
        if overflow:
            msg["o"] = True
        if base is not None:
            msg["b"] = [float_out(float(v)) for v in base]
        if restored is not None:
            msg["r"] = int(restored)
        if prior:
            msg["pl"] = [float_out(v) for v in prior]
            if prior_grads is not None:
                msg["pg"] = [float_out(v) for v in prior_grads]
            if prior_used:
                msg["pu"] = [[int(n), [float(v) for v in lrs]] for n, lrs in prior_used]
        if used is not None:
            msg["u"] = [float(v) for v in used]
        if gap_used:
            msg["gu"] = [[int(s), [float(v) for v in lrs]] for s, lrs in gap_used]
        if end:
            msg["e"] = 1
        if ran:
            msg["a"] = 1
        return encode(msg)
    body = f'{{"v":1,"t":"obs","s":{int(step)},"l":{_num(loss)},"g":{_num(grad_norm)}}}'.encode(
        "ascii")
    return HEADER.pack(len(body)) + body


MAX_PRIOR = 256  # LR changes (gu) and runs (ran) one message may list
#: Held steps one ``obs`` may carry (``pl``/``pg``): ``every="auto"`` holds at most 63. A
#: frame is handled whole, so this bounds what one peer's frame holds the loop for: at
#: 256, a run with heavy (valid) policies sending them unpaced cost the others ~14 ms a
#: frame (an adversarial pass).
MAX_HELD = 64


def says_used(frame: bytes) -> bool:
    """Whether an ``obs`` frame already says which LRs its step ran on (``u``); cheap:
    no decoding (a compact frame's flag 4, a JSON frame's key)."""
    from .compact import COMPACT_BIT

    if HEADER.unpack_from(frame)[0] & COMPACT_BIT:
        return len(frame) > 5 and frame[4] == 1 and bool(frame[5] & 4)
    return b'"u":' in frame


def with_used(frame: bytes, used: Sequence[float] | None) -> bytes:
    """An ``obs`` frame that says (``used``) or no longer says (None) which LRs its step
    ran on, compact where it was: what the hook replays after a reconnect (to a
    controller that reads ``u``, or to one that does not). A frame that cannot carry
    them (too large) goes as it was."""
    from .compact import COMPACT_BIT, decode_compact, encode_obs_compact

    (raw,) = HEADER.unpack_from(frame)
    body = frame[HEADER.size:]
    msg = decode_compact(body) if raw & COMPACT_BIT else decode_body(body)
    if msg.get("t") != "obs":
        raise ProtocolError("only obs frames are replayed", "bad_message")
    lrs = None if used is None else [float(v) for v in used]
    if raw & COMPACT_BIT:
        out = encode_obs_compact(msg["s"], msg["l"], msg["g"], lrs, msg.get("pl"),
                                 msg.get("pg"), msg.get("pu"))
        if out is not None:
            return out
    msg = dict(msg)
    msg.pop("v", None)
    msg.pop("u", None)
    if lrs is not None:
        msg["u"] = lrs
    try:
        return encode(msg)
    except ProtocolError:
        return frame


def lr_list(value: Any, groups: int, key: str) -> list[float]:
    """One finite LR >= 0 per param group (``b``, ``u`` and the runs of ``pu``)."""
    if not isinstance(value, list) or len(value) != groups:
        raise ProtocolError(f"{key} must be a list of {groups} LRs", "bad_message")
    out = [float_in(v, key) for v in value]
    if not all(math.isfinite(v) and v >= 0 for v in out):
        raise ProtocolError(f"{key} must hold finite LRs >= 0", "bad_message")
    return out


def prior_used(msg: Mapping[str, Any], held: int, groups: int) -> list[list[float]] | None:
    """The LRs of each of the ``held`` steps an ``obs`` carries (``pu``), oldest first;
    None when it says nothing of them."""
    runs = msg.get("pu")
    if runs is None:
        return None
    if not isinstance(runs, list) or len(runs) > MAX_PRIOR:
        raise ProtocolError("pu must be a list of [count, lrs] runs", "bad_message")
    out: list[list[float]] = []
    for run in runs:
        if (not isinstance(run, list) or len(run) != 2 or type(run[0]) is not int
                or not 0 < run[0] <= held - len(out)):
            raise ProtocolError("pu must be a list of [count, lrs] runs covering pl",
                                "bad_message")
        out += [lr_list(run[1], groups, "pu")] * run[0]
    if len(out) != held:
        raise ProtocolError("pu must cover every step of pl", "bad_message")
    return out


def gap_used(msg: Mapping[str, Any], after: int, step: int,
             groups: int) -> list[tuple[int, list[float]]]:
    """Where the LRs changed in the unreported steps after ``after`` and before ``step``
    (``gu``), as ``(step, LRs)``, oldest first; empty when the frame says nothing. A
    change at or before ``after`` (a step the run has observed: a replay after a
    restore) is checked and left out: the frame's observation must not be lost to it."""
    changes = msg.get("gu")
    if changes is None:
        return []
    if not isinstance(changes, list) or len(changes) > MAX_PRIOR:
        raise ProtocolError(f"gu must be a list of at most {MAX_PRIOR} [step, lrs] pairs",
                            "bad_message")
    out: list[tuple[int, list[float]]] = []
    previous = -1
    for change in changes:
        if (not isinstance(change, list) or len(change) != 2 or type(change[0]) is not int
                or not previous < change[0] < step):
            raise ProtocolError("gu must hold [step, lrs] pairs of steps in order, before "
                                "this one", "bad_message")
        previous = change[0]
        lrs = lr_list(change[1], groups, "gu")
        if previous > after:
            out.append((previous, lrs))
    return out


def late_steps(msg: Mapping[str, Any], groups: int) -> list[tuple[int, list[float]]]:
    """The steps of a ``late`` message (``steps``): reported steps that ran without their
    answer (a sync hook whose wait timed out, or that did not wait while the answers were
    late), each ``(step, LRs it ran on)``, steps in order."""
    steps = msg.get("steps")
    if not isinstance(steps, list) or not steps or len(steps) > MAX_PRIOR:
        raise ProtocolError(f"steps must be a list of 1 to {MAX_PRIOR} [step, lrs] pairs",
                            "bad_message")
    out: list[tuple[int, list[float]]] = []
    previous = -1
    for pair in steps:
        if (not isinstance(pair, list) or len(pair) != 2 or type(pair[0]) is not int
                or not previous < pair[0] <= 2**62):
            raise ProtocolError("steps must hold [step, lrs] pairs of steps in order",
                                "bad_message")
        previous = pair[0]
        out.append((previous, lr_list(pair[1], groups, "steps")))
    return out


def prior_steps(msg: Mapping[str, Any], step: int,
                ) -> list[tuple[int, float | None, float | None]]:
    """The held steps an ``obs`` carries (``pl``/``pg``) as ``(step, loss, grad_norm)``,
    oldest first; ``[]`` for a plain one."""
    losses = msg.get("pl")
    if losses is None:
        return []
    if not isinstance(losses, list) or len(losses) > MAX_HELD:
        raise ProtocolError(f"pl must be a list of at most {MAX_HELD} losses", "bad_message")
    grads = msg.get("pg")
    if grads is not None and (not isinstance(grads, list) or len(grads) != len(losses)):
        raise ProtocolError("pg must be a list as long as pl", "bad_message")
    first = step - len(losses)
    if first < 0:
        raise ProtocolError(f"pl holds {len(losses)} steps before step {step}", "bad_message")
    return [(first + i, None if loss is None else float_in(loss, "loss"),
             None if grads is None or grads[i] is None else float_in(grads[i], "grad_norm"))
            for i, loss in enumerate(losses)]


def _num(x: float | None) -> str:
    if x is None:
        return "null"
    if math.isfinite(x):
        return repr(float(x))
    return '"nan"' if math.isnan(x) else ('"inf"' if x > 0 else '"-inf"')


# The plain ``obs`` frame as :func:`encode_obs` writes it for finite values or none:
# ``repr`` of a finite float always has a fraction or an exponent. The numbers follow
# JSON's grammar (bounded in length), so ``float`` of the matched text is what
# ``json.loads`` gives. Anything else (integers, non-finite values, metrics, spaces,
# another key order, long numbers) goes through ``json.loads``.
_JSON_FLOAT = (rb'(null|-?(?:0|[1-9][0-9]{0,30})'
               rb'(?:\.[0-9]{1,40}(?:[eE][-+]?[0-9]{1,4})?|[eE][-+]?[0-9]{1,4}))')
_PLAIN_OBS = re.compile(rb'\{"v":1,"t":"obs","s":(0|[1-9][0-9]{0,17}),"l":' + _JSON_FLOAT
                        + rb',"g":' + _JSON_FLOAT + rb'\}').fullmatch




def _plain_obs(body: bytes) -> dict[str, Any] | None:
    m = _PLAIN_OBS(body)
    if m is None:
        return None
    s, loss, grad = m.groups()
    return {"v": 1, "t": "obs", "s": int(s), "l": None if loss == b"null" else float(loss),
            "g": None if grad == b"null" else float(grad)}


# -- lr -------------------------------------------------------------------------------
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
    return HEADER.pack(len(body)) + body


_PLAIN_MODE = re.compile(r"[A-Za-z_]{1,32}").fullmatch


# The controller's usual ``lr`` reply, exactly as its ``json.dumps`` writes it (finite
# LRs, no decisions). Anything else (a decision, a non-finite LR, another field order)
# goes through ``json.loads``: the fast path only skips work, it never changes results.
_PLAIN_LR = re.compile(
    rb'\{"v":1,"t":"lr","s":(-?[0-9]+),"lrs":\[([-+.eE0-9,]*)\],"skip":(true|false),'
    rb'"stop":(true|false),"mode":"([A-Za-z_]+)","saved_step":(-?[0-9]+),"d":\[\]\}')



def _plain_lr(body: bytes) -> dict[str, Any] | None:
    """The message of a plain ``lr`` reply (see :data:`_PLAIN_LR`), or ``None``."""
    m = _PLAIN_LR.fullmatch(body)
    if m is None:
        return None
    s, lrs, skip, stop, mode, saved = m.groups()
    try:
        values = [float(x) for x in lrs.split(b",")] if lrs else []
    except ValueError:
        return None
    return {"v": 1, "t": "lr", "s": int(s), "lrs": values, "skip": skip == b"true",
            "stop": stop == b"true", "mode": mode.decode("ascii"), "saved_step": int(saved),
            "d": []}


def plain_message(body: bytes) -> dict[str, Any] | None:
    """The message of a plain ``obs`` or ``lr`` frame body, as ``json.loads`` would give
    it (with ``v`` and ``t``); ``None`` for any other body."""
    kind = body[11:15]  # after b'{"v":1,"t":'
    if kind == b'"obs':
        return _plain_obs(body)
    if kind == b'"lr"':
        return _plain_lr(body)
    return None


def decode_body(body: bytes) -> dict[str, Any]:
    """One frame's body → its message: the fast path for a plain per-step frame, the
    checked JSON path (:func:`~lrctl.wire.frames.decode_json`) for every other."""
    return plain_message(body) or decode_json(body)


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
