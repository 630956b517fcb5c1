"""CPU time of each loop of the flow table's update_batch, at two versions, in one process (issue 10).

    python tools/bench/flowtable_loops.py --before ba2feac [--after WORKTREE] \
        --corpus flows-100k,flows-1m,mixed-zipf,small-few,dns [--runs 7] [--passes 2] [--huge-pages off] \
        [--prefault-ahead 16384]

Each side's engine/fastpath/flowtable.lua (``git show COMMIT:PATH``, or the after side's work tree) is loaded
into its own LuaJIT state (lupa) with a timer call inserted before the comment that opens each loop of
update_batch ("-- 1. lookup", "-- b:", "-- c: probe", "-- d:", "-- 2. insertion", FT:prefault's call, the insertion loop itself,
"-- 3. per packet"); a version without one of those comments shows 0 in that column and its time in the
column before.  decode.lua is this work tree's for both sides.  Per run a fresh flow table at the driver's
default capacity (2^20 flows; its arrays on 4 KiB pages, `--huge-pages off`, what `auto` gives on this
machine: docs/benchmarks.md "The flow table's huge_pages setting"; `on` as before 2026-12-01) gets the --quick capture of each corpus shape (tools/bench/corpus.py) in
1 024-packet batches: decode (not timed), then update_batch (timed).  Pass 1 is the capture as it is; pass 2
gives the same packets to the same table again, --passes - 1 times, each time 1 s + the capture's span later
in packet time (every flow known, the LRU moves as in pass 1), each TCP segment's sequence number 2^30 further per
pass (mod 2^32) so a flow goes on where pass 1 left it: replayed unchanged, every data segment of pass 2 was behind its
flow's highest sequence end, i.e. a retransmission (small-few 500 000 of 500 000, mixed-zipf 311 220 of 500 000;
docs/benchmarks.md "Known flows, 2026-12-02, session 20 (2)"); with the shift pass 2 counts pass 1's (2 540,
1 653).  A flow's pass carries < 2^30 sequence bytes in these captures.  The sides alternate run by run, the first
one alternately before and after (with 1M flows the side run second was ~30 % slower in pass 1 with the same
code: the kernel's zero-filling of fresh record pages), each after a full collection in both Lua states
(no earlier table still mapped).

``--prefault-ahead N``: the tables of a side whose flowtable.lua has ``start_prefaulter`` start the prefault helper
thread (what the engine does by default since it exists; shm/_lpsync.c), N records ahead; default 0, none.

Columns, CPU ns per packet of the pass (this thread's CPU time, CLOCK_THREAD_CPUTIME_ID: the kernel's page zeroing
done in the loops' thread included, a prefault helper thread's not; before 2026-12-01 03:00 os.clock, the process's):
total min / median / max over the runs, then the median of each part: key (keys and hashes), touch (slots
and records touched), probe, lru (LRU neighbours touched), reserve (index growth), new (flow creation),
loop3 (counters, TCP state, LRU moves), prefault (FT:prefault: the new records' pages this thread mapped itself
because the prefault helper was behind, and the index's slots found again after a doubling; until 2026-12-01
session 17 in the reserve column).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, REPO)

from tools.bench import corpus  # noqa: E402
from tools.bench.flowtable_ab import read_pcap, source  # noqa: E402

#: (comment that opens a part of update_batch, its column); the timer call goes before the line
MARKS = [("  -- 1. lookup", 1), ("  -- b: with more flows", 2), ("  -- c: probe", 3), ("  -- d: ", 4),
         ("  -- 2. insertion", 5), ("    self:prefault(nmiss)", 8), ("    for m = 0, nmiss - 1 do", 6),
         ("  -- 3. per packet", 7)]
COLUMNS = ["key", "touch", "probe", "lru", "reserve", "new", "loop3", "prefault"]

BENCH = r'''
local ffi = require "ffi"
local decode = require "luaprobe.engine.fastpath.decode"
local flowtable = require "luaprobe.engine.fastpath.flowtable"
ffi.cdef [[
typedef struct {
  const uint8_t *data;
  uint32_t ts_sec, ts_nsec, wirelen, caplen, linktype, ifindex;
  int32_t flow, dir;
  double flow_uid;
  lp_decoded d;
} loops_pkt;
]]
pcall(ffi.cdef, "typedef struct { long tv_sec, tv_nsec; } loops_ts; int clock_gettime(int clk, loops_ts *ts);")
local ts_ = ffi.new("loops_ts")
local function clock()        -- this thread's CPU seconds (CLOCK_THREAD_CPUTIME_ID)
  ffi.C.clock_gettime(3, ts_)
  return tonumber(ts_.tv_sec) + tonumber(ts_.tv_nsec) * 1e-9
end
local acc = {}
local last, tl = 0, 0          -- part 0: outside update_batch
-- the timer the marks call: the time since the previous mark goes to that mark's part
function LOOPS_MARK(i) local t = clock(); acc[last] = acc[last] + t - tl; last = i; tl = t end
-- returns {pass = {total, part 1 .. 8}} in seconds
return function(frames, lens, secs, usecs, cap, linktype, passes, huge, ahead)
  local n = #lens
  local b = ffi.new("loops_pkt[?]", n)
  local base = ffi.cast("const uint8_t *", frames)
  local off = 0
  for i = 0, n - 1 do
    local p = b[i]
    p.data = base + off
    p.caplen, p.wirelen, p.linktype = lens[i + 1], lens[i + 1], linktype
    p.ts_sec, p.ts_nsec = secs[i + 1], usecs[i + 1] * 1000
    off = off + lens[i + 1]
  end
  local span = secs[n] - secs[1] + 1
  local ft = flowtable.new{capacity = cap, huge_pages = huge}
  if ahead > 0 and ft.start_prefaulter then assert(ft:start_prefaulter(ahead)) end
  local res = {}
  for pass = 1, passes do
    for i = 0, 8 do acc[i] = 0 end
    local total = 0
    for k = 0, n - 1, 1024 do
      local m = math.min(1024, n - k)
      for i = k, k + m - 1 do
        local p = b[i]
        if pass > 1 then p.ts_sec = p.ts_sec + span end
        decode.decode(p.d, p.data, p.caplen, linktype)
        -- pass 2 on: a TCP segment's sequence number 2^30 further a pass (the flows go on, not replayed: docstring)
        if pass > 1 then p.d.tcp_seq = bit.tobit(p.d.tcp_seq + (pass - 1) * 0x40000000) end
      end
      local t0 = clock()
      last, tl = 0, t0
      ft:update_batch(b + k, m)
      LOOPS_MARK(0)
      total = total + clock() - t0
    end
    res[pass] = {total, acc[1], acc[2], acc[3], acc[4], acc[5], acc[6], acc[7], acc[8]}
  end
  if ft.stop_prefaulter then ft:stop_prefaulter() end
  return res
end
'''


def side(commit: str | None, tree: str):
    from lupa import luajit21 as lupa
    src = source(commit, "engine/fastpath/flowtable.lua", tree)
    for mark, i in MARKS:
        if mark in src:
            src = src.replace(mark, f"  LOOPS_MARK({i})\n{mark}", 1)
    from luaprobe.shm.luajit import lpsync_path
    lua = lupa.LuaRuntime(encoding=None)
    lua.eval("function(p) package.loaded['luaprobe.config'] = {lpsync = p} end")(lpsync_path().encode())
    preload = lua.eval("package.preload")
    loader = lua.eval("function(src, name) return function() return assert(loadstring(src, '=' .. name))() end end")
    preload[b"luaprobe.engine.fastpath.decode"] = loader(
        source(None, "engine/fastpath/decode.lua", REPO).encode(), b"luaprobe.engine.fastpath.decode")
    preload[b"luaprobe.engine.fastpath.flowtable"] = loader(src.encode(), b"luaprobe.engine.fastpath.flowtable")
    return lua, lua.execute(BENCH)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--before", required=True, help="commit of the before side")
    ap.add_argument("--after", default=REPO, help="work tree of the after side (default: this one)")
    ap.add_argument("--corpus", default="flows-100k,flows-1m,mixed-zipf,small-few,dns")
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--passes", type=int, default=2)
    ap.add_argument("--huge-pages", choices=("on", "off"), default="off",
                    help="the flow table's page size (flowtable.new's huge_pages); default off (4 KiB pages)")
    ap.add_argument("--prefault-ahead", type=int, default=0,
                    help="start the prefault helper thread, N records ahead, where the side's flow table has one")
    a = ap.parse_args(argv)
    sides = {"before": side(a.before, REPO), "after": side(None, a.after)}
    print("CPU ns/packet: total min/median/max | median of " + " ".join(COLUMNS))
    for shape in a.corpus.split(","):
        pkts, linktype = read_pcap(corpus.make(shape, True))
        frames = b"".join(p[2] for p in pkts)
        res = {s: [] for s in sides}
        for r in range(a.runs):
            for s in (list(sides) if r % 2 == 0 else list(sides)[::-1]):
                lua, fn = sides[s]
                for other, _fn in sides.values():       # no table of an earlier run still mapped
                    other.execute("collectgarbage(); collectgarbage()")
                out = fn(frames, lua.table_from([len(p[2]) for p in pkts]), lua.table_from([p[0] for p in pkts]),
                         lua.table_from([p[1] for p in pkts]), 1 << 20, linktype, a.passes,
                         a.huge_pages == "on", a.prefault_ahead)
                res[s].append([[v * 1e9 / len(pkts) for v in out[p + 1].values()] for p in range(a.passes)])
        for s, runs in res.items():
            for p in range(a.passes):
                cols = list(zip(*[r[p] for r in runs]))
                tot = cols[0]
                parts = " ".join(f"{name} {statistics.median(c):.0f}" for name, c in zip(COLUMNS, cols[1:]))
                print(f"{shape} {s:6} pass {p + 1}: {min(tot):.0f} / {statistics.median(tot):.0f} / {max(tot):.0f}"
                      f" | {parts}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
