"""Verbs that run the controller or ask it what it serves: serve, stop, status, runs."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import stat
import sys
import time
from typing import Any, NoReturn

from ._client import SOCKET_HELP, ask, state_roots, unserved_socket_note
from .prune import days as _days


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("serve", help="run the controller",
                       description="Run the controller: serve training runs on a Unix socket "
                                   "(and optionally TCP). Stays in the foreground, logging to "
                                   "stderr and the log file, unless --detach; SIGTERM/SIGINT "
                                   "(or 'lrctl stop') stop it with state flushed.")
    p.add_argument("--socket", help="Unix socket path (default: $LRCTL_SOCKET or the runtime "
                                    "dir)")
    p.add_argument("--state-dir", help="where run state and logs live, one controller's "
                                       "alone (default: $LRCTL_STATE_DIR or "
                                       "~/.local/state/lrctl for the default socket, "
                                       "sockets/NAME-HASH inside it for another)")
    p.add_argument("--tcp", metavar="[HOST:]PORT",
                   help="also listen on TCP (127.0.0.1 unless HOST is given); needs a token")
    p.add_argument("--token-file", help="file holding the TCP token (default: $LRCTL_TOKEN or "
                                        "$LRCTL_TOKEN_FILE)")
    p.add_argument("--detach", action="store_true",
                   help="run in the background (a new session; output to STATE_DIR/"
                        "controller.out); the command returns once the controller serves, "
                        "or with its error and exit status if it could not start")
    p.add_argument("--foreground", action="store_true",
                   help="stay attached and log to stderr (the default; kept for scripts)")
    p.add_argument("--idle-exit", type=_positive_seconds, metavar="SECONDS",
                   help="exit once no hook has been connected for this long, every run "
                        "checkpointed (a controller that attach() starts uses 600)")
    p.add_argument("--log-file", help="log file (default: STATE_DIR/controller.log)")
    p.add_argument("--no-audit", action="store_true",
                   help="record nothing (no journal, no MLflow): for experiments")
    p.add_argument("--policies", metavar="DIR",
                   help="validate every *.yaml in DIR at start and watch them")
    p.add_argument("--no-watch", action="store_true",
                   help="no live policy editing: runs keep the version they started with")
    p.add_argument("--session-timeout", type=_seconds_or_never, default=600.0,
                   metavar="SECONDS",
                   help="drop a run from memory after its hook is gone this long; its state "
                        "stays on disk and a reconnect resumes it (0: never; default 600)")
    p.add_argument("--stall-timeout", type=_positive_seconds, metavar="SECONDS",
                   help="a controller whose event loop is stuck this long logs every thread's "
                        "stack and exits with status 70, so hooks can start a new one "
                        "(default 30)")
    p.add_argument("--sched", choices=("normal", "batch"), default="normal",
                   help="batch: run under SCHED_BATCH, so an observation arriving never "
                        "preempts the training process (for async hooks on a machine whose "
                        "cores are all busy; sync hooks may wait longer for their answer)")
    p.add_argument("--no-pacing", action="store_true",
                   help="read every hook's observations as they come, so each wakes the "
                        "controller (by default a fast async hook is read on a timer, and "
                        "its sends wake nobody: see 'Paced reading' in the README)")
    p.add_argument("--keep-ended-days", type=_days, metavar="DAYS",
                   help="remove, hourly, the journals of runs that ended over DAYS ago and "
                        "are all in MLflow, as 'lrctl prune --older-than DAYS' would "
                        "(default: kept until you prune them)")
    p.add_argument("--shutdown-grace", type=_positive_seconds, metavar="SECONDS",
                   help="after SIGTERM/SIGINT, exit with status 75 if the shutdown has not "
                        "finished this long (default 5); a second signal exits at once")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("stop", help="stop the controller (SIGTERM), wait, and report",
                       description="Ask the controller on the socket for its pid, send it "
                                   "SIGTERM (it checkpoints every run) and wait until it has "
                                   "exited. A hook attached with spawn=True (the default) "
                                   "that is still training starts a new one within seconds, "
                                   "which restores its run: stop the training first to "
                                   "stop for good.")
    p.add_argument("--socket", help="Unix socket path (default: $LRCTL_SOCKET or the runtime "
                                    "dir)")
    p.add_argument("--timeout", type=_positive_seconds, default=15.0, metavar="SECONDS",
                   help="how long to wait for it to exit (default 15)")
    p.set_defaults(func=cmd_stop)

    p = sub.add_parser("status", help="is a controller running, and what is it serving")
    p.add_argument("--socket", help=SOCKET_HELP)
    p.add_argument("--json", action="store_true", help="print the answer as JSON")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("runs", help="list runs: step, LRs, mode, last decision",
                       description="List the runs a controller serves; with --all, every run "
                                   "its state directory remembers, ended ones included (read "
                                   "from the journals: works with no controller running).")
    p.add_argument("--socket", help=SOCKET_HELP)
    p.add_argument("--json", action="store_true", help="print the answer as JSON")
    p.add_argument("--all", action="store_true",
                   help="include ended runs: last step, LR, decision count, MLflow run id")
    p.add_argument("--state-dir", default=None,
                   help="the state directory whose runs to list (implies --all; "
                        "default: with --socket that "
                        "controller's, else every controller's: $LRCTL_STATE_DIR or "
                        "~/.local/state/lrctl and the sockets/ directories inside it)")
    p.set_defaults(func=cmd_runs)


def cmd_serve(args: argparse.Namespace) -> int:
    from .. import paths
    from ..daemon import AlreadyServing, ServeOptions, serve
    from ..sinks import NullSink, build_sink

    try:
        tcp = paths.parse_host_port(args.tcp) if args.tcp else None
        token = _serve_token(args.token_file) if tcp else None
        socket_path = os.path.abspath(args.socket or paths.default_socket())
        options = ServeOptions(
            socket_path=socket_path,
            state_dir=os.path.abspath(args.state_dir or paths.state_dir(socket=socket_path)),
            tcp=tcp, token=token, foreground=not args.detach, log_file=args.log_file,
            watch=not args.no_watch,
            policies_dir=os.path.abspath(args.policies) if args.policies else None,
            session_timeout=args.session_timeout if args.session_timeout > 0 else None)
        if args.detach and args.foreground:
            raise ValueError("--detach and --foreground contradict each other")
        options.idle_exit = args.idle_exit
        if not args.state_dir:  # taken by another controller: this socket's own instead
            options.state_fallback = str(paths.own_state_dir(socket_path))
        if args.keep_ended_days is not None:
            options.keep_ended_s = args.keep_ended_days * 86400.0
        options.sched = args.sched
        options.pacing = not args.no_pacing
        if args.stall_timeout is not None:
            options.stall_timeout = args.stall_timeout
        if args.shutdown_grace is not None:
            options.shutdown_grace = args.shutdown_grace
        code = serve(options, (lambda _: NullSink()) if args.no_audit else build_sink)
    except AlreadyServing as exc:
        print(f"lrctl serve: {exc}", file=sys.stderr)
        return 3
    except (OSError, ValueError) as exc:
        # A file the options name (--log-file, --token-file, --state-dir) as "PATH: why",
        # not Python's "[Errno 2] No such file or directory: 'PATH'".
        said = (f"{exc.filename}: {exc.strerror}"
                if isinstance(exc, OSError) and exc.filename and exc.strerror else exc)
        print(f"lrctl serve: {said}", file=sys.stderr)
        return 2
    _exit_now(code)


def _exit_now(code: int) -> NoReturn:
    """The controller has stopped: every run checkpointed, the journal committed, every
    file closed. End the process without the interpreter's teardown (a second or more
    with mlflow's modules loaded, and a thread stuck on a dead MLflow server could hold
    it): SIGTERM to exit stays within two seconds."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, but got {text!r}") \
            from None
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, but got "
                                         f"{text!r}")
    return value


def _seconds_or_never(text: str) -> float:
    """A positive number of seconds, or 0 for never."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if value == 0 or (value > 0 and math.isfinite(value)):
        return value
    raise argparse.ArgumentTypeError(f"expected a positive number of seconds (0: never), but "
                                     f"got {text!r}")


def _serve_token(token_file: str | None) -> str | None:
    path = token_file or os.environ.get("LRCTL_TOKEN_FILE")
    if path:
        if os.stat(path).st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            print(f"lrctl serve: warning: token file {path} is readable by others; "
                  "chmod 600 it", file=sys.stderr)
        with open(path, encoding="utf-8") as f:
            token = f.read(4096).strip()
        if not token:
            raise ValueError(f"token file {path} is empty")
        return token
    return os.environ.get("LRCTL_TOKEN") or None


def cmd_stop(args: argparse.Namespace) -> int:
    import signal
    import time

    if args.socket and args.socket.startswith("tcp://"):
        print("lrctl stop: stops a local controller; give its Unix socket", file=sys.stderr)
        return 2
    reply = ask(args, {"t": "status"})
    if isinstance(reply, int):
        return reply
    pid = int(reply["pid"])
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        print(f"lrctl stop: controller pid {pid} is already gone")
        return 0
    except PermissionError:
        print(f"lrctl stop: not allowed to signal pid {pid}", file=sys.stderr)
        return 1
    deadline = time.monotonic() + args.timeout
    while _alive(pid):
        if time.monotonic() > deadline:
            print(f"lrctl stop: controller pid {pid} has not exited after {args.timeout:g} s; "
                  f"'kill -9 {pid}' ends it (runs resume from their checkpoints)",
                  file=sys.stderr)
            return 1
        time.sleep(0.05)
    runs, hooks = int(reply.get("runs", 0)), int(reply.get("connected", 0))
    held = (f"{runs} run(s) held, each resumable from its checkpoint" if runs
            else "no runs held")
    print(f"lrctl stop: controller pid {pid} on {reply['socket']} stopped ({held})")
    if hooks:
        from ..paths import state_dir

        own = str(state_dir(socket=reply["socket"])) == reply.get("state_dir")
        goes_on = ("its run goes on there" if own else
                   f"in the socket's own state directory, not {reply.get('state_dir')}: its "
                   "run starts over there")
        print(f"lrctl stop: {hooks} hook(s) were still connected: one attached with "
              "spawn=True (the default) starts a new controller on this socket within "
              f"seconds, with the default options, and {goes_on}; stop those training "
              "scripts first to keep it stopped")
    return 0


def _alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie child of ours counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True


def _paced(paced: Any) -> str:
    """``status``'s count of hooks read on a timer (paced reading), or that it is off."""
    return "pacing off" if paced is None else f"{paced} read on a timer now"


def cmd_status(args: argparse.Namespace) -> int:
    reply = ask(args, {"t": "status"})
    if isinstance(reply, int):
        return reply
    if args.json:
        print(json.dumps(reply))
    else:
        print(f"controller pid {reply['pid']} (lrctl {reply['version']}) on {reply['socket']}: "
              f"{reply['runs']} run(s), {reply['connected']} connected "
              f"({_paced(reply.get('paced'))}), up "
              f"{reply['uptime_s']:.0f} s; state in {reply['state_dir']}; watching "
              f"{len(reply.get('watching', []))} policy file(s)")
        print(f"  memory: controller {_mib(reply.get('rss_kib'))} (mlflow "
              f"{'loaded' if reply.get('mlflow_loaded') else 'not loaded'})")
        shipper = reply.get("shipper")
        if shipper and shipper.get("state") == "not started":
            print("  MLflow shipper: not started yet (it starts with the first run)")
        elif shipper:
            print(f"  MLflow shipper: {shipper.get('state')}, pid {shipper.get('pid') or '-'}, "
                  f"{_mib(shipper.get('rss_kib'))}, {shipper.get('restarts', 0)} restart(s)")
        recreated = reply.get("state_dir_recreated")
        if recreated:
            print(f"  note: the state dir was deleted and recreated {recreated['count']} "
                  f"time(s), last at {time.strftime('%H:%M:%S', time.localtime(recreated['at']))}"
                  "; the open runs' journals were written back")
        for error in reply.get("errors", []):
            print(f"  error: {error}")
    return 0


def _mib(kib: int | None) -> str:
    return "-" if kib is None else f"{kib / 1024:.1f} MiB"


def cmd_runs(args: argparse.Namespace) -> int:
    if args.all or args.state_dir:  # (a state directory's runs are its journals': --all)
        return _all_runs(args)
    reply = ask(args, {"t": "runs"})
    if isinstance(reply, int):
        return reply
    runs = reply.get("runs", [])
    if args.json:
        print(json.dumps(runs))
        return 0
    if not runs:
        print("no runs")
        return 0
    rows = [("RUN", "STEP", "LR", "MODE", "LAST DECISION")]
    for r in runs:
        mode = r["mode"] + ("" if r.get("connected") else ",detached")
        if r.get("override"):
            mode += ",manual"
        if not r.get("watching", False):
            mode += ",pinned"
        rows.append((r["run"], str(r["step"]), " ".join(f"{x:.4g}" for x in r["lrs"]), mode,
                     _describe(r.get("last_decision"))))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    for row in rows:
        cells = [cell.ljust(w) for cell, w in zip(row[:4], widths, strict=True)]
        print("  ".join([*cells, row[4]]))
    for r in runs:
        if r.get("reload_error"):
            print(f"{r['run']}: last reload failed: {r['reload_error']}")
        if r.get("store_error"):
            print(f"{r['run']}: cannot checkpoint: {r['store_error']}")
        if r.get("sink_error"):
            print(f"{r['run']}: {r['sink_error']}")
        if r.get("overflows"):
            print(f"{r['run']}: {r['overflows']} mixed-precision overflow step(s), skipped by "
                  "the GradScaler (not divergence)")
    return 0


def _describe(d: dict[str, Any] | None) -> str:
    if not d:
        return "-"
    shadow = " (shadow)" if d.get("shadow") else ""  # as `lrctl decisions` marks it
    return f"step {d['step']} {d['policy']}.{d['action']}{shadow}: {d['reason']}"


def _all_runs(args: argparse.Namespace) -> int:
    from .. import paths
    from ..wire.operator import ControllerError, request
    from .history import journal_runs

    def live_runs(socket: str | None) -> dict[str, dict[str, Any]]:
        try:
            return {r["run"]: r for r in request({"t": "runs"}, socket, timeout=2.0)["runs"]}
        except (OSError, ControllerError, KeyError, TypeError, ValueError):
            return {}  # no controller there (or no socket can be there): the journals alone

    if args.state_dir and not os.path.isdir(args.state_dir):
        print(f"lrctl runs: --state-dir {args.state_dir}: no such directory", file=sys.stderr)
        return 2
    # (reported: the state directory of the controller on the socket)
    roots, reported = state_roots(args.socket, args.state_dir)
    runs = []
    for root in roots:
        # Live means served by the controller of this directory (its lock names its
        # socket): a run key in two directories is live in one at most.
        served_here = str(root) == reported
        socket = args.socket if served_here else paths.state_dir_socket(root)
        runs += journal_runs(root, live_runs(socket) if served_here or socket else {})
    runs.sort(key=lambda r: r["modified"])
    if args.json:
        print(json.dumps(runs))
        return 0
    if not runs:
        print(f"no runs in {roots[0]}" + (f" (or {len(roots) - 1} more state directories)"
                                          if len(roots) > 1 else ""))
        note = unserved_socket_note(args.socket, args.state_dir, reported)
        if note is not None:
            print(note)
        return 0
    rows = [("RUN", "STATE", "STEP", "LR", "DECISIONS", "MLFLOW RUN", "LAST DECISION")]
    for r in runs:
        rows.append((r["run"], r["state"], "-" if r["step"] is None else str(r["step"]),
                     " ".join(f"{x:.4g}" for x in r["lrs"]) or "-",
                     "-" if r["decisions"] is None else str(r["decisions"]),
                     r["mlflow_run_id"] or "-", _describe(r["last_decision"])))
    widths = [max(len(row[i]) for row in rows) for i in range(6)]
    for row in rows:
        print("  ".join([*(c.ljust(w) for c, w in zip(row[:6], widths, strict=True)), row[6]]))
    others = sorted({r["state_dir"] for r in runs} - {str(roots[0])})
    if others:
        print(f"(runs of controllers on other sockets included: {', '.join(others)})")
    return 0
