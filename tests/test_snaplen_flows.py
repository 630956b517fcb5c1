"""A headers-only capture (`tcpdump -s 64`, `editcap -s 64`) keeps each TCP connection whole: a TCP header whose
options the snaplen cut still gives its ports, so the packet counts in its connection's flow, as tshark shows it
("Packet size limited during capture", ports and flags decoded).  Before, every such packet got ports 0 and went to
a port-0 flow of its host pair (engine/fastpath/decode.lua l4_cut): at -s 64 Linux's timestamp option (12 bytes on
every segment) cuts nearly every header.

The truth is tshark's own decode of the cut file (editcap makes the cut, tshark reads the ports): per TCP / UDP
endpoint pair, frames and wire bytes (frame.len), against the flows table summed per pair."""
from __future__ import annotations

import collections
import ipaddress
import json
import os
import shutil
import sqlite3
import subprocess
import sys

import pytest

from tests import helpers

TSHARK = shutil.which("tshark")
EDITCAP = shutil.which("editcap")
PLUGIN = os.path.join(helpers.REPO, "engine", "examples", "tcp_ports.lua")

pytestmark = pytest.mark.skipif(TSHARK is None or EDITCAP is None, reason="tshark / editcap not installed")


def cut(src: str, snaplen: int, dst: str) -> str:
    subprocess.run([EDITCAP, "-s", str(snaplen), src, dst], check=True, capture_output=True)
    return dst


def tshark_pairs(path: str) -> collections.Counter:
    """(proto, frozenset of (address, port) ends) -> frames and wire bytes, for the TCP and UDP frames (IPv4
    protocol / IPv6 next header 6 or 17; ICMP errors, whose quoted header tshark also decodes, left out).  A frame
    cut before its ports has port 0 at both ends (the flow table's rule: it cannot know them)."""
    keep = "(ip.proto == 6 or ip.proto == 17 or ipv6.nxt == 6 or ipv6.nxt == 17) and not icmp and not icmpv6"
    fields = ("frame.len", "ip.proto", "ipv6.nxt", "ip.src", "ip.dst", "ipv6.src", "ipv6.dst", "tcp.srcport",
              "tcp.dstport", "udp.srcport", "udp.dstport")
    out = subprocess.run([TSHARK, "-r", path, "-Y", keep, "-T", "fields", "-E", "separator=|",
                          *[a for f in fields for a in ("-e", f)]], capture_output=True, text=True, check=True).stdout
    c = collections.Counter()
    for line in out.splitlines():
        flen, p4, p6, s4, d4, s6, d6, ts, td, us, ud = line.split("|")
        sp, dp = (ts, td) if ts else (us, ud)
        k = (int(p4 or p6), frozenset([(s4 or s6, int(sp or 0)), (d4 or d6, int(dp or 0))]))
        c[k, "packets"] += 1
        c[k, "bytes"] += int(flen)
    return c


def _addr(hexdots: str) -> str:
    return str(ipaddress.ip_address(bytes.fromhex(hexdots.replace(".", ""))))


def luaprobe_pairs(pcap: str, out: str) -> tuple[collections.Counter, dict]:
    env = dict(os.environ, PYTHONPATH=helpers.REPO)
    p = subprocess.run([sys.executable, "-m", "luaprobe.engine.daemon.cli", "run", PLUGIN, "--pcap", pcap,
                        "--out", out, "-q", "--json"], cwd=helpers.REPO, capture_output=True, text=True,
                       timeout=300, env=env)
    assert p.returncode == 0, p.stderr
    db = sqlite3.connect(os.path.join(out, "luaprobe.sqlite"))
    try:
        rows = db.execute("SELECT proto, ipa, porta, ipz, portz, packets_az + packets_za, bytes_az + bytes_za "
                          "FROM flows WHERE proto IN (6, 17)").fetchall()
    finally:
        db.close()
    c = collections.Counter()
    for proto, ipa, pa, ipz, pz, pk, by in rows:
        k = (proto, frozenset([(_addr(ipa), pa), (_addr(ipz), pz)]))
        c[k, "packets"] += pk
        c[k, "bytes"] += by
    return c, json.loads(p.stdout)


@pytest.mark.parametrize("name,snaplen", [
    ("trisul-tutorial.pcap", 54),             # Ethernet + IPv4 + 20 TCP bytes: every option cut
    ("trisul-tutorial.pcap", 64),             # -s 64: timestamps (12 bytes) cut on data segments too
    ("http-ipv6-keepalive-gap.pcap", 80),     # IPv6: 40-byte header, options cut at 80
    ("sll-mptcp.pcap", 64),                   # Linux cooked (SLL), MPTCP options
    ("http-chunked-dvwa.pcapng", 64),         # pcapng
])
def test_headers_only_capture_keeps_connections(tmp_path, name, snaplen):
    pcap = cut(os.path.join(helpers.PCAPS, name), snaplen, str(tmp_path / f"s{snaplen}-{name}"))
    truth = tshark_pairs(pcap)
    got, summary = luaprobe_pairs(pcap, str(tmp_path / "o"))
    assert summary["truncated_headers"] > 0                  # the cut did cut headers
    assert sum(v for (_k, m), v in truth.items() if m == "packets") > 0
    assert dict(got) == dict(truth)
