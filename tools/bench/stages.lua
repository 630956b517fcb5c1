--[[
tools/bench/stages.lua — CPU time per packet of each fast-path stage on one capture, in one
thread (run by tools/bench/stages.py).  Thread CPU time (CLOCK_THREAD_CPUTIME_ID), not wall
time, so a busy machine inflates the figures less.

    local stages = dofile("tools/bench/stages.lua")
    stages.run(addr, size, opts) -> { packets = n, walk = ns, copy = ns, fill = ns, flows = ns, ... }

Stages (ns per packet, each the minimum over opts.runs passes over the file):
  walk    pcapfile walker + decode of every packet, nothing else (corpus_bench's walk without the hook)
  copy    the capture process's work: walker + copy of every record into the packet ring
  fill    the driver's Driver:fill without the flow table: ring pop, decode, batch accounting
  flows   the flow table's update_batch (lookup, insertion, counters)
The producer runs `ahead` bytes in front of the consumer (opts.ahead, default one batch):
a small value keeps the records in this core's cache; the ring size keeps them as far away
as a producer on another core that filled the ring.
]]
local ffi = require("ffi")
local pcapfile = require("luaprobe.engine.capture.pcapfile")
local decode = require("luaprobe.engine.fastpath.decode")
local ring = require("luaprobe.shm.ring")
local driver = require("luaprobe.engine.fastpath.driver")
local packet = require("luaprobe.engine.plugins.packet")

pcall(ffi.cdef, "typedef struct { long tv_sec; long tv_nsec; } lp_bench_ts; int clock_gettime(int, lp_bench_ts *);")
local ts = ffi.new("lp_bench_ts")
local function cpu_ns()
  ffi.C.clock_gettime(3, ts)                 -- CLOCK_THREAD_CPUTIME_ID
  return tonumber(ts.tv_sec) * 1e9 + tonumber(ts.tv_nsec)
end

local REC, recp, PKT = packet.REC_SIZE, packet.recp, packet.PKT
local M = {}

local function walk(addr, size)
  local d, n = decode.new(), 0
  local r = pcapfile.open(addr, size)
  while true do
    local p, caplen, _, _, _, linktype = r:next()
    if p == nil then break end
    decode.decode(d, p, caplen, linktype)
    n = n + 1
  end
  return n
end

-- one pass: producer (walker + copy into the ring, as capture.lua's file loop) and the driver
-- alternate; the producer stays at most `ahead` bytes in front.  Returns packets, copy ns,
-- fill ns (flow table excluded), flow-table ns.
local function pipeline(addr, size, opts)
  local cap = opts.ring or 33554432
  local hints = not opts.no_hints               -- the packet ring's prefetch hints, as the fast path formats it
  local mem = ffi.new("uint8_t[?]", ring.region_size(cap, hints) + 64)
  local base = tonumber(ffi.cast("intptr_t", mem))
  base = base + (64 - base % 64) % 64
  local prod = ring.format(base, cap, hints)
  local drv = driver.new({ ring = base, batch = opts.batch or packet.BATCH, capacity = opts.capacity })
  local ft, t_flows = drv.ft, 0
  local update_batch = getmetatable(ft).update_batch
  ft.update_batch = function(self, b, n)
    local t = cpu_ns()
    update_batch(self, b, n)
    t_flows = t_flows + cpu_ns() - t
  end
  local ahead = opts.ahead or 0
  local r = pcapfile.open(addr, size)
  local t_copy, t_fill, n, done = 0, 0, 0, false
  local ptr, caplen, wirelen, ts_sec, ts_nsec, linktype, ifindex     -- a record waiting for ring space
  while true do
    local t = cpu_ns()
    while not done do
      if ahead > 0 and prod.tail_local - drv.ring.head_local >= ahead then break end
      if ptr == nil then
        ptr, caplen, wirelen, ts_sec, ts_nsec, linktype, ifindex = r:next()
        if ptr == nil then done = true; break end
      end
      local p = prod:reserve(REC + caplen)
      if p == nil then break end                           -- ring full: the driver's turn
      local h = ffi.cast(recp, p)
      h.kind, h.ts_sec, h.ts_nsec, h.wirelen, h.caplen = PKT, ts_sec, ts_nsec, wirelen, caplen
      h.linktype, h.ifindex = linktype, ifindex
      ffi.copy(p + REC, ptr, caplen)
      prod:commit()
      ptr = nil
    end
    prod:publish()
    local t2 = cpu_ns()
    t_copy = t_copy + t2 - t
    local k = drv:fill()
    local t3 = cpu_ns()
    t_fill = t_fill + t3 - t2
    n = n + k
    if k == 0 and done then break end
  end
  drv.stop_profile()
  return n, t_copy, t_fill - t_flows, t_flows
end

--- opts: runs (default 5), ring (bytes), batch, capacity (flow table), ahead (bytes the producer
--- may run ahead; 0 = until the ring is full).  Returns ns/packet per stage (minimum over runs).
function M.run(addr, size, opts)
  opts = opts or {}
  local best = { walk = math.huge, copy = math.huge, fill = math.huge, flows = math.huge }
  local n = walk(addr, size)                  -- warm-up: page cache, traces
  for _ = 1, opts.runs or 5 do
    local t = cpu_ns()
    walk(addr, size)
    best.walk = math.min(best.walk, (cpu_ns() - t) / n)
    local k, c, f, fl = pipeline(addr, size, opts)
    assert(k == n, ("pipeline saw %d packets, the walk %d"):format(k, n))
    best.copy = math.min(best.copy, c / n)
    best.fill = math.min(best.fill, f / n)
    best.flows = math.min(best.flows, fl / n)
    collectgarbage()
  end
  best.packets = n
  return best
end

return M
