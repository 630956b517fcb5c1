"""`luaprobe gen`: deterministic synthetic traffic written to a pcap or pcapng file.

    python -m luaprobe.engine.gen.traffic --out FILE [--format pcap|pcapng] [--seed N] [--flows N] [--packets N]
        [--mix tcp=40,udp=20,icmp=5,dns=15,http=20] [--http-sizes 1000,50000,2000000]
        [--http-types text/html,image/png,application/pdf] [--chunked-fraction F] [--gzip-fraction F]
        [--ipv6-fraction F] [--vlan ID] [--size-dist fixed:512|uniform:64-1500|imix] [--rate PPS]
        [--mss N] [--concurrency N] [--start EPOCH]

Python draws the per-flow parameters with numpy (kind, addresses, ports, initial sequence
numbers, packet counts) into one structured array, and builds each HTTP flow's request and
response bytes when the packet builder asks for them; every packet is built and written by
``engine/gen/builder.lua`` in LuaJIT.  ``<FILE>.bodies.json`` lists every HTTP body (flow key,
URL, content type, size, SHA256 of the decoded body, encoding).  See docs/gen.md.
"""
from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import os
import re
import struct
import sys
import time
import zlib

import numpy as np

from luaprobe.engine.daemon.usage import Parser, UsageError, check_new_file  # UsageError: a bad option value, exit 2
from luaprobe.engine.fastpath.flowrows import flow_key                       # the Trisul flow id of a conversation

__all__ = ["GenConfig", "generate", "flow_key", "main", "parse_mix", "parse_size_dist"]

KINDS = ("tcp", "udp", "icmp", "dns", "http")
KIND_ID = {k: i + 1 for i, k in enumerate(KINDS)}          # matches gen.lua M.KIND
PROTO = {"tcp": 6, "http": 6, "udp": 17, "dns": 17, "icmp": 1}

FLOW_DTYPE = np.dtype([
    ("cip", "u1", 16), ("sip", "u1", 16), ("cmac", "u1", 6), ("smac", "u1", 6),
    ("cport", "<u2"), ("sport", "<u2"), ("cisn", "<u4"), ("sisn", "<u4"), ("seed", "<u4"),
    ("count", "<i4"), ("kind", "u1"), ("v6", "u1"), ("pad", "<u2"), ("flowlabel", "<u4"),
])
assert FLOW_DTYPE.itemsize == 72

# Server ports of generic TCP / UDP flows and the ephemeral client ports avoid every port
# Wireshark 4.0 hands to a dissector (`tshark -G decodes`), so random payloads stay "data".
TCP_PORTS = (4100, 5201, 7777, 8181, 12345)
UDP_PORTS = (4100, 5202, 7777, 8181, 12345)
EPHEMERAL = (32768, 61000)
_BUSY_HIGH_PORTS = (32000, 32512, 34962, 34980, 37008, 41170, 44321, 44322, 44818, 45564, 47000, 47808,
                    48049, 48898, 49999, 54328, 56000, 56001, 56500, 56501, 57000, 57001, 57032, 57033,
                    57500, 57501, 57532, 57533, 59000, 59001, 59032, 59033, 59500, 59501, 59532, 59533, 60001)

EXTENSIONS = {
    "text/html": "html", "text/plain": "txt", "text/css": "css", "text/csv": "csv",
    "application/javascript": "js", "text/javascript": "js", "application/json": "json",
    "application/xml": "xml", "text/xml": "xml", "image/png": "png", "image/jpeg": "jpg",
    "application/pdf": "pdf", "application/octet-stream": "bin", "application/zip": "zip",
}
_WORDS = (b"lorem ipsum dolor sit amet consectetur adipiscing elit sed do eiusmod tempor incididunt ut "
          b"labore et dolore magna aliqua enim ad minim veniam quis nostrud exercitation ullamco laboris "
          b"nisi aliquip ex ea commodo consequat duis aute irure in reprehenderit voluptate velit esse "
          b"cillum eu fugiat nulla pariatur excepteur sint occaecat cupidatat non proident sunt culpa qui "
          b"officia deserunt mollit anim id est laborum packet probe flow capture network").split()
_TLDS = ("com", "net", "org", "io", "example")

from luaprobe.shm.exits import EXIT_INTERNAL, EXIT_OK, EXIT_USAGE


# ---------------------------------------------------------------------------------------- options

def parse_mix(text: str) -> dict[str, float]:
    """"tcp=40,udp=20,..." -> weights for the five kinds (missing kinds: 0)."""
    mix = dict.fromkeys(KINDS, 0.0)
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, val = part.partition("=")
        name = name.strip().lower()
        if not sep or name not in mix:
            raise UsageError(f"--mix: expected KIND=WEIGHT with KIND in {','.join(KINDS)}, got {part!r}")
        try:
            w = float(val)
        except ValueError:
            raise UsageError(f"--mix: bad weight {val!r}") from None
        if w < 0 or not np.isfinite(w):
            raise UsageError(f"--mix: weight must be >= 0, got {val!r}")
        mix[name] = w
    if sum(mix.values()) <= 0:
        raise UsageError("--mix: at least one weight must be > 0")
    return mix


def parse_size_dist(text: str) -> tuple[int, int, int]:
    """fixed:N | uniform:A-B | imix -> (kind, a, b); sizes are IP datagram lengths."""
    t = text.strip().lower()
    try:
        if t == "imix":
            return 2, 40, 1500
        if t.startswith("fixed:"):
            n = int(t[6:])
            a = b = n
            kind = 0
        elif t.startswith("uniform:"):
            a, b = (int(x) for x in t[8:].split("-"))
            kind = 1
        else:
            raise ValueError
    except ValueError:
        raise UsageError(f"--size-dist: expected fixed:N, uniform:A-B or imix, got {text!r}") from None
    if not 20 <= a <= b <= 1500:
        raise UsageError(f"--size-dist: sizes are IP datagram lengths in 20..1500 with A <= B, got {text!r}")
    return kind, a, b


def _int_list(text: str, opt: str) -> list[int]:
    try:
        vals = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UsageError(f"{opt}: expected comma-separated integers, got {text!r}") from None
    if not vals or any(v < 0 or v > 1 << 30 for v in vals):
        raise UsageError(f"{opt}: sizes must be 0..2^30 bytes")
    return vals


class GenConfig:
    """Everything that determines the output bytes."""

    def __init__(self, out, fmt="pcap", seed=1, flows=100, packets=None, mix="tcp=40,udp=20,icmp=5,dns=15,http=20",
                 http_sizes="1000,50000,2000000", http_types="text/html,image/png,application/pdf",
                 chunked_fraction=0.0, gzip_fraction=0.0, ipv6_fraction=0.0, vlan=None, size_dist="imix",
                 rate=10000.0, mss=1460, concurrency=32, start=1704067200):
        if fmt not in ("pcap", "pcapng"):
            raise UsageError(f"--format: pcap or pcapng, got {fmt!r}")
        self.out, self.format, self.seed = os.fspath(out), fmt, int(seed)
        if not 0 <= self.seed < 1 << 63:
            raise UsageError(f"--seed: {self.seed} is out of range: 0 <= N < 2^63")
        self.flows = int(flows)
        if not 1 <= self.flows <= 10_000_000:
            raise UsageError(f"--flows: {self.flows} is out of range: must be 1..10000000")
        self.packets = None if packets is None else int(packets)
        if self.packets is not None and self.packets < 1:
            raise UsageError(f"--packets: {self.packets} is out of range: must be >= 1")
        self.mix = parse_mix(mix) if isinstance(mix, str) else dict(mix)
        self.http_sizes = _int_list(http_sizes, "--http-sizes") if isinstance(http_sizes, str) else list(http_sizes)
        self.http_types = ([t.strip() for t in http_types.split(",") if t.strip()] if isinstance(http_types, str)
                           else list(http_types))
        if not self.http_types or any(not t.isascii() or "/" not in t or any(c in t for c in "\r\n ")
                                      for t in self.http_types):
            raise UsageError("--http-types: comma-separated MIME types like text/html")
        self.chunked_fraction, self.gzip_fraction = float(chunked_fraction), float(gzip_fraction)
        self.ipv6_fraction = float(ipv6_fraction)
        for name, v in (("--chunked-fraction", self.chunked_fraction), ("--gzip-fraction", self.gzip_fraction),
                        ("--ipv6-fraction", self.ipv6_fraction)):
            if not 0.0 <= v <= 1.0:
                raise UsageError(f"{name}: a fraction in 0..1, got {v}")
        if self.chunked_fraction + self.gzip_fraction > 1.0 + 1e-9:
            raise UsageError("--chunked-fraction + --gzip-fraction must be <= 1 (the encodings are exclusive)")
        self.vlan = None if vlan is None else int(vlan)
        if self.vlan is not None and not 0 <= self.vlan <= 4095:
            raise UsageError(f"--vlan: {self.vlan} is out of range: must be 0..4095")
        self.size_dist = parse_size_dist(size_dist) if isinstance(size_dist, str) else tuple(size_dist)
        self.rate = float(rate)
        if not 0 < self.rate <= 1e9:
            raise UsageError(f"--rate: {self.rate:g} is out of range: packets per second, > 0 (at most 1e9)")
        self.mss = int(mss)
        if not 536 <= self.mss <= 1460:
            raise UsageError(f"--mss: {self.mss} is out of range: must be 536..1460")
        self.concurrency = int(concurrency)
        if not 1 <= self.concurrency <= 100_000:
            raise UsageError(f"--concurrency: {self.concurrency} is out of range: must be 1..100000")
        self.start = int(start)
        if not 0 <= self.start < 1 << 31:
            raise UsageError(f"--start: {self.start} is out of range: epoch seconds 0..2^31-1")


# ---------------------------------------------------------------------------------------- flows

def _largest_remainder(n: int, weights: list[float]) -> list[int]:
    w = np.asarray(weights, dtype=float)
    exact = n * w / w.sum()
    base = np.floor(exact).astype(int)
    rest = n - base.sum()
    order = np.argsort(-(exact - base), kind="stable")
    base[order[:rest]] += 1
    return base.tolist()


def _unique_clients(rng, n: int, nclients: int) -> tuple[np.ndarray, np.ndarray]:
    """(client index, client port) pairs, all distinct, ports avoiding _BUSY_HIGH_PORTS."""
    ports_ok = np.setdiff1d(np.arange(*EPHEMERAL), np.array(_BUSY_HIGH_PORTS))
    space = nclients * len(ports_ok)
    if n > space:
        raise UsageError(f"--flows: at most {space} flows")
    keys = rng.integers(0, space, size=n)
    while True:
        _, first = np.unique(keys, return_index=True)
        dup = np.ones(n, bool)
        dup[first] = False
        if not dup.any():
            break
        keys[dup] = rng.integers(0, space, size=int(dup.sum()))
    return keys // len(ports_ok), ports_ok[keys % len(ports_ok)]


def _build_flows(cfg: GenConfig, rng) -> tuple[np.ndarray, dict]:
    n = cfg.flows
    counts = _largest_remainder(n, [cfg.mix[k] for k in KINDS])
    kinds = np.repeat(np.arange(1, 6, dtype=np.uint8), counts)
    rng.shuffle(kinds)
    fl = np.zeros(n, dtype=FLOW_DTYPE)
    fl["kind"] = kinds
    v6 = rng.random(n) < cfg.ipv6_fraction
    fl["v6"] = v6
    nclients = max(16, min(60000, n // 4))
    cidx, cport = _unique_clients(rng, n, nclients)
    # clients: 10.1.x.y / fd00:0:0:1::x; servers by kind: TEST-NETs / 2001:db8:0:<kind>::x
    c4 = np.zeros((n, 16), np.uint8)
    c4[:, 0], c4[:, 1] = 10, 1 + cidx // 62500
    c4[:, 2], c4[:, 3] = (cidx % 62500) // 250, 2 + cidx % 250
    c6 = np.zeros((n, 16), np.uint8)
    c6[:, 0], c6[:, 7] = 0xFD, 1
    low = cidx.astype(np.int64) + 2
    for i in range(4):
        c6[:, 15 - i] = (low >> (8 * i)) & 255
    fl["cip"] = np.where(v6[:, None], c6, c4)
    sidx = rng.integers(0, 40, size=n)
    s4 = np.zeros((n, 16), np.uint8)
    s6 = np.zeros((n, 16), np.uint8)
    s6[:, 0], s6[:, 1], s6[:, 2], s6[:, 3] = 0x20, 0x01, 0x0D, 0xB8
    s6[:, 7] = kinds
    for k, (a, b, c, base) in {1: (198, 51, 100, 10), 2: (198, 51, 100, 100), 3: (198, 51, 100, 200),
                               4: (192, 0, 2, 53), 5: (203, 0, 113, 10)}.items():
        m = kinds == k
        s4[m, 0], s4[m, 1], s4[m, 2] = a, b, c
        s4[m, 3] = base + (sidx[m] % 2 if k == 4 else sidx[m])
        s6[m, 15] = base + (sidx[m] % 2 if k == 4 else sidx[m])
    fl["sip"] = np.where(v6[:, None], s6, s4)
    cm = np.zeros((n, 6), np.uint8)
    cm[:, 0] = 0x02
    cm[:, 2] = (cidx >> 24) & 255
    cm[:, 3], cm[:, 4], cm[:, 5] = (cidx >> 16) & 255, (cidx >> 8) & 255, cidx & 255
    fl["cmac"] = cm
    fl["smac"] = np.array([0x02, 0x00, 0x5E, 0x00, 0x00, 0x01], np.uint8)
    sport = np.zeros(n, np.uint16)
    sport[kinds == 1] = np.array(TCP_PORTS, np.uint16)[sidx[kinds == 1] % len(TCP_PORTS)]
    sport[kinds == 2] = np.array(UDP_PORTS, np.uint16)[sidx[kinds == 2] % len(UDP_PORTS)]
    sport[kinds == 4] = 53
    sport[kinds == 5] = 80
    fl["sport"] = sport
    fl["cport"] = np.where(kinds == 3, 0, cport).astype(np.uint16)
    fl["cisn"] = rng.integers(0, 1 << 32, size=n, dtype=np.uint64).astype(np.uint32)
    fl["sisn"] = rng.integers(0, 1 << 32, size=n, dtype=np.uint64).astype(np.uint32)
    fl["seed"] = rng.integers(0, 1 << 32, size=n, dtype=np.uint64).astype(np.uint32)
    fl["flowlabel"] = rng.integers(0, 1 << 20, size=n).astype(np.uint32)

    # HTTP bodies: size, type, encoding (0 identity, 1 chunked, 2 gzip)
    http = np.flatnonzero(kinds == 5)
    bodies = {
        "flows": http,
        "size": np.array(cfg.http_sizes, np.int64)[rng.integers(0, len(cfg.http_sizes), size=len(http))],
        "type": rng.integers(0, len(cfg.http_types), size=len(http)),
    }
    u = rng.random(len(http))
    bodies["enc"] = np.where(u < cfg.gzip_fraction, 2, np.where(u < cfg.gzip_fraction + cfg.chunked_fraction, 1, 0))

    # packets per flow: count = data segments (tcp), datagrams (udp), echo pairs (icmp), queries (dns)
    count = np.zeros(n, np.int64)
    if cfg.packets is None:
        count[kinds == 1] = rng.integers(1, 41, size=int((kinds == 1).sum()))
        count[kinds == 2] = rng.integers(1, 21, size=int((kinds == 2).sum()))
        count[kinds == 3] = rng.integers(1, 9, size=int((kinds == 3).sum()))
        count[kinds == 4] = rng.integers(1, 5, size=int((kinds == 4).sum()))
    else:
        # fixed: HTTP flows (from their body sizes) and each other flow's minimum; the rest of the
        # budget is shared at random (exponential weights) in packets, then turned into units
        segs = np.ceil((bodies["size"] + 200) / cfg.mss)
        http_pk = (8 + segs + np.floor(segs / 2)).sum()
        per_unit = np.array([0, 4 / 3, 1, 2, 2, 0])         # packets per unit, by kind (tcp: + ACKs)
        minimum = np.array([0, 7, 1, 2, 2, 0])              # packets of a flow with count = 1
        other = kinds != 5
        fixed = http_pk + minimum[kinds[other]].sum()
        extra = max(0.0, cfg.packets - fixed)
        w = rng.exponential(1.0, size=int(other.sum()))
        share = extra * w / w.sum() if w.size else w
        count[other] = 1 + np.floor(share / per_unit[kinds[other]]).astype(np.int64)
    fl["count"] = np.minimum(count, 1 << 30)
    return fl, bodies


# ---------------------------------------------------------------------------------------- bodies

class _Pools:
    """Filler bytes shared by all bodies of a run (text and random), grown on demand."""

    def __init__(self, seed: int):
        self.seed = seed
        self.text = b""
        self.binary = b""

    def get_text(self, n: int) -> bytes:
        if len(self.text) < n:
            rng = np.random.default_rng([self.seed, 7, n])
            vocab = np.array(_WORDS + [b"\n"], dtype=object)
            p = np.full(len(vocab), 1.0)
            p[-1] = 4.0
            idx = rng.choice(len(vocab), size=n // 5 + 64, p=p / p.sum())
            t = b" ".join(vocab[idx].tolist())
            while len(t) < n:
                t += t
            self.text = t
        return self.text

    def get_binary(self, n: int) -> bytes:
        if len(self.binary) < n:
            self.binary = np.random.default_rng([self.seed, 8, n]).bytes(n)
        return self.binary


def _fit(head: bytes, filler, tail: bytes, size: int) -> bytes:
    room = size - len(head) - len(tail)
    if room < 0:
        return (head + tail)[:size]
    return head + bytes(filler[:room]) + tail


def _png_chunk(t: bytes, d) -> bytes:
    return struct.pack(">I", len(d)) + t + bytes(d) + struct.pack(">I", zlib.crc32(t + bytes(d)))


def make_body(index: int, ctype: str, size: int, pools: _Pools, seed: int) -> bytes:
    """Exactly ``size`` bytes of content shaped like ``ctype`` (valid PNG, PDF-shaped, HTML...)."""
    rng = np.random.default_rng([seed, 11, index])
    off = int(rng.integers(0, 65536))
    base = ctype.split(";")[0].strip().lower()
    textual = base.startswith("text/") or base in ("application/json", "application/javascript", "application/xml")
    if textual:
        filler = memoryview(pools.get_text(size + 65536))[off:off + size]
        if base == "text/html":
            head = (b'<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>luaprobe body %d</title>'
                    b"</head>\n<body><p>" % index)
            return _fit(head, filler, b"</p></body></html>\n", size)
        if base == "application/json":
            return _fit(b'{"body": %d, "text": "' % index, bytes(filler).replace(b"\n", b" "), b'"}\n', size)
        return _fit(b"luaprobe body %d\n" % index, filler, b"\n", size)
    filler = memoryview(pools.get_binary(size + 65536))[off:off + size]
    if base == "image/png":
        px = ((np.arange(16)[:, None, None] * 13 + np.arange(16)[None, :, None] * 7
               + np.arange(3)[None, None, :] * 85 + index) % 256).astype(np.uint8)
        raw = b"".join(b"\x00" + px[r].tobytes() for r in range(16))
        head = (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", struct.pack(">IIBBBBB", 16, 16, 8, 2, 0, 0, 0))
                + _png_chunk(b"IDAT", zlib.compress(raw, 9)))
        tail = _png_chunk(b"IEND", b"")
        room = size - len(head) - len(tail) - 12
        if room < 0:
            return (head + tail)[:size]
        return head + _png_chunk(b"lpFl", filler[:room]) + tail   # private ancillary padding chunk
    if base == "application/pdf":
        tail = b"\nendstream\nendobj\ntrailer\n<< /Root 1 0 R >>\n%%EOF\n"
        n = size
        for _ in range(3):
            head = b"%%PDF-1.4\n%%\xe2\xe3\xcf\xd3\n%% luaprobe body %d\n1 0 obj\n<< /Length %d >>\nstream\n" % (index, n)
            n = max(0, size - len(head) - len(tail))
        return _fit(head, filler, tail, size)
    if base == "image/jpeg":
        return _fit(b"\xff\xd8\xff\xe0\x00\x10JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00", filler, b"\xff\xd9", size)
    return _fit(b"", filler, b"", size)


def _chunked(entity: bytes, rng) -> bytes:
    parts, pos = [], 0
    mv = memoryview(entity)
    while pos < len(entity):
        n = min(int(rng.integers(512, 16385)), len(entity) - pos)
        parts += [b"%x\r\n" % n, mv[pos:pos + n], b"\r\n"]
        pos += n
    parts.append(b"0\r\n\r\n")
    return b"".join(parts)


ENCODINGS = ("identity", "chunked", "gzip")


def _dns_names(seed: int, count: int = 256) -> list[bytes]:
    rng = np.random.default_rng([seed, 5])
    subs = (b"www", b"api", b"cdn", b"mail", b"static", b"img", b"login", b"m")
    out = []
    for i in range(count):
        w1, w2 = rng.integers(0, len(_WORDS), size=2)
        out.append(b"%s.%s-%s%d.%s" % (subs[int(rng.integers(0, len(subs)))], _WORDS[w1], _WORDS[w2], i,
                                       _TLDS[int(rng.integers(0, len(_TLDS)))].encode()))
    return out


def _payload_pool(seed: int) -> bytes:
    rng = np.random.default_rng([seed, 3])
    words = np.array(_WORDS, dtype=object)[rng.integers(0, len(_WORDS), size=14000)]
    return (b" ".join(words.tolist()))[:65536 + 1600]


# ---------------------------------------------------------------------------------------- generate


def new_builder(lua, cfg: GenConfig, flows, output: dict):
    """The Lua packet builder (engine/gen/builder.lua) for these flows; `output` names where packets go:
    {b"path": file, b"format": b"pcap"|b"pcapng"} or {b"file": writer, b"format": b"pcap"}."""
    gen = lua.eval('require "luaprobe.engine.gen.builder"')
    if gen[b"FLOW_SIZE"] != FLOW_DTYPE.itemsize:
        raise RuntimeError("engine/gen/builder.lua lp_gen_flow does not match FLOW_DTYPE")
    kind, a, b = cfg.size_dist
    lcfg = lua.table_from({
        **output,
        b"flows_addr": flows.ctypes.data, b"nflows": len(flows), b"concurrency": cfg.concurrency,
        b"seed": (cfg.seed * 2654435761 + 0x9E3779B9) % (1 << 32) or 1, b"rate": cfg.rate,
        b"start_sec": cfg.start, b"vlan": -1 if cfg.vlan is None else cfg.vlan, b"mss": cfg.mss,
        b"dist_kind": kind, b"dist_a": a, b"dist_b": b,
        b"pool": _payload_pool(cfg.seed), b"names": lua.table_from(_dns_names(cfg.seed)),
    })
    return gen[b"new"](lcfg)

def generate(cfg: GenConfig) -> dict:
    """Write ``cfg.out`` and, when it is a regular file, ``cfg.out + '.bodies.json'``; returns the summary."""
    from luaprobe.shm import luajit
    t0 = time.perf_counter()
    rng = np.random.default_rng([cfg.seed, 1])
    flows, bodies = _build_flows(cfg, rng)
    body_of_flow = {int(f): j for j, f in enumerate(bodies["flows"])}
    pools = _Pools(cfg.seed)
    lua = luajit.new_runtime()
    flows = np.ascontiguousarray(flows)
    manifest = []
    t_http = 0.0
    try:
        g = new_builder(lua, cfg, flows, {b"path": os.fsencode(cfg.out), b"format": cfg.format.encode()})
        run, provide = g[b"run"], g[b"provide"]
        fi = run()
        while fi is not None:
            th = time.perf_counter()
            j = body_of_flow[int(fi)]
            req, resp, entry = _http_flow(cfg, flows[int(fi)], j, int(bodies["size"][j]),
                                          cfg.http_types[int(bodies["type"][j])], int(bodies["enc"][j]), pools)
            manifest.append(entry)
            t_http += time.perf_counter() - th
            provide(req, resp)
            fi = run()
    except Exception as e:                  # lupa.LuaError: builder.lua's M.WRITE_ERROR (open, write or close)
        m = re.search(r"gen: cannot write: ([^\n]*)", str(e))
        if m is None:
            raise
        raise WriteError(f"--out {cfg.out}: cannot write: {m.group(1)} (the capture is incomplete)") from None
    st = g[b"stats"]
    stats = dict(sorted((k.decode(), int(v)) for k, v in st.items()))   # Lua table order is not stable
    elapsed = time.perf_counter() - t0
    summary = {
        "file": cfg.out, "format": cfg.format, "seed": cfg.seed, **stats, "bodies": len(manifest),
        "elapsed_s": round(elapsed, 3), "http_bodies_s": round(t_http, 3),
        "packets_per_s": round(stats["packets"] / elapsed) if elapsed > 0 else None,
    }
    if not os.path.isfile(cfg.out) or _is_stdout(cfg.out):   # /dev/stdout, a FIFO, /dev/null: no manifest in /dev
        return summary
    try:
        with open(cfg.out + ".bodies.json", "w") as f:
            json.dump({"capture": os.path.basename(cfg.out), "format": cfg.format, "seed": cfg.seed,
                       "stats": stats, "bodies": manifest}, f, indent=1)
            f.write("\n")
    except OSError as e:
        raise WriteError(f"{cfg.out}.bodies.json: cannot write: {e.strerror} (the capture {cfg.out} is "
                         "complete)") from None
    return summary


class WriteError(Exception):
    """The capture (or its manifest) could not be written: a full filesystem, /dev/full, a file that cannot be
    opened.  Its text is one line naming the file and the OS's reason; `luaprobe gen` prints it, exit 1."""


def _http_flow(cfg, fl, j: int, size: int, ctype: str, enc: int, pools: _Pools):
    """Request bytes, response bytes and the manifest entry of HTTP body ``j``."""
    body = make_body(j, ctype, size, pools, cfg.seed)
    rng = np.random.default_rng([cfg.seed, 13, j])
    ext = EXTENSIONS.get(ctype.split(";")[0].strip().lower(), "bin")
    name = f"body-{j:06d}.{ext}"
    path = f"/files/{j // 1000:03d}/{name}"
    host = f"files{j % 97}.{_WORDS[j % len(_WORDS)].decode()}.example"
    hdr = [b"HTTP/1.1 200 OK", b"Server: luaprobe-gen/1.0", b"Content-Type: " + ctype.encode()]
    if enc == 2:
        entity = gzip.compress(body, compresslevel=6, mtime=0)
        hdr.append(b"Content-Encoding: gzip")
    else:
        entity = body
    if enc == 1:
        hdr.append(b"Transfer-Encoding: chunked")
        wire = _chunked(entity, rng)
    else:
        hdr.append(b"Content-Length: %d" % len(entity))
        wire = entity
    hdr.append(b"Connection: close")
    resp = b"\r\n".join(hdr) + b"\r\n\r\n" + wire
    req = (f"GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: luaprobe-gen/1.0\r\nAccept: */*\r\n"
           f"Accept-Encoding: gzip\r\nConnection: close\r\n\r\n").encode()
    v6 = bool(fl["v6"])
    entry = {
        "flow": flow_key(6, v6, fl["cip"].tobytes(), int(fl["cport"]), fl["sip"].tobytes(), int(fl["sport"])),
        "host": host, "url": path, "filename": name, "content_type": ctype, "size": size,
        "sha256": hashlib.sha256(body).hexdigest(), "encoding": ENCODINGS[enc],
        "entity_size": len(entity), "entity_sha256": hashlib.sha256(entity).hexdigest(),
    }
    return req, resp, entry


# ---------------------------------------------------------------------------------------- CLI

def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="luaprobe gen", description="Write deterministic synthetic traffic to a "
                                "pcap/pcapng file and an HTTP body manifest (FILE.bodies.json).")
    p.add_argument("--out", required=True, metavar="FILE", help="capture file to write")
    p.add_argument("--format", choices=["pcap", "pcapng"], default=None,
                   help="default: pcapng if FILE ends in .pcapng, else pcap (microseconds)")
    p.add_argument("--seed", type=int, default=1, help="same seed and options -> byte-identical files")
    p.add_argument("--flows", type=int, default=100, help="number of flows (default 100)")
    p.add_argument("--packets", type=int, default=None,
                   help="approximate total: the budget left after HTTP flows and per-flow minimums is shared "
                        "among the other flows")
    p.add_argument("--mix", default="tcp=40,udp=20,icmp=5,dns=15,http=20", help="flow kinds by weight")
    p.add_argument("--http-sizes", default="1000,50000,2000000", help="body sizes (bytes), drawn uniformly")
    p.add_argument("--http-types", default="text/html,image/png,application/pdf", help="content types")
    p.add_argument("--chunked-fraction", type=float, default=0.0, help="bodies sent Transfer-Encoding: chunked")
    p.add_argument("--gzip-fraction", type=float, default=0.0, help="bodies sent Content-Encoding: gzip")
    p.add_argument("--ipv6-fraction", type=float, default=0.0, help="flows over IPv6")
    p.add_argument("--vlan", type=int, default=None, metavar="ID", help="802.1Q tag on every frame")
    p.add_argument("--size-dist", default="imix", help="fixed:N | uniform:A-B | imix (IP datagram lengths of "
                   "generic TCP/UDP/ICMP packets)")
    p.add_argument("--rate", type=float, default=10000.0, metavar="PPS", help="nominal packets per second")
    p.add_argument("--mss", type=int, default=1460, help="TCP MSS for IPv4 (IPv6: MSS - 20)")
    p.add_argument("--concurrency", type=int, default=32, help="flows interleaved at a time")
    p.add_argument("--start", type=int, default=1704067200, help="epoch second of the first packet")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    return p


def main(argv=None) -> int:
    """CLI entry point (`python -m luaprobe.engine.gen.traffic`, `luaprobe gen`)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if any(a == "--interface" or a.startswith("--interface=") for a in argv):   # paced live send
        from luaprobe.engine.gen.stream import send_main
        return send_main(argv)
    args = build_parser().parse_args(argv)
    fmt = args.format or ("pcapng" if args.out.lower().endswith(".pcapng") else "pcap")
    try:
        check_new_file("--out", args.out)
        cfg = GenConfig(args.out, fmt, args.seed, args.flows, args.packets, args.mix, args.http_sizes,
                        args.http_types, args.chunked_fraction, args.gzip_fraction, args.ipv6_fraction, args.vlan,
                        args.size_dist, args.rate, args.mss, args.concurrency, args.start)
    except UsageError as e:
        print(f"luaprobe gen: {e}", file=sys.stderr)
        return EXIT_USAGE
    to_stdout = _is_stdout(args.out)       # `gen --out /dev/stdout | tshark -r -`: the summary must not follow
    try:                                   # the capture into the pipe (before: "File has 980710767-byte packet")
        s = generate(cfg)
    except WriteError as e:
        print(f"luaprobe gen: {e}", file=sys.stderr)
        return EXIT_INTERNAL
    except OSError as e:
        print(f"luaprobe gen: {e}", file=sys.stderr)
        return EXIT_INTERNAL
    out = sys.stderr if to_stdout else sys.stdout
    if args.json:
        print(json.dumps(s), file=out)
    else:
        print(f"{s['file']}: {s['packets']:,} packets  {s['bytes']:,} bytes  {s['flows']:,} flows  "
              f"{s['bodies']:,} bodies  ({s['format']}, seed {s['seed']}, {s['elapsed_s']} s, "
              f"{s['packets_per_s']:,} packets/s)", file=out)
    return EXIT_OK


def _is_stdout(path: str) -> bool:
    """``path`` is the file our standard output writes to (/dev/stdout, /proc/self/fd/1, the pipe's name)."""
    try:
        a, b = os.stat(path), os.fstat(sys.stdout.fileno())
    except (OSError, ValueError):
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


if __name__ == "__main__":
    sys.exit(main())
