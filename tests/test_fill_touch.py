"""The driver touches every batch's ring records before its fill loop, whatever their size (issue 10).

Driver:fill (engine/fastpath/driver.lua) first touches the first cache lines of the batch's records from the packet
ring's prefetch hints (shm/ring.lua Ring:touch_ahead), so that the records the capture process wrote on the other
core arrive with their misses overlapped instead of one after the other.  Until 2026-12-01 it did so only after a
batch that averaged more than 192 ring bytes a packet, so the dns and small-few corpus shapes (records of ~175 and
~105 bytes) never touched: `tools/bench/ab_checkouts.py`-style A/B, loop CPU ns per packet of the empty hook, dns
86 -> 76 median (docs/benchmarks.md, "dns and small-few: the ring's records touched whatever their size").

The truth here is the ring's own state, not a time: the capture's records are pushed into a ring with hints (as the
capture process does), the real Driver:fill pops them in batches, and Ring:touch_ahead is wrapped to record where
each touch started (the ring's popped count) and how many records it covered.  Each batch must have been touched
once, from its own first record, over at least its packets.  Fails on the code before (no touch at all on these
captures, nor on the first batch of any capture).
"""
from __future__ import annotations

import pytest

from tools.bench import corpus

PUSH_AND_FILL = r'''
local addr, size, limit = ...
local ffi = require("ffi")
local pcapfile = require("luaprobe.engine.capture.pcapfile")
local ring = require("luaprobe.shm.ring")
local driver = require("luaprobe.engine.fastpath.driver")
local packet = require("luaprobe.engine.plugins.packet")
local REC, recp, PKT = packet.REC_SIZE, packet.recp, packet.PKT
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
local bytes, pushed = 0, 0
for _ = 1, limit do
  local ptr, caplen, wirelen, ts_sec, ts_nsec, linktype, ifindex = r:next()
  if ptr == nil then break end
  local p = prod:reserve(REC + caplen)
  assert(p ~= nil, "ring full")
  local h = ffi.cast(recp, p)
  h.kind, h.ts_sec, h.ts_nsec, h.wirelen, h.caplen = PKT, ts_sec, ts_nsec, wirelen, caplen
  h.linktype, h.ifindex = linktype, ifindex
  ffi.copy(p + REC, ptr, caplen)
  prod:commit()
  bytes, pushed = bytes + 8 + REC + caplen, pushed + 1
end
prod:publish()
local drv = driver.new({ ring = base, batch = packet.BATCH, capacity = 65536 })
local dr = drv.ring
local touches = {}
local touch_ahead = dr.touch_ahead
dr.touch_ahead = function(self, k)
  local avail = pushed - self.popped_local          -- every record was published before the first fill
  touches[#touches + 1] = { from = self.popped_local, records = math.min(k, avail) }
  return touch_ahead(self, k)
end
local batches = {}
local popped = 0
while true do
  local ntouch = #touches
  local n = drv:fill()
  if n == 0 and drv.ctl_kind == nil then break end
  if n > 0 then
    batches[#batches + 1] = { first = popped, n = n, touches = #touches - ntouch,
                              t = touches[#touches] and touches[#touches].from or -1,
                              k = touches[#touches] and touches[#touches].records or 0,
                              fresh = #touches > ntouch }
    popped = popped + n
  end
end
drv.stop_profile()
local out = {}
for i, b in ipairs(batches) do
  out[i] = { b.first, b.n, b.fresh and b.touches or 0, b.fresh and b.t or -1, b.fresh and b.k or 0 }
end
return out, bytes / pushed, pushed
'''


@pytest.mark.parametrize("shape", ["dns", "small-few"])
def test_every_batch_of_small_records_is_touched_before_its_fill(shape):
    from luaprobe.engine.capture.pcapfile import open_capture
    from luaprobe.shm.luajit import new_runtime
    lua = new_runtime()
    with open_capture(corpus.make(shape, True)) as cap:
        out, mean, pushed = lua.execute(PUSH_AND_FILL, cap.address, cap.size, 20000)
    batches = [tuple(int(x) for x in b.values()) for b in out.values()]
    assert mean < 192, f"{shape}: {mean:.0f} ring bytes a packet: not the small records this test is about"
    assert sum(b[1] for b in batches) == pushed
    assert len(batches) >= 10
    for first, n, touches, start, records in batches:
        assert touches == 1, f"{shape}: the batch of packets {first}..{first + n - 1} was touched {touches} times"
        assert start == first, f"{shape}: the batch from packet {first} was touched from record {start}"
        assert records >= n, f"{shape}: {records} of the batch's {n} records touched"
