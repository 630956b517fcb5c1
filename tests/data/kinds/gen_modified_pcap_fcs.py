"""Writes modified-pcap-fcs-le.pcap and modified-pcap-fcs-be.pcap (kind of case 01: the link-type field of a
classic-pcap-family header carries libpcap's FCS bits) in Kuznetzov's "modified" pcap format: magic a1b2cd34,
24-byte record headers (ts_sec, ts_usec, caplen, len, then ifindex u32, protocol u16, pkt_type u8, pad u8;
libpcap sf-pcap.c KUZNETZOV_TCPDUMP_MAGIC, Wireshark wiretap/libpcap.c PCAP_MODIFIED_MAGIC), one file per
byte order. Header `network` = 0x24000001 (Ethernet, FCS present, 2 x 16 bits); every frame is padded to
60 bytes and ends in its 4-byte CRC-32 FCS. Traffic: one IPv6 HTTP GET /modified.bin (2001:db8::10:45012 ->
[2001:db8:1::20]:80), a 3,000-byte body with Content-Length, FIN close (12 frames).

    python3 tests/data/kinds/gen_modified_pcap_fcs.py      # from the repository root; deterministic
"""
import os
import struct
import sys
import zlib

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "..", ".."))
from tests import pktbuild as pb  # noqa: E402

BODY = bytes((i * 31 + 7) % 256 for i in range(3000))


def frames():
    c = pb.Conv(cip="2001:db8::10", sip="2001:db8:1::20", cport=45012)
    c.handshake()
    c.send(True, pb.http_request("/modified.bin"))
    c.send(False, pb.http_response(BODY, [("Content-Length", len(BODY))]))
    c.close()
    return c.frames


def write(path, endian):
    out = [struct.pack(endian + "IHHiIII", 0xA1B2CD34, 2, 4, 0, 0, 65535, 0x24000001)]
    for t, fr in frames():
        fr = fr + b"\0" * max(0, 60 - len(fr))
        fr = fr + struct.pack("<I", zlib.crc32(fr) & 0xFFFFFFFF)      # the FCS is sent little-endian on the wire
        sec, usec = int(t), int(round((t - int(t)) * 1e6))
        out.append(struct.pack(endian + "IIIIIHBB", sec, usec, len(fr), len(fr), 1, 0x86DD, 0, 0) + fr)
    with open(path, "wb") as f:
        f.write(b"".join(out))


if __name__ == "__main__":
    write(os.path.join(HERE, "modified-pcap-fcs-le.pcap"), "<")
    write(os.path.join(HERE, "modified-pcap-fcs-be.pcap"), ">")
