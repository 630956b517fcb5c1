"""`luaprobe gen` (engine/gen/traffic.py + engine/gen/builder.lua): determinism, tshark validity (no malformed
packets, no checksum errors), protocol counts, HTTP object extraction against the manifest, luaprobe's
own reader and decoder (packet count, flow keys, timestamps, MSS, VLAN)."""
from __future__ import annotations

import collections
import hashlib
import json
import os
import shutil
import subprocess
import sys

import pytest

from luaprobe.engine.daemon import cli
from luaprobe.engine.gen import traffic as gen
from luaprobe.engine.capture.pcapfile import count_packets, open_capture
from tests import helpers

TSHARK = shutil.which("tshark")
need_tshark = pytest.mark.skipif(TSHARK is None, reason="tshark not installed (CI installs it: .ci/run); "
                                 "the tshark cross-checks of the generated captures are skipped")
CHECKS = ["-o", "tcp.check_checksum:TRUE", "-o", "udp.check_checksum:TRUE", "-o", "ip.check_checksum:TRUE"]

VARIANTS = {
    # every flow kind, IPv4 + IPv6, all three body encodings, several content types
    "mixed": dict(fmt="pcap", seed=7, flows=60, http_sizes="1000,20000,150000",
                  http_types="text/html,image/png,application/pdf,application/json,application/octet-stream",
                  chunked_fraction=0.3, gzip_fraction=0.3, ipv6_fraction=0.3),
    # pcapng (EPB, nanosecond timestamps), IPv6 only, 802.1Q tag
    "ng_v6_vlan": dict(fmt="pcapng", seed=8, flows=40, http_sizes="3000,40000", ipv6_fraction=1.0, vlan=100,
                       chunked_fraction=0.5, size_dist="uniform:64-1500", mix="tcp=30,udp=20,icmp=15,dns=15,http=20"),
    # pcapng, IPv4 with a VLAN tag, fixed sizes, small MSS
    "ng_v4_vlan": dict(fmt="pcapng", seed=9, flows=30, http_sizes="70000", vlan=4000, size_dist="fixed:512",
                       mss=536, gzip_fraction=0.5),
}


def make(path, **kw) -> dict:
    kw.setdefault("fmt", "pcap")
    return gen.generate(gen.GenConfig(str(path), **kw))


@pytest.fixture(scope="module")
def captures(tmp_path_factory):
    d = tmp_path_factory.mktemp("gen")
    out = {}
    for name, kw in VARIANTS.items():
        path = d / f"{name}.{kw['fmt']}"
        summary = make(path, **kw)
        with open(str(path) + ".bodies.json") as f:
            out[name] = (str(path), summary, json.load(f))
    return out


def tshark(*args) -> str:
    r = subprocess.run([TSHARK, *args], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    return r.stdout


def tshark_problems(path) -> list[str]:
    """Frames with an expert error (checksum errors, malformed packets, ...)."""
    out = tshark("-r", path, *CHECKS, "-Y", "_ws.expert.severity == error || _ws.malformed",
                 "-T", "fields", "-e", "frame.number", "-e", "_ws.expert.message")
    return [line for line in out.splitlines() if line.strip()]


def sha_dir(d) -> list[str]:
    return sorted(hashlib.sha256(open(os.path.join(d, f), "rb").read()).hexdigest() for f in os.listdir(d))


# ------------------------------------------------------------------------------------ determinism

@pytest.mark.parametrize("fmt", ["pcap", "pcapng"])
def test_same_seed_same_bytes_other_seed_differs(tmp_path, fmt):
    kw = dict(fmt=fmt, flows=40, http_sizes="1000,30000", gzip_fraction=0.3, chunked_fraction=0.3,
              ipv6_fraction=0.3)
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    sa = make(a, seed=42, **kw)
    make(b, seed=42, **kw)
    make(c, seed=43, **kw)
    assert a.read_bytes() == b.read_bytes()
    assert open(str(a) + ".bodies.json").read().replace('"a"', '"b"') == open(str(b) + ".bodies.json").read()
    assert a.read_bytes() != c.read_bytes()
    ma = json.load(open(str(a) + ".bodies.json"))
    mc = json.load(open(str(c) + ".bodies.json"))
    assert [x["sha256"] for x in ma["bodies"]] != [x["sha256"] for x in mc["bodies"]]
    assert sa["packets"] > 0 and sa["bodies"] == len(ma["bodies"]) > 0


# ------------------------------------------------------------------------------------ luaprobe's reader

@pytest.mark.parametrize("name", list(VARIANTS))
def test_luaprobe_reader_counts_match(captures, name):
    path, summary, manifest = captures[name]
    n, nbytes, err = count_packets(path)
    assert err is None
    assert n == summary["packets"] == manifest["stats"]["packets"]
    assert nbytes == summary["bytes"]
    assert os.path.getsize(path) == summary["file_bytes"]


WALK = """
function(addr, size, http_port)
  local pcapfile = require "luaprobe.engine.capture.pcapfile"
  local decode = require "luaprobe.engine.fastpath.decode"
  local P = decode.PROTO
  local r = pcapfile.open(addr, size)
  local d = decode.new()
  local res = { keys = {}, mono = true, n = 0, maxpay4 = 0, maxpay6 = 0, vlans = {}, bad = 0, v6 = 0 }
  local ps, pns = -1, 0
  while true do
    local p, caplen, wirelen, s, ns, lt = r:next()
    if not p then break end
    res.n = res.n + 1
    if res.n == 1 then res.first_s, res.first_ns = s, ns end
    res.last_s, res.last_ns = s, ns
    if s < ps or (s == ps and ns <= pns) then res.mono = false end
    ps, pns = s, ns
    decode.decode(d, p, caplen, lt)
    if d.truncated ~= 0 or d.malformed ~= 0 or d.ip_version == 0 then res.bad = res.bad + 1 end
    if d.ip_version == 6 then res.v6 = res.v6 + 1 end
    res.vlans[d.vlan] = (res.vlans[d.vlan] or 0) + 1
    if decode.find(d, P.TCP) >= 0 then
      if d.sport == http_port or d.dport == http_port then res.keys[decode.flowkey(d)] = true end
      if d.ip_version == 4 then
        if d.payload_length > res.maxpay4 then res.maxpay4 = d.payload_length end
      elseif d.payload_length > res.maxpay6 then res.maxpay6 = d.payload_length end
    end
  end
  res.error = r.error
  return res
end
"""


def walk(path) -> dict:
    from luaprobe.shm import luajit
    lua = luajit.new_runtime(encoding="utf-8")
    with open_capture(path) as cap:
        res = lua.eval(WALK)(cap.address, cap.size, 80)
        out = {k: res[k] for k in ("mono", "n", "maxpay4", "maxpay6", "bad", "v6", "error", "first_s",
                                   "first_ns", "last_s", "last_ns")}
        out["keys"] = set(res["keys"].keys())
        out["vlans"] = dict(res["vlans"].items())
    return out


@pytest.mark.parametrize("name", list(VARIANTS))
def test_decoder_flow_keys_timestamps_mss_vlan(captures, name):
    path, summary, manifest = captures[name]
    kw = VARIANTS[name]
    w = walk(path)
    assert w["error"] is None and w["bad"] == 0
    assert w["n"] == summary["packets"]
    # the manifest's flow keys are the ones luaprobe's decoder computes for the HTTP packets
    assert w["keys"] == {b["flow"] for b in manifest["bodies"]}
    # timestamps strictly increase at the nominal rate (default 10000 packets/s)
    assert w["mono"]
    assert (w["first_s"], w["first_ns"]) == (1704067200, 0)
    span = (w["last_s"] - w["first_s"]) + (w["last_ns"] - w["first_ns"]) / 1e9
    assert span == pytest.approx((w["n"] - 1) / 10000.0, abs=1e-6)
    # every TCP segment within the MSS (IPv6: MSS - 20)
    mss = kw.get("mss", 1460)
    assert w["maxpay4"] <= mss and w["maxpay6"] <= mss - 20
    if summary["http_flows"] and kw.get("ipv6_fraction", 0) < 1:
        assert w["maxpay4"] == mss               # big bodies fill whole segments
    vlan = kw.get("vlan")
    assert w["vlans"] == {(-1 if vlan is None else vlan): w["n"]}
    if kw.get("ipv6_fraction", 0) == 1.0:
        assert w["v6"] == w["n"]
        assert all(k[2] == "B" for k in w["keys"])


# ------------------------------------------------------------------------------------ tshark

@need_tshark
@pytest.mark.parametrize("name", list(VARIANTS))
def test_tshark_no_malformed_no_checksum_errors(captures, name):
    path, _, _ = captures[name]
    assert tshark_problems(path) == []


@need_tshark
def test_tshark_error_check_catches_a_corrupted_capture(captures, tmp_path):
    """Negative control: the error filter does see a bad TCP checksum."""
    path, _, _ = captures["mixed"]
    bad = tmp_path / "bad.pcap"
    data = bytearray(open(path, "rb").read())
    data[-3] ^= 0xFF          # the last frame is the client's final ACK: a byte of its TCP checksum
    bad.write_bytes(bytes(data))
    assert tshark_problems(str(bad))


FIELDS = ["dns.flags.response", "icmp.type", "icmpv6.type", "tcp.stream", "http.response.code",
          "http.request.method", "http.transfer_encoding", "http.content_encoding", "udp.srcport"]


@need_tshark
@pytest.mark.parametrize("name", list(VARIANTS))
def test_tshark_protocol_counts(captures, name):
    path, summary, manifest = captures[name]
    out = tshark("-r", path, "-T", "fields", "-E", "occurrence=f", *sum((["-e", f] for f in FIELDS), []))
    rows = [dict(zip(FIELDS, line.split("\t"))) for line in out.splitlines()]
    assert len(rows) == summary["packets"]
    c = collections.Counter()
    streams = set()
    for r in rows:
        c["dns_q"] += r["dns.flags.response"] == "0"
        c["dns_r"] += r["dns.flags.response"] == "1"
        c["echo_q"] += r["icmp.type"] == "8" or r["icmpv6.type"] == "128"
        c["echo_r"] += r["icmp.type"] == "0" or r["icmpv6.type"] == "129"
        c["http_resp"] += r["http.response.code"] == "200"
        c["http_req"] += r["http.request.method"] == "GET"
        c["chunked"] += r["http.transfer_encoding"] == "chunked"
        c["gzip"] += r["http.content_encoding"] == "gzip"
        if r["tcp.stream"]:
            streams.add(r["tcp.stream"])
    assert c["dns_q"] == c["dns_r"] == summary["dns_queries"] == summary["dns_responses"]
    assert summary["dns_flows"] == 0 or c["dns_q"] > 0
    assert c["echo_q"] == c["echo_r"] == summary["echo_requests"] == summary["echo_replies"]
    assert len(streams) == summary["tcp_flows"] + summary["http_flows"] == summary["syn"]
    assert c["http_resp"] == c["http_req"] == summary["http_responses"] == len(manifest["bodies"])
    encs = collections.Counter(b["encoding"] for b in manifest["bodies"])
    assert c["chunked"] == encs["chunked"] and c["gzip"] == encs["gzip"]


@need_tshark
@pytest.mark.parametrize("name", list(VARIANTS))
def test_tshark_export_objects_match_manifest(captures, name, tmp_path):
    """tshark (4.0) exports every body decoded: de-chunked and, with http.decompress_body (default TRUE),
    gunzipped -> the exported files are exactly the manifest's sha256 (the decoded bodies)."""
    path, _, manifest = captures[name]
    d = tmp_path / "objects"
    tshark("-r", path, "-q", "--export-objects", f"http,{d}")
    assert sha_dir(d) == sorted(b["sha256"] for b in manifest["bodies"])
    assert sorted(os.listdir(d)) == sorted(b["filename"] for b in manifest["bodies"])
    assert sorted(os.path.getsize(d / b["filename"]) for b in manifest["bodies"]) == \
        sorted(b["size"] for b in manifest["bodies"])


@need_tshark
def test_tshark_export_without_decompression(captures, tmp_path):
    """With http.decompress_body:FALSE tshark 4.0 still exports identity and chunked bodies (decoded
    sha256) but skips gzip bodies; a tshark that exported the coded entity would match entity_sha256."""
    path, _, manifest = captures["mixed"]
    bodies = manifest["bodies"]
    assert {b["encoding"] for b in bodies} == {"identity", "chunked", "gzip"}
    d = tmp_path / "raw"
    tshark("-r", path, "-o", "http.decompress_body:FALSE", "-q", "--export-objects", f"http,{d}")
    got = collections.Counter(sha_dir(d))
    plain = collections.Counter(b["sha256"] for b in bodies if b["encoding"] != "gzip")
    coded = collections.Counter(b["entity_sha256"] for b in bodies if b["encoding"] == "gzip")
    assert got - coded == plain                  # every plain body, and gzip ones only as the coded entity
    for b in bodies:
        if b["encoding"] == "gzip":
            assert b["entity_size"] != b["size"] or b["entity_sha256"] != b["sha256"]


# ------------------------------------------------------------------------------------ options and CLI

def test_manifest_fields(captures):
    _, _, manifest = captures["mixed"]
    b = manifest["bodies"][0]
    assert set(b) >= {"flow", "url", "content_type", "size", "sha256", "encoding"}
    assert b["flow"].startswith("06A:") or b["flow"].startswith("06B:")
    assert b["flow"].endswith(":p-0050")                 # the server (port 80) is the Z end
    assert b["url"].endswith("/" + b["filename"])
    assert {x["size"] for x in manifest["bodies"]} <= {1000, 20000, 150000}


def test_flow_key_rules():
    c, s = bytes([192, 168, 1, 2]), bytes([209, 216, 249, 58])
    assert gen.flow_key(6, False, c, 2964, s, 22) == "06A:C0.A8.01.02:p-0B94_D1.D8.F9.3A:p-0016"
    assert gen.flow_key(6, False, s, 22, c, 2964) == "06A:C0.A8.01.02:p-0B94_D1.D8.F9.3A:p-0016"
    assert gen.flow_key(1, False, c, 0, s, 0) == "01A:D1.D8.F9.3A:p-0000_C0.A8.01.02:p-0000"
    k = gen.flow_key(17, True, bytes(range(16)), 5000, bytes(16), 53)
    assert k == "11B:000102030405060708090A0B0C0D0E0F:p-1388_" + "0" * 32 + ":p-0035"


def test_packets_budget_is_approximate(tmp_path):
    s = make(tmp_path / "p.pcap", flows=50, packets=20000, http_sizes="5000,20000")
    assert 0.9 * 20000 <= s["packets"] <= 1.1 * 20000


def test_size_dist_fixed(tmp_path):
    # UDP only, fixed 512-byte IP datagrams: every frame is 14 + 512 bytes
    s = make(tmp_path / "u.pcap", flows=10, mix="udp=1", size_dist="fixed:512")
    n, nbytes, err = count_packets(str(tmp_path / "u.pcap"))
    assert err is None and n == s["udp_datagrams"] and nbytes == n * 526


def test_cli_and_luaprobe_subcommand(tmp_path, capsys):
    out = tmp_path / "x.pcapng"
    assert cli.main(["gen", "--out", str(out), "--flows", "12", "--seed", "3", "--http-sizes", "2000"]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith(f"{out}: ") and "packets" in line and "12 flows" in line and "bodies" in line
    assert out.read_bytes()[:4] == b"\x0a\x0d\x0d\x0a"        # .pcapng suffix -> pcapng
    assert os.path.exists(str(out) + ".bodies.json")
    assert gen.main(["--out", str(tmp_path / "y"), "--mix", "bogus=1"]) == 2
    assert gen.main(["--out", str(tmp_path / "y"), "--size-dist", "uniform:9-5"]) == 2
    assert gen.main(["--out", str(tmp_path / "y"), "--gzip-fraction", "0.7", "--chunked-fraction", "0.7"]) == 2
    assert "usage error" not in capsys.readouterr().out


def test_gen_out_dev_stdout_writes_a_clean_stream(tmp_path):
    """`luaprobe gen --out /dev/stdout | tshark -r -`: before, the summary line followed the capture into the pipe
    (tshark: "File has 980710767-byte packet") and a manifest /dev/stdout.bodies.json was planted in /dev.  Now the
    summary goes to stderr and no manifest is written for a file that is not a regular file.  tshark reads every
    record of the stream (the independent count), equal to the summary's."""
    import re
    planted = "/dev/stdout.bodies.json"
    existed = os.path.exists(planted)
    cmd = [sys.executable, "-m", "luaprobe.engine", "gen", "--out", "/dev/stdout", "--packets", "300", "--flows", "5",
           "--seed", "4"]
    try:
        for into_file in (False, True):                 # a pipe into tshark, and stdout redirected into a file
            if into_file:
                with open(tmp_path / "s.pcap", "wb") as out:
                    g = subprocess.run(cmd, stdout=out, stderr=subprocess.PIPE, text=True, timeout=120)
                t = subprocess.run(["tshark", "-r", str(tmp_path / "s.pcap"), "-T", "fields", "-e", "frame.number"],
                                   capture_output=True, text=True, timeout=120)
                gerr = g.stderr
            else:
                g = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
                t = subprocess.run(["tshark", "-r", "-", "-T", "fields", "-e", "frame.number"], stdin=g.stdout,
                                   capture_output=True, text=True, timeout=120)
                g.stdout.close()
                gerr = g.stderr.read().decode()
                g.stderr.close()
                g.wait(60)
            assert g.returncode == 0 and t.returncode == 0, (gerr, t.stderr)
            frames = len(t.stdout.split())
            assert re.search(rf"^/dev/stdout: {frames:,} packets ", gerr, re.M), (into_file, frames, gerr)
            assert os.path.exists(planted) == existed
    finally:
        if not existed and os.path.exists(planted):
            os.unlink(planted)


def _gen_send(*argv, prefix=()):
    env = dict(os.environ, PYTHONPATH=helpers.REPO)
    return subprocess.run([*prefix, sys.executable, "-m", "luaprobe.engine.daemon.cli", "gen", *argv],
                          capture_output=True, text=True, timeout=120, env=env, cwd=helpers.REPO)


def test_gen_interface_errors_are_one_line():
    """`luaprobe gen --interface`: a missing interface, an empty name, and an interface that is down (`lo` of a
    fresh network namespace: sendmmsg gives ENETDOWN) each print one line, no Lua stack traceback; before, the
    first and last printed "if_nametoindex(nosuch0): No such device" / "sendmmsg: Network is down" followed by
    "stack traceback: ..." (exit 1), the empty name the same as a missing one."""
    import socket
    try:
        socket.if_nametoindex("lpnosuch0")
        pytest.skip("an interface lpnosuch0 exists here")
    except OSError:
        pass
    r = _gen_send("--interface", "lpnosuch0", "--count", "10", "--rate", "100")
    assert (r.returncode, r.stderr) == (2, "luaprobe gen: --interface lpnosuch0: no such network interface\n")
    r = _gen_send("--interface", "", "--count", "10", "--rate", "100")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "empty: give an interface name" in r.stderr
    unshare = shutil.which("unshare")
    if unshare is None or subprocess.run([unshare, "-n", "true"]).returncode != 0:
        pytest.skip("no network namespace here (unshare -n: root needed)")
    r = _gen_send("--interface", "lo", "--count", "10", "--rate", "100", prefix=(unshare, "-n"))
    assert (r.returncode, r.stderr) == (1, "luaprobe gen: sendmmsg: Network is down\n"), r.stderr


@pytest.mark.parametrize("flag,value", [("--flows", "0"), ("--packets", "-3"), ("--vlan", "5000"), ("--mss", "9000"),
                                        ("--concurrency", "0"), ("--seed", "-1"), ("--rate", "-2"),
                                        ("--start", "-7")])
def test_out_of_range_value_is_one_line_that_echoes_it(tmp_path, flag, value):
    """`luaprobe gen` with a value out of its range: one usage line naming the flag and the value given, exit 2, no
    file written (before, only the range: "luaprobe gen: --flows: 1..10000000", unlike `run`'s
    "0 is out of range: must be ...")."""
    out = tmp_path / "x.pcap"
    r = subprocess.run([sys.executable, "-m", "luaprobe.engine.daemon.cli", "gen", "--out", str(out), flag, value],
                       cwd=helpers.REPO, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2, r.stderr
    [line] = r.stderr.splitlines()
    assert line.startswith(f"luaprobe gen: {flag}: {value} is out of range"), line
    assert not out.exists()


def _gen_cli(*argv):
    return subprocess.run([sys.executable, "-m", "luaprobe.engine.daemon.cli", "gen", *argv], cwd=helpers.REPO,
                          capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)


def test_gen_out_empty_is_one_usage_line(tmp_path):
    """`luaprobe gen --out "$FILE"` with the variable unset: before, a Python and Lua traceback ending in
    "builder.lua:186: : No such file or directory", exit 1.  Now one usage line, exit 2, as `run --stats-json ""`."""
    r = subprocess.run([sys.executable, "-m", "luaprobe.engine.daemon.cli", "gen", "--out", "", "--flows", "2"],
                       cwd=str(tmp_path), capture_output=True, text=True, timeout=60)
    assert (r.returncode, r.stderr) == (2, "luaprobe gen: --out: empty: give a file name\n"), r.stderr
    assert os.listdir(tmp_path) == []


def test_gen_write_error_on_a_device_is_one_line(tmp_path):
    """`luaprobe gen --out /dev/full`: the kernel fails every write to /dev/full with ENOSPC (the independent truth,
    checked first).  Before, the builder's writes and its close were not checked: "/dev/full: 77 packets ...",
    exit 0, nothing written.  Now one line naming the file and the reason, exit 1."""
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full here")
    with pytest.raises(OSError) as e, open("/dev/full", "wb") as f:
        f.write(b"x")
    assert e.value.strerror == "No space left on device"
    r = _gen_cli("--out", "/dev/full", "--flows", "2", "--mix", "tcp=1")
    assert (r.returncode, r.stderr, r.stdout) == (
        1, "luaprobe gen: --out /dev/full: cannot write: No space left on device (the capture is incomplete)\n", "")


def test_gen_full_filesystem_is_one_line_naming_the_capture(tmp_path):
    """A filesystem that fills while `gen` writes (a 64 KiB tmpfs: the 4 KiB write probe before the run passes).
    Before, the capture's failed writes went unnoticed and the manifest's failure was reported without a name
    ("luaprobe gen: [Errno 28] No space left on device").  Now the capture's first failed write ends the run: one
    line naming the capture, exit 1, and no manifest for a capture that is cut."""
    with helpers.tmpfs(tmp_path / "fs", "size=64k") as fs:
        out = fs / "x.pcap"
        r = _gen_cli("--out", str(out), "--flows", "200", "--seed", "2")
        assert (r.returncode, r.stderr, r.stdout) == (
            1, f"luaprobe gen: --out {out}: cannot write: No space left on device (the capture is incomplete)\n", "")
        assert not os.path.exists(str(out) + ".bodies.json")
