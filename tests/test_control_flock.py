"""control.PidFile.acquire's bounded wait for the pidfile lock (control._flock_wait) needs no signal.

A `status` / `stop` / racing `start` holds the pidfile with a shared flock for a moment (control.read_pid); a
supervisor taking the lock then waits for it, at most ``reader_wait`` s.  That wait was a blocking flock ended by
SIGALRM: off the main thread it did not wait at all (signal.signal raises ValueError there: "already running (pid
None)"), and on the main thread it replaced the caller's SIGALRM handler and disarmed the caller's own timer
(setitimer(ITIMER_REAL, 0)).  Forced with a real process holding the shared lock (tests/test_control_races.py
hold_pidfile), let go once the waiter is seen polling (the pidfile open in this process, its lock not taken)."""
from __future__ import annotations

import os
import signal
import threading
import time

import psutil

from luaprobe.engine.daemon import control
from tests import helpers
from tests.test_control_races import hold_pidfile


def waiting_on(file: str) -> bool:
    """This process has ``file`` open: PidFile.acquire is polling for its lock (or has taken it)."""
    return any(f.path == file for f in psutil.Process().open_files())


def let_go_when_waited_for(holder, file: str) -> threading.Thread:
    """A thread that ends ``holder``'s shared lock once this process is seen waiting on ``file``."""
    def run():
        try:
            helpers.wait_for(lambda: waiting_on(file), 60, 0.005)
        finally:
            holder.communicate("go\n", timeout=30)
    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def test_the_pidfile_lock_is_waited_for_off_the_main_thread(tmp_path):
    """acquire() from a thread that is not the main thread waits for a reader's shared lock and takes the pidfile.
    Before: it did not wait (no SIGALRM off the main thread) and said "already running (pid None, ...)"."""
    run_dir = str(tmp_path / "run")
    file = control.path(run_dir, control.PIDFILE)
    holder = hold_pidfile(run_dir, "LOCK_SH")
    result = {}
    pidfile = control.PidFile(run_dir)

    def take():
        try:
            pidfile.acquire(reader_wait=60)
            result["ok"] = open(file).read()
        except Exception as e:  # noqa: BLE001 - the test reads what came out
            result["error"] = e
    with helpers.killed_when_left(holder):
        t = threading.Thread(target=take)
        t.start()
        helpers.wait_for(lambda: not t.is_alive() or waiting_on(file), 60, 0.005)
        holder.communicate("go\n", timeout=30)
        t.join(60)
    try:
        assert not t.is_alive()
        assert result == {"ok": f"{os.getpid()}\n"}, result
    finally:
        pidfile.release()


def test_the_pidfile_wait_leaves_the_callers_alarm_alone(tmp_path):
    """On the main thread, with the caller's own SIGALRM handler and ITIMER_REAL armed: after a wait for a reader's
    lock, the caller's handler is still installed and its timer still runs (and fires, once, into its handler).
    Before: the handler was put back but the timer was disarmed (remaining 0.0), so the caller's alarm never came."""
    run_dir = str(tmp_path / "run")
    file = control.path(run_dir, control.PIDFILE)
    fired = []

    def mine(_signum, _frame):
        fired.append(time.monotonic())
    old = signal.signal(signal.SIGALRM, mine)
    pidfile = control.PidFile(run_dir)
    try:
        signal.setitimer(signal.ITIMER_REAL, 30)
        holder = hold_pidfile(run_dir, "LOCK_SH")
        with helpers.killed_when_left(holder):
            t = let_go_when_waited_for(holder, file)
            pidfile.acquire(reader_wait=60)
            t.join(60)
        remaining = signal.getitimer(signal.ITIMER_REAL)[0]
        assert signal.getsignal(signal.SIGALRM) is mine
        assert 0 < remaining <= 30, remaining
        signal.setitimer(signal.ITIMER_REAL, 0.05)        # the caller's alarm still lands in the caller's handler
        helpers.wait_for(lambda: fired, 30, 0.01)
        assert len(fired) == 1
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
        pidfile.release()


def test_a_lock_held_past_the_wait_is_already_running_from_any_thread(tmp_path):
    """A lock still held when ``reader_wait`` s have passed: RuntimeError "already running", after the wait (not at
    once), on the main thread and on another one; the pidfile's fd is closed again (nothing held)."""
    run_dir = str(tmp_path / "run")
    file = control.path(run_dir, control.PIDFILE)
    holder = hold_pidfile(run_dir, "LOCK_SH")
    with helpers.killed_when_left(holder):
        for where in ("main", "thread"):
            out = {}

            def take():
                t0 = time.monotonic()
                try:
                    control.PidFile(run_dir).acquire(reader_wait=0.3)
                except RuntimeError as e:
                    out["error"], out["took"] = str(e), time.monotonic() - t0
            if where == "main":
                take()
            else:
                t = threading.Thread(target=take)
                t.start()
                t.join(60)
            assert out.get("error", "").startswith("already running (pid None, "), (where, out)
            assert out["took"] >= 0.3, (where, out)
            assert not waiting_on(file)
        holder.communicate("go\n", timeout=30)
