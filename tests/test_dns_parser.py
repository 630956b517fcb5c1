"""Property tests for engine/streams/dns.lua (the DNS message parser of the built-in analysers), against dnspython.

Independent truth: dnspython builds each message and writes it to wire format (with its own name compression), and
gives every record's presentation text; luaprobe's parser must read back the same header flags, questions and
records (names without the trailing dot, rdata as docs/plugins.md "DNS FTS document" says).  A second property
feeds mutated and random bytes: the parser returns a message or (nil, message naming a byte offset), never raises
and never reads past the length it was given (the bytes are handed over in a buffer exactly that long).
Source of the formats: RFC 1035 §3.3 and §4, RFC 3596 (AAAA), RFC 2782 (SRV), RFC 5952 (IPv6 text).
"""
from __future__ import annotations

import ipaddress

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import dns.message
import dns.name
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rrset

from luaprobe.shm.luajit import new_runtime

LABEL = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-", min_size=1, max_size=12)
NAME = st.lists(LABEL, min_size=1, max_size=4).map(lambda ls: ".".join(ls) + ".")
# names drawn from a few zones, so that dnspython's compression points into earlier names
ZONE = st.sampled_from(["example.com.", "a.example.com.", "example.org.", "x.y.z.net."])
RELNAME = st.one_of(NAME, st.tuples(LABEL, ZONE).map(lambda t: f"{t[0]}.{t[1]}"), ZONE)
TXT = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789 ", min_size=0, max_size=40)

RDATA = st.one_of(
    st.tuples(st.just("A"), st.ip_addresses(v=4).map(str)),
    st.tuples(st.just("AAAA"), st.ip_addresses(v=6).map(str)),
    st.tuples(st.just("CNAME"), RELNAME),
    st.tuples(st.just("NS"), RELNAME),
    st.tuples(st.just("PTR"), RELNAME),
    st.tuples(st.just("MX"), st.tuples(st.integers(0, 65535), RELNAME).map(lambda t: f"{t[0]} {t[1]}")),
    st.tuples(st.just("TXT"), st.lists(TXT, min_size=1, max_size=3).map(lambda ss: " ".join(f'"{s}"' for s in ss))),
    st.tuples(st.just("SRV"), st.tuples(st.integers(0, 65535), st.integers(0, 65535), st.integers(0, 65535),
                                        RELNAME).map(lambda t: "%d %d %d %s" % t)),
    st.tuples(st.just("SOA"), st.tuples(RELNAME, RELNAME, *[st.integers(0, 2**32 - 1)] * 5)
              .map(lambda t: "%s %s %d %d %d %d %d" % t)),
)
RECORD = st.tuples(RELNAME, st.integers(0, 2**31 - 1), RDATA)


@pytest.fixture(scope="module")
def parse():
    lua = new_runtime()
    lua.execute("ffi = require 'ffi'; dnsp = require 'luaprobe.engine.streams.dns'")
    fn = lua.eval("""function(s)
      local n = #s
      local buf = ffi.new('uint8_t[?]', n)          -- exactly n bytes: a read past them is out of bounds
      ffi.copy(buf, s, n)
      local ok, m, err = pcall(dnsp.parse, ffi.cast('const uint8_t *', buf), n)
      if not ok then return 'raised', m end
      if not m then return 'invalid', err end
      local function rrs(list)
        local out = {}
        for i, r in ipairs(list) do out[i] = {r.name, r.type, r.class, r.ttl, r.rdata} end
        return out
      end
      local q = {}
      for i, x in ipairs(m.questions) do q[i] = {x.name, x.type, x.class} end
      return 'ok', {id = m.id, qr = m.qr, opcode = m.opcode, rcode = m.rcode, aa = m.aa, tc = m.tc, rd = m.rd,
                    ra = m.ra, q = q, an = rrs(m.answers), ns = rrs(m.authority), ar = rrs(m.additional)}
    end""")

    def call(wire: bytes):
        status, value = fn(wire)
        return status.decode(), (value.decode("latin-1") if isinstance(value, bytes) else value)
    return call


def _lua_list(t):
    return [t[i] for i in range(1, len(t) + 1)] if t is not None else []


def _rrs(t):
    return [tuple(x.decode("latin-1") if isinstance(x, bytes) else x for x in _lua_list(r)) for r in _lua_list(t)]


def _expected_text(rtype: str, text: str) -> str:
    """dnspython's presentation text in luaprobe's form: names without their trailing dot, IPv6 per RFC 5952."""
    if rtype == "AAAA":
        return ipaddress.IPv6Address(text).compressed
    return " ".join(w[:-1] if w.endswith(".") and len(w) > 1 else w for w in text.split(" ")) \
        if rtype != "TXT" else text


def _message(qname, qtype, flags, sections):
    m = dns.message.Message(id=flags[0])
    m.flags = flags[1]
    m.question.append(dns.rrset.RRset(dns.name.from_text(qname), dns.rdataclass.IN, dns.rdatatype.from_text(qtype)))
    for section, records in zip((m.answer, m.authority, m.additional), sections):
        for owner, ttl, (rtype, text) in records:
            rd = dns.rdata.from_text(dns.rdataclass.IN, dns.rdatatype.from_text(rtype), text)
            rs = dns.rrset.RRset(dns.name.from_text(owner), dns.rdataclass.IN, rd.rdtype)
            rs.add(rd, ttl)
            section.append(rs)
    return m


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(qname=RELNAME, qtype=st.sampled_from(["A", "AAAA", "MX", "TXT", "ANY", "SRV"]),
       flags=st.tuples(st.integers(0, 65535), st.sampled_from([0x0100, 0x8180, 0x8183, 0x8580, 0x8380])),
       sections=st.tuples(*[st.lists(RECORD, max_size=5)] * 3))
def test_parse_reads_back_what_dnspython_wrote(parse, qname, qtype, flags, sections):
    msg = _message(qname, qtype, flags, sections)
    wire = msg.to_wire()
    status, got = parse(wire)
    assert status == "ok", got
    truth = dns.message.from_wire(wire)   # header and question as dnspython reads them back; the records as written
                                          # (from_wire merges equal records into one rrset, the wire keeps each)
    assert got[b"id"] == truth.id
    assert bool(got[b"qr"]) == bool(truth.flags & 0x8000) and got[b"rcode"] == truth.rcode()
    assert (bool(got[b"aa"]), bool(got[b"tc"]), bool(got[b"rd"]), bool(got[b"ra"])) == \
        tuple(bool(truth.flags & f) for f in (0x400, 0x200, 0x100, 0x80))
    assert _rrs(got[b"q"]) == [(q.name.to_text(omit_final_dot=True), q.rdtype, q.rdclass) for q in truth.question]
    for section, mine in ((msg.answer, got[b"an"]), (msg.authority, got[b"ns"]), (msg.additional, got[b"ar"])):
        want = [(rs.name.to_text(omit_final_dot=True), rs.rdtype, rs.rdclass, rs.ttl,
                 _expected_text(dns.rdatatype.to_text(rs.rdtype), rd.to_text()))
                for rs in section for rd in rs]
        assert _rrs(mine) == want


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data(), sections=st.tuples(*[st.lists(RECORD, max_size=3)] * 3), qname=RELNAME)
def test_mutated_messages_never_raise_and_name_an_offset(parse, data, sections, qname):
    wire = bytearray(_message(qname, "A", (1, 0x8180), sections).to_wire())
    for _ in range(data.draw(st.integers(1, 4))):
        op = data.draw(st.sampled_from(["flip", "cut", "pointer"]))
        if op == "cut" or len(wire) < 14:       # a pointer needs 2 bytes after the 12-byte header
            wire = wire[:data.draw(st.integers(0, len(wire)))]
        elif op == "flip":
            wire[data.draw(st.integers(0, len(wire) - 1))] = data.draw(st.integers(0, 255))
        else:                           # a compression pointer anywhere, to anywhere (loops and forward jumps)
            at = data.draw(st.integers(12, len(wire) - 2))
            to = data.draw(st.integers(0, len(wire) + 8))
            wire[at:at + 2] = bytes([0xC0 | (to >> 8) & 0x3F, to & 0xFF])
    status, got = parse(bytes(wire))
    assert status in ("ok", "invalid"), got
    if status == "invalid":
        assert isinstance(got, str) and ("offset" in got or "shorter than the 12-byte header" in got), got


def test_compression_loop_is_refused_with_its_offset(parse):
    """A name whose pointer points at itself (RFC 1035 §4.1.4 allows only earlier offsets): refused, offset named."""
    wire = bytes.fromhex("1234 0100 0001 0000 0000 0000".replace(" ", "")) + b"\xc0\x0c" + b"\x00\x01\x00\x01"
    status, got = parse(wire)
    assert status == "invalid" and "offset 12" in got, got
