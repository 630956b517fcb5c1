"""A batch of new flows' first packets in update_batch (engine/fastpath/flowtable.lua, issue 10: flows-1m, every
packet a new flow).

When every packet of a batch created its flow, update_batch writes each new record's state after its first packet in a
loop of its own (first_packet: counters, flags seen, state, TCP sequence end, SYN time, from the record's known state)
instead of loop 3's general steps (idle and port-reuse checks, account, tcp_state / tcp_track, LRU move).  Two checks:

* Equivalence: every field of every record (hot and cold: key, state, counters, flags seen, TCP sequence tracking,
  first / last time, id, setup RTT and its SYN time, retransmissions) and every packet's flow, direction and unique id
  are those of FT:update(), which runs the general steps (new_flow, then account and tcp_state as for any packet), on
  real captures of tests/data and on a capture whose flows start with each kind of TCP segment (SYN, SYN-ACK, bare
  ACK, data, FIN, RST, in either direction), UDP and ICMP, with SYN retries, handshakes, retransmissions and port
  reuse after them; batches of 1 packet (every batch of a new flow's packet takes the new loop), 7 and 256.  The SYN
  time and setup RTT to 0.1 µs (update() takes the time as one double and rounds them from it); the two lists' links
  are left out (update_batch creates a batch's flows before loop 3 moves its known ones: its order, as before).
* Structure: a batch of 256 new flows' first packets, run in the interpreter with a call hook, calls none of loop 3's
  per-packet functions (account, tcp_state, lru_touch); the same flows' next batch calls each 256 times.  Before: 256
  calls each in the first batch too.
"""
from __future__ import annotations

import os
import struct

import pytest

from luaprobe.shm.luajit import new_runtime
from tests import helpers
from tests.helpers import PCAPS
from tools.bench.flowtable_ab import read_pcap

LUA = r"""
local ffi = require "ffi"
local decode = require "luaprobe.engine.fastpath.decode"
local flowtable = require "luaprobe.engine.fastpath.flowtable"
local packet = require "luaprobe.engine.plugins.packet"
local HOT = {"state", "lsec", "tcp_dirs", "live", "stage_off", "last_ts", "id", "packets_az", "packets_za", "bytes_az",
             "bytes_za", "payload_az", "payload_za"}
local TOL = {rtt = 0.1, syn_nsec = 100}
local COLD = {"first_ts", "rtt", "retrans_az", "retrans_za", "syn_sec", "syn_nsec", "porta", "portz", "ipver", "proto"}
-- frames: the records' bytes one after the other; lens, secs, usecs: per record.  Returns nil and the records used when
-- both tables agree, else the first difference
local function check(frames, lens, secs, usecs, linktype, bsize)
  local opts = {capacity = 4096, idle_timeout = 1e9, active_timeout = 1e9, huge_pages = false}
  local A, B = flowtable.new(opts), flowtable.new(opts)
  local b = packet.new_batch(bsize)
  local d = decode.new()
  local base = ffi.cast("const uint8_t *", frames)
  local n, off, m = #lens, 0, 0
  -- times from second 1 on: update() takes one double and rounds its nanoseconds from it, exact only for small seconds
  local s0 = secs[1] - 1
  local out = {}            -- per packet: flow, dir, unique id of update_batch
  local function flush()
    A:update_batch(b, m)
    for k = 0, m - 1 do out[#out + 1] = {b[k].flow, b[k].dir, b[k].flow_uid} end
    m = 0
  end
  for i = 1, n do
    local p = b[m]
    p.data, p.caplen, p.wirelen, p.linktype = base + off, lens[i], lens[i], linktype
    p.ts_sec, p.ts_nsec = secs[i] - s0, usecs[i] * 1000
    decode.decode(p.d, p.data, p.caplen, linktype)
    m = m + 1
    if m == bsize then flush() end
    off = off + lens[i]
  end
  if m > 0 then flush() end
  off = 0
  for i = 1, n do
    decode.decode(d, base + off, lens[i], linktype)
    local idx, dir = B:update(d, (secs[i] - s0) + (usecs[i] * 1000) * 1e-9, lens[i])   -- as update_batch makes it
    off = off + lens[i]
    local o = out[i]
    if d.ip_version ~= 0 and d.frag == 1 then idx, dir = -1, 0 end      -- update_batch leaves fragments out
    local uid = idx >= 0 and B.flows[idx].id or 0
    if o[1] ~= idx or o[2] ~= dir or o[3] ~= uid then
      return ("packet %d: update_batch flow %d dir %d uid %s, update %d %d %s"):format(i, o[1], o[2], o[3], idx, dir,
                                                                                     uid)
    end
  end
  if A.hw ~= B.hw or A.created ~= B.created or A.live ~= B.live then return "record counts differ" end
  for i = 0, A.hw - 1 do
    local a, c = A.flows[i], B.flows[i]
    for w = 0, 9 do if a.key[w] ~= c.key[w] then return ("record %d key word %d"):format(i, w) end end
    for _, f in ipairs(HOT) do
      if a[f] ~= c[f] then return ("record %d %s: %s against %s"):format(i, f, tostring(a[f]), tostring(c[f])) end
    end
    for s = 0, 1 do
      if a.tcp_next[s] ~= c.tcp_next[s] or a.tcp_flags_seen[s] ~= c.tcp_flags_seen[s] then
        return ("record %d TCP tracking of direction %d"):format(i, s)
      end
    end
    local ac, cc = A.cold[i], B.cold[i]
    for _, f in ipairs(COLD) do
      -- update() takes the packet time as one double of seconds and rounds the SYN time's nanoseconds from it: a few
      -- ns off the capture's on captures spanning years (ts ~ 1e8 s here), so those two fields to 0.1 µs
      if ac[f] ~= cc[f] and not (TOL[f] and math.abs(ac[f] - cc[f]) <= TOL[f]) then
        return ("record %d cold %s: %s against %s"):format(i, f, tostring(ac[f]), tostring(cc[f]))
      end
    end
  end
  return nil, A.hw
end
return function(...)
  local err, hw = check(...)
  return err or false, hw or 0
end
"""


def _first_packets_capture(path: str) -> None:
    """Ethernet/IPv4 flows, each starting with another kind of packet, then more packets of the same flows: for TCP
    flow i (10.9.0.i:2000+i <-> 192.0.2.1:80) the first segment is flags[i % 8] from the client or (i // 8 odd) the
    server, with 0 or 20 bytes of payload; then a SYN retry, a handshake, data both ways, a retransmission and, for
    every third flow, a SYN with a new sequence number (port reuse).  Then flows of a lone SYN or of one handshake
    (SYN, SYN-ACK, ACK, FIN with data).  Plus UDP and ICMP flows of one and two packets."""
    cap = helpers.Ipv4Pcap(137)
    frame = cap.frame

    def tcp(i, srv, flags, seq, pl):
        c, s = bytes([10, 9, 0, i]), bytes([192, 0, 2, 1])
        src, dst, sp, dp = (s, c, 80, 2000 + i) if srv else (c, s, 2000 + i, 80)
        frame(src, dst, 6, struct.pack("!HHIIBBHHH", sp, dp, seq, 7, 0x50, flags, 8192, 0, 0) + b"y" * pl)

    kinds = [0x02, 0x12, 0x10, 0x18, 0x11, 0x04, 0x14, 0x19]
    flows = 48
    for i in range(flows):
        tcp(i, (i // 8) & 1, kinds[i % 8], 5000 + 11 * i, 20 * ((i // 16) & 1))
    for i in range(flows):
        tcp(i, 0, 0x02, 100 + i, 0)                   # SYN (a retry of the first when it was one from the client)
        tcp(i, 1, 0x12, 9000 + i, 0)
        tcp(i, 0, 0x10, 101 + i, 0)
        tcp(i, 0, 0x18, 101 + i, 30)
        tcp(i, 1, 0x18, 9001 + i, 40)
        tcp(i, 0, 0x18, 101 + i, 30)                  # retransmission
        if i % 3 == 0:
            tcp(i, 0, 0x02, 77777 + i, 0)             # port reuse: a SYN with another sequence number
            tcp(i, 1, 0x12, 88888 + i, 0)
    for i in range(100, 108):                        # one handshake each, the RTT from the first packet's SYN time
        tcp(i, 0, 0x02, 400 + i, 0)
        if i % 2:
            tcp(i, 1, 0x12, 600 + i, 0)
            tcp(i, 0, 0x10, 401 + i, 0)
            tcp(i, 0, 0x19, 401 + i, 10)
    for i in range(20):
        frame(bytes([10, 8, 0, i]), bytes([192, 0, 2, 53]), 17,
              struct.pack("!HHHH", 3000 + i, 53, 8 + 12, 0) + b"q" * 12)
        if i % 2:
            frame(bytes([192, 0, 2, 53]), bytes([10, 8, 0, i]), 17,
                  struct.pack("!HHHH", 53, 3000 + i, 8 + 5, 0) + b"a" * 5)
        frame(bytes([10, 7, 0, i]), bytes([192, 0, 2, 9]), 1, struct.pack("!BBHHH", 8, 0, 0, i, 1) + b"p" * 8)
    cap.write(path)


@pytest.fixture(scope="module")
def rt():
    return new_runtime(encoding=None)


@pytest.mark.parametrize("bsize", [1, 7, 256])
@pytest.mark.parametrize("name", ["trisul-16minutes.pcap", "mix-eth-tls-http-dns.pcap", "http-ipv6-keepalive-gap.pcap",
                                  "vlan-mpls-mixed.pcap", "ipv6-icmp6.pcap", "tcp-echo-many-flows.pcap",
                                  "first-packets"])
def test_batch_records_equal_update_records(rt, tmp_path, name, bsize):
    if name == "first-packets":
        path = str(tmp_path / "first.pcap")
        _first_packets_capture(path)
    else:
        path = os.path.join(PCAPS, name)
    fn = rt.execute(LUA)
    recs, linktype = read_pcap(path)
    err, hw = fn(b"".join(r[2] for r in recs), rt.table_from([len(r[2]) for r in recs]),
                 rt.table_from([r[0] for r in recs]), rt.table_from([r[1] for r in recs]), linktype, bsize)
    assert err is False, err
    assert hw > 0


CALLS = r"""
-- update_batch on a batch of `n` TCP segments (ACK, 10 bytes), each of flow i (10.5.x.y:3000+i -> 192.0.2.7:80), in the
-- interpreter with a call hook: returns how often loop 3's per-packet functions ran (by the line that defines them)
local ffi = require "ffi"
local decode = require "luaprobe.engine.fastpath.decode"
local flowtable = require "luaprobe.engine.fastpath.flowtable"
local packet = require "luaprobe.engine.plugins.packet"
jit.off()
jit.flush()
local ft = flowtable.new{capacity = 4096, huge_pages = false}
local b = packet.new_batch(256)
-- a VM's first update_batch walks loop 3 over a batch of its own first (flowtable.lua prime_known_runs): done here,
-- before any hook counts
flowtable.new{capacity = 16, huge_pages = false}:update_batch(b, 0)
return function(n, lines, sec)
  for i = 0, n - 1 do
    local p = b[i]
    local d = p.d
    decode.decode(d, '', 0, 9999)
    d.ip_version, d.ipproto = 4, 6
    d.src[0], d.src[1], d.src[2], d.src[3] = 10, 5, bit.rshift(i, 8), bit.band(i, 255)
    d.dst[0], d.dst[1], d.dst[2], d.dst[3] = 192, 0, 2, 7
    d.sport, d.dport, d.tcp_flags, d.tcp_seq, d.payload_length = 3000 + i, 80, 0x10, 1000 + i, 10
    d.first[decode.PROTO.TCP] = 34
    p.ts_sec, p.ts_nsec, p.wirelen = sec, 1000 * i, 64
  end
  local want, count = {}, {}
  for name, line in pairs(lines) do want[line] = name; count[name] = 0 end
  debug.sethook(function()
    local info = debug.getinfo(2, "S")
    local name = want[info.linedefined]
    if name and info.source:find("flowtable") then count[name] = count[name] + 1 end
  end, "c")
  ft:update_batch(b, n)
  debug.sethook()
  for i = 0, n - 1 do assert(b[i].flow == i and b[i].flow_uid == ft.flows[i].id, "packet " .. i) end
  return count
end
"""


def test_loop3_skips_new_flows_first_packets():
    # 256 first packets, then the same 256 flows again in a later second (each flow known): loop 3's counters and TCP
    # state run only for the second batch (before: for both, 256 + 256 calls each)
    from luaprobe.shm.luajit import package_dirs
    src = open(os.path.join(package_dirs()["engine"], "fastpath", "flowtable.lua")).read().split("\n")
    lines = {name: next(i + 1 for i, s in enumerate(src) if s.startswith(f"local function {name}("))
             for name in ("account", "tcp_state", "lru_touch")}
    rt = new_runtime(encoding=None)          # a VM of its own: no trace compiled before jit.off (a trace calls no hook)
    run = rt.execute(CALLS)
    first = dict(run(256, rt.table_from(lines), 100).items())
    again = dict(run(256, rt.table_from(lines), 101).items())
    assert again == {"account": 256, "tcp_state": 256, "lru_touch": 256}, again
    assert first == {"account": 0, "tcp_state": 0, "lru_touch": 0}, first
