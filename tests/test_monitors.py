"""Backend monitors (engine/plugins/monitors.py) with real-shaped plug-ins: each sees exactly the items the
analysers produce (counted independently with tshark), a flush filter returning false keeps an item
out of the store, and Alert/Resource setters reach the store."""
from __future__ import annotations

import collections
import json
import os
import sqlite3
import subprocess

import pytest

from luaprobe.engine.fastpath.run import FastPath, RunConfig
from tests.helpers import PCAPS


def pcap(name):
    return os.path.join(PCAPS, name)


def tshark_count(name, flt) -> int:
    out = subprocess.run(["tshark", "-r", pcap(name), "-n", "-Y", flt, "-T", "fields", "-e", "frame.number"],
                         capture_output=True, text=True, check=True).stdout
    return len(out.split())


def run(tmp_path, plugins: dict, files, **kw):
    d = tmp_path / "plugins"
    d.mkdir(exist_ok=True)
    for name, body in plugins.items():
        (d / name).write_text(body.replace("@OUT@", str(tmp_path)))
    out = str(tmp_path / "out")
    summary = FastPath(RunConfig(plugins=[str(d)], files=[pcap(f) for f in files], out_dir=out, **kw)).run()
    assert summary["plugin_problems"] == []
    for p in summary["plugins"]:
        assert p["hook_errors"] == {}, p
    return summary, sqlite3.connect(os.path.join(out, "luaprobe.sqlite"))


def lines(tmp_path, prefix):
    out = []
    for f in sorted(tmp_path.glob(prefix + "*")):
        out += f.read_text().splitlines()
    return out


RECORDER = """
local function rec(engine, what, s)
  local f = io.open("@OUT@/%s-" .. engine:instanceid(), "a"); f:write(what, "\\t", s, "\\n"); f:close()
end
"""

DNS_RES = RECORDER % "dns" + """
TrisulPlugin = { id = { name = "dyndns-shaped" },
  resource_monitor = {
    resource_guid = '{D1E27FF0-6D66-4E57-BB91-99F76BB2143E}',
    onnewresource = function(engine, resource)
      rec(engine, "new", resource:uri() .. "|" .. resource:label() .. "|" .. resource:flow():id())
    end,
    flushfilter = function(engine, resource)
      return not resource:label():find("216.197.242.244", 1, true)
    end,
    onflush = function(engine, resource)
      rec(engine, "flush", resource:label())
      resource:set_label(resource:label() .. " checked")
    end,
  },
}
"""

DNS_FTS = RECORDER % "fts" + """
TrisulPlugin = { id = { name = "cu-dns-extractor-shaped" },
  fts_monitor = {
    fts_guid = function() return T.ftsgroups['DNS'] end,
    onnewfts = function(engine, fts)
      local doc = fts:text()
      if doc:match("^RESPONSE") then
        local q = doc:match("Questions%s*%.([%.%w%-]*)%s*A%s*IN")
        local ips = {}
        for s in doc:gmatch("A%s*IN%s*([%d%.]+)") do ips[#ips + 1] = s end
        rec(engine, "response", (q or "?") .. "=" .. table.concat(ips, ","))
      else
        rec(engine, "query", fts:key())
      end
    end,
  },
}
"""


def test_resource_and_fts_monitors_see_every_dns_item(tmp_path):
    name = "dns-udp-a-aaaa-mx.pcap"
    summary, db = run(tmp_path, {"dns_res.lua": DNS_RES, "dns_fts.lua": DNS_FTS}, [name])
    nanswers = sum(int(x) for x in subprocess.run(
        ["tshark", "-r", pcap(name), "-n", "-Y", "dns.flags.response == 1", "-T", "fields", "-e",
         "dns.count.answers"], capture_output=True, text=True, check=True).stdout.split())
    new = [x for x in lines(tmp_path, "dns-") if x.startswith("new")]
    assert len(new) == nanswers == 18
    assert len({x.split("-")[-1] for x in map(str, tmp_path.glob("dns-*"))}) == 2     # both instances worked
    flushed = [x for x in lines(tmp_path, "dns-") if x.startswith("flush")]
    assert len(flushed) == nanswers - 1
    stored = [c for (c,) in db.execute("SELECT contents FROM resources")]
    assert len(stored) == nanswers - 1 and all(c.endswith(" checked") for c in stored)
    assert not any("216.197.242.244" in c for c in stored)
    fts = lines(tmp_path, "fts-")
    assert sum(x.startswith("response") for x in fts) == tshark_count(name, "dns.flags.response == 1")
    assert sum(x.startswith("query") for x in fts) == tshark_count(name, "dns.flags.response == 0")
    a = [x for x in fts if x.startswith("response\tgoogle.com=216.")][0]
    assert len(a.split("=")[1].split(",")) == 12
    assert db.execute("SELECT count(*) FROM fts").fetchone()[0] == tshark_count(name, "dns")
    assert summary["monitors"]["resources_filtered"] == 1


FLUSH_TIME = RECORDER % "win" + """
TrisulPlugin = { id = { name = "flush-time" },
  resource_monitor = {
    resource_guid = '{D1E27FF0-6D66-4E57-BB91-99F76BB2143E}',
    onflush = function(engine, resource) rec(engine, "flush", tostring((engine:timestamp()))) end,
  },
}
"""


@pytest.mark.parametrize("window", [2, 3, 60])
def test_monitor_items_flush_at_the_end_of_their_window_of_the_window_option(tmp_path, window):
    """monitors.py "Timing": onflush runs at the end of the item's backend window, `--window` seconds of packet
    time aligned on multiples of it (engine:timestamp() there is the window end), whatever the window is (the
    docstring said "60 s window").  Truth: tshark's times of the DNS responses, one resource per answer."""
    name = "dns-udp-a-aaaa-mx.pcap"
    run(tmp_path, {"win.lua": FLUSH_TIME}, [name], window=window)
    rows = subprocess.run(["tshark", "-r", pcap(name), "-n", "-Y", "dns.flags.response == 1", "-T", "fields",
                           "-e", "frame.time_epoch", "-e", "dns.count.answers"],
                          capture_output=True, text=True, check=True).stdout.split("\n")
    want = collections.Counter()
    for t, n in (r.split("\t") for r in rows if r):
        sec = int(float(t))
        want[sec - sec % window + window] += int(n)
    got = collections.Counter(int(x.split("\t")[1]) for x in lines(tmp_path, "win-") if x.startswith("flush"))
    assert got == want and sum(want.values()) == 18, (got, want)


URLMON = RECORDER % "url" + """
TrisulPlugin = { id = { name = "urlmon-shaped" },
  resource_monitor = {
    resource_guid = '{4EF9DEB9-4332-4867-A667-6A30C5900E9E}',
    onnewresource = function(engine, resource)
      local l, k, v = resource:uri():match("(%S+)%s(%S+)%s([^%?%s]+)")
      local usec = resource:label():match("usec:(%d+)")
      rec(engine, "url", l .. "/" .. k .. v .. " " .. (usec or "-"))
    end,
  },
}
"""

CERTS = RECORDER % "cert" + """
TrisulPlugin = { id = { name = "printcertchain-shaped" },
  resource_monitor = {
    resource_guid = function()
      for name, guid in pairs(T.resourcegroups) do if name:match("SSL") then return guid end end
    end,
    onnewresource = function(engine, r)
      local n = 0
      for cert in r:label():gmatch("%-*BEGIN CERTIFICATE.-END CERTIFICATE%-*") do n = n + 1 end
      rec(engine, "chain", n .. " " .. r:uri():match("SHA1:(%w+)"))
    end,
  },
}
"""

SSL_FTS = RECORDER % "sslfts" + """
TrisulPlugin = { id = { name = "detect_sha1-shaped" },
  fts_monitor = {
    fts_guid = '{9FEB8ADE-ADBB-49AD-BC68-C6A02F389C71}',
    onnewfts = function(engine, fts)
      local certchain = fts:text()
      for m, n, o in certchain:gmatch("NAME:([%S% ]+)\\n.-Issuer: ([%S% ]+)\\n.-Signature Algorithm: (%S+)") do
        rec(engine, "cert", o)
      end
      local _, _, ski = certchain:find("X509v3 Subject Key Identifier:%s*(%S+)")
      rec(engine, "ski", ski or "-")
      for uri in certchain:gmatch("OCSP %- URI:(%S+)") do rec(engine, "ocsp", uri) end
    end,
  },
}
"""


def test_url_cert_monitors(tmp_path):
    import hashlib
    summary, db = run(tmp_path, {"urlmon.lua": URLMON, "certs.lua": CERTS, "sslfts.lua": SSL_FTS},
                      ["mix-wikipedia-dns-http.pcap", "tls12-handshake.pcap"])
    urls = lines(tmp_path, "url-")
    assert len(urls) == tshark_count("mix-wikipedia-dns-http.pcap", "http.request") == 15
    assert all(u.split(" ")[-1].isdigit() for u in urls)
    chains = lines(tmp_path, "cert-")
    certs = subprocess.run(["tshark", "-r", pcap("tls12-handshake.pcap"), "-n", "-Y", "tls.handshake.certificate",
                            "-T", "fields", "-E", "occurrence=a", "-E", "aggregator=,", "-e",
                            "tls.handshake.certificate"], capture_output=True, text=True, check=True).stdout.split()
    chain = [bytes.fromhex(c.replace(":", "")) for c in certs[0].split(",")]
    assert chains == [f"chain\t{len(chain)} {hashlib.sha1(chain[0]).hexdigest().upper()}"]
    fts = lines(tmp_path, "sslfts-")
    assert [x for x in fts if x.startswith("cert")] == ["cert\tsha1WithRSAEncryption"] * len(chain)
    assert any(x.startswith("ocsp\thttp://ocsp.comodoca.com") for x in fts)
    assert [x for x in fts if x.startswith("ski")] != ["ski\t-"]


ALERTS = """
TrisulPlugin = { id = { name = "alert-source" },
  simplecounter = {
    protocol_guid = "{14D7AB53-CC51-47e9-8814-9C06AAE60189}",
    onpacket = function(engine, layer)
      local sport = layer:packet():find_layer("{14D7AB53-CC51-47e9-8814-9C06AAE60189}"):getbyte(1)
      engine:add_alert("{B5F1DECB-51D5-4395-B71B-6FA730B772D9}", layer:packet():flowid(),
                       sport == 53 and "DNSRESP" or "DNSQ", 3, "udp packet")
    end,
  },
}
"""

ALERTMON = RECORDER % "alert" + """
TrisulPlugin = { id = { name = "alert_filter-shaped" },
  alert_monitor = {
    alert_guid = '{B5F1DECB-51D5-4395-B71B-6FA730B772D9}',
    onnewalert = function(engine, alert)
      rec(engine, "new", alert:sigid() .. " " .. alert:priority() .. " " .. alert:flow():id())
      if alert:sigid() == "DNSRESP" then alert:set_priority(1); alert:set_message("answer seen") end
    end,
    flushfilter = function(engine, alert) return alert:sigid() ~= "DNSQ" end,
    onflush = function(engine, alert) rec(engine, "flush", alert:message()) end,
  },
}
"""


def test_alert_monitor_filters_and_rewrites(tmp_path):
    name = "dns-udp-a-aaaa-mx.pcap"
    summary, db = run(tmp_path, {"src.lua": ALERTS, "mon.lua": ALERTMON}, [name])
    new = [x for x in lines(tmp_path, "alert-") if x.startswith("new")]
    assert len(new) == tshark_count(name, "udp")
    rows = db.execute("SELECT sigid, priority, message FROM alerts").fetchall()
    assert collections.Counter(rows) == {("DNSRESP", 1, "answer seen"): tshark_count(name, "udp.srcport == 53")}


CGMON = RECORDER % "cg" + """
TrisulPlugin = { id = { name = "cgmon-shaped" },
  cg_monitor = {
    counter_guid = "{4CD742B1-C1CA-4708-BE78-0FCA2EB01A86}",
    onflushfilter = function(engine, ts, key, metrics) return key ~= "C0.A8.01.01" end,
    onflush = function(engine, ts, key, metrics)
      rec(engine, "flush", ts .. " " .. key .. " " .. metrics[1] .. " " .. metrics[4] .. " " .. T.monitor_group_name)
    end,
    onnewkey = function(engine, ts, key) rec(engine, "newkey", key) end,
    onbegintopperflush = function(engine, ts, meter) return meter == 0 end,
    ontopperflush = function(engine, key, metric) rec(engine, "top", key .. " " .. metric) end,
  },
}
"""


def test_cg_monitor_hosts_trisul16(tmp_path):
    summary, db = run(tmp_path, {"cg.lua": CGMON}, ["trisul-16minutes.pcap"])
    flush = [x.split("\t")[1].split(" ") for x in lines(tmp_path, "cg-") if x.startswith("flush")]
    got = {(int(ts) - 60, k): (int(b), int(p)) for ts, k, b, p, _ in flush if k != "SYS:GROUP_TOTALS"}
    stored = collections.defaultdict(dict)
    for b, k, m, v in db.execute("SELECT bucket_ts, key, meter, value FROM counters WHERE group_guid = ?",
                                 ("{4CD742B1-C1CA-4708-BE78-0FCA2EB01A86}",)):
        stored[(b, k)][m] = v
    assert got == {bk: (v[0], v[3]) for bk, v in stored.items()}       # metrics[1] = meter 0
    assert all(x[4] == "Hosts" for x in flush)
    assert not any(k == "C0.A8.01.01" for _, k in stored) and summary["monitors"]["counter_keys_filtered"] > 0
    newkeys = [x for x in lines(tmp_path, "cg-") if x.startswith("newkey")]
    endpoints = subprocess.run(["tshark", "-r", pcap("trisul-16minutes.pcap"), "-n", "-q", "-z", "endpoints,ip"],
                               capture_output=True, text=True, check=True).stdout
    nhosts = sum(1 for ln in endpoints.splitlines() if ln.split() and ln.split()[0].count(".") == 3)
    assert len(newkeys) == len(set(newkeys)) == nhosts
    totals = [x for x in flush if x[1] == "SYS:GROUP_TOTALS"]
    assert totals and json.dumps(totals[0][4]) == '"Hosts"'
    assert any(x.startswith("top") for x in lines(tmp_path, "cg-"))


# Trisul's flushfilter rule (a script without the filter hook casts no vote), with the shapes of
# trisul-scripts' alerts/alert_filter.lua (drops ALIENVAULT in the Blacklist group) and print_alerts.lua
# (onnewalert only) watching the same group, and a cg_monitor pair the same way.
GEN = """
TrisulPlugin = { id = { name = "gen" },
  simplecounter = { protocol_guid = "{77E462AB-2E42-42ec-9A58-C1A6821D6B31}",
    onpacket = function(engine, layer)
      if layer:testbit(110) and not layer:testbit(107) then              -- SYN without ACK
        T.n = (T.n or 0) + 1
        local sig = (T.n % 2 == 0) and "ALIENVAULT" or "OTHER"
        engine:add_alert_full("{5E97C3A3-41DB-4E34-92C3-87C904FAB83E}", layer:flowkey(), sig, "cls", 2, "bl " .. T.n)
        engine:add_alert_full("{9AFD8C08-07EB-47E0-BF05-28B4A7AE8DC9}", layer:flowkey(), "IDS-" .. T.n, "cls", 1,
                              "ids " .. T.n, "ALARM")
      end
    end } }
"""
ALERT_FILTER = """
TrisulPlugin = { id = { name = "alert_filter-shaped" },
  alert_monitor = { alert_guid = '{5E97C3A3-41DB-4E34-92C3-87C904FAB83E}',
    flushfilter = function(engine, alert) return alert:sigid() ~= "ALIENVAULT" end } }
"""
PRINTER = """
TrisulPlugin = { id = { name = "print_alerts-shaped" },
  alert_monitor = { alert_guid = %s, onnewalert = function(engine, alert) T.seen = (T.seen or 0) + 1 end } }
"""
CG_DROP = """
TrisulPlugin = { id = { name = "cg drop" },
  cg_monitor = { counter_guid = "{4CD742B1-C1CA-4708-BE78-0FCA2EB01A86}",
    onflushfilter = function(engine, ts, key, metrics) return key ~= "C0.A8.01.01" end } }
"""
CG_WATCH = """
TrisulPlugin = { id = { name = "cg watch" },
  cg_monitor = { counter_guid = "{4CD742B1-C1CA-4708-BE78-0FCA2EB01A86}",
    onflush = function(engine, ts, key, metrics) T.n = (T.n or 0) + 1 end } }
"""


def test_monitor_without_flushfilter_casts_no_vote(tmp_path):
    """An item is stored unless every attached script's flushfilter returns false; a script without the hook does
    not vote.  alert_filter-shaped + print_alerts-shaped on the Blacklist group: the ALIENVAULT alerts (every
    second SYN without ACK, counted by tshark) stay out, the OTHER ones are stored; the External IDS group
    watched only by a printer (no vote at all) keeps all its alerts; a cg_monitor without onflushfilter does not
    keep the Hosts key the other one drops.  Before: the printer counted as 'keep' and every alert was stored."""
    name = "trisul-tutorial.pcap"
    syns = tshark_count(name, "tcp.flags.syn == 1 and tcp.flags.ack == 0")
    summary, db = run(tmp_path, {"gen.lua": GEN, "alert_filter.lua": ALERT_FILTER,
                                 "print_alerts.lua": PRINTER % "'{5E97C3A3-41DB-4e34-92C3-87C904FAB83E}'",
                                 "print_ids.lua": PRINTER % "'{9AFD8C08-07EB-47E0-BF05-28B4A7AE8DC9}'"}, [name])
    rows = collections.Counter(db.execute("SELECT alert_guid, sigid FROM alerts").fetchall())
    bl = {s: n for (g, s), n in rows.items() if g == "{5E97C3A3-41DB-4E34-92C3-87C904FAB83E}"}
    ids = sum(n for (g, _), n in rows.items() if g == "{9AFD8C08-07EB-47E0-BF05-28B4A7AE8DC9}")
    assert syns >= 10
    assert bl == {"OTHER": syns - syns // 2}
    assert ids == syns
    assert summary["monitors"]["alerts_filtered"] == syns // 2


def test_cg_monitor_without_onflushfilter_casts_no_vote(tmp_path):
    """cg_monitor: onflushfilter drops key C0.A8.01.01 of Hosts in one script; a second script on the same group
    with only onflush does not keep it (before: its missing filter voted 'keep').  Every other key is stored."""
    summary, db = run(tmp_path, {"drop.lua": CG_DROP, "watch.lua": CG_WATCH}, ["trisul-16minutes.pcap"])
    keys = {k for (k,) in db.execute("SELECT DISTINCT key FROM counters WHERE group_guid = ?",
                                     ("{4CD742B1-C1CA-4708-BE78-0FCA2EB01A86}",))}
    endpoints = subprocess.run(["tshark", "-r", pcap("trisul-16minutes.pcap"), "-n", "-q", "-z", "endpoints,ip"],
                               capture_output=True, text=True, check=True).stdout
    hosts = {".".join(f"{int(x):02X}" for x in ln.split()[0].split(".")) for ln in endpoints.splitlines()
             if ln.split() and ln.split()[0].count(".") == 3}
    assert "C0.A8.01.01" in hosts
    assert keys == hosts - {"C0.A8.01.01"}


CG_COUNT = r'''
local G = "{7A11E5C0-0000-4000-8000-0000000000C6}"
TrisulPlugin = { id = { name = "count" },
  countergroup = { control = { guid = G, name = "Override test", description = "d", bucketsize = 60 },
    meters = { { 0, T.K.vartype.COUNTER, 10, 0, "packets", "p", "p" }, { 1, T.K.vartype.COUNTER, 10, 0, "bytes", "b", "B" } } },
  simplecounter = { protocol_guid = "{974FB098-DE46-45db-94DA-8D64A3BBCDE5}",
    onpacket = function(engine, layer)
      for _, k in ipairs({ "times10", "nan", "text", "long" }) do
        engine:update_counter(G, k, 0, 1)
        engine:update_counter_bytes(G, k, 1)
      end
    end } }
'''

CG_OVERRIDE = r'''
TrisulPlugin = { id = { name = "override" },
  cg_monitor = { counter_guid = "{7A11E5C0-0000-4000-8000-0000000000C6}",
    onflushfilter = function(engine, ts, key, metrics)
      if key == "times10" then return true, { metrics[2] * 10, -1 } end     -- meter 0 := 10 x bytes, meter 1 kept
      if key == "nan" then return true, { 0/0, -1 } end                    -- not >= 0: both kept
      if key == "long" then                                                -- 20 entries: the row's 2 meters only
        local ov = { -1, 3 } for i = 3, 20 do ov[i] = 9 end
        return true, ov
      end
      return true, { "x", 5 }                                              -- meter 0 kept, meter 1 := 5
    end,
    onflush = function(engine, ts, key, metrics) print(("FLUSH %s %s %s"):format(key, metrics[1], metrics[2])) end } }
'''


def test_cg_monitor_onflushfilter_overrides_reach_the_stored_row(tmp_path):
    """Trisul's cg_monitor onflushfilter returns `bool[, overrides]`, `overrides[i]` (>= 0) replacing meter i-1 of the
    row (docs/plugins.md).  Found by a hostile pass (2026-12-02): the overrides never reached the row, because
    Host:call (engine/plugins/host.lua) returned only the hook's first result; once they did, a list longer than
    the row stored meters the group does not have (20 entries: meters 0..19).  Truth: tshark's frame count and
    frame.len sum of the capture (one 60 s bucket), with the overrides applied by hand."""
    name = "http-get-text.pcap"
    out = subprocess.run(["tshark", "-r", pcap(name), "-T", "fields", "-e", "frame.len", "-e", "frame.time_epoch"],
                         capture_output=True, text=True, check=True).stdout.split("\n")
    rows = [ln.split("\t") for ln in out if ln]
    frames, nbytes = len(rows), sum(int(r[0]) for r in rows)
    buckets = {int(float(r[1])) // 60 * 60 for r in rows}
    assert len(buckets) == 1 and frames == 14
    summary, db = run(tmp_path, {"count.lua": CG_COUNT, "override.lua": CG_OVERRIDE}, [name])
    got = sorted(db.execute("SELECT bucket_ts, key, meter, value FROM counters WHERE group_guid = ?",
                            ("{7A11E5C0-0000-4000-8000-0000000000C6}",)).fetchall())
    (b,) = buckets
    assert got == [(b, "long", 0, frames), (b, "long", 1, 3), (b, "nan", 0, frames), (b, "nan", 1, nbytes),
                   (b, "text", 0, frames), (b, "text", 1, 5), (b, "times10", 0, 10 * nbytes), (b, "times10", 1, nbytes)
                   ], got


CG_30 = r'''
TrisulPlugin = { id = { name = "thirty" },
  countergroup = { control = { guid = "{7A11E5C0-0000-4000-8000-0000000000D7}", name = "Thirty", bucketsize = 30 },
    meters = { { 0, T.K.vartype.COUNTER, 10, 0, "packets", "p", "p" } } },
  simplecounter = { protocol_guid = "{974FB098-DE46-45db-94DA-8D64A3BBCDE5}",
    onpacket = function(engine, layer) engine:update_counter("{7A11E5C0-0000-4000-8000-0000000000D7}", "all", 0, 1) end } }
'''

CG_30_WATCH = r'''
TrisulPlugin = { id = { name = "watch" },
  cg_monitor = { counter_guid = "{7A11E5C0-0000-4000-8000-0000000000D7}",
    onflush = function(engine, ts, key, metrics)
      if key == "all" then
        local f = io.open("@OUT@/flush-" .. engine:instanceid(), "a")
        f:write(("%d %d %d\n"):format(ts, engine:timestamp(), metrics[1])); f:close()
      end
    end } }
'''


def test_cg_monitor_ts_is_the_end_of_the_groups_own_bucket(tmp_path):
    """cg_monitor hooks get `ts`, the bucket's end (docs/plugins.md).  Found by a hostile pass (2026-12-02): ts was the
    bucket start + 60 for every group, so a group of 30 s buckets (tls-version-count's tlsversions.lua declares one)
    got the next bucket's end.  Truth: tshark's frame times bucketed by 30 s, each bucket's frame count."""
    name = "trisul-tutorial.pcap"
    times = subprocess.run(["tshark", "-r", pcap(name), "-T", "fields", "-e", "frame.time_epoch"],
                           capture_output=True, text=True, check=True).stdout.split()
    per_bucket = collections.Counter(int(float(t)) // 30 * 30 for t in times)
    assert len(per_bucket) >= 2
    run(tmp_path, {"thirty.lua": CG_30, "watch.lua": CG_30_WATCH}, [name])
    got = sorted(tuple(int(x) for x in ln.split()) for ln in lines(tmp_path, "flush-"))
    assert got == [(b + 30, b + 30, n) for b, n in sorted(per_bucket.items())], got


CG_60 = CG_30.replace("0000000000D7", "0000000000D8").replace('"Thirty", bucketsize = 30', '"Sixty", bucketsize = 60')

CG_BRACKETS = r'''
local function log(s) local f = io.open("@OUT@/brackets-" .. engine_id, "a"); f:write(s, "\n"); f:close() end
TrisulPlugin = { id = { name = "brackets" },
  onload = function() engine_id = "x" end,
  cg_monitor = { counter_guid = "{7A11E5C0-0000-4000-8000-0000000000D8}",
    onbeginflush = function(engine, ts) log("begin " .. ts) end,
    onflush = function(engine, ts, key, metrics) if key == "all" then log(("flush %d %d"):format(ts, metrics[1])) end end,
    onendflush = function(engine) log("end") end } }
'''

SG_NOTHING = r'''
TrisulPlugin = { id = { name = "sg" }, sg_monitor = { onflush = function(engine, flow) end } }
'''


def test_cg_monitor_flushes_a_window_s_buckets_before_its_onendflush(tmp_path):
    """docs/plugins.md "Timing": a window's items are flushed at its end, before onendflush.  Found with
    trisul-scripts' cgmon.lua (2026-12-02): cg_monitor's onflush for the bucket of window W ran after the onbeginflush
    of window W+1 (the bucket closed at the next tick), so the first onbeginflush/onendflush pair was empty and every
    bucket came one window late, but in time when an sg_monitor was loaded too (its onendflush collects by the
    window's end), and the last bucket after the last onendflush (without it).  Now the same with or without it:
    the bucket [W, W+60) inside W's pair, `ts` W+60, the last one too.  Truth: tshark's frame count per minute."""
    name = "trisul-16minutes.pcap"
    times = subprocess.run(["tshark", "-r", pcap(name), "-T", "fields", "-e", "frame.time_epoch"],
                           capture_output=True, text=True, check=True).stdout.split()
    per_minute = sorted(collections.Counter(int(float(t)) // 60 * 60 for t in times).items())
    assert len(per_minute) >= 10 and all(b2 == b1 + 60 for (b1, _), (b2, _) in zip(per_minute, per_minute[1:]))
    want = []
    for b, n in per_minute[:-1]:
        want += [f"begin {b}", f"flush {b + 60} {n}", "end"]
    last_b, last_n = per_minute[-1]
    want += [f"begin {last_b}", f"flush {last_b + 60} {last_n}", "end"]
    for k, extra in enumerate(({}, {"sg.lua": SG_NOTHING})):
        d = tmp_path / f"run{k}"
        d.mkdir()
        run(d, {"sixty.lua": CG_60, "brackets.lua": CG_BRACKETS, **extra}, [name], backend_instances=1)
        got = lines(d, "brackets-")
        assert got == want, (k, [x for x in zip(got, want) if x[0] != x[1]][:3], len(got), len(want))
