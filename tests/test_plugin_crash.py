"""A plug-in's FFI code that faults kills `luaprobe run` (the fast path runs in its process), but with one line naming
the plug-in and the hook (engine/plugins/_lpwatch.c crash_enter; docs/operations.md "Exit codes"), exit status
128 + the signal (-signal for subprocess): SIGSEGV 139, SIGBUS 135, SIGILL 132, SIGFPE 136.  The dying process
unlinks its /dev/shm segments and its extraction directory (crash_paths, shm/segment.py's owned list); the
capture process, the store writer and the T.async workers end by themselves, and the writer commits the rows it was
sent.  Before: SIGILL / SIGFPE / SIGBUS had no line, and every crash left the run's segments in /dev/shm.  A SIGSEGV
sent by kill is not named and still kills; the capture process's own SIGBUS guard is covered by
tests/test_capture_cut.py.

Truth: the plug-in file and hook the test wrote; the kernel's signal number from waitpid; /dev/shm and /proc (the
processes found by a marker in their environment, tests/proc_tools.py); the alerts the plug-in numbered itself, read
back with sqlite3."""
from __future__ import annotations

import json
import os
import platform
import signal
import sqlite3
import subprocess
import sys
import time

import pytest

from luaprobe.shm import segment
from tests import helpers, proc_tools

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


REST = ("the rows sent to the store writer are committed; the rest (open counter buckets, live flows, the summary) "
        "is lost")


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
    want = f"luaprobe run: crashed: SIGSEGV in plug-in {crash} (hook simplecounter.onpacket) \u2014 {REST}"
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


# A fault of the kernel's making in onpacket at packet AT, by kind: SIGSEGV a null write, SIGBUS a load from a page of
# a file wholly past its end (an empty file mapped), SIGILL / SIGFPE machine code (ud2; div by a zeroed ecx) in a page
# mapped executable.  The counting plug-in numbers an alert per packet (its own truth for what was sent).
FAULT = r"""local ffi = require("ffi")
ffi.cdef[[ void *mmap(void *, size_t, int, int, int, long); int open(const char *, int, ...); ]]
local function fault(kind)
  if kind == "SIGSEGV" then ffi.cast("int*", 0)[0] = 1 end
  if kind == "SIGBUS" then
    local fd = ffi.C.open(%(empty)s, 2)
    local p = ffi.cast("volatile int*", ffi.C.mmap(nil, 4096, 3, 1, fd, 0))
    return p[0]
  end
  local code = kind == "SIGILL" and "\15\11" or "\49\201\247\241\195"
  local p = ffi.C.mmap(nil, 4096, 7, 0x22, -1, 0)
  ffi.copy(p, code, #code)
  return ffi.cast("int (*)(void)", p)()
end
TrisulPlugin = { id = { name = "fault" },
  %(async)s
  simplecounter = { protocol_guid = "{77E462AB-2E42-42ec-9A58-C1A6821D6B31}",
    onpacket = function(engine, layer)
      seen = (seen or 0) + 1
      %(schedule)s
      if seen == %(at)d then return fault(%(kind)s) end
    end } }
"""

ALERTS = """TrisulPlugin = { id = { name = "alerts" },
  simplecounter = { protocol_guid = "{77E462AB-2E42-42ec-9A58-C1A6821D6B31}",
    onpacket = function(engine, layer) seen = (seen or 0) + 1
      engine:add_alert("{B5F1DECB-51D5-4395-B71B-6FA730B772D9}", "k", "SIG", 1, "n" .. seen) end } }
"""

SCHEDULE = """if seen % 50 == 0 then T.async:schedule{ data = tostring(seen), onexecute = function(d) return d end,
        onresult = function() end } end"""


def _lua_q(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _crash_run(tmp_path, kind: str, at: int, workers: bool, extra_args=()) -> tuple[subprocess.Popen, str, str]:
    """`luaprobe run alerts.lua fault.lua` on generated traffic (100 packets a second of packet time: the alerts
    leave the fast path at every second) until the fault at packet ``at``; returns (proc, stdout, stderr) once the
    run, and every process it started, has ended: no process of the run alive and no segment of any of them, or
    the test fails naming them (proc_tools.reaped, 30 s to end by themselves)."""
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    fault = tmp_path / "fault.lua"
    fault.write_text(FAULT % {"empty": _lua_q(str(empty)), "kind": _lua_q(kind), "at": at,
                              "async": "request_async_workers = 2," if workers else "",
                              "schedule": SCHEDULE if workers else ""})
    alerts = tmp_path / "alerts.lua"
    alerts.write_text(ALERTS)
    env, tag = proc_tools.tagged_env()
    with proc_tools.reaped(tag) as pids:
        p = proc_tools.start(["run", str(alerts), str(fault), "--generate", "packets=30000,flows=100,rate=100,seed=1",
                              "--out", str(tmp_path / "out"), *extra_args], env=env)
        pids.add(p.pid)
        with helpers.killed_when_left(p):
            worked = False                  # with workers: one ran a task before the fault
            end = time.monotonic() + 100
            while p.poll() is None and time.monotonic() < end:   # every process of the run, for its segments:
                procs = proc_tools.tagged_processes(tag)          # a dead shard's too (reaped checks them all)
                pids.update(q.pid for q in procs)
                worked = worked or proc_tools.worker_running(procs)
                time.sleep(0.02)
            out, err = p.communicate(timeout=100)
        assert worked or not workers, "no T.async worker ran before the fault"
    return p, out, err


def _alerts(tmp_path) -> list[str]:
    """The alert messages the store holds (the database checked whole first)."""
    with sqlite3.connect(tmp_path / "out" / "luaprobe.sqlite") as db:
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        cols = [r[1] for r in db.execute("PRAGMA table_info(alerts)")]
        col = next(c for c in ("message", "msg", "alert_message") if c in cols)
        return [r[0] for r in db.execute(f"SELECT {col} FROM alerts")]


X86 = platform.machine() in ("x86_64", "AMD64")


@pytest.mark.timeout(240)
@pytest.mark.parametrize("kind", ["SIGSEGV", "SIGBUS",
                                  pytest.param("SIGILL", marks=pytest.mark.skipif(not X86, reason="x86-64 code")),
                                  pytest.param("SIGFPE", marks=pytest.mark.skipif(not X86, reason="x86-64 code"))])
def test_a_fault_leaves_no_process_no_segment_and_commits_what_was_sent(tmp_path, kind):
    """Every kind of fault gets the one line and its own exit status; the run's /dev/shm segments (the packet ring,
    the doorbell, the workers' channels) are gone and no process of the run is left (reaped checks both); the
    alerts the writer was sent are in the database, whole: n1..nK, no gap, K short of the fault's packet."""
    at = 25000
    p, out, err = _crash_run(tmp_path, kind, at, workers=True)
    sig = getattr(signal, kind)
    assert p.returncode == -sig, err[-2000:]                        # 128 + sig in a shell
    fault = tmp_path / "fault.lua"
    want = f"luaprobe run: crashed: {kind} in plug-in {fault} (hook simplecounter.onpacket) \u2014 {REST}"
    lines = err.splitlines()
    assert lines.count(want) == 1 and lines[-1] == want, err[-2000:]
    assert "Traceback" not in err
    got = _alerts(tmp_path)
    assert got == [f"n{i}" for i in range(1, len(got) + 1)], got[:5]   # a prefix of what the plug-in numbered
    assert 0 < len(got) < at, len(got)


FILEX_CRASH = r"""local ffi = require("ffi")
TrisulPlugin = { id = { name = "filex crash" },
  filex_monitor = {
    onfile_http = function(engine, ts, flow, path, req, resp, length, is_chunk)
      local f = io.open(%s, "w"); f:write(path); f:close()
      ffi.cast("int*", 0)[0] = 1
    end } }
"""


@pytest.mark.timeout(240)
def test_a_fault_removes_the_extraction_directory(tmp_path):
    """A filex_monitor's fault while its file is in the private extraction directory under /dev/shm: the
    directory and the file in it are gone (the handler's getdents64 / unlinkat / rmdir), as are the segments."""
    seen = tmp_path / "seen"
    plugin = tmp_path / "filex.lua"
    plugin.write_text(FILEX_CRASH % _lua_q(str(seen)))
    env, tag = proc_tools.tagged_env()
    with proc_tools.reaped(tag) as pids:
        p = proc_tools.start(["run", str(plugin), "--pcap", os.path.join(helpers.PCAPS, "http-get-text.pcap"),
                              "--out", str(tmp_path / "out")], env=env)
        pids.add(p.pid)
        with helpers.killed_when_left(p):
            out, err = p.communicate(timeout=100)
    assert p.returncode == -signal.SIGSEGV, err[-2000:]
    path = seen.read_text()
    d = os.path.dirname(path)
    assert d.startswith(segment.SHM_DIR + "/luaprobe-") and segment.owner_pid(os.path.basename(d)) == p.pid, path
    assert not os.path.exists(d), os.listdir(d)
    assert err.splitlines()[-1] == (f"luaprobe run: crashed: SIGSEGV in plug-in {plugin} (hook "
                                    f"filex_monitor.onfile_http) \u2014 {REST}"), err[-2000:]


@pytest.mark.timeout(240)
def test_a_shard_s_fault_says_its_committed_rows_are_not_in_written(tmp_path):
    """--shards 2: the fault kills the shard processes (their line; the coordinator restarts them, exit 1).  The dead
    shard's store writer commits the alerts it was sent, so the database holds more alerts than the summary's
    "written" counts (the finished shards'): the exit line says so instead of calling all of them lost.  The
    dead shards' own segments (their T.async channels) are gone with them (the handler; the coordinator's sweep at
    a restart too), as is every process of the run."""
    stats = tmp_path / "stats.json"
    p, out, err = _crash_run(tmp_path, "SIGSEGV", 10000, workers=True,      # of ~15000 packets each shard walks
                             extra_args=("--shards", "2", "--stats-json", str(stats)))
    assert p.returncode == 1, err[-3000:]
    assert f"luaprobe run: crashed: SIGSEGV in plug-in {tmp_path / 'fault.lua'}" in err, err[-3000:]
    s = json.loads(stats.read_text())
    in_db, written = len(_alerts(tmp_path)), s["rows_written"]["alerts"]
    assert in_db > written, (in_db, written)                    # the dead shard's committed rows
    [line] = [ln for ln in err.splitlines() if ln.startswith("luaprobe run: exit 1: shard ")]
    assert line.endswith(("by the dead one: its", "by the dead ones: their")[line.count(" died (") > 1] + " rows sent "
                         "to the store writer are committed (not counted in \"written\"); results not yet sent (open "
                         "counter buckets, live flows, in-flight T.async tasks) are lost"), line   # both shards fault
