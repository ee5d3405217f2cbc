"""Controller missing, stalled or gone: training continues, one warning, no exception."""

from __future__ import annotations

import os
import select
import signal
import time
import warnings
from pathlib import Path

import pytest
import torch
from daemon_helpers import POLICIES, ControllerProc, losses

import lrctl
from lrctl.client import request

POLICY = str(POLICIES / "default.yaml")


def _opt() -> torch.optim.Optimizer:
    return torch.optim.SGD([torch.nn.Parameter(torch.ones(2))], lr=0.1)


def test_no_controller_and_no_spawn_warns_once_and_trains_on() -> None:
    opt = _opt()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ctl = lrctl.attach(opt, policy=POLICY, spawn=False, max_backoff=0.01)
        for p in opt.param_groups[0]["params"]:  # as after a backward(): a grad norm exists
            p.grad = torch.zeros_like(p)
        for loss in losses(200):
            ctl.step(loss)
            opt.step()
        ctl.report(val_loss=1.0)
        ctl.step(torch.tensor(float("nan")))
        ctl.close()
    lrctl_warnings = [w for w in caught if "lrctl" in str(w.message)]
    assert len(lrctl_warnings) == 1, [str(w.message) for w in lrctl_warnings]
    assert "no controller answers" in str(lrctl_warnings[0].message)
    assert ctl.lr == [0.1] and opt.param_groups[0]["lr"] == 0.1


def test_a_stalled_controller_times_out_in_sync_mode_and_training_continues(
        controller: ControllerProc) -> None:
    """One timed-out wait, not one per step (an adversarial pass found every step of a
    sync loop waiting its full timeout while the controller hung); once the answers have
    caught up, each step waits for its own again."""
    ctl = lrctl.attach(_opt(), policy=POLICY, sync=True, spawn=False, timeout=0.2)
    try:
        for loss in losses(5):
            ctl.step(loss)
        before = ctl.lr
        controller.proc.send_signal(signal.SIGSTOP)  # type: ignore[union-attr]
        try:
            with pytest.warns(RuntimeWarning, match="no decision within"):
                for loss in losses(20):
                    ctl.step(loss)
            assert ctl.lr == before
            assert ctl.late_waits == 1
        finally:
            controller.proc.send_signal(signal.SIGCONT)  # type: ignore[union-attr]
        link = ctl._link
        assert link is not None
        link.wait(lambda: ctl._acked >= ctl._reported, 30.0)
        for t, loss in enumerate(losses(5)):
            ctl.step(loss)
            if t:  # (the first step after the catch-up may still go unwaited)
                assert ctl._acked == ctl._reported  # waited for, in step()
        assert ctl.late_waits == 1 and not ctl._late
    finally:
        ctl.close()


def test_a_stalled_controller_costs_an_async_loop_one_bounded_wait(
        controller: ControllerProc) -> None:
    """Async waits (at most ``timeout``) for a late answer to keep t+1 exact, but a stopped
    controller must not make every step wait: after one timed-out wait the hook applies
    answers as they come, and waits again only once they have caught up."""
    opt = _opt()
    ctl = lrctl.attach(opt, policy=POLICY, spawn=False, timeout=0.2)
    try:
        for loss in losses(5):
            ctl.step(loss, grad_norm=1.0)
            opt.step()
        controller.proc.send_signal(signal.SIGSTOP)  # type: ignore[union-attr]
        try:
            with pytest.warns(RuntimeWarning, match="did not arrive within"):
                for loss in losses(20):
                    ctl.step(loss, grad_norm=1.0)
                    opt.step()
            assert ctl.late_waits == 1
        finally:
            controller.proc.send_signal(signal.SIGCONT)  # type: ignore[union-attr]
        link = ctl._link
        assert link is not None
        link.wait(lambda: ctl._acked >= ctl._reported, 30.0)
        for loss in losses(5):  # caught up: exact again, and no new timed-out wait
            ctl.step(loss, grad_norm=1.0)
            # The answer is in before the optimizer step (as after a forward and backward
            # pass): the pre-step hook takes it in and sees the answers caught up. On a
            # busy machine, a loop with no work between steps would outrun the controller.
            waiter = select.poll()
            waiter.register(link._sock, select.POLLIN)  # type: ignore[arg-type]
            assert ctl._acked >= ctl._reported or waiter.poll(30_000)
            opt.step()
        assert ctl.late_waits == 1 and not ctl._late
    finally:
        ctl.close()


def test_answers_caught_up_inside_step_end_the_late_mode(controller: ControllerProc) -> None:
    """A controller that answers before step() returns (it preempts the training process on
    its CPU) has the answers read inside step(), with none due at the pre-step hook: that
    catching up must end the late mode too, or a later slow answer would not be waited for."""
    opt = _opt()
    ctl = lrctl.attach(opt, policy=POLICY, spawn=False, timeout=0.2)
    try:
        for loss in losses(5):
            ctl.step(loss, grad_norm=1.0)
            opt.step()
        controller.proc.send_signal(signal.SIGSTOP)  # type: ignore[union-attr]
        try:
            with pytest.warns(RuntimeWarning, match="did not arrive within"):
                for loss in losses(3):
                    ctl.step(loss, grad_norm=1.0)
                    opt.step()
            assert ctl._late
        finally:
            controller.proc.send_signal(signal.SIGCONT)  # type: ignore[union-attr]
        link = ctl._link
        assert link is not None
        link.wait(lambda: ctl._acked >= ctl._reported, 30.0)
        ctl.step(1.0, grad_norm=1.0)
        link.wait(lambda: ctl._acked >= ctl._reported, 30.0)  # read as step()'s own pump does
        assert not ctl._late
        opt.step()
        assert ctl.late_waits == 1
    finally:
        ctl.close()


def test_async_mode_never_raises_when_the_controller_dies(controller: ControllerProc) -> None:
    opt = _opt()
    ctl = lrctl.attach(opt, policy=POLICY, spawn=False)
    try:
        for loss in losses(20):
            ctl.step(loss)
            opt.step()
        controller.kill9()
        with pytest.warns(RuntimeWarning, match="lost the controller"):
            for loss in losses(50):
                ctl.step(loss)
                opt.step()
        assert ctl.lr == [opt.param_groups[0]["lr"]]
    finally:
        ctl.close()


def test_close_reaches_a_controller_restarted_during_the_back_off(
        controller: ControllerProc) -> None:
    """The hook's reconnect back-off (0.1 s doubling to 5 s) could outlast a restart: a
    script that finished meanwhile closed without a last try, and its run stayed detached
    at the step before the stop, its last steps never seen. close() tries once more."""
    opt = torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=0.1)
    ctl = lrctl.attach(opt, policy=str(POLICIES / "default.yaml"), spawn=False,
                       run_name="late", timeout=10.0, max_backoff=60.0)
    for _ in range(20):
        ctl.step(1.0, grad_norm=1.0)
    assert controller.stop() == 0
    for _ in range(20):  # the hook finds it gone and backs off
        ctl.step(1.0, grad_norm=1.0)
    assert ctl._link is not None
    ctl._link._next_attempt = float("inf")  # its next try far away, as after a long back-off
    controller.start()
    key = ctl.run_key
    ctl.close()
    # It ends: the goodbye arrived. (A bye has no answer: the controller reads it after
    # close() returns, a paced hook's at its next look, which this `runs` on a new
    # connection, read as it comes, may precede.)
    deadline = time.monotonic() + 30
    while key in [r["run"] for r in request({"t": "runs"}, controller.socket,
                                            timeout=5.0)["runs"]]:
        assert time.monotonic() < deadline, "the run never ended: no goodbye arrived"
        time.sleep(0.02)  # polling on the condition


def _unwritable_dir(tmp_path: Path) -> Path | None:
    """A directory this process cannot write to (0500 is writable to root: then a
    read-only mount, if the machine has one)."""
    mine = tmp_path / "ro"
    mine.mkdir(mode=0o500)
    for candidate in (mine, Path("/proc/sys")):
        if candidate.is_dir() and not os.access(candidate, os.W_OK):
            return candidate
    return None


def test_a_read_only_working_directory_is_said_at_attach(
        controller: ControllerProc, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A newcomer's find: in a read-only working directory MLflow's default store could
    not be made, and only ``lrctl status`` said so (with a doubled slash in the path)."""
    where = _unwritable_dir(tmp_path)
    if where is None:
        pytest.skip("no unwritable directory here")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(where)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=0.1)
    with pytest.warns(RuntimeWarning, match=r"not writable.*set MLFLOW_TRACKING_URI"):
        ctl = lrctl.attach(opt, policy=POLICIES / "divergence.yaml", spawn=False)
    ctl.close()
    import mlflow  # a script that uses mlflow: the hook asks it for the URI (the same store)

    assert mlflow.get_tracking_uri().startswith("sqlite:")
    with pytest.warns(RuntimeWarning, match=r"not writable.*set MLFLOW_TRACKING_URI"):
        ctl = lrctl.attach(opt, policy=POLICIES / "divergence.yaml", spawn=False)
    ctl.close()
    (tmp_path / "ro").chmod(0o700)


def test_a_sqlite_uri_names_its_file_without_a_doubled_slash() -> None:
    from lrctl.sinks._mlflow_store import _sqlite_path

    assert _sqlite_path("sqlite:////tmp/x/mlflow.db") == Path("/tmp/x/mlflow.db")
    assert str(_sqlite_path("sqlite:////tmp/x/mlflow.db")) == "/tmp/x/mlflow.db"
    assert _sqlite_path("sqlite:////tmp/a%20b/m.db?timeout=5") == Path("/tmp/a b/m.db")
    assert _sqlite_path("sqlite:///:memory:") is None
    assert _sqlite_path("postgresql://h/db") is None


def test_a_per_sample_loss_says_what_to_pass(controller: ControllerProc) -> None:
    """A newcomer's find: ``ctl.step(loss_vector)`` warned "hook error (RuntimeError('a
    Tensor with 64 elements cannot be converted to Scalar'))" and left the run
    unmanaged, without saying how to fix it."""
    opt = torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=0.1)
    with (pytest.warns(RuntimeWarning, match=r"loss has 64 elements.*loss\.mean\(\)"),
          lrctl.attach(opt, policy=POLICIES / "divergence.yaml", spawn=False) as ctl):
        ctl.step(torch.ones(64))
        ctl.step(torch.ones(1).mean())  # a scalar: reported as usual
        opt.step()
        assert ctl.lr == [0.1]


def test_a_grad_norm_of_many_elements_says_what_to_pass(controller: ControllerProc) -> None:
    """An adversarial pass's find: a 2-element grad_norm warned "hook error
    (RuntimeError(...))", which reads like lrctl's bug."""
    opt = torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=0.1)
    with (pytest.warns(RuntimeWarning, match=r"the grad_norm has 2 elements.*total norm"),
          lrctl.attach(opt, policy=POLICIES / "divergence.yaml", spawn=False) as ctl):
        ctl.step(1.0, grad_norm=torch.ones(2))
    assert not any("hook error" in d.reason for d in ctl.decisions)


def test_numpy_metrics_are_reported_not_dropped(controller: ControllerProc) -> None:
    """``ctl.report(val_loss=np.mean(losses))`` is a NumPy number: it was refused as "not a
    number" (once per name, then silently), so plateau decay and early stopping on it
    never saw a value (found by an adversarial pass). NumPy numbers and one-element
    arrays are numbers; a NumPy bool, a string and a longer array are not."""
    np = pytest.importorskip("numpy")
    from lrctl._torchutil import is_number

    good = [np.float32(0.5), np.float16(0.5), np.float64(0.5), np.int64(3), np.array(0.5),
            np.mean(np.ones(4, dtype=np.float32)), np.array([0.5])]
    assert all(is_number(v) for v in good)
    assert not any(is_number(v) for v in (np.bool_(True), np.array([1.0, 2.0]), "0.5",
                                          np.array("0.5")))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "not a number; ignored"
        ctl = lrctl.attach(_opt(), policy=POLICY, sync=True, spawn=False)
        try:
            ctl.step(1.0, grad_norm=1.0)
            ctl.report(**{f"m{i}": v for i, v in enumerate(good)})
            ctl.step(1.0, grad_norm=1.0)  # they go with this observation ...
            assert not ctl._metrics and ctl.connected  # ... and the controller took them
        finally:
            ctl.close()


def test_a_closed_controller_leaves_the_optimizer_alone(controller: ControllerProc) -> None:
    """After close(), ctl.step() overwrote an LR the user set with the run's last one, and
    warned of a foreign write (found by an adversarial pass). It now does nothing, and
    says so once."""
    opt = _opt()
    ctl = lrctl.attach(opt, policy=POLICY, sync=True, spawn=False)
    ctl.step(1.0, grad_norm=1.0)
    ctl.close()
    opt.param_groups[0]["lr"] = 0.3
    with pytest.warns(RuntimeWarning, match=r"after close\(\)"):
        ctl.step(1.0, grad_norm=1.0)
    opt.step()
    assert opt.param_groups[0]["lr"] == 0.3 and ctl.steps_taken == 1


def test_attaching_an_attached_optimizer_again_closes_the_earlier_hook(
        controller: ControllerProc) -> None:
    """Re-running an attach cell in a notebook left two hooks on one optimizer: each wrote
    its own LRs, each counted the other's as foreign writes, and the first run never
    ended (found by an adversarial pass). The earlier hook is closed, its run ended, with
    a warning; the new one alone sets the LRs, even with a scheduler made in between."""
    opt = _opt()
    first = lrctl.attach(opt, policy=POLICY, sync=True, spawn=False)
    first.step(1.0, grad_norm=1.0)
    torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1.0)  # wraps the guarded step
    with pytest.warns(RuntimeWarning, match="already attached"):
        second = lrctl.attach(opt, policy={"version": 1, "policies": [
            {"kind": "warmup", "steps": 10}]}, sync=True, spawn=False)
    try:
        assert not first.connected
        runs = {r["run"] for r in request({"t": "runs"})["runs"]}
        assert first.run_key not in runs and second.run_key in runs
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no foreign writes between the two
            for _ in range(3):
                second.step(1.0, grad_norm=1.0)
                opt.step()
        assert opt.param_groups[0]["lr"] == second.lr[0] and second.foreign_lr_writes == 0
        # An attach that is refused (here: a policy with a typo) leaves the one in place
        # (a first version closed it before connecting: found by a review).
        with pytest.raises(lrctl.client.PolicyRejected):
            lrctl.attach(opt, policy={"version": 1, "policies": [{"kind": "warmpu"}]},
                         sync=True, spawn=False)
        assert second.connected and second.run_key in {
            r["run"] for r in request({"t": "runs"})["runs"]}
        second.step(1.0, grad_norm=1.0)
        opt.step()
        assert opt.param_groups[0]["lr"] == second.lr[0]
    finally:
        second.close()


def test_a_loop_that_makes_warnings_errors_gets_our_warning_as_it_is(
        controller: ControllerProc) -> None:
    """Under ``-W error`` (a test suite's ``filterwarnings = error``) one of the hook's
    warnings is raised where it is issued; it reaches the loop as that warning, not
    wrapped in a second one that calls it a hook error."""
    opt = _opt()
    ctl = lrctl.attach(opt, policy=POLICY, spawn=False, sync=True)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            with pytest.raises(RuntimeWarning, match="found no gradients") as raised:
                ctl.step(1.0)  # before any backward(): no gradients
        assert "hook error" not in str(raised.value)
        for p in opt.param_groups[0]["params"]:
            p.grad = torch.zeros_like(p)
        ctl.step(1.0)  # the hook goes on, warnings or not
        opt.step()
        assert opt.param_groups[0]["lr"] == 0.1
    finally:
        ctl.close()
