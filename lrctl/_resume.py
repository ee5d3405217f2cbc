"""What a hook keeps in the user's checkpoint (``ctl.state_dict()``), checked on the way
back in, and the run-name rule its run key follows."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from ._torchutil import lr_value

__all__ = ["STATE_FORMAT", "resume_state", "sanitize_run_name"]

_NAME_BAD = re.compile(r"[^A-Za-z0-9._-]+")


def sanitize_run_name(name: str) -> str:
    """A name safe as a file name and an MLflow name: letters, digits and ``._-``."""
    clean = _NAME_BAD.sub("-", str(name)).strip("._-")[:64].strip("._-")
    return clean or "run"


STATE_FORMAT = "lrctl.hook/1"


def resume_state(resume: Any) -> dict[str, Any] | None:
    """A :meth:`Controller.state_dict` checked; ``None`` when ``resume`` is not one."""
    if not isinstance(resume, Mapping):
        return None
    if resume.get("format") != STATE_FORMAT:
        raise ValueError(f"not an lrctl hook state (format {resume.get('format')!r}, expected "
                         f"{STATE_FORMAT!r})")
    key, step, lrs = resume.get("run_key"), resume.get("step"), resume.get("initial_lrs")
    if not isinstance(key, str) or sanitize_run_name(key) != key:
        raise ValueError(f"the saved lrctl state has a bad run key {key!r:.80}")
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"the saved lrctl state has a bad step {step!r:.40}")
    if not isinstance(lrs, (list, tuple)) or not lrs:
        raise ValueError("the saved lrctl state has no initial LRs")
    session = resume.get("session")
    if session is not None and not isinstance(session, Mapping):
        raise ValueError("the saved lrctl state's session is not a mapping")
    token = resume.get("token")
    return {"run_key": key, "step": step, "initial_lrs": [lr_value(v) for v in lrs],
            "session": dict(session) if session is not None else None,
            "token": token if isinstance(token, str) else None}
