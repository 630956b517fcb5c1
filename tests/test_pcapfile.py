"""engine/capture/pcapfile.lua (record walker) and engine/capture/pcapfile.py (mmap + errors).

Reference numbers for the captures in tests/data (and the two of the optional larger corpus,
$LUAPROBE_CORPUS, that are not shipped) were pinned with Wireshark 4.0.17
(`capinfos -M -c`, `tshark -T fields -e frame.cap_len -e frame.len -e frame.time_epoch
-e frame.interface_id`) and agree record by record with the walker, except where noted:

* bad-fuzz-record-header.pcap: the magic is the standard a1b2c3d4, so the record
  header is 16 bytes; libpcap/tcpdump 4.99 reads 1 record and then fails on the
  second header ("invalid packet capture length 1409179648").  Wireshark guesses
  the 24-byte Red Hat "SS990417" header variant instead (a heuristic for 1999
  files) and reads 2.  We follow libpcap: 1 packet, error at byte 228.
* bad-invalid-nanosec-ts.pcap: nsec fields 1000000000 and 2147483648.  Wireshark
  prints garbage (negative times); the walker carries whole seconds, so the
  timestamps are 1418145371.000000000 and 1418145372.147483648.
* pcapng captured bytes exclude custom blocks (tshark shows those as frames; capinfos
  does not count them as packets).
* SPB has no timestamp: the walker repeats the previous packet's timestamp.
"""
import ctypes
import json
import math
import mmap
import os
import shutil
import struct
import subprocess
import sys
from fractions import Fraction

import pytest
from hypothesis import given, settings, HealthCheck
from hypothesis import strategies as st

from luaprobe.engine.capture.pcapfile import InputError, count_packets, open_capture
from luaprobe.shm.luajit import new_runtime

from tests.helpers import CORPUS, PCAPS, REPO

NS = 1_000_000_000


def ns(text):
    s, f = text.split(".")
    return int(s) * NS + int(f.ljust(9, "0"))


# file: (packets, captured bytes, first ts, last ts, link types, if indexes, error offset)
REFERENCE = {
    "bad-empty-header-only.pcap": (0, 0, None, None, (), (), None),
    "bad-fuzz-record-header.pcap": (1, 188, "1508525002.992213", "1508525002.992213", (1,), (0,), 228),
    "bad-huge-caplen-record.pcap": (6, 4915, "1429518024.029122", "1429518024.029385", (1,), (0,), 5035),
    "bad-invalid-nanosec-ts.pcap": (3, 220, "1418145369.999999999", "1418145372.147483648", (113,), (0,), None),
    "bad-snaplen8-trunc.pcap": (1, 8, "1404148886.981015", "1404148886.981015", (1,), (0,), None),
    "bigendian-pptp-gre.pcap": (23, 2072, "954147395.148077", "954147396.347775", (1,), (0,), None),
    "dns-udp-a-aaaa-mx.pcap": (6, 814, "1494364058.364077", "1494364064.210977", (1,), (0,), None),
    "ftp-pdf-exe.pcap": (408, 402540, "1385174704.878384", "1385174717.905871", (1,), (0,), None),
    "http-chunked-dvwa.pcapng": (64, 20825, "1730145002.900383409", "1730145073.257679667", (1,), (0,), None),
    "http-chunked-eicar.pcap": (8, 805, "1451761681.272861", "1451761681.273077", (1,), (0,), None),
    "http-chunked-gzip-mix.pcap": (207, 18287, "1234567890.123456", "1234567891.331872", (1,), (0,), None),
    "http-get-text.pcap": (14, 6087, "1362692526.869344", "1362692527.080972", (1,), (0,), None),
    "http-gzip-eicar.pcap": (8, 756, "1451761681.295672", "1451761681.296106", (1,), (0,), None),
    "http-gzip-json.pcap": (14, 1365, "1363624631.382875", "1363624631.464202", (1,), (0,), None),
    "http-ipv6-keepalive-gap.pcap": (4102, 1349545, "1692957822.217493", "1692957822.840777", (1,), (0,), None),
    "http-jpeg-download.pcap": (74, 64895, "1320279616.742259", "1320279617.425075", (1,), (0,), None),
    "http-keepalive-splunk-ui.pcap": (94, 68794, "1331909229.82", "1331909252.68", (1,), (0,), None),
    "http-pdf-download.pcap": (175, 189334, "1515441286.38587", "1515441287.770172", (1,), (0,), None),
    "http-pipelined-mozilla.pcap": (49, 45144, "1258577884.82272", "1258577912.403915", (1,), (0,), None),
    "http-post-hello.pcap": (14, 1623, "1363709111.062053", "1363709111.152611", (1,), (0,), None),
    "http-post-multipart-fields.pcap": (10, 1840, "1369159408.433593", "1369159408.531643", (1,), (0,), None),
    "http-post-multipart-upload.pcap": (45, 93243, "1737800052.405975", "1737800052.720054", (1,), (0,), None),
    "http-qinq-vlan.pcap": (14, 6199, "1362692526.869344", "1362692527.080972", (1,), (0,), None),
    "http-range-pdf-206.pcap": (672, 620334, "1294814876.674038", "1294814917.07163", (1,), (0,), None),
    "http-website-keepalive.pcap": (751, 494493, "1389719041.819644", "1389719059.311698", (1,), (0,), None),
    "http-zip-download.pcap": (12, 15722, "1777310457.122449", "1777310457.12335", (1,), (0,), None),
    "ipv6-icmp6.pcap": (49, 4548, "921159907.494265", "921159966.755968", (1,), (0,), None),
    "mix-eth-tls-http-dns.pcap": (132, 164607, "1425669142.414189", "1582421895.227934", (1,), (0,), None),
    "mix-wikipedia-dns-http.pcap": (136, 25260, "1300475167.096535", "1300475173.475401", (1,), (0,), None),
    "pcapng-be-allblocks.pcapng": (5, 798, "1340954905.298858", "1340954905.301858", (0, 1), (0, 1, 2), None),
    "pcapng-mixed-endian-shb.pcapng": (8, 1040, "1340954905.298858", "1340954905.301858", (0, 1), (0, 1), None),
    "pcapng-multi-if-dns.pcapng": (6, 798, "1767663089.500330493", "1767663437.140942", (1,), (0, 1), None),
    "sll-mptcp.pcap": (20, 22244, "1578930666.676845", "1578930666.677429", (113,), (0,), None),
    "sll-nanosec-tcp-handshake.pcap": (3, 220, "1418145369.924505488", "1418145370.052115157", (113,), (0,), None),
    "sll2-linux.pcap": (6, 552, "1660534249.872259", "1660535793.578961", (276,), (0,), None),
    "tcp-echo-many-flows.pcap": (82582, 5512362, "1627225020.68647", "1627225027.180797", (1,), (0,), None),
    "tls12-handshake.pcap": (22, 8225, "1357328848.512314", "1357328851.807191", (1,), (0,), None),
    "tls13-chrome-kyber.pcap": (15, 11685, "1716310155.39525", "1716310155.468286", (1,), (0,), None),
    "trisul-16minutes.pcap": (7000, 1819784, "921070803.035902", "921071924.579522", (1,), (0,), None),
    "trisul-tutorial.pcap": (1391, 828935, "1516788075.927617", "1516788110.13765", (1,), (0,), None),
    "vlan-icmp-arp.pcap": (15, 1446, "1213957237.965649", "1213957272.997261", (1,), (0,), None),
    "vlan-mpls-mixed.pcap": (47, 16403, "952109346.874907", "1278600802.074822", (1,), (0,), None),
}

FORMAT = {"pcap": ("pcap",), "pcapng": ("pcapng",)}

_lua = None


def lua():
    global _lua
    if _lua is None:
        _lua = new_runtime()
        _lua.execute(r'''
          local pcapfile = require "luaprobe.engine.capture.pcapfile"
          -- one call per file: summary + bounds check of every returned pointer
          function walk_summary(addr, size)
            local ffi = require "ffi"
            local r = pcapfile.open(addr, size)
            local base = ffi.cast("const uint8_t *", addr)
            local n, bytes, fs, fns, ls, lns = 0, 0, nil, nil, nil, nil
            local lts, ifs, oob = {}, {}, 0
            while true do
              local p, cl, wl, s, ns, lt, ifx = r:next()
              if not p then break end
              local o = p - base
              if o < 0 or o + cl > size or ns < 0 or ns >= 1e9 then oob = oob + 1 end
              n, bytes = n + 1, bytes + cl
              if not fs then fs, fns = s, ns end
              ls, lns = s, ns
              lts[lt] = true; ifs[ifx] = true
            end
            local function keys(t) local k = {} for x in pairs(t) do k[#k+1] = x end
              table.sort(k) return table.concat(k, ",") end
            assert(n == r.packets)
            return n, bytes, fs, fns, ls, lns, keys(lts), keys(ifs), r.error, r.error_offset,
                   r.format, oob, r.offset
          end
          function walk_records(addr, size)
            local r = pcapfile.open(addr, size)
            local out = {}
            while true do
              local p, cl, wl, s, ns, lt, ifx = r:next()
              if not p then break end
              out[#out + 1] = string.format("%d %d %d.%09d %d %d", cl, wl, s, ns, lt, ifx)
            end
            return table.concat(out, ";"), r.error, r.error_offset
          end
        ''')
    return _lua


def summary(path):
    with open_capture(path) as cap:
        res = lua().globals().walk_summary(cap.address, cap.size)
    n, nbytes, fs, fns, ls, lns, lts, ifs, err, eoff, fmt, oob, offset = res
    return dict(n=n, bytes=nbytes,
                first=None if fs is None else int(fs) * NS + int(fns),
                last=None if ls is None else int(ls) * NS + int(lns),
                linktypes=tuple(int(x) for x in lts.split(b",") if x),
                ifindexes=tuple(int(x) for x in ifs.split(b",") if x),
                error=err, error_offset=eoff, format=fmt.decode(), oob=oob, offset=offset)


def records_of(data: bytes):
    """(records as text list, error, error offset) for an in-memory capture."""
    buf = ctypes.create_string_buffer(data, len(data))
    txt, err, eoff = lua().globals().walk_records(ctypes.addressof(buf), len(data))
    return [r for r in txt.decode().split(";") if r], err, eoff


# Pinned below but not shipped in tests/data (tests/data/MANIFEST.md): read from the optional corpus.
OPTIONAL = {"ftp-pdf-exe.pcap"}


def corpus():
    return sorted(f for f in os.listdir(PCAPS) if f.endswith((".pcap", ".pcapng")))


def test_corpus_present_and_pinned():
    """Every shipped capture is pinned, and every pinned capture is shipped or known optional."""
    files = set(corpus())
    assert files == set(REFERENCE) - OPTIONAL


def capture_path(name):
    """tests/data/NAME, or the optional corpus's copy (the test is skipped when it is absent)."""
    if name not in OPTIONAL:
        return os.path.join(PCAPS, name)
    path = os.path.join(CORPUS, name)
    if not os.path.isfile(path):
        pytest.skip(f"{name} is in the optional corpus only ({CORPUS} not present)")
    return path


@pytest.mark.parametrize("name", sorted(REFERENCE))
def test_corpus_file(name):
    path = capture_path(name)
    n, nbytes, first, last, lts, ifs, eoff = REFERENCE[name]
    s = summary(path)
    assert (s["n"], s["bytes"]) == (n, nbytes)
    assert s["first"] == (first and ns(first))
    assert s["last"] == (last and ns(last))
    assert s["linktypes"] == lts
    assert s["ifindexes"] == ifs
    assert s["format"] == ("pcapng" if name.endswith(".pcapng") else "pcap")
    assert s["oob"] == 0
    assert s["error_offset"] == eoff
    assert (s["error"] is None) == (eoff is None)
    if eoff is None:
        assert s["offset"] == os.path.getsize(path)

    cn, cbytes, cerr = count_packets(path)
    assert (cn, cbytes) == (n, nbytes)
    if eoff is None:
        assert cerr is None
    else:
        assert isinstance(cerr, InputError)
        assert cerr.offset == eoff and cerr.path == path
        assert str(cerr) == f"{path}: byte offset {eoff}: {cerr.message}"


def test_corrupt_corpus_messages():
    _, _, e = count_packets(os.path.join(PCAPS, "bad-huge-caplen-record.pcap"))
    assert "caplen 4325376" in e.message and "maximum" in e.message
    _, _, e = count_packets(os.path.join(PCAPS, "bad-fuzz-record-header.pcap"))
    assert "caplen 1409179648" in e.message


PCAPNG_PER_PACKET = {
    # caplen wirelen ts linktype ifindex; tshark, SPB rows repeat the previous timestamp
    "pcapng-be-allblocks.pcapng": [
        "96 314 1340954905.298858000 1 0", "342 342 1340954905.298858000 1 2",
        "96 314 1340954905.298858000 1 0", "96 342 1340954905.300858000 1 0",
        "168 168 1340954905.301858000 0 1"],
    "pcapng-mixed-endian-shb.pcapng": [
        "96 314 1340954905.298858000 1 0", "96 342 1340954905.298858000 1 0",
        "168 168 1340954905.301858000 0 1", "128 314 1340954905.301858000 1 0",
        "128 342 1340954905.298858000 1 0", "128 314 1340954905.298858000 1 0",
        "128 342 1340954905.298858000 1 0", "168 168 1340954905.301858000 0 1"],
    "pcapng-multi-if-dns.pcapng": [
        "96 96 1767663089.500330493 1 0", "214 214 1767663089.514291940 1 0",
        "70 70 1767663437.111897000 1 1", "166 166 1767663437.126460000 1 1",
        "70 70 1767663437.128303000 1 1", "182 182 1767663437.140942000 1 1"],
    "sll-nanosec-tcp-handshake.pcap": [
        "76 76 1418145369.924505488 113 0", "76 76 1418145370.052027262 113 0",
        "68 68 1418145370.052115157 113 0"],
    "bad-invalid-nanosec-ts.pcap": [
        "76 76 1418145369.999999999 113 0", "76 76 1418145371.000000000 113 0",
        "68 68 1418145372.147483648 113 0"],
}


@pytest.mark.parametrize("name", sorted(PCAPNG_PER_PACKET))
def test_per_packet(name):
    with open(os.path.join(PCAPS, name), "rb") as f:
        recs, err, _ = records_of(f.read())
    assert err is None
    assert recs == PCAPNG_PER_PACKET[name]


def test_mixed_endian_sections():
    lua_ = lua()
    with open_capture(os.path.join(PCAPS, "pcapng-mixed-endian-shb.pcapng")) as cap:
        r = lua_.eval('require("luaprobe.engine.capture.pcapfile").open')(cap.address, cap.size)
        first_swap = r.swap
        lua_.eval("function(r) while r:next() do end end")(r)
        assert r.sections == 3 and r.error is None
    assert first_swap is True          # first SHB is big-endian (x86 host)


def test_bigendian_pcap_is_swapped():
    with open_capture(os.path.join(PCAPS, "bigendian-pptp-gre.pcap")) as cap:
        r = lua().eval('require("luaprobe.engine.capture.pcapfile").open')(cap.address, cap.size)
        assert r.swap is True and r.format == b"pcap" and r.linktype == 1 and r.snaplen > 0


# --------------------------------------------------------------------- synthetic files

def pcap(records, bo="<", magic=0xA1B2C3D4, linktype=1, snaplen=65535):
    out = struct.pack(bo + "IHHiIII", magic, 2, 4, 0, 0, snaplen, linktype)
    for sec, frac, data, wirelen in records:
        out += struct.pack(bo + "IIII", sec, frac, len(data), wirelen) + data
    return out


def blk(btype, body, bo="<"):
    body += b"\0" * (-len(body) % 4)
    n = len(body) + 12
    return struct.pack(bo + "II", btype, n) + body + struct.pack(bo + "I", n)


def shb(bo="<"):
    return blk(0x0A0D0D0A, struct.pack(bo + "IHHq", 0x1A2B3C4D, 1, 0, -1), bo)


def opt(code, value, bo="<"):
    return struct.pack(bo + "HH", code, len(value)) + value + b"\0" * (-len(value) % 4)


def idb(linktype, snaplen=0, opts=b"", bo="<"):
    if opts:
        opts += opt(0, b"", bo)
    return blk(1, struct.pack(bo + "HHI", linktype, 0, snaplen) + opts, bo)


def epb(ifid, ticks, data, wirelen=None, bo="<", caplen=None):
    return blk(6, struct.pack(bo + "IIIII", ifid, ticks >> 32, ticks & 0xFFFFFFFF,
                              len(data) if caplen is None else caplen,
                              len(data) if wirelen is None else wirelen) + data, bo)


def spb(data, wirelen, bo="<"):
    return blk(3, struct.pack(bo + "I", wirelen) + data, bo)


def pb(ifid, ticks, data, bo="<"):
    return blk(2, struct.pack(bo + "HHIIII", ifid, 0, ticks >> 32, ticks & 0xFFFFFFFF,
                              len(data), len(data)) + data, bo)


PKT = bytes(range(60))


@pytest.mark.parametrize("bo", ["<", ">"])
def test_classic_usec_nsec_both_orders(bo):
    recs, err, _ = records_of(pcap([(10, 999999, PKT, 60), (11, 5, PKT[:7], 100)], bo))
    assert err is None
    assert recs == ["60 60 10.999999000 1 0", "7 100 11.000005000 1 0"]
    recs, err, _ = records_of(pcap([(10, 999999999, PKT, 60)], bo, magic=0xA1B23C4D, linktype=228))
    assert recs == ["60 60 10.999999999 228 0"] and err is None


def test_classic_linktype_fcs_bits_masked():
    recs, _, _ = records_of(pcap([(1, 0, PKT, 60)], linktype=0x10000000 | 101))
    assert recs == ["60 60 1.000000000 101 0"]


def test_classic_usec_overflow_carried():
    recs, _, _ = records_of(pcap([(1, 2_500_000, PKT, 60)]))
    assert recs == ["60 60 3.500000000 1 0"]


def test_classic_modified_magic_24_byte_headers():
    hdr = struct.pack("<IHHiIII", 0xA1B2CD34, 2, 4, 0, 0, 65535, 1)
    rec = struct.pack("<IIIIIHBB", 5, 6, len(PKT), 60, 3, 0x0800, 0, 0) + PKT
    recs, err, _ = records_of(hdr + rec + rec)
    assert recs == ["60 60 5.000006000 1 0"] * 2 and err is None


def test_truncated_last_record():
    good = pcap([(1, 0, PKT, 60), (2, 0, PKT, 60)])
    data = good[:-10]
    recs, err, eoff = records_of(data)
    assert len(recs) == 1 and eoff == 24 + 16 + 60 and b"truncated record" in err
    recs, err, eoff = records_of(good[:24 + 76 + 9])     # cut inside the record header
    assert len(recs) == 1 and eoff == 100 and b"truncated record header" in err


def test_huge_caplen():
    data = pcap([(1, 0, PKT, 60)]) + struct.pack("<IIII", 2, 0, 2_000_000, 60) + b"\0" * 64
    recs, err, eoff = records_of(data)
    assert len(recs) == 1 and eoff == 100 and b"maximum" in err


def test_caplen_above_snaplen_is_accepted():
    recs, err, _ = records_of(pcap([(1, 0, PKT, 60)], snaplen=8))
    assert recs == ["60 60 1.000000000 1 0"] and err is None


@pytest.mark.parametrize("bo", ["<", ">"])
def test_pcapng_timestamp_resolutions_and_offset(bo):
    t = 1_700_000_000
    data = shb(bo)
    data += idb(1, 0, b"", bo)                                            # default usec
    data += idb(228, 0, opt(9, b"\x09", bo), bo)                         # nsec
    data += idb(101, 0, opt(9, b"\x8a", bo) + opt(14, struct.pack(bo + "q", -100), bo), bo)  # 2^-10
    data += idb(113, 0, opt(9, bytes([12]), bo), bo)                     # picoseconds
    data += idb(1, 0, opt(9, b"\x03", bo) + opt(14, struct.pack(bo + "q", 2**33), bo), bo)  # msec
    data += idb(1, 0, opt(9, b"\x9e", bo), bo)                         # 2^-30: 64-bit path
    data += epb(0, t * 10**6 + 123456, PKT, bo=bo)
    data += epb(1, t * 10**9 + 123456789, PKT, bo=bo)
    data += epb(2, t * 1024 + 512, PKT, bo=bo)
    data += epb(3, 10**7 * 10**12 + 123456789012, PKT, bo=bo)        # 2^64 / 10^12 s max
    data += epb(4, 5 * 1000 + 7, PKT, bo=bo)
    data += epb(5, t * 2**30 + 2**29 + 2**28, PKT, bo=bo)
    data += pb(1, 7 * 10**9 + 1, PKT[:20], bo=bo)                        # obsolete Packet Block
    recs, err, _ = records_of(data)
    assert err is None
    assert recs == [
        f"60 60 {t}.123456000 1 0", f"60 60 {t}.123456789 228 1",
        f"60 60 {t - 100}.500000000 101 2", "60 60 10000000.123456789 113 3",
        f"60 60 {2**33 + 5}.007000000 1 4", f"60 60 {t}.750000000 1 5", "20 20 7.000000001 228 1"]


def _exact_ts(res: int, ticks: int) -> tuple[int, int]:
    """(sec, nsec) of ``ticks`` at if_tsresol byte ``res``, by exact fractions (nsec rounded down, as the reader)."""
    t = Fraction(ticks, 2 ** (res & 0x7F) if res & 0x80 else 10 ** res)
    return math.floor(t), math.floor((t - math.floor(t)) * 10**9)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(res=st.one_of(st.integers(0, 19), st.integers(0x80, 0x80 + 63)), data=st.data())
def test_pcapng_every_representable_tsresol_is_exact(res, data):
    """Every if_tsresol libpcap and Wireshark read (10^-0..10^-19, 2^-0..2^-63) gives the exact time of any 64-bit
    tick count (nanoseconds rounded down) up to 2^53 s, where the reader's seconds (a Lua number) end; truth:
    Python's exact fractions."""
    ups = 2 ** (res & 0x7F) if res & 0x80 else 10 ** res
    ticks = data.draw(st.integers(0, min(2**64, ups * 2**53) - 1), label="ticks")
    recs, err, _ = records_of(shb() + idb(1, 0, opt(9, bytes([res]))) + epb(0, ticks, PKT))
    sec, nsec = _exact_ts(res, ticks)
    assert err is None and recs == [f"60 60 {sec}.{nsec:09d} 1 0"], (res, ticks)


@pytest.mark.parametrize("res, text", [(20, "10^-20"), (127, "10^-127"), (0x80 | 64, "2^-64"),
                                       (0xFF, "2^-127")])
def test_pcapng_tsresol_too_fine_is_refused_at_the_idb(res, text):
    """An if_tsresol whose units per second do not fit in 64 bits is refused as libpcap (sf-pcapng.c: "if_tsresol
    option resolution 10^-%u is too high") and Wireshark (wiretap/pcapng.c: "IDB power-of-10 time stamp resolution
    %u > 19") refuse it: the packets before the IDB are read, the error names its byte offset."""
    head = shb() + idb(1) + epb(0, 5 * 10**6, PKT)
    recs, err, eoff = records_of(head + idb(1, 0, opt(9, bytes([res]))) + epb(1, 10**6, PKT))
    assert recs == ["60 60 5.000000000 1 0"] and eoff == len(head)
    assert err.decode().startswith(f"if_tsresol {text} s is finer than "), err


def test_pcapng_tsresol_too_fine_is_one_line_naming_the_offset(tmp_path):
    """luaprobe run on such a file: one line naming the file and the IDB's byte offset, exit 3 (input error)."""
    path = tmp_path / "fine.pcapng"
    path.write_bytes(shb() + idb(1, 0, opt(9, bytes([127]))) + epb(0, 10**6, PKT))
    plugin = tmp_path / "p.lua"
    plugin.write_text('TrisulPlugin = { id = { name = "p" }, simplecounter = { protocol_guid = '
                      '"{974FB098-DE46-45db-94DA-8D64A3BBCDE5}", onpacket = function(e, l) end } }')
    r = subprocess.run([sys.executable, "-m", "luaprobe.engine.daemon.cli", "run", str(plugin), "--pcap", str(path),
                        "--out", str(tmp_path / "out"), "-q"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 3, r.stderr
    assert r.stderr.splitlines() == [f"luaprobe run: input error: {path}: byte offset 28: if_tsresol 10^-127 s is "
                                     "finer than 10^-19 s, the finest a 64-bit tick count can hold a second of "
                                     "(libpcap and Wireshark refuse it too)"], r.stderr


def test_pcapng_spb_caplen_and_skipped_blocks():
    data = shb() + blk(0xBAD, b"custom") + idb(1, 16) + blk(4, b"\0" * 8) + epb(0, 3 * 10**6, PKT)
    data += spb(PKT, 200)                    # snaplen 16 < block room 60 < wirelen 200
    data += blk(5, b"\0" * 12) + spb(PKT[:20], 10)   # wirelen 10 < block room 20
    recs, err, _ = records_of(data)
    assert err is None
    assert recs == ["60 60 3.000000000 1 0", "16 200 3.000000000 1 0", "10 10 3.000000000 1 0"]


def test_pcapng_sections_switch_byte_order_and_reset_interfaces():
    s1 = shb("<") + idb(1, bo="<") + idb(0, bo="<") + epb(1, 10**6, PKT, bo="<")
    s2 = shb(">") + idb(113, bo=">") + epb(0, 2 * 10**6, PKT, bo=">")
    recs, err, _ = records_of(s1 + s2)
    assert err is None and recs == ["60 60 1.000000000 0 1", "60 60 2.000000000 113 0"]
    bad = s1 + s2 + epb(1, 0, PKT, bo=">")   # interface 1 only existed in section 1
    recs, err, eoff = records_of(bad)
    assert len(recs) == 2 and eoff == len(s1 + s2) and b"unknown interface id 1" in err


def _pcapng_error(tail):
    head = shb() + idb(1) + epb(0, 0, PKT)
    recs, err, eoff = records_of(head + tail)
    assert len(recs) == 1
    assert eoff == len(head), err
    return err.decode()


def test_pcapng_corruptions():
    assert "bad block length 30" in _pcapng_error(struct.pack("<II", 6, 30) + b"\0" * 40)
    assert "bad block length 8" in _pcapng_error(struct.pack("<II", 6, 8) + b"\0" * 40)
    assert "exceeds the" in _pcapng_error(struct.pack("<II", 6, 4000) + b"\0" * 40)
    assert "block lengths differ" in _pcapng_error(epb(0, 0, PKT)[:-4] + b"\x01\0\0\0")
    assert "exceeds the block" in _pcapng_error(epb(0, 0, PKT, caplen=61))
    assert "maximum" in _pcapng_error(epb(0, 0, PKT, caplen=2_000_000))
    assert "unknown interface id 7" in _pcapng_error(epb(7, 0, PKT))
    assert "truncated block header" in _pcapng_error(b"\x06\0\0\0\x40")
    assert "exceeds the" in _pcapng_error(epb(0, 0, PKT)[:-8])     # truncated final block
    assert "packet block too short" in _pcapng_error(blk(6, b"\0" * 8))
    assert "overruns" in _pcapng_error(blk(1, struct.pack("<HHI", 1, 0, 0) + struct.pack("<HH", 9, 40)))
    assert "byte-order magic" in _pcapng_error(blk(0x0A0D0D0A, struct.pack("<IHHq", 0x12345678, 1, 0, -1)))
    assert "version" in _pcapng_error(blk(0x0A0D0D0A, struct.pack("<IHHq", 0x1A2B3C4D, 2, 0, -1)))
    assert "without interface 0" in records_of(shb() + spb(PKT, 60))[1].decode()


def test_next_after_error_keeps_returning_nil():
    data = pcap([(1, 0, PKT, 60)]) + b"\0" * 5
    buf = ctypes.create_string_buffer(data, len(data))
    r = lua().eval('require("luaprobe.engine.capture.pcapfile").open')(ctypes.addressof(buf), len(data))
    nxt = lua().eval("function(r) return r:next() end")
    assert nxt(r)[1] == 60
    assert nxt(r) is None and nxt(r) is None
    assert r.error_offset == 100 and r.packets == 1 and r.offset == 100


# ------------------------------------------------------------------- InputError paths

@pytest.fixture
def tmpfile(tmp_path):
    def make(data: bytes, name="x.pcap"):
        p = tmp_path / name
        p.write_bytes(data)
        return str(p)
    return make


@pytest.mark.parametrize("data,fragment", [
    (b"", "empty file"),
    (b"\xd4\xc3", "too short"),
    (b"GET / HTTP/1.1\r\n\r\n" * 3, "unknown file magic"),
    (struct.pack("<IHH", 0xA1B2C3D4, 2, 4), "truncated pcap file header"),
    (struct.pack("<IHHiIII", 0xA1B2C3D4, 1, 0, 0, 0, 65535, 1), "archaic pcap savefile format (version 1.0"),
    (blk(0x0A0D0D0A, struct.pack("<IHHq", 0x01020304, 1, 0, -1)), "byte-order magic"),
    (b"\x0a\x0d\x0d\x0a\x1c\0\0\0", "truncated section header"),
])
def test_bad_headers_raise(tmpfile, data, fragment):
    path = tmpfile(data)
    with pytest.raises(InputError) as ei:
        count_packets(path)
    e = ei.value
    assert e.path == path and e.offset == 0 and fragment in e.message
    assert str(e) == f"{path}: byte offset 0: {e.message}"


@pytest.mark.skipif(shutil.which("tshark") is None, reason="needs tshark")
def test_archaic_pcap_is_refused_as_tshark_refuses_it(tmpfile):
    """A pcap header with major version 1 (before libpcap's 2.x): libpcap and tshark refuse the file; luaprobe
    names it instead of reading records it cannot vouch for (before, it was read as 2.4)."""
    path = tmpfile(struct.pack("<IHHiIII", 0xA1B2C3D4, 1, 0, 0, 0, 65535, 1) + pcap([(1, 0, PKT, 60)])[24:])
    t = subprocess.run(["tshark", "-r", path], capture_output=True, text=True)
    assert t.returncode != 0
    with pytest.raises(InputError, match="archaic pcap savefile format"):
        count_packets(path)


def test_truncated_record_reported_with_path(tmpfile):
    path = tmpfile(pcap([(1, 0, PKT, 60), (2, 0, PKT, 60)])[:-1])
    n, nbytes, e = count_packets(path)
    assert (n, nbytes) == (1, 60)
    assert str(e) == f"{path}: byte offset 100: {e.message}" and "truncated record" in e.message


def test_directory_missing_and_unreadable(tmp_path):
    for path, fragment in [(str(tmp_path), "directory"), (str(tmp_path / "nope.pcap"), "no such file")]:
        with pytest.raises(InputError) as ei:
            open_capture(path)
        assert ei.value.path == path and ei.value.offset == 0 and fragment in ei.value.message
        assert str(ei.value).startswith(f"{path}: byte offset 0: ")
    if os.geteuid() != 0:
        p = tmp_path / "locked.pcap"
        p.write_bytes(pcap([]))
        p.chmod(0)
        with pytest.raises(InputError, match="permission denied"):
            count_packets(str(p))


def test_capture_handle(tmpfile):
    data = pcap([(1, 0, PKT, 60)])
    with open_capture(tmpfile(data)) as cap:
        assert cap.size == len(data) and cap.address
        assert ctypes.string_at(cap.address, 4) == data[:4]
    assert cap.address == 0
    cap.close()                                   # idempotent


# ------------------------------------------------------------- robustness (guard page)

PAGE = mmap.PAGESIZE
_libc = ctypes.CDLL(None, use_errno=True)
_libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]


class Guarded:
    """Bytes placed so that they end exactly at an inaccessible page: any read past
    the end crashes the test process instead of passing silently."""

    def __init__(self, cap=1 << 16):
        self.mm = mmap.mmap(-1, cap + PAGE)
        self.buf = (ctypes.c_char * (cap + PAGE)).from_buffer(self.mm)
        self.base = ctypes.addressof(self.buf)
        self.cap = cap
        assert _libc.mprotect(self.base + cap, PAGE, 0) == 0

    def place(self, data: bytes) -> int:
        addr = self.base + self.cap - len(data)
        ctypes.memmove(addr, data, len(data))
        return addr


_guard = None
SEEDS = [
    pcap([(1, 0, PKT, 60), (2, 5, PKT[:30], 90)]),
    pcap([(1, 0, PKT, 60)], ">", magic=0xA1B23C4D),
    shb() + idb(1, 32, opt(9, b"\x86")) + epb(0, 99, PKT) + spb(PKT, 60) + pb(0, 5, PKT[:9])
    + shb(">") + idb(113, bo=">") + epb(0, 7, PKT, bo=">") + blk(5, b"\0" * 8, ">"),
]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.sampled_from(SEEDS), cut=st.integers(0, 400),
       flips=st.lists(st.tuples(st.integers(0, 399), st.integers(0, 255)), max_size=6))
def test_fuzz_never_reads_outside(seed, cut, flips):
    global _guard
    if _guard is None:
        _guard = Guarded()
    data = bytearray(seed[:cut] if cut < len(seed) else seed)
    for pos, val in flips:
        if pos < len(data):
            data[pos] = val
    addr = _guard.place(bytes(data))
    try:
        res = lua().globals().walk_summary(addr, len(data))
    except Exception as e:                       # only header errors may raise
        assert "offset 0: " in str(e)
        return
    n, nbytes, *_rest = res
    oob, offset = res[11], res[12]
    assert oob == 0 and 0 <= offset <= len(data)


OPTS = st.lists(st.sampled_from([(1, b"comment!"), (3, b"\x00" * 8), (4, b"\x00" * 8 + b"\x01\x02"), (1, b"x")]),
                max_size=3)


@settings(max_examples=60, deadline=None)
@given(bo=st.sampled_from(["<", ">"]), if_fcs=st.sampled_from([0, 2, 4]), epb_fcs=st.integers(0, 15),
       before=OPTS, after=OPTS, dlen=st.integers(20, 70), flags_low=st.integers(0, 31))
def test_pcapng_epb_flags_fcs_length_overrides_if_fcslen(bo, if_fcs, epb_fcs, before, after, dlen, flags_low):
    """An EPB's epb_flags option (pcapng draft §4.3.1: bits 5-8 = FCS length in octets) overrides the IDB's
    if_fcslen (in bits) for that packet when non-zero, wherever it sits among the other options; EPBs without
    the option keep the interface's FCS length."""
    data = bytes(range(dlen))
    fl = (epb_fcs << 5) | flags_low | (0x0000F000 if flags_low & 1 else 0)     # other bits set too
    opts = b"".join(opt(c, v, bo) for c, v in before) + opt(2, struct.pack(bo + "I", fl), bo) \
        + b"".join(opt(c, v, bo) for c, v in after) + opt(0, b"", bo)
    body = struct.pack(bo + "IIIII", 0, 0, 5, dlen, dlen) + data + b"\0" * (-dlen % 4) + opts
    idb_opts = opt(13, bytes([if_fcs * 8]), bo) if if_fcs else b""
    cap = shb(bo) + idb(1, 0, idb_opts, bo) + blk(6, body, bo) + epb(0, 6, data, bo=bo)
    recs, err, _ = records_of(cap)
    f = epb_fcs or if_fcs
    assert err is None
    assert recs == [f"{dlen - f} {dlen - f} 0.000005000 1 0", f"{dlen - if_fcs} {dlen - if_fcs} 0.000006000 1 0"]


def test_size_now_is_the_mapped_files_size_whatever_its_path_names_since(tmp_path):
    """Capture.size_now (fstat of Capture.fd, the descriptor capture.lua M.file's checks for a file cut while it is
    read use) is the size of the file that was mapped: cut in place, it shrinks; another, smaller file renamed over
    the path changes nothing (the check reopened the path, e246e71's SizeNow: it measured the other file, and a read
    would have ended early with a false 'cut' input error).  Truth: os.stat of the files themselves."""
    path, other = tmp_path / "a.pcap", tmp_path / "b.pcap"
    shutil.copyfile(os.path.join(PCAPS, "http-get-text.pcap"), path)
    other.write_bytes(path.read_bytes()[:100])
    size = os.stat(path).st_size
    with open_capture(str(path)) as c:
        assert c.size_now() == c.size == size
        os.replace(other, path)                       # the path now names a 100-byte file; the mapped one is unlinked
        assert os.stat(path).st_size == 100
        assert c.size_now() == size
    with open_capture(str(path)) as c:
        os.truncate(path, 60)                         # the same file, cut in place
        assert c.size_now() == 60 and c.size == 100


# ------------------------------------------------------------------ EPB / PB options running past the block

def _wireshark_options_ok(opts: bytes, bo: str) -> bool:
    """Wireshark 4.0's verdict on a packet block's options (wiretap/pcapng.c pcapng_process_options, rewritten from
    its text, the model the walker is checked against): each option header needs 4 bytes, each value rounded up to 4
    bytes must fit in what is left, opt_endofopt (code 0) ends the walk (even with bytes after it)."""
    pos = 0
    while pos < len(opts):
        if len(opts) - pos < 4:
            return False
        code, olen = struct.unpack_from(bo + "HH", opts, pos)
        pos += 4
        if (olen + 3) & ~3 > len(opts) - pos:
            return False
        if code == 0:
            return True
        pos += (olen + 3) & ~3
    return True


def _epb_with_options(bo, data, opts, btype=6):
    """An EPB (or PB) over `data` whose option bytes are exactly `opts` (a multiple of 4)."""
    pad = b"\0" * (-len(data) % 4)
    if btype == 6:
        fixed = struct.pack(bo + "IIIII", 0, 0, 7, len(data), len(data))
    else:
        fixed = struct.pack(bo + "HHIIII", 0, 0, 0, 7, len(data), len(data))
    return blk(btype, fixed + data + pad + opts, bo)


OPTION = st.tuples(st.sampled_from([0, 1, 2, 3, 4, 0x8001]), st.integers(0, 40), st.integers(-8, 40))


@settings(max_examples=200, deadline=None)
@given(bo=st.sampled_from(["<", ">"]), btype=st.sampled_from([6, 2]), dlen=st.integers(14, 70),
       options=st.lists(OPTION, max_size=4), tail=st.integers(0, 3))
def test_pcapng_packet_block_options_running_past_the_block(bo, btype, dlen, options, tail):
    """Options of random lengths, each claiming its true length or one off by up to 40 bytes either way (a claim
    past the block's end overruns it): the walker refuses the block exactly when Wireshark does (the model above;
    tshark on such files: test_tshark_refuses_an_epb_whose_option_overruns_it): the packets before it are read, the
    error is at the block's offset and names the option; else every packet is read."""
    opts = b""
    for code, true_len, off in options:
        claim = max(0, min(0xFFFF, true_len + off))
        opts += struct.pack(bo + "HH", code, claim) + bytes(range(true_len)) + b"\0" * (-true_len % 4)
    opts += b"\0\0\0\0" * tail
    head = shb(bo) + idb(1, 0, b"", bo) + epb(0, 5, PKT, bo=bo)
    bad = _epb_with_options(bo, bytes(range(dlen)), opts, btype)
    recs, err, eoff = records_of(head + bad + epb(0, 9, PKT, bo=bo))
    if _wireshark_options_ok(opts, bo):
        assert err is None and len(recs) == 3, (err, opts.hex())
    else:
        assert len(recs) == 1 and eoff == len(head), (err, eoff, opts.hex())
        kind = "enhanced packet block" if btype == 6 else "packet block"
        assert err.decode().startswith(kind + " option ") and err.decode().endswith(" bytes overruns the block")


def _overrun_file(path):
    """Two good EPBs around one whose opt_comment claims 200 bytes and holds 4: (its byte offset, the file)."""
    head = shb() + idb(1) + epb(0, 10**6, PKT)
    path.write_bytes(head + _epb_with_options("<", PKT, struct.pack("<HH", 1, 200) + b"abcd") + epb(0, 3 * 10**6, PKT))
    return len(head)


@pytest.mark.skipif(shutil.which("tshark") is None, reason="tshark not installed")
def test_tshark_refuses_an_epb_whose_option_overruns_it(tmp_path):
    """The truth behind the rule: tshark (Wireshark 4.0) reads the packet before such an EPB, then calls the file
    damaged ("Not enough data to handle option of length 200"); the walker stops at the same packet."""
    path = tmp_path / "overrun.pcapng"
    off = _overrun_file(path)
    r = subprocess.run(["tshark", "-r", str(path), "-T", "fields", "-e", "frame.number"], capture_output=True,
                       text=True, timeout=60)
    assert r.stdout.split() == ["1"] and "option of length 200" in r.stderr, r.stderr
    recs, err, eoff = records_of(path.read_bytes())
    assert len(recs) == 1 and eoff == off and err == b"enhanced packet block option 1 of 200 bytes overruns the block"


def test_pcapng_option_overrun_is_one_line_naming_the_offset(tmp_path):
    """luaprobe run on such a file: one line naming the file and the EPB's byte offset, exit 3 (input error), the
    packet before it counted."""
    path = tmp_path / "overrun.pcapng"
    off = _overrun_file(path)
    plugin = tmp_path / "p.lua"
    plugin.write_text('TrisulPlugin = { id = { name = "p" }, simplecounter = { protocol_guid = '
                      '"{974FB098-DE46-45db-94DA-8D64A3BBCDE5}", onpacket = function(e, l) end } }')
    r = subprocess.run([sys.executable, "-m", "luaprobe.engine.daemon.cli", "run", str(plugin), "--pcap", str(path),
                        "--out", str(tmp_path / "out"), "-q", "--json"], cwd=REPO, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 3, r.stderr
    assert r.stderr.splitlines() == [f"luaprobe run: input error: {path}: byte offset {off}: enhanced packet block "
                                     "option 1 of 200 bytes overruns the block"], r.stderr
    assert json.loads(r.stdout)["packets"] == 1
