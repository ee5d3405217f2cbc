"""``lrctl runs`` and ``lrctl runs --all`` tell the same story about a run: live while its
hook is connected, detached while its checkpoint waits for it (held by a controller or
on disk), ended once it said goodbye; its step and LRs those the controller has."""

from __future__ import annotations

import json

import pytest
from daemon_helpers import ControllerProc, train

import lrctl
from lrctl.cli import main

STEPS = 123  # not a multiple of the journal's metrics sample: its step would differ


def _views(capsys: pytest.CaptureFixture[str], all_too: bool = True,
           ) -> tuple[dict[str, dict], dict[str, dict]]:
    served: dict[str, dict] = {}
    if main(["runs", "--json"]) == 0:
        served = {r["run_name"]: r for r in json.loads(capsys.readouterr().out)}
    else:
        capsys.readouterr()
    assert main(["runs", "--all", "--json"]) == 0
    remembered = {r["run_name"]: r for r in json.loads(capsys.readouterr().out)}
    return served, remembered


def _train(name: str, steps: int = STEPS) -> lrctl.Controller:
    return train(name, steps)


def test_the_views_agree_on_live_detached_and_ended_runs(
        make_controller, capsys: pytest.CaptureFixture[str]) -> None:  # type: ignore[no-untyped-def]
    controller: ControllerProc = make_controller(audit=True)
    live = _train("live")
    _train("gone").close(end_run=False)  # its hook is gone; the controller holds the run
    _train("done").close()  # said goodbye
    served, remembered = _views(capsys)
    gone = served["gone"]["run"]  # the controller's log says when a hook went without a bye
    assert f"run {gone}: its hook went without a goodbye after step {STEPS - 1}" in \
        controller.log.read_text()
    assert served["live"]["connected"] and remembered["live"]["state"] == "live"
    assert not served["gone"]["connected"] and remembered["gone"]["state"] == "detached"
    assert "done" not in served and remembered["done"]["state"] == "ended"
    for name in ("live", "gone"):
        assert remembered[name]["step"] == served[name]["step"] == STEPS - 1
        assert remembered[name]["lrs"] == served[name]["lrs"]
    lrs = served["gone"]["lrs"]
    live.close(end_run=False)
    assert controller.stop() == 0  # both checkpointed: resumable
    _, remembered = _views(capsys)
    for name in ("live", "gone"):  # from the checkpoint, not the journal's last sample
        assert remembered[name]["state"] == "detached"
        assert remembered[name]["step"] == STEPS - 1
    assert remembered["gone"]["lrs"] == lrs and remembered["done"]["state"] == "ended"


def test_an_evicted_run_is_detached_while_its_checkpoint_is_on_disk(
        make_controller, capsys: pytest.CaptureFixture[str]) -> None:  # type: ignore[no-untyped-def]
    """--session-timeout drops a run whose hook is gone from memory (its journal ends it as
    orphaned) and keeps its checkpoint: a reconnect resumes it, so it is detached, at the
    checkpoint's step; ended once that is gone."""
    import time
    from pathlib import Path

    controller: ControllerProc = make_controller(["--session-timeout", "1"], audit=True)
    _train("evicted", steps=10).close(end_run=False)
    deadline = time.monotonic() + 60
    while True:  # until the controller has evicted it
        served, remembered = _views(capsys)
        if "evicted" not in served:
            break
        assert time.monotonic() < deadline, "never evicted"
        time.sleep(0.1)
    assert remembered["evicted"]["state"] == "detached" and remembered["evicted"]["step"] == 9
    key = remembered["evicted"]["run"]
    (Path(controller.state_dir) / "runs" / ".detached" / f"{key}.ckpt").unlink()
    _, remembered = _views(capsys)
    assert remembered["evicted"]["state"] == "ended"


def test_runs_all_lists_the_runs_of_a_controller_without_a_journal(
        controller: ControllerProc, capsys: pytest.CaptureFixture[str]) -> None:
    """--no-audit: no journal, but ``--all`` adds ended runs to those served, never fewer."""
    with _train("unjournaled", steps=5):
        served, remembered = _views(capsys)
        assert remembered["unjournaled"]["state"] == "live"
        assert remembered["unjournaled"]["step"] == served["unjournaled"]["step"] == 4
        assert main(["runs", "--all"]) == 0
        row = [line for line in capsys.readouterr().out.splitlines() if "unjournaled" in line]
        assert row and row[0].split()[1:3] == ["live", "4"]


def test_runs_all_on_a_silent_socket_says_where_it_looked_and_why(
        short_dir, capsys: pytest.CaptureFixture[str]) -> None:  # type: ignore[no-untyped-def]
    """No controller answers: the directory is the socket's default one, which a
    controller started with --state-dir does not use."""
    assert main(["runs", "--all", "--socket", str(short_dir / "nobody.sock")]) == 0
    out = capsys.readouterr().out
    assert out.startswith("no runs in ") and "pass the same --state-dir" in out


@pytest.mark.parametrize("name", ["meta.json", "cursor.json"])
def test_one_runs_damaged_file_stops_neither_the_controller_nor_the_views(
        make_controller, capsys: pytest.CaptureFixture[str], name: str) -> None:  # type: ignore[no-untyped-def]
    """An adversarial pass's find: one empty meta.json (or cursor.json) made `lrctl serve`
    exit 2 on start ("Expecting value: line 1 column 1"), naming no file, and `runs
    --all`, `decisions` and `report` print a traceback. The file is now logged as
    damaged and read as empty; the run is not shipped again from its start."""
    import os
    from pathlib import Path

    controller: ControllerProc = make_controller(audit=True)
    _train("damaged").close()
    _train("intact").close()
    assert controller.stop() == 0
    root = Path(os.environ["LRCTL_STATE_DIR"]) / "runs"
    (victim,) = [d for d in root.iterdir() if d.name.startswith("damaged-")]
    (victim / name).write_text("")
    again: ControllerProc = make_controller(audit=True)  # starts (start() waits for it)
    _, remembered = _views(capsys)
    assert "intact" in remembered  # the damaged run by its key when its meta is gone
    assert any(n.startswith("damaged") for n in remembered)
    assert main(["decisions", "intact"]) == 0
    capsys.readouterr()
    assert again.stop() == 0
    if name == "cursor.json":
        assert f"run {victim.name} is not shipped to MLflow" in again.log.read_text()
    # Nor by the worker later, from a cursor read as empty (a review's find: duplicates)
    from lrctl.sinks._ship_state import RunState
    from lrctl.sinks.journal import RunPaths

    assert RunState(RunPaths.of(root.parent, victim.name)).failed


def test_without_a_journal_a_resumable_checkpoint_is_listed_as_detached(
        make_controller, capsys: pytest.CaptureFixture[str]) -> None:  # type: ignore[no-untyped-def]
    """A soak test's find: with ``--no-audit`` a run left resumable vanished from ``lrctl
    runs --all`` once no controller held it (only journals were read), though its
    checkpoint waited to be resumed; set aside after the session timeout, likewise."""
    controller: ControllerProc = make_controller()  # --no-audit
    _train("kept", steps=20).close(end_run=False)
    _train("done").close()
    assert controller.stop() == 0  # the run is checkpointed at the exit
    assert main(["runs", "--all", "--json"]) == 0
    listed = {r["run_name"]: r for r in json.loads(capsys.readouterr().out)}
    assert set(listed) == {"kept"}
    assert listed["kept"]["state"] == "detached" and listed["kept"]["step"] == 19
    assert listed["kept"]["lrs"] == [0.1]


def test_runs_all_skips_a_run_whose_journal_goes_while_it_is_read(
        short_dir, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:  # type: ignore[no-untyped-def]
    """'lrctl prune' moves a journal aside (one rename) at any moment, also between a
    stream's stat and its open in the reader: that run is left out, the others listed."""
    import os
    import time

    from lrctl.sinks import journal

    runs = short_dir / "state" / "runs"
    for key in ("a-going", "b-staying"):
        (runs / key).mkdir(parents=True)
        (runs / key / "meta.json").write_text(json.dumps({"run_name": key}))
        (runs / key / "events.jsonl").write_text(json.dumps(
            {"seq": 1, "event": "end", "wall_time": time.time()}) + "\n")
    real = journal.open_stream

    def moved_first(path):  # type: ignore[no-untyped-def]
        if path.parent.name == "a-going" and path.parent.exists():
            os.rename(path.parent, runs / ".pruning-a-going")  # (prune's move, right then)
        return real(path)
    monkeypatch.setattr(journal, "open_stream", moved_first)
    assert main(["runs", "--all", "--json", "--state-dir", str(short_dir / "state")]) == 0
    assert [r["run"] for r in json.loads(capsys.readouterr().out)] == ["b-staying"]


def test_a_shadow_decision_is_marked_in_the_last_decision_column() -> None:
    # `lrctl decisions` says `reduce (shadow)`; `lrctl runs` said `plateau.reduce` for the
    # same record, as if the LR had been cut (the demo's fixed run: LR 0.5 beside it).
    from lrctl.commands.daemon import _describe

    record = {"step": 7, "policy": "plateau", "action": "reduce", "reason": "why"}
    assert _describe(record) == "step 7 plateau.reduce: why"
    assert _describe({**record, "shadow": True}) == "step 7 plateau.reduce (shadow): why"
