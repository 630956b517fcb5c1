"""A plug-in's FFI code that faults kills `luaprobe run` (the fast path runs in its process), but with one line naming
the plug-in and the hook (engine/plugins/_lpwatch.c crash_enter; docs/operations.md "Exit codes"), exit status 139
(-11 for subprocess).  Before: the process died with no line at all.  A SIGSEGV sent by kill is not named and still
kills; the capture process's own SIGBUS guard is covered by tests/test_capture_cut.py.

Truth: the plug-in file and hook the test wrote; the kernel's signal number from waitpid."""
from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from luaprobe.shm import segment
from tests import helpers

PCAP = os.path.join(helpers.PCAPS, "trisul-tutorial.pcap")

CRASH = """local ffi = require("ffi")
TrisulPlugin = { id = { name = "crash" },
  simplecounter = { protocol_guid = "{77E462AB-2E42-42ec-9A58-C1A6821D6B31}",
    onpacket = function(engine, layer)
      seen = (seen or 0) + 1
      if seen == 5 then return ffi.cast("int*", 0)[0] end
    end } }
"""

COUNT = """TrisulPlugin = { id = { name = "count" },
  simplecounter = { protocol_guid = "{77E462AB-2E42-42ec-9A58-C1A6821D6B31}",
    onpacket = function(engine, layer) seen = (seen or 0) + 1 end } }
"""


def _unlink_segments_of(pid: int) -> None:
    """The dead run's shared memory (it could not unlink it: `luaprobe shm clean` does this for a user)."""
    for name in segment.list_segments(pid):
        segment.unlink(name)


@pytest.mark.timeout(120)
def test_a_plugin_fault_names_the_plugin_and_hook(tmp_path):
    crash, count = tmp_path / "crash.lua", tmp_path / "count.lua"
    crash.write_text(CRASH)
    count.write_text(COUNT)
    p = subprocess.Popen([sys.executable, "-m", "luaprobe.engine", "run", str(count), str(crash), "--pcap", PCAP,
                          "--out", str(tmp_path / "out")], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        with helpers.killed_when_left(p):
            out, err = p.communicate(timeout=100)
    finally:
        _unlink_segments_of(p.pid)
    assert p.returncode == -signal.SIGSEGV, err                     # exit status 139 in a shell
    want = (f"luaprobe run: crashed: SIGSEGV in plug-in {crash} (hook simplecounter.onpacket) \u2014 rows not yet "
            f"written are lost")
    lines = err.splitlines()
    assert lines.count(want) == 1, err[-2000:]
    assert lines[-1] == want, err[-2000:]                           # the last word: nothing printed after it
    assert "Traceback" not in err


@pytest.mark.timeout(120)
def test_a_sigsegv_sent_by_kill_is_not_named_and_still_kills(tmp_path):
    p, _, walking = helpers.start_slow_walk(tmp_path, 0.0005)
    try:
        with helpers.killed_when_left(p):
            helpers.wait_for(walking.exists, timeout=60)            # a hook has run: the crash handler is in place
            os.kill(p.pid, signal.SIGSEGV)
            out, err = p.communicate(timeout=30)
    finally:
        _unlink_segments_of(p.pid)
    assert p.returncode == -signal.SIGSEGV, err                     # not swallowed
    assert "crashed:" not in err, err[-2000:]                       # not a fault of the plug-in's code
