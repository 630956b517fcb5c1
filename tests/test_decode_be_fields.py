"""The big-endian fields decode.lua reads from the frame (engine/fastpath/decode.lua be16 / be32s: since 99e6184 one
16- or 32-bit load and a byte swap each, at (p + o) + k) have the values the wire holds, wherever the frame starts.

test_decode.py pins layers, addresses, ports and flow keys for frames at the start of a fresh Lua string; nothing
checked the TCP sequence and acknowledgement numbers (read as 32-bit loads), nor a frame at an odd or unaligned
address (the packet ring places a frame wherever the previous one ended; a VLAN tag or an IPv4 option moves every
header after it by 4 bytes).  Two independent truths:

* frames built here with ``struct`` from the RFCs (Ethernet with 0-3 VLAN tags of the three TPIDs, PPPoE, Linux SLL
  and SLL2, raw IP; IPv4 with options, DF / MF and an Ethernet trailer after the datagram; IPv6 with hop-by-hop,
  routing and destination-options headers; TCP with options, UDP), at each start address 0..7 of a buffer
  (hypothesis): every field equals the value packed;
* tshark's fields of real captures from tests/data (VLAN, QinQ, MPLS, IPv6, SLL, SLL2, a big-endian pcap), each frame
  decoded at the odd addresses 1 and 3: ports, TCP flags, raw sequence and acknowledgement numbers, the first VLAN id
  and the number of tags.
"""
from __future__ import annotations

import os
import shutil
import struct
import subprocess

import pytest
from hypothesis import given, settings, strategies as st

from luaprobe.shm.luajit import new_runtime
from tests.helpers import PCAPS
from tests.test_decode import iter_pcap

LUA = r"""
local ffi = require 'ffi'
local decode = require 'luaprobe.engine.fastpath.decode'
local d = decode.new()
-- decode the bytes of s placed `align` bytes into a fresh buffer (its start is 16-byte aligned: ffi.new)
return function(s, linktype, align)
  local buf = ffi.new('uint8_t[?]', #s + 16)
  ffi.copy(buf + align, s, #s)
  decode.decode(d, buf + align, #s, linktype)
  return d.ip_version, d.ipproto, d.sport, d.dport, d.tcp_flags, d.tcp_seq, d.tcp_ack, d.vlan, d.nvlan, d.frag,
         d.payload_length, d.truncated, d.malformed, d.l4_offset
end
"""
FIELDS = ("ipv", "ipproto", "sport", "dport", "tcp_flags", "seq", "ack", "vlan", "nvlan", "frag", "payload_length",
          "truncated", "malformed", "l4_offset")


@pytest.fixture(scope="module")
def dec():
    fn = new_runtime().execute(LUA)

    def _dec(frame: bytes, linktype: int, align: int) -> dict:
        r = dict(zip(FIELDS, fn(frame, linktype, align)))
        r["seq"] &= 0xFFFFFFFF                 # int32 in lp_decoded: the bits of the 32-bit field
        r["ack"] &= 0xFFFFFFFF
        return r
    return _dec


# --------------------------------------------------------------------------- frames from the RFCs
u16, u32 = st.integers(0, 0xFFFF), st.integers(0, 0xFFFFFFFF)


@st.composite
def frames(draw):
    """(frame bytes, link type, expected fields): the fields are the values packed below."""
    tcp = draw(st.booleans())
    sport, dport = draw(u16), draw(u16)
    payload = draw(st.binary(max_size=40))
    want = {"sport": sport, "dport": dport, "payload_length": len(payload), "truncated": 0, "malformed": 0}
    if tcp:                                                   # RFC 9293 3.1
        seq, ack, flags = draw(u32), draw(u32), draw(st.integers(0, 255))
        words = draw(st.integers(5, 15))
        l4 = (struct.pack("!HHIIBBHHH", sport, dport, seq, ack, words << 4, flags, draw(u16), 0, draw(u16))
              + b"\x01" * (4 * (words - 5)) + payload)
        want |= {"ipproto": 6, "tcp_flags": flags, "seq": seq, "ack": ack}
    else:                                                     # RFC 768
        l4 = struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload
        want |= {"ipproto": 17, "tcp_flags": 0, "seq": 0, "ack": 0}
    proto = want["ipproto"]
    if draw(st.booleans()):                                   # IPv6, RFC 8200 (4.3-4.6: 8 + 8n bytes each)
        exts = draw(st.lists(st.tuples(st.sampled_from([0, 43, 60]), st.integers(0, 3)), max_size=3))
        chain, nxt = b"", proto
        for kind, n in reversed(exts):
            chain = struct.pack("!BB", nxt, n) + bytes(6 + 8 * n) + chain
            nxt = kind
        ip = (struct.pack("!IHBB", 0x60000000 | draw(st.integers(0, 0xFFFFF)), len(chain) + len(l4), nxt, 64)
              + draw(st.binary(min_size=32, max_size=32)) + chain + l4)
        want |= {"ipv": 6, "frag": 0}
        ethertype, ppp = 0x86DD, 0x0057
    else:                                                     # IPv4, RFC 791
        words, mf, df = draw(st.integers(5, 15)), draw(st.booleans()), draw(st.booleans())
        ip = (struct.pack("!BBHHHBBH", 0x40 | words, 0, 4 * words + len(l4), draw(u16), (df << 14) | (mf << 13),
                          64, proto, 0) + draw(st.binary(min_size=8, max_size=8)) + b"\x01" * (4 * (words - 5)) + l4)
        want |= {"ipv": 4, "frag": int(mf)}
        ethertype, ppp = 0x0800, 0x0021
    link = draw(st.sampled_from(["ethernet", "pppoe", "sll", "sll2", "raw"]))
    tags = [] if link == "raw" else draw(st.lists(st.tuples(st.sampled_from([0x8100, 0x88A8, 0x9100]), u16),
                                                  max_size=3))
    inner = ip
    if link == "pppoe":                                       # RFC 2516 4: session stage, then the PPP protocol
        inner = struct.pack("!BBHHH", 0x11, 0, draw(u16), len(ip) + 2, ppp) + ip
        ethertype = 0x8864
    if tags:
        want |= {"vlan": tags[0][1] & 0x0FFF}
    want["nvlan"] = len(tags)
    chain = b"".join(struct.pack("!HH", tpid, tci) for tpid, tci in tags)   # each TPID, TCI; then the next type
    first = tags[0][0] if tags else ethertype
    if tags:
        chain = chain[2:] + struct.pack("!H", ethertype)      # the first TPID is the link header's type field
    if link == "sll":
        head = struct.pack("!HHH8sH", 0, 1, 6, bytes(8), first)
        linktype = 113
    elif link == "sll2":
        head = struct.pack("!HHIHBB8s", first, 0, 1, 1, 0, 6, bytes(8))
        linktype = 276
    elif link == "raw":
        head, linktype = b"", 101
    else:
        head = bytes(6) + b"\x02\x00\x00\x00\x00\x01" + struct.pack("!H", first)
        linktype = 1
    trailer = b"" if link == "raw" else draw(st.binary(max_size=12))   # padding / FCS after the IP datagram
    return head + chain + inner + trailer, linktype, want


@settings(max_examples=1500, deadline=None)
@given(f=frames(), align=st.integers(0, 7))
def test_every_big_endian_field_is_the_value_packed_at_any_start_address(dec, f, align):
    frame, linktype, want = f
    got = dec(frame, linktype, align)
    assert {k: got[k] for k in want} == want, (frame.hex(), linktype, align)


# --------------------------------------------------------------------------- real captures against tshark
CAPTURES = ["vlan-mpls-mixed.pcap", "http-qinq-vlan.pcap", "vlan-icmp-arp.pcap", "http-ipv6-keepalive-gap.pcap",
            "sll-mptcp.pcap", "sll2-linux.pcap", "bigendian-pptp-gre.pcap", "mix-wikipedia-dns-http.pcap",
            "dns-udp-a-aaaa-mx.pcap", "trisul-tutorial.pcap"]
TSHARK_FIELDS = ("tcp.srcport", "tcp.dstport", "tcp.flags", "tcp.seq_raw", "tcp.ack_raw", "udp.srcport",
                 "udp.dstport")


def _tshark(path: str) -> list[tuple[dict, list[int]]]:
    """Per frame: tshark's first TCP / UDP fields, and every VLAN id of the frame in order."""
    cmd = ["tshark", "-r", path, "-o", "ip.defragment:FALSE", "-o", "ipv6.defragment:FALSE", "-T", "fields",
           "-E", "occurrence=f", "-E", "separator=|"] + [a for f in TSHARK_FIELDS for a in ("-e", f)]
    rows = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.splitlines()
    vlans = subprocess.run(["tshark", "-r", path, "-T", "fields", "-E", "occurrence=a", "-E", "aggregator=,",
                            "-e", "vlan.id"], capture_output=True, text=True, check=True).stdout.splitlines()
    return [(dict(zip(TSHARK_FIELDS, r.split("|"))), [int(v) for v in vl.split(",") if v])
            for r, vl in zip(rows, vlans)]


@pytest.mark.skipif(shutil.which("tshark") is None, reason="tshark not installed")
@pytest.mark.parametrize("name", CAPTURES)
def test_fields_at_odd_addresses_match_tshark(dec, name):
    path = os.path.join(PCAPS, name)
    truth = _tshark(path)
    packets = list(iter_pcap(path))
    assert len(truth) == len(packets) > 0
    checked = 0
    for i, ((linktype, caplen, _wire, data), (t, vlans)) in enumerate(zip(packets, truth), 1):
        for align in (1, 3):
            got = dec(data[:caplen], linktype, align)
            assert (got["nvlan"], got["vlan"] if vlans else None) == (len(vlans), vlans[0] if vlans else None), \
                (name, i, align)
            if got["truncated"] or got["frag"] or got["l4_offset"] < 0:
                continue
            if got["ipproto"] == 6 and t["tcp.srcport"]:
                want = (int(t["tcp.srcport"]), int(t["tcp.dstport"]), int(t["tcp.flags"], 16) & 0xFF,
                        int(t["tcp.seq_raw"]), int(t["tcp.ack_raw"]))
                assert (got["sport"], got["dport"], got["tcp_flags"], got["seq"], got["ack"]) == want, \
                    (name, i, align)
                checked += 1
            elif got["ipproto"] == 17 and t["udp.srcport"]:
                want = (int(t["udp.srcport"]), int(t["udp.dstport"]))
                assert (got["sport"], got["dport"]) == want, (name, i, align)
                checked += 1
    if name not in ("vlan-icmp-arp.pcap", "sll2-linux.pcap"):     # ARP and ICMP only
        assert checked > 0, f"no TCP or UDP packet of {name} compared"
