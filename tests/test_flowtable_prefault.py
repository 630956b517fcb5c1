"""The flow table maps the pages of its new records ahead of the high-water mark (FT:prefault, flowtable.lua).

Independent truth: the kernel's own residency map of the record arrays, mincore(2), read through ffi while the
table holds them.  A table at the driver's default capacity (2^20 flows, 4 KiB pages: ``huge_pages = false``)
creates flows through update() and update_batch; after each step every page of the records below the next
multiple of PREFAULT (1 024) records is resident, in the hot (128-byte), cold (64-byte) and LRU-link (8-byte)
arrays, and the pages well beyond it are not (RSS stays bounded by the flows seen).  Before: a record's pages
were mapped by its first write only, so after one flow only the first page of each array was resident.
Correctness of the records themselves is tests/test_flowtable.py's (the same update paths).
"""
from __future__ import annotations

import pytest

from luaprobe.shm.luajit import new_runtime

LUA = r"""
local ffi = require "ffi"
local bit = require "bit"
local decode = require "luaprobe.engine.fastpath.decode"
local flowtable = require "luaprobe.engine.fastpath.flowtable"
local packet = require "luaprobe.engine.plugins.packet"
pcall(ffi.cdef, "int mincore(void *addr, size_t length, unsigned char *vec);")
local H = {}
local PAGE = 4096

-- resident pages among those holding bytes [0, nbytes) of array p (mincore's vector, one byte a page)
function H.resident(p, from_byte, to_byte)
  local a = tonumber(ffi.cast("uintptr_t", p)) + from_byte
  local start = a - a % PAGE
  local npages = math.ceil((a - start + to_byte - from_byte) / PAGE)
  local vec = ffi.new("unsigned char[?]", npages)
  assert(ffi.C.mincore(ffi.cast("void *", start), a - start + to_byte - from_byte, vec) == 0, "mincore failed")
  local n = 0
  for i = 0, npages - 1 do n = n + bit.band(vec[i], 1) end
  return n, npages
end

function H.new() return flowtable.new{capacity = 1048576, huge_pages = false} end

local d = decode.new()
-- flow i (distinct IPv4 UDP 5-tuples) through update()
function H.update(ft, from, to)
  for i = from, to - 1 do
    decode.decode(d, '', 0, 9999)
    d.ip_version, d.ipproto = 4, 17
    d.src[0], d.src[1], d.src[2], d.src[3] = 10, bit.band(bit.rshift(i, 16), 255), bit.band(bit.rshift(i, 8), 255),
      bit.band(i, 255)
    d.dst[0], d.dst[3] = 192, 1
    d.sport, d.dport = 1024 + bit.band(i, 0x7fff), 53
    assert(select(3, ft:update(d, 1, 100)), "not a new flow")
  end
end

-- flows [from, to) through update_batch, in batches of 64 (the driver's lp_pkt batch)
local B = packet.new_batch(64)
function H.batch(ft, from, to)
  local k = 0
  for i = from, to - 1 do
    local p = B[k]
    local q = p.d
    decode.decode(q, '', 0, 9999)
    q.ip_version, q.ipproto = 4, 17
    q.src[0], q.src[1], q.src[2], q.src[3] = 10, 200, bit.band(bit.rshift(i, 8), 255), bit.band(i, 255)
    q.dst[0], q.dst[3] = 192, 2
    q.sport, q.dport = 2000 + bit.band(i, 0x7fff), 53
    p.ts_sec, p.ts_nsec, p.wirelen = 2, 0, 100
    k = k + 1
    if k == 64 or i == to - 1 then
      ft:update_batch(B, k)
      for j = 0, k - 1 do assert(B[j].flow >= 0, "no flow") end
      k = 0
    end
  end
end

-- bytes [0, nbytes) of p all zero
function H.zero(p, nbytes)
  p = ffi.cast("const uint8_t *", p)
  for i = 0, nbytes - 1 do if p[i] ~= 0 then return false end end
  return true
end

-- {resident, pages} of records [from, to) in each of the three arrays
function H.arrays(ft, from, to)
  local out = {}
  for _, a in ipairs{{ft.flows, 128}, {ft.cold, 64}, {ft.lru, 8}} do
    local r, n = H.resident(a[1], from * a[2], to * a[2])
    out[#out + 1] = {r, n}
  end
  return out
end
return H
"""

PREFAULT = 1024


@pytest.fixture(scope="module")
def H():
    return new_runtime(encoding=None).execute(LUA)


def resident(H, ft, lo, hi):
    """[(resident pages, pages)] of records [lo, hi) in the hot, cold and LRU-link arrays."""
    return [tuple(t.values()) for t in H.arrays(ft, lo, hi).values()]


def test_new_records_are_mapped_one_chunk_ahead(H):
    ft = H.new()
    assert all(r == 0 for r, _ in resident(H, ft, 0, 4 * PREFAULT))       # a fresh table maps no record
    H.update(ft, 0, 1)
    # one flow: the pages of the first 1 024 records are mapped, in all three arrays ...
    assert all(r == n for r, n in resident(H, ft, 0, PREFAULT)), resident(H, ft, 0, PREFAULT)
    # ... and nothing two chunks on (the pages at the chunk's end may be shared with the next record)
    assert all(r == 0 for r, _ in resident(H, ft, 2 * PREFAULT, 4 * PREFAULT)), resident(H, ft, 2 * PREFAULT,
                                                                                        4 * PREFAULT)
    # update_batch: flows up to 1 500 -> the second chunk is mapped when the first one runs out
    H.batch(ft, 1, 1500)
    assert ft.hw == 1500 and ft.live == 1500
    assert all(r == n for r, n in resident(H, ft, 0, 2 * PREFAULT)), resident(H, ft, 0, 2 * PREFAULT)
    assert all(r == 0 for r, _ in resident(H, ft, 3 * PREFAULT, 6 * PREFAULT))


def test_small_table_is_left_to_calloc(H):
    """A table below 2 MiB of records lives in calloc'd memory: prefault() maps nothing (no madvise on it)."""
    lua = new_runtime(encoding=None)
    ft = lua.execute('return require("luaprobe.engine.fastpath.flowtable").new{capacity = 1024}')
    assert ft.mapped is False and ft.faulted == 0
    ft.prefault(ft, 10)
    assert ft.faulted == 0


def test_side_array_is_mapped_with_the_records(H):
    """FT:side_array (the shared reassembly's votes, engine/streams/stage.lua): its pages are mapped as the records',
    a chunk of 1 024 items ahead of the high-water mark, not left to page faults of new flows in the packet loop;
    made after flows exist, what the records have mapped is mapped at once; zero-filled; a second one (or one of a
    small table) is plain memory.  Before: the stage calloc'd it (no page of it mapped before its flow's first use)."""
    ft = H.new()
    H.update(ft, 0, 1500)                                         # records [0, 2 048) mapped
    side = ft.side_array(ft, 48)
    assert ft.faulted == 2 * PREFAULT
    r, n = H.resident(side, 0, 2 * PREFAULT * 48)
    assert r == n and H.resident(side, 3 * PREFAULT * 48, 6 * PREFAULT * 48)[0] == 0
    H.batch(ft, 1500, 2500)                                       # the third chunk, with the records
    r, n = H.resident(side, 0, 3 * PREFAULT * 48)
    assert r == n and H.resident(side, 4 * PREFAULT * 48, 8 * PREFAULT * 48)[0] == 0
    assert H.zero(side, (ft.capacity + 1) * 48) and ft.side_size == 48
    other = ft.side_array(ft, 48)                                  # a second one: not the table's, nothing mapped
    assert H.resident(other, 0, 3 * PREFAULT * 48)[0] == 0 and H.zero(other, 3 * PREFAULT * 48)
    small = new_runtime(encoding=None).execute('return require("luaprobe.engine.fastpath.flowtable").new{capacity = 1024}')
    assert small.side_array(small, 48) is not None and small.side is None
