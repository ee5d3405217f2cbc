#!/usr/bin/env python3
"""The hostile-input and fault attacks of issue #18, measured on a real controller.

    python tests/reliability/attacks.py [--tree DIR] [ATTACK ...]

Each attack starts its own ``lrctl serve --foreground`` (a private socket and
state directory under /tmp), usually beside a *reference* run that sends an
observation and waits for its answer, over and over; the figures are what the
attack cost the controller and the reference run. ``--tree`` runs the controller
from another source tree, e.g. ``git archive <commit> | tar -x -C /tmp/base``,
to measure the figures before a change. Attacks: yaml, errors, tcp_auth, idle_unix,
idle_tcp, slowloris, fds, takeover, sigterm, tiny. This is a measuring tool (wall
times); the tests in this directory assert outcomes instead.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path[:0] = [str(HERE), str(HERE.parent)]

from rel_helpers import RawClient, hello  # noqa: E402

from lrctl.protocol import encode  # noqa: E402
from lrctl.wire.operator import request  # noqa: E402

POLICY = "version: 1\npolicies:\n  - kind: divergence\n"
TOKEN = "attack-token-0123456789"


def _raise_nofile(n: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < n:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(n, hard), hard))


class Ctl:
    """One controller process with its own socket and state directory."""

    def __init__(self, tree: Path, *, audit: bool = False, nofile: int | None = None,
                 tcp: bool = False, env: dict[str, str] | None = None,
                 extra: list[str] | None = None) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="lrctl-atk-", dir="/tmp"))
        os.chmod(self.root, 0o700)
        self.socket = str(self.root / "run" / "c.sock")
        self.state = self.root / "state"
        self.log = self.root / "serve.out"
        self.port = 0
        args = [sys.executable, "-m", "lrctl", "serve", "--foreground", "--socket",
                self.socket, "--state-dir", str(self.state), *(extra or [])]
        if not audit:
            args.append("--no-audit")
        if tcp:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                self.port = s.getsockname()[1]
            token_file = self.root / "token"
            token_file.write_text(TOKEN)
            os.chmod(token_file, 0o600)
            args += ["--tcp", f"127.0.0.1:{self.port}", "--token-file", str(token_file)]
        limit = nofile

        def preexec() -> None:
            if limit is not None:  # soft and hard: as 'ulimit -n' in a shell
                resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))

        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                args, stdout=out, stderr=subprocess.STDOUT, cwd=tree, preexec_fn=preexec,
                env={**os.environ, "PYTHONPATH": str(tree), **(env or {})})
        deadline = time.monotonic() + 60
        while True:
            assert self.proc.poll() is None, self.log.read_text()[-2000:]
            try:
                if request({"t": "status"}, self.socket, timeout=1.0)["pid"] == self.proc.pid:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, "controller not ready"
            time.sleep(0.05)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def cpu_s(self) -> float:
        with open(f"/proc/{self.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def rss_mib(self) -> float:
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        return 0.0

    def log_count(self, text: str) -> int:
        return self.log.read_text(errors="replace").count(text)

    def sigterm(self, timeout: float = 60.0) -> tuple[float, int | None]:
        t0 = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            code = None
        return time.monotonic() - t0, code

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        shutil.rmtree(self.root, ignore_errors=True)


class Reference(threading.Thread):
    """A run that sends an observation and waits for its answer until stopped; records
    the longest wait and how many observations were answered."""

    def __init__(self, path: str, name: str = "reference") -> None:
        super().__init__(daemon=True)
        self.client = RawClient(path)
        self.client.send(hello(name, POLICY, [0.1]))
        assert self.client.answer()["t"] == "welcome"
        self.stop = threading.Event()
        self.worst = 0.0
        self.answered = 0
        self.error: str | None = None

    def run(self) -> None:
        step = 0
        try:
            while not self.stop.is_set():
                t0 = time.monotonic()
                self.client.obs(step, 1.0 / (1 + step), 1.0)
                reply = self.client.answer()
                self.worst = max(self.worst, time.monotonic() - t0)
                if reply["t"] == "lr":
                    self.answered += 1
                step += 1
        except Exception as exc:  # reported in the table
            self.error = repr(exc)

    def finish(self) -> dict[str, Any]:
        self.stop.set()
        self.join(30)
        self.client.close()
        return {"ref_worst_s": round(self.worst, 3), "ref_answered": self.answered,
                **({"ref_error": self.error} if self.error else {})}


@contextlib.contextmanager
def reference(path: str) -> Iterator[Reference]:
    ref = Reference(path)
    ref.start()
    yield ref


def _tcp_request(port: int, msg: dict[str, Any], timeout: float = 10.0) -> dict[str, Any]:
    return request(msg, f"tcp://127.0.0.1:{port}", token=TOKEN, timeout=timeout)


# -- the attacks ------------------------------------------------------------------------
def attack_yaml(tree: Path) -> dict[str, Any]:
    """#5: 10 hellos each carrying a 60 KB YAML flow list."""
    ctl = Ctl(tree)
    try:
        text = "version: 1\npolicies:\n  - kind: divergence\njunk: [" + ",".join(
            ["1"] * 30_000) + "]\n"
        with reference(ctl.socket) as ref:
            time.sleep(0.5)
            t0 = time.monotonic()
            attackers = [RawClient(ctl.socket) for _ in range(10)]
            for i, c in enumerate(attackers):
                c.send(hello(f"yaml-{i}", text, [0.1]))
            answers = [c.recv() for c in attackers]
            took = time.monotonic() - t0
            time.sleep(0.3)
            out = ref.finish()
        codes = sorted({str(a.get("code")) if a else "closed" for a in answers})
        return {**out, "attackers_answered_s": round(took, 2), "attacker_replies": codes}
    finally:
        ctl.close()


def attack_errors(tree: Path) -> dict[str, Any]:
    """#6: 10 peers each send 2 000 status requests without reading, then a bad frame."""
    ctl = Ctl(tree)
    try:
        with reference(ctl.socket) as ref:
            time.sleep(0.5)
            peers = flood_status(ctl.socket, 10, 2000)
            for s in peers:
                s.sendall(struct.pack(">I", 1 << 30))
            time.sleep(2.0)
            out = ref.finish()
            for s in peers:
                s.close()
        return out
    finally:
        ctl.close()


def flood_status(path: str, peers: int, requests: int) -> list[socket.socket]:
    """``peers`` connections that each ask ``requests`` ``status`` and read none of the
    answers; returned once the controller has answered each (its replies pile up)."""
    import select

    out = []
    for _ in range(peers):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(path)
        s.settimeout(60)
        s.sendall(encode({"t": "status"}) * requests)
        out.append(s)
    for s in out:
        select.select([s], [], [], 60)
    return out


def attack_tcp_auth(tree: Path) -> dict[str, Any]:
    """#7: 255 unauthenticated TCP connections, each sending a 1 MiB JSON frame."""
    ctl = Ctl(tree, tcp=True)
    try:
        body = json.dumps({"v": 1, "t": "hello", "x": "a" * ((1 << 20) - 64)}).encode()
        frame = struct.pack(">I", len(body)) + body
        with reference(ctl.socket) as ref:
            time.sleep(0.5)
            cpu0 = ctl.cpu_s()
            socks = []
            for _ in range(255):
                s = socket.create_connection(("127.0.0.1", ctl.port))
                socks.append(s)
            threads = [threading.Thread(target=_send_all_quietly, args=(s, frame))
                       for s in socks]
            for t in threads:
                t.start()
            for t in threads:
                t.join(120)
            for s in socks:  # wait for every answer (an error frame, or the close)
                s.settimeout(60)
                with contextlib.suppress(OSError):
                    while s.recv(1 << 16):
                        pass
                s.close()
            cpu = ctl.cpu_s() - cpu0
            out = ref.finish()
        return {**out, "controller_cpu_s": round(cpu, 2)}
    finally:
        ctl.close()


def _send_all_quietly(s: socket.socket, data: bytes) -> None:
    with contextlib.suppress(OSError):
        s.sendall(data)


def attack_idle_unix(tree: Path) -> dict[str, Any]:
    """#8: 1 500 idle Unix connections, then a new hook and ``lrctl status``."""
    _raise_nofile(4096)
    ctl = Ctl(tree, nofile=4096)
    try:
        socks = []
        for _ in range(1500):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(ctl.socket)  # blocking: waits while the backlog is full
            socks.append(s)
        time.sleep(1.0)
        try:
            status_ok = request({"t": "status"}, ctl.socket, timeout=5.0)["t"] == "status"
        except (OSError, RuntimeError) as exc:
            status_ok = f"no ({type(exc).__name__})"
        try:
            c = RawClient(ctl.socket, timeout=5)
            c.send(hello("late-hook", POLICY, [0.1]))
            reply = c.recv()
            hook_ok = bool(reply and reply["t"] == "welcome")
            c.close()
        except OSError as exc:
            hook_ok = f"no ({type(exc).__name__})"
        for s in socks:
            s.close()
        return {"status_ok": status_ok, "new_hook_ok": hook_ok}
    finally:
        ctl.close()


def attack_idle_tcp(tree: Path) -> dict[str, Any]:
    """#8: 400 silent TCP connections, then an authorised TCP client."""
    ctl = Ctl(tree, tcp=True)
    try:
        socks = [socket.create_connection(("127.0.0.1", ctl.port)) for _ in range(400)]
        time.sleep(0.5)
        try:
            ok: Any = _tcp_request(ctl.port, {"t": "status"}, timeout=5)["t"] == "status"
        except (OSError, RuntimeError) as exc:
            ok = f"no ({type(exc).__name__})"
        for s in socks:
            s.close()
        return {"authorised_client_ok": ok}
    finally:
        ctl.close()


def attack_slowloris(tree: Path) -> dict[str, Any]:
    """#8: 300 peers each send all but the last byte of a 1 MiB hello, and wait."""
    ctl = Ctl(tree)
    try:
        time.sleep(0.5)
        before = ctl.rss_mib()
        size = (1 << 20) - 16
        part = struct.pack(">I", size) + b"{" + b" " * (size - 2)
        socks = []
        for _ in range(300):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(ctl.socket)
            socks.append(s)
        threads = [threading.Thread(target=_send_all_quietly, args=(s, part)) for s in socks]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        time.sleep(2.0)
        after = ctl.rss_mib()
        try:
            status_ok = request({"t": "status"}, ctl.socket, timeout=5.0)["t"] == "status"
        except (OSError, RuntimeError):
            status_ok = False
        for s in socks:
            s.close()
        return {"rss_before_mib": round(before), "rss_after_mib": round(after),
                "status_ok": status_ok}
    finally:
        ctl.close()


def attack_fds(tree: Path) -> dict[str, Any]:
    """#9: under ``ulimit -n 1024``, sessions without ``bye`` until the fds run out."""
    ctl = Ctl(tree, audit=True, nofile=1024,
              env={"MLFLOW_TRACKING_URI": "http://127.0.0.1:9"})
    try:
        sessions: list[RawClient] = []
        refused: list[str] = []
        for i in range(600):
            if len(refused) >= 20:
                break
            try:
                c = RawClient(ctl.socket, timeout=3)
                c.send(hello(f"fd-{i}", POLICY, [0.1]))
                reply = c.recv()
            except OSError as exc:
                refused.append(type(exc).__name__)
                continue
            if reply is not None and reply["t"] == "welcome":
                sessions.append(c)
            else:
                refused.append(str(reply.get("message"))[:80] if reply else "closed")
                c.close()
        # Connections left in the listener's backlog, as hooks that keep trying leave them.
        pending = []
        for _ in range(50):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.setblocking(False)
            with contextlib.suppress(OSError):
                s.connect(ctl.socket)
            pending.append(s)
        lines0 = ctl.log_count("accept failed")
        cpu0 = ctl.cpu_s()
        time.sleep(3.0)
        cpu = (ctl.cpu_s() - cpu0) / 3.0
        lines = (ctl.log_count("accept failed") - lines0) / 3.0
        try:
            status_ok: Any = request({"t": "status"}, ctl.socket, timeout=5)["t"] == "status"
        except (OSError, RuntimeError) as exc:
            status_ok = f"no ({type(exc).__name__})"
        for s in pending:
            s.close()
        for c in sessions:
            c.close()
        return {"sessions": len(sessions), "refused": len(refused),
                "refusal_reason": refused[-1] if refused else None,
                "cpu_percent_while_out": round(cpu * 100), "accept_failed_lines_per_s":
                    round(lines), "status_ok": status_ok, "log_mib": round(
                    ctl.log.stat().st_size / 2**20, 1)}
    finally:
        ctl.close()


def attack_takeover(tree: Path) -> dict[str, Any]:
    """#13: a second hello with a live run's key."""
    ctl = Ctl(tree)
    try:
        real = RawClient(ctl.socket)
        real.send(hello("shared-name", POLICY, [0.1]))
        assert real.answer()["t"] == "welcome"
        real.obs(0, 1.0, 1.0)
        real.answer()
        other = RawClient(ctl.socket)
        other.send(hello("shared-name", POLICY, [0.1]))
        other_reply = other.recv()
        try:
            real.obs(1, 1.0, 1.0)
            reply = real.recv()
        except OSError:
            reply = None
        return {"second_hello": other_reply and (other_reply.get("code")
                                                 or other_reply["t"]),
                "real_run_still_served": bool(reply and reply["t"] == "lr")}
    finally:
        ctl.close()


def attack_sigterm(tree: Path) -> dict[str, Any]:
    """#14: SIGTERM to exit, in five MLflow/session situations."""
    from mlflow_server import MlflowServer, free_port

    out: dict[str, Any] = {}
    scratch = Path(tempfile.mkdtemp(prefix="lrctl-atk-ml-", dir="/tmp"))
    try:
        server = MlflowServer(scratch / "server").start()
        try:
            out["normal"] = _sigterm_case(tree, server.uri, 4)
            uri = server.uri
        finally:
            server.stop()
        out["mlflow_stopped"] = _sigterm_case(tree, uri, 4)
        sql = scratch / "sqlite"
        sql.mkdir()
        out["sqlite_dir_deleted"] = _sigterm_case(
            tree, f"sqlite:///{sql}/mlflow.db", 4, before=lambda: shutil.rmtree(sql))
        hung = socket.socket()
        hung.bind(("127.0.0.1", free_port()))
        hung.listen(1024)
        try:
            out["mlflow_hung"] = _sigterm_case(
                tree, f"http://127.0.0.1:{hung.getsockname()[1]}", 4)
        finally:
            hung.close()
        out["1004_sessions"] = _sigterm_case(tree, "http://127.0.0.1:9", 1004)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return out


def _sigterm_case(tree: Path, uri: str, runs: int,
                  before: Callable[[], None] | None = None) -> dict[str, Any]:
    _raise_nofile(8192)
    ctl = Ctl(tree, audit=True, nofile=8192, env={"MLFLOW_TRACKING_URI": uri})
    try:
        clients, decided = [], 0
        for i in range(runs):
            c = RawClient(ctl.socket)
            c.send(hello(f"term-{i}", POLICY, [0.1], mlflow={"tracking_uri": uri}))
            assert c.answer()["t"] == "welcome"
            clients.append(c)
        steps = 40 if runs <= 8 else 12
        for c in clients:
            for step in range(steps):
                c.obs(step, float("nan") if step % 10 == 5 else 1.0, 1.0)
        for c in clients:
            for _ in range(steps):
                decided += len(c.answer().get("d") or ())
        time.sleep(1.5)  # MLflow's workers are at work (or stuck) now
        if before is not None:
            before()
        took, code = ctl.sigterm()
        journaled = sum(
            len((p / "decisions.jsonl").read_text().splitlines())
            for p in (ctl.state / "runs").iterdir()
            if p.is_dir() and (p / "decisions.jsonl").exists())
        for c in clients:
            c.close()
        return {"exit_s": round(took, 2), "code": code, "decisions": decided,
                "journaled": journaled}
    finally:
        ctl.close()


def attack_tiny(tree: Path, peers: int = 50, seconds: float = 3.0) -> dict[str, Any]:
    """``peers`` connections, no hello, each sending 64 KiB reads of the smallest frame
    there is (19 bytes, an unknown type: a non-fatal error each) and reading its errors,
    for ``seconds``: 3 449 frames a read, all decoded on the loop before any share or
    budget applied, until this round."""
    import select

    frame = encode({"t": "x"})
    burst = frame * ((1 << 16) // len(frame))
    ctl = Ctl(tree)
    socks = []
    try:
        for _ in range(peers):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(ctl.socket)
            s.setblocking(False)
            socks.append(s)
        with reference(ctl.socket) as ref:
            time.sleep(0.5)
            cpu0, sent, end = ctl.cpu_s(), 0, time.monotonic() + seconds
            while time.monotonic() < end:
                for s in socks:
                    with contextlib.suppress(BlockingIOError):
                        sent += s.send(burst)
                readable, _, _ = select.select(socks, [], [], 0.01)
                for s in readable:
                    with contextlib.suppress(BlockingIOError, ConnectionError):
                        while s.recv(1 << 20):
                            pass
            out = ref.finish()
        return {**out, "attack_mib_sent": round(sent / (1 << 20), 1),
                "ctl_cpu_s": round(ctl.cpu_s() - cpu0, 2), "rss_mib": ctl.rss_mib()}
    finally:
        for s in socks:
            s.close()
        ctl.close()


ATTACKS: dict[str, Callable[[Path], dict[str, Any]]] = {
    "tiny": attack_tiny,
    "yaml": attack_yaml, "errors": attack_errors, "tcp_auth": attack_tcp_auth,
    "idle_unix": attack_idle_unix, "idle_tcp": attack_idle_tcp, "slowloris": attack_slowloris,
    "fds": attack_fds, "takeover": attack_takeover, "sigterm": attack_sigterm,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tree", type=Path, default=REPO,
                        help="source tree the controller runs from (default: this one)")
    parser.add_argument("attacks", nargs="*", default=list(ATTACKS), choices=list(ATTACKS))
    args = parser.parse_args()
    for name in args.attacks:
        t0 = time.monotonic()
        try:
            result = ATTACKS[name](args.tree.resolve())
        except Exception as exc:
            result = {"failed": repr(exc)}
        print(f"{name:10} {json.dumps(result)}  ({time.monotonic() - t0:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
