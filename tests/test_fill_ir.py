"""What LuaJIT compiles for the fast path's fill loop and the flow table's key loop (issue 10).

The truth is LuaJIT's own IR of the compiled loops (``jit.util.traceir`` through tools/bench/fillir.py: the driver's
real ``Driver:fill`` and ``FT:update_batch`` popping the small-few --quick corpus capture from a packet ring in this
process, as tools/bench/stages.lua runs them): deterministic, measures no time.  Each property below failed on the
code before it (numbers per packet, the part of the trace after its LOOP instruction, small-few):

* decode.lua copied the IPv4 / IPv6 addresses with ``ffi.copy`` and reset ``src``/``dst`` and ``first`` with
  ``ffi.fill``: each compiles to plain moves followed by a barrier (IR ``XBAR``) after which LuaJIT forwards no
  earlier store of the struct to a later load, so every ``put_layer`` re-read ``d.nlayers`` from memory.  A loop of
  decode alone: 4 barriers and 246 instructions before; 1 (first[]'s fill, before every other store) and 212 now.
  The fill loop: 5 barriers before, 2 now (that one and the record header's ``ffi.copy``).
* flowtable.lua's ``make_key`` stored the 10 key words as int32 and the hash read them back as five 64-bit loads,
  each spanning two stores still in the CPU's store buffer (a failed store-to-load forwarding, five per packet):
  20 loads and 15 stores per packet before; now the key is built, stored and hashed as five 64-bit words: 11 and 10.
* decode() reset all 24 fields (and the 32 address bytes) before the path wrote the real values: LuaJIT keeps a
  store that a later one overwrites when frame loads come between (it cannot tell the frame from the lp_decoded), so
  a TCP/IPv4 packet stored ip_version, ipproto, l3/l4_offset, the ports, flags, seq, ack twice, payload_length three
  times and the IPv4 addresses as 64-bit zeros then 32-bit values.  Now each path writes the IP and L4 fields once
  (decode_l4 / no_l4 / no_ip): stores per packet in the decode-only loop 59 -> 46, in the fill loop 63 -> 50
  (and its IR 290 -> 275).  tests/test_decode.py::test_decode_writes_every_field checks no field is left unwritten.
* the fill loop popped the ring with Ring:peek / advance, which store the ring's head_local and popped_local (Lua
  table fields: an HSTORE each, not sunk out of a compiled loop) for every record: 2 per packet before; the batch
  pop (Ring:pop_cursor / rec_at / rec_next / pop_commit) keeps them in locals: 0.
* the fill loop carried the ring position (bytes ever, a double) from one record to the next and converted it to the
  record's index per packet (one TOBIT per packet, on a ~25-cycle chain of double/int conversions through the
  record's length); the batch pop's cursor is now a pointer in an FFI struct (shm/ring.lua lp_ring_cur): 0.
* decode() reset first[] with ``ffi.fill``, a lookup of "fill" in the ffi table (HREFK, HLOAD) in the part of the fill
  loop's trace before its LOOP, which runs again for every packet whose path went through a side trace (on vlan-mpls,
  mixed-zipf, ipv6 most of them): 1 hash lookup in the whole trace before, none now (decode.lua's ``ffill`` local).
* decode.lua read each big-endian field of the frame byte by byte (be16: two byte loads, a shift and an or; be32s:
  four loads, three shifts, three ors), five 16-bit and two 32-bit fields for a TCP/IPv4 packet: loads per packet in
  the decode-only loop 31, in the fill loop 38, and 198 / 277 IR instructions.  Now one 16- or 32-bit load and a
  byte swap each, at (p + o) + k: 20 and 27 loads, 169 / 248 instructions.
"""
from __future__ import annotations

import collections

import pytest

from tools.bench import corpus, fillir


@pytest.fixture(scope="module")
def ir():
    return fillir.fill_ir(corpus.make("small-few", True))


def _loop(ir: dict, file: str) -> collections.Counter:
    """Per-packet IR operations of the looping root trace that starts first in `file` (source order)."""
    locs = sorted((w for w in ir if w != "aborts" and w.startswith(file + ":")), key=lambda w: int(w.split(":")[1]))
    assert locs, f"no compiled loop in {file}: {sorted(ir)}"
    return collections.Counter(fillir.per_packet(ir[locs[0]]))


def _update_batch_key_loop(ir: dict) -> collections.Counter:
    import os
    from luaprobe.shm.luajit import package_dirs       # the flowtable.lua the runtimes load
    src = open(os.path.join(package_dirs()["engine"], "fastpath", "flowtable.lua")).read().split("\n")
    start = next(i for i, line in enumerate(src) if line.startswith("function FT:update_batch"))
    line = next(i for i in range(start, len(src)) if src[i].strip().startswith("for k = 0, n - 1 do")) + 1
    where = f"flowtable.lua:{line}"
    assert where in ir, f"the key loop ({where}) did not compile: {sorted(ir)}"
    return collections.Counter(fillir.per_packet(ir[where]))


def test_decode_forwards_its_stores(ir):
    walk = _loop(ir, "stages.lua")           # stages.lua's walk: pcapfile walker + decode, nothing else
    assert walk["XBAR"] <= 1, f"decode compiles {walk['XBAR']} store barriers per packet"
    assert sum(walk.values()) <= 225, f"a decode loop runs {sum(walk.values())} IR instructions per packet (246)"


def test_decode_writes_each_field_once(ir):
    walk, fill = _loop(ir, "stages.lua"), _loop(ir, "driver.lua")
    assert walk["XSTORE"] <= 48, f"a decode loop stores {walk['XSTORE']} times per packet (59 with the resets)"
    assert fill["XSTORE"] <= 52, f"the fill loop stores {fill['XSTORE']} times per packet (63 with the resets)"


def test_fill_loop_forwards_decode_stores(ir):
    fill = _loop(ir, "driver.lua")
    assert fill["XBAR"] <= 2, f"the fill loop compiles {fill['XBAR']} store barriers per packet"
    assert sum(fill.values()) <= 300, f"the fill loop runs {sum(fill.values())} IR instructions per packet"


def test_key_loop_builds_and_hashes_64_bit_words(ir):
    key = _update_batch_key_loop(ir)
    assert key["XLOAD"] <= 12 and key["XSTORE"] <= 11, \
        f"the key loop loads {key['XLOAD']} and stores {key['XSTORE']} times per packet (before: 20 and 15)"


def test_fill_loop_writes_no_table_field_per_packet(ir):
    fill = _loop(ir, "driver.lua")
    assert fill["HSTORE"] == 0, f"the fill loop stores {fill['HSTORE']} Lua table fields per packet"


def test_fill_loop_carries_no_ring_position_double(ir):
    fill = _loop(ir, "driver.lua")
    assert fill["TOBIT"] == 0, f"the fill loop converts {fill['TOBIT']} doubles to integers per packet (the ring position)"


def test_fill_loop_trace_looks_up_no_table_field(ir):
    locs = sorted((w for w in ir if w != "aborts" and w.startswith("driver.lua:")), key=lambda w: int(w.split(":")[1]))
    assert locs, f"no compiled loop in driver.lua: {sorted(ir)}"
    whole = collections.Counter(ir[locs[0]])           # its entry part too: what a side trace's return runs again
    assert whole["HREFK"] + whole["HREF"] + whole["HLOAD"] == 0, \
        f"the fill loop's trace looks up table fields: HREFK {whole['HREFK']}, HREF {whole['HREF']}, HLOAD {whole['HLOAD']}"


def test_decode_reads_each_big_endian_field_in_one_load(ir):
    walk, fill = _loop(ir, "stages.lua"), _loop(ir, "driver.lua")
    assert walk["XLOAD"] <= 22, f"a decode loop loads {walk['XLOAD']} times per packet (31 byte by byte)"
    assert fill["XLOAD"] <= 29, f"the fill loop loads {fill['XLOAD']} times per packet (38 byte by byte)"
    assert sum(walk.values()) <= 180, f"a decode loop runs {sum(walk.values())} IR instructions per packet (198)"
