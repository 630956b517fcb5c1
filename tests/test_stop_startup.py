"""SIGINT / SIGTERM while `luaprobe run` starts (newcomer pass, defect 4): it printed a Python KeyboardInterrupt
traceback and died by the signal (-2), or died silently (-15).  README: 130 / 143, one line, nothing left behind.
The moment the CLI owns the signals is read from the kernel (/proc/PID/status SigCgt), not guessed with a sleep;
the signal then comes at several delays from there, through plug-in loading into the run.  (A signal during the
interpreter's own start-up, before luaprobe's first module runs, ~0.1-0.25 s here, is Python's.)"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from tests import helpers

EXAMPLES = os.path.join(helpers.REPO, "engine", "examples")
LUAPROBE = os.path.join(os.path.dirname(__import__("sys").executable), "luaprobe")


def _caught(pid: int, signum: int) -> bool:
    try:
        with open(f"/proc/{pid}/status") as f:
            mask = next(int(ln.split()[1], 16) for ln in f if ln.startswith("SigCgt:"))
    except (OSError, StopIteration):
        return False
    return bool(mask >> (signum - 1) & 1)


def _start_run(tmp_path, *extra, **popen) -> subprocess.Popen:
    """`luaprobe run` of the examples on sample.pcap (quiet), stdout and stderr piped as text."""
    exe = LUAPROBE if os.path.exists(LUAPROBE) else "luaprobe"
    return subprocess.Popen([exe, "run", EXAMPLES, "--pcap", os.path.join(EXAMPLES, "sample.pcap"),
                             "--out", str(tmp_path / "out"), "-q", *extra], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **popen)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
@pytest.mark.parametrize("delay", [0.0, 0.1, 0.3, 0.7, 1.2])
def test_a_stop_signal_while_starting_is_one_line_and_its_exit_code(tmp_path, signum, delay):
    p = _start_run(tmp_path, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    kids = []
    # SIGTERM: Python leaves it alone, luaprobe takes SIGINT and SIGTERM together (SIGINT is Python's from init)
    helpers.wait_for(lambda: _caught(p.pid, signal.SIGTERM) or p.poll() is not None, timeout=30)
    if delay == 0.0:                # taken early: before LuaJIT (lupa) is even loaded, not at the run's start
        with open(f"/proc/{p.pid}/maps") as f:
            assert "lupa" not in f.read()
    time.sleep(delay)
    try:
        kids = psutil.Process(p.pid).children(recursive=True)
    except psutil.Error:
        pass
    p.send_signal(signum)
    _out, err = helpers.finish(p, 120)
    # 0: the run finished before the signal came; -signum: it came while the interpreter was exiting after the
    # run finished (Python's finalisation puts the default disposition back; seen once in CI at 0.7 s, load ~2)
    assert p.returncode in (128 + signum, 0, -signum), err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    lines = [ln for ln in err.splitlines() if ln.startswith("luaprobe")]
    if p.returncode > 0:
        assert len(lines) == 1 and signal.Signals(signum).name in lines[0], err
    assert not psutil.wait_procs(kids, timeout=10)[1]
    assert not helpers.our_segments([p.pid])


def _tree(pid: int) -> set[int]:
    try:
        return {pid} | {c.pid for c in psutil.Process(pid).children(recursive=True)}
    except psutil.Error:
        return {pid}


@pytest.mark.parametrize("shards", [1, 2])
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_stop_signal_the_moment_the_first_segment_exists_leaves_none(tmp_path, signum, shards):
    """The first shared-memory segment (the doorbell; sharded: the coordinator's private directory) appears while
    the run still starts up; a signal sent as soon as /dev/shm shows it (polled without sleeping) must still end in
    one line, 130 / 143 or a graceful stop, and no segment of the run's processes (CI once saw the doorbell left
    behind at a 0.3 s delay)."""
    p = _start_run(tmp_path, "--shards", str(shards))
    pids = {p.pid}
    end = time.monotonic() + 60
    while not helpers.our_segments([p.pid]) and p.poll() is None and time.monotonic() < end:
        pass                                  # busy poll: the window is a few ms wide
    p.send_signal(signum)
    while p.poll() is None and time.monotonic() < end:
        pids |= _tree(p.pid)                  # the shard, capture and worker processes (segment owners)
    _out, err = helpers.finish(p, 120)
    assert p.returncode in (128 + signum, 0, -signum), err
    assert "Traceback" not in err, err
    assert not helpers.our_segments(pids)


def test_the_console_script_ignores_stop_signals_once_its_exit_code_is_decided():
    """After main() returned (the interpreter is exiting with the command's code) a SIGTERM used to kill the
    process with the default disposition: status -15 after a clean run.  Truth: the dispositions the kernel
    reports for the process (/proc/PID/status SigIgn) right after main() returned, as the console script calls it."""
    code = ("import os, sys; from luaprobe.engine.daemon.cli import main; "
            f"sys.argv = ['luaprobe', 'check', {os.path.join(EXAMPLES, 'tcp_ports.lua')!r}]; rc = main(); "
            "print(rc, [ln for ln in open('/proc/self/status') if ln.startswith('SigIgn')][0].split()[1])")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    rc, sigign = r.stdout.split()[-2:]
    assert rc == "0", r.stderr
    mask = int(sigign, 16)
    assert mask >> (signal.SIGTERM - 1) & 1 and mask >> (signal.SIGINT - 1) & 1, sigign


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_stop_signal_between_the_import_and_main_is_one_line(signum):
    """The console script imports engine/daemon/cli.py, which takes SIGINT / SIGTERM at once, then runs its own
    line (``sys.argv[0] = re.sub(...)``) before main(): a signal there raised StartupStop outside main(), a
    traceback and exit 1 (CI under load: test_a_stop_signal_while_starting...[0.0-SIGINT]).  The signal is put
    exactly there: the console script's steps, with the process signalling itself between the import and main().
    It must be one line and 128 + signum."""
    code = ("import os, signal, sys\n"
            "sys.argv = ['luaprobe', 'check', %r]\n"
            "from luaprobe.engine.daemon.cli import main\n"
            "os.kill(os.getpid(), %d)\n"
            "sys.exit(main())\n") % (os.path.join(EXAMPLES, "tcp_ports.lua"), signum)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    assert "Traceback" not in r.stderr, r.stderr
    assert r.returncode == 128 + signum, (r.returncode, r.stderr)
    assert r.stderr.splitlines() == [f"luaprobe check: stopped by {signal.Signals(signum).name} while starting, "
                                     "before any packet was processed (processes started so far were stopped, "
                                     "shared memory removed)"], r.stderr
