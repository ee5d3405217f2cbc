"""Hostile names and paths from clients, and no code execution on any input path."""

from __future__ import annotations

import ast
import os
from pathlib import Path

import pytest
import torch
from daemon_helpers import ControllerProc
from rel_helpers import FIGURES, RawClient, hello, until

import lrctl
from lrctl import paths
from lrctl.client import request, sanitize_run_name
from lrctl.paths import is_run_key

PLATEAU = "version: 1\npolicies:\n  - kind: plateau\n    metric: loss\n"
HOSTILE = ["../../etc", "a/b", "\x00", "x" * 500, "..", ".", "/abs", "a\nb", "ünï",
           "run/../../../tmp/x", "-rf", " ", "a\\b", "~", "$(id)", ".hidden", "a/../b",
           "keynl\n"]
NAMES = [*HOSTILE, "CON", "a..b"]


def _tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


@pytest.mark.parametrize("name", HOSTILE)
def test_hostile_run_keys_are_refused_and_touch_no_file(controller: ControllerProc,
                                                        name: str) -> None:
    root = Path(controller.state_dir).parent
    before = _tree(root)
    client = RawClient(controller.socket)
    try:
        client.send(hello(name, PLATEAU, [0.1]))
        reply = client.recv()
    finally:
        client.close()
    assert reply is not None and reply["t"] == "error", reply
    assert reply["code"] == "bad_message"
    assert _tree(root) == before  # no file made, inside the state dir or out of it
    assert request({"t": "runs"})["runs"] == []
    FIGURES.setdefault("hostile names refused", 0)
    FIGURES["hostile names refused"] += 1


@pytest.mark.parametrize("name", NAMES)
def test_hostile_run_names_become_safe_keys(controller: ControllerProc, name: str) -> None:
    opt = torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=0.1)
    with lrctl.attach(opt, policy=PLATEAU, sync=True, spawn=False, run_name=name) as ctl:
        ctl.step(1.0)
        key = ctl.run_key
        assert key is not None and is_run_key(key) and "/" not in key
        assert sanitize_run_name(name) in key
        runs = Path(controller.state_dir) / "runs"
        # A new run's first checkpoint is written off the loop: wait for it.
        until("the run's checkpoint", lambda: (runs / f"{key}.ckpt").exists())
        files = os.listdir(runs)  # a later checkpoint may be on its way: .KEY.json.*.tmp
        assert [f for f in files if not f.startswith(".")] == [f"{key}.ckpt"]
        assert all(f.startswith(f".{key}.json.") for f in files if f.startswith("."))


@pytest.mark.parametrize("source", ["../../etc/passwd", "relative.yaml", "/tmp/a\x00b",
                                    "/tmp/\x1b[31mred.yaml", "/" + "d/" * 3000])
def test_hostile_policy_sources_are_labels_never_opened(controller: ControllerProc,
                                                        source: str) -> None:
    client = RawClient(controller.socket)
    try:
        msg = hello("src-test", PLATEAU, [0.1])
        msg["policy"]["source"] = source
        client.send(msg)
        reply = client.answer()
        if reply["t"] == "error":  # too long for the field: refused
            assert len(source) > 4096
            return
        assert reply["t"] == "welcome"
        run = request({"t": "runs"})["runs"][0]
        assert run["policy_source"].startswith("<") and run["watching"] is False
        assert request({"t": "status"})["watching"] == []
    finally:
        client.close()


FORBIDDEN_MODULES = {"pickle", "cPickle", "marshal", "shelve", "dill", "cloudpickle"}
FORBIDDEN_CALLS = {"eval", "exec", "__import__", "compile"}
UNSAFE_YAML = {"load", "unsafe_load", "full_load", "load_all", "unsafe_load_all",
               "UnsafeLoader", "FullLoader", "Loader"}
# import_module over fixed lists of our own modules (CLI verbs, bench suites): no input.
IMPORT_MODULE_OK = {"cli.py", "commands/bench.py", "bench/everything.py"}


def test_no_pickle_eval_or_arbitrary_import_in_the_package() -> None:
    root = Path(lrctl.__file__).parent
    problems = []
    for path in sorted(root.rglob("*.py")):
        rel = str(path.relative_to(root))
        tree = ast.parse(path.read_text(encoding="utf-8"), rel)
        for node in ast.walk(tree):
            if isinstance(node, ast.Import | ast.ImportFrom):
                names = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
                if any(n.split(".")[0] in FORBIDDEN_MODULES for n in names):
                    problems.append(f"{rel}:{node.lineno}: imports {names}")
            elif isinstance(node, ast.Call):
                f = node.func
                if isinstance(f, ast.Name) and f.id in FORBIDDEN_CALLS:
                    problems.append(f"{rel}:{node.lineno}: calls {f.id}")
                if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name):
                    if f.value.id == "yaml" and f.attr in UNSAFE_YAML:
                        problems.append(f"{rel}:{node.lineno}: yaml.{f.attr}")
                    if f.attr == "import_module" and rel not in IMPORT_MODULE_OK:
                        problems.append(f"{rel}:{node.lineno}: import_module")
            elif isinstance(node, ast.Attribute) and node.attr in (
                    "UnsafeLoader", "FullLoader") and isinstance(node.value, ast.Name):
                problems.append(f"{rel}:{node.lineno}: {node.value.id}.{node.attr}")
    assert not problems, problems


def test_tcp_is_loopback_by_default_and_the_token_compare_is_constant_time() -> None:
    assert paths.parse_host_port("9000") == ("127.0.0.1", 9000)
    assert paths.parse_host_port(":9000") == ("127.0.0.1", 9000)
    source = (Path(lrctl.__file__).parent / "daemon" / "transport.py").read_text()
    tree = ast.parse(source)
    compares = [n for n in ast.walk(tree) if isinstance(n, ast.Compare)
                and any(isinstance(op, ast.Eq | ast.NotEq) for op in n.ops)
                and any("token" in ast.unparse(side) for side in [n.left, *n.comparators])]
    assert not compares, [ast.unparse(c) for c in compares]
    assert "hmac.compare_digest" in source


def test_a_symlink_at_the_lock_path_is_not_followed(make_controller, short_dir: Path) -> None:  # type: ignore[no-untyped-def]
    """A planted <socket>.lock -> victim must not truncate the victim."""
    victim = short_dir / "victim.txt"
    victim.write_text("precious\n")
    sock = Path(os.environ["LRCTL_SOCKET"])
    sock.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    (sock.parent / (sock.name + ".lock")).symlink_to(victim)
    proc = make_controller(start=False)
    proc.start(wait=False)
    assert proc.proc is not None and proc.proc.wait(60) != 0
    assert victim.read_text() == "precious\n"


def test_log_is_private_and_a_readable_state_dir_is_tightened(make_controller) -> None:  # type: ignore[no-untyped-def]
    import stat

    state = Path(os.environ["LRCTL_STATE_DIR"])
    state.mkdir(mode=0o755, parents=True)
    os.chmod(state, 0o755)
    proc = make_controller()
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    assert stat.S_IMODE((state / "controller.log").stat().st_mode) == 0o600
    assert proc.proc is not None and proc.proc.poll() is None
