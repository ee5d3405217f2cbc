"""The training side stays light and the controller never loads torch."""

from __future__ import annotations

import json
import subprocess
import sys

from daemon_helpers import REPO, ControllerProc

HOOK = """
import json, sys, torch, lrctl
opt = torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=0.1)
with lrctl.attach(opt, sync=True, spawn=False) as ctl:
    for t in range(5):
        ctl.step(torch.tensor(1.0))
    ctl.report(val_loss=0.5)
    ctl.step(1.0)
    assert ctl.connected
print(json.dumps([m for m in ("mlflow", "watchdog", "yaml") if m in sys.modules]))
"""

CONTROLLER = """
import json, sys
import lrctl.cli, lrctl.daemon, lrctl.daemon.server, lrctl.commands.daemon
from lrctl.sinks import build_sink
lrctl.cli.build_parser()
build_sink(sys.argv[1])
print(json.dumps("torch" in sys.modules))
"""


def test_the_hook_never_imports_mlflow_watchdog_or_yaml(controller: ControllerProc) -> None:
    out = subprocess.run([sys.executable, "-c", HOOK], capture_output=True, text=True,
                         timeout=120, cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == []
    out = subprocess.run([sys.executable, "-c", "import sys, lrctl; lrctl.attach; print("
                          "sorted({'torch','mlflow','watchdog','yaml'} & set(sys.modules)))"],
                         capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "[]", out.stderr


def test_the_controller_never_imports_torch(controller: ControllerProc, short_dir) -> None:  # type: ignore[no-untyped-def]
    out = subprocess.run([sys.executable, "-c", CONTROLLER, str(short_dir / "s2")],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) is False
    # And the live process, after serving a run: no libtorch mapped into it.
    subprocess.run([sys.executable, "-c", HOOK], check=True, capture_output=True, timeout=120,
                   cwd=REPO)
    with open(f"/proc/{controller.pid}/maps") as f:
        assert "libtorch" not in f.read()
