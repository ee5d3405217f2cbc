"""Knob values that no range check used to catch: refused at validation, with the file,
line and key, never raised later (an OverflowError in the watcher thread, a
StatisticsError at a run's first test)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from lrctl.config import ConfigError, parse_text

PLATEAU = "version: 1\npolicies:\n  - kind: plateau\n    metric: loss\n"


@pytest.mark.parametrize(("knobs", "key", "says"), [
    ("    test: trend\n    patience: 1e30\n", "patience", "2**53"),
    ("    test: stall\n    patience: 200000\n", "patience", "100000"),
    ("    patience: 1e30\n", "patience", "2**53"),
    ("    test: stall\n    alpha: 1.0e-17\n", "alpha", ">= 1e-06"),
    ("    cooldown: -1e300\n", "cooldown", "2**53"),
])
def test_a_knob_out_of_bounds_is_refused_where_it_is_written(
        knobs: str, key: str, says: str) -> None:
    with pytest.raises(ConfigError) as raised:
        parse_text(PLATEAU + knobs, "p.yaml").build([0.1])
    assert raised.value.key == key
    assert says in str(raised.value), str(raised.value)
    assert str(raised.value).startswith("p.yaml:")


def test_a_long_window_with_torchs_rule_is_still_allowed() -> None:
    """``test: best`` keeps no window: its patience may be long (a count, as torch's)."""
    engine = parse_text(PLATEAU + "    patience: 500000\n", "p.yaml").build([0.1])
    assert engine.observe(0, 1.0) == [0.1]


@pytest.mark.parametrize("text", [
    "version: 1\npolicies:\n  - kind: earlystop\n    smoothing: trend\n    alpha: 1.0e-17\n",
    "version: 1\npolicies:\n  - kind: wsd\n    start_on: plateau\n    alpha: 1.0e-17\n",
])
def test_alpha_too_small_for_the_test_is_refused(text: str) -> None:
    with pytest.raises(ConfigError, match="alpha"):
        parse_text(text, "p.yaml").build([0.1])


def test_validate_says_file_line_and_key_without_a_traceback(tmp_path: Path) -> None:
    path = tmp_path / "over.yaml"
    path.write_text(PLATEAU + "    test: trend\n    patience: 1e30\n")
    out = subprocess.run([sys.executable, "-m", "lrctl", "validate", str(path)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode != 0
    assert "Traceback" not in out.stderr + out.stdout
    assert f"{path}:6" in out.stderr + out.stdout


def test_a_restart_lr_above_the_files_max_lr_is_refused() -> None:
    """Clamped to ``max_lr``, the LR never reached ``restart_lr``: every test restarted
    again, the plateau's multiplier overflowed and the run could not be checkpointed."""
    text = ("version: 1\nmax_lr: 1.0e-3\npolicies:\n  - kind: plateau\n    patience: 0\n"
            "    restart_lr: 1.0\n")
    with pytest.raises(ConfigError) as raised:
        parse_text(text, "p.yaml")
    assert raised.value.key == "restart_lr" and "max_lr 0.001" in str(raised.value)
    assert str(raised.value).startswith("p.yaml:6:")
