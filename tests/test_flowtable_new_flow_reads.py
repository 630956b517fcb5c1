"""What the flow table reads and compiles for a packet of a new flow (flowtable.lua update_batch, issue 10: flows-1m,
every packet a new flow).

* A new flow whose home slot holds another flow reads no record of that flow: the probe compares the slot's hash
  first, and update_batch's touch loop touches only records whose slot holds the packet's hash.  Independent truth:
  the kernel's residency map (mincore) of a page of records dropped with MADV_DONTNEED just before the packet (a read
  of it maps the zero page, which mincore reports resident).  Before: the probe's branch-free home-slot step compared
  the key of whatever record the slot held, and the touch loop touched it, a cache miss per new flow once the index
  fills (flows-1m: touch 27-28 -> 11 ns/packet in tools/bench/flowtable_loops.py).
* The insertion loop goes on from the empty slot the probe found (probe_on) instead of probing again from the home
  slot: LuaJIT's IR of that loop (jit.util.traceir through tools/bench/fillir.py) on a capture where every packet
  starts a flow has no key comparison (BXOR) and at most 24 loads per packet.  Before: 6 BXOR, 31 loads (the
  hash, the home slot's hash and the ten key words of two keys again).
* An index doubling (grow_in_place) copies the old slots out and empties them in one branch-free loop (same IR).
"""
from __future__ import annotations

import collections
import os
import struct

import pytest

from luaprobe.shm.luajit import new_runtime
from tests.test_flowtable_prefault import LUA as RES_LUA
from tools.bench import fillir

LUA = RES_LUA.replace("return H\n", r"""
pcall(ffi.cdef, "int madvise(void *addr, size_t len, int advice);")
local u8 = ffi.typeof("uint8_t *")
-- the normalised key words of H.batch's flow i (A: 10.200.x.y:2000+i, the higher port; Z: 192.0.0.2:53)
local kw = ffi.new("int32_t[10]")
local function key_of(i)
  ffi.fill(kw, 40)
  local a, z = ffi.cast(u8, kw), ffi.cast(u8, kw + 4)
  a[0], a[1], a[2], a[3] = 10, 200, bit.band(bit.rshift(i, 8), 255), bit.band(i, 255)
  z[0], z[3] = 192, 2
  kw[8] = bit.bor(bit.lshift(2000 + bit.band(i, 0x7fff), 16), 53)
  kw[9] = bit.bor(bit.lshift(4, 8), 17)
  return kw
end
-- a table of n flows (touch loops from the first flow on), and a flow id > n whose home slot holds a flow of the
-- records' page `page` (32 records of 128 bytes) with another hash: returns ft, id, the page's byte offset
function H.setup(n, page)
  local ft = flowtable.new{capacity = 1048576, huge_pages = false, touch_flows = 1}
  H.batch(ft, 0, n)
  for i = 0, n - 1 do        -- the key words as the table stores them
    local e = ft.flows[i]
    key_of(i)
    for w = 0, 9 do assert(e.key[w] == kw[w], "key layout") end
  end
  local lo, hi = page * 32, page * 32 + 32
  for i = n, n + 100000 do
    local h = flowtable._hash_key(key_of(i))
    local s = ft.slots[bit.band(h, ft.mask)]
    if s.idx >= lo and s.idx < hi and s.hash ~= h then return ft, i, page * 4096 end
  end
  error("no key found")
end
function H.drop(ft, off) assert(ffi.C.madvise(ffi.cast(u8, ft.flows) + off, 4096, 4) == 0) end   -- MADV_DONTNEED
function H.page(ft, off) return (H.resident(ft.flows, off, off + 4096)) end
function H.one_batch(ft, i)
  local size, created = ft.size, ft.created
  H.batch(ft, i, i + 1)
  return ft.created - created, ft.size == size
end
function H.one_update(ft, i)
  local d = decode.new()
  decode.decode(d, '', 0, 9999)
  d.ip_version, d.ipproto = 4, 17
  d.src[0], d.src[1], d.src[2], d.src[3] = 10, 200, bit.band(bit.rshift(i, 8), 255), bit.band(i, 255)
  d.dst[0], d.dst[3] = 192, 2
  d.sport, d.dport = 2000 + bit.band(i, 0x7fff), 53
  local size = ft.size
  local _, _, new = ft:update(d, 2, 100)
  return new, ft.size == size
end
return H
""")


@pytest.fixture(scope="module")
def H():
    return new_runtime(encoding=None).execute(LUA)


@pytest.mark.parametrize("path", ["update_batch", "update"])
def test_new_flow_reads_no_record_of_another_hash(H, path):
    # 3 000 flows: a 16 384-slot index that one more flow does not double; page 40 holds records 1 280-1 311
    ft, i, off = H.setup(3000, 40)
    H.drop(ft, off)
    assert H.page(ft, off) == 0, "MADV_DONTNEED left the page resident"
    new, same_index = (H.one_batch if path == "update_batch" else H.one_update)(ft, i)
    assert new and same_index
    assert H.page(ft, off) == 0, "the new flow's lookup read the record of the flow in its home slot"


def _all_new_capture(path: str, n: int) -> None:
    """n Ethernet/IPv4/TCP (ACK) frames of 60 bytes, each of a flow of its own, 10 us apart."""
    out = [struct.pack("<IHHiIII", 0xa1b2c3d4, 2, 4, 0, 0, 65535, 1)]
    for i in range(n):
        ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 40, 0, 0, 64, 6, 0, bytes([10, (i >> 16) & 255, (i >> 8) & 255,
                                                                            i & 255]), bytes([192, 0, 0, 1]))
        tcp = struct.pack("!HHIIBBHHH", 1024 + (i % 60000), 80, 1, 1, 0x50, 0x10, 8192, 0, 0)
        frame = b"\x00\x01\x02\x03\x04\x05\x00\x01\x02\x03\x04\x06\x08\x00" + ip + tcp
        frame += b"\x00" * (60 - len(frame))
        ts = 1_000_000 + i * 10
        out.append(struct.pack("<IIII", ts // 1_000_000, ts % 1_000_000, len(frame), len(frame)) + frame)
    with open(path, "wb") as f:
        f.write(b"".join(out))


@pytest.fixture(scope="module")
def new_flows_ir(tmp_path_factory):
    cap = os.path.join(tmp_path_factory.mktemp("ir"), "new-flows.pcap")
    _all_new_capture(cap, 60000)
    return fillir.fill_ir(cap)


def _loop_at(ir: dict, function: str, loop: str) -> collections.Counter:
    """Per-packet IR operations of the looping root trace of the first `loop` line after `function` in flowtable.lua."""
    from luaprobe.shm.luajit import package_dirs
    src = open(os.path.join(package_dirs()["engine"], "fastpath", "flowtable.lua")).read().split("\n")
    start = next(i for i, line in enumerate(src) if line.startswith(function))
    line = next(i for i in range(start, len(src)) if src[i].strip().startswith(loop)) + 1
    where = f"flowtable.lua:{line}"
    assert where in ir, f"the loop at {where} did not compile: {sorted(ir)}"
    return collections.Counter(fillir.per_packet(ir[where]))


def test_insertion_loop_compares_no_key(new_flows_ir):
    ops = _loop_at(new_flows_ir, "function FT:update_batch", "for m = 0, nmiss - 1 do")
    assert ops["BXOR"] == 0, f"the insertion loop compares keys: {ops}"
    assert ops["XLOAD"] <= 24, f"{ops['XLOAD']} loads per new flow: {ops}"


def test_index_doubling_copies_and_empties_each_slot_without_a_branch(new_flows_ir):
    # grow_in_place's copy loop, per old slot: no test but the loop's own, the entry copied out (2 stores) and the slot
    # emptied (2 stores) in the same pass.  Before: a guard on the slot's idx (the occupied slots left the trace for a
    # side trace: an unpredictable branch at load 1/4), and the old part emptied again by a fill of the whole index.
    ops = _loop_at(new_flows_ir, "function FT:grow_in_place", "for i = 0, old - 1 do")
    guards = {op: n for op, n in ops.items() if op in ("LT", "GE", "LE", "GT", "EQ", "NE", "ULT", "UGE", "ULE", "UGT")}
    assert guards == {"LE": 1}, f"the copy loop tests more than its bound: {ops}"
    assert ops["XSTORE"] == 4, f"{ops['XSTORE']} stores per slot: {ops}"
