"""Benchmark: A/B of the capture process's file loop (engine/capture/capture.lua ``file``: the pcap walker, the copy of
each record into the packet ring, its publishes and the file's size checks) between copies of the Lua modules,
alternating, one fresh process per run.

    python tools/bench/capture_ab.py [--corpus small-few,mixed-zipf] [--rounds 6] [--runs 3] [--mb 40] NAME=DIR ...

DIR is a folder holding ``engine/`` and ``shm/`` (e.g. ``git archive main engine shm | tar -x -C DIR``) whose Lua
modules the run loads (``-``: this checkout's); the compiled _lpsync is this checkout's.  Each run maps the corpus
shape's --quick capture, and copies its first --mb MiB (the records that end within them) into a 64 MiB packet ring
formatted afresh for every pass, with nobody consuming (so no pass waits for space): one pass to compile the traces,
then --runs passes, the minimum of their thread CPU time per packet.  The fifth argument of ``file`` is what that
tree's capture.lua takes: a descriptor (``fd``: the size check at every publish) or the older ``size_now`` function
(checked every 4096 records).  Prints per variant min / median / max over the rounds.

``--stream``: the stream loop instead (``stream`` / ``Stream:feed``, what stdin and FIFOs go through): the same
bytes copied once into a buffer, then walked per pass by a fresh stream reader fed all of them at once (the read
system calls of engine/capture/process.py are not in it: the loop's own cost per record only).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)

from tools.bench.stages_ab import PRELUDE  # noqa: E402

CHILD = PRELUDE + r'''
import time
path, runs, limit, stream = sys.argv[3], int(sys.argv[4]), int(sys.argv[5]), sys.argv[6] == "stream"
lua_root = sys.argv[1] if src == "-" else src
from luaprobe.engine.capture.pcapfile import open_capture
from luaprobe.shm.luajit import new_runtime
takes_fd = "function M.file(r, addr, size, stop, fd" in open(os.path.join(lua_root, "engine/capture/capture.lua")).read()
lua = new_runtime()
run = lua.eval("""function(addr, size, arg)
  local ffi = require("ffi")
  local ring = require("luaprobe.shm.ring")
  local capture = require("luaprobe.engine.capture.capture")
  BUF = BUF or ffi.new("uint8_t[?]", ring.region_size(64 * 1048576, true))
  local r = ring.format(BUF, 64 * 1048576, true)
  local n = capture.file(r, addr, size, function() return false end, arg)
  return n
end""")
feed = lua.eval("""function(addr, size)
  local ffi = require("ffi")
  local ring = require("luaprobe.shm.ring")
  local capture = require("luaprobe.engine.capture.capture")
  BUF = BUF or ffi.new("uint8_t[?]", ring.region_size(64 * 1048576, true))
  if not SBUF then SBUF = ffi.new("uint8_t[?]", size); ffi.copy(SBUF, ffi.cast("const void *", addr), size) end
  local r = ring.format(BUF, 64 * 1048576, true)
  local st = capture.stream(SBUF, size)
  local err = st:feed(r, size, true, function() return false end)
  return st.packets
end""")
if stream:
    run = lambda addr, size, arg: feed(addr, size)  # noqa: E731
with open_capture(path) as c:
    size = min(c.size, limit)
    arg = c.fd if takes_fd else c.size_now
    run(c.address, size, arg)
    best = float("inf")
    for _ in range(runs):
        t = time.thread_time_ns()
        n = run(c.address, size, arg)
        best = min(best, (time.thread_time_ns() - t) / n)
print(json.dumps({"packets": int(n), "ns_per_packet": best}))
'''


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--corpus", default="small-few,mixed-zipf")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--mb", type=int, default=40, help="MiB of the capture copied per pass (the ring holds 64)")
    ap.add_argument("--stream", action="store_true", help="the stream loop (stdin, FIFOs) instead of the file loop")
    ap.add_argument("variants", nargs="+", help="NAME=DIR")
    a = ap.parse_args(argv)
    from tools.bench import corpus
    from tools.bench.stages_ab import alternate
    var = [v.split("=", 1) for v in a.variants]
    for c in a.corpus.split(","):
        path = corpus.make(c, True)
        res = alternate(var, a.rounds, CHILD, [path, str(a.runs), str(a.mb << 20),
                                                   "stream" if a.stream else "file"])
        packets = res[var[0][0]][0]["packets"]
        print(f"{c} ({packets} packets a pass): capture {'stream' if a.stream else 'file'} loop, thread CPU ns/packet, min / median / max over "
              f"{a.rounds} rounds")
        for name, _ in var:
            xs = [x["ns_per_packet"] for x in res[name]]
            print(f"| {name} | {min(xs):.1f} / {statistics.median(xs):.1f} / {max(xs):.1f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
