"""attach(spawn=True) starts a controller when none answers; a second run reuses it."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from daemon_helpers import ControllerProc

import lrctl
from lrctl import _spawn, client, paths


def test_spawn_starts_one_controller_and_a_second_run_reuses_it(reap_spawned: None) -> None:
    opt = torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=0.1)
    with lrctl.attach(opt, sync=True) as first:
        first.step(1.0)
        assert first.connected
        pid = client.request({"t": "status"})["pid"]
        assert pid == _spawn.spawned[-1].pid
        assert os.getsid(pid) == pid  # its own process session
        other = torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=0.1)
        with lrctl.attach(other, sync=True) as second:  # (one hook per optimizer)
            second.step(1.0)
            assert client.request({"t": "status"})["runs"] == 2
        assert len(_spawn.spawned) == 1 or _spawn.spawned[-1].pid == pid
    state = os.environ["LRCTL_STATE_DIR"]
    assert os.path.exists(os.path.join(state, "controller.log"))


def test_a_second_serve_on_a_live_socket_refuses_clearly(controller: ControllerProc) -> None:
    out = subprocess.run([sys.executable, "-m", "lrctl", "serve", "--foreground", "--no-audit",
                          "--socket", controller.socket, "--state-dir", controller.state_dir],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 3
    assert f"pid {controller.pid}" in out.stderr and "already serving" in out.stderr
    assert client.request({"t": "status"})["pid"] == controller.pid


def test_a_second_serve_on_the_same_state_dir_refuses_clearly(
        controller: ControllerProc, short_dir) -> None:  # type: ignore[no-untyped-def]
    """Another socket, the same state directory: it would restore the first one's runs
    from their checkpoints and end them when no hook came. It refuses, naming the holder,
    and leaves no socket behind."""
    other = str(short_dir / "run" / "other.sock")
    out = subprocess.run([sys.executable, "-m", "lrctl", "serve", "--foreground", "--no-audit",
                          "--socket", other, "--state-dir", controller.state_dir],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 3, out.stderr
    assert f"pid {controller.pid}" in out.stderr and "state directory" in out.stderr
    assert not os.path.exists(other)
    assert client.request({"t": "status"})["pid"] == controller.pid


def test_attach_on_another_socket_beside_the_default_controller_gets_its_own(
        controller: ControllerProc, short_dir, reap_spawned: None,  # type: ignore[no-untyped-def]
        private_cwd: None) -> None:
    """attach(socket=...) with no controller there starts one beside the default one, with
    a state directory of its own inside the default's: both serve, neither restores (nor
    ends) the other's runs."""
    other = str(short_dir / "run" / "mine.sock")
    opt = torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=0.1)
    with lrctl.attach(opt, sync=True, run_name="beside") as ctl:
        ctl.step(1.0)
        assert ctl.connected
        second = torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=0.1)
        with lrctl.attach(second, sync=True, socket=other, run_name="own") as mine:
            mine.step(1.0)
            assert mine.connected
            status = client.request({"t": "status"}, other)
            assert status["pid"] == _spawn.spawned[-1].pid != controller.pid
            assert status["runs"] == 1
            base = os.environ["LRCTL_STATE_DIR"]
            assert os.path.dirname(status["state_dir"]) == os.path.join(base, "sockets")
            assert os.path.basename(status["state_dir"]).startswith("mine-")
            assert os.stat(os.path.join(base, "sockets")).st_mode & 0o777 == 0o700
        assert client.request({"t": "status"})["runs"] == 1  # the default one's own run


def test_a_second_default_socket_serves_from_its_own_state_dir(
        controller: ControllerProc, short_dir, monkeypatch: pytest.MonkeyPatch,
        reap_spawned: None) -> None:  # type: ignore[no-untyped-def]
    """Another environment's default socket (a job with its own LRCTL_SOCKET, a session
    without XDG_RUNTIME_DIR), the same state directory, held by a live controller: the new
    controller serves from its socket's own directory rather than refusing, and keeps it."""
    monkeypatch.chdir(short_dir)  # the MLflow store of the run goes there
    other = str(short_dir / "run" / "job.sock")
    monkeypatch.setenv("LRCTL_SOCKET", other)
    assert paths.state_dir(socket=other) == paths.state_dir()  # by the rule: the shared one
    opt = torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=0.1)
    with lrctl.attach(opt, sync=True, run_name="job") as ctl:
        ctl.step(1.0)
        assert ctl.connected
        status = client.request({"t": "status"}, other)
        assert status["pid"] != controller.pid
        assert status["state_dir"] == str(paths.own_state_dir(other))
    log = (paths.own_state_dir(other) / "controller.log").read_text()
    assert f"pid {controller.pid}" in log and "keeps its state in" in log
    # It exists now, so this socket's controller uses it from now on, first or not.
    assert paths.state_dir(socket=other) == paths.own_state_dir(other)


def test_a_filesystem_without_locks_is_served_unlocked(short_dir,  # type: ignore[no-untyped-def]
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """flock failing with ENOLCK (NFS mounted nolock) takes no lock, leaks no descriptor."""
    import errno
    import fcntl

    from lrctl.daemon import listening

    def no_locks(fd: int, op: int) -> None:
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    before = len(os.listdir("/proc/self/fd"))
    assert listening.take_lock(short_dir / "x.lock") is None
    assert len(os.listdir("/proc/self/fd")) == before


def test_serve_detach_backgrounds_and_stops_on_sigterm(short_dir) -> None:  # type: ignore[no-untyped-def]
    import signal
    import time

    out = subprocess.run([sys.executable, "-m", "lrctl", "serve", "--detach", "--no-audit"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    deadline = time.monotonic() + 60
    while True:
        try:
            pid = client.request({"t": "status"}, timeout=1.0)["pid"]
            break
        except OSError:
            assert time.monotonic() < deadline, out.stdout
            time.sleep(0.05)
    assert f"pid {pid}" in out.stdout
    os.kill(pid, signal.SIGTERM)
    while os.path.exists(os.environ["LRCTL_SOCKET"]):  # removed on a clean shutdown
        assert time.monotonic() < deadline
        time.sleep(0.05)
    while os.path.exists(f"/proc/{pid}"):
        assert time.monotonic() < deadline
        time.sleep(0.05)


def test_a_controller_that_dies_is_replaced_and_the_run_resumes(reap_spawned: None) -> None:
    """A week-long job outlives its controller: the hook starts a new one itself."""
    import signal
    import time

    policy = "version: 1\npolicies:\n  - kind: plateau\n    patience: 3\n    factor: 0.5\n"
    opt = torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=0.1)
    engine = lrctl.load_policy(policy, [0.1])
    with pytest.warns(RuntimeWarning) as seen, lrctl.attach(opt, policy=policy,
                                                          sync=True) as ctl:
        for t in range(5):
            ctl.step(1.0, grad_norm=1.0)
            engine.observe(step=t, loss=1.0, grad_norm=1.0)
        first = _spawn.spawned[-1]
        os.kill(first.pid, signal.SIGKILL)
        first.wait(10)
        deadline = time.monotonic() + 120
        t = 5
        while not (ctl.connected and len(_spawn.spawned) > 1):
            assert time.monotonic() < deadline, "no new controller took over"
            ctl.step(1.0, grad_norm=1.0)  # training goes on meanwhile, at the last LR
            engine.observe(step=t, loss=1.0, grad_norm=1.0)
            t += 1
            time.sleep(0.05)
        for _ in range(5):  # the replayed history makes the decisions of an unbroken run
            ctl.step(1.0, grad_norm=1.0)
            engine.observe(step=t, loss=1.0, grad_norm=1.0)
            t += 1
        assert ctl.lr == engine.lrs
        assert client.request({"t": "status"})["pid"] == _spawn.spawned[-1].pid
    # Said once, at the script's line (it was lrctl's own), naming the new controller.
    said = [w for w in seen if "started one (pid" in str(w.message)]
    assert len(said) == 1 and said[0].filename == __file__
    assert f"pid {_spawn.spawned[-1].pid}" in str(said[0].message)


def test_serve_stays_in_the_foreground_and_lrctl_stop_stops_it(short_dir) -> None:  # type: ignore[no-untyped-def]
    from live_controller import wait_until_serving

    log = short_dir / "serve.out"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "lrctl", "serve", "--no-audit"],
                                stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_until_serving(proc, os.environ["LRCTL_SOCKET"], log)  # it is the controller
        stop = subprocess.run([sys.executable, "-m", "lrctl", "stop"], capture_output=True,
                              text=True, timeout=60)
        assert stop.returncode == 0, stop.stderr
        assert f"pid {proc.pid}" in stop.stdout and "stopped (no runs held)" in stop.stdout
        assert "still connected" not in stop.stdout
        assert proc.wait(30) == 0
        assert "listening on" in log.read_text()  # it logged to stderr, in the foreground
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    again = subprocess.run([sys.executable, "-m", "lrctl", "stop"], capture_output=True,
                           text=True, timeout=60)
    assert again.returncode == 1 and "no controller answers" in again.stderr


def test_stop_says_which_runs_it_holds_and_that_connected_hooks_may_start_another(
        controller: ControllerProc) -> None:
    opt = torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=0.1)
    with lrctl.attach(opt, sync=True, spawn=False) as ctl:
        ctl.step(1.0, grad_norm=1.0)
        stop = subprocess.run([sys.executable, "-m", "lrctl", "stop"], capture_output=True,
                              text=True, timeout=60)
        assert stop.returncode == 0, stop.stderr
        assert "(1 run(s) held, each resumable from its checkpoint)" in stop.stdout
        assert "1 hook(s) were still connected" in stop.stdout and "spawn=True" in stop.stdout


@pytest.mark.parametrize("value", ["-5", "nan", "inf", "soon"])
def test_serve_refuses_a_session_timeout_that_is_not_seconds(value: str) -> None:
    out = subprocess.run([sys.executable, "-m", "lrctl", "serve", "--session-timeout", value],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "--session-timeout" in out.stderr


def test_idle_exit_ends_a_controller_once_its_hooks_are_gone(make_controller) -> None:  # type: ignore[no-untyped-def]
    ctl_proc = make_controller(["--idle-exit", "1"], start=False)
    # Made before the controller starts: a process's first optimizer imports parts of torch
    # (over a second on a slow machine), and the controller would be idle that long.
    opt = torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=0.1)
    ctl_proc.start()
    with lrctl.attach(opt, sync=True, spawn=False) as ctl:
        for _ in range(3):
            ctl.step(1.0, grad_norm=1.0)
        # Connected for several idle periods: it stays up (the check is on hooks, not time).
        until = time.monotonic() + 2.5
        while time.monotonic() < until:
            assert ctl_proc.proc.poll() is None
            ctl.step(1.0, grad_norm=1.0)
            time.sleep(0.1)
    assert ctl_proc.proc.wait(60) == 0  # then exits by itself, cleanly
    assert "no hook has been connected" in ctl_proc.log.read_text()


def test_a_controller_that_cannot_start_ends_the_wait_and_the_warning_says_why(
        short_dir, reap_spawned: None, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    """A socket in a directory other users may write to: the controller attach() starts
    refuses it and exits (status 2). The hook stops waiting for it then: not after
    spawn_timeout, nor after the grace left for another controller to answer (only
    for status 3, another one holds the socket: here a grace past the test's timeout),
    and its warning carries the controller's own words and where its output is."""
    monkeypatch.setattr(_spawn, "EXITED_GRACE_S", 3600.0)
    shared = short_dir / "shared"
    shared.mkdir()
    os.chmod(shared, 0o1777)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=0.1)
    with pytest.warns(RuntimeWarning, match="no controller answers") as seen:
        ctl = lrctl.attach(opt, socket=str(shared / "c.sock"), spawn_timeout=600.0)
    try:
        message = str(seen[0].message)
        assert "exited with status 2" in message  # not "did not answer within 600 s"
        assert "writable by other users" in message and "controller.out" in message
        assert _spawn.spawned[-1].poll() is not None
        ctl.step(1.0)  # and training goes on
        opt.step()
    finally:
        ctl.close()


def test_a_respawn_that_fails_too_is_said_and_no_checkpoint_is_promised(
        short_dir, reap_spawned: None, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    """A run no controller ever served: the respawn's warning says the run starts once
    one answers (there is no checkpoint to go on from), and when that controller fails
    as well, the next respawn says so, with its words."""
    import time

    from lrctl import _link

    shared = short_dir / "shared"
    shared.mkdir()
    os.chmod(shared, 0o1777)  # every controller started on it refuses it (status 2)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=0.1)
    with pytest.warns(RuntimeWarning, match="no controller answers"):
        ctl = lrctl.attach(opt, socket=str(shared / "c.sock"))
    monkeypatch.setattr(_link, "RESPAWN_AFTER_S", 0.0)
    monkeypatch.setattr(_link, "RESPAWN_EVERY_S", 0.0)
    try:
        with pytest.warns(RuntimeWarning) as seen:
            deadline = time.monotonic() + 120
            while not any("exited with status 2" in str(w.message) for w in seen):
                assert time.monotonic() < deadline, [str(w.message) for w in seen]
                for proc, _, _ in _spawn._respawned.values():  # its end is said next time
                    proc.wait(60)
                ctl.step(1.0)
                opt.step()
                time.sleep(0.05)  # (the hook's back-off between attempts, 0.1 s)
        said = [str(w.message) for w in seen if "started one (pid" in str(w.message)]
        assert said and all("the run starts once it answers" in m for m in said)
        assert not any("checkpoint" in m for m in said)
        assert "writable by other users" in said[-1]
    finally:
        ctl.close()


def test_a_state_dir_the_hook_cannot_use_fails_open_and_says_why(
        short_dir, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    """The state directory is writable by others: no controller is started (its files
    would not be safe there), attach() does not raise, and the warning says why."""
    state = short_dir / "shared-state"
    state.mkdir()
    os.chmod(state, 0o770)
    monkeypatch.setenv("LRCTL_STATE_DIR", str(state))
    before = len(_spawn.spawned)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=0.1)
    with pytest.warns(RuntimeWarning, match="no controller could be started") as seen:
        ctl = lrctl.attach(opt)
    try:
        assert "writable by other users" in str(seen[0].message)
        assert len(_spawn.spawned) == before
        ctl.step(1.0)
        opt.step()
        assert opt.param_groups[0]["lr"] == 0.1
    finally:
        ctl.close()


def test_a_shared_state_dir_others_may_write_to_is_refused_for_every_socket(
        short_dir, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    """A controller on another socket keeps its state inside the shared directory: that one
    (and sockets/) must be private too, or another user could swap sockets/ for theirs."""
    state = short_dir / "shared-state"
    state.mkdir()
    os.chmod(state, 0o770)
    monkeypatch.setenv("LRCTL_STATE_DIR", str(state))
    opt = torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=0.1)
    with pytest.warns(RuntimeWarning, match="no controller could be started") as seen:
        ctl = lrctl.attach(opt, socket=str(short_dir / "run" / "mine.sock"))
    try:
        assert "writable by other users" in str(seen[0].message)
        assert not (state / "sockets").exists()
    finally:
        ctl.close()


def _serve_until_answering(env: dict[str, str], socket: str) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen([sys.executable, "-m", "lrctl", "serve", "--foreground",
                             "--no-audit"], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while True:
        try:
            client.request({"t": "status"}, socket, timeout=1.0)
            return proc
        except OSError:
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)


def test_environments_taking_turns_never_share_the_state_dir(short_dir) -> None:  # type: ignore[no-untyped-def]
    """One environment's default controller claims the shared state directory (its socket
    recorded there); another environment's, with its own LRCTL_SOCKET, serves from its own
    even when the first is not running: it never restores (and ends) the first one's runs."""
    import signal

    first = os.environ["LRCTL_SOCKET"]
    base = paths.state_dir()
    proc = _serve_until_answering(dict(os.environ), first)
    try:
        assert client.request({"t": "status"}, first)["state_dir"] == str(base)
        assert paths.state_owner(base) == os.path.realpath(first)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    second = str(short_dir / "run" / "b.sock")
    env = {**os.environ, "LRCTL_SOCKET": second}
    assert paths.state_dir(env, socket=second) == paths.own_state_dir(second, env)
    proc = _serve_until_answering(env, second)
    try:
        assert client.request({"t": "status"}, second)["state_dir"] == str(
            paths.own_state_dir(second, env))
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    assert paths.state_dir(socket=first) == base  # the first one's, still


def test_runs_all_shows_a_run_live_on_another_sockets_controller(
        controller: ControllerProc, short_dir, reap_spawned: None,  # type: ignore[no-untyped-def]
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """`lrctl runs --all` with no flags: a run served by the controller of another socket
    is live (that controller's lock names its socket), not "detached"."""
    import json

    from lrctl.cli import main

    monkeypatch.chdir(short_dir)  # the MLflow store of the run goes there
    other = str(short_dir / "run" / "far.sock")
    opt = torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=0.1)
    with lrctl.attach(opt, sync=True, socket=other, run_name="far") as ctl:
        for _ in range(3):
            ctl.step(1.0, grad_norm=1.0)
        assert ctl.connected
        assert paths.state_dir_socket(paths.own_state_dir(other)) == other
        assert main(["runs", "--all", "--json"]) == 0
        (far,) = [r for r in json.loads(capsys.readouterr().out) if r["run_name"] == "far"]
        assert far["state"] == "live" and far["state_dir"] == str(paths.own_state_dir(other))


def test_the_shared_state_dir_deleted_under_its_owner_stays_its_own(short_dir) -> None:  # type: ignore[no-untyped-def]
    """The owner file went with the directory: before, the controller made the directory
    and its lock again but not the file, so another environment's controller could
    claim it and restore this one's detached runs."""
    import signal

    sock = os.environ["LRCTL_SOCKET"]
    base = paths.state_dir()
    proc = _serve_until_answering(dict(os.environ), sock)
    try:
        assert paths.state_owner(base) == os.path.realpath(sock)
        shutil.rmtree(base)
        deadline = time.monotonic() + 60
        while paths.state_owner(base) != os.path.realpath(sock):
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        assert client.request({"t": "status"}, sock)["state_dir_recreated"]
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)


def test_state_dirs_are_absolute_and_runs_all_survives_an_impossible_socket(
        short_dir, monkeypatch: pytest.MonkeyPatch,  # type: ignore[no-untyped-def]
        capsys: pytest.CaptureFixture[str]) -> None:
    """A relative LRCTL_STATE_DIR listed every run twice in ``runs --all`` (the reported
    directory is absolute); a default socket past the Unix limit made it a traceback."""
    from lrctl.cli import main

    monkeypatch.chdir(short_dir)
    monkeypatch.setenv("LRCTL_STATE_DIR", "rel-state")
    assert paths.state_dir() == short_dir / "rel-state"
    monkeypatch.setenv("LRCTL_SOCKET", str(short_dir / ("s" * 120) / "c.sock"))
    assert main(["runs", "--all"]) == 0
    assert "no runs" in capsys.readouterr().out


def test_a_socket_that_once_fell_back_keeps_its_own_state_dir(short_dir) -> None:  # type: ignore[no-untyped-def]
    """The owner of the shared directory found it held once (an explicit --state-dir) and
    served from its own: its runs are there, and its log said "from now on". Its next
    start went back to the shared one and never restored them."""
    sock = os.environ["LRCTL_SOCKET"]
    base = paths.state_dir()
    paths.ensure_state_dir(base)
    paths.claim_state_dir(base, sock)
    assert paths.state_dir(socket=sock) == base
    own = paths.ensure_state_dir(paths.own_state_dir(sock))
    assert paths.state_dir(socket=sock) == own


def test_a_script_that_spawned_a_controller_exits_without_a_resource_warning(
        short_dir) -> None:  # type: ignore[no-untyped-def]
    """The controller outlives the training script by design: under ``-X dev -W error``
    (what careful users and test suites run with) the script's exit says nothing about
    the subprocess it leaves running."""
    script = (
        "import torch, lrctl\n"
        "from lrctl import _spawn\n"
        "w = torch.nn.Parameter(torch.ones(1))\n"
        "opt = torch.optim.SGD([w], lr=0.1)\n"
        "with lrctl.attach(opt, sync=True) as ctl:\n"
        "    loss = (w * 2).sum()\n"
        "    loss.backward()\n"
        "    ctl.step(loss)\n"
        "    opt.step()\n"
        "    assert ctl.connected\n"
        "print('pid', _spawn.spawned[-1].pid, flush=True)\n")
    out = subprocess.run([sys.executable, "-X", "dev", "-W", "error", "-c", script],
                         capture_output=True, text=True, timeout=120, env=os.environ.copy())
    pids = [int(line.split()[1]) for line in out.stdout.splitlines() if line.startswith("pid")]
    try:
        assert out.returncode == 0, out.stderr
        assert pids, out.stdout
        assert "ResourceWarning" not in out.stderr, out.stderr
        assert "Exception ignored" not in out.stderr, out.stderr
        os.kill(pids[0], 0)  # it is still serving (it would exit after --idle-exit)
    finally:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)


def test_serve_detach_reports_a_start_that_fails_after_the_fork(short_dir) -> None:  # type: ignore[no-untyped-def]
    """The background controller's start can fail after the socket is bound (here: its
    --log-file cannot be opened). `serve --detach` said "listening" and exited 0 while the
    controller was already gone; now it waits for the start and says why it failed."""
    log_file = short_dir / "missing" / "x.log"
    out = subprocess.run([sys.executable, "-m", "lrctl", "serve", "--detach", "--no-audit",
                          "--log-file", str(log_file)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2, (out.stdout, out.stderr)
    assert "listening" not in out.stdout
    assert str(log_file) in out.stderr and "No such file or directory" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert not os.path.exists(os.environ["LRCTL_SOCKET"])
