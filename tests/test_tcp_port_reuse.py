"""A new connection on a reused 5-tuple (a new SYN with a new ISN, after the old one closed with FIN or RST or
never closed, from the same client or from the other end, IPv4 and IPv6) is not a retransmission of the old
one (engine/fastpath/flowtable.lua tcp_track, docs/plugins.md "Setup RTT and retransmissions").

Independent truths: tshark's per-direction retransmission flags (tests/test_flow_tcp_metrics.py tshark_truth)
and the construction of the seeded capture (tests/pktbuild.py), which injects real resends inside each
connection so the counts are not all zero."""
from __future__ import annotations

import collections
import random

from tests.pktbuild import ACK, PSH, Conv, write_pcap
from tests.test_flow_tcp_metrics import check_flow_objects, needs_tshark, ours, run, tshark_truth

RST = 0x04


def gen_reuse(seed: int, flows: int = 24):
    """Frames and {(endpoints, (sender ip, sender port)): resends injected} for flows of 2-3 connections on one 5-tuple."""
    rng = random.Random(seed)
    frames, truth = [], collections.Counter()
    for i in range(flows):
        v6 = i % 3 == 0
        ca = f"2001:db8::{i + 1:x}" if v6 else f"10.9.{i // 200}.{i % 200 + 1}"
        sa = "2001:db8::ffff" if v6 else "10.8.0.1"
        ends = [(ca, 30000 + i), (sa, 80)]
        key = frozenset(ends)
        t = 1700000000 + i * 0.5
        for n in range(rng.randrange(2, 4)):
            cl, sv = ends if n == 0 or rng.random() < 0.6 else ends[::-1]     # later ones may start at the other end
            c = Conv(cl[0], sv[0], cport=cl[1], sport=sv[1], cisn=rng.randrange(2**32),
                     sisn=rng.randrange(2**32), t0=t)
            c.handshake()
            for _ in range(rng.randrange(1, 6)):
                side = rng.random() < 0.5
                data = bytes(rng.randrange(256) for _ in range(rng.randrange(20, 600)))
                c.seg(side, PSH | ACK, data)
                if rng.random() < 0.3:                                        # resend it
                    c.advance(side, -len(data))
                    c.seg(side, PSH | ACK, data)
                    truth[(key, cl if side else sv)] += 1
                c.seg(not side, ACK)
            end = rng.choice(["none", "fin", "rst"])
            if end == "fin":
                c.close()
            elif end == "rst":
                c.seg(rng.random() < 0.5, RST | ACK)
            frames += c.frames
            t = c.t + rng.uniform(0.5, 3)
    frames.sort(key=lambda f: f[0])
    return frames, truth


@needs_tshark
def test_reused_ports_are_new_connections_not_retransmissions(tmp_path):
    frames, truth = gen_reuse(20261130)
    path = str(tmp_path / "reuse.pcap")
    write_pcap(path, frames)
    assert sum(truth.values()) > 10
    t_retrans, _rtt, streams = tshark_truth(path)
    assert sum(len(s) > 1 for s in streams.values()) == 24                    # tshark splits every 5-tuple
    rows, objs = run(tmp_path, [path])
    check_flow_objects(rows, objs)
    o_retrans, _ = ours(rows)
    assert len(rows) == sum(len(s) for s in streams.values())                 # a row per connection, as tshark
    for (ends, src) in set(t_retrans) | set(o_retrans):
        assert o_retrans[(ends, src)] == t_retrans[(ends, src)] == truth[(ends, src)], (sorted(ends), src)


@needs_tshark
def test_the_case_of_a_reuse_without_close(tmp_path):
    """tests/data/cases/04 shape, built here: one connection never closed, then a new SYN 2 s later."""
    frames = []
    for cisn, sisn, t0 in ((100000, 900000, 1700000000.0), (3000000000, 7000, 1700000002.0)):
        c = Conv(cisn=cisn, sisn=sisn, t0=t0)
        c.handshake()
        c.send(True, b"GET / HTTP/1.1\r\n\r\n")
        c.send(False, b"x" * 660)
        frames += c.frames
    path = str(tmp_path / "reuse1.pcap")
    write_pcap(path, frames)
    t_retrans, _, _ = tshark_truth(path)
    rows, _ = run(tmp_path, [path])
    assert sum(t_retrans.values()) == 0
    assert [(r["retrans_az"], r["retrans_za"]) for r in rows] == [(0, 0), (0, 0)]          # two connections
