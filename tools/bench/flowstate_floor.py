"""Benchmark: the flowstate hook's own work in a bare LuaJIT loop — the LuaJIT limit for that hook (issue 10).

    python tools/bench/flowstate_floor.py [--flows 100000,1000000] [--packets-per-flow 2] [--keys ffi,number] [--runs 3]

The corpus shape ``flowstate`` (tools/bench/shapes.py) runs ``local id = layer:packet():flowid():id();
state[id] = (state[id] or 0) + 1`` per packet.  With many flows its cost is LuaJIT's: one interned 41-byte string
per new flow (the engine formats the key once per flow and keeps it per flow slot; a Trisul flow id is a string) and
a script table holding one entry per flow.  This loop does just that, in one fresh process per run, no engine code:
packet p belongs to flow p for the first --flows packets (each flow's first packet, as in flows-100k / flows-1m,
where every flow starts in the first pass), then to a uniformly random flow; ``ffi`` keys are ``ffi.string`` of a
41-byte buffer holding the flow number (as packet.lua's key cache makes them), ``number`` keys are the flow number
itself (no string: what the table alone costs).  Prints ns a packet, min / median / max over --runs processes.
Compare with corpus_bench.py's flowstate cell minus its empty cell on the same shape (docs/benchmarks.md "A fresh
machine").
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys

LOOP = """
local ffi = require("ffi")
return function(nflows, npk, mode)
  math.randomseed(1)
  local buf = ffi.new("char[41]")
  ffi.fill(buf, 41, 65)
  local u32 = ffi.cast("uint32_t *", buf)
  local state, cache, random = {}, {}, math.random
  local t0 = os.clock()
  for p = 1, npk do
    local fl = p <= nflows and p or random(nflows)
    local id = cache[fl]
    if not id then
      if mode == "ffi" then u32[1] = fl; u32[5] = fl * 2654435761 % 4294967296; id = ffi.string(buf, 41)
      else id = fl end
      cache[fl] = id
    end
    state[id] = (state[id] or 0) + 1
  end
  return (os.clock() - t0) / npk * 1e9
end"""


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--flows", default="100000,1000000", help="comma-separated flow counts")
    ap.add_argument("--packets-per-flow", type=float, default=2.0, help="packets = flows x this")
    ap.add_argument("--keys", default="ffi,number", help="ffi (a 41-byte string per flow) and/or number")
    ap.add_argument("--runs", type=int, default=3, help="fresh processes per cell")
    ap.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        from lupa.luajit21 import LuaRuntime
        flows, packets, mode = int(args.child[0]), int(args.child[1]), args.child[2]
        print(LuaRuntime().execute(LOOP)(flows, packets, mode))
        return 0
    print("| keys | flows | packets | ns a packet min / median / max |\n|---|---:|---:|---:|")
    for mode in args.keys.split(","):
        for flows in (int(x) for x in args.flows.split(",")):
            packets = int(flows * args.packets_per_flow)
            ns = [float(subprocess.run([sys.executable, __file__, "--child", str(flows), str(packets), mode],
                                       capture_output=True, text=True, check=True).stdout) for _ in range(args.runs)]
            print(f"| {mode} | {flows:,} | {packets:,} | {min(ns):.0f} / {statistics.median(ns):.0f} / {max(ns):.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
