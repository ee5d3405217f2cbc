"""`lrctl validate` and `lrctl replay`, run as a user runs them."""

from __future__ import annotations

import json
import math
import random
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def lrctl(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "lrctl", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=120)


def test_validate_accepts_shipped_policies() -> None:
    files = sorted(str(p) for p in (REPO / "policies").glob("*.yaml"))
    assert len(files) >= 5
    result = lrctl("validate", *files)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count(": ok (") == len(files)


def test_validate_reports_file_line_key_and_fails(tmp_path: Path) -> None:
    good = tmp_path / "good.yaml"
    good.write_text("version: 1\npolicies:\n  - kind: warmup\n    steps: 10\n")
    bad = tmp_path / "bad.yaml"
    bad.write_text("version: 1\npolicies:\n  - kind: plateau\n    patience: 3\n"
                   "    factor: 1.5\n")
    result = lrctl("validate", str(good), str(bad))
    assert result.returncode == 1
    assert f"{bad}:5: factor: must be < 1, but got 1.5" in result.stderr
    assert f"{good}: ok" in result.stdout


def test_validate_missing_file_is_an_error(tmp_path: Path) -> None:
    result = lrctl("validate", str(tmp_path / "nope.yaml"))
    assert result.returncode == 1
    assert "nope.yaml: cannot read" in result.stderr


def test_validate_without_files_is_a_usage_error() -> None:
    assert lrctl("validate").returncode == 2


def test_replay_default_prints_decisions_with_reasons() -> None:
    result = lrctl("replay")
    assert result.returncode == 0, result.stderr
    assert "3000 steps replayed" in result.stdout
    # The shipped curve's known answer under the default's stall test: two cuts, each
    # where the loss's mean rose over the 400-observation window.
    assert result.stdout.count("plateau      reduce") == 2
    assert "step     899  plateau      reduce       0.02 → 0.01  loss rose over the last " \
           "400 observations" in result.stdout


def _curve(path: Path, loss_at: Callable[[int, random.Random], float]) -> Path:
    rng = random.Random(2)
    rows = ["step,loss"] + [f"{t},{loss_at(t, rng):.6f}" for t in range(1400)]
    path.write_text("\n".join(rows) + "\n")
    return path


def test_replay_default_cuts_only_a_stall_it_can_show(tmp_path: Path) -> None:
    """The default's stall test: a quiet flat loss is cut, with the bound it showed; a
    slow real fall hidden in noise is inconclusive and the LR stands, where the trend
    test (the same policy with ``test: trend``) cuts it twice."""
    flat = _curve(tmp_path / "flat.csv", lambda t, rng: 1.0 + 0.002 * rng.gauss(0, 1))
    result = lrctl("replay", "--curve", str(flat), "--lr", "0.1")
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("plateau      reduce") == 2
    assert "step     599  plateau      reduce       0.1 → 0.05  loss fell by at most " \
           in result.stdout
    assert "(less than the threshold 0.500%) over the last 400 observations" in result.stdout

    noisy = _curve(tmp_path / "noisy.csv",
                   lambda t, rng: (1.0 - 2e-5 * t) * math.exp(0.3 * rng.gauss(0, 1)))
    result = lrctl("replay", "--curve", str(noisy), "--lr", "0.1")
    assert result.returncode == 0, result.stderr
    assert "0 decisions; LR (group 0) ranged 0.1–0.1, final 0.1" in result.stdout

    trend = tmp_path / "trend.yaml"
    trend.write_text((REPO / "policies" / "default.yaml").read_text()
                     .replace("test: stall ", "test: trend "))
    result = lrctl("replay", str(trend), "--curve", str(noisy), "--lr", "0.1")
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("did not fall significantly") == 2


def test_replay_json_matches_in_process_engine(tmp_path: Path) -> None:
    curve = tmp_path / "curve.csv"
    rows = ["step,loss,grad_norm"] + [f"{t},{1.0 if t != 40 else 'nan'},1.0" for t in range(60)]
    curve.write_text("\n".join(rows) + "\n")
    policy = REPO / "policies" / "divergence.yaml"
    result = lrctl("replay", str(policy), "--curve", str(curve), "--lr", "0.1", "--json")
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert [(r["step"], r["action"]) for r in records] == [(40, "skip"), (40, "backoff")]
    assert records[1]["old_lrs"] == [0.1] and records[1]["new_lrs"] == [0.05]


def test_replay_rejects_bad_curve(tmp_path: Path) -> None:
    curve = tmp_path / "curve.csv"
    curve.write_text("step,loss\n0,1.0\n1,abc\n")
    result = lrctl("replay", "--curve", str(curve))
    assert result.returncode == 1
    assert "curve.csv:3" in result.stderr
    curve.write_text("step,loss\n0,1.0,2.0,3.0\n")  # more fields than the header: said
    result = lrctl("replay", "--curve", str(curve))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "curve.csv:2: 4 fields, but the header has 2" in result.stderr


def test_replay_reads_a_spreadsheets_csv_and_says_what_is_wrong_with_others(
        tmp_path: Path) -> None:
    """An adversarial pass's finds: a spreadsheet's "CSV UTF-8" (a byte-order mark first)
    was said to lack step,loss; a field over csv's limit ended in a traceback; a column
    named twice was taken silently."""
    curve = tmp_path / "curve.csv"
    curve.write_bytes(b"\xef\xbb\xbfstep,loss\n" + b"".join(
        f"{i},{1.0 / (i + 1)}\n".encode() for i in range(50)))
    result = lrctl("replay", "--curve", str(curve))
    assert result.returncode == 0, result.stderr
    assert "50 steps replayed" in result.stdout
    curve.write_text("step,loss\n0,1.0\n1," + "9" * 200_000 + "\n")
    result = lrctl("replay", "--curve", str(curve))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "field larger than field limit" in result.stderr
    curve.write_text("step,loss,loss\n0,1.0,2.0\n")
    result = lrctl("replay", "--curve", str(curve))
    assert result.returncode == 1 and "column loss named more than once" in result.stderr
    curve.write_text("step,loss,,\n0,1.0,,\n1,0.9,,\n")  # empty columns, as exported
    result = lrctl("replay", "--curve", str(curve))
    assert result.returncode == 0, result.stderr


def test_a_policy_file_that_is_not_utf8_or_not_a_file_is_refused_alike(
        tmp_path: Path) -> None:
    """``lrctl validate`` refused a Latin-1 file that ``attach()`` ran (its bytes replaced),
    after which every edit was rejected; ``validate`` of a FIFO hung for ever."""
    import os

    import torch

    import lrctl as lrctl_pkg

    latin = tmp_path / "latin.yaml"
    latin.write_bytes(b"version: 1\n# caf\xe9\npolicies:\n  - kind: divergence\n")
    result = lrctl("validate", str(latin))
    assert result.returncode == 1 and "not UTF-8" in result.stdout + result.stderr
    opt = torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=0.1)
    with pytest.raises(ValueError, match="not UTF-8 text"):
        lrctl_pkg.attach(opt, policy=str(latin), spawn=False)
    fifo = tmp_path / "fifo.yaml"
    os.mkfifo(fifo)  # nobody writes to it: a blocking open would never return
    result = lrctl("validate", str(fifo))
    assert result.returncode == 1 and "not a regular file" in result.stdout + result.stderr


def test_replay_total_steps_drives_the_anneal(tmp_path: Path) -> None:
    curve = tmp_path / "curve.csv"
    curve.write_text("step,loss\n" + "".join(f"{t},1.0\n" for t in range(40)))
    policy = tmp_path / "anneal.yaml"
    policy.write_text("version: 1\npolicies:\n  - kind: anneal\n    shape: linear\n")
    result = lrctl("replay", str(policy), "--curve", str(curve), "--lr", "0.1",
                   "--total-steps", "20", "--json")
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert [(r["step"], r["action"]) for r in records] == [(0, "anneal_start"),
                                                           (19, "anneal_done")]
    assert records[0]["new_lrs"] == [0.1 * (1 - 1 / 20)]
    unknown = lrctl("replay", str(policy), "--curve", str(curve), "--json")
    assert [json.loads(line)["action"] for line in unknown.stdout.splitlines()] == [
        "anneal_inactive"]
    bad = lrctl("replay", str(policy), "--curve", str(curve), "--total-steps", "0")
    assert bad.returncode == 2 and "positive integer" in bad.stderr


def test_a_misnamed_policies_key_and_a_missing_version_say_what_to_write(
        tmp_path: Path) -> None:
    """A newcomer's finds: ``policy:`` for ``policies:`` said "policies: required", and a
    file without ``version`` printed "supported: (1,)"."""
    from lrctl.config import ConfigError, parse_policy

    singular = tmp_path / "singular.yaml"
    singular.write_text("version: 1\npolicy:\n  - kind: plateau\n")
    with pytest.raises(ConfigError, match=r":2: policy: unknown key .*did you mean 'policies'"):
        parse_policy(singular)
    unversioned = tmp_path / "unversioned.yaml"
    unversioned.write_text("policies:\n  - kind: plateau\n")
    with pytest.raises(ConfigError, match=r"version: required \(supported: 1\): start the "
                                          r"file with 'version: 1'"):
        parse_policy(unversioned)


def test_commands_print_lrctls_warnings_as_one_line_and_others_as_python_does() -> None:
    """`lrctl serve` making a socket directory private said so with a source line of
    lrctl's own under a RuntimeWarning header; a command prints the message alone."""
    from lrctl import cli

    ours = cli._one_line_warning(RuntimeWarning("/tmp/x was readable by other users"),
                                 RuntimeWarning, cli._PACKAGE + "paths.py", 250)
    assert ours == "lrctl: /tmp/x was readable by other users\n"
    said = cli._one_line_warning(UserWarning("lrctl: already prefixed"), UserWarning,
                                 cli._PACKAGE + "hook.py", 1)
    assert said == "lrctl: already prefixed\n"
    theirs = cli._one_line_warning(DeprecationWarning("old"), DeprecationWarning,
                                   cli._PACKAGE.rstrip("/") + "-venv/lrctl/x.py", 7, "")
    assert "DeprecationWarning: old" in theirs and "x.py:7" in theirs  # not the package's


def test_replay_into_a_reader_that_leaves_exits_quietly() -> None:
    """`lrctl replay | head -1` printed 'lrctl replay: [Errno 32] Broken pipe'. Here the
    reader has left before the first line, so every write fails, however it buffers."""
    import os

    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        proc = subprocess.run([sys.executable, "-m", "lrctl", "replay"], cwd=REPO,
                              stdout=write_end, stderr=subprocess.PIPE, text=True,
                              timeout=120)
    finally:
        os.close(write_end)
    assert proc.returncode == 141, proc.stderr
    assert "Broken pipe" not in proc.stderr


def test_replay_errors_name_the_option_or_the_file_and_line(tmp_path: Path) -> None:
    """A bad --lr was blamed on the shipped policy file ("default.yaml: base_lrs must be
    ..."); a missing curve said "[Errno 2] ..."; one not in UTF-8, or a row the engine
    refused (steps going back), did not say which file or line."""
    result = lrctl("replay", "--lr", "-1")
    assert result.returncode == 2
    assert result.stderr.strip() == "lrctl replay: --lr must be finite and >= 0, but got -1.0"
    missing = tmp_path / "nope.csv"
    result = lrctl("replay", "--curve", str(missing))
    assert result.returncode == 1
    assert result.stderr.strip() == (f"lrctl replay: cannot read {missing}: "
                                     "No such file or directory")
    curve = tmp_path / "curve.csv"
    curve.write_bytes(b"step,loss\n0,1.0\n1,caf\xe9\n")
    result = lrctl("replay", "--curve", str(curve))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert f"{curve}: not UTF-8 text" in result.stderr
    curve.write_text("step,loss\n5,1.0\n\n3,1.0\n")  # (a blank line: line 4 all the same)
    result = lrctl("replay", "--curve", str(curve))
    assert result.returncode == 1
    assert result.stderr.strip().startswith(f"lrctl replay: {curve}:4: ")
    assert "3" in result.stderr and "5" in result.stderr
