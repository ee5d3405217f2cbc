"""The checkpoint files themselves, found by an adversarial pass: a full disk that takes
part of a checkpoint, a state too big to read back, temporary files a crash left."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from lrctl.daemon import store as store_module
from lrctl.daemon.store import StateStore

KEY = "r-0123456789abcdef"


def test_a_disk_that_takes_part_of_a_checkpoint_leaves_the_old_one(tmp_path: Path) -> None:
    """One ``os.write`` was taken as the whole file: with room for half a checkpoint left,
    the half was fsynced and renamed over the good one, checksum-bad, and the run was
    lost at the next start. A file-size limit stands in for the full disk (the write that
    crosses it is short, the next fails), in a child process, for both ways of writing."""
    script = textwrap.dedent(f"""
        import resource, signal, sys
        from lrctl.daemon.store import StateStore
        store = StateStore(sys.argv[1])
        store.save("{KEY}", {{"step": 1}})
        store.save("{KEY}x", {{"step": 1}})
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, resource.RLIM_INFINITY))
        big = store.encode({{"step": 2, "pad": "x" * 300_000}})
        for how in ("write", "prepare"):
            try:
                if how == "write":
                    store.write("{KEY}", big)
                else:
                    store.complete(store.prepare("{KEY}x", big))
            except OSError as exc:
                print(how, "refused", exc.errno)
            else:
                print(how, "wrote")
    """)
    out = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["write", "refused", "27", "prepare", "refused", "27"]
    store = StateStore(tmp_path)
    for key in (KEY, KEY + "x"):
        assert store.read_file(store.path(key)) == {"step": 1}
    assert not list(store.dir.glob(".*.tmp"))


def test_a_state_too_big_to_read_back_is_never_written(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Checkpoints over the size the controller reads were written every second, and
    moved aside as damaged at the next start: the run restarted from nothing. Now the
    encode refuses them (the run's store error says why) and the last good one stands."""
    store = StateStore(tmp_path)
    store.save(KEY, {"step": 1})
    monkeypatch.setattr(store_module, "MAX_STATE_BYTES", 4096)
    with pytest.raises(ValueError, match="more than a checkpoint may hold"):
        store.save(KEY, {"step": 2, "pad": "x" * 5000})
    assert store.read_file(store.path(KEY)) == {"step": 1}


def test_temporary_files_a_crash_left_are_removed_at_the_start(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    store.save(KEY, {"step": 1})
    left = store.dir / f".{KEY}.ckpt.4242.140000.tmp"
    left.write_bytes(b"x" * 1000)
    other = store.dir / "notes.tmp"  # not ours: kept
    other.write_bytes(b"")
    assert [key for key, _ in store.load_all()] == [KEY]
    assert not left.exists()
    assert other.exists()


def test_a_fifo_or_a_symlink_at_a_checkpoints_name_is_moved_aside_not_read(
        tmp_path: Path) -> None:
    """An adversarial pass's find: a FIFO at a checkpoint's name (or a symlink to one)
    hung a starting controller in ``open()`` for ever, its socket never answering."""
    import os

    store = StateStore(tmp_path)
    store.save(KEY, {"step": 1})
    fifo_key, link_key, target_key = (KEY[:-1] + c for c in "abc")
    os.mkfifo(store.path(fifo_key))  # nobody writes to it: a blocking open never returns
    target = tmp_path / "elsewhere.ckpt"
    store.save(target_key, {"step": 7})
    os.replace(store.path(target_key), target)
    os.symlink(target, store.path(link_key))  # a valid checkpoint, through a symlink
    assert [key for key, _ in store.load_all()] == [KEY]
    for key in (fifo_key, link_key):
        assert not os.path.lexists(store.path(key))
        assert os.path.lexists(store.path(key).with_suffix(".corrupt"))
    assert store.load(fifo_key) is None


def test_a_recreated_state_dir_another_controller_locked_is_reported(tmp_path: Path) -> None:
    """An adversarial pass's find: a controller whose state dir was deleted, and taken by
    another controller started on it within the second, only logged that it could not
    lock it again: it went on starting runs there, and status said nothing."""
    import shutil

    from lrctl.daemon.state_dir import StateDirWatch

    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    watch = StateDirWatch(str(state))
    watch.relock = lambda: "cannot lock it again: another controller (pid 4242) serves it"
    shutil.rmtree(state)
    # Made again, but not ours: nothing is written back (check() says so by False).
    assert not watch.check() and watch.recreated is None
    assert watch.error is not None and "pid 4242" in watch.error
    assert watch.foreign == watch.error  # (the store writes nothing there: see below)
    assert not watch.check() and watch.error is not None  # (said until fixed)
    watch.relock = lambda: None  # deleted again, and this time ours
    shutil.rmtree(state)
    assert watch.check() and watch.error is None and watch.foreign is None


def test_a_store_writes_nothing_into_another_controller_s_directory(tmp_path: Path) -> None:
    """While the state dir is another controller's (``foreign``), no checkpoint is written,
    set aside, brought back, removed or pruned there; a write raises an OSError, which
    the checkpoints' callers count as a failed checkpoint (the run goes on from memory)."""
    store = StateStore(tmp_path)
    store.save(KEY, {"step": 1})
    store.detach(KEY)
    store.save(KEY, {"step": 2})
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    store.foreign = "state dir x: cannot lock it again: another controller serves it"
    with pytest.raises(OSError, match="not written: state dir x"):
        store.save(KEY, {"step": 3})
    with pytest.raises(OSError, match="not written"):
        store.prepare(KEY, store.encode({"step": 3}))
    with pytest.raises(OSError, match="not written"):
        store.open_dir()
    done, errors = store.write_many({KEY: store.encode({"step": 3})})
    assert done == [] and list(errors) == [KEY]
    store.detach(KEY)
    store.reattach(KEY)
    store.delete(KEY)
    assert store.prune_detached(0.0, now=time.time() + 10**9) == 0
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
    assert store.load(KEY) == {"step": 2}


def test_a_store_writes_nothing_into_a_checkpoint_directory_made_again(tmp_path: Path) -> None:
    """The state dir deleted and made again (by another controller, say) inside the second
    before the controller's check of it: a checkpoint due meanwhile went into the new
    directory. Now a write there is refused until the controller made it again itself
    (``refresh``). Its ``runs/`` alone deleted and made again is still its own: written
    as before (a review's find: it was refused until a restart)."""
    import shutil

    state = tmp_path / "state"
    store = StateStore(state)
    store.save(KEY, {"step": 1})
    shutil.rmtree(state / "runs")
    with pytest.raises(OSError):  # (no runs/ now: ENOENT, as ever)
        store.save(KEY, {"step": 2})
    (state / "runs").mkdir(mode=0o700)  # made again inside our own state dir: ours
    store.save(KEY, {"step": 2})
    assert store.load(KEY) == {"step": 2}
    shutil.rmtree(state)
    (state / "runs").mkdir(mode=0o700, parents=True)  # another's
    with pytest.raises(OSError, match="made again"):
        store.save(KEY, {"step": 3})
    store.detach(KEY)
    assert not store.writable and list((state / "runs").iterdir()) == []
    store.refresh()  # the controller's own (see Server._state_dir_recreated)
    store.save(KEY, {"step": 3})
    assert store.load(KEY) == {"step": 3}


def test_a_held_directory_that_cannot_be_held_is_judged_by_its_inode_number(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A review's find: a directory that could not be opened (out of descriptors, one we
    may not read) read as "made again" at every check, so the state dir was "recreated"
    every second. Its remembered (st_dev, st_ino) stands in now."""
    from lrctl.daemon import held_dir

    monkeypatch.setattr(held_dir, "_open", lambda path: -1)
    path = tmp_path / "d"
    path.mkdir()
    held = held_dir.HeldDir(path)
    assert held.same() and held.same()
    path.rmdir()
    assert not held.same()
    path.symlink_to(tmp_path)
    held.reopen()
    assert not held.same()  # never a symlink


def test_a_held_directory_tells_one_made_again_at_its_path(tmp_path: Path) -> None:
    """Remembered (st_dev, st_ino) could not: the new directory took the deleted one's inode
    number. The held descriptor keeps that inode, so the new one never looks the same."""
    import os
    import shutil

    from lrctl.daemon.held_dir import HeldDir

    path = tmp_path / "d"
    path.mkdir()
    held = HeldDir(path)
    assert held.same()
    shutil.rmtree(path)
    assert not held.same()  # gone
    path.mkdir()
    assert not held.same()  # made again
    held.reopen()
    assert held.same()
    path.rmdir()
    os.symlink(tmp_path, path)  # never through a symlink
    assert not held.same()
    held.reopen()
    assert not held.same()
    held.close()
    assert not held.same()
