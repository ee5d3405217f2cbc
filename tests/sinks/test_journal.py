"""The journal: numbered lines, resumable reads, crash repair, safe run keys."""

from __future__ import annotations

import errno
import json
import os
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from lrctl.sinks.journal import (
    RunPaths,
    StreamWriter,
    atomic_write_json,
    atomic_write_text,
    check_run_key,
    last_line,
    list_run_keys,
    private_dirs,
    read_json,
    read_lines,
)


def test_lines_are_numbered_and_a_reader_resumes_at_an_offset(tmp_path: Path) -> None:
    w = StreamWriter(tmp_path / "d.jsonl", fsync=True)
    lines = [w.append({"i": i}) for i in range(5)]
    w.close()
    assert [ln.seq for ln in lines] == [1, 2, 3, 4, 5]
    assert [ln.record["i"] for ln in read_lines(tmp_path / "d.jsonl")] == [0, 1, 2, 3, 4]
    rest = list(read_lines(tmp_path / "d.jsonl", lines[2].end))
    assert [ln.seq for ln in rest] == [4, 5]
    assert [ln.seq for ln in read_lines(tmp_path / "d.jsonl", 0, limit=2)] == [1, 2]


def test_reopening_continues_numbering_and_cuts_a_torn_line(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    w = StreamWriter(path, fsync=True)
    w.append({"i": 0})
    w.append({"i": 1})
    w.close()
    with open(path, "ab") as f:
        f.write(b'{"seq":3,"i":')  # a crash in the middle of a write
    assert [ln.seq for ln in read_lines(path)] == [1, 2]  # readers never see half a line
    w = StreamWriter(path, fsync=True)
    assert w.append({"i": 2}).seq == 3
    w.close()
    assert [ln.record["i"] for ln in read_lines(path)] == [0, 1, 2]
    last = last_line(path)
    assert last is not None and last.seq == 3 and last.end == path.stat().st_size


def test_last_line_finds_a_line_longer_than_one_tail_chunk(tmp_path: Path) -> None:
    w = StreamWriter(tmp_path / "d.jsonl", fsync=False)
    w.append({"x": "a"})
    w.append({"x": "b" * 200_000})
    w.close()
    last = last_line(tmp_path / "d.jsonl")
    assert last is not None and last.seq == 2 and len(last.record["x"]) == 200_000


def test_non_finite_numbers_are_refused_rather_than_written_as_bad_json(tmp_path: Path) -> None:
    w = StreamWriter(tmp_path / "d.jsonl", fsync=False)
    with pytest.raises(ValueError):
        w.append({"loss": float("nan")})
    w.close()


@pytest.mark.parametrize("key", ["", "../x", "a/b", ".hidden", "a" * 129, "a b"])
def test_run_keys_that_could_escape_the_state_dir_are_refused(key: str, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="run_key"):
        RunPaths.of(tmp_path, key)


def test_run_keys_listed_are_those_with_a_meta_file(tmp_path: Path) -> None:
    for key in ("b-2", "a.1"):
        RunPaths.of(tmp_path, key).root.mkdir(parents=True)
        atomic_write_json(RunPaths.of(tmp_path, key).meta, {"run_key": key})
    RunPaths.of(tmp_path, "half").root.mkdir(parents=True)
    assert list_run_keys(tmp_path) == ["a.1", "b-2"]
    assert check_run_key("a.1") == "a.1"
    assert list_run_keys(tmp_path / "missing") == []


def test_atomic_write_leaves_no_temporary_files(tmp_path: Path) -> None:
    atomic_write_json(tmp_path / "c.json", {"a": 1})
    atomic_write_json(tmp_path / "c.json", {"a": 2})
    assert read_json(tmp_path / "c.json") == {"a": 2}
    assert [p.name for p in tmp_path.iterdir()] == ["c.json"]
    assert read_json(tmp_path / "none.json", {}) == {}


def test_a_decision_is_on_disk_when_append_returns(tmp_path: Path) -> None:
    """Another process (a crash survivor) reads it at once: the write is not buffered."""
    w = StreamWriter(tmp_path / "d.jsonl", fsync=True)
    w.append({"step": 7})
    out = subprocess.run([sys.executable, "-c",
                          "import sys; print(open(sys.argv[1]).read())", str(w.path)],
                         capture_output=True, text=True, check=True).stdout
    assert json.loads(out.strip()) == {"seq": 1, "step": 7}
    w.close()


def test_importing_lrctl_and_its_sinks_imports_neither_mlflow_nor_matplotlib() -> None:
    code = ("import sys, lrctl, lrctl.sinks, lrctl.timeline, lrctl.commands.audit; "
            "print(sorted(m for m in ('mlflow', 'matplotlib') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "[]"


class _FillingFile:
    """A raw file on a disk with ``free`` bytes left: a short write, then ENOSPC."""

    def __init__(self, real: Any, free: int) -> None:
        self.real, self.free, self.closed = real, free, False

    def write(self, data: Any) -> int:
        if self.free <= 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        n = int(self.real.write(bytes(data[:self.free])))
        self.free -= n
        return n

    def fileno(self) -> int:
        return int(self.real.fileno())

    def close(self) -> None:
        self.real.close()
        self.closed = True


def test_an_append_the_disk_refuses_part_of_is_cut_back_and_its_seq_not_taken(
        tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    w = StreamWriter(path, fsync=False)
    w.append({"step": 1})
    good = path.read_bytes()
    real = w._file
    w._file = _FillingFile(real, free=7)  # type: ignore[assignment]
    with pytest.raises(OSError, match="No space"):
        w.append({"step": 2, "pad": "x" * 100})
    assert path.read_bytes() == good  # no torn half line left behind
    w._file.free = 10**6  # type: ignore[attr-defined]
    w.append({"step": 3})
    w.close()
    assert [(line.seq, line.record["step"]) for line in read_lines(path)] == [(1, 1), (2, 3)]


def test_a_journal_is_private_and_never_written_through_a_symlink(tmp_path: Path) -> None:
    """An adversarial pass planted ``runs/KEY/decisions.jsonl -> victim``: the torn-tail
    repair cut the victim to zero bytes and the journal appended to it; files were
    created 0644 and run directories 0755 (checkpoints and logs were 0600)."""
    victim = tmp_path / "victim.txt"
    victim.write_bytes(b"precious data, no newline")
    run_dir = tmp_path / "state" / "runs" / "sym"
    run_dir.mkdir(parents=True, mode=0o700)
    (run_dir / "decisions.jsonl").symlink_to(victim)
    with pytest.raises(OSError):
        StreamWriter(run_dir / "decisions.jsonl", fsync=False)
    assert victim.read_bytes() == b"precious data, no newline"

    fresh = tmp_path / "fresh" / "runs" / "k1" / "events.jsonl"
    writer = StreamWriter(fresh, fsync=False)
    writer.append({"event": "start"})
    writer.close()
    assert stat.S_IMODE(fresh.stat().st_mode) == 0o600
    assert stat.S_IMODE(fresh.parent.stat().st_mode) == 0o700
    assert stat.S_IMODE(fresh.parent.parent.stat().st_mode) == 0o700
    meta = fresh.parent / "meta.json"
    atomic_write_json(meta, {"a": 1})
    assert stat.S_IMODE(meta.stat().st_mode) == 0o600 and read_json(meta) == {"a": 1}
    text = fresh.parent / "policy.yaml"
    atomic_write_text(text, "version: 1\n")
    assert stat.S_IMODE(text.stat().st_mode) == 0o600 and text.read_text() == "version: 1\n"
    # Nor through a symlinked runs directory (an adversarial pass: journals were written
    # into its 0755 target).
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (tmp_path / "linked").mkdir(mode=0o700)
    (tmp_path / "linked" / "runs").symlink_to(elsewhere)
    with pytest.raises(PermissionError, match="runs is not a directory"):
        StreamWriter(tmp_path / "linked" / "runs" / "k2" / "events.jsonl", fsync=False)
    assert list(elsewhere.iterdir()) == []


def test_run_directories_of_an_earlier_lrctl_are_made_private_not_refused(
        tmp_path: Path) -> None:
    """A review's find: run directories an earlier lrctl made with the umask's mode
    (0775 under umask 002) were refused as writable by others, so no run held across
    the upgrade could be restored or resumed. Inside the private state directory they
    are made 0700 instead."""
    run_dir = tmp_path / "state" / "runs" / "old-run"
    (run_dir / "policies").mkdir(parents=True)
    for d in (run_dir, run_dir / "policies"):
        d.chmod(0o775)
    writer = StreamWriter(run_dir / "decisions.jsonl", fsync=False)
    writer.close()
    private_dirs(run_dir / "policies")
    for d in (run_dir, run_dir / "policies"):
        assert stat.S_IMODE(d.stat().st_mode) == 0o700
