"""Many runs on one controller, each with its own session and policy stack."""

from __future__ import annotations

import threading

import torch
from daemon_helpers import POLICIES, ControllerProc, losses

import lrctl

POLICY_FILES = ["default.yaml", "plateau.yaml", "sgdr.yaml", "divergence.yaml"]


def test_16_concurrent_runs_each_get_their_own_decisions(controller: ControllerProc) -> None:
    for name in POLICY_FILES:  # registers every built-in kind before the threads start
        lrctl.load_policy(str(POLICIES / name), [0.1])
    results: dict[int, list] = {}
    errors: list[BaseException] = []
    start = threading.Barrier(16)

    def run(i: int) -> None:
        try:
            path = str(POLICIES / POLICY_FILES[i % len(POLICY_FILES)])
            lrs = [0.1 * (i + 1), 0.01 * (i + 1)]
            opt = torch.optim.SGD([{"params": [torch.nn.Parameter(torch.ones(1))], "lr": lr}
                                   for lr in lrs])
            curve = losses(300, seed=i, spikes=(100 + i, 200 + i))
            engine = lrctl.load_policy(path, lrs)
            with lrctl.attach(opt, policy=path, sync=True, spawn=False, timeout=30.0,
                              run_name=f"run{i}") as ctl:
                start.wait(60)
                bad = []
                for t, loss in enumerate(curve):
                    ctl.step(loss, grad_norm=1.0 + i)
                    expected = engine.observe(t, loss, 1.0 + i)
                    if ctl.lr != expected:
                        bad.append((t, ctl.lr, expected))
                results[i] = [bad, [d.to_dict() for d in ctl.decisions],
                              [d.to_dict() for d in engine.decisions]]
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,), name=f"run{i}") for i in range(16)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(120)
    assert not errors, errors
    assert sorted(results) == list(range(16))
    for i, (bad, got, want) in results.items():
        assert bad == [], f"run {i}"
        assert got == want, f"run {i}"
    assert lrctl.client.request({"t": "status"})["runs"] == 0  # every session closed
