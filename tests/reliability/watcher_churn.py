"""Reproduce the policy watcher's lock-order deadlock (run as a script, in its own process).

One policy is watched in a directory that receives a steady stream of writes
to *other* files (logs, an sqlite database, checkpoints next to a policy), so
watchdog's dispatcher thread is almost always delivering an event. Meanwhile
the main thread watches and unwatches a policy in a second directory in a loop,
as a controller does when runs attach and leave. Before the fix the dispatcher
held the observer's lock while waiting for the watcher's lock, and ``watch``
held the watcher's lock while waiting for the observer's: a hang within
seconds.

Usage: ``python watcher_churn.py DIR SECONDS`` prints one JSON line of counts
and exits 0; a hang is the caller's timeout to detect (the process is killed).
"""

from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path

from lrctl.reload import PolicyWatcher, ReloadEvent

POLICY = "version: 1\npolicies:\n  - kind: divergence\n"


def main(root: str, seconds: float) -> int:
    busy, quiet = Path(root, "busy"), Path(root, "quiet")
    busy.mkdir(parents=True, exist_ok=True)
    quiet.mkdir(parents=True, exist_ok=True)
    (busy / "policy.yaml").write_text(POLICY)
    (quiet / "other.yaml").write_text(POLICY)
    events: list[ReloadEvent] = []
    stop = threading.Event()

    def scribble() -> None:  # ~100+ writes/s of files next to the watched policy
        i = 0
        while not stop.is_set():
            (busy / f"log{i % 8}.txt").write_text(f"line {i}\n")
            i += 1
            stop.wait(0.005)

    writer = threading.Thread(target=scribble, name="scribbler", daemon=True)
    watcher = PolicyWatcher(events.append, debounce_s=0.05)
    watcher.start()
    watcher.watch(str(busy / "policy.yaml"))
    writer.start()
    cycles = 0
    deadline = time.monotonic() + seconds
    try:
        while time.monotonic() < deadline:
            watcher.watch(str(quiet / "other.yaml"))
            watcher.unwatch(str(quiet / "other.yaml"))
            cycles += 1
        # The watcher still reloads after the churn: an edit of the busy policy arrives.
        (busy / "policy.yaml").write_text(POLICY + "# edited\n")
        edit_deadline = time.monotonic() + 30
        while not any(e.status == "changed" for e in events):
            if time.monotonic() > edit_deadline:
                print(json.dumps({"cycles": cycles, "error": "edit never reloaded"}))
                return 1
            time.sleep(0.01)
    finally:
        stop.set()
        writer.join()
        watcher.stop()
    print(json.dumps({"cycles": cycles, "reloads": len(events)}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], float(sys.argv[2])))
