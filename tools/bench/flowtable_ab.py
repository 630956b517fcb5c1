"""A/B CPU time of the fast path's decode and flow-table update (update_batch) at two commits, in one process.

    python tools/bench/flowtable_ab.py [--before 305f0e9] [--after WORKTREE] [--packets 1000000] [--runs 7]
    python tools/bench/flowtable_ab.py --before main --corpus flows-100k,dns,mixed-zipf [--capacity 1048576]

Each side's engine/fastpath/decode.lua and flowtable.lua (read with `git show COMMIT:PATH`, or from the work
tree for the after side) is loaded into its own LuaJIT state (lupa), so both run in the same process on the
same packets; the sides alternate run by run.  Two seeded captures, built in memory: TCP (the records of
tests/data/tcp-echo-many-flows.pcap repeated: 500 connections with handshakes) and UDP (2 000 seeded
flows, 64-byte payloads: traffic without TCP).  Per run a fresh flow table; per batch of 1 024 packets:
decode them into the batch array (timed: decode), then update_batch (timed: flow table).  Times are
os.clock() (CPU time of this process), ns per packet, min / median / max over the runs.
`--corpus` replaces the two captures by the benchmark corpus's --quick captures (tools/bench/corpus.py, made on
first use), fed in order with the flow table at the driver's default capacity (2^20 flows).
"""
from __future__ import annotations

import argparse
import os
import random
import statistics
import struct
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))

MODULES = {"luaprobe.engine.fastpath.decode": "engine/fastpath/decode.lua",
           "luaprobe.engine.fastpath.flowtable": "engine/fastpath/flowtable.lua"}

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
} bench_pkt;
]]
-- frames: one Lua string of concatenated frames; lens, secs, usecs: Lua arrays; returns (decode s, update s)
return function(frames, lens, secs, usecs, cap, linktype)
  linktype = linktype or 1
  local n = #lens
  local b = ffi.new("bench_pkt[?]", n)
  local base = ffi.cast("const uint8_t *", frames)
  local off = 0
  for i = 0, n - 1 do
    local p = b[i]
    p.data = base + off
    p.caplen, p.wirelen, p.linktype = lens[i + 1], lens[i + 1], linktype
    p.ts_sec, p.ts_nsec = secs[i + 1], usecs[i + 1] * 1000
    off = off + lens[i + 1]
  end
  -- per batch of 1024: decode it (timed: decode), then the flow table (timed: flow table), as the driver does
  local ft = flowtable.new{capacity = cap or 65536}
  local tdec, tupd = 0, 0
  for k = 0, n - 1, 1024 do
    local m = math.min(1024, n - k)
    local t0 = os.clock()
    for i = k, k + m - 1 do
      local p = b[i]
      decode.decode(p.d, p.data, p.caplen, linktype)
    end
    local t1 = os.clock()
    ft:update_batch(b + k, m)
    tdec, tupd = tdec + t1 - t0, tupd + os.clock() - t1
  end
  return tdec, tupd, ft.created
end
'''


def source(commit: str | None, path: str, tree: str) -> str:
    if commit is None:
        return open(os.path.join(tree, path)).read()
    return subprocess.run(["git", "-C", REPO, "show", f"{commit}:{path}"], capture_output=True, text=True,
                          check=True).stdout


def side(commit, tree):
    from lupa import luajit21 as lupa
    lua = lupa.LuaRuntime(encoding=None)
    preload = lua.eval("package.preload")
    for name, path in MODULES.items():
        preload[name.encode()] = lua.eval("function(src, name) return function() "
                                          "return assert(loadstring(src, '=' .. name))() end end")(
            source(commit, path, tree).encode(), name.encode())
    return lua, lua.execute(BENCH)


def read_pcap(path: str, n: int | None = None):
    """(sec, usec, frame) of the records of a little-endian microsecond pcap, and its link type."""
    with open(path, "rb") as f:
        buf = f.read()
    linktype = struct.unpack_from("<I", buf, 20)[0]
    recs, pos = [], 24
    while pos + 16 <= len(buf) and (n is None or len(recs) < n):
        sec, usec, caplen, _ = struct.unpack_from("<IIII", buf, pos)
        recs.append((sec, usec, buf[pos + 16:pos + 16 + caplen]))
        pos += 16 + caplen
    return recs, linktype


def tcp_capture(n: int):
    with open(os.path.join(REPO, "tests", "data", "tcp-echo-many-flows.pcap"), "rb") as f:
        buf = f.read()
    recs, pos = [], 24
    while pos + 16 <= len(buf):
        sec, usec, caplen, _ = struct.unpack_from("<IIII", buf, pos)
        recs.append((sec, usec, buf[pos + 16:pos + 16 + caplen]))
        pos += 16 + caplen
    span = recs[-1][0] - recs[0][0] + 1
    out = []
    rep = 0
    while len(out) < n:
        for sec, usec, fr in recs:
            out.append((sec + rep * span, usec, fr))
            if len(out) == n:
                break
        rep += 1
    return out


def udp_capture(n: int, flows: int = 2000, seed: int = 7):
    sys.path.insert(0, REPO)
    from tests.pktbuild import ether, ipv4, udp
    rng = random.Random(seed)
    tuples = [(f"10.{rng.randrange(256)}.{rng.randrange(256)}.{rng.randrange(1, 255)}", rng.randrange(1024, 65536),
               f"172.16.{rng.randrange(256)}.{rng.randrange(1, 255)}", rng.choice([53, 123, 443, 5353]))
              for _ in range(flows)]
    frames = [ether(ipv4(s, d, 17, udp(s, d, sp, dp, bytes(64)))) for s, sp, d, dp in tuples]
    out = []
    t = 1_700_000_000_000_000
    for i in range(n):
        t += rng.randrange(1, 200)
        out.append((t // 1_000_000, t % 1_000_000, frames[rng.randrange(flows)]))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--before", default="305f0e9", help="commit of the before side (default 305f0e9)")
    ap.add_argument("--after", default=REPO, help="work tree of the after side (default: this one)")
    ap.add_argument("--packets", type=int, default=1_000_000)
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--corpus", help="comma-separated corpus shapes (--quick captures) instead of tcp/udp")
    ap.add_argument("--capacity", type=int, help="flow table capacity (default 65536; 2^20 with --corpus)")
    a = ap.parse_args(argv)
    sides = {"before": side(a.before, REPO), "after": side(None, a.after)}
    if a.corpus:
        sys.path.insert(0, REPO)
        from tools.bench import corpus
        caps = ((c, *read_pcap(corpus.make(c, True))) for c in a.corpus.split(","))
        cap = a.capacity or 1 << 20
    else:
        caps = (("tcp", tcp_capture(a.packets), 1), ("udp", udp_capture(a.packets), 1))
        cap = a.capacity or 65536
    for name, pkts, linktype in caps:
        frames = b"".join(p[2] for p in pkts)
        res = {s: ([], []) for s in sides}
        for _ in range(a.runs):
            for s, (lua, fn) in sides.items():
                dec, upd, created = fn(frames, lua.table_from([len(p[2]) for p in pkts]),
                                       lua.table_from([p[0] for p in pkts]), lua.table_from([p[1] for p in pkts]),
                                       cap, linktype)
                res[s][0].append(dec * 1e9 / len(pkts))
                res[s][1].append(upd * 1e9 / len(pkts))
        for s, (dec, upd) in res.items():
            print(f"{name} {s:6} {len(pkts)} packets, {created} flows  decode ns/packet min/median/max "
                  f"{min(dec):.1f}/{statistics.median(dec):.1f}/{max(dec):.1f}  flow table "
                  f"{min(upd):.1f}/{statistics.median(upd):.1f}/{max(upd):.1f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
