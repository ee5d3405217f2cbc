"""Strings that are not Unicode text: lone UTF-16 surrogates.

JSON's ``\\ud800`` escapes and YAML's double-quoted ``"\\ud800"`` decode to a Python
string holding a lone surrogate, which no UTF-8 encoder takes: every answer, log line,
listing or MLflow call that carried it failed (a peer's 40-byte frame once ended the
controller). Both readers refuse such input (see :mod:`lrctl.wire.frames`,
:mod:`lrctl._yaml_read`).
"""

from __future__ import annotations

from typing import Any

__all__ = ["has_lone_surrogate"]


def has_lone_surrogate(value: Any) -> bool:
    """Whether a decoded JSON or YAML value holds a string (or key) that is not Unicode
    text."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                return True
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
    return False
