"""``lrctl decisions`` and ``lrctl report`` read the journal in the state dir."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from sinks_helpers import drive, journal_decisions, run_info

from lrctl.cli import main
from lrctl.sinks import AuditSettings, AuditSink
from lrctl.sinks.journal import RunPaths, tail_records

JOURNAL_ONLY = AuditSettings(log_every=10, mlflow=False)


@pytest.fixture
def state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    state = tmp_path / "state"
    monkeypatch.setenv("LRCTL_STATE_DIR", str(state))
    sink = AuditSink(state, JOURNAL_ONLY)
    for key, name in (("run-aa1", "alpha"), ("run-ab2", "beta")):
        sink.open_run(run_info(key, run_name=name, cwd=str(tmp_path)))
        drive(sink, key, range(100), [0.1, 0.01], every=30)
        sink.close_run(key)
    sink.close()
    return state


def test_decisions_prints_a_table_with_the_reasons(state: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["decisions", "run-aa1"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split()[:4] == ["STEP", "TIME", "POLICY", "ACTION"]
    assert len(out) == 1 + 3 + 1 and out[-1] == "3 decisions"
    assert "0.1 -> 0.05 (+1 groups)" in out[1] and out[1].endswith("loss flat for 10 steps at 29")


def test_decisions_json_is_the_journal_record_for_record(
        state: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["decisions", "beta", "--json", "--state-dir", str(state)]) == 0
    got = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert got == journal_decisions(state, "run-ab2")
    assert {"step", "wall_time", "policy", "action", "old_lrs", "new_lrs", "reason",
            "evidence", "policy_sha256", "policy_version"} <= set(got[0])


@pytest.mark.parametrize(("query", "message"), [("run-a", "ambiguous"),
                                                ("nope", "no run matches")])
def test_a_run_that_is_not_one_run_is_a_clear_error(state: Path, query: str, message: str,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["decisions", query]) == 2
    err = capsys.readouterr().err
    assert message in err and "--state-dir" not in err  # (one directory: nothing to pick)


def test_report_draws_the_timeline(state: Path, tmp_path: Path) -> None:
    out = tmp_path / "t.png"
    assert main(["report", "run-ab", "-o", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000


@pytest.mark.parametrize("where", ["missing/t.png", "."])
def test_report_to_a_place_it_cannot_write_says_so(
        state: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], where: str) -> None:
    """A missing folder, or a directory given as the file: a message, not a traceback."""
    assert main(["report", "run-ab", "-o", str(tmp_path / where)]) == 1
    assert "lrctl report: cannot write" in capsys.readouterr().err


def test_runs_all_lists_ended_runs_from_the_journals(
        state: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """'Where is my run?': ended runs stay listed, with no controller running."""
    monkeypatch.setenv("LRCTL_SOCKET", str(tmp_path / "none.sock"))
    sink = AuditSink(state, JOURNAL_ONLY)  # a third run whose process died: never ended
    sink.open_run(run_info("run-b3", run_name="gamma", cwd=str(tmp_path)))
    drive(sink, "run-b3", range(40), [0.2], every=30)
    sink.close()
    assert main(["runs", "--all", "--json"]) == 0
    runs = {r["run"]: r for r in json.loads(capsys.readouterr().out)}
    assert set(runs) == {"run-aa1", "run-ab2", "run-b3"}
    assert runs["run-aa1"]["state"] == "ended" and runs["run-b3"]["state"] == "detached"
    assert runs["run-aa1"]["decisions"] == len(journal_decisions(state, "run-aa1")) == 3
    assert runs["run-aa1"]["step"] == 99 and len(runs["run-aa1"]["lrs"]) == 2
    assert runs["run-ab2"]["run_name"] == "beta"
    assert main(["runs", "--all"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[:5] == ["RUN", "STATE", "STEP", "LR", "DECISIONS"]
    assert any(line.startswith("run-aa1") and " ended " in line for line in table)
    # --state-dir alone lists that directory's runs (it was silently ignored without --all)
    assert main(["runs", "--state-dir", str(state), "--json"]) == 0
    assert {r["run"] for r in json.loads(capsys.readouterr().out)} == set(runs)


def test_one_runs_damaged_journal_leaves_the_others_listed_and_shows_what_it_can(
        state: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """An adversarial pass's find: a damaged last line in one run's journal made ``runs
    --all`` and ``decisions``/``report`` of every other run end in a traceback."""
    monkeypatch.setenv("LRCTL_SOCKET", str(tmp_path / "none.sock"))
    with open(RunPaths.of(state, "run-aa1").stream("decisions"), "ab") as f:
        f.write(b"[1]\n")
    assert main(["runs", "--all", "--json"]) == 0
    captured = capsys.readouterr()
    assert {r["run"] for r in json.loads(captured.out)} == {"run-ab2"}
    assert "run run-aa1: its journal is damaged" in captured.err
    assert main(["decisions", "beta"]) == 0  # found by name past the damaged run
    capsys.readouterr()
    assert main(["decisions", "run-aa1", "--json"]) == 1  # what comes before the damage
    captured = capsys.readouterr()
    assert len(captured.out.splitlines()) == 3
    assert "damaged after decision 3" in captured.err
    assert main(["report", "run-aa1", "-o", str(tmp_path / "t.png")]) == 1
    assert "journal is damaged" in capsys.readouterr().err


def test_runs_of_a_controller_on_another_socket_are_found_by_default(
        state: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """A controller on another socket keeps its journals in a state directory of its own
    inside the default one; the audit verbs look there too."""
    from lrctl import paths

    monkeypatch.setenv("LRCTL_SOCKET", str(tmp_path / "default.sock"))
    own = paths.state_dir(socket=str(tmp_path / "other.sock"))
    assert own.parent == state / paths.SOCKETS_DIR and own.name.startswith("other-")
    sink = AuditSink(own, JOURNAL_ONLY)
    sink.open_run(run_info("run-cc3", run_name="gamma", cwd=str(tmp_path)))
    drive(sink, "run-cc3", range(100), [0.1, 0.01], every=30)
    sink.close_run("run-cc3")
    sink.close()
    assert paths.state_dirs() == [state, own]
    assert main(["decisions", "gamma"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "3 decisions"
    assert main(["decisions", "run-a", "--json"]) == 2  # still ambiguous: aa1, ab2
    assert "ambiguous" in capsys.readouterr().err
    assert main(["runs", "--all", "--json"]) == 0  # every controller's runs
    listed = {r["run"]: r["state_dir"] for r in json.loads(capsys.readouterr().out)}
    assert listed == {"run-aa1": str(state), "run-ab2": str(state), "run-cc3": str(own)}
    # One run's journal in two directories (resumed by another controller): say where.
    sink = AuditSink(own, JOURNAL_ONLY)
    sink.open_run(run_info("run-aa1", run_name="alpha", cwd=str(tmp_path)))
    sink.close_run("run-aa1")
    sink.close()
    assert main(["decisions", "run-aa1"]) == 2
    err = capsys.readouterr().err
    assert f"run-aa1 in {state}" in err and f"run-aa1 in {own}" in err and "--state-dir" in err
    assert main(["decisions", "run-aa1", "--state-dir", str(state)]) == 0
    capsys.readouterr()
    assert main(["runs", "--all", "--state-dir", str(tmp_path / "nope")]) == 2
    assert "no such directory" in capsys.readouterr().err


def test_state_dirs_follow_the_socket(tmp_path: Path) -> None:
    """The default socket's controller keeps the default state directory; any other
    socket gets one of its own, stable, distinct per socket path."""
    from lrctl import paths

    env = {"LRCTL_STATE_DIR": str(tmp_path / "s"), "LRCTL_SOCKET": str(tmp_path / "d.sock")}
    base = tmp_path / "s"
    assert paths.state_dir(env) == base == paths.state_dir(env, socket=str(tmp_path / "d.sock"))
    a = paths.state_dir(env, socket=str(tmp_path / "a" / "x.sock"))
    b = paths.state_dir(env, socket=str(tmp_path / "b" / "x.sock"))
    assert a != b and a.parent == b.parent == base / "sockets"
    assert a == paths.state_dir(env, socket=str(tmp_path / "a" / "x.sock"))
    assert a.name.startswith("x-") and paths.state_dir(
        env, socket=str(tmp_path / ".odd name!.sock")).name.startswith("odd_name_-")


def test_a_run_name_used_by_several_runs_means_the_latest_and_says_so(
        state: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A newcomer's find: a script run twice made its run name unusable for the offline
    verbs ('ambiguous'), while the live verbs took the live run."""
    sink = AuditSink(state, JOURNAL_ONLY)
    sink.open_run(run_info("run-zz9", run_name="alpha", cwd=str(tmp_path)))  # alpha again
    drive(sink, "run-zz9", range(40), [0.3], every=30)
    sink.close_run("run-zz9")
    for key in ("delta-0a1b2c3d", "delta-4e5f6a7b"):  # keys as the hook makes them
        sink.open_run(run_info(key, run_name="delta", cwd=str(tmp_path)))
        drive(sink, key, range(40), [0.3], every=30)
        sink.close_run(key)
    sink.close()
    newer = RunPaths.of(state, "run-aa1").meta  # the older run, reopened (a resume) last
    os.utime(newer, (4_000_000_000, 4_000_000_000))
    assert main(["decisions", "alpha", "--json"]) == 0
    captured = capsys.readouterr()
    assert [json.loads(x) for x in captured.out.splitlines()] == journal_decisions(
        state, "run-zz9")
    assert "'alpha' names 2 runs; the latest, run-zz9 (the others" in captured.err
    assert "run-aa1" in captured.err
    # A name that begins every key of its runs is still a name, not an ambiguous prefix
    # (an adversarial pass found the prefix match first).
    assert main(["decisions", "delta", "--json"]) == 0
    assert "'delta' names 2 runs; the latest, delta-4e5f6a7b" in capsys.readouterr().err


def test_runs_all_shows_the_lr_of_a_run_whose_last_sample_has_none(
        state: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """A newcomer's find: an ended run's LR showed '-' when its last metrics record (the
    final loss, logged between two LR samples) held no LR."""
    monkeypatch.setenv("LRCTL_SOCKET", str(tmp_path / "none.sock"))
    sink = AuditSink(state, JOURNAL_ONLY)
    sink.open_run(run_info("run-d4", run_name="delta", cwd=str(tmp_path)))
    drive(sink, "run-d4", range(96), [0.3, 0.03], every=1000)  # no decisions
    sink.close_run("run-d4")
    sink.close()
    stream = RunPaths.of(state, "run-d4").stream("metrics")
    last = tail_records(stream)[-1]
    with open(stream, "a") as f:  # the final loss, as a closing hook's last step logs it
        f.write(json.dumps({"seq": last["seq"] + 1, "ts": last["ts"],
                            "points": [["lrctl/loss", 0.5, 95]]}) + "\n")
    assert main(["runs", "--all", "--json"]) == 0
    runs = {r["run"]: r for r in json.loads(capsys.readouterr().out)}
    assert (runs["run-d4"]["step"], runs["run-d4"]["lrs"]) == (95, [0.3, 0.03])
