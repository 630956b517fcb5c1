"""The warm spare worker (workers/spare.py): the first worker started takes over the process the run started
early, with the worker's own arguments; a spare never taken, or one that died, leaves nothing behind and
changes nothing in the accounting.  Real processes, rings and `luaprobe run` (no mocks)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import psutil

from tests import helpers

PID_PLUGIN = r'''
TrisulPlugin = { id = { name = "pids" } }
local ffi = require("ffi")
pids = {}
function run_tasks(n)
  for i = 1, n do
    T.async:schedule{ data = tostring(i),
      onexecute = function(d)
        local ffi = require("ffi")
        pcall(ffi.cdef, "int getpid(void);")
        local stdin = io.read("*l")                   -- stdin: /dev/null (EOF), as for a worker started directly
        return tostring(ffi.C.getpid()) .. " " .. tostring(stdin)
      end,
      onresult = function(e, d, r) pids[#pids + 1] = r end }
  end
end
'''


def _results(vm) -> list[str]:
    n = vm.exec("return #pids")
    return [vm.exec(f"return pids[{i}]").decode() for i in range(1, n + 1)]


def test_first_worker_is_the_spare_the_rest_start_cold(runtime_factory, tmp_path):
    """VM 1's worker is the spare's process (same pid, its own process group, stdin /dev/null); VM 2's worker
    starts cold (a different pid); every task of both runs once with its result, the identity exact."""
    rt = runtime_factory(workers=1)
    rt.prestart_worker()
    spare_pid = rt.spare.proc.pid
    path = helpers.write_plugin(tmp_path, PID_PLUGIN)
    vm1 = rt.load(path)
    assert rt.spare.proc is None                        # taken by the first pool
    assert vm1.pool.pids() == [spare_pid]
    assert os.getpgid(spare_pid) == spare_pid           # a timeout's killpg ends only what the task started
    vm2 = rt.load(path)
    assert vm2.pool.pids() != [spare_pid]
    for vm in (vm1, vm2):
        vm.exec("run_tasks(50)")
    assert rt.run_until_idle(30)
    assert os.readlink(f"/proc/{spare_pid}/fd/0") == "/dev/null"
    for vm, pid in ((vm1, spare_pid), (vm2, vm2.pool.pids()[0])):
        st = vm.async_stats()
        helpers.assert_accounting(st)
        assert (st["scheduled"], st["ok"], st["error"], st["worker_deaths"]) == (50, 50, 0, 0), st
        assert _results(vm) == [f"{pid} nil"] * 50


def test_unused_spare_ends_at_close(runtime_factory):
    """A spare no pool took is ended and reaped at close, at once even while it still imports: no process left."""
    rt = runtime_factory(workers=1)
    rt.prestart_worker()
    proc = rt.spare.proc
    rt.close()
    assert proc.returncode is not None
    assert not psutil.pid_exists(proc.pid) or psutil.Process(proc.pid).status() == psutil.STATUS_ZOMBIE


def test_spare_exits_0_at_eof():
    """A spare whose stdin reaches EOF without arguments (its parent closed the pipe) exits 0, running nothing."""
    from luaprobe.workers.spare import SpareWorker
    proc = SpareWorker().start().proc
    proc.stdin.close()
    assert proc.wait(60) == 0


def test_dead_spare_falls_back_to_a_cold_start(runtime_factory, tmp_path):
    """A spare killed before it is taken: the pool starts its worker itself; no death is counted and every
    task completes."""
    rt = runtime_factory(workers=1)
    rt.prestart_worker()
    dead = rt.spare.proc
    os.kill(dead.pid, signal.SIGKILL)
    dead.wait()
    vm = rt.load(helpers.write_plugin(tmp_path, PID_PLUGIN))
    assert vm.pool.pids() and vm.pool.pids() != [dead.pid]
    vm.exec("run_tasks(20)")
    assert rt.run_until_idle(30)
    st = vm.async_stats()
    helpers.assert_accounting(st)
    assert (st["ok"], st["worker_deaths"]) == (20, 0), st


def test_spare_exits_with_its_parent(tmp_path):
    """A spare whose parent dies (SIGKILL: no clean-up runs) does not outlive it (PR_SET_PDEATHSIG)."""
    code = ("import sys, time; from luaprobe.workers.spare import SpareWorker; s = SpareWorker().start(); "
            "print(s.proc.pid, flush=True); time.sleep(60)")
    parent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
    try:
        pid = int(parent.stdout.readline())
        helpers.wait_for(lambda: any("--spare" in a for a in psutil.Process(pid).cmdline()), timeout=10)
    finally:
        parent.kill()
        parent.wait()
        parent.stdout.close()
    helpers.wait_for(lambda: not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE,
                     timeout=10)


def test_run_uses_the_spare_for_its_first_worker(tmp_path):
    """`luaprobe run`: the plug-in's tasks run in a worker whose command line is the spare's (it was started
    before the plug-ins loaded) and the summary's accounting is exact (one task per TCP packet of the sample
    capture: tshark counts 78, docs/benchmarks.md)."""
    plug = helpers.write_plugin(tmp_path, r'''
TrisulPlugin = { id = { name = "spare" },
  onunload = function()
    local f = assert(io.open(os.getenv("SPARE_OUT"), "w")); f:write(table.concat(got, "\n")); f:close()
  end,
  simplecounter = { protocol_guid = "{77E462AB-2E42-42ec-9A58-C1A6821D6B31}",
    onpacket = function(engine, layer)
      T.async:schedule{ data = "x", onexecute = function(d)
          local f = io.open("/proc/self/cmdline", "rb"); local c = f:read("*a"); f:close()
          return (c:find("--spare", 1, true) and "spare" or "cold")
        end,
        onresult = function(e, d, r) got[#got + 1] = r end }
    end } }
got = {}
''')
    out, stats = tmp_path / "spare.txt", tmp_path / "stats.json"
    sample = os.path.join(helpers.REPO, "engine", "examples", "sample.pcap")
    r = subprocess.run([sys.executable, "-m", "luaprobe.engine", "run", plug, "--pcap", sample, "--out",
                        str(tmp_path / "out"), "--stats-json", str(stats), "--quiet"],
                       cwd=tmp_path, env=dict(os.environ, SPARE_OUT=str(out)), capture_output=True, timeout=120)
    assert r.returncode == 0, r.stderr.decode()
    got = out.read_text().split("\n")
    assert got == ["spare"] * 78
    st = json.loads(stats.read_text())["plugins"][-1]["async"]
    assert (st["scheduled"], st["ok"], st["pending"]) == (78, 78, 0), st


def test_spare_only_for_plugins_naming_async(tmp_path):
    """The run starts a spare only when a plug-in file names async (engine/fastpath/run.py mentions_async);
    an unreadable file counts as naming it (the spare is only a head start)."""
    from luaprobe.engine.fastpath.run import mentions_async
    plain = tmp_path / "plain.lua"
    plain.write_text('TrisulPlugin = { id = { name = "p" } }\n')
    user = tmp_path / "user.lua"
    user.write_text('local A = T.async\nTrisulPlugin = { id = { name = "u" } }\n')
    assert not mentions_async([str(plain)])
    assert mentions_async([str(plain), str(user)])
    assert mentions_async([str(tmp_path / "missing.lua")])
