"""What the hook asks about its surroundings before it says hello: whether a controller
answers on an address and which version it is, whether an address can be parsed, the
command that stops a controller, and the MLflow run the script has active (read from
``sys.modules`` only: mlflow is never imported here).
"""

from __future__ import annotations

import os
import sys

from . import paths
from .wire.operator import ControllerError, request

__all__ = ["VERSION_PROBE_S", "address_fits", "mlflow_info", "stop_command", "version_on"]

VERSION_PROBE_S = 2.0  # a controller that takes longer to say its version: asked by hello


def version_on(address: str) -> tuple[bool, str | None]:
    """Whether a controller answers ``status`` on the Unix socket ``address`` (TCP: not
    asked, the welcome says), and its version (``None``: one older than 0.2)."""
    if address.startswith("tcp://"):
        return False, None
    try:
        reply = request({"t": "status"}, address, timeout=VERSION_PROBE_S)
    except (OSError, ControllerError, ValueError):
        return False, None
    version = reply.get("version")
    return True, version if isinstance(version, str) else None


def address_fits(address: str) -> bool:
    try:
        paths.parse_address(address)
    except ValueError:
        return False
    return True


def mlflow_info() -> dict[str, str | None]:
    info: dict[str, str | None] = {"run_id": None,
                                   "tracking_uri": os.environ.get("MLFLOW_TRACKING_URI")}
    mlflow = sys.modules.get("mlflow")  # only if the script uses it: never import it here
    if mlflow is not None:
        try:
            run = mlflow.active_run()
            info["run_id"] = run.info.run_id if run is not None else None
            info["tracking_uri"] = mlflow.get_tracking_uri()
        except Exception:
            pass
    return info


def stop_command(address: str) -> str:
    """The command that stops the controller on ``address``."""
    return ("lrctl stop" if address == paths.default_socket()
            else f"lrctl stop --socket {address}")
