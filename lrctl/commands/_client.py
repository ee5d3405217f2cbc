"""What every verb that talks to a running controller shares: the socket option's help
and one request with errors a user can act on."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

__all__ = ["SOCKET_HELP", "ask", "live_state_dir", "state_roots", "unserved_socket_note"]

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


def state_roots(socket: str | None,
                state_dir: str | None) -> tuple[list[Path], str | None]:
    """The state directories a verb over the journals looks in (``runs --all``,
    ``prune``), and the one the controller on ``socket`` reports (None: none answers, or
    ``state_dir`` was given): ``state_dir`` alone; with ``socket``, that controller's;
    else every controller's (the shared directory, those of other sockets)."""
    from .. import paths

    reported = live_state_dir(socket) if state_dir is None else None
    if state_dir:
        return [Path(state_dir)], None
    if socket:
        return [Path(reported) if reported else paths.state_dir(socket=socket)], reported
    roots = paths.state_dirs()
    if reported and Path(reported) not in roots:
        roots.insert(0, Path(reported))
    return roots, reported


def unserved_socket_note(socket: str | None, state_dir: str | None,
                         reported: str | None) -> str | None:
    """What a verb over the journals says when it found nothing on ``--socket`` with no
    controller answering there (:func:`state_roots` looked in its default directory)."""
    if socket and reported is None and not state_dir:
        return ("(no controller answers on that socket, so this is the directory its "
                "controller uses by default; one started with --state-dir keeps its runs "
                "there: pass the same --state-dir)")
    return None


#: The controller's refusals of a RUN argument that names no run, or several: exit
#: status 2, as ``lrctl decisions`` and ``report`` give for a RUN their journals lack.
RUN_NOT_NAMED = frozenset({"no_such_run", "ambiguous_run"})


def ask(args: argparse.Namespace, msg: dict[str, Any]) -> dict[str, Any] | int:
    """The controller's answer to ``msg``, or, having said why on stderr, the verb's exit
    status: 2 for a RUN that names no run (or several), 1 for any other failure."""
    from ..wire.operator import ControllerError, request

    try:
        return request(msg, args.socket)
    except ControllerError as exc:
        print(f"lrctl {args.command}: {exc}", file=sys.stderr)
        return 2 if exc.code in RUN_NOT_NAMED else 1
    except ValueError as exc:  # an address no socket can have (too long, say)
        print(f"lrctl {args.command}: {exc}", file=sys.stderr)
    except OSError as exc:
        print(f"lrctl {args.command}: {_unreachable(args.command, args.socket, exc)}",
              file=sys.stderr)
    return 1


def _unreachable(command: str, socket: str | None, exc: OSError) -> str:
    """What to tell a user whose request got no answer, by why."""
    import socket as sockets

    from ..paths import default_socket

    where = socket or default_socket()
    tcp = where.startswith("tcp://")
    if exc.filename is not None and (tcp or str(exc.filename) != where):
        import os

        what = ("the token file $LRCTL_TOKEN_FILE names"
                if os.environ.get("LRCTL_TOKEN_FILE") == str(exc.filename) else "")
        return f"cannot read {what}{' ' if what else ''}{exc.filename}: {exc.strerror or exc}"
    if isinstance(exc, (TimeoutError, sockets.timeout)):
        pid = _lock_pid(where) if not tcp else None
        hint = (f"its pid is {pid}" if pid else "it may be stopped (SIGSTOP, Ctrl-Z) or "
                "overloaded")
        return (f"a controller on {where} accepted the connection but did not answer in "
                f"time ({hint}); try again, or end it with kill" + (f" {pid}" if pid else ""))
    if tcp:
        serve = f"lrctl serve --tcp {where[len('tcp://'):]} --token-file FILE"
    else:
        serve = "lrctl serve" + ("" if where == default_socket() else f" --socket {where}")
    hint = "nothing to stop" if command == "stop" else f"start one with '{serve}'"
    return f"no controller answers on {where} ({exc.strerror or exc}); {hint}"


def _lock_pid(socket: str) -> int | None:
    """The pid a controller wrote into its socket's lock file, if readable."""
    import contextlib

    from ..paths import lock_fields

    with contextlib.suppress(OSError, ValueError), open(socket + ".lock", "rb") as f:
        return int(lock_fields(f.read(4096))[0] or 0) or None
    return None
