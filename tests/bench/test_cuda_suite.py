"""``lrctl bench cuda`` on a machine without a GPU: the suite's arms, rows and targets on
the CPU (a small GPT), and a plain "nothing measured" where CUDA is asked for and absent.
Structure only, never a timing threshold (the figures come from a GPU machine)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from lrctl.bench.cuda_bench import (  # noqa: E402
    ARMS,
    GIVEN,
    HOOK,
    CudaConfig,
    _render,
    _targets,
    run_cuda,
)
from lrctl.cli import main  # noqa: E402

SMALL = {"context": 16, "width": 32, "layers": 1, "heads": 2, "batch": 2}


def test_the_suite_on_a_cpu_measures_every_arm_and_judges_only_the_gpu_bound_size() -> None:
    cfg = CudaConfig(device="cpu", sizes=("tiny", "small"), rounds=2,
                     steps={"tiny": 2, "small": 2}, shape=SMALL)
    result = run_cuda(cfg)
    assert [s["size"] for s in result["sizes"]] == ["tiny", "small"]
    for size in result["sizes"]:
        assert size["connected"]  # the hooked arms reached the suite's controller
        assert size["syncs"] is None  # (a CPU: nothing to check)
        rows = {r["arm"]: r for r in result["rows"][size["size"]]}
        assert set(rows) == {name for name, _, _ in ARMS}
        for r in rows.values():
            assert math.isfinite(r["stats"]["median"]) and r["stats"]["n"] == 2
        judged = size["size"] == "small"
        for arm in (HOOK, GIVEN):
            assert math.isfinite(rows[arm]["ratio"]["median"])
            assert (rows[arm]["ok"] is not None) == judged
    targets = _targets(result)
    assert [t.what for t in targets] == [f"small GPT step: {HOOK}", f"small GPT step: {GIVEN}"]
    unreached = {**result, "sizes": [{**s, "connected": False} for s in result["sizes"]]}
    assert [t.ok for t in _targets(unreached) if "reached" in t.what] == [False, False]
    text = _render(result, Path("."))
    assert "Host syncs: not checked" in text and "**small GPT**" in text
    json.dumps(result, allow_nan=False)  # the --json file is strict JSON


@pytest.mark.skipif(torch.cuda.is_available(), reason="a machine with CUDA measures")
def test_without_cuda_the_suite_says_so_and_measures_nothing(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out.json"
    assert main(["bench", "cuda", "--quick", "--json", str(out), "--out", str(tmp_path)]) == 0
    assert "no CUDA device" in capsys.readouterr().out
    result = json.loads(out.read_text())
    assert "skipped" in result and _targets(result) == []


def test_the_sync_check_hears_an_error_the_hook_caught(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """A review's find: the debug mode raises at the syncing call, and inside the hook that
    call's error is caught (fail-open: a warning, once), so a check that waited for the
    exception passed a hook that synced. The check listens to the hook's log too."""
    import warnings

    import lrctl
    from lrctl.bench._nosync import NoHostSync
    from lrctl.hook import Controller

    opt = torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ctl = lrctl.attach(opt, socket=str(tmp_path / "nobody.sock"), spawn=False)
        try:
            with NoHostSync(cuda=False) as clean:
                for _ in range(3):
                    ctl.step(1.0, grad_norm=1.0)
            assert clean.failures == []

            def synced(self: Controller, *args: object) -> None:
                raise RuntimeError("called a synchronizing CUDA operation")

            monkeypatch.setattr(Controller, "_step_fully", synced)
            ctl.step(1.0, grad_norm=1.0)  # the first: warned (and not listened for)
            with NoHostSync(cuda=False) as caught:
                for _ in range(2):
                    ctl.step(1.0, grad_norm=1.0)  # once warned: only logged now
            assert len(caught.failures) == 2
            assert "synchronizing CUDA operation" in caught.failures[0]
        finally:
            monkeypatch.undo()
            ctl.close()
