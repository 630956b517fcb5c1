"""A supervisor killed with SIGKILL (engine/daemon/supervisor.py Supervisor._spawn, usage.OutClaim): its fast path
stops by itself (PR_SET_PDEATHSIG: SIGTERM, a graceful stop that still writes the database), and until it has
exited the daemon's [run] out_dir stays claimed, so that a new `start` cannot put a second store writer on the same
database meanwhile.  Real daemons (tests/test_supervisor.py's fixture); the orphaned fast path is held by SIGSTOP
while the new `start` is tried, so its stop cannot have ended by then (its SIGTERM stays pending)."""
from __future__ import annotations

import contextlib
import os
import signal
import sqlite3

import psutil

from luaprobe.engine.daemon import control
from tests import helpers
from tests.test_supervisor import cli, daemon  # noqa: F401 - the fixture


def test_a_start_while_a_killed_supervisors_fast_path_still_stops_is_refused(daemon):  # noqa: F811
    """SIGKILL of the supervisor while its fast path is held (SIGSTOP): `start` of the same config is refused, exit
    2, in one line naming out_dir as being written into, and starts nothing; once the old fast path has stopped,
    `start` works.  Before: out_dir's flock was held by the supervisor alone, freed by its death: the second
    `start` started a second daemon (exit 0) whose store writer shared luaprobe.sqlite with the old fast path's,
    which was still flushing its last rows."""
    daemon.start()
    st = daemon.status()
    fastpath = psutil.Process(st["fastpath_pid"])
    os.kill(fastpath.pid, signal.SIGSTOP)
    try:
        os.kill(st["supervisor_pid"], signal.SIGKILL)
        helpers.wait_for(lambda: control.read_pid(daemon.run_dir) is None, 30, 0.01)
        r = cli("start", "--config", daemon.config)
        if r.returncode == 0:
            daemon.pids.add(control.read_pid(daemon.run_dir))
    finally:
        os.kill(fastpath.pid, signal.SIGCONT)
    assert (r.returncode, r.stdout) == (2, ""), (r.returncode, r.stdout, r.stderr)
    assert r.stderr == (f"luaprobe start: {daemon.config}: [run] out_dir = {daemon.out_dir}: another luaprobe run or "
                        "daemon is writing into it now (it is locked); wait for it to finish, or write elsewhere\n"), \
        r.stderr
    assert control.read_pid(daemon.run_dir) is None
    psutil.wait_procs([fastpath], timeout=60)
    assert not fastpath.is_running()
    daemon.start()
    assert daemon.cli("stop").returncode == 0
    assert not daemon.alive() and not daemon.segments()


def test_a_start_while_a_killed_daemons_store_writer_still_commits_is_refused(daemon):  # noqa: F811
    """The fast path's store writer holds out_dir too (it inherits the claim's descriptor, --out-lock-fd): with the
    writer held (SIGSTOP, a long commit made certain), the supervisor and its fast path SIGKILLed, the orphaned
    writer alone keeps [run] out_dir locked: `start` is refused, exit 2, one line, nothing started.  Let go, the
    writer commits and exits by itself (EOF on its input), the database is whole, and `start` works.  Before: the
    writer did not hold the lock; the second `start` started a daemon (exit 0) whose writer shared luaprobe.sqlite
    with the orphan."""
    daemon.start()
    st = helpers.wait_for(lambda: (s := daemon.status())["processes"].get("store") and s, 30, 0.1)   # first snapshot
    writer = psutil.Process(st["processes"]["store"])
    fastpath = psutil.Process(st["fastpath_pid"])
    assert writer.ppid() == fastpath.pid
    writer.suspend()
    try:
        fastpath.suspend()                         # no graceful stop (its PDEATHSIG SIGTERM stays pending): killed
        os.kill(st["supervisor_pid"], signal.SIGKILL)
        fastpath.kill()
        psutil.wait_procs([fastpath], timeout=30)
        assert not fastpath.is_running() and writer.status() == psutil.STATUS_STOPPED
        helpers.wait_for(lambda: control.read_pid(daemon.run_dir) is None, 30, 0.01)
        r = cli("start", "--config", daemon.config)
        if r.returncode == 0:
            daemon.pids.add(control.read_pid(daemon.run_dir))
        assert writer.is_running()
    finally:
        writer.resume()
    assert (r.returncode, r.stdout) == (2, ""), (r.returncode, r.stdout, r.stderr)
    assert r.stderr == (f"luaprobe start: {daemon.config}: [run] out_dir = {daemon.out_dir}: another luaprobe run or "
                        "daemon is writing into it now (it is locked); wait for it to finish, or write elsewhere\n"), \
        r.stderr
    assert control.read_pid(daemon.run_dir) is None
    psutil.wait_procs([writer], timeout=60)        # ends by itself: its input pipe's writer is dead
    assert not writer.is_running()
    db = os.path.join(daemon.out_dir, "luaprobe.sqlite")
    with contextlib.closing(sqlite3.connect(db)) as c:
        assert c.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    daemon.start()
    assert daemon.cli("stop").returncode == 0
    assert not daemon.alive() and not daemon.segments()
