"""Loop 3's trace is made for a common TCP segment in every process, whatever packet comes when LuaJIT finds the loop
hot (flowtable.lua known_runs and prime_known_runs, issue 10: "same file, same result").

LuaJIT records a loop's root trace on the iteration after its hot counter runs out, and which packet that is differs
between processes: the 64 hot counters are shared by bytecode address and every aborted recording re-arms its
counter with random bits (lj_dispatch.h, lj_trace.c penalty_pc).  A root trace recorded on a SYN, a handshake's last
ACK, a retransmission or a UDP datagram sends every common segment out of the loop at that test (callgrind on the
http corpus: 502 instead of ~350 instructions a packet, docs/benchmarks.md "Known flows, 2026-12-02, session 22").
LuaJIT's `hotloop` parameter moves every loop's recording point as another process's counters would; the capture
here opens its connections in bursts (SYNs, SYN-ACKs, last ACKs of 16 connections in a row) between UDP datagrams and
retransmissions, so recordings land on every kind of packet as hotloop changes.

Independent truth: LuaJIT's own IR of the trace (jit.util.traceir, tools/bench/fillir.py), not our timings: a common
segment of a known TCP flow stores exactly 9 values in loop 3 (last_ts, three counters, flags seen, state, sequence
end, directions seen, flow_uid: tests/test_flowtable_known_flow_stores.py); a trace recorded on a UDP datagram
stores 5 (no TCP state), on a SYN 11 or more (the SYN time, the port-reuse check's stores).
"""
from __future__ import annotations

import collections
import os
import struct

import pytest

from luaprobe.shm.luajit import package_dirs
from tests import helpers
from tools.bench import fillir


def _bursty_capture(path: str, groups: int = 40, per: int = 16, rounds: int = 6, udp_per: float = 1 / 3) -> None:
    """A pcap: `groups` groups of `per` TCP connections (10.1.g.i:2000+i -> 192.0.2.1:80), each group's SYNs, SYN-ACKs
    and last ACKs in a row, then `rounds` rounds of one 20-byte segment per connection in alternating directions,
    `udp_per` UDP datagrams (10.2.g.i:3000+i -> 192.0.2.53:53) a segment (1/3: one after every third) and every 7th
    segment sent twice (a retransmission)."""
    cap = helpers.Ipv4Pcap(7)
    frame = cap.frame
    nxt = {}

    def tcp(g, i, srv, flags, pl, again=False):
        c, s = bytes([10, 1, g, i]), bytes([192, 0, 2, 1])
        src, dst, sp, dp = (s, c, 80, 2000 + i) if srv else (c, s, 2000 + i, 80)
        k = (g, i, srv)
        sq = nxt.get(k, 5000 + 13 * i + 700000 * srv)
        if again:
            sq = (sq - pl) & 0xffffffff
        ack = nxt.get((g, i, 1 - srv), 0)
        hdr = struct.pack("!HHIIBBHHH", sp, dp, sq, ack, 0x50, flags, 8192, 0, 0)
        if not again:
            nxt[k] = (sq + pl + (1 if flags & 0x03 else 0)) & 0xffffffff
        frame(src, dst, 6, hdr + b"y" * pl)

    def udp(g, i):
        frame(bytes([10, 2, g, i]), bytes([192, 0, 2, 53]), 17, struct.pack("!HHHH", 3000 + i, 53, 8 + 12, 0) + b"q" * 12)

    n = 0
    for g in range(groups):
        for i in range(per):
            tcp(g, i, 0, 0x02, 0)
        for i in range(per):
            tcp(g, i, 1, 0x12, 0)
        for i in range(per):
            tcp(g, i, 0, 0x10, 0)
        for r in range(rounds):
            for i in range(per):
                srv = r & 1
                tcp(g, i, srv, 0x18 if srv else 0x10, 20)
                n += 1
                if n % 7 == 0:
                    tcp(g, i, srv, 0x18 if srv else 0x10, 20, again=True)
                for _ in range(int(n * udp_per) - int((n - 1) * udp_per)):
                    udp(g, i)
    cap.write(path)


def _loop3_line() -> str:
    src = open(os.path.join(package_dirs()["engine"], "fastpath", "flowtable.lua")).read().split("\n")
    start = next(i for i, s in enumerate(src) if s.startswith("local function known_runs("))
    line = next(i for i in range(start, len(src)) if src[i].strip() == "for j = k, n - 1 do") + 1
    return f"flowtable.lua:{line}"


@pytest.fixture(scope="module")
def captures(tmp_path_factory):
    d = tmp_path_factory.mktemp("loop3")
    _bursty_capture(str(d / "tcp.pcap"))                  # 3 TCP segments to a UDP datagram
    _bursty_capture(str(d / "udp.pcap"), udp_per=3)       # 3 UDP datagrams to a TCP segment: a DNS server's mix
    return d


@pytest.mark.parametrize("hotloop", [5, 23, 40, 50, 56, 70, 80])
@pytest.mark.parametrize("mix, stores", [("tcp", 9), ("udp", 5)])
def test_loop3_trace_is_the_common_packet_of_the_main_protocol_at_any_hotloop(captures, mix, stores, hotloop):
    """Mostly TCP: the trace a common TCP segment's (9 stores); mostly UDP: a UDP datagram's of a known flow (5:
    last_ts, three counters, flow_uid), the other protocol's packets leaving it into a side trace."""
    where = _loop3_line()
    ir = fillir.fill_ir(str(captures / f"{mix}.pcap"), hotloop=hotloop)
    assert where in ir, f"loop 3 ({where}) has no looping root trace at hotloop {hotloop}: {sorted(ir)}"
    ops = collections.Counter(fillir.per_packet(ir[where]))
    assert ops["XSTORE"] == stores, (f"{mix}, hotloop {hotloop}: loop 3's trace stores {ops['XSTORE']} values a "
                                     f"packet, not {stores}: {dict(ops)}")
