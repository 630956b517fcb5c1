"""When T.async workers start (docs/async.md "When workers start").  A plug-in asking for more than one worker has
them all running before the packet loop: its first packet hook finds the worker processes alive, each with its
channel's control block saying its loop runs, and its first schedule call starts no process.  One worker (the
default) still starts on the first task, from the warm spare (issue 11).  Before: a pool of 8 started inside the
first schedule call (8 channels, the spare plus 7 Popen), so the first hook saw 1 worker process (the spare) and
none ready.

Truth, read by the plug-in's hook from the kernel, not from the pool: the run process's children
(/proc/PID/task/PID/children) whose command line is a luaprobe worker, the channel segment each one maps
(/proc/CHILD/maps) and the ``state`` word the worker itself writes in that segment (workers/protocol.lua)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from luaprobe.engine.daemon import control
from tests import helpers
from tests.test_supervisor import daemon  # noqa: F401  (the fixture: a supervised run, its leak check)

CAPTURE = os.path.join(helpers.REPO, "tests", "data", "trisul-16minutes.pcap")
PLUGIN = r'''
local ffi = require "ffi"
local OUT, NW = %s, %d
ffi.cdef "typedef struct { double magic; double pid; double cur_task; double cur_start_ns; double tasks_done; uint32_t exit_request; uint32_t state; } t_ctl;"
local STATE = ffi.offsetof("t_ctl", "state")

local function slurp(path)
  local f = io.open(path, "rb"); if not f then return nil end
  local s = f:read("*a"); f:close(); return s
end

-- worker processes among this process's children, and how many of them map a channel whose state word is 1
local function workers()
  local me = tonumber(slurp("/proc/self/stat"):match("^(%%d+)"))
  local procs, ready = 0, 0
  for pid in (slurp("/proc/" .. me .. "/task/" .. me .. "/children") or ""):gmatch("%%d+") do
    local cmd = slurp("/proc/" .. pid .. "/cmdline") or ""
    if cmd:find("luaprobe.workers.worker", 1, true) then
      procs = procs + 1
      for seg in (slurp("/proc/" .. pid .. "/maps") or ""):gmatch("(/dev/shm/%%S+%%-w%%d+%%.%%S+)") do
        local ctl = slurp(seg:gsub(" %%(deleted%%)$", ""))
        if ctl and #ctl > STATE + 4 then
          local st = ffi.new("uint32_t[1]"); ffi.copy(st, ctl:sub(STATE + 1, STATE + 4), 4)
          if st[0] == 1 then ready = ready + 1 end
        end
        break
      end
    end
  end
  return procs, ready
end

TrisulPlugin = { id = { name = "async start" },
  request_async_workers = NW,
  simplecounter = { protocol_guid = "{0A2C724B-5B9F-4ba6-9C97-B05080558574}",
    onpacket = function(engine, layer)
      if DONE then return end
      DONE = true
      local procs, ready = workers()
      T.async:schedule { data = "x", onexecute = function(d) return d end }
      local after = workers()
      local f = assert(io.open(OUT, "wb"))
      f:write(string.format('{"procs": %%d, "ready": %%d, "procs_after_schedule": %%d}', procs, ready, after))
      f:close()
    end } }
'''


@pytest.mark.parametrize("nworkers", [8, 1])
def test_workers_asked_for_run_before_the_first_packet(tmp_path, nworkers):
    p = tmp_path / "start.lua"
    seen = tmp_path / "seen.json"
    p.write_text(PLUGIN % (json.dumps(str(seen)), nworkers))
    r = subprocess.run([sys.executable, "-m", "luaprobe.engine.daemon.cli", "run", str(p), "--pcap", CAPTURE,
                        "--out", str(tmp_path / "o"), "-q"], cwd=helpers.REPO, capture_output=True, text=True,
                       timeout=300, env=dict(os.environ, PYTHONPATH=helpers.REPO))
    assert r.returncode == 0, r.stderr
    got = json.loads(seen.read_text())
    if nworkers > 1:           # all running at the first packet; the first schedule starts nothing
        assert got == {"procs": nworkers, "ready": nworkers, "procs_after_schedule": nworkers}, got
    else:                      # lazy: the warm spare only (no channel yet); the first task adopts it, no new process
        assert got == {"procs": 1, "ready": 0, "procs_after_schedule": 1}, got


def test_workers_not_up_in_time_name_the_plugin(tmp_path):
    """The wait is bounded: workers not running by the limit give one line naming the plug-in file (here a limit of
    0 s: a worker process cannot have imported Python and built its VM in no time)."""
    from luaprobe.engine.plugins.asyncruntime import AsyncRuntime
    p = tmp_path / "four.lua"
    p.write_text("TrisulPlugin = { id = { name = 'four' }, request_async_workers = 4 }\n")
    with AsyncRuntime() as rt:
        vm = rt.load(str(p), start_workers="lazy")
        assert vm.eager and vm.pool is not None and len(vm.pool.pids()) == 4
        lines = rt.wait_workers(limit=0)
        assert len(lines) == 1 and lines[0].startswith(f"{p}: ") and "of its 4 T.async workers not running" in lines[0]
        assert rt.wait_workers(limit=60) == [] and vm.pool.ready_count() == 4


def test_daemon_child_with_workers_config_starts_them_before_the_first_packet(tmp_path, daemon):  # noqa: F811
    """The daemon's fast-path child, workers from the config ([async] workers = 8, the plug-in asking for 1)."""
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    seen = tmp_path / "seen.json"
    (plugins / "start.lua").write_text(PLUGIN % (json.dumps(str(seen)), 1))
    cfg = daemon.write_config(plugins=(str(plugins),), pcap=(CAPTURE,), loop=False)
    with open(cfg) as f:
        text = f.read()
    assert "workers = 1\n" in text
    with open(cfg, "w") as f:
        f.write(text.replace("workers = 1\n", "workers = 8\n"))
    from tests.test_supervisor import cli
    r = cli("start", "--config", cfg)
    assert r.returncode == 0, r.stderr
    daemon.pids.add(control.read_pid(daemon.run_dir))
    daemon.status()
    end = time.monotonic() + 120                       # a bound for a loaded machine, not a timing
    while not seen.exists() and time.monotonic() < end:
        time.sleep(0.05)
    assert daemon.cli("stop").returncode in (0, 3)     # 3: the run had already ended (input finished)
    assert json.loads(seen.read_text()) == {"procs": 8, "ready": 8, "procs_after_schedule": 8}


COUNTER = r'''
local OUT = %s
local function slurp(path)
  local f = io.open(path, "rb"); if not f then return nil end
  local s = f:read("*a"); f:close(); return s
end
TrisulPlugin = { id = { name = "counts worker processes" },
  simplecounter = { protocol_guid = "{0A2C724B-5B9F-4ba6-9C97-B05080558574}",
    onpacket = function(engine, layer)
      if SEEN then return end
      SEEN = true
      local me = tonumber(slurp("/proc/self/stat"):match("^(%%d+)"))
      local procs = 0
      for pid in (slurp("/proc/" .. me .. "/task/" .. me .. "/children") or ""):gmatch("%%d+") do
        if (slurp("/proc/" .. pid .. "/cmdline") or ""):find("luaprobe.workers.worker", 1, true) then
          procs = procs + 1
        end
      end
      local f = assert(io.open(OUT, "wb")); f:write(tostring(procs)); f:close()
    end } }
'''


def test_workers_flag_starts_no_processes_for_plug_ins_that_never_name_t_async(tmp_path):
    """The newcomer review (session 18): `[async] workers = 2` in the example probe.toml (or `--workers 2`) started
    2 worker processes for every plug-in instance at load, also for instances whose file never names T.async (the
    example's tcp_ports.lua countergroup and simplecounter, window_report.lua's two engine_monitors): 10 processes,
    8 idle for the whole run (~20 MiB each).  Now only a file that names ``async`` gets its pool started at load;
    another stays lazy (a pool started by its first task, should it reach T.async through a module it requires).
    Truth, read by a plug-in from the kernel at its first packet: the run's children that are luaprobe workers:
    the 3 of the plug-in that schedules (test above), not 3 more for the counting one (which does not name it)."""
    d = tmp_path / "plugins"
    d.mkdir()
    seen, seen2 = tmp_path / "seen.json", tmp_path / "count.txt"
    (d / "a_start.lua").write_text(PLUGIN % (json.dumps(str(seen)), 1))
    (d / "b_count.lua").write_text(COUNTER % json.dumps(str(seen2)))
    assert b"async" not in (d / "b_count.lua").read_bytes()
    r = subprocess.run([sys.executable, "-m", "luaprobe.engine.daemon.cli", "run", str(d), "--pcap", CAPTURE,
                        "--out", str(tmp_path / "o"), "-q", "--workers", "3"], cwd=helpers.REPO,
                       capture_output=True, text=True, timeout=300, env=dict(os.environ, PYTHONPATH=helpers.REPO))
    assert r.returncode == 0, r.stderr
    assert json.loads(seen.read_text()) == {"procs": 3, "ready": 3, "procs_after_schedule": 3}
    assert int(seen2.read_text()) == 3
