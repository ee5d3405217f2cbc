"""Policy kinds by name.

YAML files name a ``kind``; this registry maps it to a class. Nothing in a
policy file can import a module: built-ins register themselves, user code calls
:func:`register_policy`, and installed packages declare classes in the
``lrctl.policies`` entry-point group (loaded only when their name is asked for).
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable
from importlib import metadata
from typing import TypeVar

from ._base import Policy
from ._params import did_you_mean

__all__ = ["available_kinds", "get_policy_class", "register_policy", "unregister_policy"]

ENTRY_POINT_GROUP = "lrctl.policies"
_NAME = re.compile(r"^[a-z][a-z0-9_]{0,63}$")
_REGISTRY: dict[str, type[Policy]] = {}

P = TypeVar("P", bound=type[Policy])


def register_policy(kind: str, *, replace: bool = False) -> Callable[[P], P]:
    """Class decorator: make ``kind`` usable in policy files.

    >>> @register_policy("my_policy")
    ... class MyPolicy(Policy): ...
    """
    if not _NAME.fullmatch(kind):
        raise ValueError(
            f"policy kind must be lowercase letters, digits and '_' (≤ 64), but got {kind=}"
        )

    def decorate(cls: P) -> P:
        if not (isinstance(cls, type) and issubclass(cls, Policy)):
            raise TypeError(f"{cls!r} is not a subclass of lrctl.policy.Policy")
        _load_builtins()  # so that a user class cannot take a built-in's name first
        if kind in _REGISTRY and not replace and _REGISTRY[kind] is not cls:
            raise ValueError(f"policy kind {kind!r} is already registered by {_REGISTRY[kind]!r}")
        cls.kind = kind
        _REGISTRY[kind] = cls
        return cls

    return decorate


def unregister_policy(kind: str) -> None:
    """Remove a kind (tests and interactive sessions)."""
    _REGISTRY.pop(kind, None)


def get_policy_class(kind: str) -> type[Policy]:
    """The class registered for ``kind``, loading an entry point if needed."""
    _load_builtins()
    cls = _REGISTRY.get(kind)
    if cls is not None:
        return cls
    for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
        if ep.name == kind:
            loaded = ep.load()
            if not (isinstance(loaded, type) and issubclass(loaded, Policy)):
                raise TypeError(
                    f"entry point {ep.name}={ep.value} in {ENTRY_POINT_GROUP} "
                    "is not a subclass of lrctl.policy.Policy"
                )
            return register_policy(kind, replace=True)(loaded)
    raise ValueError(
        f"unknown policy kind {kind!r}{did_you_mean(kind, available_kinds())} (known kinds: "
        f"{', '.join(available_kinds())}); "
        f"a kind registered in a training script is known only in that process — install it "
        f"through the {ENTRY_POINT_GROUP!r} entry-point group for the controller")


def available_kinds() -> list[str]:
    _load_builtins()
    names = set(_REGISTRY)
    names.update(ep.name for ep in metadata.entry_points(group=ENTRY_POINT_GROUP))
    return sorted(names)


_builtins_lock = threading.RLock()  # re-entrant: the built-ins register while importing
_builtins_loaded = False


def _load_builtins() -> None:
    """Import the built-in policy modules (their decorators register them), once.

    Thread-safe: a controller or a test may build engines from many threads at
    once, and none may see a half-filled registry.
    """
    global _builtins_loaded
    if _builtins_loaded:
        return
    with _builtins_lock:
        if _builtins_loaded:
            return
        from . import (  # noqa: F401
            anneal,
            cyclical,
            decay,
            divergence,
            earlystop,
            plateau,
            rangetest,
            warmup,
            wsd,
        )

        _builtins_loaded = True
