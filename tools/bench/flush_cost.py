"""The driver's end-of-input flow export in Lua (issue 10): ``Driver:flush_flows`` over N live IPv4 flows with random
addresses, called until it returns 0, in a fresh table per pass (process CPU time per flow; the rows go nowhere).
LuaJIT's traces differ from process to process, so run it several times.

    .venv/bin/python tools/bench/flush_cost.py [N] [--passes 2]      # default 1,000,000 flows
"""
from __future__ import annotations

import argparse

from luaprobe.shm.luajit import new_runtime

SETUP = r'''
local ffi = require "ffi"
local flowtable = require "luaprobe.engine.fastpath.flowtable"
local driver = require "luaprobe.engine.fastpath.driver"
local N = ...
return function(seed)
  local ft = flowtable.new{capacity = 1048576, idle_timeout = 1e9, active_timeout = 1e9}
  local d = ffi.new("lp_decoded")
  math.randomseed(seed)
  for i = 1, N do
    d.ip_version = 4
    d.ipproto = i % 3 == 0 and 17 or 6
    for k = 0, 15 do d.src[k] = math.random(0, 255); d.dst[k] = math.random(0, 255) end
    d.sport = math.random(1024, 65535); d.dport = 80
    ft:update(d, 1000 + i * 1e-6, 60)
  end
  -- the fields of a Driver that flush_flows uses (driver.lua M.new), without a ring
  local self = setmetatable({ft = ft, ipr = {flush = function() end}, exp_cap = driver.EXPORT_ROWS, exp_tags = {},
    npend = 0, pend_cap = 64, pend_tags = {}, renewed = {}, ntags = 0, tags = {}}, {__index = driver.Driver})
  self.exp = ffi.new("lp_flowrow[?]", self.exp_cap)
  self.pend = ffi.new("lp_flowrow[?]", self.pend_cap)
  collectgarbage()
  local c0, total = os.clock(), 0
  while true do
    local n = self:flush_flows()
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
    a = ap.parse_args(argv)
    flush = new_runtime().execute(SETUP, a.flows)
    for seed in range(1, a.passes + 1):
        cpu, total, live = flush(seed)
        assert int(total) == a.flows and int(live) == 0
        print(f"flush_flows of {int(total):,} flows: {cpu:.3f} s CPU, {cpu / total * 1e9:.0f} ns per flow", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
