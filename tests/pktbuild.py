"""Small packet and capture builder for tests (no scapy in the test environment).

Frames are built with ``struct`` from the RFCs (IPv4 RFC 791, IPv6 RFC 8200, TCP RFC 9293,
UDP RFC 768); checksums are computed so tshark accepts them.  ``Conv`` plays one TCP
connection (like the generators of ../shared/cases), ``frag4`` / ``frag6`` split an IP
datagram, ``write_pcap`` writes a classic pcap (optionally with FCS bits in the link-type
field and an FCS after every frame).
"""
from __future__ import annotations

import ipaddress
import struct
import zlib

CMAC, SMAC = bytes.fromhex("020000000001"), bytes.fromhex("020000000002")
FIN, SYN, RST, PSH, ACK = 0x01, 0x02, 0x04, 0x08, 0x10


def csum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def ip_bytes(addr: str) -> bytes:
    return ipaddress.ip_address(addr).packed


def l4_segment(src: str, dst: str, proto: int, l4: bytes) -> bytes:
    """Set the TCP/UDP checksum of ``l4`` (checksum field zero) with the pseudo-header."""
    s, d = ip_bytes(src), ip_bytes(dst)
    if len(s) == 4:
        pseudo = s + d + struct.pack("!BBH", 0, proto, len(l4))
    else:
        pseudo = s + d + struct.pack("!IxxxB", len(l4), proto)
    off = 16 if proto == 6 else 6
    c = csum(pseudo + l4)
    return l4[:off] + struct.pack("!H", c) + l4[off + 2:]


def tcp(src, dst, sport, dport, seq, ack, flags, data=b"", window=65535) -> bytes:
    hdr = struct.pack("!HHIIBBHHH", sport, dport, seq % 2**32, ack % 2**32, 5 << 4, flags, window, 0, 0)
    return l4_segment(src, dst, 6, hdr + data)


def udp(src, dst, sport, dport, data=b"") -> bytes:
    return l4_segment(src, dst, 17, struct.pack("!HHHH", sport, dport, 8 + len(data), 0) + data)


def ipv4(src, dst, proto, payload, ident=0, flags_off=0x4000, ttl=64) -> bytes:
    """An IPv4 header + payload; flags_off: the 16-bit flags/fragment-offset field."""
    h = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(payload), ident, flags_off, ttl, proto, 0,
                    ip_bytes(src), ip_bytes(dst))
    h = h[:10] + struct.pack("!H", csum(h)) + h[12:]
    return h + payload


def ipv6(src, dst, nh, payload, hlim=64) -> bytes:
    return struct.pack("!IHBB16s16s", 6 << 28, len(payload), nh, hlim, ip_bytes(src), ip_bytes(dst)) + payload


def ether(ip: bytes, src=CMAC, dst=SMAC) -> bytes:
    et = 0x0800 if ip[0] >> 4 == 4 else 0x86DD
    return dst + src + struct.pack("!H", et) + ip


def frag4(datagram: bytes, size: int) -> list[bytes]:
    """Split an IPv4 datagram (20-byte header) into fragments of <= size payload bytes (multiple of 8)."""
    hdr, payload = datagram[:20], datagram[20:]
    ident = struct.unpack("!H", hdr[4:6])[0]
    src, dst, proto = hdr[12:16], hdr[16:20], hdr[9]
    out = []
    for off in range(0, len(payload), size):
        piece = payload[off:off + size]
        mf = 0x2000 if off + size < len(payload) else 0
        out.append(ipv4(str(ipaddress.ip_address(src)), str(ipaddress.ip_address(dst)), proto, piece,
                        ident=ident, flags_off=mf | (off // 8)))
    return out


def frag4_piece(datagram: bytes, off: int, piece: bytes, mf: bool) -> bytes:
    """One IPv4 fragment of ``datagram`` (20-byte header) holding ``piece`` at byte offset ``off``."""
    hdr = datagram[:20]
    ident = struct.unpack("!H", hdr[4:6])[0]
    return ipv4(str(ipaddress.ip_address(hdr[12:16])), str(ipaddress.ip_address(hdr[16:20])), hdr[9], piece,
                ident=ident, flags_off=(0x2000 if mf else 0) | (off // 8))


def frag6_piece(src, dst, nh, ident, off, piece, mf) -> bytes:
    """One IPv6 fragment: fixed header + Fragment header (RFC 8200 §4.5) + piece at byte offset off."""
    fh = struct.pack("!BBHI", nh, 0, off | (1 if mf else 0), ident)
    return ipv6(src, dst, 44, fh + piece)


def frag6(src, dst, nh, payload: bytes, ident: int, size: int) -> list[bytes]:
    out = []
    for off in range(0, len(payload), size):
        out.append(frag6_piece(src, dst, nh, ident, off, payload[off:off + size], off + size < len(payload)))
    return out


class Conv:
    """One TCP connection: frames (Ethernet) with timestamps 1 ms apart."""

    def __init__(self, cip="192.0.2.10", sip="198.51.100.20", cport=40000, sport=80, cisn=1000, sisn=5000,
                 t0=1700000000.0):
        self.cip, self.sip, self.cport, self.sport = cip, sip, cport, sport
        self.cseq, self.sseq, self.t = cisn, sisn, t0
        self.frames: list[tuple[float, bytes]] = []
        self.v6 = ":" in cip

    def ip(self, from_client: bool, l4: bytes, proto=6) -> bytes:
        src, dst = (self.cip, self.sip) if from_client else (self.sip, self.cip)
        if self.v6:
            return ipv6(src, dst, proto, l4)
        return ipv4(src, dst, proto, l4)

    def segment(self, from_client: bool, flags: int, data=b"") -> bytes:
        """The IP datagram of one segment (sequence numbers not advanced)."""
        if from_client:
            l4 = tcp(self.cip, self.sip, self.cport, self.sport, self.cseq, self.sseq if flags & ACK else 0,
                     flags, data)
        else:
            l4 = tcp(self.sip, self.cip, self.sport, self.cport, self.sseq, self.cseq if flags & ACK else 0,
                     flags, data)
        return self.ip(from_client, l4)

    def add(self, ip: bytes, from_client=True) -> None:
        self.t += 0.001
        self.frames.append((self.t, ether(ip, *(CMAC, SMAC) if from_client else (SMAC, CMAC))))

    def seg(self, from_client: bool, flags: int, data=b"") -> None:
        self.add(self.segment(from_client, flags, data), from_client)
        self.advance(from_client, len(data))

    def advance(self, from_client: bool, n: int) -> None:
        if from_client:
            self.cseq += n
        else:
            self.sseq += n

    def handshake(self) -> None:
        self.seg(True, SYN); self.cseq += 1
        self.seg(False, SYN | ACK); self.sseq += 1
        self.seg(True, ACK)

    def send(self, from_client: bool, data: bytes, mss=1400, ack=True) -> None:
        for i in range(0, len(data), mss):
            self.seg(from_client, PSH | ACK, data[i:i + mss])
        if ack:
            self.seg(not from_client, ACK)

    def close(self) -> None:
        self.seg(True, FIN | ACK); self.cseq += 1
        self.seg(False, FIN | ACK); self.sseq += 1
        self.seg(True, ACK)


def http_request(path: str, host="files.example", headers=(), method="GET", body=b"") -> bytes:
    head = f"{method} {path} HTTP/1.1\r\nHost: {host}\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers) + "\r\n"
    return head.encode() + body


def http_response(body: bytes, headers=(), status="200 OK") -> bytes:
    head = f"HTTP/1.1 {status}\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers) + "\r\n"
    return head.encode() + body


def write_pcap(path, frames, linktype=1, fcs=False, network=None, cut=0) -> None:
    """Classic pcap (usec).  fcs: append a 4-byte Ethernet FCS to each frame and set libpcap's FCS
    bits in the header (LT_FCS_DATALINK_EXT: 0x04000000 | (4 bytes / 2) << 28); ``network`` overrides
    the header's whole link-type field; cut: bytes missing from the end of each captured frame (snaplen)."""
    if network is None:
        network = linktype | ((0x04000000 | (2 << 28)) if fcs else 0)
    out = [struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 262144, network)]
    for t, fr in frames:
        if fcs:
            fr = fr + b"\0" * max(0, 60 - len(fr))
            fr = fr + struct.pack("<I", zlib.crc32(fr) & 0xFFFFFFFF)
        sec = int(t)
        usec = int(round((t - sec) * 1e6))
        out.append(struct.pack("<IIII", sec, usec, len(fr) - cut, len(fr)) + fr[:len(fr) - cut])
    with open(path, "wb") as f:
        f.write(b"".join(out))


# A batch of ``nflows`` decoded frames of ``flen`` bytes (one flow each, packet time 1000) over the bytes
# ``frames``; a test's chunk appended to it walks it with ``host`` (a PluginVM's Host).
BATCH_OF_FRAMES = r"""
local frames, flen, nflows, host = ...
local ffi = require("ffi")
local packet = require("luaprobe.engine.plugins.packet")
local decode = require("luaprobe.engine.fastpath.decode")
local base = ffi.cast("const uint8_t *", frames)
local batch = packet.new_batch(nflows)
for k = 0, nflows - 1 do
  local p = batch[k]
  p.data, p.caplen, p.wirelen, p.linktype, p.ts_sec = base + k * flen, flen, flen, 1, 1000
  p.flow, p.dir, p.flow_uid = k, 0, k + 1
  decode.decode(p.d, p.data, flen, 1)
end
"""


def one_frame_per_flow(n: int) -> list[bytes]:
    """``n`` Ethernet / IPv4 / TCP ACK frames of equal length, one per flow: 10.0.(k >> 8).(k & 255):(1024 + k) ->
    192.0.2.1:80 for k in range(n) (n <= 65536); the frames :data:`BATCH_OF_FRAMES` decodes into a batch."""
    return [ether(ipv4(f"10.0.{k >> 8}.{k & 255}", "192.0.2.1", 6,
                       tcp(f"10.0.{k >> 8}.{k & 255}", "192.0.2.1", 1024 + k, 80, 1, 0, ACK)))
            for k in range(n)]
