"""The flow table's index grown in place (flowtable.lua FT:grow_in_place) and its next doubling mapped by the prefault
helper (shm/_lpsync.c, the index job).

From 2 MiB of index at its largest (2 x capacity slots of 8 bytes: capacity >= 131 072) the index is one mapping of that
size, and a doubling rebuilds slots [0, 2 x size) in place: only the new half is fresh memory, and with a helper its
pages were mapped after the previous doubling.  Independent truths: a Python dict of the live flows (hypothesis: flows
created, hit again and ended in any order across the doublings; every live flow is found by a packet of its key with
its own record, counters exact) and test_flowtable.py's structural check of the index (every probe chain unbroken,
every live flow in one slot with its hash); the kernel's residency map (mincore) for the pages mapped ahead.  Before:
each doubling made a new index mapping (the address changed, 2x the final size written in fresh pages over the
doublings) and nothing was mapped ahead of a doubling.
"""
from __future__ import annotations

import time

import pytest
from hypothesis import HealthCheck, example, given, settings, strategies as st

from luaprobe.shm.luajit import new_runtime
from tests.test_flowtable import LUA_HELPERS
from tests.test_flowtable_prefault import LUA as RES_LUA

CAP = 1 << 17              # 2^18 slots x 8 bytes = 2 MiB: the smallest capacity whose index is one mapping
LUA = LUA_HELPERS.replace("return H", r"""
local bit = require "bit"
-- flow i: an IPv4 UDP 5-tuple of its own (10.x.y.z:2000+ -> 192.0.0.2:53), one packet each, at second sec
local G = packet.new_batch(64)
local function fill(p, i, sec)
  local q = p.d
  decode.decode(q, '', 0, 9999)
  q.ip_version, q.ipproto = 4, 17
  q.src[0], q.src[1], q.src[2], q.src[3] = 10, bit.band(bit.rshift(i, 16), 255), bit.band(bit.rshift(i, 8), 255),
    bit.band(i, 255)
  q.dst[0], q.dst[3] = 192, 2
  q.sport, q.dport = 2000 + bit.band(i, 0x3fff), 53
  q.payload_length = 10
  p.ts_sec, p.ts_nsec, p.wirelen = sec, 0, 100
end
-- one packet of each flow in ids (a Lua array), in batches of 64; returns {flow index of each} and the new flows
function H.packets(ft, ids, sec)
  local out, k, first = {}, 0, 1
  local created = ft.created
  for n = 1, #ids do
    fill(G[k], ids[n], sec)
    k = k + 1
    if k == 64 or n == #ids then
      ft:update_batch(G, k)
      for j = 0, k - 1 do out[first + j] = G[j].flow end
      first, k = first + k, 0
    end
  end
  return out, ft.created - created
end
-- {id -> packets} of every live flow, from its record's key (the A end is 10.x.y.z: the higher port)
function H.live(ft)
  local out = {}
  ft:each(function(idx)
    local e = ft:entry(idx)
    local a = ffi.cast("uint8_t *", e.a)
    out[a[1] * 65536 + a[2] * 256 + a[3]] = e.packets_az + e.packets_za
  end)
  return out
end
function H.slots_addr(ft) return tonumber(ffi.cast("uintptr_t", ft.slots)) end
function H.ix(ft) return tonumber(ft.pf.ix_done), tonumber(ft.pf.ix_goal), tonumber(ft.pf.err) end
return H""")


@pytest.fixture(scope="module")
def lua():
    return new_runtime(encoding=None)


@pytest.fixture(scope="module")
def H(lua):
    return lua.execute(LUA)


def new_table(lua, H, helper):
    ft = H.new(lua.table_from({b"capacity": CAP, b"huge_pages": False}))
    assert ft.slot_map is True and ft.size == 1024
    if helper:
        assert ft.start_prefaulter(ft, 4096) is True
    return ft


OPS = st.lists(st.one_of(
    st.tuples(st.just("new"), st.integers(1, 9000)),          # that many new flows
    st.tuples(st.just("hit"), st.integers(1, 3000)),          # packets of live flows (picked at random)
    st.tuples(st.just("end"), st.floats(0.05, 0.9)),          # that share of the live flows terminated
), min_size=3, max_size=12)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(ops=OPS, helper=st.booleans(), seed=st.integers(0, 2**32 - 1))
@example(ops=[("new", 9000), ("end", 0.5), ("new", 9000), ("hit", 3000), ("new", 9000), ("end", 0.9), ("new", 9000),
              ("new", 9000), ("hit", 3000), ("new", 9000), ("end", 0.3), ("new", 9000)], helper=True, seed=1)
@example(ops=[("new", 9000)] * 12, helper=False, seed=2)
def test_index_grown_in_place_keeps_every_flow(lua, H, ops, helper, seed):
    import random
    rnd = random.Random(seed)
    ft = new_table(lua, H, helper)
    addr = H.slots_addr(ft)
    model: dict[int, int] = {}         # flow id -> packets
    next_id, sec, sizes = 0, 1_700_000_000, set()
    for op, arg in ops:
        sec += 1
        if op == "new":
            ids = list(range(next_id, next_id + arg))
            next_id += arg
            _, created = H.packets(ft, lua.table_from(ids), sec)
            assert created == arg
            for i in ids:
                model[i] = 1
        elif op == "hit" and model:
            ids = rnd.choices(list(model), k=arg)
            _, created = H.packets(ft, lua.table_from(ids), sec)
            assert created == 0                  # every live flow found, none created again
            for i in ids:
                model[i] += 1
        elif op == "end" and model:
            gone = rnd.sample(list(model), int(len(model) * arg))
            idx, created = H.packets(ft, lua.table_from(gone), sec)     # their records, through a packet each
            assert created == 0
            for j, i in enumerate(gone):
                x = idx[j + 1]
                assert H.terminate(ft, x) is True
                del model[i]
        sizes.add(ft.size)
        assert H.check(ft) is None
        assert H.slots_addr(ft) == addr           # the same mapping, whatever the doublings
    live = {int(k): int(v) for k, v in H.live(ft).items()}
    assert live == model and ft.live == len(model)
    assert ft.size >= 4 * len(model) or ft.size == 2 * CAP
    if helper:
        ft.stop_prefaulter(ft)


def test_next_doubling_is_mapped_by_the_helper(lua, H):
    """With a helper, each doubling asks it for the pages of the next one: after 3 000 flows (index 16 384 slots,
    128 KiB) slots up to 32 768 (256 KiB) are resident, nothing beyond; the fast path's own growth then maps none."""
    R = lua.execute(RES_LUA)
    ft = new_table(lua, H, True)
    H.packets(ft, lua.table_from(list(range(3000))), 1)
    assert ft.size == 16384
    end = time.monotonic() + 20
    while H.ix(ft)[0] < H.ix(ft)[1]:
        assert time.monotonic() < end and H.ix(ft)[2] == 0, H.ix(ft)
        time.sleep(0.001)
    assert H.ix(ft)[1] == 32768 * 8
    r, n = R.resident(ft.slots, 0, 32768 * 8)
    assert r == n, (r, n)
    assert R.resident(ft.slots, 40000 * 8, 2 * CAP * 8)[0] == 0
    ft.stop_prefaulter(ft)
