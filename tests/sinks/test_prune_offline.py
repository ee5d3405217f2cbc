"""``lrctl prune`` with no controller running: which journals go and which stay, against
journals a real shipper put into a real ``mlflow server``.

Known answer: of a state directory holding one run of each kind, only the runs that
ended, are all in MLflow (or never had an MLflow target), cannot be resumed and were
last written over the period ago are removed; a symlink among the runs is left alone,
its target untouched; ``--dry-run`` changes nothing; a directory an interrupted prune
left half-removed is finished by the next one. Ages are set with ``os.utime``."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from pathlib import Path

import pytest
from sinks_helpers import FAST, MlflowServer, drive, run_info

from lrctl.cli import main
from lrctl.daemon.store import StateStore
from lrctl.sinks import AuditSink
from lrctl.sinks._ship_state import shipping
from lrctl.sinks.journal import RunPaths, read_json

DAY = 86400.0
SHIPPED_ENDED = ("old-done", "new-done", "resumable", "damaged", "journal-only", "no-mlflow")
KINDS = (*SHIPPED_ENDED, "open", "behind")


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory, mlflow_server: MlflowServer) -> Path:
    """A state directory with one run of each kind, shipped by a real shipper."""
    root = tmp_path_factory.mktemp("prune")
    state = root / "state"
    sink = AuditSink(state, FAST, env={})
    for key in KINDS:
        sink.open_run(run_info(key, tracking_uri=mlflow_server.uri, cwd=str(root)))
        drive(sink, key, range(40), [0.1, 0.01])
        if key != "open":  # (its process died: no goodbye)
            sink.close_run(key)
    assert sink.flush(60)
    sink.close()
    for key in SHIPPED_ENDED:
        assert shipping(RunPaths.of(state, key))[0] == "shipped", key
    # behind: resumed and ended again under a controller that shipped nothing
    journal_only = AuditSink(state, dataclasses.replace(FAST, mlflow=False), env={})
    journal_only.open_run(run_info("behind", tracking_uri=mlflow_server.uri, cwd=str(root)))
    drive(journal_only, "behind", range(40, 60), [0.1, 0.01])
    journal_only.close_run("behind")
    journal_only.close()
    assert shipping(RunPaths.of(state, "behind"))[0] == "behind"
    # resumable: its hook was killed and its checkpoint set aside (runs/.detached/)
    store = StateStore(state)
    store.save("resumable", {"engine": {"last_step": 39, "lrs": [0.1, 0.01]}})
    store.detach("resumable")
    store.close()
    RunPaths.of(state, "damaged").cursor.write_text('{"streams": {')  # a torn cursor
    cursor = RunPaths.of(state, "journal-only").cursor  # MLflow refused it: never again
    cursor.write_text(json.dumps({**read_json(cursor), "failed": "refused by MLflow"}))
    meta = RunPaths.of(state, "no-mlflow").meta  # a journal with no MLflow target at all
    meta.write_text(json.dumps({k: v for k, v in read_json(meta).items() if k != "mlflow"}))
    return state


@pytest.fixture
def state(template: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A copy of the template, every run last written 31 days ago but ``new-done`` (29),
    and a symlink among its runs to an old, ended, shipped journal outside it."""
    monkeypatch.setenv("LRCTL_SOCKET", str(tmp_path / "none.sock"))  # no controller
    state = tmp_path / "state"
    shutil.copytree(template, state, symlinks=True)
    for key in KINDS:
        _age(RunPaths.of(state, key).root, 29 if key == "new-done" else 31)
    outside = tmp_path / "outside"
    shutil.copytree(state / "runs" / "old-done", outside)
    _age(outside, 365)
    (state / "runs" / "linked").symlink_to(outside, target_is_directory=True)
    return state


def _age(root: Path, days: float) -> None:
    t = time.time() - days * DAY
    for path in [root, *root.rglob("*")]:
        os.utime(path, (t, t), follow_symlinks=False)


def _tree(root: Path) -> dict[str, tuple[int, float]]:
    """Every path under ``root`` (hidden ones too), with its size and mtime."""
    return {str(p.relative_to(root)): (p.lstat().st_size, p.lstat().st_mtime)
            for p in root.rglob("*")}


def _size(root: Path) -> int:
    return sum(p.lstat().st_size for p in root.rglob("*") if p.is_file())


def test_only_old_ended_runs_all_in_mlflow_are_removed(
        state: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    runs = state / "runs"
    gone = ("no-mlflow", "old-done")
    expected = sum(_size(runs / key) for key in gone)
    outside = _tree(tmp_path / "outside")
    assert main(["prune", "--state-dir", str(state)]) == 0  # the default: 30 days
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    assert sorted(line.split(" (")[0] for line in lines[:-1]) == [f"removed {k}" for k in gone]
    assert lines[-1] == (f"removed 2 run(s), {expected / 1024:.1f} KiB ({expected} bytes); "
                         "kept 6: 1 not all in MLflow yet, 1 damaged, 1 refused by MLflow "
                         "(their journal is their only record), 1 not ended, 1 written to "
                         "in the last 30 day(s), 1 resumable (a checkpoint)")
    assert "run damaged:" in captured.err and "cursor.json is damaged" in captured.err
    assert sorted(os.listdir(runs)) == sorted(
        [".detached", "linked", *(k for k in KINDS if k not in gone)])
    assert _tree(tmp_path / "outside") == outside  # the symlink's target: untouched
    assert (runs / "linked").is_symlink()
    # What stays is what 'runs --all' still shows (it reads through the symlink, too).
    assert main(["runs", "--all", "--json", "--state-dir", str(state)]) == 0
    listed = {r["run"] for r in json.loads(capsys.readouterr().out)}
    assert listed == {"linked", *(k for k in KINDS if k not in gone)}
    # A second prune finds nothing more to do.
    assert main(["prune", "--state-dir", str(state)]) == 0
    assert capsys.readouterr().out.startswith("removed 0 run(s), 0 bytes; kept 6")


def test_older_than_picks_the_period(state: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--older-than 29.5 keeps new-done (29 days); --older-than 28 removes it too."""
    assert main(["prune", "--state-dir", str(state), "--older-than", "31.5"]) == 0
    assert capsys.readouterr().out.startswith("removed 0 run(s)")
    assert main(["prune", "--state-dir", str(state), "--older-than", "28"]) == 0
    out = capsys.readouterr().out
    assert "removed new-done (ended " in out and out.splitlines()[-1].startswith(
        "removed 3 run(s)")


def test_dry_run_removes_nothing(state: Path, capsys: pytest.CaptureFixture[str]) -> None:
    before = _tree(state / "runs")
    expected = _size(state / "runs" / "old-done") + _size(state / "runs" / "no-mlflow")
    assert main(["prune", "--state-dir", str(state), "--dry-run"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(" (")[0] for line in lines[:-1]] == ["would remove no-mlflow",
                                                            "would remove old-done"]
    assert lines[-1].startswith(f"would remove 2 run(s), {expected / 1024:.1f} KiB "
                                f"({expected} bytes); kept 6")
    assert _tree(state / "runs") == before


def test_a_second_prune_finishes_what_an_interrupted_one_left(
        state: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A prune killed after its rename, half-way through deleting: the hidden directory
    is no run to any reader, and the next prune (not a dry run) deletes the rest."""
    runs = state / "runs"
    os.rename(runs / "old-done", runs / ".pruning-old-done")
    (runs / ".pruning-old-done" / "metrics.jsonl").unlink()
    left = _size(runs / ".pruning-old-done")
    decoy = tmp_path / "decoy"  # a symlink with a moved directory's name: not ours
    decoy.mkdir()
    (decoy / "keep.txt").write_text("keep")
    (runs / ".pruning-decoy").symlink_to(decoy, target_is_directory=True)
    assert main(["runs", "--all", "--json", "--state-dir", str(state)]) == 0
    assert "old-done" not in {r["run"] for r in json.loads(capsys.readouterr().out)}
    assert main(["prune", "--state-dir", str(state), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "would finish removing old-done (left by an interrupted prune, " in out
    assert (runs / ".pruning-old-done").is_dir()
    assert main(["prune", "--state-dir", str(state)]) == 0
    out = capsys.readouterr().out
    assert f"removed old-done (left by an interrupted prune, {left / 1024:.1f} KiB)" in out
    assert "removed no-mlflow (ended " in out
    assert not (runs / ".pruning-old-done").exists()
    assert (runs / ".pruning-decoy").is_symlink() and (decoy / "keep.txt").read_text() == "keep"


@pytest.mark.parametrize("days", ["-1", "abc", "nan", "inf", "1e400", ""])
def test_a_bad_period_is_refused(state: Path, days: str,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["prune", "--state-dir", str(state), "--older-than", days])
    assert exit_.value.code == 2
    assert "argument --older-than: expected a number of days" in capsys.readouterr().err
    assert (state / "runs" / "old-done").is_dir()


def test_a_missing_state_dir_is_refused(tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["prune", "--state-dir", str(tmp_path / "nope")]) == 2
    assert f"--state-dir {tmp_path / 'nope'}: no such directory" in capsys.readouterr().err


def test_a_runs_symlink_is_never_followed(state: Path, tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    elsewhere = tmp_path / "elsewhere"
    os.rename(state / "runs", elsewhere)
    os.symlink(elsewhere, state / "runs")
    before = _tree(elsewhere)
    assert main(["prune", "--state-dir", str(state)]) == 1
    assert f"{state / 'runs'}: " in capsys.readouterr().err
    assert _tree(elsewhere) == before


def test_a_journal_that_cannot_be_moved_aside_makes_the_exit_status_1(
        state: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Something that is no directory at old-done's moved-aside name (no prune made it, and
    none removes it): old-done is kept, said on stderr with what to do, and the exit status
    is 1 (as when a moved journal cannot be deleted); no-mlflow still goes."""
    squatter = state / "runs" / ".pruning-old-done"
    squatter.write_text("not a prune's")
    assert main(["prune", "--state-dir", str(state)]) == 1
    captured = capsys.readouterr()
    assert ("run old-done: .pruning-old-done is in the way (not a directory a prune moved "
            "aside: remove it by hand); kept") in captured.err
    assert "removed no-mlflow (ended " in captured.out
    assert "1 not movable" in captured.out.splitlines()[-1]
    assert (state / "runs" / "old-done").is_dir() and squatter.read_text() == "not a prune's"
    squatter.unlink()
    assert main(["prune", "--state-dir", str(state)]) == 0
    assert "removed old-done (ended " in capsys.readouterr().out


def test_a_socket_no_controller_answers_on_says_where_it_looked(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """``--socket`` with no controller there looks in that socket's default directory;
    finding nothing, it says so, and that a --state-dir controller keeps its runs
    elsewhere (as ``runs --all`` does), rather than a bare "removed 0 run(s)"."""
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "xdg"))
    assert main(["prune", "--socket", str(tmp_path / "nobody.sock")]) == 0
    out = capsys.readouterr().out
    assert out.startswith("removed 0 run(s), 0 bytes\nno runs in "), out
    assert "no controller answers on that socket" in out and "--state-dir" in out, out
