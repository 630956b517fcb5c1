"""What update_batch's loop 3 stores for a packet of a known TCP flow (flowtable.lua, issue 10: small-few, 500 flows
all known, ~25 ns/packet in the flow table).

A segment that is not a SYN without ACK does not write the flow's SYN time: syn_time runs in loop 3's port-reuse
test (SYN without ACK), so loop 3's trace (known_runs' for loop), which every other packet runs, has 9 stores a
packet (last_ts, three counters, flags seen, state, sequence end, directions seen, flow_uid; a retransmission's count
and the handshake's RTT are stored out of that loop, for the segments that have them).  Before: 13 (syn_sec and
syn_nsec into the scratch cold record on every segment), then 11 (the retransmission count stored branch-free into
the flow's or the scratch cold record, until 2026-12-02: docs/benchmarks.md "Known flows, 2026-12-02, session 21").  Independent
truth: LuaJIT's IR of that loop (jit.util.traceir through tools/bench/fillir.py), not our timings; the flows' setup RTT
still comes from the latest SYN (tests/test_flow_tcp_metrics.py against tshark).

The capture holds no SYN: its flows are picked up mid-connection.  A handshake first did not keep the SYN branch out
of loop 3's root trace: LuaJIT's hot counters are shared by bytecode address (64 slots, lj_dispatch.h HOTCOUNT_PCMASK),
so when another loop's counter shares loop 3's slot, loop 3 goes hot within its first packets and the root trace was
recorded on a SYN (13 stores, the SYN time among them; 5 runs in 150, CI of da93ee7).  Since session 22 the trace is
recorded before any traffic on common segments (flowtable.lua prime_known_runs; tests/test_flowtable_loop3_trace.py
checks it at seven hotloop values), and a later recording that meets a SYN aborts.  The test still takes the best of
up to three fresh VMs (a rare trace tree was seen once in many CI runs before, CI of 8ceb454): a store added to the
known-flow path (the regression it guards against) shows in every VM.
"""
from __future__ import annotations

import collections
import os
import struct

from luaprobe.shm.luajit import package_dirs
from tools.bench import fillir


def _known_flows_capture(path: str, flows: int = 4, rounds: int = 8000) -> None:
    """A pcap of `flows` TCP connections (10.0.x.y:1024+i -> 192.0.0.1:80) already open when it starts: `rounds`
    rounds of one 10-byte segment per flow, in order, in alternating directions (ACK / PSH-ACK, no flag change).
    Every packet after each flow's first is a packet of a known flow that is not a SYN, so loop 3's root trace is
    recorded on one whenever LuaJIT finds the loop hot."""
    out = [struct.pack("<IHHiIII", 0xa1b2c3d4, 2, 4, 0, 0, 65535, 1)]
    seq = {}
    t = [1_000_000]

    def seg(i, srv, flags, pl):
        c, s = bytes([10, 0, (i >> 8) & 255, i & 255]), bytes([192, 0, 0, 1])
        src, dst, sp, dp = (s, c, 80, 1024 + i) if srv else (c, s, 1024 + i, 80)
        k = (i, srv)
        sq = seq.get(k, 1000 + 7 * i + 100000 * srv)
        ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 40 + pl, 0, 0, 64, 6, 0, src, dst)
        tcp = struct.pack("!HHIIBBHHH", sp, dp, sq, 1, 0x50, flags, 8192, 0, 0)
        seq[k] = (sq + pl + (1 if flags & 0x03 else 0)) & 0xffffffff
        frame = b"\x00\x01\x02\x03\x04\x05\x00\x01\x02\x03\x04\x06\x08\x00" + ip + tcp + b"x" * pl
        frame += b"\x00" * max(0, 60 - len(frame))
        t[0] += 10
        out.append(struct.pack("<IIII", t[0] // 1_000_000, t[0] % 1_000_000, len(frame), len(frame)) + frame)

    for r in range(rounds):
        for i in range(flows):
            seg(i, r & 1, 0x18 if r & 1 else 0x10, 10)
    with open(path, "wb") as f:
        f.write(b"".join(out))


def test_known_flow_segment_writes_no_syn_time(tmp_path):
    cap = str(tmp_path / "known.pcap")
    _known_flows_capture(cap)
    src = open(os.path.join(package_dirs()["engine"], "fastpath", "flowtable.lua")).read().split("\n")
    start = next(i for i, s in enumerate(src) if s.startswith("local function known_runs("))
    line = next(i for i in range(start, len(src)) if src[i].strip() == "for j = k, n - 1 do") + 1   # loop 3's for
    where = f"flowtable.lua:{line}"
    seen = []
    for _ in range(3):                     # fresh VMs until one grows the usual tree (module doc)
        ir = fillir.fill_ir(cap)
        assert where in ir, f"loop 3 ({where}) did not compile: {sorted(ir)}"
        ops = collections.Counter(fillir.per_packet(ir[where]))
        seen.append(ops)
        if ops["XSTORE"] <= 9:
            break
    assert seen[-1]["XSTORE"] <= 9, f"stores per packet of a known flow in loop 3, 3 VMs: {seen}"
