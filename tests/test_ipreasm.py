"""engine/fastpath/ipreasm.lua: IPv4 / IPv6 fragment reassembly (unit tests, and a hypothesis model test:
shuffled, duplicated, overlapping and gapped fragments against a first-wins byte model).

End to end (flows, hooks, files from fragmented captures) is in tests/test_cases.py.
"""
from __future__ import annotations

import random
import struct

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from luaprobe.shm.luajit import new_runtime
from tests import pktbuild as pb

LUA = r"""
local ffi = require 'ffi'
local decode = require 'luaprobe.engine.fastpath.decode'
require 'luaprobe.engine.plugins.packet'
local ipreasm = require 'luaprobe.engine.fastpath.ipreasm'
local T = {}
-- frames: list of strings (Ethernet), ts: list of times; returns completed frames (strings),
-- per completed frame {nfrags, wirelen, has_l4, frag flag of the fragment entries}, stats
function T.run(frames, opts, times)
  local R = ipreasm.new(opts)
  local out, info = {}, {}
  local e = ffi.new('lp_pkt')
  for i, fr in ipairs(frames) do
    local ts = times and times[i] or 0
    e.data = ffi.cast('const uint8_t *', fr)
    e.caplen, e.wirelen = #fr, #fr
    decode.decode(e.d, e.data, #fr, 1)
    if e.d.frag ~= 0 then
      local frame, len, nfrags, wirelen = R:add(e, ts)
      local l4left = e.d.first[decode.PROTO.TCP] >= 0 or e.d.first[decode.PROTO.UDP] >= 0
      if frame then
        local s = ffi.string(frame, len)
        local d = decode.new()
        decode.decode(d, ffi.cast('const uint8_t *', s), len, 1)
        out[#out + 1] = s
        info[#info + 1] = { nfrags, wirelen, d.first[decode.PROTO.TCP] >= 0 or d.first[decode.PROTO.UDP] >= 0,
                            l4left, d.frag, decode.flowkey(d) }
      end
    end
    R:expire(ts)
  end
  R:flush()
  return out, info, R.stats
end
return T
"""


@pytest.fixture(scope="module")
def T():
    lua = new_runtime(encoding=None)
    return lua, lua.execute(LUA)


def run(T, frames, times=None, **opts):
    lua, t = T
    out, info, stats = t.run(lua.table_from(frames), lua.table_from({k.encode(): v for k, v in opts.items()}),
                             lua.table_from(times) if times else None)
    return (list(out.values()), [list(i.values()) for i in info.values()],
            {k.decode(): v for k, v in stats.items()})


A4, B4 = "192.0.2.10", "198.51.100.20"
A6, B6 = "2001:db8::10", "2001:db8:1::20"


def tcp_datagram4(payload: bytes, ident=4242) -> bytes:
    return pb.ipv4(A4, B4, 6, pb.tcp(A4, B4, 41001, 80, 1, 1, pb.ACK | pb.PSH, payload), ident=ident, flags_off=0)


def test_ipv4_reverse_order(T):
    dg = tcp_datagram4(bytes(range(256)) * 10)
    frags = [pb.ether(f) for f in pb.frag4(dg, 1000)]
    out, info, stats = run(T, frags[::-1])
    assert out == [pb.ether(dg)]                         # byte for byte, header checksum recomputed
    assert info[0][:5] == [3, sum(map(len, frags)), True, False, 0]
    assert info[0][5] == b"06A:C0.00.02.0A:p-A029_C6.33.64.14:p-0050"
    assert stats["fragments"] == 3 and stats["datagrams"] == 1 and stats["pending"] == 0
    assert stats["held_bytes"] == 0


def test_ipv6_any_order_with_extension_header(T):
    """An unfragmentable Hop-by-Hop header stays; the Fragment header goes; Next Header is patched."""
    seg = pb.tcp(A6, B6, 40000, 80, 7, 9, pb.ACK, b"x" * 3000)
    hbh = bytes([44, 0, 1, 4, 0, 0, 0, 0])                  # hop-by-hop (PadN), next header 44
    frags = []
    for off in range(0, len(seg), 1448):
        piece = seg[off:off + 1448]
        fh = struct.pack("!BBHI", 6, 0, off | (off + 1448 < len(seg)), 0xABCDEF01)
        frags.append(pb.ether(pb.ipv6(A6, B6, 0, hbh + fh + piece)))
    order = [1, 2, 0]
    out, info, stats = run(T, [frags[i] for i in order])
    want = pb.ether(pb.ipv6(A6, B6, 0, bytes([6]) + hbh[1:] + seg))
    assert out == [want]
    assert info[0][2] is True and stats["datagrams"] == 1


def test_first_fragment_loses_its_l4_layer(T):
    """The first fragment's TCP header is not a whole segment: L4 hooks must not see it."""
    dg = tcp_datagram4(b"y" * 2000)
    frags = [pb.ether(f) for f in pb.frag4(dg, 1000)]
    out, info, _ = run(T, frags[:1])
    assert out == []
    lua, t = T
    # the entry itself: decode again and add, then look at its layers
    code = r"""
    local ffi, decode = require 'ffi', require 'luaprobe.engine.fastpath.decode'
    local ipreasm = require 'luaprobe.engine.fastpath.ipreasm'
    return function(fr)
      local e = ffi.new('lp_pkt'); e.data = ffi.cast('const uint8_t *', fr); e.caplen, e.wirelen = #fr, #fr
      decode.decode(e.d, e.data, #fr, 1)
      local before = e.d.first[decode.PROTO.TCP]
      ipreasm.new():add(e, 0)
      return before, e.d.first[decode.PROTO.TCP], e.d.nlayers, e.d.sport, e.d.l4_offset
    end"""
    before, after, nlayers, sport, l4 = lua.execute(code)(frags[0])
    assert (before, after, nlayers, sport, l4) == (2, -1, 2, 0, -1)


def test_timeout_and_incomplete(T):
    dg = tcp_datagram4(b"z" * 3000)
    frags = [pb.ether(f) for f in pb.frag4(dg, 1000)]
    # datagram 1: fragment 2 missing, times out; datagram 2 (other id) pending at end of input
    dg2 = [pb.ether(f) for f in pb.frag4(tcp_datagram4(b"w" * 3000, ident=7), 1000)]
    out, _, stats = run(T, [frags[0], frags[2], dg2[0]], times=[0, 1, 40], timeout=30)
    assert out == [] and stats["timeouts"] == 1 and stats["incomplete"] == 1 and stats["held_bytes"] == 0


def test_memory_cap_drops_oldest(T):
    frames = []
    for ident in range(10):
        frames.append(pb.ether(pb.frag4(tcp_datagram4(b"q" * 3000, ident=ident), 1000)[0]))
    out, _, stats = run(T, frames, max_bytes=4000)
    assert stats["dropped_cap"] == 6 and stats["incomplete"] == 4 and stats["pending"] == 0
    out, _, stats = run(T, frames, max_datagrams=4)
    assert stats["dropped_cap"] == 6 and stats["incomplete"] == 4


def test_malformed_fragments_counted(T):
    dg = tcp_datagram4(b"m" * 1600)
    odd = pb.ether(pb.frag4_piece(dg, 0, dg[20:20 + 1001], True))        # MF with a length not multiple of 8
    huge = pb.ether(pb.frag4_piece(dg, 65528, b"a" * 16, False))          # beyond 65,535
    out, _, stats = run(T, [odd, huge])
    assert out == [] and stats["malformed"] == 2 and stats["pending"] == 0


# --------------------------------------------------------------------------- model (hypothesis)

def l4_sum_ok(payload: bytes, v6: bool, proto: int = 17) -> bool:
    """The UDP / TCP checksum of a datagram payload between A and B (RFC 768, RFC 9293 §3.1, RFC 8200 §8.1), by
    hand from the RFCs: True when it verifies or cannot be checked (UDP shorter than its header, IPv4 UDP without a
    checksum)."""
    if len(payload) < (8 if proto == 17 else 20) or (proto == 17 and not v6 and payload[6:8] == b"\0\0"):
        return True
    addrs = pb.ip_bytes(A6) + pb.ip_bytes(B6) if v6 else pb.ip_bytes(A4) + pb.ip_bytes(B4)
    return pb.csum(addrs + struct.pack("!HH", proto, len(payload)) + payload) == 0


def model(frags, payload_len, v6=False):
    """First-wins byte model of one datagram key: frags = [(off, bytes, mf)] in arrival order.
    Returns the list of reassembled payloads (the key restarts after a completion).  A datagram whose fragments
    disagreed (an overlapping byte differs from the one held) is dropped when its checksum fails (l4_sum_ok)."""
    done = []
    held, total, have_first, differs = {}, None, False, False
    for off, data, mf in frags:
        n = len(data)
        if n == 0 or (mf and n % 8):
            continue
        if total is not None and off + n > total:
            continue
        if not mf:
            if total is None:
                if held and max(held) + 1 > off + n:
                    continue
                total = off + n
            elif total != off + n:
                continue
        for i, b in enumerate(data):
            differs |= held.setdefault(off + i, b) != b
        have_first |= off == 0
        if total is not None and have_first and all(i in held for i in range(total)):
            dg = bytes(held[i] for i in range(total))
            if not differs or l4_sum_ok(dg, v6):
                done.append(dg)
            held, total, have_first, differs = {}, None, False, False
    return done


@st.composite
def fragment_plans(draw):
    n = draw(st.integers(1, 3000))
    payload = draw(st.binary(min_size=n, max_size=n))
    size = draw(st.sampled_from([8, 64, 504, 1000, 1480]))
    pieces = [(off, payload[off:off + size], off + size < n) for off in range(0, n, size)]
    rng = random.Random(draw(st.integers(0, 2**32)))
    extra = []
    for _ in range(draw(st.integers(0, 4))):                     # overlapping fragments, other bytes
        off = rng.randrange(0, max(8, n), 8) if n > 8 else 0
        ln = rng.choice([8, 16, 24, 504])
        extra.append((off, bytes(rng.randrange(256) for _ in range(ln)), True))
    dups = [rng.choice(pieces) for _ in range(draw(st.integers(0, 3)))]
    allf = pieces + extra + dups
    rng.shuffle(allf)
    if draw(st.booleans()) and len(allf) > 1:                    # a gap: one fragment never captured
        allf.pop(rng.randrange(len(allf)))
    return payload, allf


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(plan=fragment_plans(), v6=st.booleans())
def test_reassembly_matches_model(T, plan, v6):
    payload, frags = plan
    if v6:
        frames = [pb.ether(pb.frag6_piece(A6, B6, 17, 99, off, d, mf)) for off, d, mf in frags]
    else:
        dg = pb.ipv4(A4, B4, 17, payload, ident=99, flags_off=0)
        frames = [pb.ether(pb.frag4_piece(dg, off, d, mf)) for off, d, mf in frags]
    # fragments that are not fragments (offset 0 and MF clear) are whole datagrams: not given to ipreasm
    frames_fr = [(f, fr) for f, fr in zip(frags, frames) if f[0] != 0 or f[2]]
    frames = [fr for _, fr in frames_fr]
    # IPv4 payloads above 65,515 bytes are impossible here (n <= 3000 + extras)
    want = model([f for f, _ in frames_fr], len(payload), v6)
    out, info, stats = run(T, frames)
    got = []
    for fr in out:
        if v6:
            plen = struct.unpack("!H", fr[18:20])[0]
            assert fr[20] == 17 and len(fr) == 14 + 40 + plen
            got.append(fr[54:])
        else:
            ip = fr[14:]
            assert struct.unpack("!H", ip[2:4])[0] == len(ip) and ip[6:8] == b"\0\0"
            assert pb.csum(ip[:20]) == 0                         # header checksum valid
            got.append(ip[20:])
    assert got == want
    assert stats["datagrams"] == len(want)
    assert stats["held_bytes"] == 0 and stats["pending"] == 0
    assert stats["fragments"] == len(frames)
