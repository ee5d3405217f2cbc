"""The TCP token a hook or an operator verb shows the controller, from the environment."""

from __future__ import annotations

import os
from collections.abc import Mapping

__all__ = ["token_from_env"]


def token_from_env(env: Mapping[str, str] | None = None) -> str | None:
    """A TCP token from ``$LRCTL_TOKEN``, else the file named by ``$LRCTL_TOKEN_FILE``."""
    env = os.environ if env is None else env
    if env.get("LRCTL_TOKEN"):
        return env["LRCTL_TOKEN"].strip()
    if env.get("LRCTL_TOKEN_FILE"):
        with open(env["LRCTL_TOKEN_FILE"], encoding="utf-8") as f:
            return f.read(4096).strip()
    return None
