"""The capture process's sharder (engine/capture/capture.lua, ``luaprobe run --shards N`` over files) at the speed of
one ring: its copy loop stays compiled, and it wakes a sleeping shard once per WAKE_PACKETS of its packets, not once
per 64 (docs/benchmarks.md, "Flow-sharded fast paths").

Both are checked in a LuaJIT VM of the test with the sharder over rings big enough for the whole capture (no
consumer: nothing waits), by counting what the loop does, never by timing it:

* trace aborts (LuaJIT's "trace" events): with pick()'s decode.decode inlined, the loop's trace held more than
  LuaJIT's default 500 IR constants, aborted "trace too long" and was blacklisted (~450 ns per packet in the
  interpreter against ~35 compiled);
* futex wakes: every shard's doorbell is armed as a sleeping shard arms it, and its sequence word counts the wakes
  the capture side makes (shm/_lpsync.c lp_publish).

The records in each ring and the capture side's ``pushed`` count are checked against a Python model of the hash
over the capture's addresses (read with struct, not the Lua decoder).
"""
from __future__ import annotations

import ctypes
import mmap
import struct

import pytest

from luaprobe.engine.capture.pcapfile import open_capture
from luaprobe.shm.luajit import new_runtime
from luaprobe.shm.ring import region_size
from tests.test_shards import shard_model
from tools.bench import corpus

RING = 1 << 24          #: bytes per ring: every capture below fits in one ring
SHARDS = 2

CAPTURES = {
    "small-few": (dict(corpus.SHAPES["small-few"]), 50_000),
    "mixed-zipf": (dict(corpus.SHAPES["mixed-zipf"], flows=3000), 30_000),
    "ipv6": (dict(corpus.SHAPES["ipv6"]), 30_000),
}

WALK = """
function(addrs, cap, file, size, fd, pushed_addrs, arm)
  local ffi = require("ffi")
  local ring = require("luaprobe.shm.ring")
  local capture = require("luaprobe.engine.capture.capture")
  local util = require("jit.util")
  local rings, pushed = {}, {}
  for i, a in ipairs(addrs) do
    ring.format(a, cap, true)
    rings[i] = ring.attach(a)
    pushed[i] = ffi.cast("uint64_t *", pushed_addrs[i])
    if arm then ring.lib.lp_bell_arm(rings[i].data_bell) end   -- a shard asleep on its ring, for the whole walk
  end
  local aborts = {}
  local function on_trace(what, tr, func, pc, otr, oex)
    if what == "abort" then
      local fi = util.funcinfo(func, pc)
      aborts[#aborts + 1] = ("%s %s"):format(tostring(otr), tostring(fi.source):match("[^/]*$") .. ":" ..
                                              tostring(fi.currentline))
    end
  end
  jit.attach(on_trace, "trace")
  local s = capture.sharder(rings, pushed)
  local n = capture.file(s, file, size, function() return false end, fd)
  jit.attach(on_trace)
  local out = { n = n, aborts = table.concat(aborts, "\\n"), shards = {} }
  for i, r in ipairs(rings) do
    local pk, time = 0, 0
    while true do
      local p, len = r:peek()
      if p == nil then break end
      local kind = ffi.cast(require("luaprobe.engine.plugins.packet").recp, p).kind
      if kind == require("luaprobe.engine.plugins.packet").PKT then pk = pk + 1 else time = time + 1 end
      r:advance(len)
    end
    out.shards[i] = { packets = pk, time = time, pushed = tonumber(pushed[i][0]),
                      wakes = ring.lib.lp_load32(r.data_bell + 1) }
  end
  return out
end
"""


def _capture(tmp_path, name) -> str:
    spec, n = CAPTURES[name]
    path = str(tmp_path / f"{name}.pcap")
    corpus.write(path, spec, n, 7)
    return path


def _model(path: str) -> list[int]:
    """Packets per shard by tests/test_shards.py's model of the hash, over the Ethernet frames' IPv4 / IPv6
    addresses (read with struct); non-IP: shard 0."""
    with open(path, "rb") as f:
        data = f.read()
    counts, off = [0] * SHARDS, 24
    while off < len(data):
        cap = struct.unpack_from("<I", data, off + 8)[0]
        fr = data[off + 16:off + 16 + cap]
        off += 16 + cap
        et = fr[12:14]
        if et == b"\x08\x00":
            a, z = fr[26:30], fr[30:34]
        elif et == b"\x86\xdd":
            a, z = fr[22:38], fr[38:54]
        else:
            counts[0] += 1
            continue
        counts[shard_model(a.hex(), z.hex(), SHARDS)] += 1
    return counts


def _walk(path: str, arm: bool) -> dict:
    lua = new_runtime()
    mems = [mmap.mmap(-1, region_size(RING, hints=True)) for _ in range(SHARDS)]
    words = (ctypes.c_uint64 * SHARDS)()
    with open_capture(path) as c:          # mapped as the capture process maps it, its fd for capture.lua's checks
        out = lua.eval(WALK)(lua.table_from([ctypes.addressof(ctypes.c_char.from_buffer(m)) for m in mems]), RING,
                             c.address, c.size, c.fd,
                             lua.table_from([ctypes.addressof(words) + 8 * i for i in range(SHARDS)]), arm)
        shards = [{k.decode(): v for k, v in out.shards[i + 1].items()} for i in range(SHARDS)]
        return {"n": out.n, "aborts": out.aborts.decode(), "shards": shards}


@pytest.mark.parametrize("name", list(CAPTURES))
def test_sharded_copy_loop_stays_compiled(tmp_path, name):
    """No trace of the walk is given up as too long or blacklisted (the old loop: 11 "trace too long" aborts at
    capture.lua, then its start blacklisted), and each ring holds its shard's packets by the model of the hash,
    with `pushed` equal to them (the capture side of the loss accounting)."""
    path = _capture(tmp_path, name)
    got = _walk(path, arm=False)
    too_long = [a for a in got["aborts"].splitlines() if a.split(" ")[0] in ("2", "5")]   # TRACEOV, BLACKL
    assert not too_long, got["aborts"]
    model = _model(path)
    assert got["n"] == sum(model)
    assert [s["packets"] for s in got["shards"]] == model
    assert [s["pushed"] for s in got["shards"]] == model


def test_a_sleeping_shard_is_woken_once_per_wake_packets(tmp_path):
    """With every shard asleep on its doorbell for the whole walk, the capture side wakes each at most once per
    WAKE_PACKETS of its packets plus once at the end of the walk (the old loop: at every publish, once per 1024
    packets of the whole capture from a file, ~50 per shard for these 50 000; 64 before cd62973), and at least
    once: no shard sleeps on records it cannot see."""
    path = _capture(tmp_path, "small-few")
    every = 4096            # capture.lua WAKE_PACKETS
    got = _walk(path, arm=True)
    model = _model(path)
    for s, pk in zip(got["shards"], model):
        assert s["packets"] == s["pushed"] == pk
        assert 1 <= s["wakes"] <= pk // every + 1 + 1, (s, pk, every)
