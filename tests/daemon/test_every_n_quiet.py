"""``every=N``: the steps between reports take a quiet way (they only count) that does
exactly what the full way does, through a real controller, with floats or CPU tensors."""

from __future__ import annotations

import pytest
import torch
from daemon_helpers import POLICIES, ControllerProc, losses

import lrctl
from lrctl.wire.decoder import FrameDecoder

EVERY = 4


def _run(curve: list[float], quiet_path: bool, tensors: bool, settle: bool = True,
         ) -> tuple[list[dict], list[float], list[dict], list[int], int]:
    """Decisions, the LR each optimizer step used, the frames sent, the steps whose
    optimizer step was skipped, and how many steps went the quiet way. ``settle``: every
    answer is in before each step; without it the step after a report finds its answer
    still on the way (or not): the outcome is the same, since a report's answer is
    awaited at the optimizer step after it."""
    opt = torch.optim.SGD([torch.nn.Parameter(torch.ones(3))], lr=0.1)
    quiet = 0
    with lrctl.attach(opt, policy=str(POLICIES / "default.yaml"), every=EVERY, spawn=False,
                      run_name="every-n", timeout=30.0) as ctl:
        real = ctl._quietly

        def passed(batch: None, loss: float, grad: float | None) -> bool:
            nonlocal quiet
            took = quiet_path and real(batch, loss, grad)
            quiet += took
            return took

        ctl._quietly = passed  # type: ignore[method-assign]
        frames: list[dict] = []
        assert ctl._link is not None
        send = ctl._link.send_obs
        ctl._link.send_obs = lambda t, frame: (  # type: ignore[method-assign]
            frames.append(FrameDecoder().feed(frame)[0]), send(t, frame))
        applied: list[float] = []
        skipped: list[int] = []
        for t, loss in enumerate(curve):
            if settle:
                assert ctl._link.wait(lambda: ctl._acked >= ctl._reported, 30.0)
            grad = 1.0 + (t % 7) * 0.1
            for p in opt.param_groups[0]["params"]:
                p.grad = torch.full_like(p, grad)
            if tensors:
                ctl.step(torch.tensor(loss, dtype=torch.float64),
                         grad_norm=torch.tensor(grad, dtype=torch.float64))
            else:
                ctl.step(loss, grad_norm=grad)
            before = opt.param_groups[0]["params"][0].detach().clone()
            opt.step()
            if torch.equal(before, opt.param_groups[0]["params"][0]):
                skipped.append(t)
            applied.append(opt.param_groups[0]["lr"])
        assert ctl.steps_taken == len(curve)
    return [d.to_dict() for d in ctl.decisions], applied, frames, skipped, quiet


@pytest.mark.parametrize("tensors", [False, True])
def test_steps_between_reports_go_the_quiet_way_with_the_full_ways_outcome(
        controller: ControllerProc, tensors: bool) -> None:
    curve = losses(600, seed=7, spikes=(200, 201, 452))
    curve[301] = float("nan")  # not a reporting step: skipped here, and reported too
    quick = _run(curve, True, tensors)
    full = _run(curve, False, tensors)
    assert quick[:4] == full[:4]
    decisions, _, frames, skipped, quiet = quick
    assert full[4] == 0
    # (the spike at 201 is a NaN too: losses() makes odd spikes NaN)
    # ... and the run's last step, which close() reports (it ends between two reports)
    assert [f["s"] for f in frames] == sorted([*range(0, len(curve), EVERY), 201, 301,
                                               len(curve) - 1])
    assert 301 in skipped  # the NaN never reached the weights
    # ... and the policies saw it: the skip is on record, the guard backed off from it.
    assert {(d["step"], d["action"]) for d in decisions} >= {(301, "skip"), (301, "backoff")}
    # Every step between reports took the quiet way, but for the NaN one and those that
    # took in the answer to a report (the step after each).
    assert quiet >= len(curve) - 2 * len(frames) - 1


def test_the_step_after_a_report_goes_the_quiet_way_and_reads_the_answer(
        controller: ControllerProc) -> None:
    """Answers still on the way: the step after a report takes the quiet way too (it
    reads the answer as the full way does), and the decisions, the LR of every optimizer
    step and the skipped steps are the full way's."""
    curve = losses(600, seed=7, spikes=(200, 201, 452))
    curve[301] = float("nan")
    quick = _run(curve, True, False, settle=False)
    full = _run(curve, False, False, settle=False)
    decisions, applied, frames, skipped, quiet = quick

    def timeless(sent: list[dict]) -> list[dict]:
        # The LRs a report says (u, gu) are there where the answer due had come when it
        # went: with answers on the way, a matter of timing, either way.
        return [{k: v for k, v in f.items() if k not in ("u", "gu")} for f in sent]

    assert (decisions, timeless(frames), skipped) == (full[0], timeless(full[2]), full[3])
    # The LR of every optimizer step taken. (A skipped step's pre-step hook never runs,
    # so what its group shows depends on whether the answer came before step() read it.)
    assert [lr for t, lr in enumerate(applied) if t not in skipped] == [
        lr for t, lr in enumerate(full[1]) if t not in skipped]
    assert 301 in skipped
    assert any(d["action"] == "backoff" for d in decisions)
    # Only the reports, the NaN step and the step after the spike's report (whose
    # optimizer step the guard held back: the loop may rightly not have taken it) took
    # the full way; before, every step after a report did.
    assert quiet >= len(curve) - len(frames) - 2


@pytest.mark.parametrize("every", [EVERY, "auto"])
def test_a_loss_that_cannot_be_read_still_counts_its_step_and_says_why(
        controller: ControllerProc, every: int | str) -> None:
    opt = torch.optim.SGD([torch.nn.Parameter(torch.ones(3))], lr=0.1)
    with lrctl.attach(opt, policy=str(POLICIES / "default.yaml"), every=every, spawn=False,
                      run_name="unreadable", timeout=30.0) as ctl:
        for _ in range(3):
            ctl.step(1.0)
            opt.step()
        with pytest.warns(RuntimeWarning, match=r"loss has 2 elements.*loss\.mean\(\)") as seen:
            ctl.step(torch.ones(2))  # not a scalar: .item() refuses it, and the hook says so
        assert seen[0].filename == __file__  # the warning names the loop's line
        opt.step()
        assert ctl.steps_taken == 4
        ctl.step(0.9)  # and the run goes on
        opt.step()
        assert ctl.steps_taken == 5
