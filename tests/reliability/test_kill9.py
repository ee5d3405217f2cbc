"""kill -9 of the controller at 20 random points of one run, with the full audit sink on.

The run never sees an exception; after each restart the session resumes from
its checkpoint plus the hook's replay, so the run ends exactly as an
uninterrupted in-process engine would; and every decision is in the journal,
and in MLflow (sqlite store), exactly once.
"""

from __future__ import annotations

import json
import random
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from daemon_helpers import POLICIES, ControllerProc, losses
from rel_helpers import FIGURES, store_client, until_shipped

import lrctl

POLICY = str(POLICIES / "default.yaml")
STEPS = 1500
KILLS = 20


def _reconnect(ctl: lrctl.Controller) -> None:
    while not ctl.connected:
        ctl._link.wait(lambda: ctl.connected, 0.2)  # type: ignore[union-attr]
        ctl._pump()


@pytest.mark.slow
def test_kill_9_at_20_random_points_loses_and_repeats_nothing(
        make_controller: Callable[..., ControllerProc], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    from sinks_helpers import assert_exactly_once, journal_decisions

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)
    controller = make_controller(audit=True)
    curve = losses(STEPS, seed=11, spikes=(130, 400, 401, 777, 1200))
    engine = lrctl.load_policy(POLICY, [0.1, 0.01])
    expected = [engine.observe(t, loss, 1.0) for t, loss in enumerate(curve)]
    rng = random.Random(20261128)
    kills = sorted(rng.sample(range(10, STEPS - 10), KILLS))
    opt = torch.optim.SGD([{"params": [torch.nn.Parameter(torch.ones(1))], "lr": 0.1},
                           {"params": [torch.nn.Parameter(torch.ones(1))], "lr": 0.01}])
    down_steps = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # "lost the controller", by design
        ctl = lrctl.attach(opt, policy=POLICY, sync=True, spawn=False, max_backoff=0.05)
        try:
            t = 0
            for kill_at in [*kills, STEPS]:
                while t < kill_at:
                    ctl.step(curve[t], grad_norm=1.0)
                    if ctl.connected:
                        assert ctl.lr == expected[t], f"step {t}"
                    t += 1
                if kill_at == STEPS:
                    break
                controller.kill9()
                for _ in range(rng.randrange(0, 4)):  # steps while it is down: held LR
                    if t < STEPS:
                        ctl.step(curve[t], grad_norm=1.0)
                        t += 1
                        down_steps += 1
                controller.start()
                _reconnect(ctl)
            assert ctl.lr == expected[-1]
            assert [d.to_dict() for d in ctl.decisions] == [d.to_dict() for d in
                                                             engine.decisions]
            key = ctl.run_key
        finally:
            ctl.close()
    controller.stop()
    state = Path(controller.state_dir)
    made = [(d.step, d.policy, d.action) for d in engine.decisions]
    journal = journal_decisions(state, key)
    assert [(r["step"], r["policy"], r["action"]) for r in journal] == made
    # MLflow: whatever the last controller could not ship is replayed by the next one.
    controller.start()
    client = store_client(uri)

    run_id = until_shipped(client, state, key, len(journal))  # decisions, files, end
    controller.stop()
    uploaded = assert_exactly_once(client, run_id, state, key, tmp_path)
    FIGURES["kill -9 recovery"] = {
        "kills": KILLS, "steps": STEPS, "steps_while_down": down_steps,
        "decisions": len(made), "journal": len(journal), "mlflow": len(uploaded),
        "decisions_lost": len(made) - len(uploaded), "duplicates": len(uploaded) - len(
            {json.dumps([r["step"], r["policy"], r["action"]]) for r in uploaded})}
