"""A live run is taken over only with its resume token (issue #18, item 13).

Before, any hello with a live run's key disconnected the real hook and fed its
session: two scripts given one run name could do that by accident. Now a hello
for a run served on another live connection is refused (``run_conflict``) unless
it shows the run's resume token, which only the run's own hook holds (from its
welcome) and ``ctl.state_dict()`` keeps. A run whose hook is gone still resumes by
its key alone.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from daemon_helpers import ControllerProc
from rel_helpers import RawClient, hello

import lrctl
from lrctl.client import RunConflict

POLICY = "version: 1\npolicies:\n  - kind: divergence\n"


def _optimizer() -> torch.optim.Optimizer:
    return torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=0.1)


def test_a_second_hello_for_a_live_run_is_refused_and_the_run_goes_on(
        controller: ControllerProc) -> None:
    real = RawClient(controller.socket)
    real.send(hello("shared-name", POLICY, [0.1]))
    welcome = real.answer()
    assert welcome["t"] == "welcome" and welcome["resume_token"]
    real.obs(0, 1.0, 1.0)
    assert real.answer()["t"] == "lr"
    other = RawClient(controller.socket)
    other.send(hello("shared-name", POLICY, [0.1]))
    refused = other.recv()
    assert refused is not None and refused["code"] == "run_conflict" and refused["fatal"]
    assert "resume token" in refused["message"]
    real.obs(1, 1.0, 1.0)  # the real run is still served, on its own connection
    reply = real.answer()
    assert reply["t"] == "lr" and reply["s"] == 1
    forged = RawClient(controller.socket)  # a wrong token is no better than none
    forged.send(hello("shared-name", POLICY, [0.1], resume_token="x" * 24))
    refused = forged.recv()
    assert refused is not None and refused["code"] == "run_conflict"
    for c in (real, other, forged):
        c.close()


def test_the_resume_token_takes_a_live_run_over_and_changes(controller: ControllerProc) -> None:
    old = RawClient(controller.socket)
    old.send(hello("hung-run", POLICY, [0.1]))
    token = old.answer()["resume_token"]
    old.obs(0, 1.0, 1.0)
    old.answer()
    new = RawClient(controller.socket)
    new.send(hello("hung-run", POLICY, [0.1], resume_token=token))
    welcome = new.answer()
    assert welcome["t"] == "welcome" and welcome["last_step"] == 0
    assert welcome["resume_token"] != token  # the displaced hook cannot take it back
    told = old.recv()
    assert told is not None and told["code"] == "run_taken_over" and told["fatal"]
    again = RawClient(controller.socket)
    again.send(hello("hung-run", POLICY, [0.1], resume_token=token))
    refused = again.recv()
    assert refused is not None and refused["code"] == "run_conflict"
    new.obs(1, 1.0, 1.0)
    assert new.answer()["s"] == 1
    for c in (old, new, again):
        c.close()


def test_attach_to_a_live_run_by_key_raises_and_leaves_it_alone(
        controller: ControllerProc) -> None:
    first = lrctl.attach(_optimizer(), policy=POLICY, sync=True, spawn=False)
    try:
        first.step(1.0)
        with pytest.raises(RunConflict, match="another connection"):
            lrctl.attach(_optimizer(), policy=POLICY, resume=first.run_key, spawn=False)
        first.step(1.0)
        assert first.connected
    finally:
        first.close()


def test_a_resume_from_state_dict_takes_over_a_hung_process_for_good(
        controller: ControllerProc) -> None:
    """The old process (still connected, say hung in a collective) is told, and does not
    reconnect and take the run back."""
    old = lrctl.attach(_optimizer(), policy=POLICY, sync=True, spawn=False, max_backoff=0.05)
    try:
        for _ in range(5):
            old.step(1.0)
        state = old.state_dict()
        assert state["token"]
        new = lrctl.attach(_optimizer(), policy=POLICY, sync=True, spawn=False, resume=state)
        try:
            assert new.connected and new.run_key == old.run_key
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                for _ in range(20):  # the old hook learns it, and stays off
                    old.step(1.0)
                    if old._link is not None:
                        old._link.wait(lambda: False, 0.02)
            assert not old.connected
            assert any("taken over" in str(w.message) for w in caught)
            new.step(1.0)
            assert new.connected and new.lr == pytest.approx([0.1])
        finally:
            new.close()
    finally:
        old.close()


def test_a_run_whose_hook_is_gone_resumes_by_key_as_before(controller: ControllerProc) -> None:
    first = lrctl.attach(_optimizer(), policy=POLICY, sync=True, spawn=False)
    for _ in range(3):
        first.step(1.0)
    key = first.run_key
    first.close(end_run=False)  # interrupted, not finished
    second = lrctl.attach(_optimizer(), policy=POLICY, sync=True, spawn=False, resume=key,
                          start_step=3)
    try:
        assert second.connected and second.run_key == key
        second.step(1.0)
        assert second.connected
    finally:
        second.close()
