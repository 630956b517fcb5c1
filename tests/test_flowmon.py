"""sg_monitor, flowtracker, the Flow object, flow-record engine methods and declarations (docs/plugins.md; Trisul's
sg_monitor, flow_tracker, obj_engine, alert_group and obj_globalt pages), end to end on tests/data/trisul-tutorial.pcap.

Independent truth: tshark's conversation tables (``-z conv,tcp`` / ``conv,udp``: frames and bytes per
direction, start and duration) and its RST packets; the vartype test compares with a Python model of the
T.K.vartype definitions (docs/reference.md `T`) fed the samples the plug-in logged.
"""
from __future__ import annotations

import collections
import heapq
import json
import os
import shutil
import subprocess

import pytest

from luaprobe.engine.fastpath.run import FastPath, RunConfig
from luaprobe.engine.store.writer import Store
from tests import helpers
from tests.test_reassembly import fill, flowkey

DATA = os.path.join(helpers.REPO, "tests", "data")
TUTORIAL = os.path.join(DATA, "trisul-tutorial.pcap")
TSHARK = shutil.which("tshark")
needs_tshark = pytest.mark.skipif(TSHARK is None, reason="tshark is not installed (the independent truth)")


def tshark(*args) -> str:
    return subprocess.run([TSHARK, *args], capture_output=True, text=True, check=True).stdout


def run(tmp_path, plugins, name="out", files=(TUTORIAL,), **kw) -> tuple[dict, str]:
    out = str(tmp_path / name)
    summary = FastPath(RunConfig(plugins=list(plugins), files=list(files), out_dir=out, **kw)).run()
    assert summary["input_errors"] == [] and summary["plugin_problems"] == []
    for p in summary["plugins"]:
        assert p["hook_errors"] == {}, p
    return summary, out


def conversations(proto: str) -> dict:
    """{flowkey: {packets_az, packets_za, bytes_az, bytes_za, first, last}} of IPv4 conversations (tshark)."""
    first_epoch = float(tshark("-r", TUTORIAL, "-c", "1", "-T", "fields", "-e", "frame.time_epoch").strip())
    out = {}
    for line in tshark("-r", TUTORIAL, "-q", "-z", f"conv,{proto}").splitlines():
        if "<->" not in line:
            continue
        f = line.split()
        a, b = f[0], f[2]
        if a.count(".") != 3 or b.count(".") != 3:
            continue                                   # IPv6 (the tests compare IPv4 conversations)
        (ipa, pa), (ipb, pb) = a.rsplit(":", 1), b.rsplit(":", 1)
        nums = [x for x in f[3:] if x not in ("bytes", "kB", "MB")]
        # frames b->a, bytes b->a, frames a->b, bytes a->b, total frames, total bytes, rel start, duration
        fr_ba, fr_ab = int(nums[0]), int(nums[2])
        key = flowkey(ipa, int(pa), ipb, int(pb), 6 if proto == "tcp" else 17)
        a_is_a = key.split(":")[1] == ".".join(f"{int(x):02X}" for x in ipa.split(".")) and \
            key.split(":")[2].split("_")[0] == f"p-{int(pa):04X}"
        start = float(nums[6])
        out[key] = {"packets_az": fr_ab if a_is_a else fr_ba, "packets_za": fr_ba if a_is_a else fr_ab,
                    "first": first_epoch + start, "last": first_epoch + start + float(nums[7])}
    return out


def frame_bytes() -> dict:
    """{flowkey: [bytes a->z, bytes z->a]} summed from every IPv4 TCP/UDP frame (tshark fields)."""
    out = collections.defaultdict(lambda: [0, 0])
    for line in tshark("-r", TUTORIAL, "-Y", "ip && (tcp || udp) && !icmp", "-T", "fields", "-e", "ip.src", "-e", "ip.dst",
                       "-e", "tcp.srcport", "-e", "tcp.dstport", "-e", "udp.srcport", "-e", "udp.dstport", "-e",
                       "frame.len", "-e", "ip.proto").splitlines():
        src, dst, ts, td, us, ud, n, proto = line.split("\t")
        sp, dp = (int(ts), int(td)) if ts else (int(us), int(ud))
        key = flowkey(src, sp, dst, dp, int(proto))
        az = key.split("_")[0].endswith(f"{'.'.join(f'{int(x):02X}' for x in src.split('.'))}:p-{sp:04X}")
        out[key][0 if az else 1] += int(n)
    return out


def _top3_per_bucket(convs, fb) -> list:
    """The toppers rows a "Top TCP" tracker of 3 per 10 s bucket must store: (tracker, bucket, rank, flow key, metric)
    for the 3 largest by frame bytes (`fb`) of the conversations (`convs`: (key, tshark row)) per bucket of each
    one's last packet."""
    buckets = collections.defaultdict(list)
    for key, conv in convs:
        last = int(conv["last"] + 1e-7)
        buckets[last - last % 10].append((sum(fb[key]), key))
    want = []
    for b in sorted(buckets):
        top = heapq.nlargest(3, buckets[b])
        want += [("Top TCP", b, rank, key, m) for rank, (m, key) in enumerate(top, 1)]
    return want


SG = r'''
local OUT = %q
TrisulPlugin = {
  id = { name = "sg test" },
  onload = function() T.f = io.open(OUT .. "." .. tostring({}):match("0x(%%x+)"), "w") end,
  sg_monitor = {
    onnewflow = function(engine, flow) T.f:write("new\t", flow:key(), "\n") end,
    onterminate = function(engine, flow) T.f:write("term\t", flow:key(), "\n") end,
    flushfilter = function(engine, flow) return flow:flow():protocol() ~= "11" end,
    onflush = function(engine, flow)
      local a, b = flow:time_window()
      if flow:az_bytes() + flow:za_bytes() > 20000 then flow:add_tag("BIG") end
      T.f:write("flush\t", flow:key(), "\t", flow:az_packets(), "\t", flow:za_packets(), "\t", flow:az_bytes(),
                "\t", flow:za_bytes(), "\t", flow:az_payload_bytes(), "\t", flow:za_payload_bytes(), "\t",
                flow:state(), "\t", string.format("%%.6f\t%%.6f", a, b), "\t", flow:tags(), "\n")
      T.f:flush()
    end,
    onendflush = function(engine) T.f:flush() end,
  },
  onunload = function() T.f:close() end,
}
'''
SG_NO = r'''
TrisulPlugin = { id = { name = "sg votes no" },
  sg_monitor = { flushfilter = function(engine, flow) return false end } }
'''


def read_rows(prefix):
    rows = []
    d, base = os.path.split(prefix)
    for name in os.listdir(d):
        if name.startswith(base + "."):
            with open(os.path.join(d, name)) as f:
                rows += [line.rstrip("\n").split("\t") for line in f]
    return rows


@needs_tshark
def test_sg_monitor_flows_match_tshark(tmp_path):
    log = str(tmp_path / "sg")
    a = helpers.write_plugin(tmp_path, fill(SG, log), "sg.lua")
    b = helpers.write_plugin(tmp_path, SG_NO, "sgno.lua")
    summary, out = run(tmp_path, [a, b])
    rows = read_rows(log)
    flushed = {r[1]: r for r in rows if r[0] == "flush"}
    news = [r[1] for r in rows if r[0] == "new"]
    terms = [r[1] for r in rows if r[0] == "term"]
    assert len(news) == len(set(news)) == len(terms) == len(set(terms)) == summary["flows"]

    tcp, udp = conversations("tcp"), conversations("udp")
    fb = frame_bytes()
    v4 = {k: r for k, r in flushed.items() if k[2] == "A" and k[:2] in ("06", "11")}
    assert set(v4) == set(tcp)                             # UDP: both scripts voted no, so no onflush
    for key, conv in tcp.items():
        r = v4[key]
        assert (int(r[2]), int(r[3])) == (conv["packets_az"], conv["packets_za"]), key
        assert [int(r[4]), int(r[5])] == fb[key], key
        assert abs(float(r[9]) - conv["first"]) < 2e-6 and abs(float(r[10]) - conv["last"]) < 1e-4   # conv: 4 decimals
        assert int(r[8]) & 0x800                           # TERMINATED
        assert ("BIG" in r[11].split("|")) == (sum(fb[key]) > 20000)

    # the flows table: TCP rows only (UDP voted out by both scripts), BIG tags written with the row
    with Store(out) as s:
        stored = {f["flowkey"]: f for f in s.flows()}
    assert {k for k in stored if k[:2] == "11"} == set()
    assert {k for k in stored if k[2] == "A" and k[:2] == "06"} == set(tcp)
    for key in tcp:
        assert (stored[key]["tags"] == "BIG") == (sum(fb[key]) > 20000)
    assert summary["flow_backends"]["flows_filtered_out"] == sum(1 for k in terms if k[:2] == "11") > 0
    assert len(udp) > 0


SG_UDP_NO = r"""
TrisulPlugin = { id = { name = "sg drops udp" },
  sg_monitor = { flushfilter = function(engine, flow) return flow:flow():protocol() ~= "11" end } }
"""
SG_WATCH = r"""
TrisulPlugin = { id = { name = "sg watches" },
  sg_monitor = { onflush = function(engine, flow) T.n = (T.n or 0) + 1 end } }
"""


@needs_tshark
def test_sg_monitor_without_flushfilter_casts_no_vote(tmp_path):
    """Trisul's flushfilter rule for sg_monitor: a flow record is stored unless every script that has a
    flushfilter votes false; a second sg_monitor with only onflush does not vote, so the UDP records the first
    one drops stay out (before: the watcher's missing filter kept every record).  TCP conversations: tshark's."""
    a = helpers.write_plugin(tmp_path, SG_UDP_NO, "udpno.lua")
    b = helpers.write_plugin(tmp_path, SG_WATCH, "watch.lua")
    summary, out = run(tmp_path, [a, b])
    with Store(out) as s:
        stored = {f["flowkey"] for f in s.flows()}
    udp = conversations("udp")
    assert len(udp) > 0 and not any(k[:2] == "11" for k in stored)
    assert {k for k in stored if k[2] == "A" and k[:2] == "06"} == set(conversations("tcp"))
    assert summary["flow_backends"]["flows_filtered_out"] >= len(udp)


FT = r'''
TrisulPlugin = { id = { name = "ft test" },
  flowtracker = {
    control = { name = "Top TCP", bucketsize = 10, count = 3 },
    getmetric = function(engine, flow)
      if flow:flow():protocol() ~= "06" then return 0 end
      return flow:az_bytes() + flow:za_bytes()
    end,
  },
}
'''


@needs_tshark
def test_flowtracker_topk_matches_tshark(tmp_path):
    plugin = helpers.write_plugin(tmp_path, FT, "ft.lua")
    summary, out = run(tmp_path, [plugin])
    tcp, fb = conversations("tcp"), frame_bytes()
    want = _top3_per_bucket(tcp.items(), fb)
    with Store(out) as s:
        got = [(r["tracker"], int(r["bucket_ts"]), int(r["rank"]), r["flowkey"], int(r["metric"]))
               for r in s.flow_toppers()]
    assert got == want and len(want) >= 6
    cli = subprocess.run([os.path.join(helpers.REPO, ".venv", "bin", "luaprobe"), "query", "toppers", "--out", out],
                         capture_output=True, text=True)
    assert cli.returncode == 0 and "Top TCP" in cli.stdout


TAGGER = r'''
TrisulPlugin = { id = { name = "tagger" },
  simplecounter = {
    protocol_guid = "{77E462AB-2E42-42ec-9A58-C1A6821D6B31}",
    onpacket = function(engine, layer)
      if layer:testbit(109) then engine:tag_flow(layer:flowkey(), "RST") end
      if not T.done then
        T.done = true
        local fk = "11A:0A.00.00.01:p-1F90_0A.00.00.02:p-0035"
        engine:new_flow_record(fk, 100, 200, 1, 2)
        engine:update_flow(fk, 0, 50)
        engine:update_flow_raw(fk, 3, 1)
        engine:set_flow_duration(fk, 30)
        engine:tag_flow(fk, "NAT")
        engine:tag_flow(fk, "NAT")                                   -- a tag given twice is kept once
        engine:tag_flow(fk, ("x"):rep(30))                            -- "NAT x..x": 34 bytes
        engine:tag_flow(fk, ("y"):rep(30))                            -- 65 bytes with it: dropped (64 at most)
        engine:tag_flow(fk, "z")                                      -- fits again
        engine:terminate_flow(fk)
        engine:update_flow("11A:0A.00.00.03:p-1F90_0A.00.00.04:p-0035", 2, 7)
        engine:add_edge("{11111111-2222-3333-4444-555555555555}", "ja3", "{66666666-7777-8888-9999-000000000000}", "sni")
        engine:add_flow_edges(layer:flowkey(), "{11111111-2222-3333-4444-555555555555}", "ja3")
        engine:add_alert_ids("{9AFD8C08-07EB-47E0-BF05-28B4A7AE8DC9}", layer:flowkey(), "sid-1", "lua-social", 1, "m")
      end
    end,
  },
}
'''


@needs_tshark
def test_flow_record_methods(tmp_path):
    plugin = helpers.write_plugin(tmp_path, TAGGER, "tagger.lua")
    summary, out = run(tmp_path, [plugin])
    rst = set()
    for line in tshark("-r", TUTORIAL, "-Y", "tcp.flags.reset==1 && ip", "-T", "fields", "-e", "ip.src", "-e",
                       "tcp.srcport", "-e", "ip.dst", "-e", "tcp.dstport").splitlines():
        s, sp, d, dp = line.split("\t")
        rst.add(flowkey(s, int(sp), d, int(dp)))
    with Store(out) as st:
        flows = {f["flowkey"]: f for f in st.flows()}
        edges = st.edges()
        alerts = st.alerts()
    # every packet with RST tags its flow again: the flow has the tag once (tshark: several RSTs on some flows)
    assert rst and {k: f["tags"] for k, f in flows.items() if f["tags"] and k in rst} == {k: "RST" for k in rst}
    nat = flows["11A:0A.00.00.01:p-1F90_0A.00.00.02:p-0035"]
    # new_flow_record announces the record, its metrics unchanged (Trisul); update_flow / update_flow_raw add to them
    assert (nat["bytes_az"], nat["bytes_za"], nat["packets_az"], nat["packets_za"]) == (50, 0, 0, 1)
    assert nat["last_ts"] - nat["first_ts"] == 30 and nat["state"] == "TERMINATED"
    assert nat["tags"] == "NAT " + "x" * 30 + " z"                   # Trisul: tags of a flow < 64 bytes, excess dropped
    other = flows["11A:0A.00.00.03:p-1F90_0A.00.00.04:p-0035"]
    assert other["state"] == "OPEN" and other["packets_az"] == 7 and other["proto"] == 17
    assert edges[0]["s_key"] == "ja3" and edges[0]["t_key"] == "sni"
    first = edges[1]["flowkey"]
    fe = [(e["s_guid"], e["s_key"], e["t_guid"], e["t_key"]) for e in edges[1:]]
    ipa, ipz, portz = first.split(":")[1], first.split("_")[1].split(":")[0], first.split(":")[-1]
    hosts, apps, g = "{4CD742B1-C1CA-4708-BE78-0FCA2EB01A86}", "{C51B48D4-7876-479E-B0D9-BD9EFF03CE2E}", \
        "{11111111-2222-3333-4444-555555555555}"
    assert sorted(fe) == sorted([(g, "ja3", hosts, ipa), (hosts, ipa, g, "ja3"), (g, "ja3", hosts, ipz),
                                 (hosts, ipz, g, "ja3"), (g, "ja3", apps, portz), (apps, portz, g, "ja3")])
    (a,) = alerts
    assert (a["sigid"], a["classification"], a["priority"], a["status"]) == ("sid-1", "lua-social", 1, "")


DECL = r'''
local OUT = %q
TrisulPlugin = { id = { name = "decl" },
  alertgroup = { control = { guid = "{aaaaaaaa-1111-2222-3333-444444444444}", name = "My Alerts",
                             description = "test alerts" } },
  countergroup = {
    control = { guid = "{bbbbbbbb-1111-2222-3333-444444444444}", name = "Vartypes", bucketsize = 10 },
    meters = {
      { 0, T.K.vartype.DELTA_RATE_COUNTER, 10, 0, "delta", "d", "d/s" },
      { 1, T.K.vartype.RUNNING_COUNTER, 10, 0, "running", "r", "r" },
      { 2, T.K.vartype.RATE_COUNTER, 10, 0, "rate", "x", "x/s" },
    },
    keyinfo = { { "k", "the key" }, { "j", "other key" } },
  },
  engine_monitor = {
    onmetronome = function(engine, ts, tick, interval)
      if engine:instanceid() ~= "0" then return end
      if tick == 1 then
        local f = io.open(OUT .. ".names", "w")
        f:write(T.alertgroups["My Alerts"] or "nil", "\n", T.ftsgroups["SSL Certs"] or "nil", "\n",
                T.resourcegroups["URL"] or "nil", "\n", T.countergroups["Vartypes"] or "nil", "\n",
                T.sessiongroups["IP Flows"] or "nil", "\n")
        f:close()
      end
      T.total = (T.total or 0) + tick * 3
      engine:update_counter("{bbbbbbbb-1111-2222-3333-444444444444}", "k", 0, T.total)
      if tick <= 12 then engine:update_counter("{bbbbbbbb-1111-2222-3333-444444444444}", "k", 1, 2) end
      engine:update_counter("{bbbbbbbb-1111-2222-3333-444444444444}", "k", 2, tick)
      local f = io.open(OUT .. ".samples", "a")
      f:write(ts, "\t", T.total, "\t", tick, "\n")
      f:close()
    end,
  },
}
RG = 1
'''
RG = r'''
TrisulPlugin = { id = { name = "rg" },
  resourcegroup = { control = { guid = "{cccccccc-1111-2222-3333-444444444444}", name = "HTTP User-Agent",
                                description = "user agents" } } }
'''


def test_declarations_and_vartypes(tmp_path):
    log = str(tmp_path / "decl")
    a = helpers.write_plugin(tmp_path, fill(DECL, log), "decl.lua")
    b = helpers.write_plugin(tmp_path, RG, "rg.lua")
    summary, out = run(tmp_path, [a, b])
    names = open(log + ".names").read().split("\n")
    assert names[:5] == ["{AAAAAAAA-1111-2222-3333-444444444444}", "{9FEB8ADE-ADBB-49AD-BC68-C6A02F389C71}",
                         "{4EF9DEB9-4332-4867-A667-6A30C5900E9E}", "{BBBBBBBB-1111-2222-3333-444444444444}",
                         "{99A78737-4B41-4387-8F31-8077DB917336}"]
    with Store(out) as s:
        decls = {(d["kind"], d["guid"]): d for d in s.decl_groups()}
        keyinfo = {(k["key"], k["label"]) for k in s.key_info()}
        counters = s.counters(group="Vartypes")
    assert decls[("alert", "{AAAAAAAA-1111-2222-3333-444444444444}")]["name"] == "My Alerts"
    assert decls[("resource", "{CCCCCCCC-1111-2222-3333-444444444444}")]["description"] == "user agents"
    assert ("fts", "{9FEB8ADE-ADBB-49AD-BC68-C6A02F389C71}") in decls
    assert {("k", "the key"), ("j", "other key")} <= keyinfo

    # model of the T.K.vartype rules (docs/reference.md `T`) from the logged samples: bucket = 10 s
    samples = [tuple(int(float(x)) for x in line.split("\t")) for line in open(log + ".samples")]
    by_bucket = collections.OrderedDict()
    for ts, total, tick in samples:
        by_bucket.setdefault(ts - ts % 10, []).append((total, tick))
    want, prev_last, running = {}, None, 0
    for b, xs in by_bucket.items():
        last = xs[-1][0]
        c1 = prev_last if prev_last is not None else xs[0][0]
        want[(b, 0)] = (last - c1) / 10
        prev_last = last
        running += 2 * sum(1 for _, t in xs if t <= 12)
        want[(b, 1)] = running
        want[(b, 2)] = sum(t for _, t in xs) / 10
    got = {(int(c["bucket_ts"]), int(c["meter"])): float(c["value"]) for c in counters if c["key"] == "k"}
    assert len(by_bucket) >= 3 and got == pytest.approx(want)


ALL_TYPES = "\n".join([
    "TrisulPlugin = { id = { name = 'all' },",
    *[f"  {t} = {{ control = {{ guid = '{{AAAAAAAA-1111-2222-3333-44444444444{i:X}}}', name = '{t}' }} }},"
      for i, t in enumerate(["simplecounter", "countergroup", "filex_monitor", "reassembly_handler", "alertgroup",
                             "resourcegroup", "protocol_handler", "packet_storage", "inputfilter", "messagemonitor",
                             "flowmonitor", "channellistener", "engine_monitor", "sg_monitor", "resource_monitor",
                             "fts_monitor", "cg_monitor", "alert_monitor", "flowtracker"])],
    "}"])


def test_check_reports_every_script_type(tmp_path):
    """Every script type Trisul documents is reported supported or not supported by name."""
    plugin = helpers.write_plugin(tmp_path, ALL_TYPES, "all.lua")
    r = subprocess.run([os.path.join(helpers.REPO, ".venv", "bin", "luaprobe"), "check", plugin],
                       capture_output=True, text=True)
    assert "Traceback" not in r.stderr + r.stdout
    for t in ["reassembly_handler", "sg_monitor", "flowtracker", "alertgroup", "resourcegroup", "engine_monitor",
              "simplecounter", "filex_monitor", "countergroup", "protocol_handler", "packet_storage",
              "resource_monitor", "fts_monitor", "cg_monitor", "alert_monitor", "flowmonitor", "messagemonitor",
              "channellistener"]:
        assert f"{t} (supported)" in r.stdout, t
    for t in ["inputfilter"]:
        assert f"{t} (not supported)" in r.stdout and f"script type '{t}' is not supported" in r.stdout, t
    # simplecounter without protocol_guid etc. is a problem of the file, named, exit 4 (not a crash)
    assert r.returncode == 4, r.stdout


FT_UDP = r'''
TrisulPlugin = { id = { name = "top udp" },
  flowtracker = {
    control = { name = "Top UDP", description = "udp flows by bytes", bucketsize = 300, count = 4 },
    getmetric = function(engine, f)
      if f:flow():protocol() == "11" then return f:az_bytes() + f:za_bytes() end
    end } }
'''


def udp_toppers(cap: str) -> list[tuple]:
    """FT_UDP's rows (tracker, bucket_ts, rank, flowkey, metric) for ``cap`` from tshark: its UDP frames split
    into records at 120 s idle, each record's bytes ranked in the 300 s bucket of its last packet, top 4."""
    records, open_ = [], {}
    for line in tshark("-r", cap, "-Y", "ip && udp && !icmp", "-T", "fields", "-e", "frame.time_epoch", "-e", "ip.src",
                       "-e", "udp.srcport", "-e", "ip.dst", "-e", "udp.dstport", "-e", "frame.len").splitlines():
        t, src, sp, dst, dp, ln = line.split("\t")
        key, t = flowkey(src, int(sp), dst, int(dp), 17), float(t)
        cur = open_.get(key)
        if cur is None or t - cur[1] > 120:
            if cur is not None:
                records.append((key, cur))
            cur = open_[key] = [0, t]
        cur[0] += int(ln)
        cur[1] = t
    records += list(open_.items())
    buckets = collections.defaultdict(list)
    for key, (nbytes, last) in records:
        last = int(last)
        buckets[last - last % 300].append((nbytes, key))
    want = []
    for b in sorted(buckets):
        want += [("Top UDP", b, rank, key, m) for rank, (m, key) in enumerate(heapq.nlargest(4, buckets[b]), 1)]
    return want


def toppers(out: str) -> list[tuple]:
    with Store(out) as s:
        return sorted((r["tracker"], int(r["bucket_ts"]), int(r["rank"]), r["flowkey"], int(r["metric"]))
                      for r in s.flow_toppers())


@needs_tshark
def test_flowtracker_bucket_ranked_again_when_a_late_flow_ends(tmp_path):
    """A flow's record arrives when it ends (120 s idle), often after the bucket of its last packet was written
    (300 s buckets of trisul-16minutes.pcap): the bucket is ranked again with its earlier top-K; before, the late
    record's rows replaced rank 1.. of the bucket (the flow_toppers rows are keyed by rank), losing the best flows.
    Truth: tshark's UDP frames, split into records at 120 s idle, ranked per bucket of the last packet."""
    cap = os.path.join(DATA, "trisul-16minutes.pcap")
    plugin = helpers.write_plugin(tmp_path, FT_UDP, "ftudp.lua")
    summary, out = run(tmp_path, [plugin], files=(cap,))
    want = udp_toppers(cap)
    assert toppers(out) == want
    st = summary["flow_backends"]
    assert st["toppers_written"] == len(want) and st["toppers_rewritten"] > 0 and st["toppers_late"] == 0


@needs_tshark
@pytest.mark.parametrize("shards", [2, 3])
def test_flowtracker_ranks_of_a_sharded_run_are_the_whole_probes(tmp_path, shards):
    """With --shards N every shard ranks its own flows; the store ranks the shards' parts of each bucket into one
    top-K (engine/store/writer.py _rank_toppers).  Before, each shard's rank 1.. overwrote the others' (rows are
    keyed by rank): 85 rows of 88 for 2 shards on this capture, with the best flows of a bucket lost.
    Truth: tshark's UDP records ranked per bucket (udp_toppers), as for one fast path above."""
    cap = os.path.join(DATA, "trisul-16minutes.pcap")
    plugin = helpers.write_plugin(tmp_path, FT_UDP, "ftudp.lua")
    out, stats = str(tmp_path / "out"), tmp_path / "s.json"
    r = subprocess.run([os.path.join(helpers.REPO, ".venv", "bin", "luaprobe"), "run", plugin, "--pcap", cap,
                        "--out", out, "--shards", str(shards), "-q", "--stats-json", str(stats)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    s = json.loads(stats.read_text())
    assert [x["packets"] > 0 for x in s["shards"]] == [True] * shards       # the flows are spread
    want = udp_toppers(cap)
    assert toppers(out) == want
    fb = s["flow_backends"]
    assert fb["toppers_late"] == 0 and fb["toppers_written"] >= len(want)


FT_NAN = r'''
TrisulPlugin = { id = { name = "ft nan" },
  flowtracker = {
    control = { name = "Top TCP", bucketsize = 10, count = 3 },
    getmetric = function(engine, flow)
      if flow:flow():protocol() ~= "06" then return 0 end
      if (flow:az_packets() + flow:za_packets()) %% 2 == 1 then return 0/0 end      -- odd packet counts: NaN
      if (flow:az_packets() + flow:za_packets()) %% 8 == 2 then return 1/0 end      -- 2 mod 8: inf
      return flow:az_bytes() + flow:za_bytes()
    end,
  },
}
'''


@needs_tshark
def test_flowtracker_nan_metric_excludes_the_flow_and_keeps_the_topk(tmp_path):
    """Found by a hostile pass (2026-12-02): a getmetric returning NaN (0/0, a ratio of a flow with no packets in one
    direction) was taken as a metric, and one NaN in a bucket made its top-K wrong (heapq.nlargest keeps lower
    metrics and drops higher ones when a key is NaN: -inf ranked while -5 was dropped) and wrote a row whose metric
    is NULL; an infinite metric ranked first and was printed as the non-JSON Infinity.  Now NaN and +-inf exclude
    the flow, as 0, nil and non-numbers do (docs/plugins.md).  Truth: tshark's conversations (frames and bytes per
    flow) ranked by Python, the NaN flows (odd frame counts) and the inf flows (2 mod 8) left out."""
    plugin = helpers.write_plugin(tmp_path, FT_NAN.replace("%%", "%"), "ft.lua")
    summary, out = run(tmp_path, [plugin])
    tcp, fb = conversations("tcp"), frame_bytes()
    kept, nan, inf = [], 0, 0
    for key, conv in tcp.items():
        if (conv["packets_az"] + conv["packets_za"]) % 2 == 1:
            nan += 1
        elif (conv["packets_az"] + conv["packets_za"]) % 8 == 2:
            inf += 1
        else:
            kept.append((key, conv))
    want = _top3_per_bucket(kept, fb)
    with Store(out) as s:
        got = [(r["tracker"], int(r["bucket_ts"]), int(r["rank"]), r["flowkey"], r["metric"])
               for r in s.flow_toppers()]
    assert nan >= 3 and inf >= 3 and len(want) >= 5
    assert got == want
