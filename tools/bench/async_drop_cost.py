"""CPU cost of a T.async:schedule call dropped at the overflow limit (docs/async.md "Workers, queues and limits").

In-process: one plug-in VM and W worker processes, each blocked in a 3 s onexecute; the request rings (64 KiB) and
the overflow queue (1 000 tasks) are filled first, then 200 000 calls are timed with os.clock in the VM, of a hoisted
task table and of the fresh-closure idiom, three rounds.

    W=8 python tools/bench/async_drop_cost.py        # W workers (default 1)
"""
import os
import tempfile

from luaprobe.engine.plugins.asyncruntime import AsyncRuntime
from luaprobe.workers.pool import AsyncConfig
d = tempfile.mkdtemp(prefix="async-drop-")
p = os.path.join(d, "drop.lua")
open(p, "w").write(r'''
TrisulPlugin = { id = { name = "drop" } }
local ffi = require("ffi")
local block = { data = "x", onexecute = function(d) local f = require("ffi") pcall(f.cdef, "int usleep(unsigned int);") f.C.usleep(3000000) return d end }
local task = { data = "x", onexecute = function(d) return d end, onresult = function() end }
function fill(n) for k = 1, 64 do T.async:schedule(block) end; for i = 1, n do T.async:schedule(task) end end
function hoisted(n)
  local t0 = os.clock()
  for i = 1, n do T.async:schedule(task) end
  return (os.clock() - t0) / n * 1e9
end
function fresh(n)
  local t0 = os.clock()
  for i = 1, n do T.async:schedule{ data = "x", onexecute = function(d) return d end, onresult = function() end } end
  return (os.clock() - t0) / n * 1e9
end
''')
rt = AsyncRuntime(AsyncConfig(workers=int(os.environ.get("W", "1")), overflow_limit=1000, ring_size=1 << 16, drain_deadline=0.1))
vm = rt.load(p)
vm.exec("fill(200000)")
rt.service()
for r in range(3):
    h = vm.lua.eval("function(n) return hoisted(n) end")(200000)
    f = vm.lua.eval("function(n) return fresh(n) end")(200000)
    print(f"round {r + 1}: dropped call ns: hoisted {h:.0f}, fresh closure {f:.0f}")
st = vm.async_stats(); print("dropped", st["dropped"], "scheduled", st["scheduled"])
rt.close()
os.remove(p)
os.rmdir(d)
