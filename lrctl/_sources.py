"""How a ``policy=`` argument is read: one rule for the hook and the config layer.

Stdlib only, so the training side can use it without importing yaml.
"""

from __future__ import annotations

import os

__all__ = ["looks_like_path"]


def looks_like_path(s: str) -> bool:
    """A string is a path unless it has a newline, a ``:`` in its last part, or starts with ``{``.

    ``"policies/default.yaml"`` is a path; ``"version: 1\\npolicies: ..."`` and
    ``'{"version": 1, ...}'`` are policy text.
    """
    return "\n" not in s and ":" not in s.split(os.sep)[-1] and not s.lstrip().startswith("{")
