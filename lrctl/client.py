"""Compatibility names: the hook moved to :mod:`lrctl.hook`, the operator client to
:mod:`lrctl.wire.operator`. Import from ``lrctl`` (``lrctl.attach``) in new code."""

from __future__ import annotations

from ._torchutil import total_grad_norm
from .hook import Controller, PolicyRejected, RunConflict, attach, sanitize_run_name
from .wire.operator import ControllerError, request

__all__ = ["Controller", "ControllerError", "PolicyRejected", "RunConflict", "attach",
           "request", "sanitize_run_name", "total_grad_norm"]
