"""Edit-to-effect latency of live policy editing, measured at the hook.

The clock runs from the write of the file to the arrival of the controller's
pushed ``lr`` frame carrying the ``reload`` decision. Figures are reported,
not asserted (the watcher's debounce, 150 ms, is the floor by design).
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

from daemon_helpers import ControllerProc
from rel_helpers import FIGURES, RawClient, hello

EDITS = 20


def _text(i: int) -> str:
    return f"version: 1\npolicies:\n  - kind: plateau\n    metric: loss\n    patience: {i + 2}\n"


def test_edit_to_effect_latency(controller: ControllerProc, tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text(_text(0))
    client = RawClient(controller.socket)
    try:
        msg = hello("latency", _text(0), [0.1])
        msg["policy"]["source"] = str(path)
        client.send(msg)
        assert client.answer()["t"] == "welcome"
        client.obs(0, 1.0)
        assert client.answer()["s"] == 0
        waits = []
        for i in range(1, EDITS + 1):
            started = time.perf_counter()
            path.write_text(_text(i))
            push = client.recv()
            waits.append(time.perf_counter() - started)
            assert push is not None and push["t"] == "lr" and push["s"] == -1, push
            assert [d["action"] for d in push["d"]] == ["reload"]
            assert push["d"][0]["evidence"]["changed"] == ["plateau"]
    finally:
        client.close()
    ms = sorted(w * 1000 for w in waits)
    FIGURES["reload latency ms"] = {
        "edits": EDITS, "p50": round(statistics.median(ms), 1),
        "p99": round(ms[min(len(ms) - 1, int(0.99 * len(ms)))], 1), "max": round(ms[-1], 1)}
