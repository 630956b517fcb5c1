"""packet:flowid() under a flow table that reuses record indexes (engine/plugins/packet.lua, cached_flowid).

The plug-in VM caches FlowID objects by the flow's record index (2^17 slots), each checked against the flow's
unique id.  A model of the flow table drives it: flows are created at record indexes (reused indexes, and
indexes 2^17 apart, included), packets of live flows arrive in any order, and every flowid():id() must equal
the key of that packet's own addresses by an independent implementation of Trisul's key rule
(tests/test_decode.py ``_py_flowkey``), whatever was cached before.
"""
from __future__ import annotations

import ipaddress
import random

from hypothesis import given, settings, strategies as st

from luaprobe.shm.luajit import new_runtime
from tests.test_decode import _py_flowkey, eth, ipv4, tcp, udp

SLOTS = 131072          # a power of two past the cache generations (65 536): indexes that could share a slot

HARNESS = r"""
local ffi = require("ffi")
local packet = require("luaprobe.engine.plugins.packet")
local decode = require("luaprobe.engine.fastpath.decode")
local b = packet.new_batch(1)
local pobj = packet.new_packet()
-- one packet of flow record `idx` with unique id `uid`: the FlowID's key and the object itself
return function(frame, idx, uid)
  local p = b[0]
  p.data, p.caplen, p.wirelen, p.linktype = ffi.cast("const uint8_t *", frame), #frame, #frame, 1
  decode.decode(p.d, p.data, #frame, 1)
  p.flow, p.flow_uid, p.dir = idx, uid, 0
  packet.bind_packet(pobj, b, 0)
  local f = pobj:flowid()
  assert(rawequal(f, pobj:flowid()))          -- one object per hook call
  return f:id(), f, frame                     -- frame kept alive until the call returns
end
"""

# record indexes: a few small ones (reused often), and indexes sharing their cache slot with them
INDEXES = [0, 1, 2, 7, SLOTS, SLOTS + 1, 2 * SLOTS + 7, SLOTS - 1]

flow = st.tuples(st.sampled_from([6, 17]), st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1),
                 st.integers(0, 65535), st.integers(0, 65535))
step = st.one_of(st.tuples(st.just("new"), st.sampled_from(INDEXES), flow),
                 st.tuples(st.just("packet"), st.integers(0, 50), st.booleans()))


def _frame(proto, s, d, sp, dp):
    l4 = tcp(sp, dp) if proto == 6 else udp(sp, dp)
    return eth(ipv4(proto, l4, str(ipaddress.IPv4Address(s)), str(ipaddress.IPv4Address(d))))


@settings(max_examples=150, deadline=None)
@given(st.lists(step, min_size=1, max_size=60))
def test_flowid_is_the_packets_own_flow_whatever_the_slot_held(steps):
    call = new_runtime().execute(HARNESS)
    live = {}                         # idx -> (uid, flow tuple)
    uid = 0
    for kind, a, b in steps:
        if kind == "new":
            uid += 1
            live[a] = (uid, b)        # a record index is reused: its old flow ended
            pick = a
        else:
            if not live:
                continue
            pick = sorted(live)[a % len(live)]
        fuid, (proto, s, d, sp, dp) = live[pick]
        if kind == "packet" and b:    # the reverse direction: same flow, same key
            s, d, sp, dp = d, s, dp, sp
        key, obj, _ = call(_frame(proto, s, d, sp, dp), pick, fuid)
        want = _py_flowkey(proto, 4, str(ipaddress.IPv4Address(s)), str(ipaddress.IPv4Address(d)), sp, dp)
        assert key.decode() == want
        assert obj is not None


TOUCH = r"""
local ffi = require("ffi")
local packet = require("luaprobe.engine.plugins.packet")
local decode = require("luaprobe.engine.fastpath.decode")
local frame, nflows, picks = ...
local one = packet.new_batch(1)
local pobj = packet.new_packet()
local p = one[0]
p.data, p.caplen, p.wirelen, p.linktype = ffi.cast("const uint8_t *", frame), #frame, #frame, 1
decode.decode(p.d, p.data, #frame, 1)
-- flow k: record index k, unique id k + 1, its own source port and address (so its own key)
for k = 0, nflows - 1 do
  p.flow, p.flow_uid, p.d.sport, p.d.src[3] = k, k + 1, 1024 + k % 60000, math.floor(k / 60000)
  packet.bind_packet(pobj, one, 0)
  assert(#pobj:flowid():id() == 41)
end
local b = packet.new_batch(#picks)
for i = 1, #picks do b[i - 1].flow = picks[i] end
local aborts = 0
jit.attach(function(what) if what == "abort" then aborts = aborts + 1 end end, "trace")
for _ = 1, 300 do packet.touch_flowids(b, #picks) end
jit.attach(function() end)
return packet.touched, aborts
"""


def test_touch_flowids_loads_every_cached_flowid_of_the_batch_and_compiles():
    """packet.touch_flowids, from 16 384 cached FlowIDs on: it reads the unique id and the key of the FlowID cached
    in each packet's slot and nothing else (the sum it keeps: uid + 41 per packet of a cached flow, 0 for a
    record index with nothing cached or a packet without a flow), and its loop compiles without a trace abort."""
    nflows = 20000
    rng = random.Random(7)
    picks = [rng.randrange(-1, nflows + 5000) for _ in range(1024)]
    frame = _frame(6, 0x0A000001, 0xAC100001, 1024, 80)
    lua = new_runtime()
    touched, aborts = lua.execute(TOUCH, frame, nflows, lua.table_from(picks))
    assert touched == sum(f + 1 + 41 for f in picks if 0 <= f < nflows)
    assert aborts == 0
