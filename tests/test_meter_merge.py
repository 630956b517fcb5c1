"""Counters of one (group, bucket, key, meter) that reach the store in several parts are combined by meter type
(engine/store/meters.py, docs/schema.md `counters`), not added: parts from several VMs of one fast path (backend
instances), from several shards, from an --append run.

Truths: tshark over the capture (the frames' lengths and times, HTTP response times), Python models of the
T.K.vartype definitions (docs/plugins.md "Counters") over the samples the plug-ins were fed, and one engine.lua VM
fed every sample.
"""
from __future__ import annotations

import collections
import os
import re
import sqlite3
import subprocess

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from luaprobe.engine.store import meters
from luaprobe.engine.store.writer import StoreWriter
from luaprobe.shm.luajit import new_runtime

from .helpers import PCAPS
from .test_fastpath import G_TCP, G_UDP, cli

PCAP = os.path.join(PCAPS, "trisul-16minutes.pcap")
URL_GROUP = "{0E3C5A20-7D5B-4C7A-9E55-31B1D2A6C001}"
TCP_GROUP = "{0E3C5A20-7D5B-4C7A-9E55-31B1D2A6C002}"
URL_RES = "{4EF9DEB9-4332-4867-A667-6A30C5900E9E}"

# A resource_monitor feeding the URL resources' response times into COUNTER / AVERAGE / MAXIMUM / MINIMUM
# meters, the shape of trisul-scripts' backend_scripts/url-latency-monitor/urlmon.lua (key: host + path).
URL_PLUGIN = f'''
TrisulPlugin = {{
  id = {{ name = "url latency meters" }},
  resource_monitor = {{
    resource_guid = '{URL_RES}',
    onnewresource = function(engine, resource)
      local method, host, path = resource:uri():match("^(%S+) (%S+) ([^%?%s]*)")
      local usec = tonumber(resource:label():match("usec:(%d+)") or "")
      if usec and path then
        local key = host .. path
        engine:update_counter("{URL_GROUP}", key, 0, 1)
        engine:update_counter("{URL_GROUP}", key, 1, usec)
        engine:update_counter("{URL_GROUP}", key, 2, usec)
        engine:update_counter("{URL_GROUP}", key, 3, usec)
      end
    end,
  }},
  countergroup = {{
    control = {{ guid = "{URL_GROUP}", name = "URL latency", bucketsize = 60 }},
    meters = {{
      {{ 0, T.K.vartype.COUNTER, 10, 10, "hits", "Hits", "hits" }},
      {{ 1, T.K.vartype.AVERAGE, 10, 10, "avg", "Avg", "us" }},
      {{ 2, T.K.vartype.MAXIMUM, 10, 10, "max", "Max", "us" }},
      {{ 3, T.K.vartype.MINIMUM, 10, 10, "min", "Min", "us" }},
    }},
  }},
}}
'''

# Every TCP frame's wire length into one key, on one meter of each type that can be checked per bucket.
TCP_PLUGIN = f'''
TrisulPlugin = {{
  id = {{ name = "tcp frame meters" }},
  countergroup = {{
    control = {{ guid = "{TCP_GROUP}", name = "TCP frame meters", bucketsize = 60 }},
    meters = {{
      {{ 0, T.K.vartype.COUNTER, 10, 0, "packets", "Packets", "pkts" }},
      {{ 1, T.K.vartype.COUNTER, 10, 0, "bytes", "Bytes", "B" }},
      {{ 2, T.K.vartype.MAXIMUM, 10, 0, "max", "Largest frame", "B" }},
      {{ 3, T.K.vartype.MINIMUM, 10, 0, "min", "Smallest frame", "B" }},
      {{ 4, T.K.vartype.AVERAGE, 10, 0, "avg", "Mean frame", "B" }},
      {{ 5, T.K.vartype.GAUGE, 10, 0, "last", "Last frame", "B" }},
      {{ 6, T.K.vartype.RATE_COUNTER, 10, 0, "rate", "Bytes/s", "Bps" }},
    }},
  }},
  simplecounter = {{
    protocol_guid = "{G_TCP}",
    onpacket = function(engine, layer)
      local n = layer:total_bytes()
      engine:update_counter("{TCP_GROUP}", "all", 0, 1)
      for m = 1, 6 do engine:update_counter("{TCP_GROUP}", "all", m, n) end
    end,
  }},
}}
'''


def run(tmp_path, plugin: str, name: str, *flags: str) -> sqlite3.Connection:
    plugins = tmp_path / f"plugins-{name}"
    plugins.mkdir(exist_ok=True)
    (plugins / "meters.lua").write_text(plugin)
    out = tmp_path / name
    r = cli("run", str(plugins), "--pcap", PCAP, "--out", str(out), "-q", *flags)
    assert r.returncode == 0, r.stderr
    return sqlite3.connect(f"file:{out / 'luaprobe.sqlite'}?mode=ro", uri=True)


def stored(db, group) -> dict:
    return {(b, k, m): v for b, k, m, v in db.execute(
        "SELECT bucket_ts, key, meter, value FROM counters WHERE group_guid = ?", (group,))}


def tshark(*args: str) -> list[list[str]]:
    out = subprocess.run(["tshark", "-r", PCAP, *args], capture_output=True, text=True, check=True).stdout
    return [line.split("\t") for line in out.splitlines()]


def tcp_model(passes: int = 1) -> dict:
    """{(bucket, "all", meter): value} of every TCP frame's length into the six meters of TCP_GROUP, per 60 s bucket,
    from tshark's frames, the capture given ``passes`` times: COUNTER and RATE_COUNTER grow with the passes; MAXIMUM,
    MINIMUM, AVERAGE and GAUGE (the last frame by time: no tie asserted) are those of one pass."""
    frames = collections.defaultdict(list)
    for t, n in tshark("-Y", "tcp", "-T", "fields", "-e", "frame.time_epoch", "-e", "frame.len"):
        sec, frac = t.split(".")
        frames[int(sec) - int(sec) % 60].append((int(sec) * 10**6 + int(frac[:6]), int(n)))
    model = {}
    for b, fr in frames.items():
        assert len({us for us, _ in fr[-2:]}) == len(fr[-2:])    # no tie for the gauge's last sample
        lens = [n for _, n in fr]
        for m, v in enumerate((passes * len(lens), passes * sum(lens), max(lens), min(lens), sum(lens) / len(lens),
                               lens[-1], passes * sum(lens) / 60)):
            model[(b, "all", m)] = v
    return model


def summary(samples: list) -> dict:
    """The four URL meters of one bucket and key (T.K.vartype: COUNTER sum, AVERAGE mean, MAXIMUM, MINIMUM)."""
    return {0: len(samples), 1: sum(samples) / len(samples), 2: max(samples), 3: min(samples)}


@pytest.mark.parametrize("instances", ["2", "3"])
def test_backend_instances_merge_average_max_min_like_one(tmp_path, instances):
    """urlmon-style resource_monitor with several backend instances (each URL resource goes to one of them):
    every (bucket, key) holds the mean / max / min of all its samples, as with one instance, and as the
    Python model computes from the URL resources (the samples the plug-in was fed). Before the fix the
    parts were summed (the clear.gif bucket below stored 251361 for all three)."""
    db = run(tmp_path, URL_PLUGIN, f"i{instances}", "--backend-instances", instances)
    got = stored(db, URL_GROUP)
    samples = collections.defaultdict(list)
    for ts, uri, contents in db.execute("SELECT ts_sec, uri, contents FROM resources WHERE resource_guid = ?",
                                        (URL_RES,)):
        m, us = re.match(r"^(\S+) (\S+) ([^?\s]*)", uri), re.search(r"usec:(\d+)", contents)
        if m and us:
            samples[(ts - ts % 60, m.group(2) + m.group(3))].append(int(us.group(1)))
    model = {(b, k, m): v for (b, k), s in samples.items() for m, v in summary(s).items()}
    assert sum(len(s) > 1 for s in samples.values()) >= 10          # buckets with several samples (14)
    assert got == model
    assert got == stored(run(tmp_path, URL_PLUGIN, "i1", "--backend-instances", "1"), URL_GROUP)
    # tshark's http.time for the two responses of clear.gif in bucket 921070920 (0.110078 s and 0.141283 s)
    times = [round(float(t) * 1e6) for t, uri in tshark("-Y", "http.response", "-T", "fields", "-e", "http.time",
                                                         "-e", "http.response_for.uri")
             if uri.endswith("/e-business/casestudies/images/clear.gif")]
    key = "www.ibm.com/e-business/casestudies/images/clear.gif"
    assert {m: got[(921070920, key, m)] for m in range(4)} == summary(times) == \
        {0: 2, 1: 125680.5, 2: 141283, 3: 110078}


def test_shards_merge_every_meter_type_like_tshark(tmp_path):
    """--shards 1, 2, 3: every TCP frame's length into COUNTER, MAXIMUM, MINIMUM, AVERAGE, GAUGE and RATE_COUNTER
    meters of one key equals tshark's frames per 60 s bucket exactly (the mean from the sum and count of all
    shards, the gauge the last frame by time). Before the fix --shards 2 stored max 3028, min 120 in 921070920."""
    model = tcp_model()
    assert {m: model[(921070920, "all", m)] for m in (0, 2, 3)} == {0: 693, 2: 1514, 3: 60}
    for n in ("1", "2", "3"):
        assert stored(run(tmp_path, TCP_PLUGIN, f"s{n}", "--shards", n), TCP_GROUP) == model, n


# ------------------------------------------------------------------------------- the rules, part by part
GROUP = "{0E3C5A20-7D5B-4C7A-9E55-31B1D2A6C003}"
VTS = list(range(8))            # one meter per T.K.vartype, meter id = vartype


class Engines:
    """engine.lua Engine objects in one LuaJIT VM, all with the same group (meter m has vartype m, 60 s)."""

    def __init__(self):
        self.lua = new_runtime()
        self.lua.execute(f'''
            E = require "luaprobe.engine.plugins.engine"
            groups = {{ ["{GROUP}"] = {{ bucketsize = 60, vartypes = {{ [0] = 0, 1, 2, 3, 4, 5, 6, 7 }} }} }}
            function feed(e, sec, us, meter, value)
              e:set_time(sec, us); e:update_counter("{GROUP}", "k", meter, value)
            end
            function rows(e)
              local out = {{}}
              for i, r in ipairs(e:take_counters(nil)) do out[i] = r end
              return out
            end'''.encode())
        self.new = self.lua.eval("function() return E.new({ groups = groups, pipeline = 'backend' }) end")
        self.feed = self.lua.globals().feed
        self._rows = self.lua.globals().rows

    def rows(self, e) -> list[tuple]:
        return [tuple(x.decode() if isinstance(x, bytes) else x for x in r.values())
                for r in self._rows(e).values()]


def fed(engines, samples) -> list[tuple]:
    """One engine fed `samples` [(sec, usec, meter, value)] in time order: its closed rows."""
    e = engines.new()
    for s in sorted(samples):
        engines.feed(e, *s)
    return engines.rows(e)


samples_st = st.lists(st.tuples(st.integers(0, 119), st.integers(0, 999_999), st.sampled_from(VTS),
                                st.integers(0, 10**9), st.integers(0, 3)),
                      min_size=1, max_size=40, unique_by=lambda x: (x[0], x[1]))


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(samples=samples_st)
def test_parts_merge_like_one_vm(tmp_path_factory, samples):
    """Samples spread over up to 4 engine.lua VMs (a part each): merge_rows of the parts, and the parts written
    one write each to the store (as shards do), give every row one VM fed all samples gives, value for value.
    DELTA_RATE_COUNTER (fed a running total per VM, the sum of which is the whole running total) is compared in
    the second bucket, once every part has its baseline from the first."""
    lua = Engines()
    vals = [(sec, us, vt, v) for sec, us, vt, v, _ in samples if vt != 5]
    parts = collections.defaultdict(list)
    for sec, us, vt, v, part in samples:
        if vt != 5:
            parts[part].append((sec, us, vt, v))
    names = sorted(parts) or [0]
    # DELTA_RATE_COUNTER samples are running totals: each part feeds its own, one VM the whole (their sum), and
    # every part starts with a 0 in the first bucket. RUNNING_COUNTER: every part updates every bucket (adds 0).
    delta_whole, delta_parts = [], collections.defaultdict(list)
    for part in names:
        for sec in (0, 60):
            parts[part].append((sec, 1_000_000 + part, 3, 0))
            vals.append((sec, 1_000_000 + part, 3, 0))
        delta_parts[part].append((0, 1_000_000 + part, 5, 0))
        delta_whole.append((0, 1_000_000 + part, 5, 0))
    total, whole = collections.Counter(), 0
    for sec, us, vt, v, part in sorted(samples):
        if vt == 5:
            part = part if part in delta_parts else names[0]
            total[part] += v
            whole += v
            delta_parts[part].append((sec, us + 2_000_000, 5, total[part]))
            delta_whole.append((sec, us + 2_000_000, 5, whole))
    one = {r[:4]: r for r in fed(lua, vals + delta_whole)}
    part_rows = [r for p in sorted(set(parts) | set(delta_parts))
                 for r in fed(lua, parts.get(p, []) + delta_parts.get(p, []))]
    keep = {k for k in one if not (k[3] == 5 and k[1] == 0)}           # DELTA's first bucket: per-VM baselines
    merged = {r[:4]: r for r in meters.merge_rows(part_rows)}
    assert {k: merged[k][4] for k in keep} == {k: one[k][4] for k in keep}
    db = tmp_path_factory.mktemp("merge") / "t.sqlite"
    for p in sorted(set(parts) | set(delta_parts), reverse=True):     # one writer per part: the upsert merges
        with StoreWriter(str(db)) as w:
            w.write("counters", fed(lua, parts.get(p, []) + delta_parts.get(p, [])))
    with sqlite3.connect(db) as c:
        got = {(g, b, k, m): v for g, b, k, m, v in c.execute(
            "SELECT group_guid, bucket_ts, key, meter, value FROM counters")}
    assert {k: got[k] for k in keep} == {k: one[k][4] for k in keep}


def test_single_part_rows_unchanged_and_old_rows_merge_as_counters(tmp_path):
    """One part: merge_rows returns the row itself (the single-VM path writes what it wrote before). A row without
    merge state (an older database, --append) combines as one sample: AVERAGE (old 10 + new 20, 30) -> 20."""
    r = (GROUP, 0, "k", 4, 25.0, 4, 50, 2, 0)
    assert meters.merge_rows([r])[0] is r
    db = str(tmp_path / "t.sqlite")
    with StoreWriter(db) as w:
        w.write("counters", [(GROUP, 0, "k", 4, 10), (GROUP, 0, "k", 0, 5)])
    with StoreWriter(db) as w:
        w.write("counters", [(GROUP, 0, "k", 4, 25.0, 4, 50, 2, 0), (GROUP, 0, "k", 0, 7)])
    with sqlite3.connect(db) as c:
        assert dict(c.execute("SELECT meter, value FROM counters")) == {4: 20, 0: 12}


def test_sharded_append_counts_like_one_fast_path(tmp_path):
    """--append of the same capture into a database that already holds its buckets, with --shards 1 and --shards 2:
    both store tshark's frames per 60 s bucket counted twice (COUNTER and RATE_COUNTER doubled, MAXIMUM / MINIMUM /
    AVERAGE / GAUGE those of one pass: the same frames again), and the same flow rows; their summaries agree but for
    the documented rows_written["counters"] (docs/scale.md "The run summary": one fast path counts the rows it
    updated, a sharded run the rows added, none here)."""
    import json
    import shutil
    model = tcp_model(passes=2)
    run(tmp_path, TCP_PLUGIN, "base").close()
    summaries, flows = {}, {}
    for n in ("1", "2"):
        shutil.copytree(tmp_path / "base", tmp_path / f"a{n}")
        (tmp_path / f"a{n}" / "luaprobe.sqlite-shm").unlink(missing_ok=True)
        db = run(tmp_path, TCP_PLUGIN, f"a{n}", "--append", "--shards", n, "--stats-json", str(tmp_path / f"a{n}.json"))
        assert stored(db, TCP_GROUP) == model, n
        cols = [c for (_, c, *_rest) in db.execute("PRAGMA table_info(flows)") if c != "id"]   # ids: per run
        flows[n] = sorted(db.execute(f"SELECT {', '.join(cols)} FROM flows").fetchall(), key=repr)
        db.close()
        summaries[n] = json.loads((tmp_path / f"a{n}.json").read_text())
    assert flows["1"] == flows["2"] and len(flows["1"]) > 0
    one, two = summaries["1"], summaries["2"]
    for key in ("packets", "bytes", "flows", "drops", "input_errors", "plugin_problems"):
        assert one[key] == two[key], key
    assert one["rows_written"]["counters"] == len(model) and two["rows_written"]["counters"] == 0
    assert {k: v for k, v in one["rows_written"].items() if k != "counters"} == \
        {k: v for k, v in two["rows_written"].items() if k != "counters"}


RUN_GROUP = "{0E3C5A20-7D5B-4C7A-9E55-31B1D2A6C005}"
TUTORIAL = os.path.join(PCAPS, "trisul-tutorial.pcap")
# One RUNNING_COUNTER and one COUNTER fed 1 per TCP packet, in 1 s buckets: many seconds in which one shard's
# packets update the key and another's do not.
RUN_PLUGIN = f'''
TrisulPlugin = {{
  id = {{ name = "tcp running total" }},
  countergroup = {{
    control = {{ guid = "{RUN_GROUP}", name = "TCP running total", bucketsize = 1 }},
    meters = {{
      {{ 0, T.K.vartype.RUNNING_COUNTER, 10, 0, "total", "TCP packets so far", "pkts" }},
      {{ 1, T.K.vartype.COUNTER, 10, 0, "packets", "TCP packets", "pkts" }},
    }},
  }},
  simplecounter = {{
    protocol_guid = "{G_TCP}",
    onpacket = function(engine, layer)
      engine:update_counter("{RUN_GROUP}", "all", 0, 1)
      engine:update_counter("{RUN_GROUP}", "all", 1, 1)
    end,
  }},
}}
'''


def test_shards_write_running_totals_in_every_bucket(tmp_path):
    """--shards 1, 2, 3 over trisul-tutorial.pcap, a RUNNING_COUNTER per TCP packet in 1 s buckets: every second with
    a TCP frame (tshark) stores the running count of TCP frames up to its end, and the COUNTER that second's count.
    A VM writes its running total also in buckets it had no update in (engine.lua take_counters, open_running), so
    the shards' parts add up; a run may also store the total in a second with frames but none of TCP (docs/scale.md),
    never elsewhere, and 1, 2 and 3 shards store the same rows. Before the fix --shards 2 stored 67 (not 73) in
    1516788085 and 494 (not 1043) at the end: a shard without an update in a bucket wrote nothing there."""
    times = [t.split("\t") for t in subprocess.run(
        ["tshark", "-r", TUTORIAL, "-T", "fields", "-e", "frame.time_epoch", "-e", "tcp.srcport"],
        capture_output=True, text=True, check=True).stdout.splitlines()]
    per = collections.Counter(int(t.split(".")[0]) for t, port in times if port)
    seconds = {int(t.split(".")[0]) for t, _ in times}
    model, total = {}, 0
    for b in sorted(per):
        total += per[b]
        model[b] = total
    assert (model[1516788085], total) == (73, 1043)
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    (plugins / "running.lua").write_text(RUN_PLUGIN)
    runs = {}
    for n in ("1", "2", "3"):
        out = tmp_path / f"s{n}"
        r = cli("run", str(plugins), "--pcap", TUTORIAL, "--out", str(out), "-q", "--shards", n)
        assert r.returncode == 0, r.stderr
        with sqlite3.connect(f"file:{out / 'luaprobe.sqlite'}?mode=ro", uri=True) as db:
            got = stored(db, RUN_GROUP)
        running = {b: v for (b, k, m), v in got.items() if m == 0}
        assert {b: v for (b, k, m), v in got.items() if m == 1} == per, n
        assert {b: running.get(b) for b in model} == model, n
        extra = set(running) - set(model)
        assert extra <= seconds, n
        assert all(running[b] == max(v for s, v in model.items() if s <= b) for b in extra), n
        runs[n] = got
    assert runs["1"] == runs["2"] == runs["3"]


def _running_plugin(name: str, proto: str) -> str:
    """A simplecounter on `proto` adding 1 per packet to RUN_GROUP's key "all", meter 0 (RUNNING_COUNTER)."""
    return RUN_PLUGIN.replace("tcp running total", name).replace(G_TCP, proto).replace(
        '      engine:update_counter("' + RUN_GROUP + '", "all", 1, 1)\n', "")


def test_several_vms_write_running_totals_in_every_bucket(tmp_path):
    """Two plug-ins (a TCP and a UDP simplecounter, two VMs of one fast path) feed one RUNNING_COUNTER key in 1 s
    buckets over trisul-tutorial.pcap: every second with a TCP or UDP frame (tshark, ICMP errors' quoted headers not
    counted) stores the running count of those frames up to its end, the parts of the two VMs added.  Each VM
    writes its total also in a bucket it had no update in (engine.lua take_counters, open_running), so a
    second may also hold the total without an update (a second with frames), never a smaller one.  Before: the last
    second stored 51 (the UDP VM's total only; the TCP VM had no packet there), not 1094, and the totals went down
    from 1048 to 1037 after 1516788105."""
    rows = [t.split("\t") for t in subprocess.run(
        ["tshark", "-r", TUTORIAL, "-Y", "not icmp and not icmpv6", "-T", "fields", "-e", "frame.time_epoch",
         "-e", "tcp.srcport", "-e", "udp.srcport"], capture_output=True, text=True, check=True).stdout.splitlines()]
    per = collections.Counter(int(t[0].split(".")[0]) for t in rows if t[1] or t[2])
    seconds = {int(t.split("\t")[0].split(".")[0]) for t in subprocess.run(
        ["tshark", "-r", TUTORIAL, "-T", "fields", "-e", "frame.time_epoch"], capture_output=True, text=True,
        check=True).stdout.splitlines()}
    model, total = {}, 0
    for b in sorted(per):
        total += per[b]
        model[b] = total
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    (plugins / "tcp.lua").write_text(_running_plugin("tcp running total", G_TCP))
    (plugins / "udp.lua").write_text(_running_plugin("udp running total", G_UDP))
    out = tmp_path / "out"
    r = cli("run", str(plugins), "--pcap", TUTORIAL, "--out", str(out), "-q")
    assert r.returncode == 0, r.stderr
    with sqlite3.connect(f"file:{out / 'luaprobe.sqlite'}?mode=ro", uri=True) as db:
        running = {b: v for (b, k, m), v in stored(db, RUN_GROUP).items() if m == 0}
    assert total == 1094
    assert {b: running.get(b) for b in model} == model
    extra = set(running) - set(model)
    assert extra <= seconds
    assert all(running[b] == max(v for s, v in model.items() if s <= b) for b in extra)


GAUGE_GROUP = "{0E3C5A20-7D5B-4C7A-9E55-31B1D2A6C006}"
KEEPALIVE = os.path.join(PCAPS, "http-website-keepalive.pcap")
# An sg_monitor counting the flows it flushes and feeding each one's bytes (both directions) into a GAUGE.
GAUGE_PLUGIN = f'''
TrisulPlugin = {{
  id = {{ name = "flow gauge" }},
  countergroup = {{
    control = {{ guid = "{GAUGE_GROUP}", name = "flow gauge", bucketsize = 60 }},
    meters = {{
      {{ 0, T.K.vartype.COUNTER, 10, 0, "flows", "Flows", "flows" }},
      {{ 1, T.K.vartype.GAUGE, 10, 0, "bytes", "Bytes of a flow", "B" }},
    }},
  }},
  sg_monitor = {{
    onflush = function(engine, flow)
      engine:update_counter("{GAUGE_GROUP}", "all", 0, 1)
      engine:update_counter("{GAUGE_GROUP}", "all", 1, flow:az_bytes() + flow:za_bytes())
    end,
  }},
}}
'''


@pytest.mark.parametrize("flags", [("--backend-instances", "1"), ("--backend-instances", "2"),
                                   ("--backend-instances", "4"), ("--shards", "2")])
def test_gauge_samples_of_one_microsecond_keep_the_largest_in_every_vm(tmp_path, flags):
    """http-website-keepalive.pcap lasts 17 s, so every flow is flushed at the end of input, in one window, and each
    sg_monitor onflush sample of a GAUGE carries the same time to the µs. The store merges parts of one µs from several
    VMs by keeping the larger (docs/schema.md), so one VM must keep the larger of its own samples of one µs too, or
    the stored value depends on how the flows were spread over the instances: 1 / 2 / 4 backend instances and
    --shards 2 stored 416 / 5186 / 37187 / 5186 (each VM's last-flushed flow, the largest of those). Truth: tshark's
    13 TCP and UDP conversations (frames' lengths per tcp.stream / udp.stream), the largest 253909 bytes."""
    conv = collections.Counter()
    for line in subprocess.run(["tshark", "-r", KEEPALIVE, "-T", "fields", "-e", "tcp.stream", "-e", "udp.stream",
                                "-e", "frame.len"], capture_output=True, text=True, check=True).stdout.splitlines():
        t, u, n = line.split("\t")
        if t or u:
            conv[("tcp", t) if t else ("udp", u)] += int(n)
    assert (len(conv), max(conv.values())) == (13, 253909)
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    (plugins / "gauge.lua").write_text(GAUGE_PLUGIN)
    out = tmp_path / "out"
    r = cli("run", str(plugins), "--pcap", KEEPALIVE, "--out", str(out), "-q", *flags)
    assert r.returncode == 0, r.stderr
    with sqlite3.connect(f"file:{out / 'luaprobe.sqlite'}?mode=ro", uri=True) as db:
        got = {m: v for (b, k, m), v in stored(db, GAUGE_GROUP).items()}
    assert got == {0: len(conv), 1: max(conv.values())}
