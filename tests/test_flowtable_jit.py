"""The flow table's batch update stays compiled and allocates nothing, whatever packet its traces were recorded on.

LuaJIT records a loop's root trace along the path the first hot iterations took; every other path leaves the
trace at a guard.  Two ways that went wrong in engine/fastpath/flowtable.lua (issue 10):

* unary minus of an integer that was not 0 when recorded compiles to a subtraction guarded by "not 0"
  (-0 is not an integer), so a trace recorded on TCP segments with payload left at every bare ACK (length 0);
  the side trace for that exit carried ~20 live values, failed with "register coalescing too complex" and was
  blacklisted, and every such packet then ran the rest of the counters in the interpreter (HTTP traffic);
* a cdata reference (a batch entry, a flow record) live at an exit that is taken often is allocated every
  time (the probe's chain walk: ~24 bytes per packet on DNS traffic).

Traffic from the project's generator (engine/gen/traffic.py, seeded), fed as the driver does (batches of at
most 1 024 packets of one packet-time second); a first pass forms the traces, a second pass over a fresh
table is measured: heap growth per packet and exits to the interpreter (LuaJIT's "texit" event: an exit
without a compiled side trace).  Deterministic: counts, not times.
"""
from __future__ import annotations

import struct
import subprocess
import sys

import pytest

from luaprobe.shm.luajit import new_runtime

HARNESS = r"""
local frames, lens, secs, nsecs = ...
local ffi = require("ffi")
local decode = require("luaprobe.engine.fastpath.decode")
local flowtable = require("luaprobe.engine.fastpath.flowtable")
local packet = require("luaprobe.engine.plugins.packet")
local base = ffi.cast("const uint8_t *", frames)
local n = #lens
local offs, off = {}, 0
for i = 1, n do offs[i] = off; off = off + lens[i] end
local b = packet.new_batch(1024)
local function pass(ft)
  local i = 1
  while i <= n do
    local m, s = 0, secs[i]
    while i + m <= n and m < 1024 and secs[i + m] == s do
      local k = i + m
      local p = b[m]
      p.data, p.caplen, p.wirelen, p.linktype = base + offs[k], lens[k], lens[k], 1
      p.ts_sec, p.ts_nsec = s, nsecs[k]
      decode.decode(p.d, p.data, lens[k], 1)
      m = m + 1
    end
    ft:update_batch(b, m)
    i = i + m
  end
  return ft
end
pass(flowtable.new{capacity = 65536})          -- warm-up: the traces form
local ft = flowtable.new{capacity = 65536}
local texits = 0
local function count() texits = texits + 1 end
collectgarbage(); collectgarbage("stop")
local kb = collectgarbage("count")
jit.attach(count, "texit")
pass(ft)
jit.attach(count)
local grown = (collectgarbage("count") - kb) * 1024
collectgarbage("restart")
return grown / n, texits, n, ft.created
"""

GEN = {
    "http": ["--mix", "http=100", "--http-sizes", "2000,20000", "--flows", "300", "--concurrency", "50",
             "--packets", "20000"],
    "dns": ["--mix", "dns=85,udp=15", "--flows", "20000", "--concurrency", "2000", "--packets", "30000"],
}


def _read(path):
    buf = open(path, "rb").read()
    ns = struct.unpack_from("<I", buf, 0)[0] == 0xa1b23c4d
    frames, lens, secs, subs, pos = [], [], [], [], 24
    while pos + 16 <= len(buf):
        s, u, c, _ = struct.unpack_from("<IIII", buf, pos)
        frames.append(buf[pos + 16:pos + 16 + c])
        lens.append(c); secs.append(s); subs.append(u if ns else u * 1000)
        pos += 16 + c
    return b"".join(frames), lens, secs, subs


@pytest.mark.parametrize("shape", sorted(GEN))
def test_update_batch_steady_state_is_compiled_and_allocation_free(tmp_path, shape):
    path = str(tmp_path / f"{shape}.pcap")
    subprocess.run([sys.executable, "-m", "luaprobe.engine.gen.traffic", "--out", path, "--seed", "3",
                    "--rate", "100000", *GEN[shape]], check=True, stdout=subprocess.DEVNULL)
    frames, lens, secs, subs = _read(path)
    lua = new_runtime()
    per_packet, texits, n, created = lua.execute(HARNESS, frames, lua.table_from(lens), lua.table_from(secs),
                                                 lua.table_from(subs))
    assert n == len(lens) > 1000 and created > 10
    # the modules this guards against allocated 22-76 bytes per packet (a reference live at a frequent exit);
    # compiled, harness and flow table together allocate ~0 or, in some processes (traces formed in another
    # order; not yet explained, docs/benchmarks.md), 2.4-3.4 bytes per packet on HTTP: below 5 either way
    assert per_packet < 5.0, f"{shape}: {per_packet:.1f} bytes of garbage per packet"
    # an exit to the interpreter on the per-packet path is taken by a share of all packets (the module this
    # guards against: 12 % of HTTP packets); what remains on this capture (66-75 in 5 754 packets, 300 flows
    # inserted, each batch holding SYNs: "Port reuse") is per new flow or per batch, not per packet
    assert texits < n // 50, f"{shape}: {texits} exits to the interpreter in {n} packets"
