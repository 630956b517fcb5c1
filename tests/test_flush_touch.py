"""The end-of-input flow export reads each chunk's records before it writes their rows (engine/fastpath/driver.lua
Driver:flush_flows, issue 10: the cost of a flow at the end of a run).

flush_flows walks the LRU list into an index array, then writes one lp_flowrow per flow (put_row: counters, times,
the key's text: several hundred instructions a flow).  In LRU order the records are in random memory order once flows
had packets in more than one second (flows-100k: every flow in each of 3 seconds), and with that much work between two
flows the CPU cannot reach the next record's loads while one waits: each record's cache misses came one flow after
the other (tools/bench/flush_cost.py --moved --huge-pages off, 100 000 flows: 304-336 ns a flow against 125-150 in
record order; in the engine on flows-100k 440-460).  Since session 17 the rows are written FLUSH_TOUCH flows at a time,
each chunk's records touched first (hot record's two lines, cold record's one) in a loop of independent loads.

Checked here, deterministically:
* LuaJIT compiles that loop (a looping root trace starting at its line in driver.lua) to three record loads and the
  index-array load a flow, and no store: nothing but the touches (fails on the code before: there is no such loop);
* every live flow is exported once, with its own key (the keys made from the flows' addresses in Lua, independent of
  the table), for a table whose LRU list visits the records in random order.
"""
from __future__ import annotations

import collections
import os

from luaprobe.shm.luajit import new_runtime, package_dirs
from tests import helpers
from tools.bench import fillir
from tools.bench.walkir import IR_NAMES

LUA = r"""
local ffi = require "ffi"
local flowtable = require "luaprobe.engine.fastpath.flowtable"
local driver = require "luaprobe.engine.fastpath.driver"
local decode = require "luaprobe.engine.fastpath.decode"
-- N UDP flows 10.1.x.y:(1024 + i) -> 192.0.2.1:53, then a second packet of each one second later in a shuffled order
-- (the LRU list then visits the records in random order); flush_flows until it returns 0 with a trace hook attached.
-- Returns the IR operation numbers of the looping root traces starting at driver.lua:LINE (one string per trace),
-- the exported keys (one string) and the keys made here (one string), both sorted
return function(N, LINE)
  local ft = flowtable.new{capacity = 65536, idle_timeout = 1e9, active_timeout = 1e9, huge_pages = false}
  local d = decode.new()
  local made = {}
  local function flow(i) udp_flow(d, i) end
  for i = 0, N - 1 do
    flow(i)
    ft:update(d, 1000 + i * 1e-6, 60)
    made[#made + 1] = decode.flowkey(d)
  end
  local order = {}
  for i = 0, N - 1 do order[i + 1] = i end
  math.randomseed(7)
  for i = N, 2, -1 do local j = math.random(1, i); order[i], order[j] = order[j], order[i] end
  for k = 1, N do
    flow(order[k])
    ft:update(d, 1001 + k * 1e-6, 60)
  end
  assert(ft.live == N)
  local self = setmetatable({ft = ft, ipr = {flush = function() end}, exp_cap = driver.EXPORT_ROWS, exp_tags = {},
    npend = 0, pend_cap = 64, pend_tags = {}, renewed = {}, ntags = 0, tags = {}}, {__index = driver.Driver})
  self.exp = ffi.new("lp_flowrow[?]", self.exp_cap)
  self.pend = ffi.new("lp_flowrow[?]", self.pend_cap)
  local traces, keys = {}, {}
  attach_loop_ir("driver.lua:" .. LINE, traces)
  while true do
    local n = self:flush_flows()
    if n == 0 then break end
    for k = 0, n - 1 do keys[#keys + 1] = ffi.string(self.exp[k].key) end
  end
  jit.attach(function() end)
  table.sort(keys)
  table.sort(made)
  return table.concat(traces, "\n"), table.concat(keys, "\n"), table.concat(made, "\n"), ft.live
end
"""


def _touch_line() -> int:
    """The line of flush_flows's touch loop (the first `for i = c, last do` after `function Driver:flush_flows`)."""
    src = open(os.path.join(package_dirs()["engine"], "fastpath", "driver.lua")).read().split("\n")
    start = next(i for i, line in enumerate(src) if line.startswith("function Driver:flush_flows"))
    line = next((i for i in range(start, len(src)) if src[i].strip() == "for i = c, last do"
                 and "local x = ids[i]" in src[i + 1]), None)
    assert line is not None, "flush_flows has no touch loop"
    return line + 1


def test_flush_touches_each_chunks_records_in_a_loop_of_loads_only():
    rt = new_runtime(encoding=None)
    traces, keys, made, live = rt.execute(helpers.LOOP_IR_LUA + helpers.UDP_FLOW_LUA + LUA)(20000, _touch_line())
    traces = traces.decode() if isinstance(traces, bytes) else traces
    assert traces, "the touch loop of flush_flows did not compile to a looping trace"
    for t in traces.split("\n"):
        ops = collections.Counter(fillir.per_packet([IR_NAMES[int(o)] for o in t.split(",")]))
        assert ops["XLOAD"] == 4, f"loads a flow: {ops}"       # ids[i], then hot line 1, hot line 2, cold line
        assert ops["XSTORE"] == 0 and ops["CALLN"] == 0 and ops["CALLL"] == 0 and ops["CALLS"] == 0, ops
    # every flow exported once, with its key
    assert keys == made
    assert len(keys.split(b"\n")) == 20000 and live == 0
