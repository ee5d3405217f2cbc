"""Every example runs, as a user would run it, against a real controller.

Each example is a subprocess pointed at a private controller through
``LRCTL_SOCKET`` / ``LRCTL_STATE_DIR`` (nothing touches the user's real
directories); step counts are small, the checks are on what the example says
lrctl did.
"""

from __future__ import annotations

import importlib
import json
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from ddp_run import check_job
from live_controller import REPO, LiveController, live_controller, subprocess_env

import lrctl
from lrctl.policy import unregister_policy

EXAMPLES = REPO / "examples"
# The examples' own default is lrctl's default policy (do no harm: the LR stays unless the
# run diverges or stalls). These runs are short, so they use the opt-in range test, whose
# decisions show within a few dozen steps.
RANGETEST = ["--policy", str(REPO / "policies" / "rangetest.yaml")]
RUN_TIMEOUT_S = 240


@pytest.fixture
def controller() -> Iterator[LiveController]:
    with live_controller() as ctl:
        yield ctl


def run(ctl: LiveController, args: list[str], cwd: Path) -> str:
    """Run ``python args...`` (or a module) in ``cwd``; its output, or fail with it."""
    proc = subprocess.run([sys.executable, *args], cwd=cwd, env=subprocess_env(ctl),
                          capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]
    return proc.stdout


def final_lr(stdout: str) -> float:
    match = re.search(r"lrctl run \S+: \d+ steps, final lr ([0-9.e+-]+)", stdout)
    assert match, stdout[-2000:]
    return float(match.group(1))


def test_train_plain(controller: LiveController, tmp_path: Path) -> None:
    out = run(controller, [str(EXAMPLES / "train_plain.py"), "--steps", "150", "--lr", "0.01",
                           "--eval-every", "50", *RANGETEST], tmp_path)
    assert "lrctl run train-plain-" in out
    # The online range test ends within 150 steps here and says why.
    assert re.search(r"step \d+: rangetest range_test_done: ", out), out
    assert final_lr(out) != pytest.approx(0.01)


def test_train_charlm(controller: LiveController, tmp_path: Path) -> None:
    out = run(controller, [str(EXAMPLES / "train_charlm.py"), "--steps", "30", "--chars",
                           "20000", "--width", "32", "--layers", "1", *RANGETEST], tmp_path)
    assert "lrctl run charlm-" in out
    # The range test starts at 1% of --lr and grows the LR every step.
    assert 3e-5 < final_lr(out) < 3e-3


# A guard that flags a "spike" often and regrows fast: its state changes with every
# observation and it moves the LR many times in a short run, so a resumed run that did
# not continue from the checkpoint's exact policy state would show it at once.
JUMPY = """version: 1
policies:
  - kind: divergence
    z_threshold: 1.5
    min_samples: 8
    window: 16
    tolerance: 0
    cooldown: 2
    regrow_after: 4
    factor: 0.7
    max_backoffs: 1000
    min_multiplier: 0.0001
"""


def _lr_log(path: Path) -> dict[int, str]:
    """iter -> the LR its optimizer step used (the last process to run an iteration wins)."""
    out = {}
    for line in path.read_text().splitlines():
        it, lr = line.split()
        out[int(it)] = lr
    return out


def test_train_nanogpt_is_reproducible_overflow_safe_and_resumes_exactly(
        controller: LiveController, tmp_path: Path) -> None:
    policy = tmp_path / "jumpy.yaml"
    policy.write_text(JUMPY)
    common = [str(EXAMPLES / "train_nanogpt.py"), "--max-iters", "90", "--eval-interval",
              "30", "--policy", str(policy), "--init-scale", str(2.0 ** 30),
              "--lrctl-timeout", "60"]
    whole = run(controller, [*common, "--out-dir", str(tmp_path / "a"), "--lr-log",
                             str(tmp_path / "a.log")], tmp_path)
    summary = json.loads(whole.split("lrctl summary ", 1)[1])
    assert summary["iters"] == 90
    assert summary["overflows"] >= 3  # fp16 at a scale of 2^30: the scaler's first steps
    assert summary["decisions"] >= 5  # the policy moved the LR: the comparison means something
    reference = _lr_log(tmp_path / "a.log")

    # The same run, preempted after iteration 70 (checkpoint at 60), then resumed.
    killed = subprocess.run([sys.executable, *common, "--out-dir", str(tmp_path / "b"),
                             "--lr-log", str(tmp_path / "b.log"), "--exit-after", "70"],
                            cwd=tmp_path, env=subprocess_env(controller), capture_output=True,
                            text=True, timeout=RUN_TIMEOUT_S)
    assert killed.returncode == 3, killed.stdout + killed.stderr
    assert _lr_log(tmp_path / "b.log") == {k: v for k, v in reference.items() if k <= 70}
    run(controller, [*common, "--out-dir", str(tmp_path / "b"), "--lr-log",
                     str(tmp_path / "b.log"), "--resume"], tmp_path)
    resumed = _lr_log(tmp_path / "b.log")
    assert resumed == reference  # iterations 60..89 again, on the same LRs


def test_train_hf(controller: LiveController, tmp_path: Path) -> None:
    out = run(controller, [str(EXAMPLES / "train_hf.py"), "--steps", "20", "--output-dir",
                           str(tmp_path / "hf"), *RANGETEST], tmp_path)
    match = re.search(r"the Trainer logged learning_rate (\S+) at step 1 … (\S+) at step 20",
                      out)
    assert match, out[-2000:]
    # The Trainer's own linear schedule would log 1e-3 first; lrctl's range test starts
    # at 1% of it and grows it.
    assert float(match.group(1)) == pytest.approx(1e-5)
    assert float(match.group(2)) > float(match.group(1))
    assert "lrctl run train-hf-" in out


def test_train_lightning(controller: LiveController, tmp_path: Path) -> None:
    out = run(controller, [str(EXAMPLES / "train_lightning.py"), "--steps", "120", "--root",
                           str(tmp_path / "pl"), *RANGETEST], tmp_path)
    assert "lrctl run train-lightning-" in out
    assert re.search(r"val_loss \d", out), out
    assert re.search(r"step \d+: rangetest range_test_done: ", out), out


@pytest.mark.xdist_group("ddp")  # one DDP job at a time (see tests/daemon/test_ddp.py)
def test_train_ddp_ranks_use_identical_lrs(controller: LiveController, tmp_path: Path) -> None:
    # --standalone: the rendezvous binds port 0 itself (no free port picked beforehand
    # that another test could take first).
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         str(EXAMPLES / "train_ddp.py"), "--steps", "120", *RANGETEST], cwd=tmp_path,
        env=subprocess_env(controller), capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    out = proc.stdout
    # The ranks share one stdout pipe: their lines may run into each other.
    prints = dict(re.findall(r"rank (\d): \d+ steps, final lr \S+, LR sequence sha256 "
                             r"([0-9a-f]{16})", out))
    check_job(proc, lambda: set(prints) == {"0", "1"})
    assert set(prints) == {"0", "1"}, out[-3000:]
    assert prints["0"] == prints["1"], "the ranks used different LRs"
    assert re.search(r"step \d+: rangetest range_test_done: ", out), out


@pytest.fixture
def installed_policy_package(tmp_path: Path) -> Iterator[Path]:
    """examples/custom_policy pip-installed into this venv (from a copy, so that the
    build leaves nothing in the repository); uninstalled afterwards."""
    source = tmp_path / "custom_policy"
    shutil.copytree(EXAMPLES / "custom_policy", source)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "install", "--no-deps", "--no-build-isolation", str(source)],
                   check=True, capture_output=True, timeout=RUN_TIMEOUT_S)
    importlib.invalidate_caches()
    try:
        yield source
    finally:
        subprocess.run([*pip, "uninstall", "-y", "lrctl-inverse-sqrt"], capture_output=True,
                       timeout=RUN_TIMEOUT_S)
        unregister_policy("inverse_sqrt")
        sys.modules.pop("lrctl_inverse_sqrt", None)
        importlib.invalidate_caches()


def test_custom_policy_package(installed_policy_package: Path,
                               controller: LiveController, tmp_path: Path) -> None:
    policy_file = installed_policy_package / "inverse_sqrt.yaml"
    lrctl_cli = Path(sys.executable).with_name("lrctl")
    check = subprocess.run([str(lrctl_cli), "validate", str(policy_file)],
                           capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    assert check.returncode == 0, check.stdout + check.stderr
    assert "inverse_sqrt" in check.stdout

    # In-process: linear warmup to step 49, then 1/sqrt decay.
    engine = lrctl.load_policy(policy_file, base_lrs=[1.0])
    lrs = [engine.applied_lrs[0]] + [engine.observe(t, 1.0)[0] for t in range(199)]
    assert lrs[0] == pytest.approx(1 / 50)
    assert lrs[49] == pytest.approx(1.0)
    assert lrs[199] == pytest.approx((50 / 200) ** 0.5)
    assert [d.action for d in engine.decisions] == ["warmup_done"]

    # And the controller loads it for a training run.
    out = run(controller, [str(EXAMPLES / "train_plain.py"), "--steps", "60", "--policy",
                           str(policy_file)], tmp_path)
    assert re.search(r"step 48: inverse_sqrt warmup_done: warmup ends at step 49", out), out


def test_train_wsd_cooldown_started_from_the_command_line(controller: LiveController,
                                                           tmp_path: Path) -> None:
    """The example trains at its stable LR until `lrctl decay` (the real CLI, another
    process) starts the cooldown; the run then stops by itself when the cooldown ends."""
    log = tmp_path / "out.txt"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, str(EXAMPLES / "train_wsd.py"),
                                 "--max-steps", "20000"], cwd=tmp_path,
                                env=subprocess_env(controller), stdout=out,
                                stderr=subprocess.STDOUT, text=True)
    try:
        run = wait_for_step(controller, proc, log, "wsd-charlm", 100)  # past the warmup
        cli = subprocess.run([sys.executable, "-m", "lrctl", "decay", "wsd-charlm", "--steps",
                              "60", "--shape", "linear"], env=subprocess_env(controller),
                             capture_output=True, text=True, timeout=60)
        assert cli.returncode == 0, cli.stderr
        assert f"{run['run']}: linear cooldown over steps" in cli.stdout
        assert proc.wait(RUN_TIMEOUT_S) == 0, log.read_text()[-4000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    text = log.read_text()
    start = int(re.search(r"step (\d+): wsd decay_start: linear cooldown over steps "
                          r"\d+-\d+ to 0 × the LR \(started by an operator\)", text).group(1))
    done = int(re.search(r"step (\d+): wsd decay_done: cooldown finished", text).group(1))
    assert re.search(r"step \d+: wsd stop: the cooldown is over", text), text[-3000:]
    assert done == start + 59 and start >= 100
    assert "step 49: wsd warmup_done" in text
    # The last steps train at the cooldown's last LRs: 1/60 × the LR, then 0 (async: the
    # stop may arrive before or after the step at 0).
    assert final_lr(text) <= 3e-3 / 60 * (1 + 1e-9)
    steps = int(re.search(r"lrctl run \S+: (\d+) steps", text).group(1))
    assert start + 60 <= steps < 20000


def wait_for_step(ctl: LiveController, proc: subprocess.Popen[str], log: Path, name: str,
                  step: int) -> dict[str, object]:
    """Poll the controller until run ``name`` has observed ``step`` (or the process ended)."""
    from lrctl.client import request

    deadline = time.monotonic() + RUN_TIMEOUT_S
    while time.monotonic() < deadline:
        assert proc.poll() is None, log.read_text()[-4000:]
        runs = [r for r in request({"t": "runs"}, ctl.socket)["runs"]
                if r["run_name"] == name]
        if runs and runs[0]["step"] >= step:
            return runs[0]
        time.sleep(0.1)
    raise AssertionError(f"run {name} did not reach step {step}:\n{log.read_text()[-3000:]}")


def test_record_loss_curve_writes_a_curve_lrctl_replay_takes(tmp_path: Path) -> None:
    """The script that recorded the curve ``lrctl replay`` ships with: it trains without
    lrctl (no controller), writes ``step,loss,grad_norm`` rows, says where, and its
    output replays. Its first step (no update yet) is the shipped curve's first row."""
    out = tmp_path / "curve.csv"
    proc = subprocess.run([sys.executable, str(EXAMPLES / "record_loss_curve.py"), str(out),
                           "--steps", "40"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=RUN_TIMEOUT_S)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"40 steps at LR 0.02 written to {out}" in proc.stdout
    rows = out.read_text().splitlines()
    assert rows[0] == "step,loss,grad_norm" and len(rows) == 41
    assert [int(r.split(",")[0]) for r in rows[1:]] == list(range(40))
    shipped = (REPO / "lrctl" / "data" / "loss_curve.csv").read_text().splitlines()
    mine, theirs = ([float(v) for v in r.split(",")[1:]] for r in (rows[1], shipped[1]))
    assert mine == pytest.approx(theirs, rel=1e-4)
    replay = subprocess.run([sys.executable, "-m", "lrctl", "replay", "default", "--curve",
                             str(out), "--lr", "0.02"], cwd=tmp_path, capture_output=True,
                            text=True, timeout=RUN_TIMEOUT_S)
    assert replay.returncode == 0, replay.stderr[-2000:]
    assert f"40 steps replayed from {out} through default" in replay.stdout
