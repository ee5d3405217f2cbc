"""Fixtures for the reliability suite: the daemon suite's real controllers.

The controller fixtures are the daemon tests' own (loaded from that conftest,
so there is one definition). Each test records its figures in
:data:`rel_helpers.FIGURES`; tests/conftest.py prints them at the end of the run
(gathered from every xdist worker), so a CI log shows the load held, the faults
survived and the bad inputs tried.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
for extra in (HERE, HERE.parent / "daemon", HERE.parent / "sinks"):
    if str(extra) not in sys.path:
        sys.path.insert(0, str(extra))

_spec = importlib.util.spec_from_file_location("_daemon_conftest",
                                               HERE.parent / "daemon" / "conftest.py")
assert _spec is not None and _spec.loader is not None
_daemon = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_daemon)
short_dir = _daemon.short_dir
private_env = _daemon.private_env
controllers = _daemon.controllers
make_controller = _daemon.make_controller
controller = _daemon.controller
