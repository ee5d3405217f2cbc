"""64 concurrent runs against one controller: every observation is answered with the
right LRs, no decision is lost, and the controller's memory is flat.

Each run makes 2 500 steps by default (160 000 observations in all, about a quarter
of a minute of CI); ``LRCTL_TEST_FULL=1`` runs the full 10 000 steps each."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from daemon_helpers import ControllerProc
from rel_helpers import FIGURES, FULL, rss_kib

from lrctl.client import request

RUNS = 64
STEPS = 10_000 if FULL else 2_500
PROCESSES = 4


@pytest.mark.slow
def test_64_concurrent_runs(controller: ControllerProc) -> None:
    worker = Path(__file__).with_name("load_worker.py")
    per = RUNS // PROCESSES
    started = time.monotonic()
    procs = [subprocess.Popen([sys.executable, str(worker), controller.socket, f"w{k}",
                               str(per), str(STEPS)], stdout=subprocess.PIPE, text=True)
             for k in range(PROCESSES)]
    samples: list[tuple[float, int]] = []
    try:
        while any(p.poll() is None for p in procs):
            samples.append((time.monotonic() - started, rss_kib(controller.pid)))
            time.sleep(0.25)
        outs = [p.communicate(timeout=60)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(10)
    elapsed = time.monotonic() - started
    assert all(p.returncode == 0 for p in procs), outs
    results = [json.loads(o.strip().splitlines()[-1]) for o in outs]
    answered = sum(r["answered"] for r in results)
    assert answered == RUNS * STEPS
    assert sum(r["mismatched"] for r in results) == 0
    decisions = sum(r["decisions"] for r in results)
    expected = sum(r["expected_decisions"] for r in results)
    assert decisions == expected and expected > 0
    assert request({"t": "status"})["runs"] == 0  # every run said bye
    assert controller.proc is not None and controller.proc.poll() is None
    # Memory: flat once the runs are in (a loose bound; the figures are reported).
    total = samples[-1][0] if samples else elapsed
    early = [kib for at, kib in samples if at >= total * 0.1] or [samples[0][1]]
    peak = max(kib for _, kib in samples)
    assert peak < 2 * early[0], samples
    FIGURES["load"] = {
        "runs": RUNS, "steps_each": STEPS, "observations_answered": answered,
        "decisions": decisions, "decisions_lost": expected - decisions,
        "wall_s": round(elapsed, 1), "obs_per_s": round(answered / elapsed),
        "controller_rss_kib": {"at_10pct": early[0], "peak": peak, "final": samples[-1][1]}}
