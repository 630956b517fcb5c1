"""The capture process's copy loop alone (engine/capture/capture.lua ``file``): one packet ring against the sharder
over N rings, thread CPU per packet (docs/benchmarks.md, "Flow-sharded fast paths").

    .venv/bin/python tools/bench/sharder_loop.py [--corpus small-few,dns,mixed-zipf] [--shards 1,2] [--runs 4]
        [--max-ir-constants N]

The loop runs in this process's LuaJIT VM over the corpus capture mapped as the capture process maps it, with its
descriptor (tools/bench/corpus.py, the 500 000-packet files; the first 200 MB at most, so that it fits the rings;
the file is read once before: from the page cache) into rings of 256 MiB in anonymous
memory, reformatted before every run: nothing consumes them and nothing waits, so this is the copy loop's own cost
(read the record, decode and hash for the sharder, copy into the ring, publish).  The first run of each
configuration also takes the rings' first-touch page faults; the min / median / max are over the others.
``--max-ir-constants`` sets LuaJIT's IR-constant limit the sharder asks for (capture.lua MAX_IR_CONSTANTS;
500 is LuaJIT's default, with which the sharded loop ran in the interpreter).
"""
from __future__ import annotations

import argparse
import ctypes
import mmap
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))
from luaprobe.engine.capture.pcapfile import open_capture  # noqa: E402
from luaprobe.shm.luajit import new_runtime  # noqa: E402
from luaprobe.shm.ring import region_size  # noqa: E402
from tools.bench import corpus  # noqa: E402

CAP = 1 << 28
LIMIT = 200_000_000

SETUP = """function(addrs, cap, n, irconst)
  local ring, capture = require('luaprobe.shm.ring'), require('luaprobe.engine.capture.capture')
  if irconst then capture.MAX_IR_CONSTANTS = irconst end
  local rs = {}
  for i, a in ipairs(addrs) do ring.format(a, cap, true); rs[i] = ring.attach(a) end
  if n == 1 then return rs[1] end
  return capture.sharder(rs)
end"""

WALK = """function(r, a, s, fd)
  return (require('luaprobe.engine.capture.capture').file(r, a, s, function() return false end, fd))
end"""


def measure(path: str, n: int, runs: int, irconst) -> tuple[int, list]:
    """(packets, ns per packet of each run after the first) of the copy loop over `path` into `n` rings."""
    with open(path, "rb") as f:
        while f.read(1 << 24):
            pass
    cap = open_capture(path)
    mems = [mmap.mmap(-1, region_size(CAP, hints=True)) for _ in range(n)]
    addrs = [ctypes.addressof(ctypes.c_char.from_buffer(m)) for m in mems]
    lua = new_runtime()
    setup, walk = lua.eval(SETUP), lua.eval(WALK)
    out, packets = [], 0
    for _ in range(runs + 1):
        r = setup(lua.table_from(addrs), CAP, n, irconst)
        t0 = time.thread_time()
        packets = walk(r, cap.address, min(cap.size, LIMIT), cap.fd)
        out.append((time.thread_time() - t0) * 1e9 / packets)
    del r, setup, walk, lua
    cap.close()
    return packets, out[1:]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--corpus", default="small-few,dns,mixed-zipf")
    ap.add_argument("--shards", default="1,2")
    ap.add_argument("--runs", type=int, default=4)
    ap.add_argument("--max-ir-constants", type=int, default=None)
    args = ap.parse_args(argv)
    print(f"load average {os.getloadavg()}\n")
    print("| capture | rings | packets | ns per packet min / median / max |")
    print("|---|---:|---:|---|")
    for name in args.corpus.split(","):
        path = corpus.path_for(name, quick=True)
        for n in [int(x) for x in args.shards.split(",")]:
            packets, ns = measure(path, n, args.runs, args.max_ir_constants)
            ns.sort()
            print(f"| {name} | {n} | {packets:,} | {ns[0]:.1f} / {statistics.median(ns):.1f} / {ns[-1]:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
