"""The driver's end-of-input flow export in Lua (issue 10): ``Driver:flush_flows`` over N live IPv4 flows with random
addresses, called until it returns 0, in a fresh table per pass (process CPU time per flow; the rows go nowhere).
LuaJIT's traces differ from process to process, so run it several times.

    .venv/bin/python tools/bench/flush_cost.py [N] [--passes 2] [--moved] [--huge-pages off] [--expire]   # 1M flows

``--moved``: after the flows are created (one packet each, in the order of their records), each takes a second packet
one second later, the flows in a random order, so the LRU list that flush_flows walks visits the records in random
memory order, as in a run where flows have packets in more than one second (the corpus's flows-100k: 3 seconds,
every flow in each).  Without it the list is the records' own order (flows-1m: one packet a flow).  Before session 17
only that case was measured (125-150 ns per flow); flows-100k's export in the engine cost 530-580 ns per flow.
To measure another checkout, run this file with that checkout's interpreter (its luaprobe is the one imported).

``--expire``: ``Driver:expire(2000)`` until it returns 0 (the idle expiry between batches: each flow's row, then the
flow freed from the index and both lists, flow by flow along the LRU list; the table's idle timeout 120 s, every flow
idle) instead of flush_flows.  Session 17: 289-848 ns a flow in record order, 474-2 438 with ``--moved`` (100 000
flows, 4 KiB pages, 3 processes: the trace tree LuaJIT builds around free_flow's two loops differs between
processes); since FT:expire goes 512 idle flows at a time in four loops (session 17 note in docs/benchmarks.md,
"The idle expiry in chunks"), 184-231 and 287-418.
"""
from __future__ import annotations

import argparse

from luaprobe.shm.luajit import new_runtime

SETUP = r'''
local ffi = require "ffi"
local flowtable = require "luaprobe.engine.fastpath.flowtable"
local driver = require "luaprobe.engine.fastpath.driver"
local N, moved, huge, expire = ...
return function(seed)
  local ft = flowtable.new{capacity = 1048576, idle_timeout = expire and 120 or 1e9, active_timeout = 1e9,
                           huge_pages = huge}
  local d = ffi.new("lp_decoded")
  local function flow(i)            -- flow i's packet (its own random stream: the same flow in both passes)
    math.randomseed(seed * 16777216 + i)
    d.ip_version = 4
    d.ipproto = i % 3 == 0 and 17 or 6
    for k = 0, 15 do d.src[k] = math.random(0, 255); d.dst[k] = math.random(0, 255) end
    d.sport = math.random(1024, 65535); d.dport = 80
  end
  for i = 1, N do
    flow(i)
    ft:update(d, 1000 + i * 1e-6, 60)
  end
  if moved then                     -- a second packet of each flow, 1 s later, the flows in a random order
    local order = ffi.new("int32_t[?]", N)
    for i = 0, N - 1 do order[i] = i + 1 end
    math.randomseed(seed)
    for i = N - 1, 1, -1 do
      local j = math.random(0, i)
      order[i], order[j] = order[j], order[i]
    end
    for i = 0, N - 1 do
      flow(order[i])
      ft:update(d, 1001 + i * 1e-6, 60)
    end
    assert(ft.live == N, "a flow of the second pass was not found")
  end
  -- the fields of a Driver that flush_flows uses (driver.lua M.new), without a ring
  local self = setmetatable({ft = ft, ipr = {flush = function() end}, exp_cap = driver.EXPORT_ROWS, exp_tags = {},
    npend = 0, pend_cap = 64, pend_tags = {}, renewed = {}, ntags = 0, tags = {}}, {__index = driver.Driver})
  self.exp = ffi.new("lp_flowrow[?]", self.exp_cap)
  self.pend = ffi.new("lp_flowrow[?]", self.pend_cap)
  collectgarbage()
  local c0, total = os.clock(), 0
  while true do
    local n = expire and self:expire(2000) or self:flush_flows()    -- expire: every flow idle at 2000 s
    if n == 0 then break end
    total = total + n
  end
  return os.clock() - c0, total, ft.live
end
'''


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("flows", nargs="?", type=int, default=1_000_000)
    ap.add_argument("--passes", type=int, default=2)
    ap.add_argument("--moved", action="store_true", help="the LRU list in random record order (see above)")
    ap.add_argument("--expire", action="store_true", help="Driver:expire (idle expiry between batches: each flow's "
                    "row, then the flow freed) instead of flush_flows, every flow idle")
    ap.add_argument("--huge-pages", choices=("on", "off"), default="on",
                    help="the table's arrays on huge pages (as before session 17) or 4 KiB pages (the engine's "
                         "`auto` on the benchmark VM)")
    a = ap.parse_args(argv)
    flush = new_runtime().execute(SETUP, a.flows, a.moved, a.huge_pages == "on", a.expire)
    for seed in range(1, a.passes + 1):
        cpu, total, live = flush(seed)
        assert int(total) == a.flows and int(live) == 0
        print(f"{'expire' if a.expire else 'flush_flows'} of {int(total):,} flows{' (moved)' if a.moved else ''}: "
              f"{cpu:.3f} s CPU, "
              f"{cpu / total * 1e9:.0f} ns per flow", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
