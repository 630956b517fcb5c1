"""Flow key formatting at export (issue 10): Lua (decode.put_flowkey into the export record, what the driver does)
against numpy (hex digits from the flow table's raw address words, vectorised), for N flows in 4,096-flow chunks.
Thread CPU time, minimum of 3 passes; both must give the same strings.

    .venv/bin/python tools/bench/flowkey_cost.py [N]      # default 1,000,000 flows (1 in 5 IPv6)
"""
from __future__ import annotations

import ctypes
import sys
import time

import numpy as np

from luaprobe.shm.luajit import new_runtime

N = int(sys.argv[1]) if len(sys.argv) > 1 else 1_000_000
lua = new_runtime()
setup = lua.execute(r'''
local ffi = require "ffi"
local flowtable = require "luaprobe.engine.fastpath.flowtable"
require "luaprobe.engine.fastpath.driver"
local N = ...
local ft = flowtable.new{capacity = 1048576, idle_timeout = 1e9, active_timeout = 1e9}
local d = ffi.new("lp_decoded")
math.randomseed(7)
for i = 1, N do
  local v6 = i % 5 == 0
  d.ip_version = v6 and 6 or 4
  d.ipproto = i % 3 == 0 and 17 or 6
  for k = 0, 15 do d.src[k] = math.random(0, 255); d.dst[k] = math.random(0, 255) end
  d.sport = math.random(1024, 65535); d.dport = 80
  ft:update(d, 1000 + i * 1e-6, 60)
end
local rows = ffi.new("lp_flowrow[?]", 4096)
local function lua_keys()
  local lru, sen, k = ft.lru, ft.capacity, 0
  local i = lru[sen].next
  while i ~= sen do
    ft:put_key(i, rows[k % 4096].key)
    k = k + 1
    i = lru[i].next
  end
  return k
end
return ft, lua_keys, tonumber(ffi.cast("intptr_t", ft.flows)), ffi.sizeof("lp_flow"),
  ffi.offsetof("lp_flow", "a"), ffi.offsetof("lp_flow", "z"), ffi.offsetof("lp_flow", "ports"),
  ffi.offsetof("lp_flow", "vproto"), ft.hw
''', N)
ft, lua_keys, addr, size, oa, oz, op, ov, hw = setup
hw = int(hw)
# the hot record's key words: ports = porta << 16 | portz, vproto = ipver << 8 | proto (flowtable.lua lp_flow)
dt = np.dtype({"names": ["a", "z", "ports", "vproto"],
               "formats": [("u1", 16), ("u1", 16), "<u4", "<u4"],
               "offsets": [oa, oz, op, ov], "itemsize": size})
flows = np.frombuffer((ctypes.c_char * (size * hw)).from_address(addr), dt)
HEX = np.frombuffer(b"0123456789ABCDEF", np.uint8)

def np_keys(rec):
    n = len(rec)
    f = {"a": rec["a"], "z": rec["z"], "porta": rec["ports"] >> 16, "portz": rec["ports"] & 0xFFFF,
         "ipver": rec["vproto"] >> 8, "proto": rec["vproto"] & 0xFF}
    out = np.zeros((n, 84), np.uint8)
    out[:, 0] = HEX[f["proto"] >> 4]; out[:, 1] = HEX[f["proto"] & 15]
    v6 = f["ipver"] == 6
    out[:, 2] = np.where(v6, ord("B"), ord("A")); out[:, 3] = ord(":")
    def hexes(a):  # (n, 16) -> (n, 32)
        h = np.empty((len(a), 32), np.uint8); h[:, 0::2] = HEX[a >> 4]; h[:, 1::2] = HEX[a & 15]; return h
    def port(p):
        return np.stack([HEX[(p >> s) & 15] for s in (12, 8, 4, 0)], 1)
    for sel, L in ((~v6, 11), (v6, 32)):
        g = {k: v[sel] for k, v in f.items()}
        ha, hz = hexes(g["a"]), hexes(g["z"])
        o = out[sel]
        if L == 11:
            for j in range(4):
                o[:, 4 + 3 * j: 6 + 3 * j] = ha[:, 2 * j: 2 * j + 2]
                o[:, 12 + L + 3 * j: 14 + L + 3 * j] = hz[:, 2 * j: 2 * j + 2]
                if j < 3: o[:, 6 + 3 * j] = ord("."); o[:, 14 + L + 3 * j] = ord(".")
        else:
            o[:, 4:36] = ha; o[:, 44:76] = hz
        o[:, 4 + L: 7 + L] = np.frombuffer(b":p-", np.uint8); o[:, 7 + L: 11 + L] = port(g["porta"])
        o[:, 11 + L] = ord("_")
        o[:, 12 + 2 * L: 15 + 2 * L] = np.frombuffer(b":p-", np.uint8); o[:, 15 + 2 * L: 19 + 2 * L] = port(g["portz"])
        out[sel] = o
    return out.view("S84").ravel()

live = flows[:hw]
def best(fn):
    t = []
    for _ in range(3):
        c = time.thread_time(); fn(); t.append(time.thread_time() - c)
    return min(t)
tl = best(lua_keys)
tn = best(lambda: [np_keys(live[i:i + 4096]) for i in range(0, hw, 4096)])
# same strings?
got = np_keys(live[:4096])
ref = lua.eval('''function(ft, n) local ffi = require "ffi"; local b = ffi.new("uint8_t[84]"); local t = {}
  for i = 0, n - 1 do t[#t + 1] = ffi.string(b, ft:put_key(i, b)) end return t end''')(ft, 4096)
assert [x.decode() for x in got.tolist()] == [ref[i + 1].decode() for i in range(4096)], "numpy keys differ"
print(f"{hw} flows: Lua put_key {tl / hw * 1e9:.0f} ns/flow ({tl:.2f} s), numpy {tn / hw * 1e9:.0f} ns/flow ({tn:.2f} s), 4,096-flow chunks; same strings")
