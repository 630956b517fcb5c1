"""filex_monitor end to end (engine/streams/filex.lua): real captures, real processes, `luaprobe run` / FastPath.

Every HTTP capture in tests/helpers.PCAPS runs through a test plug-in whose ``onfile_http`` copies each
file *synchronously* (io.open, read, write into the test's tmp dir: the file must exist during the
hook).  The SHA-256 multiset of the copies is compared with

    tshark -r FILE -q --export-objects http,DIR            (Wireshark 4.0.17)

run by the test itself (skipped, with the reason, only when tshark is missing) and with the sets pinned
in tests/test_http.py (TSHARK, DEVIATIONS: the three justified differences, documented in
docs/filex.md).  Flow keys come from tshark too: ``tshark -T json -x -Y http`` gives, per packet, the
TCP endpoints and the decoded body (``http.file_data_raw``); the endpoints are converted to Trisul's
flow-key format (Z end = lower port, engine/fastpath/decode.lua).

Also covered: the shipped example engine/examples/file_sha256.lua (FileHash resources, ./extracted),
file lifetime with T.async tasks, chunked ``.part`` files, streaming mode (onpayload_http only),
filter_flow / filter votes, the directory size cap, and gaps / pipelining / chunked+gzip end to end.
"""
from __future__ import annotations

import collections
import gzip as gzip_mod
import glob
import hashlib
import ipaddress
import json
import os
import re
import shutil
import subprocess
import sys
import time
import zlib as zlib_mod

import pytest

from luaprobe.engine.fastpath.run import FastPath, RunConfig
from luaprobe.engine.store.writer import Store
from tests import helpers
from tests.test_http import DEVIATIONS, TSHARK

PCAPS = helpers.PCAPS
EXAMPLE = os.path.join(helpers.REPO, "engine", "examples", "file_sha256.lua")
FILEHASH = "{9781DB2C-F78A-4F7F-A7E8-2B1A9A7BE71A}"
TSHARK_BIN = shutil.which("tshark")
NO_TSHARK = "tshark is not installed: the live --export-objects comparison is skipped (pinned sets still checked)"

HTTP_CAPTURES = sorted(f for f in os.listdir(PCAPS) if f.startswith("http-")) + [
    "mix-eth-tls-http-dns.pcap", "vlan-mpls-mixed.pcap"]

# capture -> number of onfile_http calls (whole files; no body reaches the 5 MB default chunk size).
# = tshark's object count, except: website-keepalive +1 (a truncated body tshark does not export),
# ipv6-keepalive-gap -1 (unframeable first response), vlan-mpls-mixed -2 (3 HTTP/0.9 segments = 1 body)
COUNTS = {
    "http-chunked-dvwa.pcapng": 3, "http-chunked-eicar.pcap": 1, "http-chunked-gzip-mix.pcap": 18,
    "http-get-text.pcap": 1, "http-gzip-eicar.pcap": 1, "http-gzip-json.pcap": 1,
    "http-ipv6-keepalive-gap.pcap": 999, "http-jpeg-download.pcap": 1, "http-keepalive-splunk-ui.pcap": 11,
    "http-pdf-download.pcap": 1, "http-pipelined-mozilla.pcap": 5, "http-post-hello.pcap": 2,
    "http-post-multipart-fields.pcap": 2, "http-post-multipart-upload.pcap": 2, "http-qinq-vlan.pcap": 1,
    "http-range-pdf-206.pcap": 2, "http-website-keepalive.pcap": 31, "http-zip-download.pcap": 1,
    "mix-eth-tls-http-dns.pcap": 1, "vlan-mpls-mixed.pcap": 2,
}

# Flow keys of the bodies that tshark does not export (DEVIATIONS in tests/test_http.py):
#   tshark -r http-website-keepalive.pcap -Y 'http.request.uri == "/js/jquery.cycle.all.min.js"'
#          -T fields -e ip.src -e tcp.srcport -e ip.dst -e tcp.dstport   -> 10.0.2.15 55081 192.150.187.43 80
#   tshark -r vlan-mpls-mixed.pcap -Y http -T fields -e ip.src -e tcp.srcport ...   (the HTTP/0.9 reply)
#                                                                         -> 10.0.0.15 80 10.20.80.1 50343
DEVIATION_FLOWS = {
    "http-website-keepalive.pcap": "06A:0A.00.02.0F:p-D729_C0.96.BB.2B:p-0050",
    "vlan-mpls-mixed.pcap": "06A:0A.14.50.01:p-C4A7_0A.00.00.0F:p-0050",
}

# packets per capture (capinfos -c)
PACKETS = {"http-website-keepalive.pcap": 751, "http-ipv6-keepalive-gap.pcap": 4102}

PDF_SHA = "48d179a2f8d17331446c7a75a082851eee9ad841705ed5fbce730f51a0598d62"   # http-pdf-download body
PDF_LEN = 177207


def sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def expected(name: str) -> collections.Counter:
    """Pinned multiset of body SHA-256s luaprobe delivers: tshark's, adjusted by the justified deviations."""
    exp = collections.Counter(TSHARK[name])
    delta, trunc = DEVIATIONS.get(name, ({}, []))
    for h, n in delta.items():
        exp[h] += n
    for h, _, _ in trunc:
        exp[h] += 1
    return +exp


# ============================================================================ tshark (run by the tests)

def _ipkey(a: str) -> str:
    ip = ipaddress.ip_address(a)
    return ip.packed.hex().upper() if ip.version == 6 else ".".join("%02X" % b for b in ip.packed)


def trisul_flowkey(src: str, sport: int, dst: str, dport: int) -> str:
    """Trisul flow id of a TCP conversation (engine/fastpath/decode.lua): the Z end has the lower port; on a tie
    the lower address; 'A' IPv4, 'B' IPv6."""
    s, d = ipaddress.ip_address(src), ipaddress.ip_address(dst)
    src_is_a = sport > dport if sport != dport else s.packed >= d.packed
    (ia, pa), (iz, pz) = ((src, sport), (dst, dport)) if src_is_a else ((dst, dport), (src, sport))
    return "06%s:%s:p-%04X_%s:p-%04X" % ("B" if s.version == 6 else "A", _ipkey(ia), pa, _ipkey(iz), pz)


def _walk(o, key):
    if isinstance(o, dict):
        for k, v in o.items():
            if k == key:
                yield v
            else:
                yield from _walk(v, key)
    elif isinstance(o, list):
        for v in o:
            yield from _walk(v, key)


def _last(x):
    return x[-1] if isinstance(x, list) else x


_TSHARK_CACHE: dict = {}


def tshark_export(name: str, tmp_dir: str) -> collections.Counter:
    """SHA-256 multiset of ``tshark --export-objects http`` (cached per capture for the session)."""
    key = ("export", name)
    if key not in _TSHARK_CACHE:
        d = os.path.join(tmp_dir, "tshark-export")
        os.makedirs(d)
        subprocess.run([TSHARK_BIN, "-r", os.path.join(PCAPS, name), "-q", "--export-objects", "http," + d],
                       check=True, capture_output=True, timeout=120)
        _TSHARK_CACHE[key] = collections.Counter(sha(open(p, "rb").read()) for p in glob.glob(d + "/*"))
        shutil.rmtree(d)
    return _TSHARK_CACHE[key]


def tshark_flows(name: str) -> collections.Counter:
    """{(trisul flow key, sha256 of a decoded body): count} from ``tshark -T json -x -Y http``: the TCP
    endpoints of the packet carrying each ``http.file_data`` (decoded: de-chunked, inflated)."""
    key = ("flows", name)
    if key not in _TSHARK_CACHE:
        out = subprocess.run([TSHARK_BIN, "-r", os.path.join(PCAPS, name), "-T", "json", "-x", "--no-duplicate-keys",
                              "-Y", "http", "-J", "ip ipv6 tcp http"], check=True, capture_output=True,
                             timeout=300).stdout
        res: collections.Counter = collections.Counter()
        for pkt in json.loads(out):
            layers = pkt["_source"]["layers"]
            v6 = "ipv6" in layers
            ip, tcp = _last(layers["ipv6" if v6 else "ip"]), _last(layers["tcp"])
            v = "ipv6" if v6 else "ip"
            fk = trisul_flowkey(ip[v + ".src"], int(tcp["tcp.srcport"]), ip[v + ".dst"], int(tcp["tcp.dstport"]))
            for raw in _walk(layers.get("http"), "http.file_data_raw"):
                for r in (raw if isinstance(raw[0], list) else [raw]):
                    if r[0]:
                        res[(fk, sha(bytes.fromhex(r[0])))] += 1
        _TSHARK_CACHE[key] = res
    return _TSHARK_CACHE[key]


def expected_flows(name: str) -> collections.Counter:
    """(flow key, sha) multiset luaprobe should report: tshark's, with the deviations applied."""
    exp = tshark_flows(name).copy()
    delta, trunc = DEVIATIONS.get(name, ({}, []))
    for h, n in delta.items():
        if n < 0:
            for _ in range(-n):
                k = next(k for k in exp if k[1] == h and exp[k] > 0)
                exp[k] -= 1
        else:
            exp[(DEVIATION_FLOWS[name], h)] += n
    for h, _, _ in trunc:
        exp[(DEVIATION_FLOWS[name], h)] += 1
    return +exp


def test_trisul_flowkey_rule():
    assert trisul_flowkey("10.0.2.15", 55081, "192.150.187.43", 80) == "06A:0A.00.02.0F:p-D729_C0.96.BB.2B:p-0050"
    assert trisul_flowkey("192.150.187.43", 80, "10.0.2.15", 55081) == "06A:0A.00.02.0F:p-D729_C0.96.BB.2B:p-0050"
    assert trisul_flowkey("10.0.0.2", 80, "10.0.0.1", 80) == "06A:0A.00.00.02:p-0050_0A.00.00.01:p-0050"
    assert trisul_flowkey("::1", 1234, "2001:db8::1", 80) == \
        "06B:00000000000000000000000000000001:p-04D2_20010DB8000000000000000000000001:p-0050"


# ============================================================================ plug-ins

def lua_str(s: str) -> str:
    return "[==[" + s + "]==]"


RECORD_LUA = r"""
local OUT = %(out)s
local man = assert(io.open(OUT .. "/manifest.tsv", "w"))
local nrec = 0
local function clean(s) return (tostring(s == nil and "" or s):gsub("[\t\n]", " ")) end
local function record(...)
  local t = {...}
  for i = 1, select("#", ...) do t[i] = clean(t[i]) end
  man:write(table.concat(t, "\t"), "\n"); man:flush()
end
"""

# onfile_http copies synchronously; prev_exists: did the previous call's file survive its hook?
COPY_PLUGIN = RECORD_LUA + r"""
local prev
TrisulPlugin = {
  id = { name = "filex copy" },
  filex_monitor = {
    onfile_http = function(engine, ts, flow, path, req, resp, length, is_chunk)
      nrec = nrec + 1
      local pf = prev and io.open(prev, "rb")
      if pf then pf:close() end
      local f = assert(io.open(path, "rb"))
      local data = f:read("*a"); f:close()
      local copy = ("%%s/%%06d.bin"):format(OUT, nrec)
      local g = assert(io.open(copy, "wb")); g:write(data); g:close()
      record(path, length, #data, is_chunk, req:get_path(), resp and resp:get_status() or 0, copy, flow:id(),
        pf ~= nil, resp and resp:get_value("Content-Type"), req:get_method(),
        resp and resp:get_value("Content-Encoding"), resp and resp:get_value("Transfer-Encoding"),
        path:match("^.+/(.+)%%.%%d+.part$"), type(is_chunk))
      prev = path
    end,
    %(extra)s
  },
}
"""
COPY_FIELDS = ("path", "length", "read", "is_chunk", "uri", "status", "copy", "flow", "prev_exists", "ctype",
               "method", "cenc", "tenc", "part_base", "is_chunk_type")

# onfile_http hands each path to a T.async task that waits (busy loop on os.clock), then reads it
ASYNC_PLUGIN = RECORD_LUA + r"""
TrisulPlugin = {
  id = { name = "filex async" },
  request_async_workers = 2,
  filex_monitor = {
    onfile_http = function(engine, ts, flow, path, req, resp, length, is_chunk)
      record("file", path, length)
      T.async:schedule {
        data = path,
        onexecute = function(p)
          local t0 = os.clock()
          while os.clock() - t0 < %(wait)s do end
          local f = io.open(p, "rb")
          if not f then return "MISSING" end
          local body = f:read("*a"); f:close()
          return require("luaprobe.engine.plugins.sha256").hex(body)
        end,
        onresult = function(engine, p, sha)
          local f = io.open(p, "rb")
          if f then f:close() end
          record("result", p, sha, f ~= nil)
        end,
      }
    end,
  },
}
"""

# streaming mode: no onfile_http
STREAM_PLUGIN = RECORD_LUA + r"""
local cur, seen_on_disk, calls = {}, 0, 0
TrisulPlugin = {
  id = { name = "filex stream" },
  filex_monitor = {
    onpayload_http = function(engine, ts, flow, path, req, resp, dir, seekpos, buf)
      calls = calls + 1
      local f = io.open(path, "rb")
      if f then f:close(); seen_on_disk = seen_on_disk + 1 end
      local key = path .. "#" .. dir
      local c = cur[key] or { parts = {}, len = 0, seek_ok = true }
      cur[key] = c
      if seekpos ~= c.len then c.seek_ok = false end
      local n = buf:size()
      if n == 0 then
        nrec = nrec + 1
        local copy = ("%%s/%%06d.bin"):format(OUT, nrec)
        local g = assert(io.open(copy, "wb")); g:write(table.concat(c.parts)); g:close()
        record(path, dir, c.len, c.seek_ok, copy, req:get_path(), #c.parts, seen_on_disk)
        cur[key] = nil
      else
        c.parts[#c.parts + 1] = buf:tostring()
        c.len = c.len + n
      end
    end,
  },
}
"""
STREAM_FIELDS = ("path", "dir", "len", "seek_ok", "copy", "uri", "nparts", "seen_on_disk")


def make_plugin(tmp_path, template: str, name="plugin.lua", **kw) -> tuple[str, str]:
    """Write a plug-in whose records go to tmp_path/<name>.d/manifest.tsv; returns (plugin, out dir)."""
    out = tmp_path / (name + ".d")
    out.mkdir()
    kw.setdefault("extra", "")
    path = tmp_path / name
    path.write_text(template % {"out": lua_str(str(out)), **kw})
    return str(path), str(out)


def records(out: str, fields=COPY_FIELDS) -> list[dict]:
    with open(os.path.join(out, "manifest.tsv")) as f:
        rows = [line.rstrip("\n").split("\t") for line in f]
    return [dict(zip(fields, r)) for r in rows]


def run(tmp_path, plugins, files, name="out", **kw) -> dict:
    files = [f if os.path.isabs(f) else os.path.join(PCAPS, f) for f in files]
    summary = FastPath(RunConfig(plugins=list(plugins), files=files, out_dir=str(tmp_path / name), **kw)).run()
    assert summary["input_errors"] == [] and summary["plugin_problems"] == []
    for p in summary["plugins"]:
        assert p["hook_errors"] == {}, p
    return summary


def fx(summary) -> dict:
    (st,) = summary["filex"]
    return st


def copy_run(tmp_path, capture, name="copy", extra="", **kw):
    plugin, out = make_plugin(tmp_path, COPY_PLUGIN, name=name + ".lua", extra=extra)
    summary = run(tmp_path, [plugin], [capture], name=name + ".out", **kw)
    recs = records(out) if os.path.exists(os.path.join(out, "manifest.tsv")) else []
    for r in recs:
        r["sha"] = sha(open(r["copy"], "rb").read())
    return summary, recs


# ============================================================================ every HTTP capture

@pytest.mark.parametrize("name", HTTP_CAPTURES)
def test_files_match_tshark(tmp_path, name):
    summary, recs = copy_run(tmp_path, name)
    st = fx(summary)
    assert len(recs) == COUNTS[name] == st["files"]
    assert st["chunks"] == 0 and st["skipped_cap"] == 0 and st["write_errors"] == 0
    assert st["bytes"] == sum(int(r["length"]) for r in recs)
    fxdir = os.path.dirname(recs[0]["path"])
    for r in recs:
        assert r["is_chunk"] == "false" and r["is_chunk_type"] == "boolean"
        assert int(r["length"]) == int(r["read"]) > 0           # the whole file was there during the hook
        assert r["prev_exists"] == "false"                      # no task names it: removed once the hook returned
        assert os.path.dirname(r["path"]) == fxdir and not r["path"].endswith(".part")
    assert not os.path.exists(fxdir), "the extraction directory must be removed after the run"
    got = collections.Counter(r["sha"] for r in recs)
    assert got == expected(name)                                   # pinned (tests/test_http.py)
    if not TSHARK_BIN:
        pytest.skip(NO_TSHARK)
    exp = tshark_export(name, str(tmp_path)).copy()
    assert exp == collections.Counter(TSHARK[name])               # the pins are still what tshark exports
    delta, trunc = DEVIATIONS.get(name, ({}, []))
    for h, n in delta.items():
        exp[h] += n
    for h, _, _ in trunc:
        exp[h] += 1
    assert got == +exp
    assert collections.Counter((r["flow"], r["sha"]) for r in recs) == expected_flows(name)


def test_request_and_response_metadata(tmp_path):
    """Request path, method and response status reach onfile_http (POST bodies: dir 0, no response yet)."""
    _, recs = copy_run(tmp_path, "http-post-multipart-fields.pcap")
    assert [(r["method"], r["status"]) for r in recs] == [("POST", "0"), ("POST", "200")]
    _, recs = copy_run(tmp_path, "http-range-pdf-206.pcap", name="range")
    assert [(r["status"], int(r["length"])) for r in recs] == [("206", 32768), ("206", 522755)]
    _, recs = copy_run(tmp_path, "http-get-text.pcap", name="text")
    assert [(r["uri"], r["status"], r["method"]) for r in recs] == [("/download/CHANGES.bro-aux.txt", "200", "GET")]


# ============================================================================ the shipped example

@pytest.mark.parametrize("name", HTTP_CAPTURES)
def test_example_file_sha256(tmp_path, name):
    """engine/examples/file_sha256.lua through `luaprobe run` (cwd = tmp_path: it writes ./extracted)."""
    stats = tmp_path / "summary.json"
    env = dict(os.environ, PYTHONPATH=helpers.REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    p = subprocess.run([sys.executable, "-m", "luaprobe.engine.daemon.cli", "run", EXAMPLE, "--pcap", os.path.join(PCAPS, name),
                        "--out", "out", "--stats-json", str(stats)], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert p.returncode == 0, p.stderr
    summary = json.loads(stats.read_text())
    (plug,) = summary["plugins"]
    assert plug["hook_errors"] == {}
    a = plug["async"]
    helpers.assert_accounting(a)
    n = COUNTS[name]
    assert a["scheduled"] == a["ok"] == 2 * n and a["pending"] == 0     # one copy + one schedule per file
    with Store(str(tmp_path / "out")) as st:
        rows = st.resources(FILEHASH)
    assert len(rows) == n
    assert collections.Counter(r["uri"] for r in rows) == expected(name)   # one resource per body
    assert all(r["contents"].split(" bytes ")[0].isdigit() for r in rows)
    extracted = tmp_path / "extracted"
    assert collections.Counter(sha(f.read_bytes()) for f in extracted.iterdir()) == expected(name)
    if TSHARK_BIN:
        assert collections.Counter((r["flowkey"], r["uri"]) for r in rows) == expected_flows(name)


# ============================================================================ file lifetime

def test_files_live_until_async_tasks_finish(tmp_path):
    """Tasks naming the path keep the file: the worker reads it after a busy wait, onresult still sees it;
    after the run the extraction directory is gone."""
    plugin, out = make_plugin(tmp_path, ASYNC_PLUGIN, wait="0.02")
    summary = run(tmp_path, [plugin], ["http-website-keepalive.pcap"])
    recs = records(out, ("kind", "path", "a", "b"))
    files = {r["path"]: int(r["a"]) for r in recs if r["kind"] == "file"}
    results = {r["path"]: (r["a"], r["b"]) for r in recs if r["kind"] == "result"}
    assert len(files) == COUNTS["http-website-keepalive.pcap"]
    assert set(results) == set(files)
    assert all(exists == "true" for _, exists in results.values())    # still there in onresult
    assert collections.Counter(h for h, _ in results.values()) == expected("http-website-keepalive.pcap")
    (plug,) = summary["plugins"]
    helpers.assert_accounting(plug["async"])
    assert plug["async"]["ok"] == len(files) and plug["async"]["dropped"] == 0
    fxdir = os.path.dirname(next(iter(files)))
    assert fxdir.startswith("/dev/shm/") and not os.path.exists(fxdir)
    if TSHARK_BIN:
        exp = tshark_export("http-website-keepalive.pcap", str(tmp_path))
        complete = collections.Counter(h for h, _ in results.values())
        complete.subtract({h: 1 for h, _, _ in DEVIATIONS["http-website-keepalive.pcap"][1]})
        assert +complete == exp


def test_two_plugins_with_tasks_each_keep_their_own_files(tmp_path):
    """Two filex_monitor scripts in one run (trisul-scripts' fileextract folder: saveall.lua + save_exe.lua, each
    T.async:copy-ing every path) each get their own files: no path is handed to both, and every task of either
    reads its whole body (tshark's --export-objects set).  Before the instance number was in the name both wrote
    the same path, and the first hook's unref removed the file the other's task still named ("No such file")."""
    a, out_a = make_plugin(tmp_path, ASYNC_PLUGIN, name="a.lua", wait="0.02")
    b, out_b = make_plugin(tmp_path, ASYNC_PLUGIN, name="b.lua", wait="0.02")
    summary = run(tmp_path, [a, b], ["http-keepalive-splunk-ui.pcap"], filex_dir=str(tmp_path / "fx"))
    paths = []
    for out in (out_a, out_b):
        recs = records(out, ("kind", "path", "a", "b"))
        files = {r["path"] for r in recs if r["kind"] == "file"}
        results = {r["path"]: r["a"] for r in recs if r["kind"] == "result"}
        assert len(files) == COUNTS["http-keepalive-splunk-ui.pcap"] and set(results) == files
        assert collections.Counter(results.values()) == expected("http-keepalive-splunk-ui.pcap")
        paths.append(files)
    assert not paths[0] & paths[1]
    for plug in summary["plugins"]:
        assert plug["async"]["ok"] == COUNTS["http-keepalive-splunk-ui.pcap"], plug
    assert os.listdir(tmp_path / "fx") == []
    if TSHARK_BIN:
        assert expected("http-keepalive-splunk-ui.pcap") == tshark_export("http-keepalive-splunk-ui.pcap",
                                                                            str(tmp_path))


def test_files_removed_after_hook_without_tasks(tmp_path):
    """No task names the path: gone at the next onfile_http (and in the explicit directory after the run)."""
    fxdir = tmp_path / "fx"
    summary, recs = copy_run(tmp_path, "http-keepalive-splunk-ui.pcap", filex_dir=str(fxdir))
    assert len(recs) == 11
    assert [r["prev_exists"] for r in recs] == ["false"] * 11
    assert all(not os.path.exists(r["path"]) for r in recs)
    assert os.listdir(fxdir) == []                 # an explicit directory is kept, but empty


# ============================================================================ chunking

def test_chunked_part_files(tmp_path):
    chunk = int(0.05 * 1048576)
    summary, recs = copy_run(tmp_path, "http-pdf-download.pcap", filex_chunk_mb=0.05)
    st = fx(summary)
    nparts = -(-PDF_LEN // chunk)
    assert len(recs) == nparts == st["chunks"] and st["files"] == 0
    base = None
    offsets = []
    for r in recs:
        assert r["is_chunk"] == "true" and r["is_chunk_type"] == "boolean"
        name = os.path.basename(r["path"])
        assert r["part_base"] != "" and name.startswith(r["part_base"] + ".") and name.endswith(".part")
        base = base or r["part_base"]
        assert r["part_base"] == base
        offsets.append(int(name[len(base) + 1:-len(".part")]))
    assert offsets == sorted(offsets) and offsets[0] == 0
    lengths = [int(r["length"]) for r in recs]
    assert lengths[:-1] == [chunk] * (nparts - 1) and sum(lengths) == PDF_LEN
    assert offsets == [sum(lengths[:i]) for i in range(nparts)]
    whole = b"".join(open(r["copy"], "rb").read() for _, r in sorted(zip(offsets, recs), key=lambda x: x[0]))
    assert sha(whole) == PDF_SHA
    if TSHARK_BIN:
        assert tshark_export("http-pdf-download.pcap", str(tmp_path)) == {sha(whole): 1}


# ============================================================================ streaming mode

@pytest.mark.parametrize("name", ["http-chunked-gzip-mix.pcap", "http-pdf-download.pcap",
                                  "http-website-keepalive.pcap"])
def test_streaming_mode(tmp_path, name):
    """Only onpayload_http: decoded bytes per message concatenate to the file, a zero-length buffer ends
    it, seekpos is the running offset, and nothing is written to the extraction directory."""
    plugin, out = make_plugin(tmp_path, STREAM_PLUGIN)
    fxdir = tmp_path / "fx"
    summary = run(tmp_path, [plugin], [name], filex_dir=str(fxdir))
    recs = records(out, STREAM_FIELDS)
    st = fx(summary)
    assert st["files"] == st["chunks"] == st["bytes"] == 0
    assert os.listdir(fxdir) == []
    assert all(r["seek_ok"] == "true" for r in recs)
    assert recs[-1]["seen_on_disk"] == "0"
    got = collections.Counter(sha(open(r["copy"], "rb").read()) for r in recs if int(r["len"]) > 0)
    assert len(recs) == COUNTS[name]
    assert got == expected(name)
    if TSHARK_BIN:
        exp = tshark_export(name, str(tmp_path)).copy()
        exp.update({h: 1 for h, _, _ in DEVIATIONS.get(name, ({}, []))[1]})
        assert got == exp


# ============================================================================ votes

def test_filter_flow_false(tmp_path):
    """filter_flow false for client ports that are odd: nothing from those flows."""
    name = "http-website-keepalive.pcap"
    _, full = copy_run(tmp_path, name, name="full")
    reject = 'filter_flow = function(engine, ts, flow) return tonumber(flow:porta_readable()) % 2 == 0 end,'
    summary, recs = copy_run(tmp_path, name, name="voted", extra=reject)
    st = fx(summary)

    def odd(fk):
        return int(fk.split(":")[2].split("_")[0][2:], 16) % 2 == 1
    assert st["flows_rejected"] > 0
    assert any(odd(r["flow"]) for r in full) and not any(odd(r["flow"]) for r in recs)
    assert collections.Counter((r["flow"], r["sha"]) for r in recs) == \
        collections.Counter((r["flow"], r["sha"]) for r in full if not odd(r["flow"]))


def test_filter_false_on_content_type(tmp_path):
    """filter false on image/* responses: those bodies are skipped and counted in skipped_filter."""
    name = "http-website-keepalive.pcap"
    _, full = copy_run(tmp_path, name, name="full")
    vote = ('filter = function(engine, ts, flow, h) return not (h:is_response() and '
            '(h:get_value("Content-Type") or ""):match("^image/")) end,')
    summary, recs = copy_run(tmp_path, name, name="voted", extra=vote)
    images = [r for r in full if r["ctype"].startswith("image/")]
    assert len(images) > 0
    assert fx(summary)["skipped_filter"] == len(images)
    assert not any(r["ctype"].startswith("image/") for r in recs)
    assert collections.Counter(r["sha"] for r in recs) == \
        collections.Counter(r["sha"] for r in full if not r["ctype"].startswith("image/"))


# ============================================================================ directory cap

def test_directory_cap(tmp_path):
    """A tiny cap: bodies larger than it are skipped and counted, the rest extracted, every packet processed."""
    name = "http-website-keepalive.pcap"
    _, full = copy_run(tmp_path, name, name="full")
    cap = 0.01
    t0 = time.monotonic()
    summary, recs = copy_run(tmp_path, name, name="capped", filex_dir_cap_mb=cap)
    assert time.monotonic() - t0 < 30
    st = fx(summary)
    limit = int(cap * 1048576)
    big = [r for r in full if int(r["length"]) > limit]
    # bodies of parallel flows share the cap: a small one may be skipped too
    assert st["skipped_cap"] >= len(big) > 0
    assert st["files"] + st["skipped_cap"] == len(full) == len(recs) + st["skipped_cap"]
    assert all(int(r["length"]) <= limit for r in recs)
    assert collections.Counter(r["sha"] for r in recs) <= collections.Counter(r["sha"] for r in full)
    assert summary["packets"] == PACKETS[name]
    assert not os.path.exists(os.path.dirname(recs[0]["path"]))


def test_directory_cap_with_files_held_by_tasks(tmp_path):
    """Files held by slow T.async tasks fill the directory: later bodies are skipped, the fast path never
    waits, every body is either extracted or counted, and every task still reads its file."""
    plugin, out = make_plugin(tmp_path, ASYNC_PLUGIN, wait="0.05")
    name = "http-website-keepalive.pcap"
    summary = run(tmp_path, [plugin], [name], filex_dir_cap_mb=0.05)
    st = fx(summary)
    recs = records(out, ("kind", "path", "a", "b"))
    files = [r for r in recs if r["kind"] == "file"]
    results = [r for r in recs if r["kind"] == "result"]
    assert summary["packets"] == PACKETS[name]
    assert st["skipped_cap"] > 0 and st["files"] == len(files) > 0
    assert st["files"] + st["skipped_cap"] == COUNTS[name]
    assert len(results) == len(files) and all(r["a"] != "MISSING" for r in results)
    assert collections.Counter(r["a"] for r in results) <= expected(name)


# ============================================================================ gaps, pipelining, chunked+gzip

def test_gap_capture(tmp_path):
    summary, recs = copy_run(tmp_path, "http-ipv6-keepalive-gap.pcap")
    st = fx(summary)
    assert len(recs) == 999 and st["tcp_gaps"] > 0 and st["tcp_gap_bytes"] == 238
    assert summary["packets"] == PACKETS["http-ipv6-keepalive-gap.pcap"]
    assert {r["flow"][:3] for r in recs} == {"06B"}


def test_pipelined_order(tmp_path):
    _, recs = copy_run(tmp_path, "http-pipelined-mozilla.pcap")
    assert [r["uri"] for r in recs] == [
        "/style/enhanced.css", "/script/urchin.js", "/images/template/screen/bullet_utility.png",
        "/images/template/screen/key-point-top.png", "/projects/calendar/images/header-sunbird.png"]
    assert all(r["status"] == "200" for r in recs)


def test_chunked_gzip_decoded(tmp_path):
    _, recs = copy_run(tmp_path, "http-chunked-gzip-mix.pcap")
    gz = [r for r in recs if "gzip" in r["cenc"]]
    both = [r for r in gz if "chunked" in r["tenc"]]
    assert gz and both
    for r in gz:
        data = open(r["copy"], "rb").read()
        assert not data.startswith(b"\x1f\x8b") and len(data) == int(r["length"])
        assert r["sha"] in TSHARK["http-chunked-gzip-mix.pcap"]


# ============================================================================ flow hooks

FLOW_HOOKS = 'filter_flow = function(engine, ts, flow) record("filter_flow", flow:id()); return true end,\n' \
             'onterminateflow = function(engine, ts, flow) record("onterminateflow", flow:id()) end,'


@pytest.mark.parametrize("name,conns", [("http-website-keepalive.pcap", 8), ("http-chunked-gzip-mix.pcap", 9)])
def test_flow_hooks_once_per_connection(tmp_path, name, conns):
    """filter_flow and onterminateflow run once per TCP connection that carries payload (filter_flow comes
    with the first payload: tshark -Y "tcp.len>0" -T fields -e tcp.stream | sort -u: `conns`; the keepalive
    capture has 13 connections, 5 of them opened by the browser and never used), not
    again for the ACK / RST packets that follow the close."""
    plugin, out = make_plugin(tmp_path, COPY_PLUGIN, extra=FLOW_HOOKS)
    summary = run(tmp_path, [plugin], [name])
    rows = [line.split("\t") for line in open(os.path.join(out, "manifest.tsv")) if line.startswith(("filter_flow",
                                                                                                     "onterm"))]
    ff = collections.Counter(r[1].strip() for r in rows if r[0] == "filter_flow")
    term = collections.Counter(r[1].strip() for r in rows if r[0] == "onterminateflow")
    assert len(ff) == conns and set(ff.values()) == {1}
    assert term == ff
    assert fx(summary)["flows"] == conns


# ============================================================================ write errors

def test_write_error_is_counted_not_delivered(tmp_path):
    """A body that cannot be written completely (ENOSPC: the extraction directory is on a 64 KiB tmpfs) is
    counted in write_errors and never handed to onfile_http as a whole file.  Needs mount (root)."""
    with helpers.tmpfs(tmp_path / "tiny", "size=64k") as mnt:
        summary, recs = copy_run(tmp_path, "http-website-keepalive.pcap", filex_dir=str(mnt / "fx"))
    st = fx(summary)
    assert st["write_errors"] >= 1 and st["files"] == len(recs) == COUNTS["http-website-keepalive.pcap"] - st["write_errors"]
    assert all(int(r["length"]) == int(r["read"]) for r in recs)        # no partial file passed as whole
    assert collections.Counter(r["sha"] for r in recs) <= expected("http-website-keepalive.pcap")


# ============================================================================ non-HTTP flows (issue 10)

@pytest.mark.parametrize("name,conns", [("tcp-echo-many-flows.pcap", 500), ("tls12-handshake.pcap", 1)])
def test_non_http_flows_leave_reassembly(tmp_path, name, conns):
    """A TCP flow whose first payload is not HTTP/1.x leaves reassembly at that packet, before any of its
    bytes is reassembled, and no hook runs for it (`conns`: tshark -q -z conv,tcp; every one carries
    payload: tshark -Y "tcp.len>0" -T fields -e tcp.stream | sort -u)."""
    plugin, out = make_plugin(tmp_path, COPY_PLUGIN, extra=FLOW_HOOKS)
    summary = run(tmp_path, [plugin], [name])
    rows = [line for line in open(os.path.join(out, "manifest.tsv")) if line.startswith(("filter_flow", "onterm"))]
    assert rows == []
    st = fx(summary)
    assert st["flows_not_http"] == conns and st["flows"] == 0 and st["files"] == 0
    assert st["tcp_bytes_delivered"] == 0


def test_looks_http():
    """The first-payload vote: request lines and status lines pass, other protocols do not."""
    from luaprobe.shm.luajit import new_runtime
    f = new_runtime().eval('function(s, hs) local ffi = require("ffi"); return require('
                           '"luaprobe.engine.streams.filex").looks_http(ffi.cast("const uint8_t *", s), #s, hs) end')
    for s in (b"GET / HTTP/1.1\r\n", b"POST /x HTTP/1.0\r\n", b"PROPFIND / HTTP/1.1", b"M-SEARCH * HTTP/1.1",
              b"HTTP/1.1 200 OK\r\n", b"HTTP/1.0 404"):
        assert f(s, True) is True, s
    for s in (b"\x16\x03\x01\x02\x00\x01", b"SSH-2.0-OpenSSH_9.6\r\n", b"hello world", b"\x00\x00\x00\x00",
              b"220 ftp.example.com ready", b"HTTPS/1.1 x", b"ABCDEFGHIJKLMNOPQRSTU"):
        assert f(s, True) is False, s
    assert f(b"GE", True) is True                                   # too short to tell: reassembly goes on
    # empty lines before the request line (RFC 9112 §2.2; tshark reads past them), the 17-letter method of RFC 4437
    for s in (b"\r\nGET /lead HTTP/1.1\r\n", b"\n\nPOST / HTTP/1.1", b"\r\n", b"UPDATEREDIRECTREF /x HTTP/1.1\r\n"):
        assert f(s, True) is True, s
    assert f(b"\r\nhello world", True) is False
    assert f(b"\x00body bytes HTTP/1.1 200 OK", False) is True       # mid-stream: a status line further on
    assert f(b"\x00body bytes HTTP/1.1 200 OK", True) is False       # after a SYN the stream start must be HTTP


def test_looks_http_status_line_search():
    """Mid-stream (no SYN seen), a first payload not starting like a request is HTTP when "HTTP/1." occurs in its first
    2 048 bytes: the memchr-then-memmem search (http.lua has_status_line) against Python's bytes.find, on payloads
    with the status line at every kind of place (first / last possible byte, across the 2 048 limit, after more
    'H' bytes than the memchr tries, truncated at the end), 'H'-free, all-'H', zero-filled and random ones."""
    import random
    from luaprobe.shm.luajit import new_runtime
    f = new_runtime().eval('function(s) local ffi = require("ffi"); return require('
                           '"luaprobe.engine.streams.filex").looks_http(ffi.cast("const uint8_t *", s), #s, false) end')
    rnd = random.Random(7)
    needle = b"HTTP/1."
    cases = [b"\x00", b"\x00HTTP/1", b"\x00HTTP/1.", b"\x00" * 2041 + needle, b"\x00" * 2042 + needle,
             b"\x00" + b"H" * 3000, b"\x00" + b"H" * 40 + needle, b"\x00HTTP/HTTP/1HTTP/1,HTTP/ HTTP/1.",
             b"\x00" * 1500, bytes(range(1, 256)) * 10, b"\x00" + b"HTTP/1" * 400]
    for n in (1, 7, 8, 64, 700, 1460, 2047, 2048, 2049, 3000):
        for hs in range(0, 12):
            body = bytearray(rnd.choice([b"\x00", b"H", bytes([rnd.randrange(256)])]) * n if hs % 3 == 0
                             else rnd.randbytes(n))
            for _ in range(hs):                         # scattered 'H' / near misses before the match
                k = rnd.randrange(n)
                body[k:k + 1] = rnd.choice([b"H", b"HT", b"HTTP/", b"HTTP/1"])[:1]
            at = rnd.randrange(max(1, n + 8)) if hs % 2 else None
            if at is not None:
                body[at:at + 7] = needle
            cases.append(b"\x00" + bytes(body))
    for s in cases:
        assert f(s) is (needle in s[:2048]), (len(s), s[:80])


# ============================================================================ one reassembly shared with reassembly_handler (issue 14)

# a reassembly_handler counting the bytes of every flow and direction (onnewflow: %(onnew)s)
HANDLER_PLUGIN = r"""
local OUT = %(out)s
local bytes = {}
TrisulPlugin = {
  id = { name = "byte counter" },
  reassembly_handler = {
    onnewflow = function(engine, ts, flow) %(onnew)s end,
    onpayload = function(engine, ts, flow, dir, seekpos, buf)
      local k = flow:id() .. "\t" .. dir
      bytes[k] = (bytes[k] or 0) + buf:size()
    end,
  },
  onunload = function()
    local f = assert(io.open(OUT .. "/bytes.tsv", "w"))
    for k, n in pairs(bytes) do f:write(k, "\t", n, "\n") end
    f:close()
  end,
}
"""


@pytest.mark.skipif(TSHARK_BIN is None, reason="tshark is not installed (the independent truth)")
@pytest.mark.parametrize("handler_reads", [True, False])
def test_one_reassembly_for_filex_and_handler(tmp_path, handler_reads):
    """A filex_monitor and a reassembly_handler on the same capture share one TCP reassembly per flow: the
    files are tshark's (--export-objects, as with filex alone), the handler's bytes per flow and direction
    are tshark's `follow,tcp,raw` (or none when it disables every flow: filex still gets them all), and the
    reassembly counted each TCP connection once (tshark's tcp.stream count), not once per consumer."""
    from tests.test_reassembly import follow_all
    name = "http-website-keepalive.pcap"
    cap = os.path.join(PCAPS, name)
    copy, out = make_plugin(tmp_path, COPY_PLUGIN, name="copy.lua")
    handler, hout = make_plugin(tmp_path, HANDLER_PLUGIN, name="handler.lua",
                                onnew="" if handler_reads else "engine:disable_reassembly(flow)")
    summary = run(tmp_path, [copy, handler], [cap])
    recs = records(out)
    assert len(recs) == COUNTS[name] == fx(summary)["files"]
    assert collections.Counter(sha(open(r["copy"], "rb").read()) for r in recs) == expected(name)
    streams = sorted({int(s) for s in subprocess.run([TSHARK_BIN, "-r", cap, "-T", "fields", "-e", "tcp.stream"],
                                                     capture_output=True, text=True, check=True).stdout.split()})
    assert summary["reassembly"]["tcp_flows"] == len(streams) == fx(summary)["tcp_flows"]
    got = {}
    for line in open(os.path.join(hout, "bytes.tsv")):
        k, d, n = line.rstrip("\n").split("\t")
        got[(k, int(d))] = int(n)
    want = {}
    if handler_reads:
        # a connection with a capture gap is left out: around the hole tshark's follow output and a
        # reassembly that skips it differ by design (docs/filex.md "Gaps")
        lost = {int(s) for s in subprocess.run([TSHARK_BIN, "-r", cap, "-Y", "tcp.analysis.lost_segment", "-T",
                                                "fields", "-e", "tcp.stream"], capture_output=True, text=True,
                                               check=True).stdout.split()}
        assert len(lost) == 1 and len(streams) == 13
        followed = follow_all(cap, streams)
        for s in streams:
            key, c2s, s2c = followed[s]
            for d, data in ((1, c2s), (0, s2c)):            # reassembly_handler: 1 = client->server
                if data:
                    want[(key, d)] = len(data)
            if s in lost:
                want = {k: v for k, v in want.items() if k[0] != key}
                got = {k: v for k, v in got.items() if k[0] != key}
        assert len(want) >= 2 * 8 - 2                        # 8 connections carry payload (test above)
    assert got == want


def test_bytes_after_the_gzip_data_are_counted_and_logged(tmp_path, caplog):
    """A gzip body followed by bytes that are no gzip member: curl delivers the decoded body and fails (error 23),
    Python's gzip.decompress raises, zlib's decompressobj returns the body and the rest as unused_data.  luaprobe
    delivers the decoded body, counts the body and the bytes (http_gzip_trailing, http_gzip_trailing_bytes) and
    logs one line naming the flow.  Truth: Python's zlib (47: gzip or zlib header, as Content-Encoding allows)."""
    from tests import pktbuild
    body = os.urandom(3000).hex().encode()
    sent = gzip_mod.compress(body) + b"trailing garbage, not a gzip member\n"
    z = zlib_mod.decompressobj(47)
    decoded = z.decompress(sent)
    c = pktbuild.Conv(cip="192.0.2.10", cport=40000, sip="198.51.100.20", sport=80)
    c.handshake()
    c.send(True, pktbuild.http_request("/data.json"))
    c.send(False, pktbuild.http_response(sent, headers=[("Content-Encoding", "gzip"),
                                                         ("Content-Length", str(len(sent)))]))
    c.close()
    pcap = tmp_path / "gzip-trailing.pcap"
    pktbuild.write_pcap(pcap, c.frames)
    with caplog.at_level("WARNING", logger="luaprobe"):
        summary, recs = copy_run(tmp_path, str(pcap))
    assert [open(r["copy"], "rb").read() for r in recs] == [decoded]          # the body, whole
    st = fx(summary)
    assert st["http_gzip_trailing"] == 1 and st["http_gzip_trailing_bytes"] == len(z.unused_data)
    lines = [r.getMessage() for r in caplog.records if "after the end of its compressed data" in r.getMessage()]
    assert len(lines) == 1, lines
    assert "192.0.2.10" in lines[0] and "198.51.100.20" in lines[0] and "/data.json" in lines[0]
    assert f"{len(z.unused_data)} bytes" in lines[0]


# ============================================================================ bodies read until close
CLOSE_PLUGIN = r"""
local OUT = %(out)s
TrisulPlugin = {
  id = { name = "close-delimited" },
  filex_monitor = {
    onfile_http = function(engine, ts, flow, path, req, resp, length, is_chunk, incomplete)
      local f = assert(io.open(path, "rb")); local data = f:read("*a"); f:close()
      local g = assert(io.open(OUT .. "/" .. flow:id() .. ".body", "ab")); g:write(data); g:close()
      local m = assert(io.open(OUT .. "/manifest.tsv", "a"))
      m:write(flow:id(), "\t", length, "\t", tostring(incomplete), "\n"); m:close()
    end,
  },
}
"""


def _close_delimited(pcap: str) -> dict:
    """{tcp stream: (flowkey, server bytes per tshark's follow-stream, header length, server FIN seen)} of the
    port-80 connections holding one response without Content-Length or Transfer-Encoding (a body read until
    the connection closes), judged on tshark's follow-stream bytes (tshark's HTTP dissector shows no response
    whose close never came); one tshark pass for the streams, one for all their follow-streams."""
    from tests.test_reassembly import flowkey

    def tshark(*args):
        return subprocess.run([TSHARK_BIN, "-r", pcap, *args], capture_output=True, text=True, check=True).stdout
    streams = sorted({int(x) for x in tshark("-Y", "tcp.port == 80 and tcp.len > 0", "-T", "fields", "-e",
                                            "tcp.stream").split()})
    fins = {int(x) for x in tshark("-Y", "tcp.srcport == 80 and tcp.flags.fin == 1", "-T", "fields", "-e",
                                   "tcp.stream").split()}
    args = ["-q"]
    for s in streams:
        args += ["-z", f"follow,tcp,raw,{s}"]
    out = {}
    for block in tshark(*args).split("Follow: tcp,raw")[1:]:
        lines = block.splitlines()
        s = int(lines[1].split(" eq ")[1])
        nodes = [ln.split(": ", 1)[1].rsplit(":", 1) for ln in lines if ln.startswith("Node ")]
        data = [ln for ln in lines[4:] if ln.strip() and set(ln.strip()) <= set("0123456789abcdef")]
        s2c = b"".join(bytes.fromhex(ln.strip()) for ln in data if ln.startswith("\t"))
        c2s = b"".join(bytes.fromhex(ln) for ln in data if not ln.startswith("\t"))
        (ip0, p0), (ip1, p1) = nodes
        end = re.search(rb"\r?\n\r?\n", s2c)           # the header's end (a bare-LF header: trisul-tutorial 400)
        head = s2c[:end.start()].lower() if end else b""
        status = head.split(b" ")[1] if head.count(b" ") else b""
        if (s2c.startswith(b"HTTP/1.") and s2c.count(b"HTTP/1.") == 1 and end
                and b"\ncontent-length:" not in head and b"\ntransfer-encoding:" not in head
                and not status.startswith(b"1") and status not in (b"204", b"304") and not c2s.startswith(b"HEAD ")):
            out[s] = (flowkey(ip0, int(p0), ip1, int(p1)), s2c, end.end(), s in fins)
    return out


@pytest.mark.skipif(TSHARK_BIN is None, reason="tshark is not installed (the independent truth)")
@pytest.mark.parametrize("capture", ["trisul-16minutes.pcap", "trisul-tutorial.pcap"])
def test_body_until_close_is_complete_only_at_the_server_fin(tmp_path, capture):
    """A response body read until the connection closes (HTTP/1.0, no Content-Length) is complete only when the
    server's FIN ended it (RFC 9112 §6.3).  trisul-16minutes.pcap: 404/400/403 pages closed by the server: complete,
    bytes = tshark's follow-stream after the header.  trisul-tutorial.pcap 06A:C0.A8.03.64:p-CCF3_C0.1E.FC.99:p-0050:
    the client sent FIN, then a RST after the server's first segment; the server sent 14,240 bytes that the
    capture shows after that RST (tshark's follow-stream) but the connection ended at the RST: the 1,332 bytes
    delivered are the start of tshark's body and the file is incomplete "truncated" (before: complete)."""
    pcap = os.path.join(helpers.PCAPS, capture)
    plugin, out = make_plugin(tmp_path, CLOSE_PLUGIN, name="close.lua")
    run(tmp_path, [plugin], [pcap])
    got = {}
    with open(os.path.join(out, "manifest.tsv")) as f:
        for line in f:
            k, n, inc = line.rstrip("\n").split("\t")
            got[k] = (int(n), inc)
    truth = _close_delimited(pcap)
    assert truth
    for s, (key, s2c, hlen, fin) in truth.items():
        body = open(os.path.join(out, key + ".body"), "rb").read()
        n, inc = got[key]
        assert n == len(body) and body == s2c[hlen:hlen + n], (s, key)
        if fin:
            assert inc == "nil" and n == len(s2c) - hlen, (s, key)
        else:
            assert inc == "truncated", (s, key, n, len(s2c) - hlen)
    if capture == "trisul-tutorial.pcap":
        key = "06A:C0.A8.03.64:p-CCF3_C0.1E.FC.99:p-0050"
        assert got[key] == (1332, "truncated") and len(truth[20][1]) == 14240 and not truth[20][3]


# ============================================================================ a new connection on a declined 5-tuple

def two_connections(tmp_path, first: bytes, close_first: bool) -> tuple[str, bytes]:
    """A capture of two TCP connections on one 5-tuple (tests/pktbuild.py): the first carries ``first`` (client to
    server) and ends with FIN or not at all; the second, a new SYN with a new ISN 1 s later, carries an HTTP GET
    and a 200 response with a 3000-byte body.  Returns (path, body)."""
    from tests import pktbuild as pb
    body = bytes(range(256)) * 11 + b"end of body\n"
    a = pb.Conv(cport=40123, sport=80, cisn=1000, sisn=9000, t0=1700000000.0)
    a.handshake()
    a.send(True, first)
    a.send(False, b"x" * 200)
    if close_first:
        a.close()
    b = pb.Conv(cport=40123, sport=80, cisn=777777, sisn=555555, t0=a.t + 1.0)
    b.handshake()
    b.send(True, pb.http_request("/second.bin"))
    b.send(False, pb.http_response(body, headers=[("Content-Length", str(len(body))),
                                                  ("Content-Type", "application/octet-stream")]))
    b.close()
    path = str(tmp_path / "reuse.pcap")
    pb.write_pcap(path, a.frames + b.frames)
    return path, body


@pytest.mark.parametrize("first,close_first", [(b"SSH-2.0-OpenSSH_9.6\r\n", True), (b"SSH-2.0-OpenSSH_9.6\r\n", False),
                                               (b"GET /declined HTTP/1.1\r\nHost: a\r\n\r\n", True)])
def test_a_new_connection_on_a_declined_5tuple_is_voted_on_again(tmp_path, first, close_first):
    """docs/filex.md "Only HTTP flows are reassembled": a SYN starting a new connection on the same 5-tuple lets a
    flow filex had declined (not HTTP, or filter_flow said no) vote again: the second connection's HTTP body is
    extracted byte for byte (the truth: the body built into the capture) and filter_flow runs once per connection.
    Before, the declined flow was out of the stage for good (stage_off) and the new connection's file was lost."""
    path, body = two_connections(tmp_path, first, close_first)
    decline = ('filter_flow = function(engine, ts, flow) record("filter_flow", flow:id()); '
               'return ts >= 1700000001 end,')           # no to the first connection, yes to the second
    plugin, out = make_plugin(tmp_path, COPY_PLUGIN, extra=decline)
    summary = run(tmp_path, [plugin], [path])
    st = fx(summary)
    recs = [r for r in records(out) if r.get("copy")]
    assert [open(r["copy"], "rb").read() for r in recs] == [body], (st, recs)
    http_first = first.startswith(b"GET")
    assert st["flows_not_http"] == (0 if http_first else 1)
    assert st["flows_rejected"] == (1 if http_first else 0)
    calls = [line for line in open(os.path.join(out, "manifest.tsv"))
             if line.startswith("filter_flow")]
    assert len(calls) == (2 if http_first else 1)
