"""State round trip through strict JSON, for every registered kind and every shipped file.

An interrupted run (state_dict at step k → JSON → a fresh engine from the same
file → load_state_dict → continue) must be indistinguishable from one that was
never interrupted: same LRs, same decisions, same final state.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path
from typing import Any

import pytest
import yaml

import lrctl
from lrctl.policy import Engine, available_kinds, get_policy_class

POLICIES = Path(__file__).resolve().parents[2] / "policies"
BASE_LRS = [0.1, 0.02]
STEPS = 400

#: Knobs that make each kind do something within STEPS observations.
KNOBS: dict[str, list[dict[str, Any]]] = {
    "warmup": [{"steps": 50}, {"steps": 200, "mode": "cosine"}],
    "decay": [{"schedule": "cosine", "total_steps": 300, "eta_min": 1e-5, "start": 20},
              {"schedule": "step", "step_size": 30, "gamma": 0.7}],
    "cyclical": [{"mode": "cosine", "T_0": 40, "T_mult": 2, "eta_min": [1e-5, 2e-6]},
                 {"mode": "triangular2", "max_lr": [0.5, 0.1], "step_size_up": 25}],
    "plateau": [{"patience": 3, "factor": 0.5, "cooldown": 2, "smoothing": "ema",
                 "smoothing_window": 5, "min_lr": 1e-3, "restart_lr": 0.05},
                {"metric": "val_loss", "patience": 1, "smoothing": "mean",
                 "smoothing_window": 3, "mode": "min", "threshold_mode": "abs"}],
    "rangetest": [{"growth": 1.05, "min_steps": 5},
                  {"anchor": "best", "max_factor": 20.0, "growth": 1.2, "settle": 0.5,
                   "patience": 3}],
    "anneal": [{"total_steps": 300, "start": 20},
               {"shape": "linear", "end_factor": 0.1, "total_steps": 350}],
    "divergence": [{"regrow_after": 20, "cooldown": 3, "window": 16, "min_samples": 8,
                    "tolerance": 1, "max_backoffs": 3}],
    "earlystop": [{"metric": "val_loss", "patience": 1, "baseline": 1.3},
                  {"metric": "loss", "smoothing": "trend", "window": 40, "patience": 60,
                   "after_reductions": 0, "start_after": 100}],
    "wsd": [{"warmup_steps": 20, "decay_steps": 100, "total_steps": 350,
             "decay_shape": "cosine", "min_lr_ratio": 0.1, "stop_after_decay": True},
            {"start_on": "plateau", "decay_fraction": 0.2, "window": 40, "total_steps": 380}],
}


def observations(seed: int = 5) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    out: list[dict[str, Any]] = []
    for t in range(STEPS):
        loss = (1.0 + math.exp(-t / 60)) * math.exp(rng.gauss(0, 0.05))
        obs: dict[str, Any] = {"loss": loss, "grad_norm": math.exp(rng.gauss(0, 0.2))}
        if t % 45 == 30:
            obs["loss"] = loss * 60
        if t in (123, 124, 301):
            obs["loss"] = math.nan
        if t % 10 == 0:
            obs["val_loss"] = 1.0 + 1.0 / (1 + t // 40)
        if t % 17 == 3:
            obs["grad_norm"] = None
        out.append(obs)
    return out


def run(engine: Engine, obs: list[dict[str, Any]], start: int) -> list[list[float]]:
    lrs = []
    for t in range(start, len(obs)):
        lrs.append(engine.observe(step=t, **obs[t]))
    return lrs


def check_round_trip(path: Path, k: int) -> None:
    obs = observations()
    whole = lrctl.load_policy(path, base_lrs=BASE_LRS)
    want_lrs = run(whole, obs, 0)
    first = lrctl.load_policy(path, base_lrs=BASE_LRS)
    for t in range(k):
        first.observe(step=t, **obs[t])
    saved = json.dumps(first.state_dict(), allow_nan=False)
    resumed = lrctl.load_policy(path, base_lrs=BASE_LRS)
    resumed.load_state_dict(json.loads(saved))
    assert resumed.lrs == (want_lrs[k - 1] if k else lrctl.load_policy(path, BASE_LRS).lrs)
    got_lrs = run(resumed, obs, k)
    assert got_lrs == want_lrs[k:]
    want_decisions = [d.to_dict() for d in whole.decisions if d.step >= k]
    assert [d.to_dict() for d in resumed.decisions] == want_decisions
    assert resumed.decision_count == whole.decision_count
    assert resumed.should_stop == whole.should_stop
    assert json.dumps(resumed.state_dict(), allow_nan=False) == json.dumps(
        whole.state_dict(), allow_nan=False)


def shipped_kinds() -> list[str]:
    """The kinds lrctl itself ships: every one must have knobs above. Not a plugin's (an
    ``lrctl.policies`` entry point such as ``pip install examples/custom_policy``'s
    ``inverse_sqrt``) nor a kind a test registered: this test cannot know their knobs."""
    return [kind for kind in available_kinds()
            if get_policy_class(kind).__module__.startswith("lrctl.policy.")]


def kind_cases() -> list[Any]:
    return [pytest.param(kind, i, id=f"{kind}-{i}")
            for kind in shipped_kinds() for i in range(max(1, len(KNOBS.get(kind, []))))]


@pytest.mark.parametrize("k", [0, 31, 124, 250])
@pytest.mark.parametrize(("kind", "variant"), kind_cases())
def test_every_kind_round_trips(tmp_path: Path, kind: str, variant: int, k: int) -> None:
    assert kind in KNOBS, f"kind {kind!r} is registered but has no knobs in this test"
    path = tmp_path / f"{kind}.yaml"
    entries = [{"kind": kind, **KNOBS[kind][variant]}]
    path.write_text(yaml.safe_dump({"version": 1, "policies": entries}))
    check_round_trip(path, k)


def test_every_kind_does_something(tmp_path: Path) -> None:
    """The knobs above are not idle: each variant makes decisions or moves the LR."""
    obs = observations()
    for kind in available_kinds():
        for knobs in KNOBS.get(kind, []):
            engine = lrctl.load_policy({"version": 1, "policies": [{"kind": kind, **knobs}]},
                                       base_lrs=BASE_LRS)
            lrs = run(engine, obs, 0)
            assert engine.decisions or len({tuple(x) for x in lrs}) > 1, (kind, knobs)


def test_all_kinds_in_one_stack_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "all.yaml"
    entries = [{"kind": kind, "name": f"{kind}-{i}", **knobs}
               for kind in available_kinds() for i, knobs in enumerate(KNOBS.get(kind, []))]
    path.write_text(yaml.safe_dump({"version": 1, "min_lr": 1e-6, "max_lr": 0.3,
                                    "policies": entries}))
    for k in (1, 77, 301, 399):
        check_round_trip(path, k)


@pytest.mark.parametrize("name", sorted(p.name for p in POLICIES.glob("*.yaml")))
@pytest.mark.parametrize("k", [13, 200])
def test_shipped_files_round_trip(name: str, k: int) -> None:
    check_round_trip(POLICIES / name, k)


def test_state_for_another_stack_is_refused() -> None:
    a = lrctl.load_policy({"version": 1, "policies": [{"kind": "plateau"}]}, base_lrs=[0.1])
    b = lrctl.load_policy({"version": 1, "policies": [{"kind": "divergence"}]}, base_lrs=[0.1])
    c = lrctl.load_policy({"version": 1, "policies": [{"kind": "plateau"}]}, base_lrs=[0.2])
    state = a.state_dict()
    with pytest.raises(ValueError, match="policies"):
        b.load_state_dict(state)
    with pytest.raises(ValueError, match="initial LRs"):
        c.load_state_dict(state)
    with pytest.raises(ValueError, match="version"):
        a.load_state_dict({**state, "version": 999})
