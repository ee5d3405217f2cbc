"""What every verb that talks to a running controller shares: the socket option's help
and one request with errors a user can act on."""

from __future__ import annotations

import argparse
import sys
from typing import Any

__all__ = ["SOCKET_HELP", "ask", "live_state_dir"]

SOCKET_HELP = "Unix socket path or tcp://HOST:PORT (default: $LRCTL_SOCKET or the runtime dir)"


def live_state_dir(socket: str | None) -> str | None:
    """The state directory of the controller answering on ``socket`` (None: the default
    socket), as it reports it; None when none answers. One started with ``--state-dir``
    keeps its runs there, where no default would look."""
    import contextlib

    from ..wire.operator import ControllerError, request

    with contextlib.suppress(OSError, ControllerError, ValueError, AttributeError):
        found = request({"t": "status"}, socket, timeout=2.0).get("state_dir")
        return found if isinstance(found, str) else None
    return None


def ask(args: argparse.Namespace, msg: dict[str, Any]) -> dict[str, Any] | None:
    from ..wire.operator import ControllerError, request

    try:
        return request(msg, args.socket)
    except ControllerError as exc:
        print(f"lrctl {args.command}: {exc}", file=sys.stderr)
    except ValueError as exc:  # an address no socket can have (too long, say)
        print(f"lrctl {args.command}: {exc}", file=sys.stderr)
    except OSError as exc:
        from ..paths import default_socket

        where = args.socket or default_socket()
        serve = "lrctl serve" + ("" if where == default_socket() else f" --socket {where}")
        hint = "nothing to stop" if args.command == "stop" else f"start one with '{serve}'"
        print(f"lrctl {args.command}: no controller answers on {where} "
              f"({exc.strerror or exc}); {hint}", file=sys.stderr)
    return None
