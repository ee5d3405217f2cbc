"""lrctl: an adaptive learning-rate controller for PyTorch training runs.

``import lrctl`` stays light: it does not import torch, mlflow, watchdog or yaml.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ._version import __version__
from .hook import Controller, attach
from .policy import Decision, Engine, Policy, register_policy

__all__ = [
    "Controller",
    "Decision",
    "Engine",
    "Policy",
    "Scheduler",
    "__version__",
    "attach",
    "load_policy",
    "register_policy",
]

if TYPE_CHECKING:
    import os
    from collections.abc import Mapping, Sequence

    from .integrations.scheduler import Scheduler


def __getattr__(name: str) -> Any:
    # lrctl.Scheduler subclasses torch's LRScheduler: import torch only when asked for.
    if name == "Scheduler":
        from .integrations.scheduler import Scheduler

        return Scheduler
    raise AttributeError(f"module 'lrctl' has no attribute {name!r}")


def load_policy(
    source: str | os.PathLike[str] | Mapping[str, Any] | None, base_lrs: Sequence[float],
    total_steps: int | None = None,
) -> Engine:
    """An in-process policy engine from a path, YAML text or a dict; no controller needed.
    ``None``: the shipped default policy, as for :func:`attach`.

    ``engine.observe(step, loss, grad_norm=None, **metrics)`` returns the LRs for
    the next step. ``total_steps``: the run's length, when known (``anneal`` uses it).
    """
    from ._defaults import DEFAULT_POLICY
    from .config import load_policy as _load  # yaml is imported only when a file is read

    return _load(DEFAULT_POLICY if source is None else source, base_lrs, total_steps)
