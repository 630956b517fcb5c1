"""Built-in analysers (engine/analysers) against independent truth: tshark's dissectors for DNS
answers, HTTP requests/responses, TLS certificate bytes and per-host/MAC/protocol totals; OpenSSL's
command line for certificate subjects; hashlib for fingerprints."""
from __future__ import annotations

import collections
import hashlib
import json
import os
import sqlite3
import subprocess

import pytest

from luaprobe.engine.fastpath.run import FastPath, RunConfig
from tests.helpers import PCAPS

AGGREGATES = "{393B5EBC-AB41-4387-8F31-8077DB917336}"
HOSTS, MAC, APPS, PROTOS = ("{4CD742B1-C1CA-4708-BE78-0FCA2EB01A86}", "{4B09BD22-3B99-40FC-8215-94A430EA0A35}",
                            "{C51B48D4-7876-479E-B0D9-BD9EFF03CE2E}", "{E89BCD56-30AD-40F5-B1C8-8B7683F440BD}")
RES_DNS, RES_URL, RES_SSL = ("{D1E27FF0-6D66-4E57-BB91-99F76BB2143E}", "{4EF9DEB9-4332-4867-A667-6A30C5900E9E}",
                             "{5AEE3F0B-9304-44BE-BBD0-0467052CF468}")
FTS_DNS, FTS_HTTP, FTS_SSL = ("{09B305DF-078C-4B9E-8E2F-EA64B7326880}", "{28217924-E7A5-4523-993C-44B52758D5A8}",
                              "{9FEB8ADE-ADBB-49AD-BC68-C6A02F389C71}")


def pcap(name):
    return os.path.join(PCAPS, name)


def tshark(path, *args) -> list[list[str]]:
    out = subprocess.run(["tshark", "-r", path, "-n", *args], capture_output=True, text=True, check=True).stdout
    return [line.split("\t") for line in out.splitlines() if line]


def run(tmp_path, files, analysers="all", plugins=None, name="out", **kw):
    d = tmp_path / (name + "-plugins")
    d.mkdir(exist_ok=True)
    if plugins is None:
        (d / "noop.lua").write_text('TrisulPlugin = { id = { name = "noop" } }\n')
        plugins = [str(d)]
    out = str(tmp_path / name)
    summary = FastPath(RunConfig(plugins=plugins, files=[pcap(f) for f in files], out_dir=out,
                                 analysers=analysers, **kw)).run()
    return summary, sqlite3.connect(os.path.join(out, "luaprobe.sqlite"))


@pytest.fixture(scope="module")
def trisul16(tmp_path_factory):
    return run(tmp_path_factory.mktemp("t16"), ["trisul-16minutes.pcap"], analysers="counters")


# ------------------------------------------------------------------ counters

def totals(db, guid, meter):
    return dict(db.execute("SELECT key, sum(value) FROM counters WHERE group_guid = ? AND meter = ? GROUP BY key",
                           (guid, meter)).fetchall())


def ip_key(a):
    return ".".join(f"{int(x):02X}" for x in a.split("."))


def test_hosts_match_tshark_endpoints(trisul16):
    """Hosts: meter 0 bytes, 1 received, 2 transmitted, 3 packets per IPv4 host == tshark's ip endpoints."""
    _, db = trisul16
    want = {}
    for line in subprocess.run(["tshark", "-r", pcap("trisul-16minutes.pcap"), "-n", "-q", "-z", "endpoints,ip"],
                               capture_output=True, text=True, check=True).stdout.splitlines():
        f = line.split()
        if len(f) >= 7 and f[0].count(".") == 3 and f[1].isdigit():
            # Address Packets Bytes TxPackets TxBytes RxPackets RxBytes
            want[ip_key(f[0])] = tuple(int(x) for x in f[1:7])
    assert len(want) > 10
    got_b, got_p = totals(db, HOSTS, 0), totals(db, HOSTS, 3)
    got_tx, got_rx = totals(db, HOSTS, 2), totals(db, HOSTS, 1)
    assert set(got_b) == set(want)
    for k, (pk, by, _txp, txb, _rxp, rxb) in want.items():
        assert (got_p[k], got_b[k], got_tx.get(k, 0), got_rx.get(k, 0)) == (pk, by, txb, rxb), k


def test_mac_protocols_apps_match_tshark(trisul16):
    _, db = trisul16
    rows = tshark(pcap("trisul-16minutes.pcap"), "-T", "fields", "-e", "frame.len", "-e", "eth.src", "-e", "eth.dst",
                  "-e", "ip.proto", "-e", "tcp.srcport", "-e", "tcp.dstport", "-e", "udp.srcport", "-e", "udp.dstport",
                  "-e", "ip.flags.mf", "-e", "ip.frag_offset")
    tx, rx, pb, pp, apps = (collections.Counter() for _ in range(5))
    for r in rows:
        r += [""] * (10 - len(r))
        n = int(r[0])
        tx[r[1].upper()] += n
        rx[r[2].upper()] += n
        if r[3]:
            proto = f"{int(r[3].split(',')[0]):02X}"
            pb[proto] += n
            pp[proto] += 1
            ports = (r[4], r[5]) if r[4] else (r[6], r[7])
            if ports[0] and r[8] != "1" and r[9] in ("", "0"):
                apps[f"p-{min(int(ports[0]), int(ports[1])):04X}"] += n
    assert totals(db, MAC, 0) == dict(tx)
    assert totals(db, MAC, 1) == dict(rx)
    assert totals(db, PROTOS, 0) == dict(pb)
    assert totals(db, PROTOS, 1) == dict(pp)
    assert totals(db, APPS, 0) == dict(apps)
    groups = dict(db.execute("SELECT guid, name FROM counter_groups").fetchall())
    assert groups[HOSTS] == "Hosts" and groups[MAC] == "Mac"


# ------------------------------------------------------------------ DNS

def _fragmented_dns(path):
    """DNS responses too big for one frame, in IPv4 fragments (in order and reversed) and IPv6 fragments, and one
    in a single frame (pktbuild; RFC 1035 message layout)."""
    import struct
    from tests import pktbuild as pb
    frames, t = [], [1700000000.0]

    def add(ip, src=pb.SMAC, dst=pb.CMAC):
        t[0] += 0.001
        frames.append((t[0], pb.ether(ip, src, dst)))

    def response(qid, n):
        q = b"".join(bytes([len(x)]) + x.encode() for x in ("big", "example", "net")) + b"\0"
        answers = b"".join(b"\xc0\x0c" + struct.pack("!HHIH", 1, 1, 60 + i, 4) + bytes([10, 1, i // 256, i % 256])
                           for i in range(n))
        return struct.pack("!HHHHHH", qid, 0x8180, 1, n, 0, 0) + q + struct.pack("!HH", 1, 1) + answers

    c, s, c6, s6 = "192.0.2.10", "198.51.100.53", "2001:db8::10", "2001:db8::53"
    for k, (n, how) in enumerate(((100, "v4"), (60, "v4 reversed"), (80, "v6"), (30, "whole"))):
        msg = pb.udp(s6 if how == "v6" else s, c6 if how == "v6" else c, 53, 34000 + k, response(k, n))
        if how == "v6":
            for f in pb.frag6(s6, c6, 17, msg, 0x4000 + k, 512):
                add(f)
        elif how == "whole":
            add(pb.ipv4(s, c, 17, msg))
        else:
            frags = pb.frag4(pb.ipv4(s, c, 17, msg, ident=900 + k, flags_off=0), 504)
            for f in (reversed(frags) if "reversed" in how else frags):
                add(f)
    pb.write_pcap(path, frames)


def test_dns_in_ip_fragments_and_counters_count_frames_once(tmp_path):
    """A DNS response in IP fragments is reassembled (engine/fastpath/ipreasm.lua) and parsed once, as tshark does;
    the counters count each fragment frame once and not the reassembled datagram again (Aggregates: every frame).
    Truth: tshark's DNS answers, frame count and bytes."""
    cap = str(tmp_path / "dns-frags.pcap")
    _fragmented_dns(cap)
    check_dns_answers(tmp_path, cap)
    _, db = run(tmp_path, [cap], analysers="counters", name="counters")
    frames = tshark(cap, "-T", "fields", "-e", "frame.len")
    assert totals(db, AGGREGATES, 1) == {"TOTALBW": len(frames)}
    assert totals(db, AGGREGATES, 0) == {"TOTALBW": sum(int(x) for (x,) in frames)}
    v4 = len(tshark(cap, "-Y", "ip", "-T", "fields", "-e", "frame.number"))
    assert totals(db, HOSTS, 3) == {ip_key("192.0.2.10"): v4, ip_key("198.51.100.53"): v4}

@pytest.mark.parametrize("name", ["dns-udp-a-aaaa-mx.pcap", "mix-wikipedia-dns-http.pcap", "trisul-16minutes.pcap"])
def test_dns_answers_match_tshark(tmp_path, name):
    """One DNS resource per answer record: (question, owner, type, TTL) and A/AAAA data == tshark's."""
    check_dns_answers(tmp_path, name)


def check_dns_answers(tmp_path, name):
    rows = tshark(pcap(name), "-Y", "udp.port == 53 && dns.flags.response == 1", "-T", "fields",
                  "-E", "occurrence=a", "-E", "aggregator=|", "-e", "dns.qry.name", "-e", "dns.count.answers",
                  "-e", "dns.resp.name", "-e", "dns.resp.type", "-e", "dns.resp.ttl", "-e", "dns.a", "-e", "dns.aaaa")
    want, want_a = collections.Counter(), collections.Counter()
    for r in rows:
        r += [""] * (7 - len(r))
        n = int(r[1])
        names, types, ttls = (r[i].split("|")[:n] for i in (2, 3, 4))
        for nm, t, ttl in zip(names, types, ttls):
            want[(r[0].split("|")[0], nm, int(t), int(ttl))] += 1
        data = {"1": iter(r[5].split("|")), "28": iter(r[6].split("|"))}   # in record order, all sections
        for i, t in enumerate(r[3].split("|")):
            if t in data:
                a = next(data[t])
                if i < n:
                    want_a[a] += 1
    _, db = run(tmp_path, [name], analysers="dns")
    got, got_a = collections.Counter(), collections.Counter()
    types = {"A": 1, "NS": 2, "CNAME": 5, "SOA": 6, "PTR": 12, "MX": 15, "TXT": 16, "AAAA": 28, "SRV": 33}
    for uri, contents in db.execute("SELECT uri, contents FROM resources WHERE resource_guid = ?", (RES_DNS,)):
        owner, ttl, _cls, typ, rdata = contents.split("\t")
        got[(uri, owner.rstrip("."), types[typ] if typ in types else int(typ.replace("TYPE", "")), int(ttl))] += 1
        if typ in ("A", "AAAA"):
            got_a[rdata] += 1
    assert sum(want.values()) > 0
    assert got == want
    assert got_a == want_a
    ndns = len(tshark(pcap(name), "-Y", "udp.port == 53 && dns", "-T", "fields", "-e", "frame.number"))
    docs = [t for (t,) in db.execute("SELECT text FROM fts WHERE fts_guid = ?", (FTS_DNS,))]
    assert len(docs) == ndns
    assert sum(d.startswith("RESPONSE") for d in docs) == len(rows)


def test_dns_fts_feeds_real_trisul_patterns(tmp_path):
    """The patterns of cu-dns-extractor.lua / passive-dns-creator.lua find the question and the A answers."""
    import re
    _, db = run(tmp_path, ["dns-udp-a-aaaa-mx.pcap"], analysers="dns")
    doc = [t for (t,) in db.execute("SELECT text FROM fts WHERE fts_guid = ? AND text LIKE 'RESPONSE%'", (FTS_DNS,))][0]
    assert re.search(r"Questions\s*\.([.\w-]*)\s*A\s*IN", doc).group(1) == "google.com"
    a = re.findall(r"A\s*IN\s*([\d.]+)", doc)
    want = [r[0] for r in tshark(pcap("dns-udp-a-aaaa-mx.pcap"), "-Y", "dns.a", "-T", "fields", "-E", "occurrence=a",
                                 "-E", "separator=,", "-e", "dns.a")][0].split(",")
    assert a == want


# ------------------------------------------------------------------ HTTP

HTTP_CAPTURES = ["mix-wikipedia-dns-http.pcap", "http-get-text.pcap", "http-pipelined-mozilla.pcap",
                 "http-keepalive-splunk-ui.pcap", "trisul-16minutes.pcap"]


@pytest.mark.parametrize("name", HTTP_CAPTURES)
def test_url_resources_match_tshark(tmp_path, name):
    """URL resources: (method, host, URI, status, response time in usec) == tshark's http request/response pairs.
    The response time ends at the response's header (tshark without body reassembly), as luaprobe measures it."""
    req = {}
    for r in tshark(pcap(name), "-Y", "http.request", "-T", "fields", "-e", "frame.number", "-e", "http.request.method",
                    "-e", "http.host", "-e", "http.request.uri", "-e", "ip.dst", "-e", "ipv6.dst"):
        r += [""] * (6 - len(r))
        req[r[0]] = [r[1], r[2] or r[4] or r[5], r[3]]       # no Host header: the server's address
    want = collections.Counter()
    answered = set()
    for r in tshark(pcap(name), "-o", "http.desegment_body:FALSE", "-Y", "http.response && http.response.code >= 200",
                    "-T", "fields",
                    "-e", "http.request_in", "-e", "http.response.code", "-e", "http.time"):
        if r[0] in req and float(r[2]) <= 120:    # later than the 120 s idle timeout: a new flow
            m, h, u = (req[r[0]] + ["", "", ""])[:3]
            want[(m, h, u, f"status:{r[1]} usec:{round(float(r[2]) * 1e6)}")] += 1
            answered.add(r[0])
    for f, (m, h, u, *_) in ((f, v + [""] * 3) for f, v in req.items()):
        if f not in answered:
            want[(m, h, u, "status:0")] += 1
    summary, db = run(tmp_path, [name], analysers="http")
    got = collections.Counter()
    for uri, label in db.execute("SELECT uri, contents FROM resources WHERE resource_guid = ?", (RES_URL,)):
        m, h, u = uri.split(" ", 2)
        got[(m, h, u, label)] += 1
    assert sum(want.values()) > 0
    assert got == want


def test_http_header_fts_match_tshark(tmp_path):
    name = "mix-wikipedia-dns-http.pcap"
    want = collections.Counter()
    for r in tshark(pcap(name), "-Y", "http.request", "-T", "fields", "-e", "http.request.method",
                    "-e", "http.request.uri", "-e", "http.request.version"):
        want[" ".join(r)] += 1
    for r in tshark(pcap(name), "-Y", "http.response", "-T", "fields", "-e", "http.response.version",
                    "-e", "http.response.code", "-e", "http.response.phrase"):
        want[" ".join(r)] += 1
    _, db = run(tmp_path, [name], analysers="http")
    docs = [t for (t,) in db.execute("SELECT text FROM fts WHERE fts_guid = ?", (FTS_HTTP,))]
    assert collections.Counter(d.split("\r\n", 1)[0] for d in docs) == want
    host = [r[0] for r in tshark(pcap(name), "-Y", "http.request", "-T", "fields", "-e", "http.host")]
    assert sorted(host) == sorted(d.split("Host: ", 1)[1].split("\r\n", 1)[0] for d in docs if "Host: " in d)


# ------------------------------------------------------------------ TLS

@pytest.mark.parametrize("name", ["tls12-handshake.pcap", "mix-eth-tls-http-dns.pcap"])
def test_tls_chains_match_tshark_and_openssl(tmp_path, name):
    """The chain each server sent: count, SHA-1/SHA-256 of every certificate (hashlib over tshark's bytes),
    the leaf's subject and issuer as OpenSSL's CLI prints them."""
    chains = []
    for (certs,) in tshark(pcap(name), "-Y", "tls.handshake.certificate", "-T", "fields", "-E", "occurrence=a",
                           "-E", "aggregator=,", "-e", "tls.handshake.certificate"):
        chains.append([bytes.fromhex(c.replace(":", "")) for c in certs.split(",")])
    assert chains
    _, db = run(tmp_path, [name], analysers="tls")
    res = db.execute("SELECT uri, contents FROM resources WHERE resource_guid = ? ORDER BY id", (RES_SSL,)).fetchall()
    docs = [t for (t,) in db.execute("SELECT text FROM fts WHERE fts_guid = ? ORDER BY id", (FTS_SSL,))]
    assert len(res) == len(docs) == len(chains)
    for chain, (uri, label), doc in zip(chains, res, docs):
        leaf = chain[0]
        assert f"SHA1:{hashlib.sha1(leaf).hexdigest().upper()}" in uri
        assert uri.endswith(f"SHA256:{hashlib.sha256(leaf).hexdigest().upper()}")
        assert label.count("-----BEGIN CERTIFICATE-----") == len(chain)
        sha1s = [x.split("=")[1].replace(":", "") for x in doc.splitlines() if x.startswith("SHA1 Fingerprint=")]
        assert sha1s == [hashlib.sha1(c).hexdigest().upper() for c in chain]
        subj = subprocess.run(["openssl", "x509", "-inform", "DER", "-noout", "-subject", "-issuer"], input=leaf,
                              capture_output=True, check=True).stdout.decode().splitlines()
        assert uri.startswith(subj[0].split("=", 1)[1].strip() + " ISSUER:" + subj[1].split("=", 1)[1].strip() + " ")


def test_no_analysers_no_vm(tmp_path):
    """Nothing asked for: no analysers VM, no built-in rows."""
    summary, db = run(tmp_path, ["dns-udp-a-aaaa-mx.pcap"], analysers="")
    assert summary["analysers"] == {}
    assert db.execute("SELECT count(*) FROM resources").fetchone()[0] == 0
    assert db.execute("SELECT count(*) FROM counters").fetchone()[0] == 0


def test_bad_analyser_name(tmp_path):
    from luaprobe.engine.analysers import parse_names
    with pytest.raises(ValueError, match="unknown analyser 'dnz'"):
        parse_names("dns,dnz")
    assert json.dumps(sorted(parse_names("all"))) == '["counters", "dns", "http", "tls"]'


@pytest.mark.parametrize("spec, fragment", [("all,dns", "'all' stands alone"), ("dns,none", "'none' stands alone"),
                                            ("dns,", "an empty name"), ("dns,,http", "an empty name")])
def test_analyser_lists_with_whole_value_words_or_empty_names(spec, fragment):
    """Before: "unknown analyser 'all' (known: all, none, ...)" contradicted itself, and "dns," named analyser ''."""
    from luaprobe.engine.analysers import parse_names
    with pytest.raises(ValueError, match=fragment) as e:
        parse_names(spec)
    assert "unknown analyser" not in str(e.value)
    assert parse_names(" DNS , http ") == {"dns", "http"}


def test_analysers_alone_without_a_plugin(tmp_path):
    """docs/plugins.md: `luaprobe run --analysers ...` stores the analysers' output even without scripts: no PLUGIN
    is needed then (exit 0, the DNS answers tshark shows); without PLUGIN and without an analyser it is a usage
    error (exit 2, one line, nothing created)."""
    import sys
    cap = pcap("dns-udp-a-aaaa-mx.pcap")
    cli = [sys.executable, "-m", "luaprobe.engine.daemon.cli", "run", "--pcap", cap]
    r = subprocess.run(cli + ["--analysers", "dns", "--out", str(tmp_path / "a")], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    answers = sum(int(n) for (n,) in tshark(cap, "-Y", "dns.flags.response == 1", "-T", "fields", "-e",
                                            "dns.count.answers"))
    db = sqlite3.connect(tmp_path / "a" / "luaprobe.sqlite")
    assert db.execute("SELECT count(*) FROM resources WHERE resource_guid = ?", (RES_DNS,)).fetchone() == (answers,)
    db.close()
    for extra in ([], ["--analysers", "none"]):
        r = subprocess.run(cli + extra + ["--out", str(tmp_path / "b")], capture_output=True, text=True, timeout=120)
        assert r.returncode == 2 and r.stderr.strip().startswith("luaprobe run: give a PLUGIN"), r.stderr
        assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "b").exists()


def test_dns_records_before_a_bad_one_are_kept(tmp_path):
    """A response whose third answer's owner name is a compression pointer to itself (a loop, RFC 1035 §4.1.4):
    the message is malformed (counted in dns_errors, not dns_messages), but its question and the two answers before
    the bad record still give their resources and the message's FTS document.  Before, the whole message was
    dropped.  Truth: tshark's dns.a of the response (tshark also reads the bad record's data past its looping name;
    luaprobe stops at the bad record, docs/plugins.md)."""
    import struct
    from tests import pktbuild as pb
    q = b"".join(bytes([len(x)]) + x.encode() for x in ("loop", "example", "net")) + b"\0"
    head = struct.pack("!HHHHHH", 0x4242, 0x8180, 1, 3, 0, 0) + q + struct.pack("!HH", 1, 1)
    good = b"".join(b"\xc0\x0c" + struct.pack("!HHIH", 1, 1, 300, 4) + bytes([192, 0, 2, i]) for i in (1, 2))
    at = len(head) + len(good)                                  # the bad record's owner points at itself
    bad = struct.pack("!H", 0xC000 | at) + struct.pack("!HHIH", 1, 1, 300, 4) + bytes([192, 0, 2, 3])
    msg = head + good + bad
    cap = str(tmp_path / "dns-loop.pcap")
    query = struct.pack("!HHHHHH", 0x4242, 0x0100, 1, 0, 0, 0) + q + struct.pack("!HH", 1, 1)
    pb.write_pcap(cap, [(1700000000.0, pb.ether(pb.ipv4("192.0.2.10", "198.51.100.53", 17,
                                                            pb.udp("192.0.2.10", "198.51.100.53", 40000, 53, query)))),
                        (1700000000.01, pb.ether(pb.ipv4("198.51.100.53", "192.0.2.10", 17,
                                                             pb.udp("198.51.100.53", "192.0.2.10", 53, 40000, msg)),
                                                 pb.SMAC, pb.CMAC))])
    truth = [a for (r,) in tshark(cap, "-Y", "dns.flags.response == 1", "-T", "fields", "-E", "occurrence=a",
                                  "-E", "aggregator=|", "-e", "dns.a") for a in r.split("|") if a]
    assert truth == ["192.0.2.1", "192.0.2.2", "192.0.2.3"]     # tshark reads on past the looping name
    summary, db = run(tmp_path, [cap], analysers="dns")
    rows = db.execute("SELECT uri, contents FROM resources WHERE resource_guid = ?", (RES_DNS,)).fetchall()
    got = sorted((uri, (c.decode() if isinstance(c, bytes) else c).split("\t")[-1]) for uri, c in rows)
    assert got == [("loop.example.net", a) for a in truth[:2]]  # the records before the bad one
    docs = [t for (t,) in db.execute("SELECT text FROM fts WHERE fts_guid = ?", (FTS_DNS,))]
    assert len(docs) == 2 and sum(d.startswith("RESPONSE") for d in docs) == 1   # the query and the partial response
    st = summary["analysers"]
    assert (st["dns_messages"], st["dns_errors"], st["dns_records"]) == (1, 1, 2)   # the query whole, the response not


HEADER_ATTR = r"""
TrisulPlugin = { id = { name = "headers" }, reassembly_handler = {
  onattribute = function(engine, ts, flow, name, value)
    if name == "HTTP-Header" then
      local f = assert(io.open("%s", "ab")); f:write(("%%08d"):format(#value), value); f:close()
    end
  end } }
"""


@pytest.mark.parametrize("eol", ["crlf", "lf", "latin1"])
def test_http_header_blocks_are_the_bytes_as_sent(tmp_path, eol):
    r"""The HTTP-Header attribute is "the header block as sent, up to and including the blank line" and the HTTP
    headers FTS document "the bytes as sent, start line to the last header line (CRLFs kept, blank line
    excluded)" (docs/plugins.md). Before: the attribute was the block cut at the last line's LF plus "\r\n\r\n"
    ("Host: h\r\r\n\r\n", and CRLFs added to a bare-LF message), the document lacked the last line's LF, and a
    byte that is not UTF-8 (a Latin-1 header value) became U+FFFD in it (docs/schema.md: \xNN escapes). Truth:
    tshark's TCP payload of the segment carrying each header block (one block per segment here)."""
    from tests import pktbuild as pb
    nl = b"\n" if eol == "lf" else b"\r\n"
    val = b"caf\xe9" if eol == "latin1" else b"plain"
    req = b"GET /h.txt HTTP/1.1" + nl + b"Host: files.example" + nl + b"X-Note: " + val + nl + nl
    resp = b"HTTP/1.1 200 OK" + nl + b"Content-Type: text/plain" + nl + b"Content-Length: 5" + nl + nl
    c = pb.Conv(cport=47700)
    c.handshake()
    c.send(True, req)
    c.send(False, resp + b"hello")
    c.close()
    cap = str(tmp_path / "h.pcap")
    pb.write_pcap(cap, c.frames)
    payloads = [bytes.fromhex(p) for (p,) in tshark(cap, "-Y", "tcp.len > 0", "-T", "fields", "-e", "tcp.payload")]
    blocks = [p[:p.index(nl + nl) + 2 * len(nl)] for p in payloads]
    assert blocks == [req, resp]
    attrs = tmp_path / "attrs.bin"
    d = tmp_path / "plugins"
    d.mkdir()
    (d / "headers.lua").write_text(HEADER_ATTR % attrs)
    _, db = run(tmp_path, [cap], analysers="http", plugins=[str(d)])
    raw, got = attrs.read_bytes(), []
    while raw:
        n = int(raw[:8])
        got.append(raw[8:8 + n])
        raw = raw[8 + n:]
    assert got == blocks
    db.text_factory = bytes
    docs = [t for (t,) in db.execute("SELECT text FROM fts WHERE fts_guid = ? ORDER BY id", (FTS_HTTP,))]
    want = [b[:-len(nl)].decode("utf-8", "backslashreplace").encode() for b in blocks]
    assert docs == want and all("\ufffd".encode() not in t for t in docs)


def _records(path) -> tuple[bytes, list[tuple[int, int, bytes]]]:
    """A little-endian µs pcap's global header and its records [(sec, usec, header tail + data)]."""
    import struct
    b = open(path, "rb").read()
    assert b[:4] == b"\xd4\xc3\xb2\xa1"
    out, off = [], 24
    while off < len(b):
        sec, usec, incl = struct.unpack_from("<III", b, off)
        out.append((sec, usec, b[off + 8:off + 16 + incl]))
        off += 16 + incl
    return b[:24], out


def _write(path, header: bytes, records) -> None:
    import struct
    with open(path, "wb") as f:
        f.write(header)
        for sec, usec, rest in records:
            f.write(struct.pack("<II", sec, usec) + rest)


@pytest.mark.parametrize("shards", ["1", "2", "3"])
@pytest.mark.parametrize("gap", ["idle", "end"])
def test_unanswered_request_s_url_time_is_the_same_with_shards(tmp_path, shards, gap):
    """An HTTP request that is never answered (http-get-text.pcap cut after its request, then
    http-website-keepalive.pcap's 13 flows) gives a status:0 URL when its flow ends, stamped with the probe's packet
    time then, whatever the number of shards: `idle`, the keep-alive capture as it is (10 months later): at the first
    frame after the flow's 120 s of silence; `end`, the keep-alive capture moved to 5 s after the request: at the end
    of input, the time of the first frame of the last second (the last tick, which every shard knows).  Truth: tshark's
    frame times of the file built.  Before, the analysers ended idle flows in the seconds of a process's own packets
    and at the end with its own last packet's time: --shards 2 and 3 stamped both 1362692527.008509, the request flow's
    own last frame (the shard owning it had no other packet), in a bucket 10 months (idle) or 22 s (end) earlier."""
    header, cut = _records(pcap("http-get-text.pcap"))
    _, ka = _records(pcap("http-website-keepalive.pcap"))
    cut = cut[:5]                                    # SYN, SYN-ACK, ACK, GET, the server's ACK: no response
    if gap == "end":
        shift = cut[-1][0] + 5 - ka[0][0]
        ka = [(s + shift, u, rest) for s, u, rest in ka]
    built = tmp_path / "built.pcap"
    _write(built, header, cut + ka)
    times = [float(t) for (t,) in tshark(str(built), "-T", "fields", "-e", "frame.time_epoch")]
    last = max(times[:5])                            # the request flow's last frame (the server's ACK)
    if gap == "idle":
        want = min(t for t in times if t > last + 120)
    else:
        want = min(t for t in times if int(t) == int(times[-1]))
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    (plugins / "noop.lua").write_text('TrisulPlugin = { id = { name = "noop" } }\n')
    out = tmp_path / "out"
    from .test_fastpath import cli
    r = cli("run", str(plugins), "--pcap", str(built), "--out", str(out), "-q", "--analysers", "http",
            "--shards", shards)
    assert r.returncode == 0, r.stderr
    with sqlite3.connect(f"file:{out / 'luaprobe.sqlite'}?mode=ro", uri=True) as db:
        got = db.execute("SELECT ts_sec, ts_usec, uri FROM resources WHERE resource_guid = ? AND contents = 'status:0'",
                         (RES_URL,)).fetchall()
    assert [(s + u / 1e6, uri) for s, u, uri in got] == \
        [(pytest.approx(want, abs=1e-6), "GET bro.org /download/CHANGES.bro-aux.txt")]
