"""Inputs from other tools' bug reports (issue 12): every case of ../shared/cases, copied into
tests/data/cases/ (sources in tests/data/cases/README.md), gives its expected result; and more
inputs of each KIND, generated here (IPv6 as well as IPv4, the other direction, other spellings).

Truth: the expected values of each case.md (tshark 4.0.17 / Python's gzip, as the case says), and
for generated inputs the bytes the generator put in (hashlib), checked against tshark where it agrees.
"""
from __future__ import annotations

import collections
import gzip
import hashlib
import json
import os
import re
import sqlite3
import struct
import subprocess
import sys
import zlib

import hypothesis
import pytest

from tests import helpers
from tests import pktbuild as pb

CASES = os.path.join(helpers.REPO, "tests", "data", "cases")
SHA = lambda b: hashlib.sha256(b).hexdigest()  # noqa: E731


def luaprobe_run(plugin, pcap, out):
    """`luaprobe run` as a user runs it; returns (stdout+stderr text, summary dict from --json)."""
    import json
    exe = os.path.join(os.path.dirname(sys.executable), "luaprobe")
    r = subprocess.run([exe, "run", plugin, "--pcap", pcap, "--out", str(out), "--json"],
                       capture_output=True, text=True, timeout=120, cwd=helpers.REPO)
    assert r.returncode == 0, r.stderr
    text = r.stdout + r.stderr
    summary = json.loads(r.stdout[re.search(r"^\{$", r.stdout, re.M).start():])
    return text, summary


def probe_files(text):
    """FILE lines of a case's probe.lua: [{method, uri_len, uri, status, length, sha256, flow}]."""
    out = []
    for line in text.splitlines():
        m = re.search(r"FILE \d+ (.*)", line)
        if m:
            out.append(dict(kv.split("=", 1) for kv in m.group(1).split(" ")))
    return out


def census(text):
    """The SUMMARY line of the simplecounter VM of probe.lua (the one with onpacket > 0)."""
    for line in text.splitlines():
        m = re.search(r"SUMMARY (onpacket=\d+ .*)", line)
        if m:
            d = {k: int(v) for k, v in (kv.split("=") for kv in m.group(1).split(" "))}
            if d["onpacket"] > 0:
                return d
    return None


def flows(out):
    db = sqlite3.connect(os.path.join(out, "luaprobe.sqlite"))
    try:
        return db.execute("SELECT flowkey, packets_az + packets_za, state FROM flows ORDER BY flowkey").fetchall()
    finally:
        db.close()


def case(name):
    """(probe plug-in, input capture) of a case: its own probe.lua if it has one (13), else the shared census probe
    (the cases' probe.lua files were identical, so one copy stands for them)."""
    d = os.path.join(CASES, name)
    own = os.path.join(d, "probe.lua")
    return (own if os.path.exists(own) else os.path.join(CASES, "probe.lua")), os.path.join(d, "input.pcap")


# ============================================================================ the shared cases

def test_case01_fcs_linktype(tmp_path):
    text, s = luaprobe_run(*case("01-pcap-fcs-linktype"), tmp_path / "o")
    assert census(text) == {"onpacket": 10, "eth": 10, "ipv4": 10, "ipv6": 0, "tcp": 10, "udp": 0, "files": 0}
    (f,) = probe_files(text)
    assert (f["uri"], f["length"]) == ("/fcs.txt", "912")
    assert f["sha256"] == "f2134ab2f5b7a3e1b9ae149b63594f548d277340f9a22f71abf64b34981d4cff"
    assert len(flows(tmp_path / "o")) == 1 and s["unknown_linktype_packets"] == 0


def test_case02_ipv4_fragments_reversed(tmp_path):
    text, s = luaprobe_run(*case("02-ipv4-frags-reversed-http"), tmp_path / "o")
    (f,) = probe_files(text)
    assert (f["uri"], f["length"]) == ("/frag.bin", "2560")
    assert f["sha256"] == "e392378f849d67bbb1a7bbec84f1098ae3faa751049c009a850130ce6073d91a"
    assert flows(tmp_path / "o") == [("06A:C0.00.02.0A:p-A029_C6.33.64.14:p-0050", 12, "CLOSED")]
    # Ethernet/IPv4 hooks see all 12 captured packets; the 3 fragments carry no TCP layer
    assert census(text) == {"onpacket": 12, "eth": 12, "ipv4": 12, "ipv6": 0, "tcp": 9, "udp": 0, "files": 0}
    assert s["packets"] == 12 and s["ip_reassembly"]["fragments"] == 3 and s["ip_reassembly"]["datagrams"] == 1


def test_case03_ack_before_data(tmp_path):
    text, _ = luaprobe_run(*case("03-tcp-ack-before-data"), tmp_path / "o")
    (f,) = probe_files(text)
    assert (f["uri"], f["length"]) == ("/mirror.bin", "4000")
    assert f["sha256"] == "f07b0629fa7df1e6894f9c2e1f0dbd93e6db9c4729ec3cdc64d3d93167bb42fa"


def test_case04_port_reuse_without_close(tmp_path):
    text, _ = luaprobe_run(*case("04-tcp-port-reuse-no-close"), tmp_path / "o")
    files = [(f["uri"], f["length"], f["sha256"]) for f in probe_files(text)]
    assert files == [("/one.txt", "660", "684a28f13e43564b69705a50d016a0331c8d313cbb6002772422f9d025c4f4f8"),
                     ("/two.txt", "690", "e6330703948f4f11d050bdf01633b5818c837b751268a913507d135cccedb78a")]
    # tshark 4.0.17: two tcp.streams of 7 and 10 packets; the first never closed
    assert sorted((n, st) for _, n, st in flows(tmp_path / "o")) == [(7, "REUSED"), (10, "CLOSED")]


def test_case08_gzip_multimember(tmp_path):
    text, _ = luaprobe_run(*case("08-http-gzip-multimember"), tmp_path / "o")
    (f,) = probe_files(text)
    assert (f["uri"], f["length"]) == ("/logs/app.log", "3631")
    assert f["sha256"] == "b05eba393490e1888d38566c8d2d49dba29efa502e2fc8d36773f032892d4d21"


def test_case11_long_request_line(tmp_path):
    text, _ = luaprobe_run(*case("11-http-long-request-line"), tmp_path / "o")
    (f,) = probe_files(text)
    assert (f["method"], f["uri_len"], f["uri"]) == ("GET", "6010", "/search?q=" + "x" * 30)
    assert f["length"] == "600"
    assert f["sha256"] == "682c1a9b6770541c197fbbd22676e4b70219a0c0a2747b687079f3f86876e61c"


# ============================================================================ more of each kind

RECORD = r"""
local OUT = "%(out)s"
local function rec(...)
  local f = assert(io.open(OUT, "a"))
  local t = {...}
  for i = 1, select("#", ...) do t[i] = tostring(t[i]) end
  f:write(table.concat(t, "\t"), "\n"); f:close()
end
local G = { tcp = "{77E462AB-2E42-42ec-9A58-C1A6821D6B31}", ipv4 = "{0A2C724B-5B9F-4ba6-9C97-B05080558574}",
            ipv6 = "{85C0CCED-DA8D-4029-924A-A6AB87F62EF8}", eth = "{974FB098-DE46-45db-94DA-8D64A3BBCDE5}" }
local n = { tcp = 0, ip = 0 }
TrisulPlugin = {
  id = { name = "kinds" },
  filex_monitor = {
    onfile_http = function(engine, ts, flow, path, req, resp, length, is_chunk, incomplete)
      local f = assert(io.open(path, "rb")); local body = f:read("*a"); f:close()
      rec("FILE", req:get_method(), req:get_path(), resp and resp:get_status() or 0, #body,
          require("luaprobe.engine.plugins.sha256").hex(body), flow:id(), incomplete)
    end,
  },
}
"""

COUNT_TCP = r"""
TrisulPlugin = { id = { name = "count %(name)s" },
  simplecounter = { protocol_guid = "%(guid)s",
    onpacket = function(engine, layer)
      local f = assert(io.open("%(out)s", "a")); f:write("%(name)s\t", layer:packet():wire_length(), "\n"); f:close()
    end } }
"""


def run_kinds(tmp_path, frames_or_pcap, name="k", counters=(), cfg=None, **pcap_kw):
    """Run the recording plug-in (+ simplecounters named in counters: 'tcp', 'ipv4', ...) over a
    generated capture; returns (file records, {counter: [wirelen...]}, summary, out dir)."""
    from luaprobe.engine.fastpath.run import FastPath, RunConfig
    if isinstance(frames_or_pcap, str):
        pcap = frames_or_pcap
    else:
        pcap = str(tmp_path / f"{name}.pcap")
        pb.write_pcap(pcap, frames_or_pcap, **pcap_kw)
    rec = tmp_path / f"{name}.tsv"
    plugins = [tmp_path / f"{name}.lua"]
    plugins[0].write_text(RECORD % {"out": str(rec)})
    guids = {"tcp": "{77E462AB-2E42-42ec-9A58-C1A6821D6B31}", "ipv4": "{0A2C724B-5B9F-4ba6-9C97-B05080558574}",
             "ipv6": "{85C0CCED-DA8D-4029-924A-A6AB87F62EF8}", "eth": "{974FB098-DE46-45db-94DA-8D64A3BBCDE5}",
             "udp": "{14D7AB53-CC51-47e9-8814-9C06AAE60189}"}
    for c in counters:
        p = tmp_path / f"{name}-{c}.lua"
        p.write_text(COUNT_TCP % {"name": c, "guid": guids[c], "out": str(rec)})
        plugins.append(p)
    out = str(tmp_path / f"{name}.out")
    s = FastPath(RunConfig(plugins=[str(p) for p in plugins], files=[pcap], out_dir=out, **(cfg or {}))).run()
    assert s["input_errors"] == [] and s["plugin_problems"] == []
    for p in s["plugins"]:
        assert p["hook_errors"] == {}, p
    files, counts = [], {c: [] for c in counters}
    if rec.exists():
        for line in rec.read_text().splitlines():
            f = line.split("\t")
            if f[0] == "FILE":
                files.append(tuple(f[1:]))
            else:
                counts[f[0]].append(int(f[1]))
    return files, counts, s, out


def tshark_http_object(tmp_path, frames, name: str, out_of_order: bool = True) -> bytes:
    """The HTTP object `name` as tshark exports it (--export-objects http) from `frames` written as a pcap: the
    independent truth of the kind tests.  ``out_of_order``: tshark's TCP out-of-order reassembly on (off by default)."""
    pcap = str(tmp_path / "t.pcap")
    pb.write_pcap(pcap, frames)
    opts = ["-o", "tcp.reassemble_out_of_order:TRUE"] if out_of_order else []
    subprocess.run(["tshark", *opts, "-r", pcap, "-q", "--export-objects", f"http,{tmp_path / 'objs'}"],
                   capture_output=True, check=True)
    with open(tmp_path / "objs" / name, "rb") as fh:
        return fh.read()


def http_exchange(c: pb.Conv, path: str, body: bytes, fragment=None, order=None, headers=()):
    """Request + response on Conv c; fragment=(direction 'resp'|'req', size): that message's single
    segment goes as IP fragments in `order` (a permutation of fragment indexes)."""
    req = pb.http_request(path, method="POST" if fragment and fragment[0] == "req" else "GET",
                          headers=[("Content-Length", len(body))] if fragment and fragment[0] == "req" else (),
                          body=body if fragment and fragment[0] == "req" else b"")
    resp_body = b"" if fragment and fragment[0] == "req" else body
    resp = pb.http_response(resp_body, [("Content-Length", len(resp_body)), *headers])
    for from_client, msg in ((True, req), (False, resp)):
        frag_this = fragment and (fragment[0] == "req") == from_client
        if not frag_this:
            c.send(from_client, msg)
            continue
        dg = c.segment(from_client, pb.PSH | pb.ACK, msg)
        c.advance(from_client, len(msg))
        if c.v6:
            src, dst = c.cip, c.sip
            if not from_client:
                src, dst = dst, src
            pieces = pb.frag6(src, dst, 6, dg[40:], 0x1234, fragment[1])
        else:
            pieces = pb.frag4(pb.ipv4(*(c.cip, c.sip) if from_client else (c.sip, c.cip), 6, dg[20:], ident=777,
                                      flags_off=0), fragment[1])
        for i in (order(len(pieces)) if order else range(len(pieces))):
            c.add(pieces[i], from_client)
        c.seg(not from_client, pb.ACK)


@pytest.mark.parametrize("v6,direction,order", [
    (True, "resp", "reverse"), (False, "req", "middle-first"), (True, "req", "dup-overlap"),
])
def test_ip_fragments_kind(tmp_path, v6, direction, order):
    """Fragmented segments in IPv6 and IPv4, either direction, any order, with a duplicate: one flow
    with every packet, the body whole, L4 hooks see the datagram once, IP hooks every fragment."""
    body = bytes((i * 7) % 256 for i in range(5000))
    c = pb.Conv(cip="2001:db8::10" if v6 else "192.0.2.10", sip="2001:db8:1::20" if v6 else "198.51.100.20",
                cport=45001)
    c.handshake()
    orders = {"reverse": lambda n: list(range(n))[::-1],
              "middle-first": lambda n: [n // 2] + [i for i in range(n) if i != n // 2],
              "dup-overlap": lambda n: [n - 1, 1, 1, *range(2, n - 1), 0]}
    http_exchange(c, "/k.bin", body, fragment=(direction, 1232 if v6 else 1000), order=orders[order])
    c.close()
    ipc = "ipv6" if v6 else "ipv4"
    files, counts, s, out = run_kinds(tmp_path, c.frames, counters=("tcp", ipc))
    (f,) = files
    assert (f[1], int(f[3]), f[4]) == ("/k.bin", len(body), SHA(body))
    nfr = s["ip_reassembly"]["fragments"]
    frag = (lambda fr: fr[20] == 44) if v6 else (lambda fr: int.from_bytes(fr[20:22], "big") & 0x3FFF != 0)
    assert nfr == sum(1 for _, fr in c.frames if frag(fr)) >= 5          # the frames built, read here
    assert s["ip_reassembly"]["datagrams"] == 1
    (fl,) = flows(out)
    assert fl[1] == len(c.frames) and fl[2] == "CLOSED"                 # no port-0 phantom flow
    assert len(counts[ipc]) == len(c.frames)                            # IP hook: every captured packet
    assert len(counts["tcp"]) == len(c.frames) - nfr + 1                 # TCP hook: the datagram once
    if order == "dup-overlap":
        assert s["ip_reassembly"]["duplicates"] == 1


def test_ip_fragments_udp_and_timeout(tmp_path):
    """A fragmented UDP datagram reaches a UDP hook once; an incomplete one never does (counted)."""
    a, b = "192.0.2.1", "192.0.2.2"
    whole = pb.ipv4(a, b, 17, pb.udp(a, b, 5000, 53, b"D" * 3000), ident=9, flags_off=0)
    lost = pb.ipv4(a, b, 17, pb.udp(a, b, 5000, 53, b"L" * 3000), ident=10, flags_off=0)
    fr = [(1700000000 + i * 0.01, pb.ether(x)) for i, x in enumerate(pb.frag4(whole, 1480)[::-1])]
    fr += [(1700000001.0, pb.ether(pb.frag4(lost, 1480)[0]))]
    _, counts, s, out = run_kinds(tmp_path, fr, counters=("udp", "ipv4"))
    assert counts["udp"] == [sum(len(x) for _, x in fr[:3])]            # wire bytes of its 3 fragments
    assert len(counts["ipv4"]) == 4
    assert s["ip_reassembly"]["incomplete"] == 1 and s["ip_reassembly"]["datagrams"] == 1
    assert flows(out) == [("11A:C0.00.02.01:p-1388_C0.00.02.02:p-0035", 3, "OPEN")]


@pytest.mark.parametrize("v6", [False, True])
def test_ack_before_data_kind(tmp_path, v6):
    """Mirror-port order in the client->server direction (an upload): the server's ACK of S1..S4 comes
    before S2; the body is whole."""
    body = bytes(range(256)) * 16
    c = pb.Conv(cip="2001:db8::10" if v6 else "192.0.2.10", sip="2001:db8:1::20" if v6 else "198.51.100.20",
                cport=45002)
    c.handshake()
    req = pb.http_request("/up", method="POST", headers=[("Content-Length", len(body))], body=body)
    segs = []
    for i in range(0, len(req), 1000):
        segs.append((c.segment(True, pb.PSH | pb.ACK, req[i:i + 1000])))
        c.advance(True, len(req[i:i + 1000]))
    late = segs.pop(1)
    for s_ in segs[:3]:
        c.add(s_, True)
    c.seg(False, pb.ACK)                        # acknowledges everything sent so far, S2 included
    c.add(late, True)
    for s_ in segs[3:]:
        c.add(s_, True)
    c.send(False, pb.http_response(b"ok", [("Content-Length", 2)]))
    c.close()
    # the upload is the request body: a filex plug-in gets it with the request as req
    files, _, s, _ = run_kinds(tmp_path, c.frames)
    up = [f for f in files if f[0] == "POST"]
    assert up and int(up[0][3]) == len(body) and up[0][4] == SHA(body)
    assert s["filex"][0]["tcp_gaps"] == 0 and s["filex"][0]["tcp_late_fills"] == 1


@pytest.mark.parametrize("v6", [False, True])
@pytest.mark.parametrize("shape", ["response-starts-first", "whole-response-first", "second-request-late"])
def test_request_captured_after_its_response_kind(tmp_path, v6, shape):
    """Kind 03 the other way round (mirror ports): the client's request is captured after the server's ACK of
    it, and after the start (or the whole) of the response. The response is still paired with its request:
    onfile_http gets the request's method and URI, not the placeholder of a response without one. tshark
    (-o tcp.reassemble_out_of_order:TRUE, as case 03) names the exported object after the URI when the
    response ends after the request was captured."""
    c = pb.Conv(cip="2001:db8::10" if v6 else "192.0.2.10", sip="2001:db8:1::20" if v6 else "198.51.100.20",
                cport=45010)
    c.handshake()
    body = bytes(range(256)) * 20
    resp = pb.http_response(body, [("Content-Length", len(body))])
    want = [("GET", "/late", len(body), SHA(body))]
    if shape == "second-request-late":
        c.send(True, pb.http_request("/first"))
        c.send(False, pb.http_response(b"one", [("Content-Length", 3)]))
        want.insert(0, ("GET", "/first", 3, SHA(b"one")))
    req = pb.http_request("/late")
    late = c.segment(True, pb.PSH | pb.ACK, req)
    c.advance(True, len(req))
    c.seg(False, pb.ACK)                                   # the server acknowledges the request, not captured yet
    if shape == "response-starts-first":
        c.seg(False, pb.PSH | pb.ACK, resp[:1400])
        c.add(late, True)
        c.seg(False, pb.PSH | pb.ACK, resp[1400:])
    else:
        c.seg(False, pb.PSH | pb.ACK, resp)
        c.add(late, True)
    c.seg(True, pb.ACK)
    c.close()
    files, _, s, _ = run_kinds(tmp_path, c.frames)
    assert [(f[0], f[1], int(f[3]), f[4]) for f in files] == want
    assert all(f[6] == "nil" for f in files) and s["filex"][0]["tcp_gaps"] == 0
    if shape == "response-starts-first":
        assert tshark_http_object(tmp_path, c.frames, "late") == body


@hypothesis.settings(max_examples=25, deadline=None, derandomize=True,
                     suppress_health_check=list(hypothesis.HealthCheck))
@hypothesis.given(seed=hypothesis.strategies.integers(0, 2**32 - 1), v6=hypothesis.strategies.booleans(),
                  swaps=hypothesis.strategies.integers(1, 40))
def test_keepalive_exchanges_in_any_mirror_order(tmp_path_factory, seed, v6, swaps):
    """Property: 1-3 keep-alive exchanges (plain, gzip or chunked bodies; segment sizes 100/536/1400 bytes;
    with or without pure ACKs) captured in a mirror port's order (adjacent packets swapped up to 40 times,
    across directions and within one) give the same files as in sending order: every body whole, under its
    own request's URI (before the holds of 78728d7/dbf7cc8, 2 in 120 such orders paired a response with the
    wrong request or none). Truth: the bytes put in."""
    import random
    rng = random.Random(seed)
    c = pb.Conv(cip="2001:db8::10" if v6 else "192.0.2.10", sip="2001:db8:1::20" if v6 else "198.51.100.20",
                cport=45050, cisn=rng.randrange(2**32), sisn=rng.randrange(2**32))
    c.handshake()
    start, want = len(c.frames), []
    for k in range(rng.randint(1, 3)):
        body = bytes(rng.randrange(256) for _ in range(rng.randint(1, 6000)))
        c.send(True, pb.http_request(f"/f{k}", headers=[("X-Pad", "p" * rng.randint(0, 2000))]),
               mss=rng.choice([100, 536, 1400]), ack=rng.random() < 0.5)
        kind = rng.choice(["plain", "gzip", "chunked"])
        payload, hdrs = (gzip.compress(body), [("Content-Encoding", "gzip")]) if kind == "gzip" else (body, [])
        if kind == "chunked":
            payload = b"".join(b"%x\r\n" % len(payload[i:i + 700]) + payload[i:i + 700] + b"\r\n"
                               for i in range(0, len(payload), 700)) + b"0\r\n\r\n"
            hdrs.append(("Transfer-Encoding", "chunked"))
        else:
            hdrs.append(("Content-Length", len(payload)))
        c.send(False, pb.http_response(payload, hdrs), mss=rng.choice([100, 536, 1400]), ack=rng.random() < 0.5)
        want.append((f"/f{k}", len(body), SHA(body), "nil"))
    end = len(c.frames)
    c.close()
    mid = c.frames[start:end]
    for _ in range(swaps):
        i = rng.randrange(len(mid) - 1)
        mid[i], mid[i + 1] = mid[i + 1], mid[i]
    frames = c.frames[:start] + mid + c.frames[end:]
    frames = [(1700000000 + i * 0.001, f) for i, (_, f) in enumerate(frames)]     # capture order = time order
    files, _, _, _ = run_kinds(tmp_path_factory.mktemp("mirror"), frames)
    assert [(f[1], int(f[3]), f[4], f[6]) for f in files] == want


@pytest.mark.parametrize("first", [b"\r\n", b"\r\n\r\n", b"\n"])
def test_empty_lines_before_the_first_request_kind(tmp_path, first):
    """A connection whose first payload has empty lines before its request line (RFC 9112 §2.2: a server
    ignores at least one) is HTTP; before, the first-payload vote dropped it and its file was lost. tshark
    exports the object under its URI after one CRLF (the bytes put in are the truth for the others)."""
    c = pb.Conv(cport=45060)
    c.handshake()
    body = bytes(range(256)) * 4
    c.send(True, first + pb.http_request("/lead"))
    c.send(False, pb.http_response(body, [("Content-Length", len(body))]))
    c.close()
    files, _, s, _ = run_kinds(tmp_path, c.frames)
    assert [(f[0], f[1], int(f[3]), f[4], f[6]) for f in files] == [("GET", "/lead", len(body), SHA(body), "nil")]
    if first != b"\r\n":
        return                                             # tshark 4.0 reads past one CRLF only
    assert tshark_http_object(tmp_path, c.frames, "lead", out_of_order=False) == body


@pytest.mark.parametrize("v6", [False, True])
def test_reset_captured_before_the_data_it_acknowledges_kind(tmp_path, v6):
    """Mirror port: the client's RST, acknowledging the whole response, is captured before the response's last
    segment. The RST ends the connection after that segment, so the body is whole (it ended it before: a
    truncated body). tshark (-o tcp.reassemble_out_of_order:TRUE) exports the whole object too."""
    c = pb.Conv(cip="2001:db8::10" if v6 else "192.0.2.10", sip="2001:db8:1::20" if v6 else "198.51.100.20",
                cport=45030)
    c.handshake()
    c.send(True, pb.http_request("/rst"))
    body = bytes(range(256)) * 20
    resp = pb.http_response(body, [("Content-Length", len(body))])
    segs = []
    for i in range(0, len(resp), 1400):
        segs.append(c.segment(False, pb.PSH | pb.ACK, resp[i:i + 1400]))
        c.advance(False, len(resp[i:i + 1400]))
    for s_ in segs[:-1]:
        c.add(s_, False)
    c.seg(True, pb.RST | pb.ACK)
    c.add(segs[-1], False)
    files, _, s, _ = run_kinds(tmp_path, c.frames)
    assert [(f[1], int(f[3]), f[4], f[6]) for f in files] == [("/rst", len(body), SHA(body), "nil")]
    assert tshark_http_object(tmp_path, c.frames, "rst") == body


@pytest.mark.parametrize("v6", [False, True])
@pytest.mark.parametrize("side,shift", [("server", 1_000_000_000), ("client", -2_000_000_000), ("server", -(1 << 31))])
def test_reset_outside_every_receive_window_ends_nothing_kind(tmp_path, v6, side, shift):
    """A RST whose sequence number lies far outside the stream (a blind injection with a made-up number, a
    middlebox's stale state) is dropped by the endpoint (RFC 9293 §3.10.7.4: outside the receive window; here at most
    65,535 bytes, the handshake has no window scale option), so the connection goes on and its body is whole; it
    counts in tcp_rst_ignored. Before, it ended the connection: the rest of the body was lost, the file `truncated`.
    A RST at the next expected byte (the second connection) still ends it. Truth: the body the generator sent
    (hashlib); tshark (out-of-order reassembly on) exports the same object for the client-side RST (for a far
    server-side one, tshark 4.0 exports nothing)."""
    cip, sip = ("2001:db8::10", "2001:db8:1::20") if v6 else ("192.0.2.10", "198.51.100.20")
    body = bytes(range(256)) * 20
    resp = pb.http_response(body, [("Content-Length", len(body))])
    c = pb.Conv(cip=cip, sip=sip, cport=45040)
    c.handshake()
    c.send(True, pb.http_request("/inj"))
    c.seg(False, pb.PSH | pb.ACK, resp[:1400])
    if side == "server":
        c.sseq += shift; c.seg(False, pb.RST); c.sseq -= shift
    else:
        c.cseq += shift; c.seg(True, pb.RST); c.cseq -= shift
    for i in range(1400, len(resp), 1400):
        c.seg(False, pb.PSH | pb.ACK, resp[i:i + 1400])
    c.seg(True, pb.ACK)
    c.close()
    c2 = pb.Conv(cip=cip, sip=sip, cport=45041, t0=c.t + 1)
    c2.handshake()
    c2.send(True, pb.http_request("/cut"))
    c2.seg(False, pb.PSH | pb.ACK, resp[:1400])
    c2.seg(False, pb.RST)
    files, _, s, _ = run_kinds(tmp_path, c.frames + c2.frames)
    head = resp.index(b"\r\n\r\n") + 4
    assert [(f[1], int(f[3]), f[4], f[6]) for f in files] == [
        ("/inj", len(body), SHA(body), "nil"), ("/cut", 1400 - head, SHA(resp[head:1400]), "truncated")]
    assert s["filex"][0]["tcp_rst_ignored"] == 1 and s["filex"][0]["tcp_gaps"] == 0
    if side == "client":
        assert tshark_http_object(tmp_path, c.frames, "inj") == body


@pytest.mark.parametrize("v6", [False, True])
@pytest.mark.parametrize("shift", [-1_000_000_000, -1400])
def test_fin_behind_the_bytes_already_sent_ends_nothing_kind(tmp_path, v6, shift):
    """The client half-closes after its request (FIN), the server's response comes in segments, and a server FIN
    whose sequence number lies behind the bytes the server already sent (an injected one, made up or replayed) is
    captured mid-body. No sender puts data after its FIN and an endpoint drops a segment below its receive window
    (RFC 9293 §3.10.7.4), so the connection goes on: the body is whole, the real FIN ends it, and the FIN counts in
    tcp_fin_ignored. Before, that FIN and the client's made both directions look finished: the rest of the body was
    lost and the file `truncated`. Truth: the body the generator sent (hashlib) and tshark's export."""
    cip, sip = ("2001:db8::10", "2001:db8:1::20") if v6 else ("192.0.2.10", "198.51.100.20")
    body = bytes(range(256)) * 20
    resp = pb.http_response(body, [("Content-Length", len(body))])
    c = pb.Conv(cip=cip, sip=sip, cport=45050)
    c.handshake()
    c.send(True, pb.http_request("/fin"))
    c.seg(True, pb.FIN | pb.ACK); c.cseq += 1
    c.seg(False, pb.PSH | pb.ACK, resp[:1400])
    c.sseq += shift; c.seg(False, pb.FIN | pb.ACK); c.sseq -= shift
    for i in range(1400, len(resp), 1400):
        c.seg(False, pb.PSH | pb.ACK, resp[i:i + 1400])
    c.seg(True, pb.ACK)
    c.seg(False, pb.FIN | pb.ACK); c.sseq += 1
    c.seg(True, pb.ACK)
    files, _, s, _ = run_kinds(tmp_path, c.frames)
    assert [(f[1], int(f[3]), f[4], f[6]) for f in files] == [("/fin", len(body), SHA(body), "nil")]
    assert s["filex"][0]["tcp_fin_ignored"] == 1 and s["filex"][0]["tcp_gaps"] == 0
    assert tshark_http_object(tmp_path, c.frames, "fin") == body


@pytest.mark.parametrize("v6", [False, True])
@pytest.mark.parametrize("shift", [300_000, 1_000_000_000])
def test_bytes_beyond_the_fin_are_not_appended_to_a_body_kind(tmp_path, v6, shift):
    """A response read until close (no length) and, mid-body, a 400-byte segment whose sequence number lies far
    beyond the response's end (injected, or a stray of another connection). The server's FIN ends the stream before
    it: no sender puts data after its FIN, so those bytes are not the response's. The body is whole and complete;
    the bytes count in tcp_after_fin_bytes. Before, the close gave up the hole up to them: the file was the body, a
    gap of ~300 kB or ~1 GB, then the 400 injected bytes ('EVIL...'), flagged `gap`. Truth: the body the generator
    sent (hashlib) and tshark's export (out-of-order reassembly on)."""
    cip, sip = ("2001:db8::10", "2001:db8:1::20") if v6 else ("192.0.2.10", "198.51.100.20")
    body = bytes(range(256)) * 20
    resp = b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n" + body
    c = pb.Conv(cip=cip, sip=sip, cport=45060)
    c.handshake()
    c.send(True, pb.http_request("/end"))
    c.seg(False, pb.PSH | pb.ACK, resp[:1400])
    c.sseq += shift; c.seg(False, pb.PSH | pb.ACK, b"EVIL" * 100); c.sseq -= shift + 400
    for i in range(1400, len(resp), 1400):
        c.seg(False, pb.PSH | pb.ACK, resp[i:i + 1400])
    c.seg(True, pb.ACK)
    c.seg(False, pb.FIN | pb.ACK); c.sseq += 1
    c.seg(True, pb.FIN | pb.ACK); c.cseq += 1
    c.seg(False, pb.ACK)
    files, _, s, _ = run_kinds(tmp_path, c.frames)
    assert [(f[1], int(f[3]), f[4], f[6]) for f in files] == [("/end", len(body), SHA(body), "nil")]
    assert s["filex"][0]["tcp_after_fin_bytes"] == 400 and s["filex"][0]["tcp_gaps"] == 0
    assert tshark_http_object(tmp_path, c.frames, "end") == body


@pytest.mark.parametrize("v6", [False, True])
@pytest.mark.parametrize("late", ["request", "response"])
def test_first_payload_captured_out_of_order_kind(tmp_path, v6, late):
    """The first segment of a message is captured after the second (reordered, or lost and retransmitted), so
    the connection's first payload starts inside the message, not with a request or status line. It is still
    HTTP: the request's header tail (request), the body's middle, before the request too (response). tshark
    (-o tcp.reassemble_out_of_order:TRUE, as case 03) exports the object under its URI."""
    c = pb.Conv(cip="2001:db8::10" if v6 else "192.0.2.10", sip="2001:db8:1::20" if v6 else "198.51.100.20",
                cport=45020)
    c.handshake()
    body = bytes(range(256)) * 20
    req = pb.http_request("/ooo", headers=[("Cookie", "c" * 1500)])
    resp = pb.http_response(body, [("Content-Length", len(body))])
    segs = {}
    for from_client, msg in ((True, req), (False, resp)):
        segs[from_client] = []
        for i in range(0, len(msg), 1000):
            segs[from_client].append((c.segment(from_client, pb.PSH | pb.ACK, msg[i:i + 1000]), from_client))
            c.advance(from_client, len(msg[i:i + 1000]))
    if late == "request":                      # the request's second segment first
        order = [segs[True][1], segs[True][0], *segs[True][2:], *segs[False]]
    else:                                      # the response's second segment, then the request (mirror port)
        order = [segs[False][1], *segs[True], segs[False][0], *segs[False][2:]]
    for ip, from_client in order:
        c.add(ip, from_client)
    c.seg(True, pb.ACK)
    c.close()
    files, _, s, _ = run_kinds(tmp_path, c.frames)
    assert [(f[0], f[1], int(f[3]), f[4], f[6]) for f in files] == [("GET", "/ooo", len(body), SHA(body), "nil")]
    assert s["filex"][0]["flows_not_http"] == 0
    assert tshark_http_object(tmp_path, c.frames, "ooo") == body


def test_out_of_order_first_payload_of_other_traffic_gives_no_file(tmp_path):
    """A non-HTTP connection whose first payload is out of order is reassembled for filex (it cannot tell) and
    still gives no file."""
    c = pb.Conv(cport=45021, sport=25)
    c.handshake()
    msg = b"220 mail.example ESMTP\r\n" + b"x" * 2000
    a, b = c.segment(False, pb.PSH | pb.ACK, msg[:1000]), None
    c.advance(False, 1000)
    b = c.segment(False, pb.PSH | pb.ACK, msg[1000:])
    c.advance(False, len(msg) - 1000)
    c.add(b, False)
    c.add(a, False)
    c.seg(True, pb.ACK)
    c.close()
    files, _, s, _ = run_kinds(tmp_path, c.frames)
    assert files == [] and s["filex"][0]["tcp_gaps"] == 0


@pytest.mark.parametrize("v6", [False, True])
def test_port_reuse_kind(tmp_path, v6):
    """Connection 1 never closes and its response has no length (read until close): the new SYN ends it,
    its file is delivered; connection 2's file too."""
    cip, sip = ("2001:db8::10", "2001:db8:1::20") if v6 else ("192.0.2.10", "198.51.100.20")
    c = pb.Conv(cip=cip, sip=sip, cport=45003, cisn=100000, sisn=900000)
    c.handshake()
    c.send(True, pb.http_request("/one"))
    one = b"first connection body\n" * 30
    c.send(False, b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n" + one)
    c2 = pb.Conv(cip=cip, sip=sip, cport=45003, cisn=3_000_000_000, sisn=7000, t0=c.t + 2)
    c2.handshake()
    two = b"second\n" * 50
    c2.send(True, pb.http_request("/two"))
    c2.send(False, pb.http_response(two, [("Content-Length", len(two))]))
    c2.close()
    files, _, s, _ = run_kinds(tmp_path, c.frames + c2.frames)
    assert [(f[1], int(f[3]), f[4]) for f in files] == [("/one", len(one), SHA(one)), ("/two", len(two), SHA(two))]
    assert s["filex"][0]["tcp_reused"] == 1



@pytest.mark.parametrize("shape", ["synack-only", "synack-only-v6", "server-side-only", "old-closed", "old-reset"])
def test_port_reuse_seen_from_the_server_side_kind(tmp_path, shape):
    """Kind 04 seen from the other side: the new connection's SYN is not captured (asymmetric routing, a tap on
    the server's side), only the server's SYN+ACK with a new ISN; the old connection never closed (or closed by
    FIN / RST). Both connections' files come out; a retransmitted SYN+ACK (same ISN) changes nothing. Truth:
    the bytes put in (tshark 4.0 merges the two into one tcp.stream and exports only /one)."""
    v6 = shape.endswith("v6")
    c = pb.Conv(cip="2001:db8::10" if v6 else "192.0.2.10", sip="2001:db8:1::20" if v6 else "198.51.100.20",
                cport=45040, cisn=100000, sisn=900000)
    one, two = b"1" * 660, b"2" * 690

    def conn(path, body, syn):
        if syn:
            c.seg(True, pb.SYN)
            c.cseq += 1
        c.seg(False, pb.SYN | pb.ACK)
        c.seg(False, pb.SYN | pb.ACK)                       # retransmitted: the same ISN
        c.sseq += 1
        c.seg(True, pb.ACK)
        c.send(True, pb.http_request(path))
        c.send(False, pb.http_response(body, [("Content-Length", len(body))]))

    conn("/one", one, True)
    if shape == "old-closed":
        c.close()
    elif shape == "old-reset":
        c.seg(True, pb.RST | pb.ACK)
    c.cseq, c.sseq, c.t = 3_000_000_000, 7000, c.t + 2
    conn("/two", two, False)
    c.close()
    frames = c.frames
    if shape == "server-side-only":                        # and only the server's packets at all
        frames = [(t, f) for t, f in frames if f[6:12] != pb.CMAC]
    files, _, s, _ = run_kinds(tmp_path, frames)
    uris = ("", "") if shape == "server-side-only" else ("/one", "/two")
    assert [(f[1], int(f[3]), f[4], f[6]) for f in files] == [(uris[0], len(one), SHA(one), "nil"),
                                                              (uris[1], len(two), SHA(two), "nil")]
    assert s["filex"][0]["tcp_gaps"] == 0

def write_pcapng(path, frames, fcs_bits=0, linktype=1, epb_fcs=0):
    """pcapng: SHB, one IDB (if_fcslen option when fcs_bits), EPBs (usec); epb_fcs: every EPB ends in an FCS
    of that many octets, announced by its epb_flags option (bits 5-8; the IDB may say otherwise)."""
    def block(btype, body):
        body += b"\0" * (-len(body) % 4)
        n = len(body) + 12
        return struct.pack("<II", btype, n) + body + struct.pack("<I", n)
    out = [block(0x0A0D0D0A, struct.pack("<IHHq", 0x1A2B3C4D, 1, 0, -1))]
    opts = (struct.pack("<HHB3x", 13, 1, fcs_bits) if fcs_bits else b"") + struct.pack("<HH", 0, 0)
    out.append(block(1, struct.pack("<HHI", linktype, 0, 0) + opts))
    for t, fr in frames:
        if fcs_bits or epb_fcs:
            fr = fr + b"\0" * max(0, 60 - len(fr))
            fr += struct.pack("<I", pb.zlib.crc32(fr) & 0xFFFFFFFF)
        us = int(round(t * 1e6))
        epb = struct.pack("<IIIII", 0, us >> 32, us & 0xFFFFFFFF, len(fr), len(fr)) + fr + b"\0" * (-len(fr) % 4)
        if epb_fcs:                                   # options: a comment, then epb_flags, then opt_endofopt
            epb += struct.pack("<HH4sHHIHH", 1, 4, b"note", 2, 4, (epb_fcs << 5) | 1, 0, 0)
        out.append(block(6, epb))
    with open(path, "wb") as f:
        f.write(b"".join(out))


@pytest.mark.parametrize("container", ["pcap-ipv6", "pcapng-if_fcslen", "pcap-fcs-snaplen", "pcapng-epb_flags"])
def test_fcs_kind(tmp_path, container):
    """FCS announced by the pcap link-type bits, the pcapng if_fcslen option or a packet's epb_flags FCS
    length (which overrides if_fcslen) is not payload; tshark reads the same FCS length."""
    v6 = container == "pcap-ipv6"
    c = pb.Conv(cip="2001:db8::10" if v6 else "192.0.2.10", sip="2001:db8:1::20" if v6 else "198.51.100.20",
                cport=45004)
    c.handshake()
    body = b"0123456789abcdef" * 100                       # no Content-Length: read until close
    c.send(True, pb.http_request("/fcs"))
    c.send(False, b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n" + body)
    c.close()
    pcap = str(tmp_path / "f.cap")
    if container == "pcapng-if_fcslen":
        write_pcapng(pcap, c.frames, fcs_bits=32)
    elif container == "pcapng-epb_flags":                  # the IDB says 2 octets, each packet 4
        write_pcapng(pcap, c.frames, fcs_bits=16, epb_fcs=4)
    else:                                                   # snaplen: 2 of the 4 FCS bytes not captured
        pb.write_pcap(pcap, c.frames, fcs=True, cut=2 if container == "pcap-fcs-snaplen" else 0)
    files, _, s, out = run_kinds(tmp_path, pcap)
    (f,) = files
    assert (int(f[3]), f[4]) == (len(body), SHA(body))
    assert s["bytes"] == sum(len(fr) for _, fr in c.frames) + sum(max(0, 60 - len(fr)) for _, fr in c.frames)
    if container.startswith("pcapng"):                     # tshark: frame length minus the FCS it shows
        r = subprocess.run(["tshark", "-r", pcap, "-T", "fields", "-e", "frame.len", "-e", "eth.fcs"],
                           capture_output=True, text=True, check=True)
        rows = [line.split("\t") for line in r.stdout.splitlines()]
        assert all(fcs for _, fcs in rows) and sum(int(n) - 4 for n, _ in rows) == s["bytes"]



@pytest.mark.parametrize("endian", ["le", "be"])
def test_fcs_kind_in_a_modified_pcap_run_from_the_command_line(tmp_path, endian):
    """Case 01's kind in Kuznetzov's "modified" pcap (magic a1b2cd34, 24-byte record headers), both byte orders:
    the header's link type 0x24000001 is Ethernet with a 4-byte FCS on each frame, IPv6 inside. The walker read
    this format, but `luaprobe run --pcap FILE` refused it before starting ("not a pcap or pcapng file"): the
    command's check of the file's first four bytes did not list this magic (streamed through `--pcap -` it was
    read). Captures: tests/data/kinds/ (gen_modified_pcap_fcs.py). Truth: tshark 4.0.17 reads both files as
    Ethernet with an FCS (eth.fcs) and exports /modified.bin; its SHA-256 is the generator's body's."""
    pcap = os.path.join(helpers.REPO, "tests", "data", "kinds", f"modified-pcap-fcs-{endian}.pcap")
    text, s = luaprobe_run(os.path.join(CASES, "probe.lua"), pcap, tmp_path / "o")
    assert census(text) == {"onpacket": 12, "eth": 12, "ipv4": 0, "ipv6": 12, "tcp": 12, "udp": 0, "files": 0}
    (f,) = probe_files(text)
    subprocess.run(["tshark", "-r", pcap, "-q", "--export-objects", f"http,{tmp_path / 'objs'}"],
                   capture_output=True, check=True)
    with open(tmp_path / "objs" / "modified.bin", "rb") as fh:
        want = fh.read()
    assert want == bytes((i * 31 + 7) % 256 for i in range(3000))
    assert (f["uri"], int(f["length"]), f["sha256"]) == ("/modified.bin", len(want), SHA(want))
    r = subprocess.run(["tshark", "-r", pcap, "-T", "fields", "-e", "frame.len", "-e", "eth.fcs"],
                       capture_output=True, text=True, check=True)
    rows = [line.split("\t") for line in r.stdout.splitlines()]
    assert len(rows) == 12 and all(fcs for _, fcs in rows)
    assert s["bytes"] == sum(int(n) - 4 for n, _ in rows)              # wire bytes without the FCS, as pcap/pcapng
    assert [(n, st) for _, n, st in flows(tmp_path / "o")] == [(12, "CLOSED")]


@pytest.mark.parametrize("container,orig", [("pcap", 0), ("pcap", 10), ("pcapng-if_fcslen", 0),
                                            ("pcapng-epb_flags", 10)])
def test_fcs_kind_with_an_original_length_below_the_captured_one(tmp_path, container, orig):
    """Case 01's kind (FCS announced by the container) in records whose original length is 0 or shorter than what
    was captured (written by broken tools): the FCS is the last 4 captured bytes. Before, the FCS cut took
    min(caplen, orig_len - 4) bytes, so every frame was cut to nothing: 0 decoded packets, no flow, no file, no
    warning. Truth: tshark decodes the captured bytes (eth.fcs shown, frame.len = the file's orig_len) and exports
    the object; the body is the bytes the generator put in."""
    c = pb.Conv(cport=45011)
    c.handshake()
    body = bytes(range(256)) * 5
    c.send(True, pb.http_request("/short.bin"))
    c.send(False, pb.http_response(body, [("Content-Length", len(body))]))
    c.close()
    pcap = str(tmp_path / "f.cap")
    if container == "pcap":
        pb.write_pcap(pcap, c.frames, fcs=True)
        raw = bytearray(open(pcap, "rb").read())
        off = 24
        while off < len(raw):                                  # every record's orig_len set to `orig`
            caplen = struct.unpack_from("<I", raw, off + 8)[0]
            struct.pack_into("<I", raw, off + 12, orig)
            off += 16 + caplen
    else:
        write_pcapng(pcap, c.frames, fcs_bits=32) if container == "pcapng-if_fcslen" else \
            write_pcapng(pcap, c.frames, fcs_bits=16, epb_fcs=4)
        raw = bytearray(open(pcap, "rb").read())
        off = 0
        while off < len(raw):                                  # every EPB's original length set to `orig`
            btype, blen = struct.unpack_from("<II", raw, off)
            if btype == 6:
                struct.pack_into("<I", raw, off + 24, orig)
            off += blen
    with open(pcap, "wb") as fh:
        fh.write(raw)
    rows = [ln.split("\t") for ln in subprocess.run(
        ["tshark", "-r", pcap, "-T", "fields", "-e", "frame.len", "-e", "eth.fcs", "-e", "tcp.srcport"],
        capture_output=True, text=True, check=True).stdout.splitlines()]
    assert len(rows) == len(c.frames) and all(n == str(orig) and fcs and port for n, fcs, port in rows)
    objs = tmp_path / "objs"
    subprocess.run(["tshark", "-r", pcap, "-q", "--export-objects", f"http,{objs}"], capture_output=True, check=True)
    assert (objs / "short.bin").read_bytes() == body
    files, counts, s, out = run_kinds(tmp_path, pcap, counters=("tcp",))
    assert [(f[1], int(f[3]), f[4], f[6]) for f in files] == [("/short.bin", len(body), SHA(body), "nil")]
    assert len(counts["tcp"]) == len(c.frames) and s["flows"] == 1

def test_unknown_linktype_warned_once_and_counted(tmp_path):
    c = pb.Conv()
    c.handshake()
    c.close()
    pcap = str(tmp_path / "u.pcap")
    pb.write_pcap(pcap, c.frames, network=147)             # LINKTYPE_USER0
    text, s = luaprobe_run(os.path.join(CASES, "probe.lua"), pcap, tmp_path / "o")
    assert text.count("link type 147 is not one luaprobe decodes") == 1
    assert s["unknown_linktype_packets"] == 6 and s["unknown_linktypes"] == {"147": 6}


def test_incomplete_files_flagged_with_reason(tmp_path):
    """Bodies cut short reach onfile_http with the reason, counted per reason in the summary: a lost
    segment (gap), a connection that ends before Content-Length (truncated), a truncated gzip stream
    (decode_incomplete), an unknown coding (unknown_encoding); a whole body gets nil."""
    frames = []
    body = bytes(range(256)) * 12

    def conn(port, resp_parts, drop=None, close=True):
        c = pb.Conv(cport=port, t0=1700000000 + port - 46000)
        c.handshake()
        c.send(True, pb.http_request(f"/p{port}"))
        for i, part in enumerate(resp_parts):
            if i == drop:                                  # never captured
                c.advance(False, len(part))
                continue
            c.seg(False, pb.PSH | pb.ACK, part)
        if close:
            c.close()
        frames.extend(c.frames)

    head = f"HTTP/1.1 200 OK\r\nContent-Length: {len(body)}\r\n\r\n".encode()
    conn(46001, [head + body[:1000], body[1000:2000], body[2000:]], drop=1)                # gap
    conn(46002, [head + body[:1000]])                                                       # truncated
    gz = gzip.compress(body)[:-30]
    conn(46003, [b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nConnection: close\r\n\r\n" + gz])
    conn(46004, [b"HTTP/1.1 200 OK\r\nContent-Encoding: br\r\nContent-Length: 5\r\n\r\nabcde"])
    conn(46005, [head + body])                                                              # whole
    files, _, s, _ = run_kinds(tmp_path, frames)
    got = {f[1]: (f[6], int(f[3])) for f in files}
    assert got == {"/p46001": ("gap", len(body) - 1000), "/p46002": ("truncated", 1000),
                   "/p46003": ("decode_incomplete", got["/p46003"][1]), "/p46004": ("unknown_encoding", 5),
                   "/p46005": ("nil", len(body))}
    fx = s["filex"][0]
    assert {k: v for k, v in fx.items() if k.startswith("incomplete_")} == {
        "incomplete_gap": 1, "incomplete_truncated": 1, "incomplete_decode_error": 0,
        "incomplete_decode_incomplete": 1, "incomplete_unknown_encoding": 1, "incomplete_decompression_bomb": 0}


def test_case13_binary_resource(tmp_path):
    text, _ = luaprobe_run(*case("13-lua-binary-resource"), tmp_path / "o")
    db = sqlite3.connect(os.path.join(tmp_path / "o", "luaprobe.sqlite"))
    db.text_factory = bytes
    rows = db.execute("SELECT uri, typeof(contents), contents FROM resources ORDER BY id").fetchall()
    db.close()
    assert rows == [(b"direct", b"blob", bytes(range(256))), (b"async", b"blob", bytes(range(256)))]


BYTES_PLUGIN = r"""
local G = "{4A3F1C2B-0000-4000-8000-00000000B10C}"
local RAW = "\xff\xfe\x80 caf\xe9 \x00 end"
local n = 0
TrisulPlugin = {
  id = { name = "bytes everywhere" },
  countergroup = { control = { guid = G, name = "bytes", bucketsize = 60 },
                   meters = { { 0, T.K.vartype.COUNTER, 10, "n", "n", "n" } } },
  simplecounter = { protocol_guid = "{14D7AB53-CC51-47e9-8814-9C06AAE60189}",
    onpacket = function(engine, layer)
      n = n + 1
      if n == 1 then
        engine:update_counter(G, RAW .. "key", 0, 1)
        engine:update_key_info(G, RAW .. "key", RAW .. "label", RAW .. "descr")
        engine:add_alert(G, layer:flowkey(), RAW .. "sig", 1, RAW .. "msg")
        engine:add_resource(G, layer:flowkey(), RAW .. "uri", "valid text")
        engine:add_edge(G, RAW .. "key", G, "text key")
      else
        T.async:schedule { data = RAW, onexecute = function(s) return s .. "async" end,
          onresult = function(engine, s, r)
            engine:add_alert(G, "", r, 1, r)
            engine:update_counter(G, r, 0, 1)
          end }
      end
    end } }
"""


def test_plugin_bytes_kept_exactly(tmp_path):
    """Non-UTF-8 strings a plug-in stores (counter keys, key labels, alert ids and messages, resource
    URIs), from a hook and from onresult, come back byte for byte (BLOB); UTF-8 ones stay TEXT."""
    raw = b"\xff\xfe\x80 caf\xe9 \x00 end"
    p = tmp_path / "b.lua"
    p.write_text(BYTES_PLUGIN, encoding="latin-1")
    a = pb.udp("192.0.2.1", "192.0.2.2", 1, 2, b"x")
    frames = [(1700000000 + i, pb.ether(pb.ipv4("192.0.2.1", "192.0.2.2", 17, a))) for i in range(2)]
    pcap = str(tmp_path / "b.pcap")
    pb.write_pcap(pcap, frames)
    text, _ = luaprobe_run(str(p), pcap, tmp_path / "o")
    db = sqlite3.connect(os.path.join(tmp_path / "o", "luaprobe.sqlite"))
    db.text_factory = bytes
    keys = sorted(r[0] for r in db.execute("SELECT key FROM counters"))
    assert keys == sorted([raw + b"key", raw + b"async"])
    # an edge's vertex is a counter key: the same bytes, so edges join counters (docs/schema.md "edges")
    assert db.execute("SELECT typeof(s_key), s_key, typeof(t_key), t_key FROM edges").fetchall() == [
        (b"blob", raw + b"key", b"text", b"text key")]
    assert db.execute("SELECT count(*) FROM edges JOIN counters ON counters.key = edges.s_key").fetchone() == (1,)
    assert db.execute("SELECT typeof(key), key, label, description FROM key_info").fetchall() == [
        (b"blob", raw + b"key", raw + b"label", raw + b"descr")]
    assert sorted(db.execute("SELECT sigid, message FROM alerts").fetchall()) == sorted(
        [(raw + b"sig", raw + b"msg"), (raw + b"async", raw + b"async")])
    assert db.execute("SELECT uri, typeof(contents), contents FROM resources").fetchall() == [
        (raw + b"uri", b"text", b"valid text")]
    db.close()


BYTES_DECLARED = r"""
local G = "{4A3F1C2B-0000-4000-8000-00000000B10D}"
local RAW = "\xff\xfe\x80 caf\xe9 \x00 end"
TrisulPlugin = {
  id = { name = "bytes declared" },
  countergroup = { control = { guid = G, name = RAW .. "name", description = RAW .. "descr", bucketsize = 60 },
                   meters = { { 0, T.K.vartype.COUNTER, 10, 0, RAW .. "meter", "d", "u" } },
                   keyinfo = { { RAW .. "key", RAW .. "label" }, { "text key", "text label" } } },
  simplecounter = { protocol_guid = "{14D7AB53-CC51-47e9-8814-9C06AAE60189}",
    onpacket = function(engine, layer) engine:update_counter(G, RAW .. "key", 0, 1) end } }
"""


def test_plugin_bytes_in_a_countergroup_declaration(tmp_path):
    """Case 13's kind through a countergroup's own table: a `keyinfo` entry whose key and label are not UTF-8 is
    stored as the same bytes (BLOB), so it joins the counters of that key as update_key_info's rows do; the
    group's name, description and meter names keep their bytes readable as \\xNN escapes (docs/schema.md "Text vs
    binary"). Before, the definition was read through a U+FFFD decode: the key_info row's key matched no counter
    and the bytes could not be read back. Truth: the bytes written in the plug-in (RAW here)."""
    raw = b"\xff\xfe\x80 caf\xe9 \x00 end"
    p = tmp_path / "d.lua"
    p.write_text(BYTES_DECLARED, encoding="latin-1")
    a = pb.udp("192.0.2.1", "192.0.2.2", 1, 2, b"x")
    pcap = str(tmp_path / "d.pcap")
    pb.write_pcap(pcap, [(1700000000 + i, pb.ether(pb.ipv4("192.0.2.1", "192.0.2.2", 17, a))) for i in range(2)])
    text, _ = luaprobe_run(str(p), pcap, tmp_path / "o")
    db = sqlite3.connect(os.path.join(tmp_path / "o", "luaprobe.sqlite"))
    db.text_factory = bytes
    assert sorted(db.execute("SELECT typeof(key), key, typeof(label), label FROM key_info").fetchall()) == [
        (b"blob", raw + b"key", b"blob", raw + b"label"), (b"text", b"text key", b"text", b"text label")]
    assert db.execute("SELECT count(*) FROM counters JOIN key_info USING (group_guid, key)").fetchone() == (1,)
    esc = raw.decode("utf-8", "backslashreplace").encode()
    name, descr, meters = db.execute("SELECT name, description, meters_json FROM counter_groups").fetchone()
    db.close()
    assert (name, descr) == (esc + b"name", esc + b"descr")
    assert json.loads(meters)[0]["name"] == (esc + b"meter").decode()
    assert b"\xef\xbf\xbd" not in name + descr + meters                      # no U+FFFD


@pytest.mark.parametrize("v6", [False, True])
def test_fragments_of_two_datagrams_under_one_ip_id_are_not_mixed_kind(tmp_path, v6):
    """RFC 4963 §3 (mis-associated fragments): segment X goes as a fragmented datagram whose middle fragment is not
    captured; segment Y's datagram then uses the same IP id (ids wrap) and completes X's held fragments with its
    own middle one: a datagram of X's head, Y's middle and X's tail. Its TCP checksum fails, so the endpoint drops
    it and the sender retransmits X and Y (new ids). luaprobe verifies the checksum of a datagram whose fragments
    disagreed and drops it too (its fragments count in malformed / in_no_flow): the body is whole. Before, the
    mixed datagram reached TCP reassembly first and the retransmissions were taken for old bytes: a corrupted file,
    flagged complete. (tshark 4.0 exports that corrupted object too: it does not verify checksums.) Truth: the body
    the generator sent (hashlib); the RFC's checksum."""
    cip, sip = ("2001:db8::10", "2001:db8:1::20") if v6 else ("192.0.2.10", "198.51.100.20")
    body = bytes((i * 7 + i // 256) & 0xFF for i in range(6000))
    resp = pb.http_response(body, [("Content-Length", len(body))])
    c = pb.Conv(cip=cip, sip=sip, cport=45070)
    c.handshake()
    c.send(True, pb.http_request("/ipid"))
    base = c.sseq

    def frags(data, at, ident):
        c.sseq = base + at
        dg = c.segment(False, pb.PSH | pb.ACK, data)
        if v6:
            return pb.frag6(sip, cip, 6, dg[40:], ident, 808)
        dg = dg[:4] + struct.pack("!H", ident) + dg[6:10] + b"\0\0" + dg[12:]
        return pb.frag4(dg[:10] + struct.pack("!H", pb.csum(dg[:20])) + dg[12:], 808)

    x, y = resp[:2400], resp[2400:4800]
    fx = frags(x, 0, 7)
    for f in (fx[0], fx[2]) + tuple(frags(y, 2400, 7)) + tuple(frags(x, 0, 8)) + tuple(frags(y, 2400, 9)):
        c.add(f, False)
    c.sseq = base + 4800
    c.seg(False, pb.PSH | pb.ACK, resp[4800:])
    c.seg(True, pb.ACK)
    c.close()
    files, _, s, _ = run_kinds(tmp_path, c.frames)
    assert [(f[1], int(f[3]), f[4], f[6]) for f in files] == [("/ipid", len(body), SHA(body), "nil")]
    ipr = s["ip_reassembly"]
    assert (ipr["datagrams"], ipr["malformed"], ipr["incomplete"], ipr["in_no_flow"]) == (2, 4, 1, 5), ipr
    assert s["filex"][0]["tcp_gaps"] == 0


@pytest.mark.parametrize("timeout,datagrams", [(30.0, 0), (60.0, 1)])
def test_ip_fragment_timeout_is_per_datagram(tmp_path, timeout, datagrams):
    """Fragments 40 s apart: dropped with the default 30 s timeout (counted), reassembled with 60 s."""
    a, b = "192.0.2.1", "192.0.2.2"
    dg = pb.ipv4(a, b, 17, pb.udp(a, b, 5000, 53, b"T" * 3000), ident=11, flags_off=0)
    fr = pb.frag4(dg, 1480)
    frames = [(1700000000.0, pb.ether(fr[0])), (1700000040.0, pb.ether(fr[1])), (1700000040.5, pb.ether(fr[2]))]
    _, counts, s, _ = run_kinds(tmp_path, frames, counters=("udp",), cfg={"frag_timeout": timeout})
    ipr = s["ip_reassembly"]
    assert (ipr["datagrams"], len(counts["udp"])) == (datagrams, datagrams)
    assert (ipr["timeouts"], ipr["incomplete"]) == ((1, 1) if datagrams == 0 else (0, 0))


BYTES_OTHER = r"""
local G = "{4A3F1C2B-0000-4000-8000-00000000B10D}"
local RAW = "\xff\xfe\x80 caf\xe9 \x00 end"
local n, got = 0, nil
TrisulPlugin = {
  id = { name = "bytes other paths" },
  onmessage = function(msgid, msg) got = msg end,        -- between batches: the next packet stores it
  simplecounter = { protocol_guid = "{14D7AB53-CC51-47e9-8814-9C06AAE60189}",
    onpacket = function(engine, layer)
      n = n + 1
      if n == 1 then
        engine:tag_flow(layer:flowkey(), RAW)
        engine:post_message_frontend(RAW .. "msg")
        T.log(T.K.loglevel.INFO, RAW .. "log")
        print(RAW .. "print")
      else
        engine:add_resource(G, "", "message", got)
        T.async:schedule { data = RAW, onexecute = function(s) error(s .. "boom") end,
                           onresult = function() end }
        error(RAW .. "hook")
      end
    end } }
"""


def test_plugin_bytes_other_paths(tmp_path):
    """Non-UTF-8 bytes in the other ways a plug-in's strings leave it: post_message content reaches onmessage
    unchanged; a flow tag is stored with \\xNN escapes (docs/schema.md "Text vs binary": not U+FFFD); print()
    writes the bytes; T.log and error messages (hook and T.async onexecute) show \\xNN escapes with nothing
    after a NUL byte lost."""
    raw = b"\xff\xfe\x80 caf\xe9 \x00 end"
    p = tmp_path / "b.lua"
    p.write_text(BYTES_OTHER, encoding="latin-1")
    a = pb.udp("192.0.2.1", "192.0.2.2", 1, 2, b"x")
    pb.write_pcap(str(tmp_path / "b.pcap"),
                  [(1700000000 + i, pb.ether(pb.ipv4("192.0.2.1", "192.0.2.2", 17, a))) for i in range(2)])
    exe = os.path.join(os.path.dirname(sys.executable), "luaprobe")
    r = subprocess.run([exe, "run", str(p), "--pcap", str(tmp_path / "b.pcap"), "--out", str(tmp_path / "o")],
                       capture_output=True, timeout=120, cwd=helpers.REPO)
    assert r.returncode == 0, r.stderr
    assert b"] " + raw + b"print\n" in r.stdout
    esc = rb"\xff\xfe\x80 caf\xe9 \x00 end"
    for tail in (b"log", b"boom", b"hook"):
        assert esc + tail in r.stderr, tail
    assert b"\xef\xbf\xbd" not in r.stdout + r.stderr                    # no U+FFFD anywhere
    db = sqlite3.connect(os.path.join(tmp_path / "o", "luaprobe.sqlite"))
    db.text_factory = bytes
    assert db.execute("SELECT contents FROM resources WHERE uri = 'message'").fetchall() == [(raw + b"msg",)]
    assert db.execute("SELECT tags FROM flows").fetchall() == [(raw.decode("utf-8", "backslashreplace").encode(),)]
    db.close()


def reuse_capture():
    """Connections reusing 5-tuples (client port: [(how the connection ends, client ISN), ...]): never closed,
    FIN one way only, RST, quick reuse 50 ms after a FIN with an ISN just above the old one, a lower ISN, the
    sequence space wrapping, IPv6; a retransmitted SYN; a refused connection retried with the same ISN."""
    frames = []
    shapes = {48001: [("none", 100000), ("fin", 3_000_000_000)], 48002: [("fin1", 100000), ("fin", 50)],
              48003: [("rst", 100000), ("fin", 105000)], 48004: [("fin", 100000), ("fin", 100009)],
              48005: [("none", 2**32 - 100), ("none", 5), ("fin", 9_999)]}
    t = 1700000000.0
    for port, conns in shapes.items():
        for k, (end, isn) in enumerate(conns):
            v6 = port == 48005
            c = pb.Conv(cip="2001:db8::10" if v6 else "192.0.2.10", sip="2001:db8:1::20" if v6 else "198.51.100.20",
                        cport=port, cisn=isn, sisn=isn + 77, t0=t + k * (0.05 if port == 48004 else 2))
            c.handshake()
            c.send(True, pb.http_request(f"/p{port}"))
            c.send(False, pb.http_response(b"x" * 700, [("Content-Length", 700)]))
            if end == "fin":
                c.close()
            elif end == "fin1":
                c.seg(True, pb.FIN | pb.ACK); c.cseq += 1; c.seg(False, pb.ACK)
            elif end == "rst":
                c.seg(True, pb.RST | pb.ACK)
            frames += c.frames
        t += 10
    c = pb.Conv(cport=48006, t0=t)                                 # SYN retransmitted: one connection
    c.seg(True, pb.SYN); c.seg(True, pb.SYN); c.cseq += 1
    c.seg(False, pb.SYN | pb.ACK); c.sseq += 1; c.seg(True, pb.ACK); c.close()
    frames += c.frames
    c = pb.Conv(cport=48007, t0=t + 1)                             # refused, retried with the same ISN
    for _ in range(2):
        c.seg(True, pb.SYN); c.seg(False, pb.RST | pb.ACK)
    frames += c.frames
    return sorted(frames, key=lambda x: x[0])


def test_port_reuse_gives_a_flow_record_per_connection(tmp_path):
    """A new connection on a 5-tuple (a SYN with a new sequence number, closed or not) gets its own flow
    record, as tshark 4.0.17 starts a new tcp.stream ("TCP Port numbers reused"): the packets per
    conversation equal tshark's; the old record's state says how it ended (REUSED when it never closed);
    every connection's file is extracted."""
    pcap = str(tmp_path / "r.pcap")
    pb.write_pcap(pcap, reuse_capture())
    files, _, s, out = run_kinds(tmp_path, pcap)
    rows = flows(out)
    ours = sorted((int(k.split(":p-")[1][:4], 16), n) for k, n, _ in rows)
    r = subprocess.run(["tshark", "-r", pcap, "-q", "-z", "conv,tcp"], capture_output=True, text=True, check=True)
    theirs = sorted((int(line.split()[0].rsplit(":", 1)[1]), int(line.split("<->")[1].split()[7]))
                    for line in r.stdout.splitlines() if "<->" in line)
    assert ours == theirs and len(ours) == 13
    by_port = collections.defaultdict(list)
    for k, _, st in sorted(rows, key=lambda x: x[0]):
        by_port[int(k.split(":p-")[1][:4], 16)].append(st)
    assert sorted(by_port[48001]) == ["CLOSED", "REUSED"] and sorted(by_port[48003]) == ["CLOSED", "RESET"]
    assert s["flows"] == 13                                              # the summary counts records
    assert sorted(f[1] for f in files) == sorted(f"/p{p}" for p in (48001, 48001, 48002, 48002, 48003, 48003, 48004,
                                                                      48004, 48005, 48005, 48005))


def late_syn_capture(shape: str):
    """One HTTP connection whose client SYN is seen again after data: a late duplicate (merged or mirrored taps:
    "late", IPv4 and IPv6, after the whole exchange: "after-fin"), or a mid-stream pick-up whose SYN arrives
    reordered after the first data ("reordered")."""
    v6 = shape.endswith("-v6")
    c = pb.Conv(cip="2001:db8::10" if v6 else "192.0.2.10", sip="2001:db8:1::20" if v6 else "198.51.100.20",
                cport=48100, cisn=4_000_000_000, sisn=777)
    isn = c.cseq
    if shape.startswith("reordered"):
        c.cseq += 1
        c.sseq += 1
        c.send(True, pb.http_request("/late"))
        c.add(c.ip(True, pb.tcp(c.cip, c.sip, c.cport, c.sport, isn, 0, pb.SYN)))       # the SYN, late
        c.send(False, pb.http_response(b"y" * 3000, [("Content-Length", 3000)]))
        c.close()
        return c.frames
    c.handshake()
    c.send(True, pb.http_request("/late"))
    c.send(False, pb.http_response(b"y" * 3000, [("Content-Length", 3000)]))
    syn = c.ip(True, pb.tcp(c.cip, c.sip, c.cport, c.sport, isn, 0, pb.SYN))
    if shape.startswith("after-fin"):
        c.close()
        c.add(syn)
    else:
        c.add(syn)
        c.close()
    return c.frames


@pytest.mark.parametrize("shape", ["late", "late-v6", "after-fin", "reordered"])
def test_a_connections_own_syn_seen_again_is_not_port_reuse(tmp_path, shape):
    """Case 04's kind, the other way round: a SYN carrying the connection's own ISN, seen again after data (a late
    duplicate of merged or mirrored captures, after the FIN too) or, picked up mid-stream, seen after the first
    data, is a retransmission: tshark 4.0 keeps it in the stream ("suspected retransmission"), and luaprobe keeps
    one flow record with every packet, and extracts the file once.  (Before: a record ended as REUSED at the SYN
    and a second one for the rest.)"""
    pcap = str(tmp_path / "l.pcap")
    pb.write_pcap(pcap, late_syn_capture(shape))
    files, _, _s, out = run_kinds(tmp_path, pcap)
    r = subprocess.run(["tshark", "-r", pcap, "-q", "-z", "conv,tcp"], capture_output=True, text=True, check=True)
    theirs = [int(line.split("<->")[1].split()[7]) for line in r.stdout.splitlines() if "<->" in line]
    rows = flows(out)
    assert [n for _, n, _ in rows] == theirs and len(rows) == 1, (rows, theirs)
    assert rows[0][2] == "CLOSED"
    assert [f[1] for f in files] == ["/late"]


@pytest.mark.parametrize("shape", ["request-line-9k", "request-line-70k", "header-line-10k", "post-after-70k-headers",
                                   "chunk-extension-5k", "status-line-6k"])
def test_long_lines_kind(tmp_path, shape):
    """Case 11's kind, other spellings, through filex: start lines and header lines above 8 KiB and 64 KiB,
    a POST body behind a 70 KiB header block (its Content-Length is past the 64 KiB kept), a 5 KiB chunk
    extension, a 6 KiB status line; every body is the bytes sent (hashlib), the request keeps its method and
    the URI (its first 64 KiB when longer)."""
    body = bytes(range(256)) * 20
    c = pb.Conv(cport=46500)
    c.handshake()
    uri, method, resp = "/k", "GET", pb.http_response(body, [("Content-Length", len(body))])
    headers, req_body = [], b""
    if shape.startswith("request-line"):
        uri = "/q?" + "a" * (9000 if shape.endswith("9k") else 70000)
    elif shape == "header-line-10k":
        headers = [("Cookie", "c" * 10000)]
    elif shape == "post-after-70k-headers":
        method, headers, req_body = "POST", [(f"X-F{i}", "f" * 999) for i in range(70)], body
        headers.append(("Content-Length", len(body)))
        resp = pb.http_response(b"ok", [("Content-Length", 2)])
    elif shape == "chunk-extension-5k":
        resp = (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                + b"%x;e=%s\r\n" % (len(body), b"x" * 5000) + body + b"\r\n0\r\n\r\n")
    else:
        resp = b"HTTP/1.1 200 " + b"O" * 6000 + b"\r\nContent-Length: %d\r\n\r\n" % len(body) + body
    c.send(True, pb.http_request(uri, method=method, headers=headers, body=req_body))
    c.send(False, resp)
    c.close()
    files, _, s, _ = run_kinds(tmp_path, c.frames)
    want = [(method, uri[:65532], len(body), SHA(body))]
    if method == "POST":
        want.append((method, uri, 2, SHA(b"ok")))
    assert [(f[0], f[1], int(f[3]), f[4]) for f in files] == want


@pytest.mark.parametrize("coding,framing", [("gzip", "length"), ("gzip", "chunked"), ("deflate", "length"),
                                            ("gzip, gzip", "length")])
def test_compressed_body_that_decodes_to_nothing_is_an_empty_file(tmp_path, coding, framing):
    """Case 08's kind (gzip bodies): a body whose compressed bytes decode to nothing (the gzip of an empty file,
    20 bytes on the wire) is a file of 0 bytes, whole. Before, filex opened a file only at the first decoded byte,
    so onfile_http was never called for such a response. Truth: Python's decoders give b"" for the body we sent,
    and tshark's --export-objects http writes an empty object for the gzip cases."""
    enc = {"gzip": lambda b: gzip.compress(b, mtime=0), "deflate": zlib.compress,
           "gzip, gzip": lambda b: gzip.compress(gzip.compress(b, mtime=0), mtime=0)}[coding]
    wire = enc(b"")
    assert len(wire) > 0
    assert (zlib.decompress(wire) if coding == "deflate" else gzip.decompress(gzip.decompress(wire))
            if coding == "gzip, gzip" else gzip.decompress(wire)) == b""
    c = pb.Conv(cport=46500)
    c.handshake()
    c.send(True, pb.http_request("/empty.txt"))
    if framing == "chunked":
        body, hdrs = b"%x\r\n%s\r\n0\r\n\r\n" % (len(wire), wire), [("Transfer-Encoding", "chunked")]
    else:
        body, hdrs = wire, [("Content-Length", len(wire))]
    c.send(False, pb.http_response(body, [("Content-Encoding", coding), *hdrs]))
    c.close()
    files, _, _, _ = run_kinds(tmp_path, c.frames)
    assert [(f[1], f[3], f[4], f[6]) for f in files] == [("/empty.txt", "0", SHA(b""), "nil")]
    if coding == "gzip":
        assert tshark_http_object(tmp_path, c.frames, "empty.txt") == b""


@pytest.mark.parametrize("framing,want_file", [("chunked", True), ("length", False)])
def test_an_empty_chunked_body_is_an_empty_file_and_a_zero_length_is_none(tmp_path, framing, want_file):
    """Case 08's kind (body framing): a chunked response of only its last chunk ("0\\r\\n\\r\\n") was sent as a
    body, so it is a file of 0 bytes, as tshark's --export-objects http writes it; "Content-Length: 0" declares
    no body, and tshark writes no object for it.  Before, both gave no file."""
    c = pb.Conv(cport=46600)
    c.handshake()
    c.send(True, pb.http_request("/nothing.txt"))
    if framing == "chunked":
        c.send(False, pb.http_response(b"0\r\n\r\n", [("Transfer-Encoding", "chunked")]))
    else:
        c.send(False, pb.http_response(b"", [("Content-Length", 0)]))
    c.close()
    files, _, _, _ = run_kinds(tmp_path, c.frames)
    try:
        tshark_obj = tshark_http_object(tmp_path, c.frames, "nothing.txt")
    except FileNotFoundError:
        tshark_obj = None
    assert tshark_obj == (b"" if want_file else None)
    want = [("/nothing.txt", "0", SHA(b""), "nil")] if want_file else []
    assert [(f[1], f[3], f[4], f[6]) for f in files] == want


def gzip_member(data: bytes, flags: int) -> bytes:
    """One gzip member (RFC 1952 §2.3) with the optional header fields of `flags` as gzip(1) / pigz write them:
    FHCRC 0x02 (CRC-16 of the header), FEXTRA 0x04 (an 'AB' subfield), FNAME 0x08, FCOMMENT 0x10."""
    h = struct.pack("<BBBBIBB", 0x1F, 0x8B, 8, flags, 0, 0, 3)
    if flags & 0x04:
        h += struct.pack("<H", 6) + b"AB\x02\x00xy"
    if flags & 0x08:
        h += b"part.log\x00"
    if flags & 0x10:
        h += b"a comment\x00"
    if flags & 0x02:
        h += struct.pack("<H", zlib.crc32(h) & 0xFFFF)
    co = zlib.compressobj(6, zlib.DEFLATED, -15)
    return h + co.compress(data) + co.flush() + struct.pack("<II", zlib.crc32(data), len(data))


@pytest.mark.parametrize("v6", [False, True])
def test_gzip_members_with_header_fields_in_chunks_kind(tmp_path, v6):
    """Case 08's kind as gzip(1) writes members (`gzip -N` keeps the name; `cat a.gz b.gz`): members whose headers
    carry FNAME, FCOMMENT, FEXTRA and FHCRC, an empty member between them, sent chunked (chunks of 7 to 300 bytes,
    so a member's end and the next one's magic fall inside a chunk and across 333-byte segments). The file is
    every member's data. Truth: Python's gzip.decompress of the body sent (tshark 4.0.17 exports the first
    member only, as case 08 says)."""
    import random
    rng = random.Random(8)
    one = bytes(rng.choice(b"alpha beta INFO WARN\n") for _ in range(3000))
    two = bytes(rng.choice(b"gamma delta log\n") for _ in range(4000))
    wire = gzip_member(one, 0x08 | 0x10) + gzip_member(b"", 0x04) + gzip_member(two, 0x02 | 0x08 | 0x04)
    assert gzip.decompress(wire) == one + two
    chunks, i = b"", 0
    while i < len(wire):
        n = rng.choice([7, 64, 300])
        chunks += b"%x\r\n" % len(wire[i:i + n]) + wire[i:i + n] + b"\r\n"
        i += n
    c = pb.Conv(cip="2001:db8::10" if v6 else "192.0.2.10", sip="2001:db8:1::20" if v6 else "198.51.100.20",
                cport=46700)
    c.handshake()
    c.send(True, pb.http_request("/app.log"))
    c.send(False, pb.http_response(chunks + b"0\r\n\r\n", [("Content-Encoding", "gzip"),
                                                           ("Transfer-Encoding", "chunked")]), mss=333)
    c.close()
    files, _, _, _ = run_kinds(tmp_path, c.frames)
    assert [(f[1], int(f[3]), f[4], f[6]) for f in files] == [("/app.log", len(one + two), SHA(one + two), "nil")]


def test_ipv6_extension_headers_around_the_fragment_header_kind(tmp_path):
    """Case 02's kind in IPv6 with extension headers on both sides of the Fragment header (RFC 8200 §4.1 order,
    §4.5): Hop-by-Hop and Destination Options in the unfragmentable part, another Destination Options header at
    the start of the fragmentable part (so the TCP header is behind it in the reassembled datagram and in no
    fragment's first bytes); the response's segment in 4 fragments captured in reverse order. One flow with every
    packet, the body whole. Truth: the body sent (hashlib) and tshark's --export-objects http."""
    body = bytes((i * 13 + 5) % 256 for i in range(4500))
    c = pb.Conv(cip="2001:db8::10", sip="2001:db8:1::20", cport=46701)
    c.handshake()
    c.send(True, pb.http_request("/ext.bin"))
    resp = pb.http_response(body, [("Content-Length", len(body))])
    seg = c.segment(False, pb.PSH | pb.ACK, resp)[40:]                   # the TCP segment, checksum made
    c.advance(False, len(resp))
    hbh = bytes([60, 0, 1, 4, 0, 0, 0, 0])                              # Hop-by-Hop (PadN) -> Destination Options
    dst = bytes([44, 0, 1, 4, 0, 0, 0, 0])                              # Destination Options -> Fragment
    fragmentable = bytes([6, 0, 1, 4, 0, 0, 0, 0]) + seg                 # Destination Options -> TCP, then TCP
    size = 1232
    pieces = []
    for off in range(0, len(fragmentable), size):
        more = off + size < len(fragmentable)
        fh = struct.pack("!BBHI", 60, 0, off | int(more), 0xABCD)        # Fragment: next is Destination Options
        pieces.append(pb.ipv6(c.sip, c.cip, 0, hbh + dst + fh + fragmentable[off:off + size]))
    assert len(pieces) == 4
    for p in pieces[::-1]:
        c.add(p, False)
    c.seg(True, pb.ACK)
    c.close()
    files, counts, s, out = run_kinds(tmp_path, c.frames, counters=("tcp",))
    assert [(f[1], int(f[3]), f[4], f[6]) for f in files] == [("/ext.bin", len(body), SHA(body), "nil")]
    assert s["ip_reassembly"]["fragments"] == 4 and s["ip_reassembly"]["datagrams"] == 1
    (fl,) = flows(out)
    assert fl[1:] == (len(c.frames), "CLOSED")                           # no port-0 phantom flow
    assert len(counts["tcp"]) == len(c.frames) - 4 + 1                   # TCP hook: the datagram once
    assert tshark_http_object(tmp_path, c.frames, "ext.bin", out_of_order=False) == body


def test_pipelined_long_request_lines_kind(tmp_path):
    """Case 11's kind, pipelined, over IPv6: two requests with 6,010- and 9,005-character URIs sent back to back
    in 1,000-byte segments (the second request line starts inside a segment), then both responses. Each file
    keeps its own method and whole URI. Truth: tshark's http.request.uri of both requests and the bodies sent."""
    u1 = "/search?q=" + "".join("0123456789abcdef"[(i * 7) % 16] for i in range(6000))
    u2 = "/p?x=" + "y" * 9000
    b1, b2 = bytes(range(256)) * 3, bytes(range(255, -1, -1)) * 4
    c = pb.Conv(cip="2001:db8::10", sip="2001:db8:1::20", cport=46702)
    c.handshake()
    c.send(True, pb.http_request(u1) + pb.http_request(u2), mss=1000)
    c.send(False, pb.http_response(b1, [("Content-Length", len(b1))]) + pb.http_response(b2, [("Content-Length",
                                                                                                 len(b2))]))
    c.close()
    files, _, _, _ = run_kinds(tmp_path, c.frames)
    assert [(f[0], f[1], int(f[3]), f[4]) for f in files] == [("GET", u1, len(b1), SHA(b1)),
                                                             ("GET", u2, len(b2), SHA(b2))]
    pcap = str(tmp_path / "t.pcap")
    pb.write_pcap(pcap, c.frames)
    r = subprocess.run(["tshark", "-r", pcap, "-Y", "http.request", "-T", "fields", "-e", "http.request.uri"],
                       capture_output=True, text=True, check=True)
    assert r.stdout.split() == [u1, u2]


@pytest.mark.parametrize("v6", [False, True])
@pytest.mark.parametrize("shape", ["first-late", "first-late-after-60k", "lead-never-captured"])
def test_ack_before_data_in_a_connection_picked_up_mid_stream_kind(tmp_path, v6, shape):
    """Case 03's kind when the capture began after the handshake: the connection's first packet is the client's
    request (its ACK number is where the server's stream stands), and the response's first segment is captured
    after the second (after 43 segments, ~60 KB, with the server's sequence numbers wrapping past 2^32, in
    `first-late-after-60k`) and after the client's ACK of them. The response starts at the request's ACK number,
    not at its first captured byte: the file is whole. Before, the first captured byte was taken for the stream's
    start, so the late first segment was behind it (a retransmission) and the response was lost (no file).
    `lead-never-captured`: the server's 1,400 bytes before the response were sent before the capture began and
    never come; the stream starts at the response as before, with no gap. Truth: the bytes the generator sent
    (tshark 4.0.17, out-of-order reassembly on, exports only the first 1,400 bytes of the late-first shapes)."""
    body = bytes((i * 11 + 3) % 256 for i in range(80000 if shape == "first-late-after-60k" else 5000))
    c = pb.Conv(cip="2001:db8::10" if v6 else "192.0.2.10", sip="2001:db8:1::20" if v6 else "198.51.100.20",
                cport=46703, cisn=777777, sisn=4294960000 if shape == "first-late-after-60k" else 888888)
    c.send(True, pb.http_request("/mid.bin"), ack=False)                 # the capture's first packet
    if shape == "lead-never-captured":
        c.advance(False, 1400)
    resp = pb.http_response(body, [("Content-Length", len(body))])
    segs = []
    for i in range(0, len(resp), 1400):
        segs.append(c.segment(False, pb.PSH | pb.ACK, resp[i:i + 1400]))
        c.advance(False, len(resp[i:i + 1400]))
    late = 0 if shape == "lead-never-captured" else 44 if shape == "first-late-after-60k" else 3
    order = list(range(len(segs))) if not late else [*range(1, late), "ack", 0, *range(late, len(segs))]
    for i in order:
        if i == "ack":
            c.seg(True, pb.ACK)                                          # acknowledges all of them, S1 included
        else:
            c.add(segs[i], False)
    c.seg(True, pb.ACK)
    c.close()
    files, _, s, _ = run_kinds(tmp_path, c.frames)
    assert [(f[0], f[1], int(f[3]), f[4], f[6]) for f in files] == [("GET", "/mid.bin", len(body), SHA(body), "nil")]
    assert s["filex"][0]["tcp_gaps"] == 0
    assert s["filex"][0]["tcp_late_fills"] == (0 if shape == "lead-never-captured" else 1)
