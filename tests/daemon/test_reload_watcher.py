"""Policy files edited the ways editors edit them, watched for real (inotify)."""

from __future__ import annotations

import contextlib
import os
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from watchdog.events import FileSystemEvent, FileSystemEventHandler

from lrctl import _watched
from lrctl import reload as reload_mod
from lrctl.reload import PolicyWatcher, ReloadEvent, read_policy_file

V1 = "version: 1\npolicies:\n  - kind: plateau\n    patience: 5\n"
V2 = "version: 1\npolicies:\n  - kind: plateau\n    patience: 7\n"
V3 = "version: 1\npolicies:\n  - kind: plateau\n    patience: 9\n"
BROKEN = "version: 1\npolicies:\n  - kind: plateau\n    patience: -1\n"
QUIET_S = 1.0  # how long to listen for (unwanted) further events


@pytest.fixture
def events() -> queue.Queue[ReloadEvent]:
    return queue.Queue()


@pytest.fixture
def watcher(events: queue.Queue[ReloadEvent]) -> Iterator[PolicyWatcher]:
    with PolicyWatcher(events.put, debounce_s=0.1) as w:
        yield w


def collect(events: queue.Queue[ReloadEvent], first_timeout: float = 10.0) -> list[ReloadEvent]:
    """Every event until the watcher has been quiet for QUIET_S."""
    got = [events.get(timeout=first_timeout)]
    while True:
        try:
            got.append(events.get(timeout=QUIET_S))
        except queue.Empty:
            return got


def patience(event: ReloadEvent) -> int:
    assert event.policy is not None, event
    return int(event.policy.entries[0].params["patience"])


def write(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def test_in_place_edit_reloads_once(tmp_path: Path, watcher: PolicyWatcher,
                                    events: queue.Queue[ReloadEvent]) -> None:
    f = tmp_path / "p.yaml"
    write(f, V1)
    watcher.watch(str(f))
    write(f, V2)
    got = collect(events)
    assert [(e.status, patience(e)) for e in got] == [("changed", 7)]


def test_editor_burst_ends_on_last_content(tmp_path: Path,
                                           events: queue.Queue[ReloadEvent]) -> None:
    f = tmp_path / "p.yaml"
    write(f, V1)
    # A debounce far longer than the burst (not 0.1 s against 10 ms gaps: a busy
    # machine may pause the writer that long), so the burst is one change.
    with PolicyWatcher(events.put, debounce_s=2.0) as watcher:
        watcher.watch(str(f))
        with open(f, "w") as h:  # truncate, then several partial writes, as editors do
            for chunk in (V3[:10], V3[10:25], V3[25:]):
                h.write(chunk)
                h.flush()
                time.sleep(0.01)
        got = collect(events)
    assert [(e.status, patience(e)) for e in got] == [("changed", 9)]


def test_atomic_save_and_swap_files(tmp_path: Path, watcher: PolicyWatcher,
                                    events: queue.Queue[ReloadEvent]) -> None:
    f = tmp_path / "p.yaml"
    write(f, V1)
    watcher.watch(str(f))
    write(tmp_path / ".p.yaml.swp", "garbage: [")  # vim's swap file
    write(tmp_path / "p.yaml~", V3)  # a backup copy
    tmp = tmp_path / ".p.yaml.tmp123"
    write(tmp, V2)
    os.replace(tmp, f)
    got = collect(events)
    assert [(e.status, patience(e)) for e in got] == [("changed", 7)]


def test_delete_and_recreate_is_one_reload(tmp_path: Path, watcher: PolicyWatcher,
                                           events: queue.Queue[ReloadEvent]) -> None:
    f = tmp_path / "p.yaml"
    write(f, V1)
    watcher.watch(str(f))
    f.unlink()
    write(f, V2)
    got = collect(events)
    assert [(e.status, patience(e)) for e in got] == [("changed", 7)]


def test_deleted_file_is_reported_missing_then_reloaded_when_back(
        tmp_path: Path, watcher: PolicyWatcher, events: queue.Queue[ReloadEvent]) -> None:
    f = tmp_path / "p.yaml"
    write(f, V1)
    watcher.watch(str(f))
    f.unlink()
    assert [e.status for e in collect(events)] == ["missing"]
    write(f, V3)
    got = collect(events)
    assert [(e.status, patience(e)) for e in got] == [("changed", 9)]


def test_a_file_gone_is_reported_once_and_back_even_unchanged(
        tmp_path: Path, watcher: PolicyWatcher, events: queue.Queue[ReloadEvent]) -> None:
    """An adversarial pass's find: past the first check, a deletion was delivered twice
    (its event's read, then the check's, which saw the stat go). And a file back with
    the bytes it had is news: the controller was told it went."""
    f = tmp_path / "p.yaml"
    write(f, V1)
    watcher.watch(str(f))
    until(lambda: "sig" in watcher._files[str(f)], "the first check")
    f.unlink()
    got = [events.get(timeout=10)]
    until(lambda: watcher._files[str(f)]["sig"] is None, "a check that saw it gone")
    with contextlib.suppress(queue.Empty):  # the check's read, were it delivered
        got.append(events.get(timeout=QUIET_S))
    assert [e.status for e in got] == ["missing"]
    write(f, V1)
    assert [(e.status, patience(e)) for e in collect(events)] == [("changed", 5)]


def until(condition: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def test_broken_edit_is_reported_with_file_and_line(
        tmp_path: Path, watcher: PolicyWatcher, events: queue.Queue[ReloadEvent]) -> None:
    f = tmp_path / "p.yaml"
    write(f, V1)
    watcher.watch(str(f))
    write(f, BROKEN)
    got = collect(events)
    assert [e.status for e in got] == ["invalid"]
    assert got[0].error == f"{f}:4: patience: must be >= 0, but got -1"


def test_symlinked_file_follows_the_target(tmp_path: Path, watcher: PolicyWatcher,
                                           events: queue.Queue[ReloadEvent]) -> None:
    real_dir = tmp_path / "real"
    real_dir.mkdir()
    target = real_dir / "policy.yaml"
    write(target, V1)
    link = tmp_path / "link.yaml"
    link.symlink_to(target)
    watcher.watch(str(link))
    write(target, V2)
    got = collect(events)
    assert [(e.status, e.path, patience(e)) for e in got] == [("changed", str(link), 7)]


def test_unchanged_content_is_not_reloaded_but_poke_forces(
        tmp_path: Path, watcher: PolicyWatcher, events: queue.Queue[ReloadEvent]) -> None:
    f = tmp_path / "p.yaml"
    write(f, V1)
    watcher.watch(str(f), sha256=None)
    write(f, V2)
    assert [patience(e) for e in collect(events)] == [7]
    write(f, V2)  # same bytes again
    with pytest.raises(queue.Empty):
        events.get(timeout=QUIET_S)
    watcher.poke(str(f))
    got = collect(events)
    assert [(e.forced, patience(e)) for e in got] == [(True, 7)]


def test_unwatched_file_is_quiet(tmp_path: Path, watcher: PolicyWatcher,
                                 events: queue.Queue[ReloadEvent]) -> None:
    f = tmp_path / "p.yaml"
    write(f, V1)
    watcher.watch(str(f))
    watcher.unwatch(str(f))
    write(f, V2)
    with pytest.raises(queue.Empty):
        events.get(timeout=QUIET_S)
    assert watcher.watched() == []


def test_a_second_run_on_an_older_version_is_brought_up_to_date(
        tmp_path: Path, watcher: PolicyWatcher, events: queue.Queue[ReloadEvent]) -> None:
    """Two runs watch one file; the second started from bytes read before an edit. The
    watcher must deliver the file's content (the controller skips runs already on it),
    not drop it as "same bytes as the version in use"."""
    import hashlib

    f = tmp_path / "p.yaml"
    write(f, V2)
    watcher.watch(str(f), hashlib.sha256(V2.encode()).hexdigest())  # the first run, on V2
    watcher.watch(str(f), hashlib.sha256(V1.encode()).hexdigest())  # a late hello, on V1
    got = collect(events)
    assert [(e.status, patience(e)) for e in got] == [("changed", 7)]


def test_a_run_back_from_its_checkpoint_gets_the_edits_made_while_none_watched(
        tmp_path: Path, watcher: PolicyWatcher, events: queue.Queue[ReloadEvent]) -> None:
    """A review's find: a run evicted (its file's only watcher) and back from its
    checkpoint was watched with its old version's hash, and the edit made meanwhile
    was never read; the same bytes are nothing to deliver."""
    import hashlib

    f = tmp_path / "p.yaml"
    write(f, V2)  # edited while nothing watched it
    watcher.watch(str(f), hashlib.sha256(V1.encode()).hexdigest())
    assert [(e.status, patience(e)) for e in collect(events)] == [("changed", 7)]
    g = tmp_path / "q.yaml"
    write(g, V1)
    watcher.watch(str(g), hashlib.sha256(V1.encode()).hexdigest())
    with pytest.raises(queue.Empty):
        events.get(timeout=QUIET_S)


def test_a_file_written_without_pause_is_still_read(
        tmp_path: Path, watcher: PolicyWatcher, events: queue.Queue[ReloadEvent]) -> None:
    """An adversarial pass's find: writes under the debounce apart (a script rewriting the
    file in a loop) were never read while they went on: 2 274 writes in 8 s, no reload."""
    f = tmp_path / "p.yaml"
    write(f, V1)
    watcher.watch(str(f))
    deadline = time.monotonic() + 20  # (a hang guard: the old watcher waited for quiet)
    n = 0
    while events.empty() and time.monotonic() < deadline:
        n += 1
        write(f, V2 if n % 2 else V1 + f"# {n}\n")
        time.sleep(0.03)
    assert not events.empty(), f"no reload during {n} writes"


def test_a_file_that_parses_slowly_is_read_a_tenth_of_the_time_at_most(
        tmp_path: Path, watcher: PolicyWatcher, events: queue.Queue[ReloadEvent],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """An adversarial pass's find: a hostile policy rewritten every 0.2 s (each parse up
    to 0.4 s of pure Python, sharing the interpreter with the controller's loop) took
    the controller to 61 % of a core. A file is now read again no sooner than nine times
    its last read took; its last version is still read."""
    import hashlib

    from lrctl import reload as reload_module

    real, reads = reload_module.read_policy_file, []

    def slow(path: str, unless: str | None = None) -> ReloadEvent:
        event = real(path, unless)
        if event.status != "unchanged":  # (the bytes it knows are not parsed again)
            reads.append(path)
            time.sleep(0.2)  # a text that takes 0.2 s to parse
        return event

    monkeypatch.setattr(reload_module, "read_policy_file", slow)
    f = tmp_path / "p.yaml"
    write(f, V1)
    watcher.watch(str(f))
    writes = 12
    for n in range(writes):  # each past the debounce: each was read before
        write(f, V1 + f"# {n}\n")
        time.sleep(0.3)
    write(f, V2)
    want = hashlib.sha256(V2.encode()).hexdigest()
    got = [events.get(timeout=30)]
    while got[-1].sha256 != want:
        got.append(events.get(timeout=30))  # the last version comes, in the end
    assert len(reads) <= writes // 2, len(reads)


def test_a_fifo_at_the_policy_path_does_not_hang_the_watcher(
        tmp_path: Path, watcher: PolicyWatcher, events: queue.Queue[ReloadEvent]) -> None:
    f = tmp_path / "p.yaml"
    write(f, V1)
    watcher.watch(str(f))
    f.unlink()
    os.mkfifo(f)  # nobody will ever write to it: a blocking open would never return
    got = collect(events)
    assert got[-1].status == "invalid" and "not a regular file" in (got[-1].error or "")
    f.unlink()
    write(f, V2)  # the watcher is still alive and reloads the real file
    assert [(e.status, patience(e)) for e in collect(events)] == [("changed", 7)]


def test_a_directory_at_the_policy_path_is_refused_without_leaking_a_descriptor(
        tmp_path: Path) -> None:
    """An adversarial pass's find: each read of a directory at a watched path (a watcher
    event, ``lrctl reload``) left one descriptor open in the controller."""
    f = tmp_path / "p.yaml"
    f.mkdir()
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(50):
        got = read_policy_file(str(f))
        assert got.status == "invalid" and "not a regular file" in (got.error or "")
    assert len(os.listdir("/proc/self/fd")) == before


def test_a_replaced_directory_is_watched_anew(tmp_path: Path, watcher: PolicyWatcher,
                                             events: queue.Queue[ReloadEvent]) -> None:
    """An adversarial pass's find: after `rm -rf dir; mkdir dir` (or the directory moved
    away and made again) the watch followed the old directory: the first file written
    was seen, later edits never."""
    import shutil

    d = tmp_path / "policies"
    d.mkdir()
    f = d / "p.yaml"
    write(f, V1)
    watcher.watch(str(f))
    shutil.rmtree(d)
    d.mkdir()
    write(f, V2)
    assert [patience(e) for e in collect(events) if e.status == "changed"] == [7]
    write(f, V3)  # the edit after the replacement
    assert [patience(e) for e in collect(events) if e.status == "changed"] == [9]
    d.rename(tmp_path / "old")
    d.mkdir()
    write(f, V1)
    assert [patience(e) for e in collect(events) if e.status == "changed"] == [5]


def test_a_swapped_directory_symlink_is_followed(tmp_path: Path, watcher: PolicyWatcher,
                                                events: queue.Queue[ReloadEvent]) -> None:
    """A release symlink (current -> v1) swapped atomically to v2: the file is read from
    v2, and v2's edits are followed (they were never seen)."""
    for name, text in (("v1", V1), ("v2", V2)):
        (tmp_path / name).mkdir()
        write(tmp_path / name / "p.yaml", text)
    current = tmp_path / "current"
    current.symlink_to(tmp_path / "v1")
    watcher.watch(str(current / "p.yaml"))
    (tmp_path / "next").symlink_to(tmp_path / "v2")
    os.replace(tmp_path / "next", current)
    assert [patience(e) for e in collect(events) if e.status == "changed"] == [7]
    write(tmp_path / "v2" / "p.yaml", V3)
    assert [patience(e) for e in collect(events) if e.status == "changed"] == [9]


class _Counting(reload_mod._Handler):
    """The watcher's own handler, counting what watchdog hands it, by path."""

    def __init__(self, inbox: queue.SimpleQueue[str | None]) -> None:
        super().__init__(inbox)
        self.seen: list[str] = []
        self.marked = threading.Event()

    def on_any_event(self, event: FileSystemEvent) -> None:
        self.seen.append(os.path.basename(os.fsdecode(event.src_path)))
        if os.fsdecode(event.dest_path or event.src_path).endswith("marker"):
            self.marked.set()
        super().on_any_event(event)


def test_a_busy_neighbour_wakes_nothing(tmp_path: Path, watcher: PolicyWatcher) -> None:
    """A training log appended beside the policy and a data file read there over and over
    cost the controller 31-84 % of a core: every open, read and append was an event
    that watchdog handled in Python. Only what can change a name's content is asked for."""
    counting = _Counting(watcher._inbox)
    watcher._handler = counting
    f = tmp_path / "p.yaml"
    write(f, V1)
    watcher.watch(str(f))

    def settled() -> None:  # every event before this one has been handed over
        counting.marked.clear()
        (tmp_path / "marker.tmp").write_text("")
        os.replace(tmp_path / "marker.tmp", tmp_path / "marker")
        assert counting.marked.wait(10)

    write(tmp_path / "data.bin", "x" * 100)
    with open(tmp_path / "train.log", "a", buffering=1) as log:
        log.write("start\n")
        settled()
        counting.seen.clear()
        for i in range(300):
            log.write(f"step {i}\n")
            (tmp_path / "data.bin").read_bytes()
        settled()
        seen = list(counting.seen)  # (the log's close, below, is a write's close: an event)
    assert not {"data.bin", "train.log"} & set(seen), seen[:20]


def test_a_write_no_event_announces_is_read_within_a_check(tmp_path: Path) -> None:
    """The stat check is the backstop for what inotify does not say: a write through a
    descriptor still open, an overflowed event queue, a network file system. Here the
    observer says nothing at all."""

    class Deaf:
        def schedule(self, *args: object, **kwargs: object) -> object:
            return object()

        def unschedule(self, watch: object) -> None:
            pass

        def start(self) -> None:
            pass

        def stop(self) -> None:
            pass

        def is_alive(self) -> bool:
            return False

    events: queue.Queue[ReloadEvent] = queue.Queue()
    f = tmp_path / "p.yaml"
    write(f, V1)
    with PolicyWatcher(events.put, debounce_s=0.1, observer_factory=Deaf) as watcher:
        # No version given, so nothing is read at watch(): an adversarial pass's find was
        # that the first check took a write made before it for what was watched.
        watcher.watch(str(f))
        with open(f, "r+") as held:  # the same size: only the stat's times tell
            held.write(V2)
            held.flush()
            got = events.get(timeout=10)
            assert (got.status, patience(got)) == ("changed", 7)
            held.seek(0)
            held.write(V3)
            held.flush()
            got = events.get(timeout=10)
            assert (got.status, patience(got)) == ("changed", 9)


@pytest.mark.parametrize(("seen", "now", "written", "read"), [
    (None, (1, 2, 3), -100.0, False),       # first check: written long before watch()
    (None, (1, 2, 3), 0.3, True),           # first check: written after watch()
    ((1, 2, 3), (1, 2, 3), -100.0, False),  # unchanged, written long before the last look
    ((1, 2, 3), (1, 2, 3), -0.5, True),     # unchanged, but within a tick of the last look
    ((1, 2, 3), (1, 2, 3), 5.0, True),      # unchanged stat, written after the last look
    ((1, 2, 3), (1, 2, 4), -100.0, True),   # changed
    ((1, 2, 3), None, -100.0, True),        # deleted
])
def test_which_stats_the_check_reads(seen: tuple[int, ...] | None,
                                     now: tuple[int, ...] | None, written: float,
                                     read: bool) -> None:
    """``written``: the file's mtime, in seconds after the last look (or watch())."""
    last_look, looked_at = 1_000_000.0, 1_000_010.0  # (a check may come late)
    entry: dict[str, object] = {"since": last_look}
    mtime = int((last_look + written) * 1e9)
    if seen is not None:
        entry["sig"] = (*seen, mtime, 0)
    sig = None if now is None else (*now, mtime, 0)
    assert _watched.changed_since_check(entry, sig, looked_at) is read
    assert entry["sig"] == sig and entry["since"] == looked_at


_STORM = """
import os, sys
d = sys.argv[1]
print("storming", flush=True)
n = 0
while True:
    n += 1
    p = os.path.join(d, f"tmp{n % 64}")
    open(p, "w").close()
    os.unlink(p)
"""


def test_an_edit_is_read_during_a_storm_of_neighbour_events(
        tmp_path: Path, watcher: PolicyWatcher, events: queue.Queue[ReloadEvent]) -> None:
    """An adversarial pass's find: with 300 files watched in a directory where temp files
    were made and removed flat out, no edit was read at all while it went on (the
    watcher's thread drained events without end, each a scan of every watched file)."""
    files = [tmp_path / f"p{i}.yaml" for i in range(300)]
    for f in files:
        write(f, V1)
        watcher.watch(str(f), read_policy_file(str(f)).sha256)
    storm = subprocess.Popen([sys.executable, "-c", _STORM, str(tmp_path)],
                             stdout=subprocess.PIPE, text=True)
    try:
        assert storm.stdout is not None and storm.stdout.readline() == "storming\n"
        write(files[7], V2)
        got = events.get(timeout=60)
        assert (got.path, got.status, patience(got)) == (str(files[7]), "changed", 7)
    finally:
        storm.kill()
        storm.wait()


def test_a_watch_during_a_read_of_the_known_version_gets_the_file_delivered(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A review's find: a second run on another version watching the file while a read of
    the known version was in flight had the read delivered as "unchanged" (a failed reload
    for every run on the file), and the file's version was never delivered to it."""
    f = tmp_path / "p.yaml"
    write(f, V1)
    sha1 = read_policy_file(str(f)).sha256
    real = reload_mod.read_policy_file
    entered, release = threading.Event(), threading.Event()

    def gated(path: str, unless: str | None = None) -> ReloadEvent:
        if unless is not None and not entered.is_set():  # the read of the known version
            entered.set()
            release.wait(10)
        return real(path, unless)

    monkeypatch.setattr(reload_mod, "read_policy_file", gated)
    events: queue.Queue[ReloadEvent] = queue.Queue()
    with PolicyWatcher(events.put, debounce_s=0.05) as watcher:
        watcher.watch(str(f), sha1)  # read once at watch(), knowing sha1: held in gated
        assert entered.wait(10)
        watcher.watch(str(f), "0" * 64)  # another run, on another version, meanwhile
        release.set()
        got = collect(events)
    assert [(e.status, e.sha256) for e in got] == [("changed", sha1)]


def test_a_check_never_puts_off_a_read_already_due(tmp_path: Path,
                                                    events: queue.Queue[ReloadEvent]) -> None:
    """Found by ``lrctl bench reload``: an edit a check saw within the debounce after its
    event was read a whole debounce later (its p99 went from 157 to ~280 ms)."""
    f = tmp_path / "p.yaml"
    write(f, V1)
    with PolicyWatcher(events.put, debounce_s=1.5) as watcher:  # (under MAX_DEBOUNCE_S)
        # The edit's event is handed over here, by this thread: a write is several events
        # (truncate, write, close), each putting the read off a little, and the watcher's
        # thread took the last of them between the read of ``due`` and the assert below.
        watcher._handler = FileSystemEventHandler()  # (hears nothing)
        watcher.watch(str(f))
        until(lambda: "sig" in watcher._files[str(f)], "the first check")
        write(f, V2)
        watcher._touched({str(f)})  # the edit's event
        due = watcher._due[str(f)]
        watcher._check_dirs()  # it sees the edit too
        assert watcher._due[str(f)] == due
