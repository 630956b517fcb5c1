"""The flow table's normalised key and its hash for one packet, against a model written from the rules (issue 10).

engine/fastpath/flowtable.lua ``make_key`` builds the key as five 64-bit words and hashes them from registers; the
model here is the documented layout and rule, written independently in Python: A is the end with the higher port,
on equal ports the end with the higher address (bytewise; equal addresses: the source), key words = A address,
Z address (16 bytes each, IPv4 in the first 4), ``portA << 16 | portZ``, ``version << 8 | protocol``; the hash is
the multiply-sum of the five little-endian 64-bit words with flowtable.lua's constants, then a multiply-xorshift
finaliser, low 32 bits.  Frames are built byte by byte (Ethernet, IPv4 or IPv6, TCP / UDP / ICMP) and go through
decode.lua and ``FT:update``, which runs the same ``make_key`` as update_batch.
"""
from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings, strategies as st

from luaprobe.shm.luajit import new_runtime

H = (0x9E3779B97F4A7C15, 0xC2B2AE3D27D4EB4F, 0x165667B19E3779F9, 0xD6E8FEB86659FD93, 0xFF51AFD7ED558CCD)
HF = 0xC4CEB9FE1A85EC53
M64 = (1 << 64) - 1

KEY = r"""
local frame = ...
local ffi = require("ffi")
local decode = require("luaprobe.engine.fastpath.decode")
local flowtable = require("luaprobe.engine.fastpath.flowtable")
local d = decode.new()
local p = ffi.cast("const uint8_t *", frame)
decode.decode(d, p, #frame, 1)
local ft = flowtable.new{capacity = 1024}
ft:update(d, 1.0, #frame)
local kf = ft.kone
return ffi.string(ffi.cast("const char *", kf.key), 40), kf.hash, kf.dir
"""


def _model(src: bytes, dst: bytes, sport: int, dport: int, ver: int, proto: int):
    """(key bytes, hash as int32, dir) by the rule in the module doc."""
    if sport != dport:
        src_is_z = sport < dport
    else:
        src_is_z = src < dst
    a, z, pa, pz = (dst, src, dport, sport) if src_is_z else (src, dst, sport, dport)
    ports = (pa << 16 | pz) & 0xffffffff
    key = a.ljust(16, b"\0") + z.ljust(16, b"\0") + struct.pack("<II", ports, ver << 8 | proto)
    q = struct.unpack("<5Q", key)
    h = sum(x * c for x, c in zip(q, H)) & M64
    h = ((h ^ (h >> 29)) * HF) & M64
    h = (h ^ (h >> 32)) & 0xffffffff
    return key, h - (1 << 32) if h >= 1 << 31 else h, 1 if src_is_z else 0


def _frame(src: bytes, dst: bytes, sport: int, dport: int, proto: int) -> bytes:
    if proto == 6:
        l4 = struct.pack(">HHIIBBHHH", sport, dport, 1, 0, 5 << 4, 0x10, 1024, 0, 0)
    elif proto == 17:
        l4 = struct.pack(">HHHH", sport, dport, 8, 0)
    else:
        l4 = struct.pack(">BBHI", 8 if len(src) == 4 else 128, 0, 0, 0)
    if len(src) == 4:
        ip = struct.pack(">BBHHHBBH", 0x45, 0, 20 + len(l4), 0, 0, 64, proto, 0) + src + dst
        et = 0x0800
    else:
        ip = struct.pack(">IHBB", 6 << 28, len(l4), proto, 64) + src + dst
        et = 0x86dd
    return b"\x02" * 6 + b"\x04" * 6 + struct.pack(">H", et) + ip + l4


@pytest.fixture(scope="module")
def lua_key():
    """frame bytes -> (key bytes, hash, dir) from decode.lua and FT:update's make_key."""
    lua = new_runtime()
    f = lua.eval("function(frame) " + KEY.replace("local frame = ...", "") + " end")
    return lambda frame: tuple(f(frame))


@settings(max_examples=300, deadline=None)
@given(ver=st.sampled_from([4, 6]), a=st.binary(min_size=16, max_size=16), b=st.binary(min_size=16, max_size=16),
       same_addr=st.booleans(), sport=st.integers(0, 65535), dport=st.integers(0, 65535), same_port=st.booleans(),
       proto=st.sampled_from([6, 17, 1]))
def test_key_and_hash_match_the_model(lua_key, ver, a, b, same_addr, sport, dport, same_port, proto):
    n = 4 if ver == 4 else 16
    src, dst = a[:n], (a if same_addr else b)[:n]
    if proto == 1:
        proto = 1 if ver == 4 else 58
        sport = dport = 0                       # ICMP: no ports, the address rule decides
    elif same_port:
        dport = sport
    key, h, d = lua_key(_frame(src, dst, sport, dport, proto))
    assert (bytes(key), h, d) == _model(src, dst, sport, dport, ver, proto)

