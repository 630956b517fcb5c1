"""CLI clients racing a daemon that is busy, frozen, reloading or exiting (engine/daemon/control.py request,
supervisor.py cmd_*): every path ends with one clear line and a documented exit code, never a traceback.

The interleavings are forced, not hoped for: the supervisor is frozen with SIGSTOP (its socket still listening,
so a client connects and then waits: control.request's timeout), its listen backlog is filled with connections
nobody accepts (a client's connect then waits too), and a `reload` client is frozen with SIGSTOP at a moment the
test checks (between two of its status polls: no socket open) while the supervisor it polls exits.  Real
processes and sockets; the daemon fixture of tests/test_supervisor.py removes every process and segment."""
from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time

import psutil
import pytest

from luaprobe.engine.daemon import control
from tests import helpers
from tests.test_supervisor import EXAMPLES, cli, daemon  # noqa: F401 - the fixture

CLIENTS = (("status",), ("status", "--json"), ("stop",), ("reload",), ("stats", "--json"))


def run_clients(d) -> list[tuple[tuple, int, str, str]]:
    """Every client command of CLIENTS at once against daemon ``d``: [(args, exit code, stdout, stderr)]."""
    procs = [(a, subprocess.Popen([sys.executable, "-m", "luaprobe.engine.daemon.cli", *a, "--run-dir", d.run_dir],
                                  cwd=helpers.REPO, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True)) for a in CLIENTS]
    done = [(a, helpers.finish(p, 120)) for a, p in procs]
    return [(a, p.returncode, *r) for (a, p), (_, r) in zip(procs, done)]


def fill_backlog(sock_path: str) -> list[socket.socket]:
    """Connect to ``sock_path`` (non-blocking) until its listen backlog is full (EAGAIN); the connections."""
    held = []
    for _ in range(4096):
        c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        c.setblocking(False)
        try:
            c.connect(sock_path)
        except BlockingIOError:
            c.close()
            return held
        held.append(c)
    raise AssertionError(f"{sock_path}: the backlog never filled ({len(held)} connections)")


@pytest.mark.parametrize("backlog_full", [False, True], ids=["no-reply", "backlog-full"])
def test_clients_of_a_frozen_supervisor_say_so_in_one_line(daemon, backlog_full):  # noqa: F811
    """SIGSTOP on the supervisor: status, stop, reload and stats each wait out their timeout and then print one
    line naming the supervisor's pid, the socket and its state T, exit 1 (docs/operations.md "Exit codes");
    `status` also shows the last saved state.  Before: `status` / `stop` / `reload` died with a TimeoutError
    traceback after 10 s, and with a full backlog every client died at once with BlockingIOError (EAGAIN)."""
    daemon.start()
    st = daemon.status()
    pid = st["supervisor_pid"]
    held = []
    os.kill(pid, signal.SIGSTOP)
    try:
        helpers.wait_for(lambda: psutil.Process(pid).status() == psutil.STATUS_STOPPED, 10)
        if backlog_full:
            held = fill_backlog(control.path(daemon.run_dir, control.SOCKET))
        t0 = time.monotonic()
        results = run_clients(daemon)
        took = time.monotonic() - t0
    finally:
        for c in held:
            c.close()
        os.kill(pid, signal.SIGCONT)
    sock = control.path(daemon.run_dir, control.SOCKET)
    for args, rc, out, err in results:
        assert "Traceback" not in err, (args, err)
        assert rc == 1, (args, rc, out, err)
        line = err.splitlines()[-1]
        assert len(err.splitlines()) == 1, (args, err)
        assert line.startswith(f"luaprobe {args[0]}: the supervisor (pid {pid}) on {sock} did not answer within"), \
            (args, line)
        assert "stopped (state T: SIGSTOP or a debugger)" in line, (args, line)
        assert ("its queue of requests stayed full" in line) == backlog_full, (args, line)
    assert took >= 10, took                    # each waited its 10 s, none failed at once
    by = {a: (out, err) for a, _, out, err in results}
    assert json.loads(by[("status", "--json")][0])["state"] == "not answering (last saved state: running)"
    assert by[("status",)][0].startswith("state:      not answering (last saved state: running)")
    assert ("the stop request stays queued" if not backlog_full else "nothing was asked of it") in by[("stop",)][1]
    if backlog_full:                           # no request got through: stop it now
        assert daemon.cli("stop").returncode == 0
    # thawed, it serves what stayed queued (the reload, the stop): it stops by itself
    assert helpers.wait_for(lambda: not psutil.pid_exists(pid) or
                            psutil.Process(pid).status() == psutil.STATUS_ZOMBIE, 90, 0.1)
    assert not daemon.alive() and not daemon.segments()


def socket_fds(pid: int) -> int:
    """Unix sockets ``pid`` has open now (a CLI client holds one only while a request is under way)."""
    n = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            n += os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:")
        except FileNotFoundError:
            pass
    return n


def test_a_reload_whose_supervisor_exits_while_it_polls_says_so(daemon):  # noqa: F811
    """`luaprobe reload` with changed settings polls status until the new fast path runs.  A supervisor that exits
    meanwhile (a `luaprobe stop` by someone else) left it with NotRunning from a poll: a traceback.  Forced: the
    fast path is frozen so the reload stays in state "reloading"; the reload client is frozen between two polls
    (checked: it got the reload reply, as the state says, and holds no socket); the daemon is stopped; the client
    is thawed.  It must print one line saying the supervisor exited during the reload, with its last state, exit 1."""
    daemon.start()
    st = daemon.status()
    fastpath = st["fastpath_pid"]
    text = open(daemon.config).read()
    open(daemon.config, "w").write(text.replace("drain_deadline = 5", "drain_deadline = 6"))   # a setting: restart
    os.kill(fastpath, signal.SIGSTOP)          # its graceful stop waits: the reload stays in "reloading"
    client = subprocess.Popen([sys.executable, "-m", "luaprobe.engine.daemon.cli", "reload", "--run-dir",
                               daemon.run_dir], cwd=helpers.REPO, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    with helpers.killed_when_left(client):
        try:
            state = lambda: (control.read_json(control.path(daemon.run_dir, control.STATE)) or {}).get("state")  # noqa: E731
            helpers.wait_for(lambda: state() == "reloading" or (client.poll() is not None and pytest.fail(str(client.communicate()))), 60, 0.01)

            def frozen_between_polls():
                os.kill(client.pid, signal.SIGSTOP)
                helpers.wait_for(lambda: psutil.Process(client.pid).status() == psutil.STATUS_STOPPED, 10, 0.001)
                if socket_fds(client.pid) == 0:
                    return True
                os.kill(client.pid, signal.SIGCONT)    # inside a request: let it finish, freeze it again
                time.sleep(0.01)
                return False
            helpers.wait_for(frozen_between_polls, 30, 0)
            stopper = subprocess.Popen([sys.executable, "-m", "luaprobe.engine.daemon.cli", "stop", "--run-dir",
                                        daemon.run_dir], cwd=helpers.REPO, stdin=subprocess.DEVNULL,
                                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            with helpers.killed_when_left(stopper):
                helpers.wait_for(lambda: state() == "stopping", 60, 0.01)
                os.kill(fastpath, signal.SIGCONT)   # the stop takes its graceful course
                helpers.finish(stopper, 90)
            assert stopper.returncode == 0, stopper.returncode
        finally:
            for p in (fastpath,):
                try:
                    os.kill(p, signal.SIGCONT)
                except ProcessLookupError:
                    pass
            os.kill(client.pid, signal.SIGCONT)
        out, err = helpers.finish(client, 60)
    assert "Traceback" not in err, err
    assert client.returncode == 1, (client.returncode, out, err)
    assert err.splitlines() == [f"luaprobe reload: the supervisor exited while the fast path restarted (state "
                                f"stopped; last error: -; log {control.path(daemon.run_dir, control.LOG)})"], err
    assert not daemon.alive() and not daemon.segments()


LOOPING = """
local f = io.open(%r, "w"); f:close()
local x = 0
while true do x = x + 1 end                        -- compiled: the hook budget's interrupt cannot reach it
TrisulPlugin = { id = { name = "never" }, engine_monitor = { onmetronome = function() end } }
"""

@contextlib.contextmanager
def reloading_into_a_looping_probe(daemon, tmp_path):  # noqa: F811
    """Start ``daemon`` with one engine_monitor plug-in and [fastpath] hook_budget = 0, rewrite the plug-in into
    LOOPING (a top level in a compiled endless loop) and run `luaprobe reload`; yields ``(reload, before)`` (the
    reload client's Popen, still waiting on the probe, and the status before it) once the probe is in its loop.
    The reload client is killed on the way out if it is still there."""
    plug = tmp_path / "plugins"
    plug.mkdir()
    script = plug / "monitor.lua"
    script.write_text('TrisulPlugin = { id = { name = "m" }, engine_monitor = { onmetronome = function() end } }\n')
    daemon.write_config(plugins=[plug])
    with open(daemon.config, "a") as f:
        f.write("[fastpath]\nhook_budget = 0\n")
    r = cli("start", "--config", daemon.config)
    assert r.returncode == 0, r.stderr
    daemon.pids.add(control.read_pid(daemon.run_dir))
    before = daemon.status()
    script.write_text(LOOPING % str(tmp_path / "looping"))
    reload = subprocess.Popen([sys.executable, "-m", "luaprobe.engine.daemon.cli", "reload", "--run-dir",
                               daemon.run_dir], cwd=helpers.REPO, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    with helpers.killed_when_left(reload):
        helpers.wait_for(lambda: (tmp_path / "looping").exists() or reload.poll() is not None, 60, 0.01)
        assert reload.poll() is None, reload.communicate()
        yield reload, before



def test_a_reload_whose_probe_outlasts_ten_seconds_gets_its_answer(daemon, tmp_path):  # noqa: F811
    """The supervisor answers a reload after probing the plug-ins, which may take the hook budget (10 s by default)
    plus its grace; the client waited 10 s and died with a TimeoutError traceback while the supervisor was about to
    refuse the reload.  Now it waits for the probe deadline of the configuration on disk: exit 4, the file named."""
    plug = tmp_path / "plugins"
    plug.mkdir()
    script = plug / "monitor.lua"
    script.write_text('TrisulPlugin = { id = { name = "m" }, engine_monitor = { onmetronome = function() end } }\n')
    daemon.start(plugins=[plug])                 # [fastpath] hook_budget: the default, 10 s
    before = daemon.status()
    script.write_text(LOOPING % str(tmp_path / "looping"))
    t0 = time.monotonic()
    r = daemon.cli("reload", timeout=120)
    took = time.monotonic() - t0
    assert (tmp_path / "looping").exists()
    assert "Traceback" not in r.stderr, r.stderr
    assert r.returncode == 4, (r.returncode, r.stderr)
    assert str(script) in r.stderr and "still runs in code the interrupt cannot reach" in r.stderr, r.stderr
    assert took > 10, took                      # the probe did outlast the old 10 s timeout
    st = daemon.status()
    assert (st["state"], st["fastpath_pid"], st["reloads"]) == ("running", before["fastpath_pid"], 0)
    assert daemon.cli("stop").returncode == 0
    assert not daemon.alive() and not daemon.segments()


HOLDER = """
import fcntl, os, sys
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o600)
fcntl.flock(fd, getattr(fcntl, sys.argv[2]))
print("locked", flush=True)
sys.stdin.readline()
"""


def hold_pidfile(run_dir: str, how: str) -> subprocess.Popen:
    """A process holding ``run_dir``/supervisor.pid flocked (``how``: LOCK_SH, a `status` between its probe's two
    calls; LOCK_EX on an empty file, a supervisor between its flock and its write) until its stdin closes."""
    os.makedirs(run_dir, mode=0o700, exist_ok=True)
    p = subprocess.Popen([sys.executable, "-c", HOLDER, control.path(run_dir, control.PIDFILE), how],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline() == "locked\n"
    return p


def flock_waiters(file: str) -> list[int]:
    """Pids of supervisors waiting for the exclusive flock on ``file``: a ``luaprobe...supervisor`` process that has
    ``file`` open (PidFile.acquire keeps it open while it polls for the lock, control._flock_wait) and holds no lock
    on it (/proc/locks: "N: FLOCK ADVISORY WRITE PID DEV:INO ...").  A blocked flock() also shows there as
    "N: -> FLOCK ..."; those pids count too."""
    st = os.stat(file)
    dev = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    holders, blocked = set(), set()
    with open("/proc/locks") as f:
        for w in (line.split() for line in f):
            if len(w) > 6 and w[1] == "->" and w[2] == "FLOCK" and w[4] == "WRITE" and w[6] == dev:
                blocked.add(int(w[5]))
            elif len(w) > 5 and w[1] == "FLOCK" and w[5] == dev:
                holders.add(int(w[4]))
    opened = set()
    for p in psutil.process_iter(["cmdline"]):
        if "luaprobe.engine.daemon.supervisor" not in (p.info["cmdline"] or []) or p.pid in holders:
            continue
        try:
            if any(f.path == file for f in p.open_files()):
                opened.add(p.pid)
        except psutil.Error:
            pass
    return sorted(opened | blocked)


def test_a_start_whose_pidfile_a_status_is_probing_starts(daemon):  # noqa: F811
    """`status` / `stop` / a racing `start` probe the pidfile with a shared flock for a moment (control.read_pid).
    A supervisor taking the lock at that moment failed at once ("already running (pid None, ...)": nothing ran,
    `start` exited 1).  Forced: a process holds the shared lock; the supervisor must wait for it (seen waiting:
    flock_waiters), then start when it is let go: exit 0."""
    daemon.write_config()
    holder = hold_pidfile(daemon.run_dir, "LOCK_SH")
    with helpers.killed_when_left(holder):
        start = subprocess.Popen([sys.executable, "-m", "luaprobe.engine.daemon.cli", "start", "--config",
                                  daemon.config], cwd=helpers.REPO, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True)
        with helpers.killed_when_left(start):
            pidfile = control.path(daemon.run_dir, control.PIDFILE)
            helpers.wait_for(lambda: flock_waiters(pidfile) or start.poll() is not None, 60, 0.005)
            assert start.poll() is None, start.communicate()
            holder.communicate("go\n", timeout=30)          # the probe is over
            out, err = helpers.finish(start, 120)
    assert start.returncode == 0, (start.returncode, out, err)
    pid = control.read_pid(daemon.run_dir)
    daemon.pids.add(pid)
    assert out.startswith(f"started: supervisor pid {pid}, "), out
    assert daemon.cli("stop").returncode == 0
    assert not daemon.alive() and not daemon.segments()


def test_a_start_while_a_supervisor_has_locked_but_not_yet_written_its_pidfile_says_already_running(daemon):  # noqa: F811
    """A supervisor writes its pid just after it takes the pidfile's lock.  A `start` (or `status`) between the
    two read "locked, no pid" as "nobody": `start` went on, spawned a supervisor that lost the lock, and exited
    1 with "the supervisor exited".  Forced: a process holds the lock on an empty pidfile; `start` must say
    already running, naming that process (the kernel's lock table), and exit 2, starting nothing."""
    daemon.write_config()
    holder = hold_pidfile(daemon.run_dir, "LOCK_EX")
    with helpers.killed_when_left(holder):
        assert control.read_pid(daemon.run_dir) == holder.pid
        r = cli("start", "--config", daemon.config)
        holder.communicate("go\n", timeout=30)
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    assert r.stderr.startswith(f"luaprobe start: already running (supervisor pid {holder.pid}, run dir "
                               f"{daemon.run_dir}): nothing started"), r.stderr
    assert not os.path.exists(control.path(daemon.run_dir, control.SOCKET))


def test_status_answers_while_a_reload_probes_a_script_that_never_returns(daemon, tmp_path):  # noqa: F811
    """The supervisor probed a reload's plug-ins in its own loop and answered nothing meanwhile: with
    [fastpath] hook_budget = 0 and a top level in a compiled endless loop, for 30 s (RELOAD_PROBE_DEADLINE);
    `status` then said "did not answer within 10 s" (a traceback before ea2066b).  Now the probe runs while the
    loop goes on: status answers at once (state running, the probe's pid), and a stop during the probe kills
    it and tells the waiting `reload` (one line, exit 2)."""
    with reloading_into_a_looping_probe(daemon, tmp_path) as (reload, before):
        t0 = time.monotonic()
        st = daemon.cli("status", "--json")
        took = time.monotonic() - t0
        assert st.returncode == 0, (st.returncode, st.stdout, st.stderr)
        st = json.loads(st.stdout)
        assert st["state"] == "running" and st["fastpath_pid"] == before["fastpath_pid"], st
        probe = st["reload_probe"]["pid"]
        assert "--probe-plugins" in psutil.Process(probe).cmdline()
        assert took < 10, took
        stop = daemon.cli("stop")
        out, err = helpers.finish(reload, 60)
    assert stop.returncode == 0, stop.stderr
    assert reload.returncode == 2, (reload.returncode, out, err)
    assert err.splitlines() == ["luaprobe reload: reload cancelled: the daemon is stopping"], err
    assert not psutil.pid_exists(probe) or psutil.Process(probe).status() == psutil.STATUS_ZOMBIE
    assert not daemon.alive() and not daemon.segments()


def test_two_starts_racing_for_a_probed_pidfile_one_starts_the_other_says_already_running(daemon):  # noqa: F811
    """Two `start`s on one run directory while a `status` probes its pidfile (LOCK_SH): both pass their checks
    and both supervisors wait for the lock (PidFile.acquire, up to 10 s).  The one that gets it runs; the other
    waits on, then refuses.  Meanwhile the loser's `start` polled the socket and took the winner's status for its
    own: "started: supervisor pid WINNER", exit 0 (or, with the winner failing, stopped the winner's daemon).
    Forced: the shared lock held until both supervisors are seen waiting (flock_waiters).  Exactly one `start`
    must exit 0 naming its own supervisor; the other exits 2, "already running", naming the winner."""
    daemon.write_config()
    holder = hold_pidfile(daemon.run_dir, "LOCK_SH")
    starts = []
    with contextlib.ExitStack() as stack:
        stack.enter_context(helpers.killed_when_left(holder))
        for _ in range(2):
            s = subprocess.Popen([sys.executable, "-m", "luaprobe.engine.daemon.cli", "start", "--config",
                                  daemon.config], cwd=helpers.REPO, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True)
            stack.enter_context(helpers.killed_when_left(s))
            starts.append(s)
        pidfile = control.path(daemon.run_dir, control.PIDFILE)
        helpers.wait_for(lambda: len(flock_waiters(pidfile)) == 2 or any(s.poll() is not None for s in starts),
                         60, 0.005)
        assert all(s.poll() is None for s in starts), [s.communicate() for s in starts]
        daemon.pids.update(flock_waiters(pidfile))           # both supervisors: the leak check covers the loser
        holder.communicate("go\n", timeout=30)              # the probe is over: one supervisor takes the lock
        results = [helpers.finish(s, 120) for s in starts]
    pid = control.read_pid(daemon.run_dir)
    daemon.pids.add(pid)
    codes = sorted((s.returncode, out, err) for s, (out, err) in zip(starts, results))
    assert [c for c, _, _ in codes] == [0, 2], codes
    assert codes[0][1].startswith(f"started: supervisor pid {pid}, "), codes
    assert codes[1][2].startswith(f"luaprobe start: already running (supervisor pid {pid}, "), codes
    assert daemon.cli("stop").returncode == 0
    assert not daemon.alive() and not daemon.segments()
