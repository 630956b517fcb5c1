"""Which T.async workers poll after a task (docs/async.md "Latency and CPU"): in each pool, the first
max(1, CPUs - 2) workers get ``worker_spin_us``, the others 0 (sleep as soon as their ring is empty), so polling
workers never outnumber the CPUs the capture process and the fast path leave free.  Before, every worker got
1 500 µs: 64 workers each woken for one task took both cores of a 2-CPU machine from the packet loop
(packet_loop_s 0.76 s median against 0.16 s with every worker at 0; tools/bench/async_start_ab.py).

Truth, read from the kernel by the plug-in's first hook: the command line (--slot, --spin-us) of each worker
process among the run's children (worker 1 is the warm spare, whose arguments came on its stdin: only its
presence is checked); the expected split is the rule above over this process's CPU set, which the
run inherits."""
from __future__ import annotations

import json
import os
import subprocess
import sys

from tests import helpers

CAPTURE = os.path.join(helpers.REPO, "tests", "data", "trisul-16minutes.pcap")
PLUGIN = r'''
local OUT = %s
local function slurp(path)
  local f = io.open(path, "rb"); if not f then return nil end
  local s = f:read("*a"); f:close(); return s
end
TrisulPlugin = { id = { name = "spin slots" },
  request_async_workers = 6,
  simplecounter = { protocol_guid = "{0A2C724B-5B9F-4ba6-9C97-B05080558574}",
    onpacket = function(engine, layer)
      if DONE then return end
      DONE = true
      local me = tonumber(slurp("/proc/self/stat"):match("^(%%d+)"))
      local rows = {}
      for pid in (slurp("/proc/" .. me .. "/task/" .. me .. "/children") or ""):gmatch("%%d+") do
        local cmd = (slurp("/proc/" .. pid .. "/cmdline") or ""):gsub("%%z", " ")
        if cmd:find("luaprobe.workers.worker", 1, true) then
          -- the warm spare adopted as worker 1 got its arguments on its stdin (workers/spare.py): [1, null]
          local slot, spin = cmd:match("%%-%%-slot (%%d+)"), cmd:match("%%-%%-spin%%-us (%%S+)")
          rows[#rows + 1] = cmd:find("--spare", 1, true) and "[1, null]" or string.format("[%%s, %%s]", slot, spin)
        end
      end
      local f = assert(io.open(OUT, "wb")); f:write("[" .. table.concat(rows, ",") .. "]"); f:close()
    end } }
'''


def test_only_as_many_workers_poll_as_there_are_cpus_left(tmp_path):
    p, seen = tmp_path / "spin.lua", tmp_path / "seen.json"
    p.write_text(PLUGIN % json.dumps(str(seen)))
    r = subprocess.run([sys.executable, "-m", "luaprobe.engine.daemon.cli", "run", str(p), "--pcap", CAPTURE,
                        "--out", str(tmp_path / "o"), "-q", "--worker-spin-us", "700"], cwd=helpers.REPO,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    got = sorted((int(k), s if s is None else float(s)) for k, s in json.loads(seen.read_text()))
    spinning = max(1, len(os.sched_getaffinity(0)) - 2)
    assert got == [(1, None)] + [(k, 700.0 if k <= spinning else 0.0) for k in range(2, 7)]
