"""Under churn, a run's start and end never hold the other runs' answers (issue #18, item 15).

A run's hello creates its journal and first checkpoint, and its bye ends the journal
and removes the checkpoint: each with fsyncs (a directory's costs a filesystem
journal commit, tens of milliseconds under load). They used to run on the event
loop, so with 64 runs coming and going every other run's answer waited behind
them (p99 15 ms, max 76 ms at 64 × 20 Hz). Now the loop only opens and writes the
files; the fsyncs run on other threads, and a decision is still answered only once
its run's files are durable.

The test makes the disk hang (a real controller whose ``os.fsync`` blocks while a
flag file exists, see ``slow_disk/sitecustomize.py``): a steady run keeps being
answered while a newcomer says hello and bye, and once the disk comes back the
newcomer's journal ends durably and its checkpoint is gone. Before, the steady run
got no answer at all until the disk came back.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from daemon_helpers import ControllerProc
from rel_helpers import FIGURES, RawClient, hello, until

from lrctl.sinks.journal import RunPaths, read_lines

POLICY = "version: 1\npolicies:\n  - kind: divergence\n"
SLOW_DISK = Path(__file__).resolve().parent / "slow_disk"  # sitecustomize: fsync hangs
ANSWER_S = 20.0  # a generous bound on one answer: the disk hangs for far longer


def test_a_hello_and_a_bye_on_a_stuck_disk_do_not_hold_other_runs(
        make_controller: Callable[..., ControllerProc], short_dir: Path) -> None:
    stuck = short_dir / "stuck"
    ctl = make_controller(audit=True, env={
        **os.environ, "MLFLOW_TRACKING_URI": f"file://{short_dir / 'mlruns'}",
        "PYTHONPATH": str(SLOW_DISK), "LRCTL_TEST_SLOW_DISK": str(stuck),
        "LRCTL_TEST_SLOW_FSYNC_S": "inf"})
    steady = RawClient(ctl.socket, timeout=ANSWER_S)
    steady.send(hello("steady", POLICY, [0.1]))
    assert steady.answer()["t"] == "welcome"
    step = 0

    def steady_is_answered(n: int) -> None:
        nonlocal step
        for _ in range(n):
            steady.obs(step, 1.0, 1.0)
            assert steady.answer()["s"] == step  # a timeout here: the loop is stuck
            step += 1

    steady_is_answered(5)
    checkpoint = Path(ctl.state_dir) / "runs" / "newcomer.ckpt"
    stuck.touch()  # from here on every fsync hangs
    newcomer = RawClient(ctl.socket, timeout=ANSWER_S)
    newcomer.send(hello("newcomer", POLICY, [0.1]))
    steady_is_answered(20)
    welcome = newcomer.answer()
    assert welcome["t"] == "welcome" and welcome["saved_step"] == -1, welcome
    newcomer.obs(0, 1.0, 1.0)
    assert newcomer.answer()["s"] == 0
    steady_is_answered(10)
    assert not checkpoint.exists()  # its first checkpoint is still waiting for the disk
    newcomer.send({"t": "bye"})
    steady_is_answered(20)
    stuck.unlink()  # the disk is back
    events = RunPaths.of(ctl.state_dir, "newcomer").stream("events")
    until("the newcomer's end journaled and its checkpoint removed", lambda: (
        not checkpoint.exists()
        and any(line.record.get("event") == "end" for line in read_lines(events))))
    steady_is_answered(5)
    assert ctl.proc is not None and ctl.proc.poll() is None
    steady.close()
    newcomer.close()
    FIGURES["hello and bye on a stuck disk"] = {"steady answers meanwhile": step}
