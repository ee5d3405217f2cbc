"""How a ``policy=`` argument is read: one rule for the hook and the config layer.

Stdlib only, so the training side can use it without importing yaml.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

from ._defaults import DEFAULT_POLICY, POLICIES
from .paths import read_regular

__all__ = ["MAX_POLICY_BYTES", "looks_like_path", "missing_policy_hint", "policy_payload",
           "resolve_policy_path", "shipped_policies"]

MAX_POLICY_BYTES = 64 * 1024


def looks_like_path(s: str) -> bool:
    """A string is a path unless it has a newline, a ``:`` in its last part, or starts with ``{``.

    ``"policies/default.yaml"`` is a path; ``"version: 1\\npolicies: ..."`` and
    ``'{"version": 1, ...}'`` are policy text.
    """
    return "\n" not in s and ":" not in s.split(os.sep)[-1] and not s.lstrip().startswith("{")


def shipped_policies() -> list[str]:
    """The names of the policy files lrctl ships (``default``, ``rangetest``, ...)."""
    return sorted(p.stem for p in POLICIES.glob("*.yaml"))


def resolve_policy_path(policy: str | os.PathLike[str]) -> str:
    """The absolute path a path-like ``policy=`` names. A bare name with no such file
    here (``"rangetest"``, ``"rangetest.yaml"``) is the shipped policy of that name."""
    raw = os.fspath(policy)
    path = os.path.abspath(raw)
    name = raw[:-5] if raw.endswith(".yaml") else raw
    if not os.path.exists(path) and os.sep not in raw and name in shipped_policies():
        return str(POLICIES / f"{name}.yaml")
    return path


def missing_policy_hint() -> str:
    """What to say of a policy file that is not there."""
    return (f"the shipped policies go by name from any directory: policy=\"rangetest\" "
            f"(one of {', '.join(shipped_policies())}; they are in {POLICIES})")


def policy_payload(policy: Any) -> tuple[str, str]:
    """``(text, source)`` of a ``policy=`` argument, as the hook sends it in its hello.

    ``None`` is the packaged default; dicts travel as JSON, which YAML reads as is;
    a path is read here (at most :data:`MAX_POLICY_BYTES`) and sent with its
    absolute path as the source, so the controller can watch it.
    """
    if policy is None:
        policy = DEFAULT_POLICY
    if isinstance(policy, Mapping):
        try:
            return json.dumps(dict(policy), indent=2, allow_nan=False), "<dict>"
        except (TypeError, ValueError) as exc:
            raise ValueError(f"policy dict is not plain data: {exc}") from None
    if isinstance(policy, os.PathLike) or (isinstance(policy, str) and looks_like_path(policy)):
        path = resolve_policy_path(policy)
        try:  # (a regular file only: a FIFO there would hang attach())
            data = read_regular(path, MAX_POLICY_BYTES + 1, follow=True)
        except OSError as exc:
            hint = f"; {missing_policy_hint()}" if isinstance(exc, FileNotFoundError) else ""
            raise FileNotFoundError(f"cannot read policy file {path}: "
                                    f"{exc.strerror or exc}{hint}") from None
        if len(data) > MAX_POLICY_BYTES:
            raise ValueError(f"policy file {path} is larger than {MAX_POLICY_BYTES} bytes")
        try:  # strict, as lrctl validate and the controller's reload read it
            return data.decode("utf-8"), path
        except UnicodeDecodeError as exc:
            raise ValueError(f"policy file {path} is not UTF-8 text ({exc.reason} at byte "
                             f"{exc.start}): save it as UTF-8") from None
    if isinstance(policy, str):
        return policy, "<string>"
    raise TypeError(f"policy must be a path, YAML text or a dict, but got "
                    f"{type(policy).__name__}")
