"""reassembly_handler end to end (engine/streams/stage.lua, handler.lua, tls.lua; docs.trisul.org/docs/lua/reassembly).

Real-shaped plug-ins run over the Trisul tutorial captures in tests/data (trisul-16minutes.pcap: FTP control
and active-mode data connections; trisul-tutorial.pcap: HTTP and TLS 1.2 handshakes with certificates).
Independent truth comes from tshark 4.0 (run by the tests):
* payload bytes per direction: ``tshark -q -z follow,tcp,raw,N`` (Node 0 = the client);
* HTTP attributes: ``http.request.uri``, ``http.host``, ``http.user_agent``, ``http.content_type``;
* TLS: ``tls.handshake.ciphersuite`` of each ServerHello, the certificate bytes of each Certificate message
  (``tls.handshake.certificate``) decoded with CPython's ``ssl`` module (OpenSSL, not the `cryptography`
  package luaprobe uses), and the count of non-application-data records (``tls.record.content_type``).
A hypothesis test checks the TLS record framing against the records it was built from, however the
stream is cut.
"""
from __future__ import annotations

import collections
import os
import re
import shutil
import ssl
import struct
import subprocess
import sys

import pytest
from hypothesis import given, settings, strategies as st

from luaprobe.engine.fastpath.run import FastPath, RunConfig
from luaprobe.engine.store.writer import Store
from luaprobe.shm.luajit import new_runtime
from tests import helpers

DATA = os.path.join(helpers.REPO, "tests", "data")
FTP = os.path.join(DATA, "trisul-16minutes.pcap")
TUTORIAL = os.path.join(DATA, "trisul-tutorial.pcap")
TSHARK = shutil.which("tshark")
needs_tshark = pytest.mark.skipif(TSHARK is None, reason="tshark is not installed (the independent truth)")


def tshark(*args) -> str:
    return subprocess.run([TSHARK, *args], capture_output=True, text=True, check=True).stdout


def ipkey(ip: str) -> str:
    return ".".join(f"{int(x):02X}" for x in ip.split("."))


def flowkey(ip1, p1, ip2, p2, proto=6) -> str:
    """Trisul flow id (docs/reference.md conventions): Z is the lower port; on a tie the lower address."""
    a, z = (ip1, p1), (ip2, p2)
    if p1 < p2 or (p1 == p2 and tuple(map(int, ip1.split("."))) < tuple(map(int, ip2.split(".")))):
        a, z = z, a
    return f"{proto:02X}A:{ipkey(a[0])}:p-{a[1]:04X}_{ipkey(z[0])}:p-{z[1]:04X}"


def fill(template: str, *args) -> str:
    """Substitute %q (a Lua long-string literal) and %s (raw Lua code) markers in order; %% is %."""
    it = iter(args)

    def sub(m):
        return "%" if m.group(0) == "%%" else (f"[==[{next(it)}]==]" if m.group(0) == "%q" else str(next(it)))
    return re.sub(r"%[qs%]", sub, template)


def run(tmp_path, plugins, files, name="out", **kw) -> dict:
    summary = FastPath(RunConfig(plugins=list(plugins), files=list(files), out_dir=str(tmp_path / name), **kw)).run()
    assert summary["input_errors"] == [] and summary["plugin_problems"] == []
    for p in summary["plugins"]:
        assert p["hook_errors"] == {}, p
    return summary


# A payload saver shaped like trisul-scripts' savetcp.lua / ftp.lua: writetofile(file, seekpos) per
# flow and direction, plus an event log (kind, flowkey, dir, seekpos, size) to check offsets and order.
SAVER = r'''
local OUT = %q
TrisulPlugin = {
  id = { name = "saver" },
  onload = function() T.log_ = io.open(OUT .. "/events.tsv", "w") end,
  onunload = function() T.log_:close() end,
  reassembly_handler = {
    filter = function(engine, ts, flow) return %s end,
    onnewflow = function(engine, ts, flow) T.log_:write("new\t", flow:id(), "\n") end,
    onpayload = function(engine, ts, flow, dir, seekpos, buf)
      T.log_:write("data\t", flow:id(), "\t", dir, "\t", seekpos, "\t", buf:size(), "\n")
      buf:writetofile(OUT .. "/" .. flow:id() .. "_" .. dir, seekpos)
    end,
    onterminateflow = function(engine, ts, flow) T.log_:write("end\t", flow:id(), "\n") end,
  },
}
'''


def events(out) -> list[list[str]]:
    with open(os.path.join(out, "events.tsv")) as f:
        return [line.rstrip("\n").split("\t") for line in f]


def _follow_block(text: str) -> tuple[str, bytes, bytes]:
    """(flowkey, client->server bytes, server->client bytes) of one ``-z follow,tcp,raw`` block of tshark."""
    nodes, c2s, s2c = [], [], []
    for line in text.splitlines():
        if line.startswith("Node "):
            host, port = line.split(": ", 1)[1].rsplit(":", 1)
            nodes.append((host, int(port)))
        elif line.startswith("\t") and line.strip() and nodes:
            s2c.append(bytes.fromhex(line.strip()))
        elif line and all(c in "0123456789abcdef" for c in line) and nodes:
            c2s.append(bytes.fromhex(line))
    (ip0, p0), (ip1, p1) = nodes
    return flowkey(ip0, p0, ip1, p1), b"".join(c2s), b"".join(s2c)


_FOLLOWED: dict = {}        # (pcap, tcp stream) -> follow()'s triple, for this test process


def follow_all(pcap, streams) -> dict[int, tuple[str, bytes, bytes]]:
    """{stream: follow(pcap, stream)} for the TCP ``streams``: the ones not yet followed in this process in one
    tshark pass (one ``-z follow,tcp,raw,N`` per stream; each block names its stream), not one pass each."""
    todo = sorted({int(s) for s in streams} - {s for (f, s) in _FOLLOWED if f == pcap})
    if todo:
        text = tshark("-r", pcap, "-q", *[a for s in todo for a in ("-z", f"follow,tcp,raw,{s}")])
        blocks = text.split("Follow: tcp,raw")[1:]
        assert len(blocks) == len(todo), (pcap, todo, len(blocks))
        for block in blocks:
            s = int(re.search(r"^Filter: tcp\.stream eq (\d+)$", block, re.M).group(1))
            _FOLLOWED[(pcap, s)] = _follow_block(block)
    return {int(s): _FOLLOWED[(pcap, int(s))] for s in streams}


def follow(pcap, stream) -> tuple[str, bytes, bytes]:
    """(flowkey, client->server bytes, server->client bytes) of one TCP stream, from tshark."""
    return follow_all(pcap, [stream])[int(stream)]


@needs_tshark
def test_ftp_payloads_match_tshark_follow(tmp_path):
    """Every FTP control and data connection: the bytes written at seekpos per direction equal tshark's
    reassembled stream; dir 1 is client->server (the USER command), offsets are contiguous."""
    out = tmp_path / "files"
    out.mkdir()
    plugin = helpers.write_plugin(tmp_path, fill(SAVER, str(out), 'flow:id():match("p%-001[45]") ~= nil'))
    summary = run(tmp_path, [plugin], [FTP])
    streams = sorted({int(x) for x in tshark("-r", FTP, "-Y", "tcp.port==20 || tcp.port==21", "-T", "fields",
                                              "-e", "tcp.stream").split()})
    assert len(streams) == 7
    ev = events(out)
    news = [e[1] for e in ev if e[0] == "new"]
    ends = [e[1] for e in ev if e[0] == "end"]
    checked = 0
    followed = follow_all(FTP, streams)
    for s in streams:
        key, c2s, s2c = followed[s]
        assert key in news
        for d, want in ((1, c2s), (0, s2c)):
            path = out / f"{key}_{d}"
            got = path.read_bytes() if path.exists() else b""
            assert got == want, (key, d, len(got), len(want))
            checked += len(want)
            offs = [(int(e[3]), int(e[4])) for e in ev if e[0] == "data" and e[1] == key and int(e[2]) == d]
            pos = 0
            for off, size in offs:
                assert off == pos
                pos += size
    assert checked > 10000                                  # 12 811 bytes in 7 connections
    assert sorted(news) == sorted(ends)                     # every reassembled flow terminates once
    assert b"USER anonymous" in (out / f"{follow(FTP, 276)[0]}_1").read_bytes()
    # 7 connections, and the 4 refused SYN/RST attempts on 20<->20 are 4 connections (each RST ends one)
    assert len(set(news)) == 7 and len(news) == 10
    assert summary["reassembly"]["flows"] == len(news)


HTTP_TLS = r'''
local OUT = %q
TrisulPlugin = {
  id = { name = "attrs" },
  onload = function() T.f = io.open(OUT, "w") end,
  onunload = function() T.f:close() end,
  reassembly_handler = {
    onattribute = function(engine, ts, flow, name, value)
      if name == "TLS:RECORD" then
        T.f:write(flow:id(), "\tTLS:RECORD\t", value:byte(1), "\t", #value, "\n")
      elseif name == "HTTP-Header" then
        T.f:write(flow:id(), "\tHTTP-Header\t", value:match("^[^\r\n]*"), "\t", #value, "\n")
      else
        T.f:write(flow:id(), "\t", name, "\t", value, "\n")
      end
    end,
  },
}
'''


def attributes(path) -> dict:
    out = collections.defaultdict(list)
    with open(path) as f:
        for line in f:
            key, name, *rest = line.rstrip("\n").split("\t")
            out[name].append((key, *rest))
    return out


def _org(cert_der: bytes) -> tuple[str, str, bool]:
    """(subject O or CN, issuer O or CN, self-issued) decoded with CPython's ssl module (OpenSSL)."""
    import tempfile
    with tempfile.NamedTemporaryFile("w", suffix=".pem", delete=False) as f:
        f.write(ssl.DER_cert_to_PEM_cert(cert_der))
    try:
        d = ssl._ssl._test_decode_cert(f.name)
    finally:
        os.unlink(f.name)

    def pick(name):
        flat = dict(x for rdn in d[name] for x in rdn)
        return flat.get("organizationName") or flat.get("commonName", "")
    return pick("subject"), pick("issuer"), d["subject"] == d["issuer"]


# The legacy flowmonitor script type (trisul-scripts' techniques/httplog.lua, tagflow.lua, httpsvr.lua): the same
# attributes through flowmonitor.onflowattribute(engine, flow, ts, name, buffer), the value a Buffer
FLOWMONITOR = HTTP_TLS.replace(
    "  reassembly_handler = {\n    onattribute = function(engine, ts, flow, name, value)\n",
    "  flowmonitor = {\n    onflowattribute = function(engine, flow, ts, name, buf)\n"
    "      assert(type(ts) == 'number' and buf:size() >= 0)\n      local value = buf:tostring()\n")


@needs_tshark
@pytest.mark.parametrize("form", ["reassembly_handler", "flowmonitor"])
def test_http_and_tls_attributes_match_tshark(tmp_path, form):
    out = tmp_path / "attrs.tsv"
    plugin = helpers.write_plugin(tmp_path, fill({"reassembly_handler": HTTP_TLS, "flowmonitor": FLOWMONITOR}[form],
                                                 str(out)))
    assert FLOWMONITOR != HTTP_TLS
    run(tmp_path, [plugin], [TUTORIAL])
    got = attributes(out)

    # HTTP: one URI / Host / User-Agent per request, Content-Type per response that has one
    rows = [line.split("\t") for line in tshark("-r", TUTORIAL, "-Y", "http.request && tcp", "-T", "fields", "-e", "ip.src",
                                                "-e", "tcp.srcport", "-e", "ip.dst", "-e", "tcp.dstport", "-e",
                                                "http.request.uri", "-e", "http.host", "-e",
                                                "http.user_agent").splitlines()]
    want_uri = collections.Counter((flowkey(r[0], int(r[1]), r[2], int(r[3])), r[4]) for r in rows)
    want_host = collections.Counter((flowkey(r[0], int(r[1]), r[2], int(r[3])), r[5]) for r in rows)
    want_ua = collections.Counter((flowkey(r[0], int(r[1]), r[2], int(r[3])), r[6]) for r in rows if r[6])
    assert len(rows) == 14                                   # (+ 4 SSDP requests over UDP: not reassembled)
    assert collections.Counter(got["URI"]) == want_uri
    assert collections.Counter(got["Host"]) == want_host
    assert collections.Counter(got["User-Agent"]) == want_ua
    ct = [line.split("\t") for line in tshark("-r", TUTORIAL, "-Y", "http.response && http.content_type && tcp", "-T",
                                              "fields", "-e", "ip.src", "-e", "tcp.srcport", "-e", "ip.dst", "-e",
                                              "tcp.dstport", "-e", "http.content_type").splitlines()]
    assert collections.Counter(got["Content-Type"]) == collections.Counter(
        (flowkey(r[0], int(r[1]), r[2], int(r[3])), r[4]) for r in ct)
    heads = collections.Counter(h[1].split(" ")[0] for h in got["HTTP-Header"])
    assert heads["HTTP/1.1"] == len(ct) or heads["HTTP/1.1"] >= len(ct)
    assert sum(v for k, v in heads.items() if k != "HTTP/1.1") == len(rows)

    # TLS:CIPHER: the ServerHello's cipher suite, 4 upper-case hex digits
    sh = [line.split("\t") for line in tshark("-r", TUTORIAL, "-Y", "tls.handshake.type==2", "-T", "fields", "-e",
                                              "ip.src", "-e", "tcp.srcport", "-e", "ip.dst", "-e", "tcp.dstport",
                                              "-e", "tls.handshake.ciphersuite").splitlines()]
    assert len(sh) == 10
    assert sorted(got["TLS:CIPHER"]) == sorted((flowkey(r[0], int(r[1]), r[2], int(r[3])), f"{int(r[4], 16):04X}")
                                               for r in sh)

    # certificates: TLS:O = the server certificate's subject O (else CN); intermediates and the root
    want_o, want_inter, want_root = tls_cert_names(TUTORIAL)
    assert len(want_o) == 10
    assert sorted(got["TLS:O"]) == sorted(want_o)
    assert sorted(got["TLS:CA:INTER"]) == sorted(want_inter)
    assert sorted(got["TLS:CA:ROOT"]) == sorted(want_root)

    # TLS:RECORD: every record that is not application data, whole (5-byte header included)
    mine = collections.Counter((int(r[1]), int(r[2])) for r in got["TLS:RECORD"])
    assert mine == tls_records(TUTORIAL)


@needs_tshark
def test_response_attributes_after_a_lost_segment(tmp_path):
    """A lost segment inside a Content-Length body (http-website-keepalive, frame 179: "Previous segment not
    captured") is a hole of that many bytes: the HTTP analyser skips them as body and reads the next response's
    header.  Independent truth: the server segments whose payload starts with "HTTP/1." (tshark's raw payload, one
    per stream and sequence number): 31, one more than tshark's own HTTP dissector finds (it loses the response
    after the hole).  Before, the hole was passed to the analyser as 0 bytes, the body ate the next two responses
    and their HTTP-Header / Content-Type attributes were missing (29)."""
    pcap = os.path.join(DATA, "http-website-keepalive.pcap")
    out = tmp_path / "attrs.tsv"
    run(tmp_path, [helpers.write_plugin(tmp_path, fill(HTTP_TLS, str(out)))], [pcap])
    got = collections.Counter(k for k, head, _n in attributes(out)["HTTP-Header"] if head.startswith("HTTP/1."))
    want = collections.Counter()
    seen = set()
    for line in tshark("-r", pcap, "-Y", "tcp.srcport==80 && tcp.len>0", "-T", "fields", "-e", "ip.src", "-e",
                       "tcp.srcport", "-e", "ip.dst", "-e", "tcp.dstport", "-e", "tcp.seq_raw",
                       "-e", "tcp.payload").splitlines():
        src, sport, dst, dport, seq, payload = line.split("\t")
        key = flowkey(src, int(sport), dst, int(dport))
        if payload.replace(":", "").startswith(b"HTTP/1.".hex()) and (key, seq) not in seen:
            seen.add((key, seq))
            want[key] += 1
    assert sum(want.values()) == 31
    assert got == want


# httpsvr.lua's shape (trisul-scripts frontend_scripts/httpserver): a countergroup and a flowmonitor in one file,
# the hook parses the response's HTTP-Header Buffer and counts a hit per Server name, and tags the flow
HTTPSVR = r'''
local G = "{0E4281ED-5545-4BF2-94F2-C4027FBC9AFA}"
TrisulPlugin = {
  id = { name = "server hits" },
  countergroup = {
    control = { guid = G, name = "Web Server", description = "Server header", bucketsize = 30 },
    meters = { { 0, T.K.vartype.RATE_COUNTER, 10, "Bytes", "bytes", "B" },
               { 1, T.K.vartype.COUNTER, 10, "Hits", "hits", "H" } },
  },
  flowmonitor = {
    onflowattribute = function(engine, flow, timestamp, attribute_name, attribute_value)
      if attribute_name ~= "HTTP-Header" then return end
      local hdr = attribute_value:tostring()
      local svr = hdr:match("^HTTP/[^\r\n]*\r\n") and hdr:match("\r\n[Ss]erver%s*:%s*([^\r\n]*)")
      if svr then
        local name = svr:match("^%S+")
        engine:update_counter(G, name, 1, 1)
        engine:tag_flow(flow:id(), "srv-" .. name)
      end
    end,
  },
}
'''


@needs_tshark
def test_flowmonitor_counts_server_hits_like_httpsvr(tmp_path):
    """A flowmonitor beside a countergroup in one file (httpsvr.lua): its hits per Server name, and the flows it
    tagged, are tshark's responses with an http.server field (the name's first word) and their flows."""
    run(tmp_path, [helpers.write_plugin(tmp_path, HTTPSVR, "httpsvr.lua")], [TUTORIAL])
    rows = [line.split("\t") for line in tshark("-r", TUTORIAL, "-Y", "http.response && http.server && tcp", "-T",
                                                "fields", "-e", "ip.src", "-e", "tcp.srcport", "-e", "ip.dst", "-e",
                                                "tcp.dstport", "-e", "http.server").splitlines()]
    want = collections.Counter(r[4].split()[0] for r in rows)
    assert len(want) >= 2 and sum(want.values()) >= 10
    with Store(str(tmp_path / "out")) as s:
        hits = collections.Counter()
        for c in s.counters():
            if c["group_guid"] == "{0E4281ED-5545-4BF2-94F2-C4027FBC9AFA}" and int(c["meter"]) == 1:
                hits[c["key"]] += int(c["value"])
        tags = {f["flowkey"]: f["tags"] for f in s.flows() if f["tags"]}
    assert hits == want
    assert tags == {flowkey(r[0], int(r[1]), r[2], int(r[3])): f"srv-{r[4].split()[0]}" for r in rows}


def tls_cert_names(path) -> tuple[list, list, list]:
    """[(flowkey, name)] for TLS:O, TLS:CA:INTER and TLS:CA:ROOT from tshark's certificate bytes, decoded by
    CPython's ssl module: the server certificate's subject O (else CN); each further certificate's subject,
    as a root when self-issued; the last certificate's issuer as the root when the chain does not end in one."""
    cm = [line.split("\t") for line in tshark("-r", path, "-Y", "tls.handshake.type==11", "-T", "fields", "-e",
                                              "ip.src", "-e", "tcp.srcport", "-e", "ip.dst", "-e", "tcp.dstport",
                                              "-e", "tls.handshake.certificate").splitlines()]
    want_o, want_inter, want_root = [], [], []
    for r in cm:
        key = flowkey(r[0], int(r[1]), r[2], int(r[3]))
        chain = [_org(bytes.fromhex(h)) for h in r[4].split(",")]
        want_o.append((key, chain[0][0]))
        for subj, _, root in chain[1:]:
            (want_root if root else want_inter).append((key, subj))
        if not chain[-1][2]:
            want_root.append((key, chain[-1][1]))
    return want_o, want_inter, want_root


def tls_records(path) -> collections.Counter:
    """{(content type, bytes with the 5-byte header): count} of every TLS record but application data (tshark)."""
    recs = collections.Counter()
    for line in tshark("-r", path, "-o", "tls.desegment_ssl_records:TRUE", "-Y", "tls", "-T", "fields",
                       "-e", "tls.record.content_type", "-e", "tls.record.length").splitlines():
        types, lens = line.split("\t")
        for t, n in zip(types.split(","), lens.split(",")):
            if t and int(t) != 23:
                recs[(int(t), int(n) + 5)] += 1
    return recs


# The legacy onattribute order of trisul-scripts' socialalert.lua and tls-heartbeat-2.lua (a flow, then the
# time, and a Buffer value), in their shape: T.re2 on the certificate organisation, add_alert_ids, Buffer
# methods on TLS:RECORD; loaded next to a documented-order handler (HTTP_TLS) in the same run.
LEGACY = r'''
local OUT = %q
TrisulPlugin = {
  id = { name = "legacy order" },
  onload = function()
    T.f = io.open(OUT, "w")
    TrisulPlugin.k = T.re2("github|google")
  end,
  onunload = function() T.f:close() end,
  reassembly_handler = {
    onattribute = function(engine,flow,timestamp, nm, valbuff)
      if nm == "TLS:RECORD" then
        T.f:write(flow:id(), "\tTLS:RECORD\t", valbuff:hval_8(0), "\t", valbuff:size(), "\t", type(timestamp), "\n")
      elseif nm == "TLS:O" then
        local v = valbuff:tostring():lower()
        T.f:write(flow:id(), "\tTLS:O\t", valbuff:tostring(), "\n")
        if TrisulPlugin.k:partial_match(v) then
          engine:add_alert_ids("{9AFD8C08-07EB-47E0-BF05-28B4A7AE8DC9}", flow:id(), "sid-8000001", "lua-social", 1,
                               "Detected social media usage")
        end
      end
    end,
  },
}
'''


@needs_tshark
def test_legacy_onattribute_order(tmp_path):
    legacy_out, doc_out = tmp_path / "legacy.tsv", tmp_path / "doc.tsv"
    a = helpers.write_plugin(tmp_path, fill(LEGACY, str(legacy_out)), "legacy.lua")
    b = helpers.write_plugin(tmp_path, fill(HTTP_TLS, str(doc_out)), "doc.lua")
    summary = run(tmp_path, [a, b], [TUTORIAL])
    got, doc = attributes(legacy_out), attributes(doc_out)
    recs = tls_records(TUTORIAL)
    assert collections.Counter((int(r[1]), int(r[2])) for r in got["TLS:RECORD"]) == recs
    assert {r[3] for r in got["TLS:RECORD"]} == {"number"}
    assert collections.Counter((int(r[1]), int(r[2])) for r in doc["TLS:RECORD"]) == recs
    want_o = tls_cert_names(TUTORIAL)[0]
    assert sorted(got["TLS:O"]) == sorted(doc["TLS:O"]) == sorted(want_o)
    hits = [k for k, o in want_o if re.search("github|google", o.lower())]
    assert hits
    with Store(str(tmp_path / "out")) as s:
        alerts = s.alerts()
    assert sorted(x["flowkey"] for x in alerts) == sorted(hits)
    assert {x["sigid"] for x in alerts} == {"sid-8000001"}
    # luaprobe check says which order it will use
    legacy_line = "reassembly_handler.onattribute: legacy argument order (engine, flow, ts, name, buffer)"
    for path, legacy in ((a, True), (b, False)):
        r = subprocess.run([os.path.join(helpers.REPO, ".venv", "bin", "luaprobe"), "check", path],
                           capture_output=True, text=True)
        assert r.returncode == 0 and (legacy_line in r.stdout) == legacy, r.stdout + r.stderr


LEGACY_NAMES = r'''
local h = require("luaprobe.engine.streams.handler")
local stripped = loadstring(string.dump(function(engine, flow, ts, nm, v) end, true))
return {
  h.legacy_attribute_order(function(engine,flow,timestamp,attribute_name,attribute_value) end),  -- socialalert
  h.legacy_attribute_order(function(engine,flow,timestamp, nm, valbuff) end),                  -- tls-heartbeat-2
  h.legacy_attribute_order(function(engine, flowkey, ts, name, value) end),
  h.legacy_attribute_order(function(engine, timestamp, flowkey, attr_name, attr_value) end),   -- jahash, skeleton
  h.legacy_attribute_order(function(engine, time, flow, attr_type, attr_value) end),          -- flow_attributes
  h.legacy_attribute_order(function(engine, ts, flow, name, value) end),                      -- the docs
  h.legacy_attribute_order(function(e, a, b, c, d) end),
  h.legacy_attribute_order(function(...) end),
  h.legacy_attribute_order(stripped),
  h.legacy_attribute_order(nil),
}
'''


def test_legacy_onattribute_detection_by_parameter_names():
    got = list(new_runtime().execute(LEGACY_NAMES).values())
    assert got == [True, True, True, False, False, False, False, False, False, False]


VOTER = r'''
local OUT = %q
TrisulPlugin = {
  id = { name = "%s" },
  onload = function() T.f = io.open(OUT, "w") end,
  onunload = function() T.f:close() end,
  reassembly_handler = {
    %s
    onnewflow = function(engine, ts, flow) T.f:write("new\t", flow:id(), "\n") end,
    onpayload = function(engine, ts, flow, dir, seekpos, buf)
      T.f:write("data\t", flow:id(), "\t", buf:size(), "\n")
      %s
    end,
  },
}
'''


def lines(path):
    with open(path) as f:
        return [line.rstrip("\n").split("\t") for line in f]


def test_filter_votes_and_disable(tmp_path):
    """Reassembled unless every handler votes no (a handler without filter votes yes); every handler sees
    every reassembled flow; disable_reassembly stops one handler's payloads only."""
    a = helpers.write_plugin(tmp_path, fill(VOTER, str(tmp_path / "a.tsv"), "a",
                                                'filter = function(e, ts, f) return f:id():match("p%-0015") ~= nil end,',
                                                ""), "a.lua")
    b = helpers.write_plugin(tmp_path, fill(VOTER, str(tmp_path / "b.tsv"), "b",
                                                "filter = function() return false end,",
                                                "engine:disable_reassembly(flow)"), "b.lua")
    run(tmp_path, [a, b], [FTP], name="ab")
    la, lb = lines(tmp_path / "a.tsv"), lines(tmp_path / "b.tsv")
    new_a = {x[1] for x in la if x[0] == "new"}
    assert len(new_a) == 2 and all(k.endswith("p-0015") for k in new_a)   # the two FTP control connections
    assert {x[1] for x in lb if x[0] == "new"} == new_a                    # b voted no, still sees them
    per_flow_b = collections.Counter(x[1] for x in lb if x[0] == "data")
    assert set(per_flow_b.values()) == {1}                                  # disabled after its first payload
    assert sum(1 for x in la if x[0] == "data") > 2 * len(new_a)

    # every handler votes no: nothing is reassembled
    c = helpers.write_plugin(tmp_path, fill(VOTER, str(tmp_path / "c.tsv"), "c", "filter = function() return false end,",
                                                ""), "c.lua")
    summary = run(tmp_path, [c], [FTP], name="c")
    assert lines(tmp_path / "c.tsv") == [] and summary["reassembly"]["flows"] == 0

    # no filter: every TCP flow, as many as tshark's TCP conversations
    d = helpers.write_plugin(tmp_path, fill(VOTER, str(tmp_path / "d.tsv"), "d", "", ""), "d.lua")
    run(tmp_path, [d], [FTP], name="d")
    if TSHARK:
        convs = [x for x in tshark("-r", FTP, "-q", "-z", "conv,tcp").splitlines() if "<->" in x]
        assert len({x[1] for x in lines(tmp_path / "d.tsv") if x[0] == "new"}) == len(convs)


# ---------------------------------------------------------------------------------------------- tls.lua framing

def _records(draw_lens):
    recs = []
    for typ, n in draw_lens:
        body = bytes((typ * 7 + i) % 256 for i in range(n))
        recs.append(struct.pack(">BHH", typ, 0x0303, n) + body)
    return recs


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from([20, 21, 22, 23, 24]), st.integers(0, 3000)), min_size=1, max_size=12),
       st.lists(st.integers(1, 4000), min_size=1, max_size=30))
def test_tls_framing_any_segmentation(recspec, cuts):
    """Records cut at arbitrary points come out whole, in order; application data (23) is skipped."""
    recs = _records(recspec)
    stream = b"".join(recs)
    lua = new_runtime()
    feed = lua.eval(r'''function(chunks)
      local tls = require("luaprobe.engine.streams.tls")
      local out = {}
      local a = tls.new({ record = function(dir, rec) out[#out + 1] = rec end })
      for i = 1, #chunks do a:data(0, chunks[i], #chunks[i]) end
      return out, a.dead[0]
    end''')
    chunks, pos, i = [], 0, 0
    while pos < len(stream):
        n = cuts[i % len(cuts)]
        chunks.append(stream[pos:pos + n])
        pos += n
        i += 1
    out, dead = feed(lua.table_from(chunks))
    assert not dead
    assert [out[k] for k in range(1, len(out) + 1)] == [r for r in recs if r[0] != 23]


def test_tls_not_tls_stops():
    lua = new_runtime()
    dead = lua.eval(r'''function(s)
      local a = require("luaprobe.engine.streams.tls").new({})
      a:data(1, s, #s)
      return a.dead[1]
    end''')(b"\x16\x03\x01\x00\x05hello" + b"GET / HTTP/1.1\r\n")
    assert dead is True


def test_port_reuse_and_fragments_in_reassembly_handler(tmp_path):
    """Issue 12 inputs through reassembly_handler: a new SYN with a new ISN on an unclosed 5-tuple ends the
    old connection (onterminateflow) and starts a new one with its own stream offsets (case 04); a TCP
    segment that arrived as IP fragments in reverse order is one payload (case 02)."""
    cases = os.path.join(DATA, "cases")
    out = tmp_path / "files"
    out.mkdir()
    plugin = helpers.write_plugin(tmp_path, fill(SAVER, str(out), "true"))
    run(tmp_path, [plugin], [os.path.join(cases, "04-tcp-port-reuse-no-close", "input.pcap")])
    ev = events(out)
    assert [e[0] for e in ev if e[0] != "data"] == ["new", "end", "new", "end"]
    # connection 2's server stream starts at offset 0 again and holds /two.txt's response only
    key = ev[0][1]
    resp = (out / f"{key}_0").read_bytes()
    assert resp.startswith(b"HTTP/1.1 200") and resp.count(b"HTTP/1.1 200") == 1
    out2 = tmp_path / "files2"
    out2.mkdir()
    plugin2 = helpers.write_plugin(tmp_path, fill(SAVER, str(out2), "true"), name="p2.lua")
    run(tmp_path, [plugin2], [os.path.join(cases, "02-ipv4-frags-reversed-http", "input.pcap")], name="out2")
    ev = events(out2)
    key = ev[0][1]
    resp = (out2 / f"{key}_0").read_bytes()
    assert len(resp) == 81 + 2560 and resp.endswith(bytes(range(256)) * 10)
    assert [e[0] for e in ev if e[0] != "data"] == ["new", "end"]


def test_plugins_doc_example(tmp_path):
    """The reassembly_handler example of docs/plugins.md, run as written by the CLI: its URIs are tshark's
    ``http.request.uri`` in order, its byte counts tshark's TCP payload sums per direction (the client is the
    end that sent the SYN; the capture has no retransmission, so payload bytes = reassembled bytes)."""
    doc = open(os.path.join(helpers.REPO, "docs", "plugins.md")).read()
    start = doc.index("```lua\n", doc.index("### Example: request URIs and reassembled bytes")) + len("```lua\n")
    plugin = tmp_path / "uri_bytes.lua"
    plugin.write_text(doc[start:doc.index("```", start)])
    pcap = os.path.join(DATA, "http-keepalive-splunk-ui.pcap")
    r = subprocess.run([os.path.join(os.path.dirname(sys.executable), "luaprobe"), "run", str(plugin),
                        "--pcap", pcap, "--out", str(tmp_path / "out"), "-q"], capture_output=True, text=True,
                       timeout=120, cwd=str(tmp_path))
    assert r.returncode == 0 and r.stderr == "", r.stderr
    lines = [line.split("] ", 1)[1] for line in r.stdout.splitlines()]
    assert all(line.startswith("[uri_bytes.lua#") for line in r.stdout.splitlines())

    def tshark(*args):
        return subprocess.run(["tshark", "-r", pcap, *args], capture_output=True, text=True, check=True).stdout
    uris = tshark("-Y", "http.request", "-T", "fields", "-e", "http.request.uri").split()
    assert [x[4:] for x in lines if x.startswith("uri ")] == uris and len(uris) == 11
    pkts = [x.split("\t") for x in tshark("-T", "fields", "-e", "ip.src", "-e", "tcp.srcport", "-e", "ip.dst",
                                          "-e", "tcp.dstport", "-e", "tcp.flags.syn", "-e", "tcp.flags.ack",
                                          "-e", "tcp.len").splitlines()]
    client = next((p[0], p[1]) for p in pkts if p[4] == "1" and p[5] == "0")
    up = sum(int(p[6]) for p in pkts if (p[0], p[1]) == client)
    down = sum(int(p[6]) for p in pkts if (p[2], p[3]) == client)
    assert not tshark("-Y", "tcp.analysis.retransmission or tcp.analysis.out_of_order").strip()
    (got,) = [x for x in lines if x.startswith("bytes ")]
    assert got.endswith(f"client->server {up} server->client {down}"), (got, up, down)
    assert f"{client[0]}:{client[1]}" in got


# engine:add_flow_counter from reassembly_handler hooks (Trisul: "every later packet of the flow adds its length").
# Per TLS flow: three counters at the flow's first client payload (the ClientHello), both ways / client->server /
# server->client, and one at onnewflow (both ways: every packet after the flow's first one).
FLOW_COUNTERS = r'''
local G = "{7C1E0A52-3F11-4D5A-9B1E-6A2C55F0D001}"
TrisulPlugin = {
  id = { name = "flow counters" },
  countergroup = { control = { guid = G, name = "FC", bucketsize = 30 },
                   meters = { { 0, T.K.vartype.COUNTER, 10, "bytes", "bytes", "B" } } },
  onload = function() T.seen = {} end,
  reassembly_handler = {
    onnewflow = function(engine, ts, flow)
      if flow:id():find("p-01BB", 1, true) then engine:add_flow_counter(flow, G, flow:id() .. "|new", 0, 0) end
    end,
    onpayload = function(engine, ts, flow, dir, seekpos, buf)
      local id = flow:id()
      if dir == 1 and not T.seen[id] and id:find("p-01BB", 1, true) then
        T.seen[id] = true
        engine:add_flow_counter(id, G, id .. "|both", 0, 0)
        engine:add_flow_counter(id, G, id .. "|az", 0, 1)
        engine:add_flow_counter(id, G, id .. "|za", 0, 2)
      end
    end,
  },
}
'''


@needs_tshark
@pytest.mark.parametrize("batch", [1, 3, 1024])
def test_add_flow_counter_from_reassembly_handler(tmp_path, batch):
    """add_flow_counter called in onnewflow / onpayload counts the wire length of every later packet of the
    flow (the packet whose event made the call excluded; direction 1 = client->server, the A->Z of the flow
    key, 2 = server->client), whatever the batch size cuts the batch at.  Truth: tshark's frame.len per TCP
    stream after the stream's first frame / after the frame with the first client payload.  Counted nothing
    before (the counters were applied only in simplecounter's packet walk)."""
    plugin = helpers.write_plugin(tmp_path, FLOW_COUNTERS, "fc.lua")
    run(tmp_path, [plugin], [TUTORIAL], batch=batch)
    rows = [x.split("\t") for x in tshark("-r", TUTORIAL, "-Y", "tcp.port == 443", "-T", "fields", "-e",
                                          "frame.number", "-e", "frame.len", "-e", "ip.src", "-e", "tcp.srcport",
                                          "-e", "ip.dst", "-e", "tcp.dstport", "-e", "tcp.len").splitlines()]
    want = collections.Counter()
    flows = collections.defaultdict(list)
    for num, flen, src, sp, dst, dp, tlen in rows:
        flows[flowkey(src, int(sp), dst, int(dp))].append((int(num), int(flen), dp == "443", int(tlen)))
    for key, pkts in flows.items():
        first = min(n for n, _, _, _ in pkts)
        hello = min((n for n, _, up, tl in pkts if up and tl > 0), default=None)
        want[key + "|new"] = sum(ln for n, ln, _, _ in pkts if n > first)
        if hello is not None:
            want[key + "|both"] = sum(ln for n, ln, _, _ in pkts if n > hello)
            want[key + "|az"] = sum(ln for n, ln, up, _ in pkts if n > hello and up)
            want[key + "|za"] = sum(ln for n, ln, up, _ in pkts if n > hello and not up)
    with Store(str(tmp_path / "out")) as s:
        got = collections.Counter()
        for r in s.counters(group="FC", meter=0):
            got[r["key"]] += r["value"]
    assert len(flows) >= 8 and sum(want.values()) > 500_000
    assert got == +want


# ftp.lua's pattern (trisul-scripts reassembly/ftp.lua): the control connection's PORT command is broadcast with
# post_message_frontend, every instance (the sender included) learns the data endpoint in onmessage, and the data
# connection's payload is saved only when its endpoint is known by then.
FTP_MESSAGES = r'''
local OUT = %q
TrisulPlugin = {
  id = { name = "ftp ports" },
  onload = function() T.ports, T.log = {}, {} end,
  onmessage = function(msgid, msg)
    local ep = msg:match("^PORT (%S+)$")
    if ep then T.ports[ep] = true end
  end,
  onunload = function()
    local f = assert(io.open(OUT .. "/log.txt", "w")); f:write(table.concat(T.log, "\n")); f:close()
  end,
  reassembly_handler = {
    onpayload = function(engine, ts, flow, dir, seekpos, buf)
      local id = flow:id()
      if id:find("p-0015", 1, true) then
        local o = buf:tostring():match("PORT (%d+,%d+,%d+,%d+,%d+,%d+)")
        if o then
          local a, b, c, d, p0, p1 = o:match("(%d+),(%d+),(%d+),(%d+),(%d+),(%d+)")
          engine:post_message_frontend(("PORT %02X.%02X.%02X.%02X:p-%04X"):format(a, b, c, d, p0 * 256 + p1))
        end
      elseif T.ports[id:sub(24)] or T.ports[id:sub(5, 22)] then
        buf:writetofile(OUT .. "/" .. id .. "_" .. dir, seekpos)
      elseif id:find("p-0014", 1, true) then                 -- ftp-data whose endpoint is not known yet
        T.log[#T.log + 1] = "unknown " .. id .. " " .. seekpos
      end
    end,
  },
}
'''


@needs_tshark
@pytest.mark.parametrize("batch", [1, 1024])
def test_message_reaches_sender_before_its_next_event(tmp_path, batch):
    """A message posted by a reassembly_handler hook reaches the same instance's onmessage before its next hook
    (the sender's own instances receive their broadcasts), so the active-mode FTP data connections that start
    milliseconds after their PORT command (trisul-16minutes.pcap: /bin/ls listings and report42.doc.gz) are saved
    whole, at any batch size: each saved stream equals tshark's follow-stream bytes of that connection.  Before,
    messages waited for packet time to reach a new second and the data connections' payloads were unknown."""
    out = tmp_path / "files"
    out.mkdir()
    plugin = helpers.write_plugin(tmp_path, fill(FTP_MESSAGES, str(out)), "ftpports.lua")
    run(tmp_path, [plugin], [FTP], batch=batch)
    streams = tshark("-r", FTP, "-Y", "tcp.srcport == 20 and tcp.len > 0", "-T", "fields", "-e", "tcp.stream")
    streams = sorted({int(x) for x in streams.split()})
    assert len(streams) >= 4
    assert (out / "log.txt").read_text() == ""
    followed = follow_all(FTP, streams)
    for s in streams:
        key, c2s, s2c = followed[s]
        # Node 0 is the client (port 20 opened the connection): its bytes travel client -> server (dir 1)
        assert (out / f"{key}_1").read_bytes() == c2s and len(c2s) > 0, s
        assert not (out / f"{key}_0").exists() and s2c == b""


TERM_PLUGIN = '''TrisulPlugin = { id = { name = "term" },
  reassembly_handler = {
    onterminateflow = function(engine, ts, flow)
      local s, u = engine:timestamp()
      print(string.format("TERM %s %d %d %d", flow:id(), ts, s, u))
    end,
  },
}
'''


@pytest.mark.parametrize("shards", ["1", "2", "3"])
@pytest.mark.parametrize("gap", ["idle", "end"])
def test_idle_and_last_flows_terminate_at_the_same_time_with_shards(tmp_path, shards, gap):
    """onterminateflow of a flow that goes silent (http-get-text.pcap cut after its GET, then
    http-website-keepalive.pcap's 13 flows) comes at the probe's packet time when the flow ends, whatever the number
    of shards: `idle` (the keep-alive capture 10 months later), the first frame after the flow's 120 s of silence;
    `end` (moved to 5 s after), the end of input, at the first frame of the last second (the last tick, which every
    shard knows).  Truth: tshark's frame times of the file built.  Before, the hook's time was the last packet the
    stage had reassembled (a shard also ended idle flows only in the seconds of its own packets): `ts` and
    engine:timestamp() 1362692527 (the flow's own last frame) in all six cases, 0.139 s before the last second's first
    frame at the end with one fast path."""
    from .test_analysers import _records, _write
    from .test_fastpath import cli
    header, cut = _records(os.path.join(helpers.PCAPS, "http-get-text.pcap"))
    _, ka = _records(os.path.join(helpers.PCAPS, "http-website-keepalive.pcap"))
    cut = cut[:5]
    if gap == "end":
        shift = cut[-1][0] + 5 - ka[0][0]
        ka = [(s + shift, u, rest) for s, u, rest in ka]
    built = tmp_path / "built.pcap"
    _write(built, header, cut + ka)
    times = [float(line) for line in subprocess.run(["tshark", "-r", str(built), "-T", "fields", "-e",
                                                      "frame.time_epoch"], capture_output=True, text=True,
                                                     check=True).stdout.split()]
    last = max(times[:5])
    want = min(t for t in times if t > last + 120) if gap == "idle" else \
        min(t for t in times if int(t) == int(times[-1]))
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    (plugins / "term.lua").write_text(TERM_PLUGIN)
    r = cli("run", str(plugins), "--pcap", str(built), "--out", str(tmp_path / "out"), "-q", "--shards", shards)
    assert r.returncode == 0, r.stderr
    got = [line.split()[-4:] for line in r.stdout.splitlines() if "TERM 06A:8D.8E.E4.05:p-E9D0_" in line]
    assert len(got) == 1, r.stdout
    ts, s, u = (int(x) for x in got[0][1:])
    assert (ts, s) == (int(want), int(want))
    assert abs(s + u / 1e6 - want) <= 2e-6
