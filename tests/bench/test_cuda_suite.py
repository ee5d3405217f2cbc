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
