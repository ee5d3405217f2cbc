"""A full disk under the state dir, then freed (issue #18, item 1).

Before: the journal's buffered writer kept the unwritten half of a line after
``ENOSPC`` and wrote it later, in front of the next line, which reused its ``seq``:
two records ``seq 15``, a torn ``{"`` fragment in the uploaded ``decisions.jsonl``,
decisions missing in MLflow, and ``lrctl status`` showing the error for ever. Now an
append is all or nothing (a short write is rolled back to the last whole line), what
the disk refused waits in memory and is written, in order, once it takes writes again,
``status`` says so while it lasts, and MLflow ends with every decision exactly once.

The disk is filled by fault injection in the controller (``full_disk/sitecustomize.py``:
short write, then ``ENOSPC``): tmpfs quotas and loop mounts are not available here.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from daemon_helpers import ControllerProc
from rel_helpers import FIGURES, store_client, until, until_shipped

import lrctl
from lrctl.client import request
from lrctl.sinks.journal import STREAMS, RunPaths

FULL_DISK = Path(__file__).resolve().parent / "full_disk"  # sitecustomize: the disk fills
QUIET = "version: 1\npolicies:\n  - kind: plateau\n    metric: loss\n    patience: 100000\n"


def _full_disk_env(flag: Path, state: Path, **extra: str) -> dict[str, str]:
    """A controller's environment in which the state dir ``state`` is full while ``flag``
    exists (the sitecustomize in ``FULL_DISK``)."""
    return {**os.environ, "LRCTL_TEST_FULL_DISK": str(flag),
            "LRCTL_TEST_FULL_DISK_UNDER": str(state), **extra,
            "PYTHONPATH": os.pathsep.join(p for p in (str(FULL_DISK),
                                                      os.environ.get("PYTHONPATH")) if p)}


def _disk_errors() -> list[str]:
    return [e for e in request({"t": "status"})["errors"] if "No space left" in e]


def _check_stream(path: Path) -> list[dict]:
    """Every line whole, ``seq`` 1, 2, 3... with no repeat and no gap."""
    lines = path.read_bytes().split(b"\n")
    assert lines[-1] == b"", f"{path.name}: torn last line {lines[-1][:40]!r}"
    records = []
    for raw in lines[:-1]:
        try:
            records.append(json.loads(raw))
        except ValueError:
            pytest.fail(f"{path.name}: torn line {raw[:60]!r}")
    assert [r["seq"] for r in records] == list(range(1, len(records) + 1)), path.name
    return records


def test_full_disk_then_freed_loses_repeats_and_tears_nothing(
        make_controller: Callable[..., ControllerProc], short_dir: Path, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    from sinks_helpers import assert_exactly_once, mlflow_run_id

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)
    state = Path(os.environ["LRCTL_STATE_DIR"])
    flag = short_dir / "disk-full"
    env = _full_disk_env(flag, state)
    controller = make_controller(audit=True, env=env)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=0.1)
    made: list[dict] = []
    with lrctl.attach(opt, policy=QUIET, sync=True, spawn=False) as ctl:
        key = ctl.run_key

        def phase(rounds: int) -> None:
            for _ in range(rounds):
                for _ in range(7):
                    ctl.step(1.0, grad_norm=1.0)
                reply = request({"t": "set_lr", "run": key, "lr": 0.01 * (len(made) + 1)})
                made.append(reply["decision"])

        phase(3)
        flag.write_text("300")  # 300 bytes left, then full: the next lines tear
        phase(8)
        assert _disk_errors(), "status says nothing of the full disk"
        flag.unlink()
        phase(3)
    paths = RunPaths.of(state, key)
    until("the run's end in its journal", lambda: b'"event":"end"' in
          paths.stream("events").read_bytes())
    journal = {name: _check_stream(paths.stream(name)) for name in STREAMS}
    assert [(r["step"], r["new_lrs"]) for r in journal["decisions"]] == [
        (d["step"], d["new_lrs"]) for d in made], "decisions lost or reordered"
    until("the disk error to clear from status", lambda: not _disk_errors())

    client = store_client(uri)

    until_shipped(client, state, key, len(made))
    controller.stop()
    uploaded = assert_exactly_once(client, mlflow_run_id(state, key), state, key, tmp_path)
    FIGURES["full disk"] = {"decisions": len(made), "journal": len(journal["decisions"]),
                            "mlflow": len(uploaded),
                            "metric lines": len(journal["metrics"])}


def _write_back_errors() -> list[str]:
    return [e for e in request({"t": "status"})["errors"] if "restore failed" in e]


def test_a_state_dir_deleted_on_a_full_disk_is_written_back_once_the_disk_has_room(
        make_controller: Callable[..., ControllerProc], short_dir: Path, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Deleting the state dir frees nothing while the controller holds its files open, so
    the write-back of the open runs' journals into the new directory finds the disk
    full. Before, that first failure was final: the journals went on into the deleted
    files, no run's file came back (``lrctl decisions`` found nothing, MLflow stopped),
    and the restore's first error left the other runs unwritten too. Now every run and
    file is tried, again every second until all are back; a run that ends meanwhile
    keeps its files open until they are."""
    import shutil

    from sinks_helpers import assert_exactly_once, mlflow_run_id

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)
    state = Path(os.environ["LRCTL_STATE_DIR"])
    flag = short_dir / "disk-full"
    env = _full_disk_env(flag, state, LRCTL_TEST_FULL_DISK_WRITEBACK="1")
    controller = make_controller(audit=True, env=env)
    made: dict[str, list[dict]] = {}

    def phase(ctl: lrctl.Controller, rounds: int) -> None:
        for _ in range(rounds):
            for _ in range(7):
                ctl.step(1.0, grad_norm=1.0)
            key = str(ctl.run_key)
            reply = request({"t": "set_lr", "run": key,
                             "lr": 0.01 * (len(made.setdefault(key, [])) + 1)})
            made[key].append(reply["decision"])

    def opt() -> torch.optim.Optimizer:
        return torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=0.1)

    with lrctl.attach(opt(), policy=QUIET, sync=True, spawn=False) as ctl:
        ended = lrctl.attach(opt(), policy=QUIET, sync=True, spawn=False)
        phase(ctl, 3)
        phase(ended, 3)
        flag.write_text("0")  # full; then the state dir is deleted (to make room, say)
        shutil.rmtree(state)
        until("status to say the journals are not written back",
              lambda: bool(_write_back_errors()))
        phase(ctl, 2)
        phase(ended, 2)
        ended.close()  # a run that ends before the disk has room
        flag.unlink()
        phase(ctl, 1)  # its commit writes what was held before the next write-back try
        until("the write-back to succeed", lambda: not _write_back_errors())
        phase(ctl, 3)
    for key, decisions in made.items():
        paths = RunPaths.of(state, key)
        until(f"run {key}'s end in its journal", lambda p=paths: p.stream("events").exists()
              and b'"event":"end"' in p.stream("events").read_bytes())
        journal = {name: _check_stream(paths.stream(name)) for name in STREAMS}
        assert [(r["step"], r["new_lrs"]) for r in journal["decisions"]] == [
            (d["step"], d["new_lrs"]) for d in decisions], f"run {key}: decisions lost"
    client = store_client(uri)
    for key in made:
        until_shipped(client, state, key, len(made[key]))
    controller.stop()
    for key in made:
        assert_exactly_once(client, mlflow_run_id(state, key), state, key, tmp_path)


def test_a_shutdown_on_a_still_full_disk_does_not_say_the_disk_takes_writes_again(
        caplog: pytest.LogCaptureFixture) -> None:
    """Before, giving up on the held records at shutdown logged "the disk takes writes
    again; the records held since … are written" right before "N journal record(s)
    lost: the disk still refuses writes" (a real tmpfs pass, 4 107 records)."""
    import errno
    import logging

    from lrctl.sinks._held import HeldLines

    class Full:
        path = Path("runs/r/decisions.jsonl")

        def append(self, record: dict) -> None:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    held = HeldLines(limit=100)
    writer = Full()
    for seq in range(3):
        held.append(writer, {"seq": seq})  # type: ignore[arg-type]
    with caplog.at_level(logging.INFO, logger="lrctl.sinks"):
        assert held.forget(writer) == 3  # type: ignore[arg-type]
    assert not [r for r in caplog.records if "records held since" in r.getMessage()]
    assert not held and held.error is None


def test_status_blames_the_state_dir_not_mlflow_when_the_shipper_cannot_save_its_cursor(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A full disk under the state dir, the MLflow store on another disk with room: the
    shipper's cursor cannot be saved, and shipping waits. Before, ``status`` said
    "MLflow unavailable: OSError: [Errno 28] No space left on device
    (sqlite:////other-disk/mlflow.db)" (a real tmpfs pass): the store named, not the
    state dir, and no file named at all."""
    import errno

    from lrctl.sinks import _ship_state
    from lrctl.sinks._mlflow_store import reason, unavailable

    def full(*args: object, **kwargs: object) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    state = _ship_state.RunState(RunPaths.of(tmp_path, "r"))
    monkeypatch.setattr(_ship_state, "atomic_write_json", full)
    with pytest.raises(OSError) as refused:
        state.save()
    said = unavailable(reason(refused.value))
    assert said.startswith("MLflow shipping waits: the state dir refuses cursor.json ("), said
    assert str(RunPaths.of(tmp_path, "r").cursor) in said and "No space left" in said
