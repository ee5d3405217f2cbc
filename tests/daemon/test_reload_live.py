"""Live policy editing against a real controller and real file edits.

Each test edits a policy file a run is using and polls ``runs`` until the
controller reports the outcome (generous timeouts, no timing thresholds), then
checks the LRs against an in-process engine that had the same ``inherit``
applied at the same step.
"""

from __future__ import annotations

import contextlib
import hashlib
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from daemon_helpers import ControllerProc

import lrctl
from lrctl.client import ControllerError, request
from lrctl.config import parse_text

TIMEOUT_S = 60.0


def plateau(factor: float, patience: int = 4, extra: str = "") -> str:
    return (f"version: 1\n{extra}policies:\n  - kind: plateau\n    metric: loss\n"
            f"    factor: {factor}\n    patience: {patience}\n")


BROKEN = "version: 1\npolicies:\n  - kind: plateau\n    factor: 7.5\n"


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _opt() -> torch.optim.Optimizer:
    return torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=0.1)


def _run(key: str | None) -> dict[str, Any]:
    assert key is not None
    return next(r for r in request({"t": "runs"})["runs"] if r["run"] == key)


def _until(what: str, check: Callable[[], bool]) -> None:
    deadline = time.monotonic() + TIMEOUT_S
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "lrctl", *args], capture_output=True,
                          text=True, timeout=60)


def _step(ctl: lrctl.Controller, engine: Any, t: int) -> None:
    ctl.step(1.0, grad_norm=1.0)
    engine.observe(t, 1.0, 1.0)
    assert ctl.lr == engine.applied_lrs, f"step {t}"


@contextlib.contextmanager
def _watched(tmp_path: Path, text: str, **options: Any) -> Iterator[tuple[Path, Any,
                                                                           lrctl.Controller]]:
    """A sync run on a watched policy file, three steps in, next to the same in-process
    engine: ``(path, engine, ctl)``."""
    path = tmp_path / "p.yaml"
    path.write_text(text)
    engine = parse_text(text, str(path)).build([0.1])
    with lrctl.attach(_opt(), policy=str(path), sync=True, spawn=False, **options) as ctl:
        for t in range(3):
            _step(ctl, engine, t)
        yield path, engine, ctl


def test_valid_edit_takes_effect_with_state_carried_over(
        controller: ControllerProc, tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    v1, v2 = plateau(0.5), plateau(0.25, patience=6)
    path.write_text(v1)
    engine = parse_text(v1, str(path)).build([0.1])
    with lrctl.attach(_opt(), policy=str(path), sync=True, spawn=False) as ctl:
        for t in range(4):  # the plateau counter is at 3 bad observations
            _step(ctl, engine, t)
        path.write_text(v2)
        _until("the reload", lambda: _run(ctl.run_key)["policy_sha256"] == sha(v2))
        new = parse_text(v2, str(path)).build([0.1])
        summary = new.inherit(engine)
        engine = new
        assert summary["changed"] == ["plateau"]
        for t in range(4, 30):
            _step(ctl, engine, t)
        reloads = [d for d in ctl.decisions if d.policy == "reload"]
        assert [d.action for d in reloads] == ["reload"]
        assert reloads[0].evidence["old_sha256"] == sha(v1)
        assert reloads[0].evidence["new_sha256"] == sha(v2)
        assert "changed plateau" in reloads[0].reason
        # Which knobs moved, not only which policy (a newcomer's find: "changed plateau"
        # alone left the audit reader to diff the files).
        assert "plateau.factor 0.5 → 0.25" in reloads[0].reason
        assert reloads[0].evidence["knobs"]["plateau.factor"] == ["0.5", "0.25"]
        # The counter continued: steps 1-7 are 7 bad observations (> patience 6), so the
        # first cut is at step 7; a fresh counter would have cut at step 11.
        cuts = [d.step for d in ctl.decisions if d.policy == "plateau"]
        assert cuts and cuts[0] == 7
        assert ctl.lr == engine.applied_lrs


def test_reloaded_version_survives_a_controller_restart(
        controller: ControllerProc, tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    v1, v2, v3 = plateau(0.5), plateau(0.2), plateau(0.3)
    path.write_text(v1)
    engine = parse_text(v1, str(path)).build([0.1])
    with pytest.warns(RuntimeWarning, match="lost the controller"), lrctl.attach(
            _opt(), policy=str(path), sync=True, spawn=False, max_backoff=0.05) as ctl:
        for t in range(3):
            _step(ctl, engine, t)
        path.write_text(v2)
        _until("the reload", lambda: _run(ctl.run_key)["policy_sha256"] == sha(v2))
        new = parse_text(v2, str(path)).build([0.1])
        new.inherit(engine)
        engine = new
        _step(ctl, engine, 3)
        controller.kill9()
        ctl.step(1.0, grad_norm=1.0)  # step 4 while it is down: held, then replayed
        engine.observe(4, 1.0, 1.0)
        controller.start()
        # Restored with the version it was running, and the file is watched again.
        assert _run(ctl.run_key)["policy_sha256"] == sha(v2)
        assert str(path) in request({"t": "status"})["watching"]
        while not ctl.connected:  # reconnects within its back-off; no timing asserted
            ctl._link.wait(lambda: ctl.connected, 0.2)  # type: ignore[union-attr]
            ctl._pump()
        for t in range(5, 12):  # replayed step 4 and went on with its original hello
            _step(ctl, engine, t)
        path.write_text(v3)
        _until("the second reload", lambda: _run(ctl.run_key)["policy_sha256"] == sha(v3))
        new = parse_text(v3, str(path)).build([0.1])
        new.inherit(engine)
        engine = new
        for t in range(12, 20):
            _step(ctl, engine, t)


def test_broken_edit_keeps_the_old_policy_and_runs_shows_the_error(
        controller: ControllerProc, tmp_path: Path) -> None:
    with _watched(tmp_path, plateau(0.5)) as (path, engine, ctl):
        path.write_text(BROKEN)
        _until("the rejection", lambda: _run(ctl.run_key)["reload_error"] is not None)
        for t in range(3, 20):  # unchanged: the old policy keeps running
            _step(ctl, engine, t)
        run = _run(ctl.run_key)
        assert run["policy_sha256"] == sha(plateau(0.5))
        assert f"{path}:4" in run["reload_error"] and "factor" in run["reload_error"]
        failed = [d for d in ctl.decisions if d.action == "reload_failed"]
        assert len(failed) == 1 and failed[0].evidence["new_sha256"] == sha(BROKEN)
        out = _cli("runs")
        assert out.returncode == 0 and "last reload failed" in out.stdout, out
        assert f"{path}:4" in out.stdout
        assert f"{path}:4" in _cli("status").stdout
        assert f"{path}:4" in controller.log.read_text()
        # Putting the running version back clears the error (nothing to reload).
        path.write_text(plateau(0.5))
        _until("the error to clear", lambda: _run(ctl.run_key)["reload_error"] is None)
        assert "last reload failed" not in _cli("runs").stdout
        path.write_text(BROKEN)
        _until("the second rejection", lambda: _run(ctl.run_key)["reload_error"] is not None)
        # Fixing the file clears the error and applies the fix.
        v2 = plateau(0.25)
        path.write_text(v2)
        _until("the fix", lambda: _run(ctl.run_key)["policy_sha256"] == sha(v2))
        assert _run(ctl.run_key)["reload_error"] is None


def test_rapid_successive_edits_end_on_the_last_content(
        controller: ControllerProc, tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text(plateau(0.5))
    with lrctl.attach(_opt(), policy=str(path), sync=True, spawn=False) as ctl:
        ctl.step(1.0)
        versions = [plateau(0.5 - i / 100) for i in range(1, 26)]
        for text in versions:
            path.write_text(text)
        _until("the last version", lambda: _run(ctl.run_key)["policy_sha256"] == sha(
            versions[-1]))
        ctl.step(1.0)
        # Still on the last content after any straggling events were handled.
        request({"t": "status"})
        assert _run(ctl.run_key)["policy_sha256"] == sha(versions[-1])


def test_deleting_the_file_keeps_the_current_policy(
        controller: ControllerProc, tmp_path: Path) -> None:
    with _watched(tmp_path, plateau(0.5)) as (path, engine, ctl):
        path.unlink()
        _until("the log line", lambda: "file not found" in controller.log.read_text())
        for t in range(3, 15):
            _step(ctl, engine, t)
        assert _run(ctl.run_key)["policy_sha256"] == sha(plateau(0.5))
        assert not [d for d in ctl.decisions if d.policy == "reload"]
        # The file returns: it is picked up again.
        v2 = plateau(0.25)
        path.write_text(v2)
        _until("the return", lambda: _run(ctl.run_key)["policy_sha256"] == sha(v2))


@pytest.mark.parametrize("how", ["yaml", "attach"])
def test_watch_false_pins_the_version(controller: ControllerProc, tmp_path: Path,
                                      how: str) -> None:
    pinned, sentinel = tmp_path / "pinned.yaml", tmp_path / "sentinel.yaml"
    v1 = plateau(0.5, extra="watch: false\n" if how == "yaml" else "")
    pinned.write_text(v1)
    sentinel.write_text(plateau(0.5))
    with lrctl.attach(_opt(), policy=str(pinned), sync=True, spawn=False,
                      watch=how == "yaml") as ctl, \
            lrctl.attach(_opt(), policy=str(sentinel), sync=True, spawn=False) as other:
        ctl.step(1.0)
        other.step(1.0)
        assert request({"t": "status"})["watching"] == [str(sentinel)]
        assert _run(ctl.run_key)["watching"] is False
        pinned.write_text(plateau(0.25))
        sentinel.write_text(plateau(0.25))  # same directory: its events come with ours
        _until("the sentinel", lambda: _run(other.run_key)["policy_sha256"] == sha(
            plateau(0.25)))
        ctl.step(1.0)
        assert _run(ctl.run_key)["policy_sha256"] == sha(v1)
        with pytest.raises(ControllerError, match="pinned"):
            request({"t": "reload", "run": ctl.run_key})
        assert "pinned" in _cli("runs").stdout


def test_lrctl_reload_forces_a_reload(make_controller: Callable[..., ControllerProc],
                                      tmp_path: Path) -> None:
    make_controller(["--no-watch"])  # only the verb can reload
    path = tmp_path / "p.yaml"
    v1, v2 = plateau(0.5), plateau(0.25)
    path.write_text(v1)
    engine = parse_text(v1, str(path)).build([0.1])
    with lrctl.attach(_opt(), policy=str(path), sync=True, spawn=False, run_name="r") as ctl:
        for t in range(3):
            _step(ctl, engine, t)
        path.write_text(v2)
        out = _cli("reload", "r")
        assert out.returncode == 0, out.stderr
        assert "forced reload p.yaml: changed plateau" in out.stdout
        assert _run(ctl.run_key)["policy_sha256"] == sha(v2)
        new = parse_text(v2, str(path)).build([0.1])
        new.inherit(engine)
        engine = new
        for t in range(3, 15):
            _step(ctl, engine, t)
        out = _cli("reload")  # every run, unchanged bytes: still a recorded reload
        assert out.returncode == 0 and "kept plateau" in out.stdout, out
        # One line per run, naming it (a newcomer saw one line repeating the message).
        assert out.stdout.splitlines() == [
            f"{ctl.run_key}: reload: forced reload p.yaml: kept plateau"]
        path.write_text(BROKEN)
        out = _cli("reload", "r")
        assert out.returncode == 1 and "reload_failed" in out.stdout
        assert _run(ctl.run_key)["policy_sha256"] == sha(v2)
        for t in range(15, 20):
            _step(ctl, engine, t)


def test_policies_dir_is_validated_at_start_and_watched(
        make_controller: Callable[..., ControllerProc], tmp_path: Path) -> None:
    library = tmp_path / "lib"
    library.mkdir()
    (library / "good.yaml").write_text(plateau(0.5))
    (library / "bad.yaml").write_text(BROKEN)
    (library / "notes.txt").write_text("not a policy")
    controller = make_controller(["--policies", str(library)])
    status = request({"t": "status"})
    assert status["watching"] == [str(library / "bad.yaml"), str(library / "good.yaml")]
    assert [e for e in status["errors"] if f"{library / 'bad.yaml'}:4" in e]
    assert "1 invalid" in controller.log.read_text()
    (library / "bad.yaml").write_text(plateau(0.3))  # fixed: the error goes away
    _until("the fix", lambda: not request({"t": "status"})["errors"])


def test_a_reload_decision_is_journaled_with_its_new_policy_version(
        make_controller: Callable[..., ControllerProc], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A newcomer's find: the reload decision paired the new policy's sha with the old
    version number (``"policy_version": 1``), every later decision said 2."""
    from lrctl.sinks.journal import RunPaths, read_lines

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    controller = make_controller(["--no-watch"], audit=True)
    path = tmp_path / "p.yaml"
    v1, v2 = plateau(0.5), plateau(0.25)
    path.write_text(v1)
    with lrctl.attach(_opt(), policy=str(path), sync=True, spawn=False, run_name="r") as ctl:
        for _ in range(3):
            ctl.step(1.0, grad_norm=1.0)
        path.write_text(v2)
        assert _cli("reload", "r").returncode == 0
        key = ctl.run_key
        assert key is not None
    decisions = [line.record for line in read_lines(
        RunPaths.of(Path(controller.state_dir), key).stream("decisions"))]
    reloads = [d for d in decisions if d["action"] == "reload"]
    assert len(reloads) == 1, decisions
    assert (reloads[0]["policy_sha256"], reloads[0]["policy_version"]) == (sha(v2), 2)


OVERSIZED = ("version: 1\npolicies:\n  - kind: plateau\n    metric: loss\n    test: trend\n"
             "    patience: 1e30\n")


def test_an_edit_no_check_used_to_catch_is_refused_and_the_watcher_lives_on(
        controller: ControllerProc, tmp_path: Path) -> None:
    """``patience: 1e30`` with a windowed test once got past validation and raised an
    OverflowError in the watcher thread, which died: the run got no ``reload_failed``
    and every other watched file stopped reloading, while ``status`` still said it
    watched them. Now it is refused like any invalid knob, and other files reload."""
    other = tmp_path / "other.yaml"
    other.write_text(plateau(0.5))
    with _watched(tmp_path, plateau(0.5)) as (path, _, ctl), lrctl.attach(
            _opt(), policy=str(other), sync=True, spawn=False) as second:
        second.step(1.0, grad_norm=1.0)
        path.write_text(OVERSIZED)
        _until("the rejection", lambda: _run(ctl.run_key)["reload_error"] is not None)
        error = _run(ctl.run_key)["reload_error"]
        assert f"{path}:6" in error and "patience" in error, error
        assert _run(ctl.run_key)["policy_sha256"] == sha(plateau(0.5))
        other.write_text(plateau(0.25))  # the watcher still watches the other file
        _until("the other file's reload",
               lambda: _run(second.run_key)["policy_sha256"] == sha(plateau(0.25)))
        second.step(1.0, grad_norm=1.0)
        ctl.step(1.0, grad_norm=1.0)


def test_lrctl_reload_of_a_missing_file_exits_1(
        make_controller: Callable[..., ControllerProc], tmp_path: Path) -> None:
    """`lrctl reload RUN` when the run's policy file is gone: nothing could be re-read, the
    run keeps its policy, and the verb says so with exit status 1 (it exited 0, so that
    `lrctl reload RUN && echo applied` said applied)."""
    make_controller(["--no-watch"])
    path = tmp_path / "p.yaml"
    path.write_text(plateau(0.5))
    with lrctl.attach(_opt(), policy=str(path), sync=True, spawn=False, run_name="r") as ctl:
        ctl.step(1.0)
        path.unlink()
        for args in (("reload", "r"), ("reload",)):
            out = _cli(*args)
            assert out.returncode == 1, (args, out)
            assert f"{path}: file not found" in out.stdout + out.stderr
        assert _run(ctl.run_key)["policy_sha256"] == sha(plateau(0.5))
