"""Decoder coverage of encapsulations users meet, checked against tshark on the same generated packets.

Each case is one packet built here byte by byte (IPsec AH in IPv4 and IPv6, ESP, GRE plain, with key and
sequence number, over IPv6, VXLAN, Geneve, 6in4, 4in6, IP-in-IP, QinQ 0x88a8/0x9100, MPLS label stacks
carrying IPv4 / IPv6 / an Ethernet pseudowire, PPPoE session with IPv4/IPv6 and discovery, Linux SLL and
SLL2); test_random_ah_chains_match_tshark adds 300 seeded AH chains (IPv4 with options, IPv6).  All cases
go into one pcap per link type, tshark (4.x) dissects it once (``-T fields -E occurrence=a``), and for every
packet the decoder's layers, ipproto, ports and Trisul flow key must match what tshark shows, read by the
coverage rule of docs/reference.md "What the decoder covers":

* tshark's protocol chain is followed from the link layer; ``ethertype``, ``ppp`` (part of the PPPOE layer),
  IPv6 extension headers and ``ah`` (part of the IPv4 / IPv6 layer, RFC 4302) have no layer of their own;
* the chain ends at the first TCP/UDP/ICMP/ICMPv6 header (a tunnel inside UDP -- VXLAN, Geneve -- is
  that UDP flow), at an IP header inside an IP header (6in4, 4in6: the outer IP flow), and at any protocol
  the decoder does not know (GRE, MPLS pseudowires: the outer IP flow / the MPLS layer);
* the flow key's protocol is the L4 protocol ending the chain (so AH-protected TCP is a TCP flow, as in
  tshark's ``tcp`` fields), else the outer IP header's protocol / next header (ip.proto, ipv6.nxt);
  addresses are the outer IP header's, ports tshark's first tcp/udp ports.

Skipped when tshark is not installed.
"""
from __future__ import annotations

import ipaddress
import os
import shutil
import struct
import subprocess

import pytest

from tests.test_decode import FIELDS, NAME, R, _py_flowkey, lua, H, dec  # noqa: F401 (fixtures)
from tests.pktbuild import write_pcap

TSHARK = shutil.which('tshark')
pytestmark = pytest.mark.skipif(TSHARK is None, reason='needs tshark')

SRC4, DST4 = '10.1.2.3', '192.0.2.77'
SRC6, DST6 = '2001:db8:1::10', '2001:db8:2::20'
IN4S, IN4D = '172.16.0.5', '172.16.9.9'
IN6S, IN6D = 'fd00::5', 'fd00::9'
MAC_A = bytes.fromhex('020000000001') + bytes.fromhex('020000000002')


def ip4(proto, payload, src=SRC4, dst=DST4):
    h = struct.pack('>BBHHHBBH4s4s', 0x45, 0, 20 + len(payload), 7, 0x4000, 64, proto, 0,
                    ipaddress.ip_address(src).packed, ipaddress.ip_address(dst).packed)
    return h + payload


def ip6(nh, payload, src=SRC6, dst=DST6):
    return struct.pack('>IHBB16s16s', 0x60000000, len(payload), nh, 64, ipaddress.ip_address(src).packed,
                       ipaddress.ip_address(dst).packed) + payload


def tcp(sp, dp, data=b'hello'):
    return struct.pack('>HHIIBBHHH', sp, dp, 1000, 0, 0x50, 0x18, 8192, 0, 0) + data


def udp(sp, dp, data=b'payload!'):
    return struct.pack('>HHHH', sp, dp, 8 + len(data), 0) + data


def icmp_echo():
    return struct.pack('>BBHHH', 8, 0, 0, 1, 1) + b'ping'


def ah(nh, icv=12):
    """IPsec AH (RFC 4302): next header, payload length in 32-bit words minus 2, SPI, sequence, ICV."""
    return struct.pack('>BBHII', nh, (12 + icv) // 4 - 2, 0, 0x1234, 1) + b'\xab' * icv


def gre(proto, payload, key=None, seq=None):
    flags = (0x2000 if key is not None else 0) | (0x1000 if seq is not None else 0)
    h = struct.pack('>HH', flags, proto)
    if key is not None:
        h += struct.pack('>I', key)
    if seq is not None:
        h += struct.pack('>I', seq)
    return h + payload


def eth(payload, et=0x0800, macs=MAC_A):
    return macs + struct.pack('>H', et) + payload


def labels(*ls):
    return b''.join(struct.pack('>I', (lab << 12) | (0x100 if i == len(ls) - 1 else 0) | 64)
                    for i, lab in enumerate(ls))


INNER4 = ip4(6, tcp(33000, 8080), IN4S, IN4D)
INNER6 = ip6(6, tcp(33001, 8081), IN6S, IN6D)
# an Ethernet frame whose destination MAC starts with nibble 4 (a pseudowire payload an IP guess by
# the first nibble would take for IPv4)
PW_FRAME = eth(INNER4, macs=bytes.fromhex('45aabbccddee') + bytes.fromhex('020000000003'))

# name -> (linktype, frame)
CASES = {
    'ah4_tcp': (1, eth(ip4(51, ah(6) + tcp(40000, 443)))),
    'ah4_udp': (1, eth(ip4(51, ah(17) + udp(5353, 53)))),
    'ah4_icmp': (1, eth(ip4(51, ah(1) + icmp_echo()))),
    'ah4_ah_tcp': (1, eth(ip4(51, ah(51, 4) + ah(6) + tcp(40001, 22)))),
    'ah6_tcp': (1, eth(ip6(51, ah(6) + tcp(40002, 443)), 0x86dd)),
    'esp4': (1, eth(ip4(50, struct.pack('>II', 0x99, 1) + b'\x00' * 40))),
    'gre_plain': (1, eth(ip4(47, gre(0x0800, INNER4)))),
    'gre_key_seq': (1, eth(ip4(47, gre(0x0800, INNER4, key=0xbeef, seq=5)))),
    'gre_ipv6': (1, eth(ip4(47, gre(0x86dd, INNER6)))),
    'vxlan': (1, eth(ip4(17, udp(51000, 4789, struct.pack('>II', 0x08000000, 42 << 8) + eth(INNER4))))),
    'geneve': (1, eth(ip4(17, udp(51001, 6081, struct.pack('>HHI', 0, 0x6558, 43 << 8) + eth(INNER4))))),
    'gre_over_ipv6': (1, eth(ip6(47, gre(0x0800, INNER4)), 0x86dd)),
    '6in4': (1, eth(ip4(41, INNER6))),
    'ipip': (1, eth(ip4(4, INNER4))),
    'pppoe_discovery': (1, eth(struct.pack('>BBHH', 0x11, 0x09, 0, 4) + struct.pack('>HH', 0x0101, 0), 0x8863)),
    '4in6': (1, eth(ip6(4, INNER4), 0x86dd)),
    'qinq_88a8': (1, eth(struct.pack('>HH', 100, 0x8100) + struct.pack('>HH', 200, 0x0800)
                         + ip4(6, tcp(40003, 80)), 0x88a8)),
    'qinq_9100': (1, eth(struct.pack('>HH', 101, 0x8100) + struct.pack('>HH', 201, 0x86dd)
                         + ip6(17, udp(40004, 53)), 0x9100)),
    'mpls3_ipv4': (1, eth(labels(16, 17, 18) + ip4(6, tcp(40005, 80)), 0x8847)),
    'mpls2_ipv6': (1, eth(labels(16, 19) + ip6(6, tcp(40006, 80)), 0x8847)),
    'mpls_pw_cw': (1, eth(labels(16, 20) + b'\x00\x00\x00\x00' + PW_FRAME, 0x8847)),
    'mpls_pw_nocw': (1, eth(labels(16, 21) + PW_FRAME, 0x8847)),
    'pppoe_ipv6': (1, eth(struct.pack('>BBHHH', 0x11, 0, 7, len(INNER6) + 2, 0x0057) + INNER6, 0x8864)),
    'pppoe_ipv4': (1, eth(struct.pack('>BBHHH', 0x11, 0, 7, len(INNER4) + 2, 0x0021) + INNER4, 0x8864)),
    'sll_ipv4': (113, struct.pack('>HHH8sH', 0, 1, 6, b'\x02\x00\x00\x00\x00\x01\x00\x00', 0x0800)
                 + ip4(6, tcp(40007, 443))),
    'sll2_ipv6': (276, struct.pack('>HHIHBB8s', 0x86dd, 0, 2, 1, 0, 6, b'\x02\x00\x00\x00\x00\x01\x00\x00')
                  + ip6(17, udp(40008, 53))),
    'sll2_vlan': (276, struct.pack('>HHIHBB8s', 0x8100, 0, 2, 1, 0, 6, b'\x02\x00\x00\x00\x00\x01\x00\x00')
                  + struct.pack('>HH', 5, 0x0800) + ip4(17, udp(40009, 53))),
}

TS_FIELDS = ['frame.protocols', 'ip.src', 'ip.dst', 'ip.proto', 'ipv6.src', 'ipv6.dst', 'ipv6.nxt',
             'tcp.srcport', 'tcp.dstport', 'udp.srcport', 'udp.dstport']
L4 = {'tcp': ('TCP', 6), 'udp': ('UDP', 17), 'icmp': ('ICMP', 1), 'icmpv6': ('ICMPV6', 58)}
OWN = {'eth': 'ETHERNET', 'vlan': 'VLAN', 'ieee8021ad': 'VLAN', 'mpls': 'MPLS', 'pppoes': 'PPPOE', 'ip': 'IPV4',
       'ipv6': 'IPV6'}
NO_LAYER = {'ethertype', 'ppp', 'ah'}


def tshark_rows(tmp_path):
    """name -> dict of tshark's fields (lists of all occurrences) for every case."""
    out = {}
    for lt in sorted({lt for lt, _f in CASES.values()}):
        names = [n for n, (l, _f) in CASES.items() if l == lt]
        path = str(tmp_path / ('cases-%d.pcap' % lt))
        write_pcap(path, [(1.0 + i, CASES[n][1]) for i, n in enumerate(names)], linktype=lt)
        cmd = [TSHARK, '-r', path, '-T', 'fields', '-E', 'occurrence=a', '-E', 'aggregator=,']
        for f in TS_FIELDS:
            cmd += ['-e', f]
        res = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=120)
        lines = res.stdout.rstrip('\n').split('\n')
        assert len(lines) == len(names), res.stderr
        for n, line in zip(names, lines):
            vals = line.split('\t')
            out[n] = {f: (v.split(',') if v else []) for f, v in zip(TS_FIELDS, vals)}
            out[n]['frame.protocols'] = vals[0].split(':')
            out[n]['linktype'] = lt
    return out


def expected(t):
    """(layer names, ipproto, flow key or None) the coverage rule (module docstring) reads from tshark."""
    chain, ip_seen, l4 = [], 0, None
    for p in t['frame.protocols']:
        if p == 'sll':
            chain.append('SLL2' if t['linktype'] == 276 else 'SLL')
        elif p in NO_LAYER or p.startswith('ipv6.'):
            continue
        elif p in L4:
            if ip_seen:
                chain.append(L4[p][0])
                l4 = L4[p][1]
            break
        elif p in OWN:
            if p in ('ip', 'ipv6'):
                if ip_seen:
                    break
                ip_seen = 4 if p == 'ip' else 6
            if p == 'mpls' and chain[-1:] == ['MPLS']:
                continue                          # one layer for the whole label stack
            chain.append(OWN[p])
        else:
            break
    if not ip_seen:
        return chain, 0, None
    first_ip = [p for p in t['frame.protocols'] if p in ('ip', 'ipv6')][0]
    v = 4 if first_ip == 'ip' else 6
    src, dst = (t['ip.src'][0], t['ip.dst'][0]) if v == 4 else (t['ipv6.src'][0], t['ipv6.dst'][0])
    if l4 is not None:
        proto = l4
    else:
        proto = int(t['ip.proto'][0] if v == 4 else t['ipv6.nxt'][0])
    sp = dp = 0
    if l4 in (6, 17):
        k = 'tcp' if l4 == 6 else 'udp'
        sp, dp = int(t[k + '.srcport'][0]), int(t[k + '.dstport'][0])
    return chain, proto, _py_flowkey(proto, v, src, dst, sp, dp).encode()


@pytest.fixture(scope='module')
def ts(tmp_path_factory):
    return tshark_rows(tmp_path_factory.mktemp('tunnels'))


@pytest.mark.parametrize('name', sorted(CASES))
def test_case_matches_tshark(dec, ts, name):
    lt, frame = CASES[name]
    r = dec(frame, lt)
    chain, proto, key = expected(ts[name])
    assert r.protos == chain, ts[name]['frame.protocols']
    assert r.truncated == 0 and r.malformed == 0
    assert r.ipproto == proto
    if key is not None:
        assert r.flowkey == key
    else:
        assert r.ipv == 0


def test_ah_in_ipv4_layers(dec):
    """AH belongs to the IPv4 layer, as extension headers belong to the IPv6 one: TCP right after."""
    r = dec(CASES['ah4_tcp'][1])
    assert r.layer_list == [(1, 0, 14), (6, 14, 20 + 24), (8, 14 + 44, 20)]
    assert (r.l3_offset, r.l4_offset, r.payload_length) == (14, 58, 5)
    # AH cut short: the IPv4 layer alone, ipproto still AH, truncated
    frame = CASES['ah4_tcp'][1]
    r = dec(frame, 1, 14 + 20 + 10)
    assert r.protos == ['ETHERNET', 'IPV4'] and r.ipproto == 51 and r.truncated == 1
    # a non-first fragment carries no AH (offset != 0): nothing decoded past IPv4
    frag = bytearray(frame)
    frag[14 + 6:14 + 8] = struct.pack('>H', 100)
    r = dec(bytes(frag))
    assert r.protos == ['ETHERNET', 'IPV4'] and r.ipproto == 51 and r.frag == 1


def _random_ah_frames(n, seed):
    """n seeded AH packets: IPv4 (with 0-3 words of NOP options) or IPv6, 1-3 AH headers of random ICV
    sizes (0-7 words), then TCP, UDP or ICMP/ICMPv6 with random ports and addresses."""
    import random
    rng = random.Random(seed)
    frames = []
    for _ in range(n):
        v6 = rng.random() < 0.3
        kind = rng.choice(['tcp', 'udp', 'icmp'])
        if kind == 'tcp':
            l4, nh = tcp(rng.randrange(1, 65536), rng.randrange(1, 65536), b'x' * rng.randrange(0, 40)), 6
        elif kind == 'udp':
            l4, nh = udp(rng.randrange(1, 65536), rng.randrange(1, 65536)), 17
        else:
            l4, nh = (struct.pack('>BBHHH', 128, 0, 0, 1, 1), 58) if v6 else (icmp_echo(), 1)
        body = l4
        for _k in range(rng.randrange(1, 4)):
            body = ah(nh, 4 * rng.randrange(0, 8)) + body
            nh = 51
        if v6:
            a = [str(ipaddress.IPv6Address(rng.getrandbits(128))) for _i in range(2)]
            frames.append(eth(ip6(51, body, *a), 0x86dd))
        else:
            a = [str(ipaddress.IPv4Address(rng.getrandbits(32) | 0x01000000)) for _i in range(2)]
            opts = b'\x01' * (4 * rng.randrange(0, 4))
            pkt = bytearray(ip4(51, opts + body, *a))
            pkt[0] = 0x45 + len(opts) // 4
            frames.append(eth(bytes(pkt)))
    return frames


def test_random_ah_chains_match_tshark(dec, tmp_path):
    """300 seeded AH variants in one capture, dissected by tshark once: every packet's layers, ipproto
    and flow key read from tshark by the same rule as the cases above."""
    frames = _random_ah_frames(300, 4302)
    path = str(tmp_path / 'ah.pcap')
    write_pcap(path, [(1.0 + i, f) for i, f in enumerate(frames)])
    cmd = [TSHARK, '-r', path, '-o', 'ip.defragment:FALSE', '-T', 'fields', '-E', 'occurrence=a',
           '-E', 'aggregator=,']
    for f in TS_FIELDS:
        cmd += ['-e', f]
    res = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=120)
    lines = res.stdout.rstrip('\n').split('\n')
    assert len(lines) == len(frames)
    for i, (frame, line) in enumerate(zip(frames, lines)):
        vals = line.split('\t')
        t = {f: (v.split(',') if v else []) for f, v in zip(TS_FIELDS, vals)}
        t['frame.protocols'], t['linktype'] = vals[0].split(':'), 1
        chain, proto, key = expected(t)
        assert chain[-1] in ('TCP', 'UDP', 'ICMP', 'ICMPV6'), (i, vals[0])
        r = dec(frame)
        assert (r.protos, r.ipproto, r.flowkey, r.truncated, r.malformed) == (chain, proto, key, 0, 0), (i, vals[0])
