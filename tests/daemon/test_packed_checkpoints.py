"""Checkpoints pack long runs of floats (``lrctl.daemon._packed``): the same values bit for
bit, format-1 files still load, and what cannot be packed says so or stays JSON."""

from __future__ import annotations

import hashlib
import json
import math
import random
import struct
from pathlib import Path

import pytest
from daemon_helpers import POLICIES

from lrctl.daemon._packed import MIN_PACKED, PACKED_KEY, pack, unpack
from lrctl.daemon.session import Session
from lrctl.daemon.store import FORMAT, StateStore


def _bits(xs: list[float]) -> list[bytes]:
    return [struct.pack("<d", x) for x in xs]


def test_packed_floats_come_back_bit_for_bit() -> None:
    rng = random.Random(3)
    awkward = [0.0, -0.0, 5e-324, 2.2250738585072014e-308, 1.7976931348623157e308, -1e-300,
               0.1, 1 / 3, math.pi]
    floats = awkward + [rng.uniform(-1e6, 1e6) for _ in range(200)]
    state = {"w": floats, "short": [0.5, 0.25], "mixed": [1, 2.0] * 20,
             "nested": [{"x": floats[:MIN_PACKED]}, [floats[:MIN_PACKED]]], "n": 3}
    packed = pack(state)
    assert set(packed["w"]) == {PACKED_KEY}
    assert packed["short"] == [0.5, 0.25]  # too short to pack
    assert packed["mixed"] == [1, 2.0] * 20  # not all floats
    assert set(packed["nested"][0]["x"]) == {PACKED_KEY}
    assert set(packed["nested"][1][0]) == {PACKED_KEY}
    back = json.loads(json.dumps(packed), object_hook=unpack)
    assert back == state
    assert _bits(back["w"]) == _bits(floats)  # -0.0 and subnormals included


def test_a_list_with_a_non_finite_float_is_not_packed_and_the_checkpoint_refuses_it() -> None:
    xs = [1.0] * MIN_PACKED + [math.nan]
    assert pack({"w": xs})["w"] is xs
    with pytest.raises(ValueError):
        StateStore.encode({"w": xs})  # JSON cannot hold it: as before packing


def test_the_reserved_key_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match=r"\$f64"):
        pack({"plugin": {PACKED_KEY: "x"}})


@pytest.mark.parametrize("bad", [{PACKED_KEY: 3}, {PACKED_KEY: "not base64!"},
                                 {PACKED_KEY: "AAAA"}])  # 3 bytes: no whole double
def test_a_damaged_packed_list_is_an_error_not_a_state(bad: dict) -> None:
    with pytest.raises(ValueError):
        json.loads(json.dumps({"w": bad}), object_hook=unpack)


def _session(steps: int) -> Session:
    text = (POLICIES / "default.yaml").read_text()
    session = Session.create(key="packed", run_name="packed", policy_text=text,
                             policy_source="default.yaml", lrs=[0.1], world_size=1,
                             total_steps=None, mlflow_run_id=None, tracking_uri=None, cwd=None)
    rng = random.Random(1)
    for t in range(steps):
        session.observe(t, 2.0 / (1 + t / 50) + rng.random() * 0.05, 1.0 + rng.random(), {})
    return session


def test_a_restored_session_decides_exactly_as_the_one_checkpointed(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    live = _session(1500)
    store.write("packed", StateStore.encode(live.to_state()))
    assert json.loads(store.path("packed").read_bytes().split(b"\n")[0])["format"] == FORMAT
    restored = Session.restore(store.load("packed"))
    assert restored.to_state() == live.to_state()
    rng = random.Random(9)
    for t in range(1500, 2500):
        loss = 0.5 + rng.random() * (5.0 if t % 400 == 0 else 0.05)
        a, b = live.observe(t, loss, 1.0, {}), restored.observe(t, loss, 1.0, {})
        assert (a.decisions, live.lrs()) == (b.decisions, restored.lrs()), t


def test_an_earlier_versions_checkpoint_still_loads_and_the_next_one_replaces_it(
        tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    state = _session(300).to_state()
    body = json.dumps(state, sort_keys=True, separators=(",", ":")).encode()
    head = json.dumps({"format": 1, "sha256": hashlib.sha256(body).hexdigest()}).encode()
    legacy = store.legacy_path("packed")
    assert legacy.name == "packed.json"  # where an earlier version looks (and only there)
    legacy.write_bytes(head + b"\n" + body + b"\n")
    assert store.load("packed") == state
    assert dict(store.load_all()) == {"packed": state}
    store.save("packed", state)  # format 2, where an earlier version never looks
    assert store.path("packed").name == "packed.ckpt" and not legacy.exists()
    assert json.loads(store.path("packed").read_bytes().split(b"\n")[0])["format"] == 2
    assert dict(store.load_all()) == {"packed": state}
    store.delete("packed")
    assert not store.path("packed").exists() and store.load("packed") is None
