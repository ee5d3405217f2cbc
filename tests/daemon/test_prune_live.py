"""``lrctl prune`` beside a real controller: it is the controller that moves the journals
of its state directory (on its loop, where no run opens meanwhile), never a run it
holds; and a controller that starts while a prune moves journals with none running
waits for it rather than taking the directory from under it (or going elsewhere)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from daemon_helpers import ControllerProc, train, until

from lrctl import paths
from lrctl.cli import main
from lrctl.daemon.retention import controller_holds, gate
from lrctl.sinks._ship_state import shipping
from lrctl.sinks.journal import RunPaths
from lrctl.wire.operator import request


def _age(root: Path, days: float) -> None:
    t = time.time() - days * 86400
    for path in [root, *root.rglob("*")]:
        os.utime(path, (t, t), follow_symlinks=False)


def test_a_running_controller_moves_the_journals_and_keeps_the_runs_it_holds(
        make_controller, capsys: pytest.CaptureFixture[str]) -> None:  # type: ignore[no-untyped-def]
    controller: ControllerProc = make_controller(audit=True)
    state = Path(controller.state_dir)
    done = train("done", 60)
    done.close()  # said goodbye
    live = train("live", 60)  # its hook connected
    gone = train("gone", 60)
    gone.close(end_run=False)  # its hook went: the controller holds the run
    keys = {name: ctl.run_key for name, ctl in (("done", done), ("live", live), ("gone", gone))}
    assert all(keys.values())
    until(lambda: shipping(RunPaths.of(state, keys["done"]))[0] == "shipped",
          "the ended run to be all in MLflow (its timeline drawn)", 180)
    # The controller looks at each run named again, whatever the asker saw: the ended run,
    # written to just now, is kept (the CLI's own look is only a first sort).
    reply = request({"t": "prune", "state_dir": os.path.realpath(state),
                     "older_than_s": 30 * 86400, "runs": [keys["done"]]}, controller.socket)
    assert reply["moved"] == [] and reply["kept"] == {
        keys["done"]: {"reason": "recent", "detail": ""}}
    for key in keys.values():
        _age(RunPaths.of(state, key).root, 40)

    assert main(["prune", "--state-dir", str(state)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith(f"removed {keys['done']} (ended ")
    assert out[-1].startswith("removed 1 run(s), ") and "kept 2: 2 resumable" in out[-1]
    assert not RunPaths.of(state, keys["done"]).root.exists()
    assert not any(name.startswith(".pruning-") for name in os.listdir(state / "runs"))
    assert (f"operator: prune: the journals of 1 ended run(s) moved aside to be deleted: "
            f"{keys['done']}") in controller.log.read_text()

    # The runs it holds, asked for by name: held, whatever their files say.
    reply = request({"t": "prune", "state_dir": os.path.realpath(state), "older_than_s": 0,
                     "runs": [keys["live"], keys["gone"]]}, controller.socket)
    assert reply == {"v": 1, "t": "pruned", "moved": [], "kept": {
        keys["live"]: {"reason": "held", "detail": ""},
        keys["gone"]: {"reason": "held", "detail": ""}}}
    live.step(0.01, grad_norm=1.0)  # its journal goes on
    live.close()
    assert main(["runs", "--all", "--json", "--state-dir", str(state)]) == 0
    assert keys["done"] not in capsys.readouterr().out


def test_a_request_for_another_state_dir_is_refused(
        controller: ControllerProc, tmp_path: Path) -> None:
    from lrctl.wire.operator import ControllerError

    with pytest.raises(ControllerError, match="this controller serves from "):
        request({"t": "prune", "state_dir": str(tmp_path), "older_than_s": 0, "runs": []},
                controller.socket)


def test_a_controller_that_starts_during_an_offline_prune_waits_for_it(
        make_controller) -> None:  # type: ignore[no-untyped-def]
    proc: ControllerProc = make_controller(start=False)
    state = paths.ensure_state_dir(proc.state_dir)
    with gate(state, 0) as why:  # (an 'lrctl prune' with no controller running, moving)
        assert why is None
        proc.start(wait=False)
        until(lambda: "waiting for an 'lrctl prune' at work in" in proc.log.read_text(),
              "the controller's start to wait for the prune")
        assert not controller_holds(state)  # it has not taken the directory meanwhile
        assert proc.proc is not None and proc.proc.poll() is None
    proc.wait_ready()
    assert request({"t": "status"}, proc.socket)["state_dir"] == str(state)


def test_serve_keep_ended_days_prunes_by_itself(
        make_controller) -> None:  # type: ignore[no-untyped-def]
    """``--keep-ended-days 30``: the controller's hourly look (its first at its start)
    removes the journals an earlier controller left of runs that ended over 30 days ago,
    all in MLflow; a run that ended 29 days ago stays."""
    first: ControllerProc = make_controller(audit=True)
    state = Path(first.state_dir)
    keys = {}
    for name in ("old", "recent"):
        ctl = train(name, 60)
        ctl.close()
        keys[name] = ctl.run_key
    for key in keys.values():
        until(lambda key=key: shipping(RunPaths.of(state, key))[0] == "shipped",
              "the ended runs to be all in MLflow", 180)
    assert first.stop() == 0
    _age(RunPaths.of(state, keys["old"]).root, 31)
    _age(RunPaths.of(state, keys["recent"]).root, 29)
    second: ControllerProc = make_controller(["--keep-ended-days", "30"], audit=True)
    until(lambda: "removed the journals of 1 run(s) that ended over 30 days ago, all in "
                  "MLflow" in second.log.read_text(), "the controller's sweep")
    assert sorted(os.listdir(state / "runs")) == [keys["recent"]]


def _ended_journal(state: Path, key: str, meta: dict, cursor: dict | None = None,
                   marked: bool = False) -> Path:
    """A run's journal as a controller leaves it, by hand: ended (its last event its end),
    no checkpoint, last written 40 days ago; ``marked``: a controller's start found it all
    in MLflow (it skips it from then on)."""
    import json

    root = RunPaths.of(state, key).root
    root.mkdir(parents=True)
    (root / "meta.json").write_text(json.dumps({"run_key": key, **meta}))
    (root / "events.jsonl").write_text(json.dumps(
        {"seq": 1, "event": "end", "wall_time": time.time() - 40 * 86400}) + "\n")
    if cursor is not None:
        (root / "cursor.json").write_text(json.dumps(cursor))
    if marked:
        (root / "shipped").touch()
    _age(root, 40)
    return root


def test_a_journal_of_odd_shape_is_kept_and_the_sweep_goes_on(
        make_controller, short_dir: Path,
        capsys: pytest.CaptureFixture[str]) -> None:  # type: ignore[no-untyped-def]
    """A cursor that is JSON but not of lrctl's shape (here ``streams`` a list), in a run
    that a controller's start skips (marked shipped): ``--keep-ended-days`` neither ends the
    controller at its first sweep nor stops sweeping there; the run is kept as damaged,
    the others go; ``lrctl prune`` says so, and exits 0, with no traceback."""
    state = paths.ensure_state_dir(short_dir / "state")
    odd = _ended_journal(state, "a-odd", {"mlflow": {"tracking_uri": "sqlite:///x.db"}},
                         {"finished": True, "streams": []}, marked=True)
    plain = _ended_journal(state, "b-plain", {})  # (no MLflow target: nothing to wait for)
    controller: ControllerProc = make_controller(["--keep-ended-days", "30"], audit=True)
    moved = plain.parent / f".pruning-{plain.name}"  # (deleted on a thread of its own)
    until(lambda: not plain.exists() and not moved.exists(),
          "the sweep to remove the plain run's journal")
    assert odd.is_dir()
    assert controller.proc is not None and controller.proc.poll() is None
    assert request({"t": "status"}, controller.socket)["pid"] == controller.pid
    assert controller.stop() == 0
    assert main(["prune", "--state-dir", str(state), "--older-than", "0"]) == 0
    out, err = capsys.readouterr()
    assert out.splitlines()[-1] == "removed 0 run(s), 0 bytes; kept 1: 1 damaged"
    assert "run a-odd: " in err and "a field of the wrong kind" in err
    assert odd.is_dir()
