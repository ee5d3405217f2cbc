"""Numbers JSON allows but floats cannot hold: each is refused, nothing else changes."""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from pathlib import Path

import pytest
from daemon_helpers import ControllerProc
from rel_helpers import RawClient, hello

from lrctl.sinks.journal import RunPaths

POLICY = "version: 1\npolicies:\n  - kind: plateau\n    patience: 2\n"
HUGE = "9" * 400  # a valid JSON integer; float() of it overflows


def frame(body: str) -> bytes:
    data = body.encode()
    return struct.pack(">I", len(data)) + data


@pytest.mark.parametrize("body", [
    '{"v":1,"t":"obs","s":0,"l":HUGE}',
    '{"v":1,"t":"obs","s":0,"l":1.0,"g":HUGE}',
    '{"v":1,"t":"obs","s":0,"l":1.0,"m":{"val_loss":HUGE}}',
    '{"v":1,"t":"obs","s":HUGE,"l":1.0}',
    # Numbers past the float range read as inf: non-finite values travel as strings.
    '{"v":1,"t":"obs","s":0,"l":1e400}',
    '{"v":1,"t":"obs","s":0,"l":1.0,"g":-1.0e9999}',
    '{"v":1,"t":"obs","s":0,"l":1.0,"m":{"val_loss":1e400}}',
])
def test_huge_integers_get_an_error_and_the_controller_serves_on(
        controller: ControllerProc, body: str) -> None:
    good = RawClient(controller.socket)
    good.send(hello("good-run", POLICY, [0.1]))
    assert good.answer()["t"] == "welcome"

    bad = RawClient(controller.socket)
    bad.send(hello("bad-run", POLICY, [0.1]))
    assert bad.answer()["t"] == "welcome"
    bad.send_raw(frame(body.replace("HUGE", HUGE)))
    reply = bad.answer()
    assert reply["t"] == "error", reply
    bad.obs(0, 1.0)  # the same connection still works after a non-fatal error
    assert bad.answer()["t"] == "lr"

    good.obs(0, 1.0)
    answer = good.answer()
    assert answer["t"] == "lr" and answer["lrs"] == [0.1]
    assert controller.proc is not None and controller.proc.poll() is None
    good.close()
    bad.close()


def test_huge_initial_lr_in_hello_is_refused(controller: ControllerProc) -> None:
    client = RawClient(controller.socket)
    msg = json.dumps(hello("huge-lr", POLICY, [0.1]))[:-1] + ', "v": 1}'
    client.send_raw(frame(msg.replace('"lrs": [0.1]', f'"lrs": [{HUGE}]')))
    reply = client.recv()
    assert reply is not None and reply["t"] == "error"
    assert controller.proc is not None and controller.proc.poll() is None
    client.close()


OVERFLOWS = """version: 1
max_lr: 1.0
policies:
  - kind: cyclical
    base_lr: 0.001
    max_lr: 1.0e300
    step_size_up: 10
  - kind: cyclical
    name: again
    base_lr: 0.001
    max_lr: 1.0e300
    step_size_up: 10
"""


def test_a_schedule_that_overflows_to_inf_is_clamped_to_max_lr_and_recorded(
        make_controller: Callable[..., ControllerProc], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue #18 item 4 (fixed in the engine before this test): a policy whose factors
    multiply to inf is valid YAML, and through a real controller its LR is clamped to
    ``max_lr`` (not silently 0) and the clamp is a journaled decision."""
    import torch

    import lrctl
    from lrctl.cli import main

    path = tmp_path / "overflow.yaml"
    path.write_text(OVERFLOWS)
    assert main(["validate", str(path)]) == 0  # valid: the clamp is the documented answer
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    monkeypatch.chdir(tmp_path)
    controller = make_controller(audit=True)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=0.001)
    with lrctl.attach(opt, policy=str(path), sync=True, spawn=False) as ctl:
        for _ in range(5):
            ctl.step(1.0, grad_norm=1.0)
            assert ctl.lr == [1.0]
            assert opt.param_groups[0]["lr"] == 1.0
        key = ctl.run_key
        assert [(d.step, d.policy, d.action) for d in ctl.decisions][:1] == [
            (0, "guard", "clamp")]
    journal = RunPaths.of(controller.state_dir, key).stream("decisions").read_text()
    first = json.loads(journal.splitlines()[0])
    assert (first["policy"], first["action"], first["new_lrs"]) == ("guard", "clamp", [1.0])
    assert "overflowed" in first["reason"]
