"""`luaprobe start` when the supervisor cannot be started or cannot listen (engine/daemon/supervisor.py cmd_start,
Supervisor.run, main; config.py run_dir checks; control.py listen / request): one line naming the cause, the
documented exit code (docs/operations.md "Exit codes"), no traceback, nothing left running.

Real `luaprobe start` processes; the descriptor limit is set by the process itself just before the CLI runs, at its
lowest free descriptor + N (found by fstat(), which opens nothing, in a process with one thread), so that exactly N
descriptors are left to `start`: its checks open one file at a time, the supervisor's spawn needs more.
"""
from __future__ import annotations

import os
import re
import stat
import subprocess
import sys

import psutil
import pytest

from luaprobe.engine.daemon import control
from tests import helpers
from tests.test_supervisor import daemon  # noqa: F401 - the fixture

START_WITH = r"""
import errno, os, resource, sys
from luaprobe.engine.daemon import cli, metrics, privileges, supervisor   # what `start` imports
from luaprobe.shm import segment
cli.build_parser()
left = int(sys.argv.pop(1))
def free(fd):
    try:
        os.fstat(fd)                                   # opens nothing
    except OSError as e:
        return e.errno == errno.EBADF
    return False
lowest = next(fd for fd in range(1 << 16) if free(fd))
resource.setrlimit(resource.RLIMIT_NOFILE, (lowest + left, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
sys.exit(cli.main(sys.argv[1:]))
"""


def supervisors_of(run_dir: str) -> list[psutil.Process]:
    return [p for p in psutil.process_iter(["cmdline"])
            if "--run-dir" in (p.info["cmdline"] or []) and run_dir in p.info["cmdline"]]


@pytest.mark.parametrize("left", [1, 2, 3])
def test_a_start_left_too_few_descriptors_to_spawn_the_supervisor_says_so_in_one_line(daemon, left):  # noqa: F811
    """`start` with 1, 2 or 3 descriptors left: the config is read and checked (one descriptor at a time), then the
    supervisor's spawn needs more (its refusal pipe: two at once; the log file; the child's /dev/null): one line
    "luaprobe start: cannot start the supervisor: ...: Too many open files", exit 1 (docs/operations.md: the
    process's resources, not the config), no traceback, no supervisor.  Before: a traceback out of os.pipe(),
    open_private or subprocess.Popen, exit 1."""
    daemon.write_config()
    r = subprocess.run([sys.executable, "-c", START_WITH, str(left), "start", "--config", daemon.config],
                       cwd=helpers.REPO, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert "Traceback" not in r.stderr, r.stderr
    # stdout: at most start's sweep line -- under xdist another test's killed process may have left a segment
    assert r.returncode == 1 and len(r.stderr.splitlines()) == 1, (r.returncode, r.stderr)
    assert re.fullmatch(r"(removed \d+ stale shared-memory segment\(s\)\n)?", r.stdout), r.stdout
    assert r.stderr.startswith("luaprobe start: cannot start the supervisor: ") and \
        r.stderr.endswith(": Too many open files (nothing started)\n"), r.stderr
    assert control.read_pid(daemon.run_dir) is None and not supervisors_of(daemon.run_dir)


def test_a_run_dir_too_long_for_its_control_socket_is_refused_at_start(daemon, tmp_path):  # noqa: F811
    """A run directory whose control.sock path is 108 bytes (a Unix socket's path holds at most 107, sun_path):
    `start` refuses it in one line naming the run directory and the limit, exit 2 (a usage error, as any run_dir that
    cannot be used), nothing started; `status` there says not running (3).  One byte shorter starts.  Before:
    the supervisor's bind() raised "AF_UNIX path too long" and its traceback went to /dev/null with its log pump:
    `start` said "the supervisor exited (exit status 1)" over an empty log, and left a pidfile and a registry
    entry; `status` said "cannot connect to ...: None", exit 1."""
    daemon.write_config()
    base = str(tmp_path / "d")
    long_run = base + "x" * (108 - len(base) - len("/run/control.sock")) + "/run"
    assert len(os.fsencode(long_run + "/control.sock")) == 108
    os.makedirs(os.path.dirname(long_run))
    r = helpers_cli("start", "--config", daemon.config, "--run-dir", long_run)
    assert "Traceback" not in r.stderr and r.returncode == 2 and len(r.stderr.splitlines()) == 1, \
        (r.returncode, r.stderr)
    assert r.stderr == (f"luaprobe start: {daemon.config}: --run-dir {long_run}: its control socket "
                        f"{long_run}/control.sock would be 108 bytes long, a Unix socket path holds at most 107 "
                        "(give a shorter run directory)\n"), r.stderr
    assert control.read_pid(long_run) is None and not supervisors_of(long_run)
    r = helpers_cli("status", "--run-dir", long_run)
    assert r.returncode == 3 and "Traceback" not in r.stderr, (r.returncode, r.stdout, r.stderr)
    ok_run = long_run[:-len("x/run")] + "/run"
    os.makedirs(os.path.dirname(ok_run))
    daemon.run_dir = ok_run
    r = helpers_cli("start", "--config", daemon.config, "--run-dir", ok_run)
    assert r.returncode == 0, r.stderr
    daemon.pids.add(control.read_pid(ok_run))
    assert daemon.cli("stop").returncode == 0
    assert not daemon.alive() and not daemon.segments()


def test_a_directory_at_the_control_socket_is_refused_in_one_line(daemon):  # noqa: F811
    """A directory planted at RUN/control.sock: the supervisor cannot replace it with its socket; `start` says so in
    one line naming it, exit 2, nothing started (no pidfile held, no registry entry).  Before: the supervisor's
    unlink raised IsADirectoryError, its traceback lost with its log pump; `start`: "the supervisor exited (exit
    status 1)" over an empty log."""
    daemon.write_config()
    os.makedirs(os.path.join(daemon.run_dir, control.SOCKET), mode=0o700)
    r = helpers_cli("start", "--config", daemon.config)
    assert "Traceback" not in r.stderr and r.returncode == 2 and len(r.stderr.splitlines()) == 1, \
        (r.returncode, r.stderr)
    assert r.stderr == (f"luaprobe start: cannot listen on {daemon.run_dir}/control.sock: Is a directory "
                        "(remove it); nothing started\n"), r.stderr
    assert control.read_pid(daemon.run_dir) is None and not supervisors_of(daemon.run_dir)
    assert not control.running_run_dirs()


def helpers_cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "luaprobe.engine.daemon.cli", *args], cwd=helpers.REPO,
                          capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)


@pytest.mark.parametrize("name, kind", [("supervisor.log", "fifo"), ("heartbeat", "fifo"), ("state.json", "fifo"),
                                        ("supervisor.log", "chr")])
def test_a_fifo_or_device_planted_in_the_run_directory_is_refused_at_start(daemon, name, kind):  # noqa: F811
    """A FIFO (or a character device, /dev/null's numbers) planted at RUN/NAME: `start` refuses it at once in one
    line naming it, exit 2 (as a symbolic link planted there, test_run_dir_links.py), nothing started.  Before:
    a FIFO at supervisor.log held `start`'s open() for ever (killed by this test's 60 s: "still waiting"); at
    heartbeat it held the fast path's first heartbeat, so `start` waited its 60 s for the plug-ins and the stall
    rule later called it a plug-in stuck while loading."""
    daemon.write_config()
    os.makedirs(daemon.run_dir, mode=0o700)
    target = os.path.join(daemon.run_dir, name)
    if kind == "fifo":
        os.mkfifo(target, 0o600)
    else:
        os.mknod(target, 0o600 | stat.S_IFCHR, os.makedev(1, 3))
    try:
        r = subprocess.run([sys.executable, "-m", "luaprobe.engine.daemon.cli", "start", "--config", daemon.config],
                           cwd=helpers.REPO, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        pytest.fail(f"luaprobe start still waiting after 60 s on a {kind} at {target}")
    what = "a FIFO" if kind == "fifo" else "a character device"
    assert (r.returncode, r.stdout, r.stderr) == (2, "", f"luaprobe start: run directory {daemon.run_dir}: {target} "
                                                  f"is {what}, not a regular file (remove it)\n"), r
    assert control.read_pid(daemon.run_dir) is None and not supervisors_of(daemon.run_dir)
