"""Run the atheris harness of the frame decoder briefly, when atheris is installed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from rel_helpers import FIGURES

RUNS = 50_000


def test_atheris_finds_nothing_in_the_frame_decoder(tmp_path: Path) -> None:
    pytest.importorskip("atheris")
    harness = Path(__file__).with_name("atheris_decoder.py")
    out = subprocess.run([sys.executable, str(harness), f"-atheris_runs={RUNS}", "-seed=1",
                          "-max_len=4096", str(tmp_path)], capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    FIGURES["atheris decoder runs"] = RUNS
