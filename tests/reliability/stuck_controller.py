"""A real controller (``lrctl.daemon.serve``) with a sink that can get stuck (liveness tests).

``python stuck_controller.py SOCKET STATE_DIR STALL_S GRACE_S [--stuck-thread]``

* A run named ``hang`` makes the sink block forever in ``open_run``, on the
  event loop's thread: the loop stalls. The sink first creates
  ``STATE_DIR/stuck`` so a test knows the loop is in it.
* ``--stuck-thread`` starts a non-daemon thread that never ends (a worker stuck
  on a dead backend), which would hold the interpreter's exit for ever.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from lrctl.daemon import ServeOptions, serve
from lrctl.sinks import NullSink, RunInfo


class StuckSink(NullSink):
    def __init__(self, state_dir: str) -> None:
        self.state_dir = Path(state_dir)

    def open_run(self, info: RunInfo) -> None:
        if info.run_name == "hang":
            (self.state_dir / "stuck").touch()
            threading.Event().wait()  # never set: the loop is stuck here

    def decision(self, run_key: str, record: Mapping[str, Any]) -> None:
        return None

    def observation(self, run_key: str, step: int, loss: float | None,
                    grad_norm: float | None, lrs: Sequence[float]) -> None:
        return None


def main() -> int:
    socket_path, state_dir, stall_s, grace_s = sys.argv[1:5]
    if "--stuck-thread" in sys.argv[5:]:
        threading.Thread(target=threading.Event().wait, name="stuck-worker",
                         daemon=False).start()
    options = ServeOptions(socket_path=socket_path, state_dir=state_dir, foreground=True,
                           watch=True, stall_timeout=float(stall_s),
                           shutdown_grace=float(grace_s))
    return serve(options, lambda state: StuckSink(state))


if __name__ == "__main__":
    sys.exit(main())
