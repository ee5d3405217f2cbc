"""Every shipped policy file decides exactly as it did before the engine's speed work.

A seeded, closed-loop toy run (the loss follows the LR the engine returns, so one
changed bit changes everything after it) drives each ``policies/*.yaml`` for a few
thousand steps, with noise, loss and grad-norm spikes, NaN steps, level shifts and
a ``val_loss`` every 50 steps. The LRs' bits, the skip/stop flags, every decision
record and the final state are compared with values recorded from the code before
the speed work (commit c347a3f), kept in ``data/policy_replay.json``.

The decision records hold the trend test's sums, and Python 3.12 made ``sum()`` of
floats compensated (Neumaier): their fingerprint is kept once per kind of ``sum``.

Record again only for an intended change of behaviour, and say so in the commit:
``python tests/policy/test_policy_replay.py --record`` (on Python 3.11 and on 3.12+).
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import struct
import sys
from pathlib import Path
from typing import Any

import pytest

import lrctl

ROOT = Path(__file__).resolve().parents[2]
FIXTURE = Path(__file__).resolve().parent / "data" / "policy_replay.json"
POLICY_FILES = sorted((ROOT / "policies").glob("*.yaml"))
STEPS = 3000
BASE_LRS = (1e-3, 2.5e-4)
NAN_STEPS = frozenset({1234, 1235, 2600})
#: Which ``sum()`` of floats this Python has (see the module docstring).
SUM_KIND = "compensated" if sys.version_info >= (3, 12) else "plain"
SHIFTS = {2200: 3.0, 2700: 6.0}  # a harder data mix (a new level), then a blow-up


def _hex(x: float) -> str:
    return struct.pack(">d", x).hex()


def replay(path: Path, steps: int = STEPS, seed: int = 17,
           skips_enforced: bool = True) -> dict[str, Any]:
    """Run ``path``'s policies on the toy run; fingerprints of everything they decided.

    ``skips_enforced=False``: as the controller runs them for an async hook (spike
    skips are recorded as advisory).
    """
    engine = lrctl.load_policy(path, list(BASE_LRS), total_steps=steps)
    engine.skips_enforced = skips_enforced
    rng = random.Random(seed)
    lr_bits, flags = hashlib.sha256(), hashlib.sha256()
    level, floor = 2.0, 0.5
    lrs = engine.applied_lrs
    for step in range(steps):
        rel = lrs[0] / BASE_LRS[0]
        if rel > 30.0:  # far too hot: the loss climbs
            level *= 1.0 + 0.02 * rel / 30.0
        else:
            level = floor + (level - floor) * (1.0 - 0.002 * min(rel, 30.0))
        level *= SHIFTS.get(step, 1.0)
        loss = level * math.exp(rng.gauss(0.0, 0.05))
        grad = 3.0 * level * math.exp(rng.gauss(0.0, 0.2))
        if rng.random() < 0.0015:
            loss *= 20.0
        if rng.random() < 0.001:
            grad *= 50.0
        if step in NAN_STEPS:
            loss = math.nan
        metrics = {"val_loss": level * math.exp(rng.gauss(0.0, 0.01))} if step % 50 == 49 else {}
        lrs = engine.observe(step, loss, grad, **metrics)
        for lr in lrs:
            lr_bits.update(struct.pack(">d", lr))
        flags.update(bytes([engine.should_skip, engine.should_stop]))
    decisions = [d.to_dict() for d in engine.decisions]
    return {
        "lr_sha256": lr_bits.hexdigest(),
        "flags_sha256": flags.hexdigest(),
        "final_lrs": [_hex(x) for x in engine.lrs],
        "decisions": [[d["step"], d["policy"], d["action"], [_hex(x) for x in d["new_lrs"]]]
                      for d in decisions],
        "decisions_sha256": _digest(decisions),
        "state_sha256": _digest(_policies_state(engine.state_dict())),
    }


def _policies_state(state: dict[str, Any]) -> dict[str, Any]:
    """The state as recorded: the engine's state has since gained the operator's part
    (no manual LR, no hold in these runs), which the recording predates."""
    assert state.pop("operator") == {"override": None, "until": None, "hold": None}
    return state


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


def _recorded() -> dict[str, Any]:
    return json.loads(FIXTURE.read_text(encoding="utf-8"))


def _check(got: dict[str, Any], want: dict[str, Any]) -> None:
    # The readable part first, so that a failure names the first decision that moved.
    assert got["decisions"] == want["decisions"]
    assert got["decisions_sha256"] == want["decisions_sha256"][SUM_KIND]
    assert {**got, "decisions_sha256": None} == {**want, "decisions_sha256": None}


@pytest.mark.parametrize("path", POLICY_FILES, ids=[p.stem for p in POLICY_FILES])
def test_shipped_policy_replays_bit_for_bit(path: Path) -> None:
    _check(replay(path), _recorded()["policies"][path.name])


def test_default_policy_for_an_async_hook_replays_bit_for_bit() -> None:
    _check(replay(ROOT / "policies" / "default.yaml", skips_enforced=False),
           _recorded()["async"]["default.yaml"])


def test_the_toy_run_exercises_the_policies() -> None:
    """The fixture is worth something only if the policies act in it."""
    actions = {a for rec in _recorded()["policies"].values() for _, _, a, _ in rec["decisions"]}
    assert {"backoff", "skip", "regrow", "reduce"} <= actions
    assert set(_recorded()["policies"]) == {p.name for p in POLICY_FILES}


def _record() -> None:
    """Write the fixture; the other kind of ``sum``'s decision fingerprints are kept."""
    old = _recorded() if FIXTURE.exists() else {}
    data = {"steps": STEPS, "base_lrs": list(BASE_LRS),
            "policies": {p.name: replay(p) for p in POLICY_FILES},
            "async": {"default.yaml": replay(ROOT / "policies" / "default.yaml",
                                             skips_enforced=False)}}
    for part in ("policies", "async"):
        for name, rec in data[part].items():
            kept = old.get(part, {}).get(name, {}).get("decisions_sha256", {})
            rec["decisions_sha256"] = {**kept, SUM_KIND: rec["decisions_sha256"]}
            print(part, name, len(rec["decisions"]), sorted({d[2] for d in rec["decisions"]}))
    FIXTURE.parent.mkdir(exist_ok=True)
    FIXTURE.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__" and sys.argv[1:] == ["--record"]:
    _record()
