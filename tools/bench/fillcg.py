"""Instructions per packet of the driver's fill (ring pop + decode + batch entry) and of the walk's decode, under
callgrind (issue 10).

    python tools/bench/fillcg.py [--corpus small-few,dns] [--packets 100000] [--tree WORKTREE ...] [--sim] [--hotloop N]
        [--traces K]

For each corpus shape (its --quick capture, the first --packets packets) and each tree (a work tree: its engine/
and shm/ Lua modules are loaded; default this one), a child process under
``valgrind --tool=callgrind --instr-atstart=no --collect-atstart=no`` copies the packets into one packet ring
large enough for all of them (as the capture process does: stages.lua's producer), pops them once with the real
``Driver:fill`` (the flow table's update_batch replaced by a no-op: that is tools/bench/flowtable_cg.py's part) to
compile the traces, rewinds the ring's consumer cursor and pops them again with collection on: **fill**.  Then
**walk**: the pcap walker and decode.decode over the same packets (tools/bench/corpus_bench.py's WALK without a
hook, stages.lua's walk), once to warm up and once counted.  Printed: instructions (Ir) per packet of each (with
--sim also callgrind's simulated L1 read / write misses and mispredicted conditional branches).  Counts, not time:
repeatable on a loaded machine (a few instructions a packet between processes, as LuaJIT picks its traces).  A small
C library built here with cc from valgrind/callgrind.h toggles the collection.  Needs valgrind and its headers.

``--traces K``: each process also runs tools/bench/jittraces.py's hook (as tools/bench/flowtable_cg.py --traces) and
prints its K costliest traces in the counted pass (Ir a packet in each one's pre-loop part and loop; source file and
start line, parent trace / exit, link), the Ir outside trace code and the aborted recordings of both passes (pass 1:
the compiling pass) with LuaJIT's error numbers; a trace compiled in the counted pass is marked ``*`` (its recording
and assembly are in the count, outside trace code: side traces of exits that only a batch's last packet takes, 2-4 a
process, ~3-7 Ir a packet each with 50 000 packets); a root trace of driver.lua gets ``at packet_K_(IPv6/6)``: the
capture's packet (from 1) at the ring cursor when the recording began, the one whose decode path it recorded, with
its IP version and protocol (ethertype and byte 23 / 20 of an Ethernet frame; ``lt1/8100`` and the like otherwise).
Environment: FILLCG_TEXIT=1 also counts the counted pass's exits to the interpreter; FILLCG_LINES=PATTERN logs the
lines each trace recorded in sources matching the Lua pattern (e.g. ``decode``; a ``record`` hook, more Ir outside
trace code); FILLCG_KEEP=DIR keeps the callgrind output and the trace log in DIR.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, REPO)

from tools.bench import jittraces  # noqa: E402

LIB = r"""
#include <valgrind/callgrind.h>
void cg_toggle(void) { CALLGRIND_TOGGLE_COLLECT; }
void cg_start(void) { CALLGRIND_START_INSTRUMENTATION; }
"""

BENCH = r'''
local lib, addr, size, limit, part = ...
local ffi = require("ffi")
local cg = ffi.load(lib)
ffi.cdef "void cg_toggle(void); void cg_start(void);"
local pcapfile = require("luaprobe.engine.capture.pcapfile")
local decode = require("luaprobe.engine.fastpath.decode")
local ring = require("luaprobe.shm.ring")
local driver = require("luaprobe.engine.fastpath.driver")
local packet = require("luaprobe.engine.plugins.packet")
local REC, recp, PKT = packet.REC_SIZE, packet.recp, packet.PKT

local function walk()
  local d, n = decode.new(), 0
  local r = pcapfile.open(addr, size)
  while n < limit do
    local p, caplen, _, _, _, linktype = r:next()
    if p == nil then break end
    decode.decode(d, p, caplen, linktype)
    n = n + 1
  end
  return n
end

cg.cg_start()
if part == "walk" then
  walk()
  cg.cg_toggle()
  local n = walk()
  cg.cg_toggle()
  return n
end
-- the ring: every packet's record fits (header, frame, 8-byte record header, 8-byte alignment)
local need, r = 0, pcapfile.open(addr, size)
for _ = 1, limit do
  local p, caplen = r:next()
  if p == nil then break end
  need = need + REC + caplen + 16
end
local cap = 1
while cap < need * 2 do cap = cap * 2 end
local mem = ffi.new("uint8_t[?]", ring.region_size(cap, true) + 64)
local base = tonumber(ffi.cast("intptr_t", mem))
base = base + (64 - base % 64) % 64
local prod = ring.format(base, cap, true)
r = pcapfile.open(addr, size)
local paddr, pkind = {}, {}   -- --traces: each record's address and its packet's kind (TRACE_WHERE)
for _ = 1, limit do
  local ptr, caplen, wirelen, ts_sec, ts_nsec, linktype, ifindex = r:next()
  if ptr == nil then break end
  local p = prod:reserve(REC + caplen)
  assert(p ~= nil, "ring full")
  if TRACES then
    paddr[#paddr + 1] = tonumber(ffi.cast("intptr_t", p))
    local et = caplen >= 24 and linktype == 1 and ptr[12] * 256 + ptr[13] or -1
    pkind[#pkind + 1] = et == 0x0800 and "IPv4/" .. ptr[23] or et == 0x86dd and "IPv6/" .. ptr[20]
      or ("lt%d/%x"):format(linktype, et)
  end
  local h = ffi.cast(recp, p)
  h.kind, h.ts_sec, h.ts_nsec, h.wirelen, h.caplen = PKT, ts_sec, ts_nsec, wirelen, caplen
  h.linktype, h.ifindex = linktype, ifindex
  ffi.copy(p + REC, ptr, caplen)
  prod:commit()
end
prod:publish()
local drv = driver.new({ ring = base, batch = packet.BATCH, capacity = 65536 })
drv.ft.update_batch = function() end
if TRACES then
  -- a root trace of driver.lua starts at the top of the fill loop: the ring cursor is at the packet it records
  -- first; printed "packet K (IPv6/6)": K from 1 in capture order, then the ethertype's IP version and protocol
  function TRACE_WHERE(fi)
    if not (fi.source or ""):find("driver") then return nil end
    local q = tonumber(ffi.cast("intptr_t", drv.ring.cur.q))
    local lo, hi = 1, #paddr
    if hi == 0 or paddr[1] > q + 16 then return nil end
    while lo < hi do
      local mid = math.floor((lo + hi + 1) / 2)
      if paddr[mid] <= q + 16 then lo = mid else hi = mid - 1 end
    end
    return ("packet_%d_(%s)"):format(lo, pkind[lo])
  end
end
local dr = drv.ring
local head0, popped0 = dr.head_local, dr.popped_local
local function pass()
  local n = 0
  while true do
    local k = drv:fill()
    if k == 0 then break end
    n = n + k
  end
  return n
end
pass()
dr.head_local, dr.popped_local, dr.tail_cache = head0, popped0, head0
drv.sec = -1
COLLECT = true
cg.cg_toggle()
local n = pass()
cg.cg_toggle()
drv.stop_profile()
return n
'''


def child(lib: str, part: str, shape: str, limit: int) -> None:
    """Under callgrind: the fill or walk pass over `limit` packets of `shape`'s --quick capture."""
    from tools.bench import corpus
    from luaprobe.engine.capture.pcapfile import open_capture
    from luaprobe.shm.luajit import new_runtime
    lua = new_runtime()
    hot = int(os.environ.get("FILLCG_HOTLOOP", "0"))
    if hot > 0:
        lua.execute(f"jit.opt.start('hotloop={hot}')")
    tlog = os.environ.get("FILLCG_TRACES")
    if tlog:
        jittraces.install(lua, bool(os.environ.get("FILLCG_TEXIT")), os.environ.get("FILLCG_LINES"))
    with open_capture(corpus.make(shape, True)) as cap:
        n = lua.execute(BENCH, lib.encode(), cap.address, cap.size, limit, part.encode())
    print(f"packets {n}")
    if tlog:
        jittraces.write_log(lua, tlog)


def use_tree(tree: str) -> None:
    """Load luaprobe.engine / luaprobe.shm's Lua modules from work tree `tree` in every VM made from now on."""
    import luaprobe.shm.luajit as lj
    orig = lj.package_dirs

    def dirs():
        d = orig()
        d["engine"] = os.path.join(os.path.abspath(tree), "engine")
        d["shm"] = os.path.join(os.path.abspath(tree), "shm")
        return d
    lj.package_dirs = dirs


EVENTS = ("Ir", "Dr", "Dw", "I1mr", "D1mr", "D1mw", "ILmr", "DLmr", "DLmw", "Bc", "Bcm", "Bi", "Bim")


def measure(lib: str, work: str, tree: str, part: str, shape: str, limit: int, sim: bool = False,
            traces: int = 0) -> dict:
    """{event: count per packet} of `part` ("fill" or "walk") with `tree`'s modules: Ir, and with `sim` callgrind's
    cache and branch simulation's events too (D1mr / D1mw L1 misses, Bcm mispredicted conditional branches); with
    `traces` > 0 also "traces": tools/bench/jittraces.py's report of that process (its `traces` costliest traces)."""
    out = os.path.join(work, f"cg.{part}.out")
    tlog = os.path.join(work, f"traces.{part}")
    extra = ["--cache-sim=yes", "--branch-sim=yes"] if sim else []
    if traces:
        extra += jittraces.CALLGRIND_ARGS
    env = dict(os.environ, FILLCG_TRACES=tlog) if traces else None
    p = subprocess.run(["valgrind", "--tool=callgrind", "--instr-atstart=no", "--collect-atstart=no", *extra,
                        f"--callgrind-out-file={out}", sys.executable, os.path.abspath(__file__),
                        "--child", lib, part, shape, str(limit), tree], capture_output=True, text=True, env=env)
    got = re.search(r"Collected : ([\d ]+)", p.stderr)
    npk = re.search(r"packets (\d+)", p.stdout)
    if p.returncode or not got or not npk:
        raise SystemExit(f"fillcg: {shape} {part}: exit {p.returncode}: {p.stderr[-800:]}")
    n = int(npk.group(1))
    ev = {k: int(v) / n for k, v in zip(EVENTS if sim else ("Ir",), got.group(1).split())}
    if traces:
        ev["traces"] = f"{shape} {part}:\n" + jittraces.report(out, tlog, n, ev["Ir"] * n, traces)
    return ev


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--corpus", default="small-few,dns")
    ap.add_argument("--packets", type=int, default=100000, help="packets of each capture (its first)")
    ap.add_argument("--tree", action="append", help="work tree whose engine/ and shm/ are measured (repeatable)")
    ap.add_argument("--parts", default="fill,walk")
    ap.add_argument("--sim", action="store_true", help="also simulate caches and branches (D1mr, D1mw, Bcm)")
    ap.add_argument("--hotloop", type=int, default=0,
                    help="LuaJIT's hotloop parameter (default: LuaJIT's 56): another value records each loop's trace "
                         "on another packet, as another process's hot counters and penalties would")
    ap.add_argument("--traces", type=int, default=0, metavar="K",
                    help="also print, after each row, each part's process's K traces with the most Ir a packet "
                         "(trace, source:start line, parent trace / exit of a side trace, link, Ir in the pre-loop "
                         "part and the loop, the packet a root trace of driver.lua was recorded on), the Ir outside "
                         "trace code and the aborted recordings (tools/bench/jittraces.py)")
    ap.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.hotloop > 0:
        os.environ["FILLCG_HOTLOOP"] = str(a.hotloop)
    if a.child:
        use_tree(a.child[4])
        child(a.child[0], a.child[1], a.child[2], int(a.child[3]))
        return 0
    trees = a.tree or [REPO]
    with tempfile.TemporaryDirectory() as work:
        if os.environ.get("FILLCG_KEEP"):
            work = os.environ["FILLCG_KEEP"]
        lib = os.path.join(work, "libcgtoggle.so")
        with open(os.path.join(work, "cg.c"), "w") as f:
            f.write(LIB)
        subprocess.run(["cc", "-O2", "-shared", "-fPIC", "-o", lib, os.path.join(work, "cg.c")], check=True)
        show = ("Ir", "D1mr", "D1mw", "Bcm") if a.sim else ("Ir",)
        parts = a.parts.split(",")
        print("| corpus | tree | " + " | ".join(f"{p} {e}" for p in parts for e in show) + " |")
        print("|---|---|" + "---:|" * (len(parts) * len(show)))
        for shape in a.corpus.split(","):
            for tree in trees:
                ev = [measure(lib, work, tree, part, shape, a.packets, a.sim, a.traces) for part in parts]
                print(f"| {shape} | {tree} | " + " | ".join(f"{x[e]:.2f}" for x in ev for e in show) + " |", flush=True)
                for x in ev:
                    if "traces" in x:
                        print(x["traces"], flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
