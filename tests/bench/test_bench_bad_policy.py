"""``lrctl bench`` with a policy file that is missing or invalid: one line naming the
file and exit status 2, before any run starts (the runs of ``quality`` go to worker
processes, which could not even send the ConfigError back: it did not pickle).
"""

from __future__ import annotations

import pickle
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lrctl._yaml_read import ConfigError
from lrctl.policy._params import ParamError

TYPO = "version: 1\npolicies:\n  - kind: plateau\n    patiense: 3\n"


@pytest.mark.parametrize("err", [
    ConfigError("p.yaml", 4, "patiense", "unknown key for kind 'plateau'"),
    ConfigError("p.yaml", None, None, "cannot read: No such file or directory"),
    ConfigError("<dict>", 2, "kind", "required"),
    ParamError("factor", "must be < 1, but got 2"),
])
def test_policy_errors_survive_pickling(err: ConfigError | ParamError) -> None:
    back = pickle.loads(pickle.dumps(err))
    assert type(back) is type(err)
    assert str(back) == str(err)
    assert back.args == err.args
    assert vars(back) == vars(err)


def _bench(cwd: Path, *argv: str) -> tuple[subprocess.CompletedProcess[str], float]:
    began = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "lrctl", "bench", *argv], cwd=cwd,
                          capture_output=True, text=True, timeout=120)
    return proc, time.monotonic() - began


@pytest.mark.parametrize("suite,option", [("recovery", "--policy"), ("quality", "--policy"),
                                          ("quality", "--policies"), ("all", "--policy")])
def test_a_missing_policy_file_is_one_line_before_any_run(tmp_path: Path, suite: str,
                                                         option: str) -> None:
    missing = tmp_path / "nonexistent.yaml"
    proc, seconds = _bench(tmp_path, suite, "--quick", option, str(missing))
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stderr.startswith(f"{missing}: cannot read"), proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert proc.stdout == ""
    assert seconds < 20  # no run started: the whole grid takes minutes
    assert not (tmp_path / "lrctl-bench").exists()


@pytest.mark.parametrize("option", ["--policy", "--policies"])
def test_an_invalid_policy_file_names_its_file_line_and_key(tmp_path: Path,
                                                            option: str) -> None:
    bad = tmp_path / "typo.yaml"
    bad.write_text(TYPO)
    proc, seconds = _bench(tmp_path, "quality", "--quick", option, str(bad))
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stderr.startswith(f"{bad}:4: patiense: unknown key"), proc.stderr
    assert "did you mean 'patience'" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert seconds < 20
