"""The benchmark corpus: seeded synthetic captures of different traffic shapes (issue 10).

    python tools/bench/corpus.py [--quick] [--out tools/bench/data/corpus] [SHAPE ...]

One pcap per shape, made once and kept (tools/bench/data/ is out of git); the same seed and
size always give the same bytes.  Shapes (``SHAPES`` below has the parameters):

=============  =============================================================================
small-few      500 flows, 60-70 byte frames, uniform popularity (the old benchmark's shape)
mixed-zipf     3,000 flows with Zipf popularity (s = 1), 70 % TCP / 30 % UDP, frames 60-1,500
flows-100k     100,000 concurrent flows (every flow starts in the first pass, then random)
flows-1m       1,000,000 concurrent flows (same)
ipv6           as mixed-zipf, 80 % of the flows over IPv6
vlan-mpls      as mixed-zipf, a third untagged, a third 802.1Q, a third with one MPLS label
http           ``luaprobe gen`` HTTP/1.1 conversations (handshakes, requests, bodies, FIN)
dns            ``luaprobe gen`` 85 % DNS queries/answers, 15 % other UDP
=============  =============================================================================

A shape's ``layer`` (default ``"tcp"``) is the transport the benchmark's light plug-in hooks are put on
(tools/bench/shapes.py): ``dns`` carries no TCP, so its hooks are on UDP.

The flow-shape captures are built here with numpy (Ethernet, optional VLAN/MPLS, IPv4 with a
valid header checksum or IPv6, TCP with ACK/PSH flags and sequence numbers that advance with each
direction's bytes (0.5 % retransmissions) or UDP, zero payload up to the frame
size; one packet every 10 µs of packet time).  The http and dns shapes come from the
project's own generator (engine/gen/traffic.py, docs/gen.md), because their payloads must parse.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DATA = os.path.join(REPO, "tools", "bench", "data", "corpus")
START = 1_704_067_200            #: packet time of the first packet (2024-01-01)
GAP_US = 10                      #: packet-time spacing
BUILD_REV = 2                    #: revision of build()'s output: 2 = TCP numbers that advance (_tcp_numbers)
RETRANS = 0.005                  #: share of TCP segments with data that are retransmissions (_tcp_numbers)

#: shape -> (flows, packets (full), packets (quick), frame sizes, ipv6 share, encapsulation, tcp share)
SHAPES = {
    "small-few":  dict(flows=500, packets=2_000_000, quick=500_000, sizes="small", v6=0.0, encap="none", tcp=1.0,
                       popularity="uniform"),
    "mixed-zipf": dict(flows=3_000, packets=1_000_000, quick=500_000, sizes="mixed", v6=0.0, encap="none", tcp=0.7,
                       popularity="zipf"),
    "flows-100k": dict(flows=100_000, packets=1_000_000, quick=300_000, sizes="mixed", v6=0.0, encap="none",
                       tcp=0.7, popularity="concurrent"),
    "flows-1m":   dict(flows=1_000_000, packets=2_000_000, quick=1_000_000, sizes="small", v6=0.0, encap="none",
                       tcp=0.7, popularity="concurrent"),
    "ipv6":       dict(flows=3_000, packets=1_000_000, quick=500_000, sizes="mixed", v6=0.8, encap="none", tcp=0.7,
                       popularity="zipf"),
    "vlan-mpls":  dict(flows=3_000, packets=1_000_000, quick=500_000, sizes="mixed", v6=0.0, encap="mixed", tcp=0.7,
                       popularity="zipf"),
    "http":       dict(gen=["--mix", "http=100", "--http-sizes", "2000,20000,200000", "--flows", "3000",
                            "--concurrency", "200"], packets=1_000_000, quick=500_000),
    "dns":        dict(gen=["--mix", "dns=85,udp=15", "--flows", "60000", "--concurrency", "2000"],
                       packets=1_000_000, quick=500_000, layer="udp"),
}
ORDER = list(SHAPES)


def path_for(shape: str, quick: bool, out: str = DATA) -> str:
    """Where `shape`'s capture is kept: the packet count is in the name, and for the shapes built here
    the builder's revision (BUILD_REV), so a changed size or builder never reuses an old file."""
    spec = SHAPES[shape]
    rev = "" if "gen" in spec else f"-r{BUILD_REV}"
    return os.path.join(out, f"{shape}-{spec['quick'] if quick else spec['packets']}{rev}.pcap")


def make(shape: str, quick: bool = False, out: str = DATA, seed: int = 10) -> str:
    """The capture of `shape` (made on first use); returns its path.  Safe when several processes make the same
    shape at once (the test processes of pytest-xdist): each writes its own temporary file and renames it into
    place, so a reader sees no file or a whole one (the captures are seeded: every writer's is the same).  Before,
    they shared one `.tmp` name: one truncated the file the other had just renamed (CI: "empty file")."""
    path = path_for(shape, quick, out)
    if os.path.exists(path):
        return path
    os.makedirs(out, exist_ok=True)
    spec = SHAPES[shape]
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        write(tmp, spec, spec["quick"] if quick else spec["packets"], [seed, ORDER.index(shape)])
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def write(path: str, spec: dict, n: int, seed) -> None:
    """Write a capture of about `n` packets of shape `spec` (a SHAPES value, possibly changed) to
    `path`; `seed` (an int or a list of ints) makes it reproducible.  Generator shapes (http, dns)
    give the generator's packet count for `n` requested (whole conversations)."""
    if "gen" in spec:
        gseed = seed if isinstance(seed, int) else seed[0]
        subprocess.run([sys.executable, "-m", "luaprobe.engine.gen.traffic", "--out", path, "--seed", str(gseed),
                        "--packets", str(n), "--rate", str(1_000_000 // GAP_US), *spec["gen"]], cwd=REPO,
                       check=True, stdout=subprocess.DEVNULL)
        side = path + ".bodies.json"                   # the generator's body list: not needed here
        if os.path.exists(side):
            os.remove(side)
    else:
        write_pcap(path, build(spec, n, np.random.default_rng(seed)))


# ------------------------------------------------------------------------------ flow-shape builder

def _frame_sizes(kind: str, n: int, rng) -> np.ndarray:
    if kind == "small":
        return rng.integers(60, 71, n)
    # mixed: the classic IMIX modes plus a uniform share (60..1500)
    pick = rng.random(n)
    sizes = rng.integers(60, 1501, n)
    sizes[pick < 0.45] = 64
    sizes[(pick >= 0.45) & (pick < 0.70)] = 594
    sizes[(pick >= 0.70) & (pick < 0.82)] = 1514
    return sizes


def _flow_of_packets(spec: dict, n: int, rng) -> np.ndarray:
    nf = spec["flows"]
    if spec["popularity"] == "uniform":
        return rng.integers(0, nf, n)
    if spec["popularity"] == "zipf":
        w = 1.0 / np.arange(1, nf + 1)
        cdf = np.cumsum(w / w.sum())
        ranks = np.minimum(np.searchsorted(cdf, rng.random(n)), nf - 1)
        return rng.permutation(nf)[ranks]           # popularity unrelated to flow number
    # concurrent: every flow once (random order), then uniformly at random
    first = rng.permutation(nf)[:n]
    return np.concatenate([first, rng.integers(0, nf, max(0, n - nf))])


def build(spec: dict, n: int, rng) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """n packets of a flow shape: (headers (n x H uint8), header lengths, frame lengths); write_pcap
    pads each frame with zero payload to its length."""
    nf = spec["flows"]
    v6 = rng.random(nf) < spec["v6"]
    tcp = rng.random(nf) < spec["tcp"]
    encap = np.zeros(nf, np.int8) if spec["encap"] == "none" else rng.integers(0, 3, nf).astype(np.int8)
    cip = rng.integers(0, 256, (nf, 16), dtype=np.uint8)
    sip = rng.integers(0, 256, (nf, 16), dtype=np.uint8)
    cip[:, 0], sip[:, 0] = 10, 172                   # v4: 10.x.x.x clients, 172.x.x.x servers
    cport = rng.integers(32768, 61000, nf)
    sport = rng.choice(np.array([80, 443, 53, 8080, 5201, 12345]), nf)
    vlan = rng.integers(1, 4095, nf)
    label = rng.integers(16, 1 << 20, nf)

    f = _flow_of_packets(spec, n, rng)
    rev = rng.random(n) < 0.45                       # server -> client
    l2 = np.where(encap[f] == 0, 14, 18)
    l3 = np.where(v6[f], 40, 20)
    l4 = np.where(tcp[f], 20, 8)
    hlen = l2 + l3 + l4
    size = np.maximum(_frame_sizes(spec["sizes"], n, rng), np.maximum(hlen, 60))
    H = int(hlen.max())
    hdr = np.zeros((n, H), np.uint8)
    rows = np.arange(n)

    def put(off, cols):                              # cols: (n, k) uint8 at per-row offset off
        k = cols.shape[1]
        hdr[rows[:, None], off[:, None] + np.arange(k)] = cols

    def be16(x):
        x = np.asarray(x, np.int64)
        return np.stack([(x >> 8) & 0xFF, x & 0xFF], axis=1).astype(np.uint8)

    def be32(x):
        x = np.asarray(x, np.int64)
        return np.stack([(x >> 24) & 0xFF, (x >> 16) & 0xFF, (x >> 8) & 0xFF, x & 0xFF], axis=1).astype(np.uint8)

    # Ethernet
    hdr[:, 0:6] = [0x02, 0, 0, 0, 0, 0x01]
    hdr[:, 6:12] = [0x02, 0, 0, 0, 0, 0x02]
    e = encap[f]
    ip_type = np.where(v6[f], 0x86DD, 0x0800)
    hdr[:, 12:14] = be16(np.where(e == 1, 0x8100, np.where(e == 2, 0x8847, ip_type)))
    tagged = e == 1
    hdr[tagged, 14:16] = be16(vlan[f][tagged])
    hdr[tagged, 16:18] = be16(ip_type[tagged])
    mpls = e == 2
    hdr[mpls, 14:18] = be32((label[f][mpls] << 12) | (1 << 8) | 64)   # bottom of stack, TTL 64
    # IP
    src = np.where(rev[:, None], sip[f], cip[f])
    dst = np.where(rev[:, None], cip[f], sip[f])
    proto = np.where(tcp[f], 6, 17)
    iplen = size - l2
    is6 = v6[f]
    r4, r6 = rows[~is6], rows[is6]
    if len(r4):
        o = l2[r4]
        h4 = np.zeros((len(r4), 20), np.uint8)
        h4[:, 0] = 0x45
        h4[:, 2:4] = be16(iplen[r4])
        h4[:, 6] = 0x40
        h4[:, 8] = 64
        h4[:, 9] = proto[r4]
        h4[:, 12:16] = src[r4, :4]
        h4[:, 16:20] = dst[r4, :4]
        words = h4.reshape(-1, 10, 2).astype(np.uint32)
        s = (words[:, :, 0] << 8 | words[:, :, 1]).sum(axis=1)
        s = (s & 0xFFFF) + (s >> 16)
        s = (s & 0xFFFF) + (s >> 16)
        h4[:, 10:12] = be16(~s & 0xFFFF)
        hdr[r4[:, None], o[:, None] + np.arange(20)] = h4
    if len(r6):
        o = l2[r6]
        h6 = np.zeros((len(r6), 40), np.uint8)
        h6[:, 0] = 0x60
        h6[:, 4:6] = be16(iplen[r6] - 40)
        h6[:, 6] = proto[r6]
        h6[:, 7] = 64
        h6[:, 8:24] = src[r6]
        h6[:, 24:40] = dst[r6]
        hdr[r6[:, None], o[:, None] + np.arange(40)] = h6
    # L4
    o = l2 + l3
    sp = np.where(rev, sport[f], cport[f])
    dp = np.where(rev, cport[f], sport[f])
    put(o, np.concatenate([be16(sp), be16(dp)], axis=1))
    t = rows[tcp[f]]
    if len(t):
        ot = o[t]
        seq, ack = _tcp_numbers(f[t], rev[t], iplen[t] - l3[t] - 20, nf, rng)
        th = np.zeros((len(t), 16), np.uint8)
        th[:, 0:4] = be32(seq)
        th[:, 4:8] = be32(ack)
        th[:, 8] = 0x50
        th[:, 9] = np.where(size[t] > hlen[t], 0x18, 0x10)      # PSH|ACK with payload, else ACK
        th[:, 10:12] = 0xFF
        hdr[t[:, None], ot[:, None] + 4 + np.arange(16)] = th
    u = rows[~tcp[f]]
    if len(u):
        hdr[u[:, None], o[u][:, None] + 4 + np.arange(2)] = be16(size[u] - (l2[u] + l3[u]))
    return hdr, hlen, size


def _tcp_numbers(flow: np.ndarray, rev: np.ndarray, payload: np.ndarray, nf: int, rng,
                 retrans: float = RETRANS) -> tuple[np.ndarray, np.ndarray]:
    """Sequence and acknowledgment numbers of a capture's TCP segments in capture order, as a connection's would be
    (RFC 793 3.3): each direction of a flow starts at a random initial sequence number and every segment's number is
    the direction's bytes sent before it (mod 2^32); the acknowledgment is the other direction's next number (every
    byte it sent so far is acknowledged).  A share `retrans` of the segments that carry bytes are retransmissions: they
    send again the last bytes before them (their number is that many bytes back, at most back to the initial number)
    and do not advance the direction's count (one drawn as its direction's first data segment so starts at the initial
    number, and the segment after it repeats that number: tshark calls the later one the retransmission).  `flow`, `rev` (True: server to client) and `payload` (bytes of TCP data,
    the IP length minus the headers) are per segment; returns (seq, ack), int64 arrays in 0 .. 2^32 - 1.  Before
    (2026-12-02), both were drawn at random per segment: every second segment of a flow was behind its direction's
    highest number, a retransmission to the flow table, which real traffic is not."""
    n = len(flow)
    isn = rng.integers(0, 1 << 32, (nf, 2), dtype=np.int64)
    again = (rng.random(n) < retrans) & (payload > 0)
    order = np.argsort(flow, kind="stable")         # each flow's segments together, in capture order
    fo, ro = flow[order], rev[order].astype(np.int64)
    starts = np.flatnonzero(np.r_[True, fo[1:] != fo[:-1]])
    first = np.repeat(starts, np.diff(np.r_[starts, n]))   # each row's flow's first row in `order`
    sent = np.where(again[order], 0, payload[order]).astype(np.int64)
    before = np.zeros((n, 2), np.int64)             # bytes each direction sent before the row (within its flow)
    for d in (0, 1):
        own = np.where(ro == d, sent, 0)
        excl = np.cumsum(own) - own                 # over the whole capture: less the flow's start
        before[:, d] = excl - excl[first]
    mine, other = before[np.arange(n), ro], before[np.arange(n), 1 - ro]
    back = np.where(again[order], np.minimum(payload[order], mine), 0)   # a resend: that many bytes back
    seq_o = (isn[fo, ro] + mine - back) % (1 << 32)
    ack_o = (isn[fo, 1 - ro] + other) % (1 << 32)
    seq, ack = np.empty(n, np.int64), np.empty(n, np.int64)
    seq[order], ack[order] = seq_o, ack_o
    return seq, ack


def write_pcap(path: str, built) -> None:
    """A little-endian microsecond pcap (Ethernet) of the built frames; payload bytes are zero."""
    hdr, hlen, size = built
    n = len(size)
    rec = 16 + size
    starts = np.concatenate([[0], np.cumsum(rec)[:-1]])
    buf = np.zeros(int(rec.sum()), np.uint8)
    us = np.arange(n, dtype=np.int64) * GAP_US
    ph = np.zeros((n, 4), "<u4")
    ph[:, 0] = START + us // 1_000_000
    ph[:, 1] = us % 1_000_000
    ph[:, 2] = size
    ph[:, 3] = size
    idx = starts[:, None] + np.arange(16)
    buf[idx] = ph.view(np.uint8).reshape(n, 16)
    for c in range(hdr.shape[1]):                     # header column c of every frame long enough
        m = hlen > c
        buf[starts[m] + 16 + c] = hdr[m, c]
    with open(path, "wb") as out:
        out.write(np.array([0xA1B2C3D4], "<u4").tobytes() + np.array([2, 4], "<u2").tobytes()
                  + np.array([0, 0, 65535, 1], "<u4").tobytes())
        out.write(buf.tobytes())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("shapes", nargs="*", default=ORDER, help=f"shapes to make (default all: {' '.join(ORDER)})")
    ap.add_argument("--quick", action="store_true", help="the small variants (for --quick benchmark runs)")
    ap.add_argument("--out", default=DATA)
    a = ap.parse_args(argv)
    for s in a.shapes:
        if s not in SHAPES:
            ap.error(f"unknown shape {s!r} (one of {', '.join(ORDER)})")
        print(make(s, a.quick, a.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
