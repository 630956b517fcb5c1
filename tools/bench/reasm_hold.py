"""Benchmark: what TCP reassembly's wait for acknowledged peer bytes costs per segment (engine/streams/tcpreasm.lua).

    python tools/bench/reasm_hold.py [--conns 2000] [--exchanges 50] [--runs 21] [--variant both|asis|nohold] [--interp]

Every data segment (and FIN / RST) with an ACK asks ``peer_behind`` whether its ACK covers peer bytes not
delivered yet (mirror ports: the reply captured before the request; the segment is then held).  On a capture
in order nothing is ever held, so that question is pure overhead; this bench prices it.

Workload (one LuaJIT VM, no capture file, no Python in the loop; --interp: JIT off): --conns keep-alive connections, interleaved
round-robin so the flow table holds them all at once; each does a handshake, then --exchanges times a 400-byte
request, 8 response segments of 1448 bytes and a pure ACK of the client every 2 response segments, all in order
and acknowledging what the peer sent, then FIN both ways.  Payloads are a const uint8_t* (as the fast path
passes them); the data callback adds the lengths up.

Variants, run alternately in the same process (``--runs`` rounds, the order of the two swapped every round):

* **asis**   — engine/streams/tcpreasm.lua as it is;
* **nohold** — the same source with the hold check compiled out (``if false and ack and not f.replaying ...``:
  LuaJIT drops the dead branch), i.e. without peer_behind and its guards.

Prints per variant min / median / max of ns of process CPU time (os.clock: holds on a busy machine) per
R:packet call and per data segment, and the difference of the medians.  ``--variant asis|nohold --runs 1``
runs one variant once, for an instruction count A/B::

    valgrind --tool=callgrind --callgrind-out-file=/dev/null python tools/bench/reasm_hold.py \
        --variant asis --runs 1 --conns 2000 --exchanges 20          # then --runs 3, then --variant nohold

(the "Collected" line of each: the --runs 3 count minus the --runs 1 count is two runs, without Python's
start-up and the warm-up).  Results: docs/benchmarks.md.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)

HOLD_CHECK = "if ack and not f.replaying and"

BENCH_LUA = r"""
local ffi = require "ffi"
local src, conns, exchanges = ...
local SYN, FIN, ACK, PSH = 0x02, 0x01, 0x10, 0x08
local TWO32 = 4294967296
local buf = ffi.new("uint8_t[1448]")
local p = ffi.cast("const uint8_t *", buf)

-- one run of the workload over a fresh reassembler of module `mod`; returns CPU s, packets, data segments
return function(mod)
  local total = 0
  local R = mod.new{ cb = function(id, dir, off, ptr, n) total = total + n end }
  local ts, npk, nseg = 0, 0, 0
  local c, s = {}, {}
  local t0 = os.clock()
  for id = 1, conns do
    c[id], s[id] = (id * 7919) % TWO32, (id * 104729 + 12345) % TWO32
    R:packet(id, 0, c[id], SYN, p, 0, ts)
    R:packet(id, 1, s[id], SYN + ACK, p, 0, ts, nil, c[id] + 1)
    c[id], s[id] = c[id] + 1, s[id] + 1
    R:packet(id, 0, c[id], ACK, p, 0, ts, nil, s[id])
    npk = npk + 3
  end
  for _ = 1, exchanges do
    ts = ts + 0.001
    for id = 1, conns do
      local cs, ss = c[id], s[id]
      R:packet(id, 0, cs, ACK + PSH, p, 400, ts, nil, ss)
      cs = (cs + 400) % TWO32
      for k = 1, 8 do
        R:packet(id, 1, ss, ACK, p, 1448, ts, nil, cs)
        ss = (ss + 1448) % TWO32
        if k % 2 == 0 then R:packet(id, 0, cs, ACK, p, 0, ts, nil, ss); npk = npk + 1 end
      end
      c[id], s[id] = cs, ss
      npk, nseg = npk + 9, nseg + 9
    end
  end
  for id = 1, conns do
    R:packet(id, 0, c[id], FIN + ACK, p, 0, ts, nil, s[id])
    R:packet(id, 1, s[id], FIN + ACK, p, 0, ts, nil, c[id] + 1)
    npk = npk + 2
  end
  local cpu = os.clock() - t0
  assert(total == conns * exchanges * (400 + 8 * 1448) and R.stats.closed == conns and R.stats.held == 0)
  return cpu, npk, nseg
end
"""


def variants(lua) -> dict:
    """{name: module table}: the module as is, and the same source with the hold check compiled out."""
    path = os.path.join(REPO, "engine", "streams", "tcpreasm.lua")
    with open(path, encoding="utf-8") as fh:
        src = fh.read()
    if src.count(HOLD_CHECK) != 1:
        raise SystemExit(f"{path}: the hold check ({HOLD_CHECK!r}) is not found exactly once")
    load = lua.eval("function(src, name) return assert(load(src, '@' .. name))() end")
    nohold = src.replace(HOLD_CHECK, "if false and " + HOLD_CHECK[3:])
    return {"asis": load(src.encode(), path.encode()), "nohold": load(nohold.encode(), (path + " (nohold)").encode())}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--conns", type=int, default=2000)
    ap.add_argument("--exchanges", type=int, default=50)
    ap.add_argument("--runs", type=int, default=21)
    ap.add_argument("--variant", choices=("both", "asis", "nohold"), default="both")
    ap.add_argument("--interp", action="store_true", help="JIT off: the cost where the reassembly runs interpreted "
                                                          "(a trace aborted or blacklisted around it)")
    a = ap.parse_args(argv)
    from luaprobe.shm.luajit import new_runtime
    lua = new_runtime()
    if a.interp:
        lua.execute("jit.off()")
    mods = variants(lua)
    names = ["asis", "nohold"] if a.variant == "both" else [a.variant]
    # each variant its own copy of the driver: one shared loop would be traced against the first variant's
    # functions and side-exit for the other's
    runs = {name: lua.execute(BENCH_LUA, "", a.conns, a.exchanges) for name in names}
    for name in names:                      # warm-up: traces compiled before the first measured run
        runs[name](mods[name])
    res = {n: [] for n in names}
    npk = nseg = 0
    for r in range(a.runs):
        for name in (names if r % 2 == 0 else names[::-1]):
            cpu, npk, nseg = runs[name](mods[name])
            res[name].append(cpu)
    print(f"{a.conns} connections x {a.exchanges} exchanges: {npk} R:packet calls, {nseg} data segments, "
          f"{a.runs} runs per variant (alternating)")
    med = {}
    for name in names:
        per_pk = sorted(t * 1e9 / npk for t in res[name])
        per_seg = sorted(t * 1e9 / nseg for t in res[name])
        med[name] = statistics.median(per_seg)
        print(f"  {name:7s} ns/packet min {per_pk[0]:7.1f} median {statistics.median(per_pk):7.1f} "
              f"max {per_pk[-1]:7.1f}   ns/data segment min {per_seg[0]:7.1f} median {med[name]:7.1f} "
              f"max {per_seg[-1]:7.1f}")
    if len(names) == 2:
        d = med["asis"] - med["nohold"]
        print(f"  hold check: {d:+.1f} ns per data segment ({100 * d / med['nohold']:+.1f} % of nohold's median)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
