"""End to end: real capture files, real processes (capture, workers, SQLite writer), the real database.

Most runs call ``FastPath(RunConfig(...)).run()`` in-process (it returns the summary dict); a few go
through ``python -m luaprobe.engine.daemon.cli`` for exit codes and messages.  Every expected number comes from
tshark/capinfos (Wireshark 4.0.17) and is pinned here with the command that produced it, so the tests
never need tshark at run time.  ``$P`` below is tests/helpers.PCAPS (tests/data).

Protocol filters: the decoder does not look inside ICMP error payloads, so "TCP packets" means
``tcp and not icmp and not icmpv6`` (tshark would otherwise count the TCP/UDP header an ICMP error
quotes).
"""
from __future__ import annotations

import json
import logging
import os
import re
import sqlite3
import subprocess
import sys

import pytest

from luaprobe.engine.fastpath.run import FastPath, RunConfig
from luaprobe.engine.store.writer import Store
from tests import helpers

PCAPS = helpers.PCAPS
EXAMPLES = os.path.join(helpers.REPO, "engine", "examples")
SAMPLE = os.path.join(EXAMPLES, "sample.pcap")

# Trisul GUIDs (docs/reference.md "Protocol GUIDs") and test-local groups
G_ETH = "{974FB098-DE46-45db-94DA-8D64A3BBCDE5}"
G_IPV4 = "{0A2C724B-5B9F-4ba6-9C97-B05080558574}"
G_IPV6 = "{85C0CCED-DA8D-4029-924A-A6AB87F62EF8}"
G_UDP = "{14D7AB53-CC51-47e9-8814-9C06AAE60189}"
G_TCP = "{77E462AB-2E42-42ec-9A58-C1A6821D6B31}"
PROTO_GUIDS = {"eth": G_ETH, "ipv4": G_IPV4, "ipv6": G_IPV6, "tcp": G_TCP, "udp": G_UDP}
PROTO_GROUP = "{AAAAAAAA-0000-4000-8000-000000000001}"   # key = protocol, meter 0 packets, 1 bytes
PORT_GROUP = "{AAAAAAAA-0000-4000-8000-000000000002}"    # key = TCP destination port (decimal)
TEST_GROUP = "{AAAAAAAA-0000-4000-8000-000000000003}"    # anything else a test counts
TCP_PORTS_GROUP = "{2B3C4D5E-6F70-4A1B-9C2D-3E4F5A6B7C8D}"  # engine/examples/tcp_ports.lua
USER_ALERTS = "{B5F1DECB-51D5-4395-B71B-6FA730B772D9}"
DNS_RESOURCES = "{D1E27FF0-6D66-4E57-BB91-99F76BB2143E}"


# ============================================================================ helpers

def run(tmp_path, plugins, files, name="out", **kw) -> tuple[dict, str]:
    """FastPath in-process; returns (summary, out_dir)."""
    out = str(tmp_path / name)
    files = [f if os.path.isabs(f) else os.path.join(PCAPS, f) for f in files]
    summary = FastPath(RunConfig(plugins=[str(p) for p in plugins], files=files, out_dir=out, **kw)).run()
    return summary, out


def cli(*args, timeout=60) -> subprocess.CompletedProcess:
    """``python -m luaprobe.engine.daemon.cli ARGS`` in the repo; output captured as text."""
    return subprocess.run([sys.executable, "-m", "luaprobe.engine.daemon.cli", *args], cwd=helpers.REPO, capture_output=True,
                          text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def db(out_dir) -> sqlite3.Connection:
    return sqlite3.connect(f"file:{os.path.join(out_dir, 'luaprobe.sqlite')}?mode=ro", uri=True)


def counter_sums(out_dir, group) -> dict:
    """{key: {meter: total over all buckets}} of one group."""
    res: dict = {}
    with db(out_dir) as c:
        for key, meter, total in c.execute("SELECT key, meter, sum(value) FROM counters WHERE group_guid = ? "
                                           "GROUP BY key, meter", (group.upper(),)):
            res.setdefault(key, {})[meter] = total
    return res


def plugin_entries(summary, filename) -> list[dict]:
    return [p for p in summary["plugins"] if os.path.basename(p["plugin"]) == filename]


def lua_str(s: str) -> str:
    """A Lua string literal for a Python string (paths in generated plug-ins)."""
    return json.dumps(s)


def write_counting_plugins(d) -> None:
    """One simplecounter per protocol: packets (meter 0) and bytes (meter 1) under key = protocol name;
    the TCP one also counts packets per destination port."""
    d.mkdir(exist_ok=True)
    for name, guid in PROTO_GUIDS.items():
        extra = ""
        if name == "tcp":
            extra = (f'\n      engine:update_counter("{PORT_GROUP}", '
                     'tostring(layer:getbyte(2) * 256 + layer:getbyte(3)), 0, 1)')
        (d / f"count_{name}.lua").write_text(f'''
TrisulPlugin = {{
  id = {{ name = "count {name}" }},
  simplecounter = {{
    protocol_guid = "{guid}",
    onpacket = function(engine, layer)
      engine:update_counter("{PROTO_GROUP}", "{name}", 0, 1)
      engine:update_counter_bytes("{PROTO_GROUP}", "{name}", 1){extra}
    end,
  }},
}}
''')


def write_monitor_plugin(d, outdir) -> None:
    """An engine_monitor that records every hook call and writes em-<instance>.txt in onunload."""
    d.mkdir(exist_ok=True)
    (d / "monitor.lua").write_text(f'''
local lines = {{}}
TrisulPlugin = {{
  id = {{ name = "monitor" }},
  onunload = function()
    local f = assert(io.open({lua_str(str(outdir))} .. "/em-" .. T.monitor_instance .. ".txt", "w"))
    f:write(table.concat(lines, "\\n"), "\\n")
    f:close()
  end,
  engine_monitor = {{
    onbeginflush = function(engine, ts)
      T.monitor_instance = engine:instanceid()
      lines[#lines + 1] = ("begin %d"):format(ts)
    end,
    onendflush = function(engine, ts) lines[#lines + 1] = ("end %d"):format(ts) end,
    onmetronome = function(engine, ts, tick_count, tick_interval)
      lines[#lines + 1] = ("metro %d %d %d"):format(ts, tick_count, tick_interval)
    end,
  }},
}}
''')


def read_monitor(outdir, instance) -> dict:
    with open(os.path.join(outdir, f"em-{instance}.txt")) as f:
        rows = [ln.split() for ln in f.read().split("\n") if ln]
    return {"begin": [int(r[1]) for r in rows if r[0] == "begin"],
            "end": [int(r[1]) for r in rows if r[0] == "end"],
            "metro": [tuple(int(x) for x in r[1:]) for r in rows if r[0] == "metro"]}


def luaprobe_records(caplog, needle: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "luaprobe" and needle in r.getMessage()]


# ============================================================================ pinned tshark values

# Per capture: packets = `capinfos -M -c $P/F`; bytes = sum of frame.len:
#   tshark -r $P/F -T fields -e frame.len | awk '{n++; s+=$1} END {print n, s}'
# Per protocol (packets, bytes), the same awk over
#   tshark -r $P/F -Y FILTER -T fields -e frame.len
# with FILTER eth | ip | ipv6 | "tcp and not icmp and not icmpv6" | "udp and not icmp and not icmpv6";
# ip_packets = FILTER "ip or ipv6" (the packets that belong to a flow).
RECON = {
    "trisul-16minutes.pcap": dict(packets=7000, bytes=1819784, eth=(7000, 1819784), ipv4=(5539, 1733246),
                                  ipv6=(0, 0), tcp=(5312, 1710962), udp=(225, 22156), ip=(5539, 1733246)),
    "http-qinq-vlan.pcap": dict(packets=14, bytes=6199, eth=(14, 6199), ipv4=(14, 6199), ipv6=(0, 0),
                                tcp=(14, 6199), udp=(0, 0), ip=(14, 6199)),
    "ipv6-icmp6.pcap": dict(packets=49, bytes=4548, eth=(49, 4548), ipv4=(0, 0), ipv6=(49, 4548), tcp=(0, 0),
                            udp=(0, 0), ip=(49, 4548)),
    "sll2-linux.pcap": dict(packets=6, bytes=552, eth=(0, 0), ipv4=(2, 208), ipv6=(2, 248), tcp=(0, 0),
                            udp=(0, 0), ip=(4, 456)),
    "pcapng-multi-if-dns.pcapng": dict(packets=6, bytes=798, eth=(6, 798), ipv4=(6, 798), ipv6=(0, 0),
                                       tcp=(0, 0), udp=(6, 798), ip=(6, 798)),
    "vlan-mpls-mixed.pcap": dict(packets=47, bytes=16403, eth=(47, 16403), ipv4=(47, 16403), ipv6=(0, 0),
                                 tcp=(47, 16403), udp=(0, 0), ip=(47, 16403)),
    "mix-eth-tls-http-dns.pcap": dict(packets=132, bytes=164607, eth=(132, 164607), ipv4=(129, 164386),
                                      ipv6=(1, 119), tcp=(118, 163290), udp=(12, 1215), ip=(130, 164505)),
}

# tshark -r $P/trisul-16minutes.pcap -Y 'tcp and not icmp' -T fields -e tcp.dstport | sort -n | uniq -c
#   | awk '{printf "%s:%s ", $2, $1}'          (port:packets, 287 ports, 5312 packets)
TRISUL16_TCP_DSTPORTS = """
20:23 21:46 23:4 25:257 79:24 80:1502 113:5 139:627 1024:11 1025:12 1026:26 1027:26 1028:6 1034:12
1038:12 1049:12 1051:5 1052:26 1054:13 1056:3 1057:3 1058:4 1059:4 1060:4 1061:4 1062:4 1063:5
1078:4 1079:4 1080:4 1081:7 1083:617 1104:18 1106:27 1107:9 1108:10 1109:13 1111:11 1112:4 1113:18
1115:5 1169:11 1172:47 1173:6 1174:6 1193:6 1197:6 1198:6 1199:5 1200:8 1201:12 1202:5 1203:6
1204:6 1205:6 1206:5 1207:9 1211:5 1215:5 1216:22 1217:5 1218:5 1219:4 1220:7 1221:4 1223:14 1224:6
1226:5 1230:19 1231:5 1233:9 1234:5 1235:5 1236:5 1237:5 1238:5 1239:6 1240:6 1241:9 1242:7 1244:14
1245:9 1246:6 1247:5 1248:5 1249:5 1250:5 1251:5 1252:5 1253:5 1254:5 1255:5 1256:5 1257:5 1258:5
1259:5 1260:5 1261:5 1262:5 1263:5 1264:5 1265:5 1266:5 1267:5 1268:5 1269:5 1270:5 1271:5 1272:5
1273:5 1274:5 1275:5 1276:5 1277:5 1278:5 1280:7 1281:26 1282:4 1283:4 1284:5 1285:6 1288:25 1289:5
1290:5 1291:5 1292:6 1293:5 1294:5 1295:5 1296:6 1297:5 1298:6 1299:6 1300:6 1301:8 1302:5 1303:6
1304:5 1305:13 1306:13 1307:11 1308:5 1309:11 1310:5 1311:5 1312:4 1313:4 1488:6 1559:11 1620:30
1622:6 1623:6 1624:5 1685:6 1686:6 1687:5 1749:4 1750:6 1751:8 1814:6 1876:4 1877:6 1878:14 1941:4
2005:5 2058:8 2059:14 2060:15 2061:8 2063:5 2064:7 2065:5 2066:5 2067:5 2068:45 2072:6 2073:11
2074:8 2075:4 2076:5 2077:5 2112:9 2113:8 2115:11 2116:8 2120:8 2122:10 2123:13 2124:7 2125:7
2127:5 2128:12 2129:9 2130:4 2131:6 2132:12 2136:12 2137:5 2138:29 2139:6 2140:8 2141:6 2177:4
2178:8 2181:5 2185:6 2186:5 2187:5 2188:5 2189:7 2190:6 2254:12 2317:5 2319:50 2320:5 2321:6 2322:4
2323:6 2330:5 2331:4 2370:6 2371:5 2378:5 2441:5 2504:4 2505:6 2574:5 2575:5 2576:5 2588:16 2589:4
2590:6 2591:8 2592:4 2594:4 2604:5 2605:6 2606:25 2607:5 2608:8 2610:5 2611:4 2612:8 2613:4 2614:4
2672:4 2674:5 2675:24 2676:4 2677:8 2678:5 2737:7 2738:5 2739:4 2740:4 2741:8 2801:19 2802:6 2803:8
2804:4 2807:8 2810:6 2873:5 2874:19 2937:6 2938:7 3000:5 3047:5 3048:4 3049:5 3050:7 3051:5 3052:14
3053:6 3054:6 3055:5 3056:5 3057:11 3136:12 3138:13 3139:5 3140:26 4713:5 6667:13 16444:2 32776:6
32777:12
"""

# TCP packets and bytes per 60 s bucket of trisul-16minutes.pcap:
# tshark -r $P/trisul-16minutes.pcap -Y 'tcp and not icmp' -T fields -e frame.time_epoch -e frame.len
#   | awk '{b=int($1/60)*60; n[b]++; s[b]+=$2} END {for (k in n) print k, n[k], s[k]}' | sort -n
TRISUL16_TCP_PER_MINUTE = {
    921070860: (152, 32074), 921070920: (693, 176968), 921070980: (327, 93233), 921071040: (23, 2480),
    921071100: (27, 3889), 921071160: (41, 13573), 921071220: (116, 29577), 921071280: (462, 190824),
    921071340: (26, 3507), 921071400: (72, 7433), 921071460: (689, 329324), 921071520: (24, 2435),
    921071580: (276, 101012), 921071640: (550, 239775), 921071700: (401, 140226), 921071760: (23, 2646),
    921071820: (1313, 294853), 921071880: (97, 47133),
}
# capinfos -a -e -S $P/trisul-16minutes.pcap: first 921070803.035902, last 921071924.579522.
# The packets fall in 1069 distinct seconds of the 1122 from first to last (53 seconds have no packet),
# and in all 19 minutes from 921070800 to 921071880:
#   tshark -r $P/trisul-16minutes.pcap -T fields -e frame.time_epoch | awk '{print int($1)}' | uniq | wc -l
TRISUL16_FIRST, TRISUL16_LAST, TRISUL16_SECONDS_WITH_PACKETS = 921070803, 921071924, 1069
# capinfos -a -e -S $P/http-range-pdf-206.pcap: 1294814876.674038 .. 1294814917.071630; every second in
# between has packets (42 distinct seconds, same command as above); 672 packets, all TCP:
#   tshark -r $P/http-range-pdf-206.pcap -Y tcp -T fields -e frame.len | awk ... -> 672 620334
RANGE206_FIRST, RANGE206_LAST, RANGE206_TCP = 1294814876, 1294814917, 672


@pytest.fixture(scope="module")
def trisul16(tmp_path_factory):
    """One run over trisul-16minutes.pcap with the counting plug-ins and an engine_monitor (2 instances)."""
    tmp = tmp_path_factory.mktemp("trisul16")
    write_counting_plugins(tmp / "plugins")
    write_monitor_plugin(tmp / "plugins", tmp / "out")
    summary, out = run(tmp, [tmp / "plugins"], ["trisul-16minutes.pcap"], backend_instances=2)
    return summary, out


# ============================================================================ 1. bundled demo

def test_demo_cli_and_outputs(tmp_path):
    out = str(tmp_path / "demo")
    stats = str(tmp_path / "stats.json")
    r = cli("demo", "--out", out, "--stats-json", stats)
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr
    assert re.search(r"^packets 136 ", r.stdout, re.M), r.stdout
    with open(stats) as f:
        summary = json.load(f)
    # capinfos -M -c engine/examples/sample.pcap -> 136
    assert summary["packets"] == 136
    assert summary["input_errors"] == [] and summary["plugin_problems"] == []

    # tshark -r engine/examples/sample.pcap -Y tcp -T fields -e frame.len | awk '{n++; s+=$1} END {print n, s}'
    #   -> 78 19079
    # tshark -r engine/examples/sample.pcap -Y tcp -T fields -e tcp.dstport | sort -n | uniq -c
    sums = counter_sums(out, TCP_PORTS_GROUP)
    assert sum(m[0] for m in sums.values()) == 78
    assert sum(m[1] for m in sums.values()) == 19079
    assert {k: m[0] for k, m in sums.items()} == {
        "80": 46, "6705": 1, "35634": 1, "35642": 3, "48649": 3, "49996": 4, "49997": 4, "49998": 4,
        "49999": 4, "50000": 4, "50001": 4}

    # DNS queries: tshark -r engine/examples/sample.pcap -Y 'udp.dstport==53 and not dns.flags.response==1'
    #   -T fields -e dns.qry.name  -> 14 queries: 8 upload.wikimedia.org, 4 upload.wikimedia.org.ncsa.uiuc.edu,
    #   2 meta.wikimedia.org; blocklist.txt lists upload.wikimedia.org and bits.wikimedia.org.
    with Store(out) as s:
        res = s.resources(guid=DNS_RESOURCES)
        alerts = s.alerts()
        groups = s.counter_groups()
    assert len(res) == 14
    names = sorted(r["uri"] for r in res)
    assert names == sorted(["upload.wikimedia.org"] * 8 + ["upload.wikimedia.org.ncsa.uiuc.edu"] * 4
                           + ["meta.wikimedia.org"] * 2)
    for r in res:
        assert r["contents"] == ("listed" if r["uri"] == "upload.wikimedia.org" else "clean"), r
        assert r["flowkey"].startswith("11A:") and r["flowkey"].endswith(":p-0035"), r
        assert r["plugin"] == "dns_watch.lua"
    assert len(alerts) == 8
    for a in alerts:
        assert a["alert_guid"] == USER_ALERTS and a["sigid"] == "DNS-BLOCKLIST" and a["priority"] == 2
        assert a["message"] == "query for listed name upload.wikimedia.org"
    assert {a["flowkey"] for a in alerts} == {r["flowkey"] for r in res if r["uri"] == "upload.wikimedia.org"}
    dns = plugin_entries(summary, "dns_watch.lua")[0]["async"]
    helpers.assert_accounting(dns)
    assert dns["scheduled"] == dns["ok"] == 14 and dns["pending"] == 0
    assert [g["name"] for g in groups] == ["TCP ports"]

    q = cli("query", "alerts", "--out", out, "--json")
    assert q.returncode == 0, q.stderr
    rows = [json.loads(line) for line in q.stdout.splitlines() if line.strip()]
    assert len(rows) == 8
    assert all(r["sigid"] == "DNS-BLOCKLIST" for r in rows)


# ============================================================================ 2. reconciliation with tshark

@pytest.mark.parametrize("pcap", sorted(RECON))
def test_protocol_counters_reconcile_with_tshark(tmp_path, pcap, trisul16):
    exp = RECON[pcap]
    if pcap == "trisul-16minutes.pcap":
        summary, out = trisul16
    else:
        write_counting_plugins(tmp_path / "plugins")
        summary, out = run(tmp_path, [tmp_path / "plugins"], [pcap])
    assert summary["input_errors"] == [] and summary["plugin_problems"] == []
    assert summary["packets"] == exp["packets"]
    assert summary["bytes"] == exp["bytes"]
    sums = counter_sums(out, PROTO_GROUP)
    for proto in PROTO_GUIDS:
        got = sums.get(proto, {})
        assert (got.get(0, 0), got.get(1, 0)) == exp[proto], (proto, got)
        calls = plugin_entries(summary, f"count_{proto}.lua")[0]["hook_calls"]
        assert calls.get("simplecounter.onpacket", 0) == exp[proto][0]
    # flows: one row per flow created; every IP packet is in exactly one flow
    assert summary["packets"] - summary["non_ip"] == exp["ip"][0]
    with db(out) as c:
        nrows, pkts, nbytes = c.execute("SELECT count(*), coalesce(sum(packets_az + packets_za), 0), "
                                        "coalesce(sum(bytes_az + bytes_za), 0) FROM flows").fetchone()
        stats = json.loads(c.execute("SELECT value FROM run WHERE key = 'packets'").fetchone()[0])
    assert nrows == summary["flows"] == summary["rows_written"]["flows"]
    assert (pkts, nbytes) == exp["ip"]
    assert stats == summary["packets"]


def test_tcp_dstport_histogram_matches_tshark(trisul16):
    summary, out = trisul16
    expected = {p: int(n) for p, n in (x.split(":") for x in TRISUL16_TCP_DSTPORTS.split())}
    assert len(expected) == 287 and sum(expected.values()) == 5312
    got = {k: m[0] for k, m in counter_sums(out, PORT_GROUP).items()}
    assert got == expected


def test_flow_rows_match_tshark_conversations(tmp_path):
    """Per-flow directions and counts on vlan-mpls-mixed.pcap (plain, MPLS and VLAN-tagged TCP).

    tshark -r $P/vlan-mpls-mixed.pcap -T fields -e ip.src -e tcp.srcport -e ip.dst -e tcp.dstport -e frame.len
      | awk '{k=$1":"$2">"$3":"$4; n[k]++; s[k]+=$5} END {for (k in n) print k, n[k], s[k]}'
    10.0.0.15:80>10.20.80.1:50343 7 4081          10.20.80.1:50343>10.0.0.15:80 7 661
    10.1.2.1:11001>10.34.0.1:23 11 678            (no reverse direction)
    125.190.109.199:80>141.42.64.125:56730 10 10085   141.42.64.125:56730>125.190.109.199:80 12 898
    A end = higher port (the client), so az = client->server.
    """
    write_counting_plugins(tmp_path / "plugins")
    summary, out = run(tmp_path, [tmp_path / "plugins"], ["vlan-mpls-mixed.pcap"])
    with db(out) as c:
        rows = {r[0]: r[1:] for r in c.execute(
            "SELECT flowkey, proto, packets_az, packets_za, bytes_az, bytes_za FROM flows")}
    assert rows == {
        "06A:0A.14.50.01:p-C4A7_0A.00.00.0F:p-0050": (6, 7, 7, 661, 4081),
        "06A:0A.01.02.01:p-2AF9_0A.22.00.01:p-0017": (6, 11, 0, 678, 0),
        "06A:8D.2A.40.7D:p-DD9A_7D.BE.6D.C7:p-0050": (6, 12, 10, 898, 10085),
    }
    assert summary["flows"] == 3


def test_flow_rows_follow_schema(tmp_path):
    write_counting_plugins(tmp_path / "plugins")
    summary, out = run(tmp_path, [tmp_path / "plugins"], ["vlan-mpls-mixed.pcap"])
    with db(out) as c:
        rows = c.execute("SELECT flowkey, porta, portz, state, tags FROM flows").fetchall()
    assert len(rows) == 3
    for flowkey, porta, portz, state, tags in rows:
        assert isinstance(porta, int) and isinstance(portz, int), (flowkey, porta, portz)
        assert "p-%04X" % porta in flowkey and "p-%04X" % portz in flowkey
        assert state in ("CLOSED", "RESET", "TIMEOUT", "OPEN"), state
        assert tags in ("", None), tags


# ============================================================================ 3. bucketing

def test_counters_land_in_their_60s_buckets(trisul16):
    summary, out = trisul16
    with db(out) as c:
        rows = c.execute("SELECT bucket_ts, meter, value FROM counters WHERE group_guid = ? AND key = 'tcp'",
                         (PROTO_GROUP,)).fetchall()
        all_buckets = {b for (b,) in c.execute("SELECT DISTINCT bucket_ts FROM counters")}
    got: dict = {}
    for b, meter, v in rows:
        got.setdefault(b, [0, 0])[meter] = v
    assert {b: tuple(v) for b, v in got.items()} == TRISUL16_TCP_PER_MINUTE
    assert all(b % 60 == 0 for b in all_buckets)
    # every minute from the first packet's to the last packet's holds packets (Ethernet counts all)
    assert all_buckets == set(range(TRISUL16_FIRST // 60 * 60, TRISUL16_LAST // 60 * 60 + 1, 60))


# ============================================================================ 4. engine_monitor

def test_engine_monitor_windows_and_metronome_both_instances(tmp_path):
    """http-range-pdf-206.pcap: 41 s of packet time without a silent second, crossing one minute edge."""
    write_monitor_plugin(tmp_path / "plugins", tmp_path / "out")
    summary, out = run(tmp_path, [tmp_path / "plugins"], ["http-range-pdf-206.pcap"], backend_instances=2)
    assert summary["packets"] == RANGE206_TCP
    first_w = RANGE206_FIRST - RANGE206_FIRST % 60
    windows = list(range(first_w, RANGE206_LAST - RANGE206_LAST % 60 + 1, 60))
    assert len(windows) == 2
    ticks = RANGE206_LAST - RANGE206_FIRST
    insts = sorted(p["instance"] for p in plugin_entries(summary, "monitor.lua"))
    assert insts == ["0", "1"]
    for inst in ("0", "1"):
        m = read_monitor(out, inst)
        assert m["begin"] == windows
        assert m["end"] == [w + 60 for w in windows]
        assert m["metro"] == [(RANGE206_FIRST + k, k, 1) for k in range(1, ticks + 1)]
        calls = [p for p in plugin_entries(summary, "monitor.lua") if p["instance"] == inst][0]["hook_calls"]
        assert calls["engine_monitor.onbeginflush"] == calls["engine_monitor.onendflush"] == 2
        assert calls["engine_monitor.onmetronome"] == ticks


def test_engine_monitor_windows_trisul16(trisul16):
    summary, out = trisul16
    windows = list(range(TRISUL16_FIRST // 60 * 60, TRISUL16_LAST // 60 * 60 + 1, 60))
    assert len(windows) == 19
    for inst in ("0", "1"):
        m = read_monitor(out, inst)
        assert m["begin"] == windows
        assert m["end"] == [w + 60 for w in windows]
        # at least one tick per second that has packets, tick_count counting up from 1
        assert len(m["metro"]) >= TRISUL16_SECONDS_WITH_PACKETS - 1
        assert [t[1] for t in m["metro"]] == list(range(1, len(m["metro"]) + 1))


def test_engine_monitor_metronome_every_second_across_gaps(trisul16):
    summary, out = trisul16
    ticks = TRISUL16_LAST - TRISUL16_FIRST
    for inst in ("0", "1"):
        m = read_monitor(out, inst)
        assert m["metro"] == [(TRISUL16_FIRST + k, k, 1) for k in range(1, ticks + 1)]


# ============================================================================ 5. error isolation

ERROR_PLUGINS = {
    "a_syntax.lua": """TrisulPlugin = {
  id = { name = "syntax" },
  simplecounter = {
    protocol_guid = "{77E462AB-2E42-42ec-9A58-C1A6821D6B31}",
    onpacket = function(engine, layer)
      local x = = 1
    end,
  },
}
""",
    "b_good.lua": f"""TrisulPlugin = {{
  id = {{ name = "good" }},
  simplecounter = {{
    protocol_guid = "{G_TCP}",
    onpacket = function(engine, layer) engine:update_counter("{TEST_GROUP}", "good", 0, 1) end,
  }},
}}
""",
    "c_every10.lua": f"""local n = 0
TrisulPlugin = {{
  id = {{ name = "every10" }},
  simplecounter = {{
    protocol_guid = "{G_TCP}",
    onpacket = function(engine, layer)
      n = n + 1
      if n % 10 == 0 then error("boom at call " .. n) end
      engine:update_counter("{TEST_GROUP}", "every10", 0, 1)
    end,
  }},
}}
""",
    "d_disabled.lua": f"""TrisulPlugin = {{
  id = {{ name = "disabled" }},
  onload = function() return false end,
  onunload = function() io.open(OUTDIR .. "/disabled-unloaded", "w"):close() end,
  simplecounter = {{
    protocol_guid = "{G_TCP}",
    onpacket = function(engine, layer) engine:update_counter("{TEST_GROUP}", "disabled", 0, 1) end,
  }},
}}
""",
    "e_unload.lua": f"""local calls = 0
TrisulPlugin = {{
  id = {{ name = "unload" }},
  onunload = function()
    local f = io.open(OUTDIR .. "/unloaded.txt", "w"); f:write(tostring(calls)); f:close()
  end,
  simplecounter = {{
    protocol_guid = "{G_UDP}",
    onpacket = function(engine, layer) calls = calls + 1 end,
  }},
}}
""",
    "f_badguid.lua": f"""TrisulPlugin = {{
  id = {{ name = "badguid" }},
  simplecounter = {{
    protocol_guid = "{G_UDP}",
    onpacket = function(engine, layer)
      engine:update_counter(12345, "k", 0, 1)
    end,
  }},
}}
""",
    "g_unimpl.lua": f"""TrisulPlugin = {{
  id = {{ name = "unimpl" }},
  simplecounter = {{
    protocol_guid = "{G_UDP}",
    onpacket = function(engine, layer)
      engine:set_key_attribute("{G_UDP}", "a", "name", "value")
    end,
  }},
}}
""",
    "h_typo.lua": f"""TrisulPlugin = {{
  id = {{ name = "typo" }},
  simplecounter = {{
    protocol_guid = "{G_UDP}",
    onpacket = function(engine, layer)
      engine:add_alrt("{G_UDP}", nil, "k", 1, "m")
    end,
  }},
}}
""",
}


def test_error_isolation(tmp_path, caplog, trisul16):
    caplog.set_level(logging.INFO, logger="luaprobe")
    d = tmp_path / "plugins"
    d.mkdir()
    for name, body in ERROR_PLUGINS.items():
        (d / name).write_text(f"OUTDIR = {lua_str(str(tmp_path))}\n" + body)
    summary, out = run(tmp_path, [d], ["trisul-16minutes.pcap"])
    tcp, udp = RECON["trisul-16minutes.pcap"]["tcp"][0], RECON["trisul-16minutes.pcap"]["udp"][0]

    # the syntax error names file:line (line 7: the OUTDIR line is prepended) and that plug-in does not run
    syntax = [p for p in summary["plugin_problems"] if "a_syntax.lua" in p]
    assert len(syntax) == 1 and re.search(r"a_syntax\.lua:7:", syntax[0]), summary["plugin_problems"]
    assert not plugin_entries(summary, "a_syntax.lua")
    # the others ran
    assert plugin_entries(summary, "b_good.lua")[0]["hook_calls"]["simplecounter.onpacket"] == tcp
    sums = counter_sums(out, TEST_GROUP)
    assert sums["good"][0] == tcp

    # every 10th call raises: counted exactly, the other calls still did their work
    ev = plugin_entries(summary, "c_every10.lua")[0]
    assert ev["hook_calls"]["simplecounter.onpacket"] == tcp
    assert ev["hook_errors"] == {"simplecounter.onpacket": tcp // 10}
    assert sums["every10"][0] == tcp - tcp // 10
    # logged once per source line, one line naming the plug-in's file:line (the traceback only at debug level);
    # later ones only as rate-limited counts
    boom = luaprobe_records(caplog, "boom at call")
    assert not [m for m in boom if "stack traceback" in m], boom
    full = [m for m in boom if " more at " not in m]
    assert len(full) == 1 and "c_every10.lua:9:" in full[0] and "boom at call 10" in full[0], boom
    assert "\n" not in full[0], boom

    # onload returning false disables the instance: no hooks, no output, no onunload
    assert not plugin_entries(summary, "d_disabled.lua")
    assert "disabled" not in sums
    assert not os.path.exists(tmp_path / "disabled-unloaded")

    # onunload runs at the end, after every packet
    with open(tmp_path / "unloaded.txt") as f:
        assert f.read() == str(udp)

    # a non-string GUID is a clear error at the script's line
    bg = plugin_entries(summary, "f_badguid.lua")[0]
    assert bg["hook_errors"]["simplecounter.onpacket"] == bg["hook_calls"]["simplecounter.onpacket"] == udp
    msgs = luaprobe_records(caplog, "GUID must be a string")
    assert any("f_badguid.lua:7: GUID must be a string (got number)" in m for m in msgs), msgs

    # an unimplemented engine method says so
    un = plugin_entries(summary, "g_unimpl.lua")[0]
    assert un["hook_errors"]["simplecounter.onpacket"] == udp
    msgs = luaprobe_records(caplog, "does not implement yet")
    assert any("g_unimpl.lua:7: engine:set_key_attribute() is a Trisul engine method that luaprobe does not implement yet"
               in m for m in msgs), msgs
    # a misspelled one says so, with the closest method
    assert plugin_entries(summary, "h_typo.lua")[0]["hook_errors"]["simplecounter.onpacket"] == udp
    msgs = luaprobe_records(caplog, "is not a method of the engine object")
    assert any("h_typo.lua:7: engine:add_alrt() is not a method of the engine object (did you mean "
               "engine:add_alert?)" in m for m in msgs), msgs

    # the packet path itself was unaffected
    assert summary["packets"] == trisul16[0]["packets"] == 7000
    assert summary["input_errors"] == []


# ============================================================================ 6. bad input (CLI)

# Packets read before the corruption: `tshark -r $P/F | wc -l` and its error message; offsets: 24-byte
# file header + sum(16 + caplen) of the good records (tshark -T fields -e frame.cap_len).
BAD = {
    # 24 + 6*16 + 4915 = 5035; tshark: "File has 4325376-byte packet, bigger than maximum of 262144";
    # frame.protocols of the 6 records: eth:ethertype:ip:tcp[:tls], frame.len 74 74 66 361 66 4274
    "bad-huge-caplen-record.pcap": dict(rc=3, packets=6, bytes=4915, offset=5035,
                                        protos={"eth": 6, "ipv4": 6, "tcp": 6}),
    # Record 1 (188 bytes) ends at byte 228, where the next 16-byte header claims caplen 0x53FE6000
    # ("caplen 1409179648 exceeds the maximum"). tshark/capinfos read 2 records because wiretap's format
    # heuristics pick a pcap variant with 24-byte record headers for this file (its record 2 header starts
    # at byte 236: caplen 1, len 1048576); as the standard pcap its magic declares, only 1 record is good.
    # Record 1 read that way: Ethernet, an IPv4 header (proto 6, total length 174), then a "TCP" header
    # with data offset 0, which the decoder rejects (MANIFEST: "a bogus IPv4 header").
    "bad-fuzz-record-header.pcap": dict(rc=3, packets=1, bytes=188, offset=228,
                                        protos={"eth": 1, "ipv4": 1}),
    # not corrupt for the reader: out-of-range nanoseconds are normalised; tshark reads 3 records,
    # sll:ethertype:ip:tcp, frame.len 76 76 68
    "bad-invalid-nanosec-ts.pcap": dict(rc=0, packets=3, bytes=220, offset=None, protos={"ipv4": 3, "tcp": 3}),
    # one record with caplen 8 < 14 (frame.len 78): counted, decoded as truncated, no layer
    "bad-snaplen8-trunc.pcap": dict(rc=0, packets=1, bytes=78, offset=None, protos={}),
    "bad-empty-header-only.pcap": dict(rc=0, packets=0, bytes=0, offset=None, protos={}),
}


def test_bad_inputs_cover_the_corpus():
    assert sorted(f for f in os.listdir(PCAPS) if f.startswith("bad-")) == sorted(BAD)


@pytest.mark.parametrize("pcap", sorted(BAD))
def test_bad_input_cli(tmp_path, pcap):
    exp = BAD[pcap]
    write_counting_plugins(tmp_path / "plugins")
    path = os.path.join(PCAPS, pcap)
    stats = tmp_path / "stats.json"
    r = cli("run", str(tmp_path / "plugins"), "--pcap", path, "--out", str(tmp_path / "out"),
            "--stats-json", str(stats))
    assert r.returncode == exp["rc"], (r.stdout, r.stderr)
    assert "Traceback" not in r.stderr
    summary = json.loads(stats.read_text())
    assert (summary["packets"], summary["bytes"]) == (exp["packets"], exp["bytes"])
    # the packets before the corruption were decoded and counted
    sums = counter_sums(str(tmp_path / "out"), PROTO_GROUP)
    assert {k: m[0] for k, m in sums.items()} == exp["protos"]
    if exp["offset"] is None:
        assert summary["input_errors"] == [] and "input error" not in r.stderr
        assert summary["files_done"] == [path]
    else:
        assert f"input error: {path}: byte offset {exp['offset']}: " in r.stderr, r.stderr
        assert len(summary["input_errors"]) == 1 and summary["files_done"] == []
    if pcap == "bad-snaplen8-trunc.pcap":
        assert summary["truncated_headers"] == 1 and summary["non_ip"] == 1


@pytest.mark.parametrize("kind", ["missing", "directory"])
def test_unreadable_pcap_argument(tmp_path, kind):
    write_counting_plugins(tmp_path / "plugins")
    path = str(tmp_path / "nope.pcap") if kind == "missing" else str(tmp_path / "plugins")
    r = cli("run", str(tmp_path / "plugins"), "--pcap", path, "--out", str(tmp_path / "out"))
    assert r.returncode == 3, (r.stdout, r.stderr)
    want = "no such file" if kind == "missing" else "is a directory, not a capture file"
    assert r.stderr == f"luaprobe run: --pcap {path}: {want}\n"      # one line, before anything started
    assert not (tmp_path / "out").exists()


def test_corrupt_file_between_good_ones(tmp_path):
    """http-get-text (14) + bad-huge-caplen-record (6, then corrupt) + vlan-mpls-mixed (47) = 67 packets."""
    write_counting_plugins(tmp_path / "plugins")
    files = [os.path.join(PCAPS, f) for f in ("http-get-text.pcap", "bad-huge-caplen-record.pcap",
                                              "vlan-mpls-mixed.pcap")]
    stats = tmp_path / "stats.json"
    r = cli("run", str(tmp_path / "plugins"), "--pcap", *files, "--out", str(tmp_path / "out"),
            "--stats-json", str(stats))
    assert r.returncode == 3, r.stderr
    assert "Traceback" not in r.stderr
    assert f"{files[1]}: byte offset 5035" in r.stderr
    summary = json.loads(stats.read_text())
    assert summary["packets"] == 14 + 6 + 47
    assert summary["files_done"] == [files[0], files[2]]
    # tshark: all 67 packets are Ethernet/IPv4/TCP
    sums = counter_sums(str(tmp_path / "out"), PROTO_GROUP)
    assert sums["tcp"][0] == sums["eth"][0] == 67


# ============================================================================ 7. luaprobe check

def test_check_directory(tmp_path):
    d = tmp_path / "plugins"
    d.mkdir()
    (d / "good.lua").write_text(ERROR_PLUGINS["b_good.lua"])
    (d / "broken.lua").write_text(ERROR_PLUGINS["a_syntax.lua"])
    (d / "helper.lua").write_text("local M = {}\nfunction M.f() return 1 end\nreturn M\n")
    r = cli("check", str(d))
    assert r.returncode == 4, (r.stdout, r.stderr)
    assert "Traceback" not in r.stderr
    assert str(d / "good.lua") in r.stdout
    assert re.search(r"types: simplecounter\b", r.stdout), r.stdout
    assert re.fullmatch(r"luaprobe check: \S*broken\.lua:6: [^\n]*\n", r.stderr), r.stderr   # the error alone
    assert "broken.lua" not in r.stdout
    assert "helper.lua" not in r.stdout
    # without the broken one: exit 0
    (d / "broken.lua").unlink()
    r = cli("check", str(d))
    assert r.returncode == 0, (r.stdout, r.stderr)
    assert "problem" not in r.stdout


# ============================================================================ 8. T.async from a simplecounter

def test_async_from_simplecounter(tmp_path):
    results = tmp_path / "results.txt"
    (tmp_path / "plugins").mkdir()
    (tmp_path / "plugins" / "asyncer.lua").write_text(f"""
local RESULTS = {lua_str(str(results))}
local n = 0
TrisulPlugin = {{
  id = {{ name = "asyncer" }},
  request_async_workers = 2,
  simplecounter = {{
    protocol_guid = "{G_TCP}",
    onpacket = function(engine, layer)
      n = n + 1
      T.async:schedule {{
        data = tostring(n) .. "|" .. layer:flowkey(),
        onexecute = function(data)
          local k = tonumber(data:match("^(%d+)"))
          if k % 7 == 0 then return nil end
          if k % 11 == 0 then error("no " .. k) end
          return "r" .. k
        end,
        onresult = function(engine, data, result)
          local f = assert(io.open(RESULTS, "a"))
          f:write(data, " ", result, "\\n")
          f:close()
          engine:update_counter("{TEST_GROUP}", "results", 0, 1)
        end,
      }}
    end,
  }},
}}
""")
    summary, out = run(tmp_path, [tmp_path / "plugins"], ["http-range-pdf-206.pcap"])
    n = RANGE206_TCP
    a = plugin_entries(summary, "asyncer.lua")[0]["async"]
    helpers.assert_accounting(a)
    nil = n // 7
    err = n // 11 - n // 77
    assert a["scheduled"] == n
    assert (a["ok"], a["nil_result"], a["error"], a["timeout"], a["dropped"], a["pending"]) == \
        (n - nil - err, nil, err, 0, 0, 0)
    lines = results.read_text().splitlines()
    assert len(lines) == n - nil - err
    got = {}
    for line in lines:
        data, result = line.split(" ")
        k, flowkey = data.split("|")
        assert result == "r" + k
        assert flowkey.startswith("06A:")
        got[int(k)] = flowkey
    assert set(got) == {k for k in range(1, n + 1) if k % 7 and k % 11}
    assert counter_sums(out, TEST_GROUP)["results"][0] == n - nil - err


# ============================================================================ 9. messages

SUB_GUID = "{0F1E2D3C-4B5A-4978-8695-A4B3C2D1E0F9}"


def test_messages(tmp_path):
    d = tmp_path / "plugins"
    d.mkdir()
    record = """
  onmessage = function(msgid, msg) got[#got + 1] = msgid .. "=" .. msg end,
  onunload = function()
    local f = assert(io.open(OUTDIR .. "/msg-" .. NAME .. "-" .. (T.inst or "x") .. ".txt", "w"))
    f:write(table.concat(got, "\\n")); f:close()
  end,
"""
    head = f"OUTDIR = {lua_str(str(tmp_path))}\nlocal got = {{}}\n"
    # the sender: posts on the first TCP packet, to subscribers (lower-case GUID) and to everyone
    (d / "sender.lua").write_text(head + f"""NAME = "sender"
local sent = false
TrisulPlugin = {{
  id = {{ name = "sender" }},{record}
  simplecounter = {{
    protocol_guid = "{G_TCP}",
    onpacket = function(engine, layer)
      if sent then return end
      sent = true
      engine:post_message_frontend("{SUB_GUID.lower()}", "to-subscribers")
      engine:post_message_frontend("to-all")
      engine:post_message_backend("to-backend")
    end,
  }},
}}
""")
    # subscribed (GUID spelled in another case), a frontend file with only id/onload/onmessage
    (d / "subscriber.lua").write_text(head + f"""NAME = "subscriber"
TrisulPlugin = {{
  id = {{ name = "subscriber" }},
  message_subscriptions = {{ "{SUB_GUID.upper()}" }},{record}
}}
""")
    (d / "other.lua").write_text(head + f"""NAME = "other"
TrisulPlugin = {{
  id = {{ name = "other" }},
  message_subscriptions = {{ "{{11111111-2222-4333-8444-555555555555}}" }},{record}
}}
""")
    (d / "backend.lua").write_text(head + f"""NAME = "backend"
TrisulPlugin = {{
  id = {{ name = "backend" }},{record}
  engine_monitor = {{ onbeginflush = function(engine, ts) T.inst = engine:instanceid() end }},
}}
""")
    summary, out = run(tmp_path, [d], ["http-get-text.pcap"], backend_instances=2)
    assert summary["plugin_problems"] == []

    def got(name, inst="x"):
        return (tmp_path / f"msg-{name}-{inst}.txt").read_text().split("\n")

    assert sorted(got("subscriber")) == sorted([f"{SUB_GUID.upper()}=to-subscribers", "=to-all"])
    assert got("other") == ["=to-all"]
    assert got("sender") == ["=to-all"]          # the sender's own instance gets broadcasts too
    for inst in ("0", "1"):
        assert got("backend", inst) == ["=to-backend"]
    for name in ("subscriber", "other", "sender"):
        assert plugin_entries(summary, f"{name}.lua")[0]["hook_calls"]["onmessage"] == len(got(name))


def test_message_delivery_between_batches(tmp_path):
    """post_message_frontend reaches every frontend instance between batches (docs/plugins.md "Messages"), not
    when packet time reaches a new second: with --batch 1, a message the sender's onpacket posts at its TCP
    packet k reaches its own onmessage and another simplecounter's before either hook sees packet k + 1.  The
    posting packets are chosen by tshark so that packet k + 1 is in the same second (before: delivered at the
    first packet of the next second, k + 1 or later)."""
    pcap = os.path.join(PCAPS, "trisul-16minutes.pcap")
    secs = [int(float(x)) for x in subprocess.run(["tshark", "-r", pcap, "-Y", "tcp", "-T", "fields", "-e",
                                                   "frame.time_epoch"], capture_output=True, text=True,
                                                  check=True).stdout.split()]
    # 1-based TCP packet numbers k whose successor is in the same second (and the one before in another second,
    # so that delivery at the next second would come several packets late)
    same = [k for k in range(2, len(secs)) if secs[k - 1] == secs[k] and secs[k - 2] != secs[k - 1]]
    ks = [k for k in same if k > 10][:5]
    assert len(ks) == 5
    d = tmp_path / "plugins"
    d.mkdir()
    for name, posts in (("sender", "{" + ",".join(f"[{k}]=true" for k in ks) + "}"), ("listener", "{}")):
        (d / f"{name}.lua").write_text(f"""
local POSTS, got = {posts}, {{}}
TrisulPlugin = {{
  id = {{ name = "{name}" }},
  onmessage = function(msgid, msg) got[#got + 1] = msg .. " " .. (T.n or 0) end,
  onunload = function()
    local f = assert(io.open({lua_str(str(tmp_path))} .. "/{name}.txt", "w")); f:write(table.concat(got, "\\n")); f:close()
  end,
  simplecounter = {{
    protocol_guid = "{G_TCP}",
    onpacket = function(engine, layer)
      T.n = (T.n or 0) + 1
      if POSTS[T.n] then engine:post_message_frontend("at " .. T.n) end
    end,
  }},
}}
""")
    summary, _ = run(tmp_path, [d], [pcap], batch=1)
    assert summary["plugin_problems"] == []
    want = [f"at {k} {k}" for k in ks]
    assert (tmp_path / "sender.txt").read_text().split("\n") == want
    assert (tmp_path / "listener.txt").read_text().split("\n") == want


# ============================================================================ 10. objects in onpacket

def test_layer_packet_flowid_buffer_methods(tmp_path):
    """The first TCP packet of http-get-text.pcap (frame 1, a SYN):
    tshark -r $P/http-get-text.pcap -c 1 -T fields -e frame.time_epoch -e frame.len -e frame.cap_len
      -e ip.src -e ip.dst -e tcp.srcport -e tcp.dstport -e tcp.flags -e ip.hdr_len -e tcp.hdr_len
      -e frame.protocols
    -> 1362692526.869344000 78 78 141.142.228.5 192.150.187.43 59856 80 0x0002 20 44 eth:ethertype:ip:tcp
    """
    res = tmp_path / "obj.txt"
    (tmp_path / "plugins").mkdir()
    (tmp_path / "plugins" / "objects.lua").write_text(f"""
local done = false
local function put(f, k, v) f:write(k, "=", tostring(v), "\\n") end
TrisulPlugin = {{
  id = {{ name = "objects" }},
  simplecounter = {{
    protocol_guid = "{G_TCP}",
    onpacket = function(engine, layer)
      if done then return end
      done = true
      local f = assert(io.open({lua_str(str(res))}, "w"))
      put(f, "layer_bytes", layer:layer_bytes())
      put(f, "protocol_id", layer:protocol_id())
      put(f, "total_bytes", layer:total_bytes())
      local rb = layer:rawbytes()
      put(f, "raw_size", rb:size())
      put(f, "raw_sport", rb:hval_16(0))
      put(f, "raw_dport", rb:hval_16(2))
      put(f, "raw_flags", rb:hval_8(13))
      put(f, "getbyte13", layer:getbyte(13))
      put(f, "testbit_syn", layer:testbit(110))
      put(f, "testbit_rst", layer:testbit(109))
      put(f, "testbit_ack", layer:testbit(107))
      put(f, "flowkey", layer:flowkey())
      local pkt = layer:packet()
      local sec, usec = pkt:timestamp()
      put(f, "ts", sec .. "." .. usec)
      local esec, eusec = engine:timestamp()
      put(f, "engine_ts", esec .. "." .. eusec)
      put(f, "wire_length", pkt:wire_length())
      put(f, "capture_length", pkt:capture_length())
      put(f, "num_layers", pkt:num_layers())
      put(f, "pkt_ethertype", pkt:rawbytes():hval_16(12))
      put(f, "layer0", pkt:get_layer(0):protocol_id())
      put(f, "layer0_bytes", pkt:get_layer(0):layer_bytes())
      put(f, "layer1", pkt:get_layer(1):protocol_id())
      put(f, "layer3", tostring(pkt:get_layer(3)))
      local ip = pkt:find_layer("{G_IPV4.lower()}")
      put(f, "ipv4_bytes", ip:layer_bytes())
      put(f, "ipv4_proto", ip:rawbytes():hval_8(9))
      put(f, "ipv4_src", ip:rawbytes():hval_32(12))
      put(f, "find_tcp_upper", pkt:find_layer("{G_TCP.upper()}"):layer_bytes())
      put(f, "find_udp", tostring(pkt:find_layer("{G_UDP}")))
      local fid = pkt:flowid()
      put(f, "fid_id", fid:id())
      put(f, "fid_protocol", fid:protocol())
      put(f, "fid_ipa", fid:ipa())
      put(f, "fid_ipz", fid:ipz())
      put(f, "fid_porta", fid:porta())
      put(f, "fid_portz", fid:portz())
      put(f, "ipa_readable", fid:ipa_readable())
      put(f, "ipz_readable", fid:ipz_readable())
      put(f, "porta_readable", fid:porta_readable())
      put(f, "portz_readable", fid:portz_readable())
      f:close()
    end,
  }},
}}
""")
    summary, out = run(tmp_path, [tmp_path / "plugins"], ["http-get-text.pcap"])
    assert summary["plugins"][0]["hook_errors"] == {}, summary["plugins"]
    got = dict(line.split("=", 1) for line in res.read_text().splitlines())
    assert got == {
        "layer_bytes": "44",                       # tcp.hdr_len 44 (options)
        "protocol_id": G_TCP,
        "total_bytes": "78",
        "raw_size": "44",                          # from the TCP header to the end of the frame: 78 - 34
        "raw_sport": "59856", "raw_dport": "80",
        "raw_flags": "2", "getbyte13": "2",        # tcp.flags 0x0002 (SYN)
        "testbit_syn": "true",                     # byte 13, mask 0x80 >> 6 = 0x02
        "testbit_rst": "false", "testbit_ack": "false",
        "flowkey": "06A:8D.8E.E4.05:p-E9D0_C0.96.BB.2B:p-0050",   # Z = the lower port (docs/reference.md conventions)
        "ts": "1362692526.869344", "engine_ts": "1362692526.869344",
        "wire_length": "78", "capture_length": "78",
        "num_layers": "3",
        "pkt_ethertype": str(0x0800),
        "layer0": G_ETH, "layer0_bytes": "14",
        "layer1": G_IPV4,
        "layer3": "nil",
        "ipv4_bytes": "20", "ipv4_proto": "6",
        "ipv4_src": str((141 << 24) | (142 << 16) | (228 << 8) | 5),
        "find_tcp_upper": "44",
        "find_udp": "nil",
        "fid_id": "06A:8D.8E.E4.05:p-E9D0_C0.96.BB.2B:p-0050",
        "fid_protocol": "06",
        "fid_ipa": "8D.8E.E4.05", "fid_ipz": "C0.96.BB.2B",
        "fid_porta": "p-E9D0", "fid_portz": "p-0050",
        "ipa_readable": "141.142.228.5", "ipz_readable": "192.150.187.43",
        "porta_readable": "59856", "portz_readable": "80",
    }
