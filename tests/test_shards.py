"""Flow-sharded fast paths (engine/shards.py, docs/scale.md): N = 1, 2, 4 give the same per-flow results.

Independent truths: tshark (pinned below and in tests/data/tshark-flows-*.tsv, commands in
tests/data/MANIFEST.md), a Python model of the shard hash, and the N = 1 run.  ``$P`` is tests/helpers.PCAPS.
"""
from __future__ import annotations

import ipaddress
import json
import os
import re
import signal
import sqlite3
import struct

import psutil
import pytest

from luaprobe.engine.fastpath.run import RunConfig
from luaprobe.engine.fastpath.shards import make_run

from .helpers import PCAPS, REPO, cmdline, finish, killed_when_left, wait_for, write_plugin
from .helpers import pcap_records as helpers_pcap_records
from .test_fastpath import (G_ETH, G_TCP, PROTO_GROUP, TEST_GROUP, cli, lua_str, read_monitor, write_counting_plugins,
                            write_monitor_plugin)

DATA = os.path.join(REPO, "tests", "data")
FRAGS = os.path.join(DATA, "cases", "02-ipv4-frags-reversed-http", "input.pcap")
FILES = ["mix-eth-tls-http-dns.pcap", "vlan-mpls-mixed.pcap", "ipv6-icmp6.pcap", "trisul-16minutes.pcap",
         "tcp-echo-many-flows.pcap", FRAGS]
# tshark -r F -T fields -e frame.len | awk '{n++; s+=$1} END {print n, s}'   (per file, summed)
#   132 164607 / 47 16403 / 49 4548 / 7000 1819784 / 82582 5512362 / 12 3296
FRAMES, FRAME_BYTES = 132 + 47 + 49 + 7000 + 82582 + 12, 164607 + 16403 + 4548 + 1819784 + 5512362 + 3296
# tshark -r F -Y 'tcp.flags.syn==1 and tcp.flags.ack==0 and not icmp' | wc -l: 6 / 3 / 0 / 295 / 741 / 1
SYNS = 6 + 3 + 0 + 295 + 741 + 1
# tshark -r F -Y 'tcp and not icmp and not icmpv6' | wc -l: 118 / 47 / 0 / 5312 / 82582 / 10
TCP_PACKETS = 118 + 47 + 0 + 5312 + 82582 + 10
SYN_ALERT = "{AAAAAAAA-0000-4000-8000-0000000000A1}"
#: a simplecounter that raises SYN_ALERT, keyed by the flow id, for each TCP SYN (not SYN-ACK)
SYN_ALERT_PLUGIN = f'''
TrisulPlugin = {{
  id = {{ name = "syn alert" }},
  simplecounter = {{
    protocol_guid = "{G_TCP}",
    onpacket = function(engine, layer)
      local flags = layer:getbyte(13)
      if flags % 4 >= 2 and flags % 32 < 16 then
        engine:add_alert("{SYN_ALERT}", layer:packet():flowid():id(), "syn", 2, "SYN")
      end
    end,
  }},
}}
'''


def write_shard_plugins(d, outdir) -> None:
    """Counting plug-ins, an engine_monitor, a SYN alert per TCP SYN, and packets per T.contextid."""
    write_counting_plugins(d)
    write_monitor_plugin(d, outdir)
    (d / "syn_alert.lua").write_text(SYN_ALERT_PLUGIN)
    (d / "contexts.lua").write_text(f'''
TrisulPlugin = {{
  id = {{ name = "contexts" }},
  simplecounter = {{
    protocol_guid = "{G_ETH}",
    onpacket = function(engine, layer)
      engine:update_counter("{TEST_GROUP}", "ctx" .. T.contextid, 0, 1)
    end,
  }},
}}
''')


def run_n(tmp_path, n, files=FILES, name=None, **kw) -> tuple[dict, str]:
    out = str(tmp_path / (name or f"out{n}"))
    plugins = tmp_path / f"plugins-{name or n}"
    write_shard_plugins(plugins, out)
    os.makedirs(out, exist_ok=True)
    files = [f if os.path.isabs(f) else os.path.join(PCAPS, f) for f in files]
    summary = make_run(RunConfig(plugins=[str(plugins)], files=files, out_dir=out, shards=n, **kw)).run()
    return summary, out


def dump(out) -> dict:
    """Every output row (flows without their uid-free columns changed), sorted."""
    with sqlite3.connect(f"file:{os.path.join(out, 'luaprobe.sqlite')}?mode=ro", uri=True) as c:
        return {
            "flows": sorted(c.execute("SELECT flowkey, proto, ipa, porta, ipz, portz, first_ts, last_ts, packets_az, "
                                      "packets_za, bytes_az, bytes_za, state FROM flows")),
            "counters": sorted(c.execute("SELECT group_guid, bucket_ts, key, meter, value FROM counters "
                                         "WHERE group_guid != ?", (TEST_GROUP.upper(),))),
            "alerts": sorted(c.execute("SELECT ts_sec, ts_usec, alert_guid, flowkey, sigid, priority, message "
                                       "FROM alerts")),
            "resources": sorted(c.execute("SELECT ts_sec, ts_usec, resource_guid, flowkey, uri FROM resources")),
        }


def key_of(addr: str) -> str:
    """Our address key (docs/schema.md) for a tshark address."""
    a = ipaddress.ip_address(addr)
    return ".".join(f"{b:02X}" for b in a.packed) if a.version == 4 else a.packed.hex().upper()


def shard_model(ipa: str, ipz: str, n: int) -> int:
    """Python model of engine/capture/capture.lua shard_of: XOR of the little-endian 32-bit words of both
    16-byte address fields, times 0x9E3779B97F4A7C15 mod 2^64, high 32 bits h, shard h * n >> 32."""
    def words(key):
        raw = bytes.fromhex(key.replace(".", "")).ljust(16, b"\0")
        return struct.unpack("<4I", raw)
    x = 0
    for w in words(ipa) + words(ipz):
        x ^= w
    return ((x * 0x9E3779B97F4A7C15) % (1 << 64) >> 32) * n >> 32


@pytest.mark.parametrize("n", [2, 3, 4])
def test_neighbouring_clients_spread_over_the_shards(n):
    """Neighbouring client addresses to one server (a LAN's hosts to its gateway's peer) are spread: of 16
    consecutive IPv4 clients no shard gets more than half, through the Lua shard_of itself on decoded
    frames; the hash mod n of the old code put 12 of 16 on one of 2 shards."""
    from luaprobe.shm.luajit import new_runtime
    from tests import pktbuild as pb
    frames = [pb.ether(pb.ipv4(f"192.0.2.{k}", "198.51.100.1", 17, pb.udp(f"192.0.2.{k}", "198.51.100.1", 1024, 53, b"x")))
              for k in range(10, 26)]
    pick = new_runtime().eval("""function(frame, n)
      local ffi = require("ffi")
      local decode = require("luaprobe.engine.fastpath.decode")
      local d = decode.new()
      decode.decode(d, ffi.cast("const uint8_t *", frame), #frame, 1)
      return require("luaprobe.engine.capture.capture").shard_of(d, n)
    end""")
    got = [pick(f, n) for f in frames]
    assert got == [shard_model(key_of(f"192.0.2.{k}"), key_of("198.51.100.1"), n) for k in range(10, 26)]
    assert max(got.count(s) for s in range(n)) <= 8, got


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("shards")
    return {n: run_n(tmp, n) for n in (1, 2, 4)}



def start_sharded_daemon(d, path, extra=""):
    """Start the test daemon ``d`` (tests/test_supervisor.py Daemon) from its config ``path`` with
    ``shards = 2`` in [run] and ``extra`` TOML appended; its supervisor pid joins ``d.pids`` for clean-up."""
    from .test_supervisor import cli as sv_cli
    with open(path) as f:
        text = f.read().replace('run_dir = "run"\n', 'run_dir = "run"\nshards = 2\n', 1) + extra
    with open(path, "w") as f:
        f.write(text)
    r = sv_cli("start", "--config", path)
    assert r.returncode == 0, r.stderr
    d.pids.add(int(r.stdout.split("supervisor pid ")[1].split()[0].rstrip(",;)")))

def test_outputs_identical_for_1_2_4_shards(runs):
    base = dump(runs[1][1])
    assert len(base["flows"]) > 600 and len(base["alerts"]) == SYNS
    for n in (2, 4):
        got = dump(runs[n][1])
        for kind in base:
            assert got[kind] == base[kind], f"{kind} differ between 1 and {n} shards"


def test_merged_counts_match_independent_counts(runs):
    for n, (summary, out) in runs.items():
        assert summary["packets"] == FRAMES and summary["bytes"] == FRAME_BYTES
        assert summary["input_errors"] == [] and summary["plugin_problems"] == []
        with sqlite3.connect(os.path.join(out, "luaprobe.sqlite")) as c:
            per = dict(c.execute("SELECT key, sum(value) FROM counters WHERE group_guid = ? AND meter = 0 "
                                 "GROUP BY key", (PROTO_GROUP.upper(),)))
            ctx = dict(c.execute("SELECT key, sum(value) FROM counters WHERE group_guid = ? GROUP BY key",
                                 (TEST_GROUP.upper(),)))
            stored = json.loads(dict(c.execute("SELECT key, value FROM run"))["shards"]) if n > 1 else None
        assert per["eth"] == FRAMES and per["tcp"] == TCP_PACKETS
        # T.contextid is the shard: each shard's ETH packets equal its own packet count
        assert sum(ctx.values()) == FRAMES
        if n > 1:
            assert len(summary["shards"]) == n and stored == summary["shards"]
            for s in summary["shards"]:
                assert ctx.get(f"ctx{s['shard']}", 0) == s["packets"] and s["restarts"] == 0
            assert sum(s["packets"] for s in summary["shards"]) == FRAMES
            assert sum(s["flows"] for s in summary["shards"]) == summary["flows"] == runs[1][0]["flows"]
        else:
            assert set(ctx) == {"ctx0"}


def test_every_flow_on_its_modelled_shard(runs):
    """Each shard's flow rows are exactly the flows the hash model assigns it (both directions, fragments)."""
    summary, out = runs[4]
    with sqlite3.connect(os.path.join(out, "luaprobe.sqlite")) as c:
        flows = list(c.execute("SELECT ipa, ipz, packets_az + packets_za FROM flows WHERE proto IN (6, 17, 1, 58)"))
    per = [0] * 4
    for ipa, ipz, pk in flows:
        assert shard_model(ipa, ipz, 4) == shard_model(ipz, ipa, 4)
        per[shard_model(ipa, ipz, 4)] += pk
    # a shard's packets = its flows' packets + its non-flow packets (non-IP go to shard 0)
    for s in summary["shards"]:
        assert s["packets"] >= per[s["shard"]]
    assert sum(1 for x in per if x) >= 3           # real captures spread over the shards


def test_engine_monitor_windows_once_for_the_probe(runs):
    """Backends run in shard 0 only and see the probe's packet time: the same windows and metronome as N=1."""
    base = [read_monitor(runs[1][1], i) for i in ("0", "1")]
    for n in (2, 4):
        assert [read_monitor(runs[n][1], i) for i in ("0", "1")] == base
        monitors = [p for p in runs[n][0]["plugins"] if p["plugin"].endswith("monitor.lua")]
        assert sorted((p["shard"], p["instance"]) for p in monitors) == [(0, "0"), (0, "1")]


def test_flows_match_tshark_conversations(runs):
    """TCP/UDP flows of two captures against tshark's per-conversation packets and bytes (tests/data TSVs)."""
    _, out = runs[2]
    with sqlite3.connect(os.path.join(out, "luaprobe.sqlite")) as c:
        ours = {}
        for proto, ipa, pa, ipz, pz, pk, by in c.execute(
                "SELECT proto, ipa, porta, ipz, portz, packets_az + packets_za, bytes_az + bytes_za FROM flows "
                "WHERE proto IN (6, 17)"):
            k = (proto, frozenset({(ipa, pa), (ipz, pz)}))
            old = ours.get(k, (0, 0))
            ours[k] = (old[0] + pk, old[1] + by)
    for name in ("mix-eth-tls-http-dns", "tcp-echo-many-flows"):
        with open(os.path.join(DATA, f"tshark-flows-{name}.tsv")) as f:
            rows = [ln.split("\t") for ln in f.read().splitlines()]
        assert rows
        for proto, a, pa, z, pz, pk, by in rows:
            k = (int(proto), frozenset({(key_of(a), int(pa)), (key_of(z), int(pz))}))
            assert ours.get(k) == (int(pk), int(by)), (name, a, pa, z, pz)


def test_cli_shards_json(tmp_path):
    out = tmp_path / "out"
    plugins = tmp_path / "plugins"
    write_counting_plugins(plugins)
    r = cli("run", str(plugins), "--pcap", os.path.join(PCAPS, "mix-eth-tls-http-dns.pcap"), "--out", str(out),
            "--shards", "2", "--json")
    assert r.returncode == 0, r.stderr
    s = json.loads(r.stdout)
    assert s["packets"] == 132 and [x["shard"] for x in s["shards"]] == [0, 1]
    r = cli("run", str(plugins), "--pcap", os.path.join(PCAPS, "mix-eth-tls-http-dns.pcap"), "--shards", "0")
    assert r.returncode == 2 and r.stderr.strip() == ("luaprobe run: argument --shards: 0 is out of range: must be between "
                                                  "1 and 64 (luaprobe run --help)")


def test_merged_problems_errors_and_files_once_each_in_first_order():
    """merge_summaries: a plug-in problem, an input error or a finished file that several shards report is in the
    run's summary once, where it first came (shard order, then each shard's own order); counts are summed.
    Truth: the three shard summaries written here."""
    from luaprobe.engine.fastpath.shards import merge_summaries
    parts = [{"packets": 3, "files_done": ["a.pcap", "b.pcap"], "plugin_problems": ["p.lua:3: x"],
              "input_errors": ["b.pcap: offset 24: cut"]},
             {"packets": 4, "files_done": ["b.pcap", "a.pcap", "c.pcap"], "plugin_problems": ["q.lua:1: y", "p.lua:3: x"],
              "input_errors": ["b.pcap: offset 24: cut"]},
             None]                                                  # a shard that died before its summary
    out = merge_summaries(parts, 1.0, [0, 0, 1], RunConfig(plugins=[], files=["a.pcap", "b.pcap", "c.pcap"]))
    assert out["files_done"] == ["a.pcap", "b.pcap", "c.pcap"]
    assert out["plugin_problems"] == ["p.lua:3: x", "q.lua:1: y"]
    assert out["input_errors"] == ["b.pcap: offset 24: cut"]
    assert out["packets"] == 7 and [x["restarts"] for x in out["shards"]] == [0, 0, 1]


# tshark -r mix-eth-tls-http-dns.pcap -Y 'tcp and not icmp' -T fields -e tcp.dstport | sort -un
MIX_TCP_DST_PORTS = {"80", "443", "49158", "49365", "49366", "49367", "49368", "49369"}
KEYINFO_GROUP = "{5C0FFEE0-1111-4222-8333-444455556666}"


def test_key_info_counts_a_label_per_key_like_one_fast_path(tmp_path):
    """key_info is a label per (group, key), upserted: a 2-shard run's rows_written.key_info is the number of
    distinct keys, equal to the single-shard run's and to the store's rows (it was summed over the shards, and
    counted once per update_key_info call): static keyinfo (written by every shard) + every TCP destination port."""
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    (plugins / "labels.lua").write_text(f'''
TrisulPlugin = {{
  id = {{ name = "labels" }},
  countergroup = {{
    control = {{ guid = "{KEYINFO_GROUP}", name = "labelled ports", bucketsize = 60 }},
    meters = {{ {{ 0, T.K.vartype.COUNTER, 10, 0, "packets", "Packets", "pkts" }} }},
    keyinfo = {{ {{ "static-a", "A" }}, {{ "static-b", "B" }}, {{ "80", "http (static)" }} }},
  }},
  simplecounter = {{
    protocol_guid = "{G_TCP}",
    onpacket = function(engine, layer)
      local port = tostring(layer:getbyte(2) * 256 + layer:getbyte(3))
      engine:update_counter("{KEYINFO_GROUP}", port, 0, 1)
      engine:update_key_info("{KEYINFO_GROUP}", port, "port " .. port)     -- every packet: many calls per key
    end,
  }},
}}
''')
    truth = len(MIX_TCP_DST_PORTS | {"static-a", "static-b", "80"})
    got = {}
    for n in ("1", "2", "4"):
        out = tmp_path / f"out{n}"
        r = cli("run", str(plugins), "--pcap", os.path.join(PCAPS, "mix-eth-tls-http-dns.pcap"), "--out", str(out),
                "--shards", n, "--json")
        assert r.returncode == 0, r.stderr
        with sqlite3.connect(f"file:{out / 'luaprobe.sqlite'}?mode=ro", uri=True) as c:
            rows = dict(c.execute("SELECT key, label FROM key_info WHERE group_guid = ?", (KEYINFO_GROUP,)))
            run_row = json.loads(c.execute("SELECT value FROM run WHERE key = 'rows_written'").fetchone()[0])
        got[n] = json.loads(r.stdout)["rows_written"]["key_info"]
        assert got[n] == len(rows) == truth == run_row["key_info"], (n, got, rows)
        assert rows["443"] == "port 443" and rows["static-a"] == "A"


def test_generate_sharded_equals_single(tmp_path):
    spec = "packets=20000,flows=400,mix=tcp=50:udp=30:dns=20,seed=3"
    s1, out1 = run_n(tmp_path, 1, files=[], name="g1", generate=spec)
    a = dump(out1)
    s2, out2 = run_n(tmp_path, 2, files=[], name="g2", generate=spec)
    assert s2["packets"] == s1["packets"] > 19000 and s2["files_done"] == s1["files_done"] == [f"generate:{spec}"]
    assert dump(out2) == a
    assert min(s["packets"] for s in s2["shards"]) > 2000          # generated hosts spread over both


def read_stats(path: str) -> dict:
    """The coordinator's stats snapshot ({} while it has not written one whole)."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def run_killing(tmp_path, out: str, spec: str, pick, **kw) -> tuple[dict, psutil.Process, dict]:
    """A 2-shard --generate run (the shard plug-ins) in a thread; the process ``pick(stats snapshot)`` names, once
    it names one, gets SIGKILL.  Returns (the run's summary, that process, the first snapshot listing a shard
    death)."""
    import threading
    plugins = tmp_path / "plugins-kill"
    write_shard_plugins(plugins, out)
    os.makedirs(out)
    stats = os.path.join(out, "stats.json")
    run = make_run(RunConfig(plugins=[str(plugins)], files=[], out_dir=out, shards=2, generate=spec,
                             stats_file=stats, stats_interval=0.1, **kw))

    def snap():
        return read_stats(stats)
    box = {}
    t = threading.Thread(target=lambda: box.setdefault("s", run.run()))
    t.start()
    try:
        victim = wait_for(lambda: pick(snap()), timeout=60)
        victim.kill()
        seen = wait_for(lambda: (sn := snap()).get("shard_deaths") and sn, timeout=60)
    finally:
        t.join(120)
    assert not t.is_alive()
    return box["s"], victim, seen


def test_crashed_shard_restarts_others_keep_running(tmp_path):
    """kill -9 of shard 1 mid-run: it restarts on its ring, the run completes, shard 0's flows are exactly
    those of an undisturbed run (the model says which flows are shard 0's).  Mid-run for sure: shard 1 holds at its
    20 000th TCP packet (HOLD, once) until it is killed (before, a 2 000 000-packet run was killed once a stats
    snapshot showed 20 000 packets in shard 1: 10 times the packets, in both runs)."""
    spec = "packets=200000,flows=2000,mix=tcp=70:udp=30,seed=5"
    ref = dump(run_n(tmp_path, 2, files=[], name="ref", generate=spec)[1])
    out = str(tmp_path / "kill")
    (tmp_path / "plugins-kill").mkdir()
    write_plugin(tmp_path / "plugins-kill", HOLD % tmp_path, "hold.lua")     # beside the shard plug-ins

    def shard1(snap):
        sh = snap.get("shards", [])
        return psutil.Process(sh[1]["pid"]) if len(sh) == 2 and (tmp_path / "held").exists() else None
    s, victim, _ = run_killing(tmp_path, out, spec, shard1)
    pid = victim.pid
    assert [x["restarts"] for x in s["shards"]] == [0, 1]
    # the loss is counted and fails the run: the dead process's packets (from its shared progress word)
    [death] = s["shard_deaths"]
    assert death["shard"] == 1 and death["pid"] == pid and death["status"] == -signal.SIGKILL
    assert death["packets"] > 20000
    from luaprobe.engine.daemon.cli import run_exit_code
    code, reasons = run_exit_code(s)
    assert code == 1 and reasons[0].startswith(f"shard 1 (pid {pid}) died (status -9) after {death['packets']} packets")
    assert s["packets_read"] == s["packets"] + s["packets_lost"] and s["packets_lost"] == death["packets"]
    got = dump(out)
    mine = [f for f in got["flows"] if shard_model(f[2], f[4], 2) == 0]
    assert mine == [f for f in ref["flows"] if shard_model(f[2], f[4], 2) == 0] and len(mine) > 500
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


HOLD = r"""
local dir, n = "%s", 0
local function exists(name)
  local f = io.open(dir .. "/" .. name); if f then f:close(); return true end; return false
end
TrisulPlugin = { id = { name = "hold shard 1" },
  simplecounter = { protocol_guid = "{77E462AB-2E42-42ec-9A58-C1A6821D6B31}",   -- TCP
    onpacket = function(engine, layer)
      n = n + 1
      if T.contextid == 1 and n == 20000 and not exists("held") then   -- once: its successor runs through
        local f = assert(io.open(dir .. "/held", "w")); f:close()
        while true do end                                              -- until the test kills this process
      end
    end } }
"""


def test_kill_9_of_a_shard_accounts_for_every_packet(tmp_path):
    """`kill -9` of a shard process in a CLI run: exit 1 (docs/operations.md), one line stating the loss, and
    every packet of the capture (counted by walking the file here) is either walked by a shard process that
    finished or lost with the dead one: packets_read == packets + packets_lost, per shard too, and the loss is the
    dead process's own count of the packets it had released.  Before, its packets appeared only in shard_deaths."""
    import subprocess
    import sys
    cap = tmp_path / "big.pcap"
    subprocess.run([sys.executable, "-m", "luaprobe.engine.daemon.cli", "gen", "--out", str(cap), "--packets",
                    "200000", "--flows", "2000", "--mix", "tcp=70,udp=30", "--seed", "5"], cwd=REPO, check=True,
                   capture_output=True)
    truth = helpers_pcap_records(cap)
    (tmp_path / "hold.lua").write_text(HOLD % tmp_path)
    stats = tmp_path / "summary.json"
    p = subprocess.Popen([sys.executable, "-m", "luaprobe.engine.daemon.cli", "run", str(tmp_path / "hold.lua"),
                          "--pcap", str(cap), "--out", str(tmp_path / "out"), "--shards", "2", "-q",
                          "--stats-json", str(stats)], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
    wait_for(lambda: (tmp_path / "held").exists(), timeout=120)
    [victim] = [c for c in psutil.Process(p.pid).children()
                if "luaprobe.engine.fastpath.shards" in cmdline(c) and cmdline(c)[-1].endswith("shard1.json")]
    victim.kill()
    out, err = finish(p, 120)
    assert p.returncode == 1, err
    assert "Traceback" not in err
    s = json.loads(stats.read_text())
    [death] = s["shard_deaths"]
    assert death["shard"] == 1 and death["pid"] == victim.pid and death["status"] == -signal.SIGKILL
    assert s["packets_read"] == truth == s["packets"] + s["packets_lost"]
    assert s["packets_lost"] == death["packets"] > 0
    sh = {x["shard"]: x for x in s["shards"]}
    assert sum(x["read"] for x in sh.values()) == truth
    assert all(x["read"] == x["packets"] + x["lost"] for x in sh.values())
    assert sh[0]["lost"] == 0 and sh[1]["lost"] == s["packets_lost"]
    assert s["exit"]["code"] == 1 and len(s["exit"]["reasons"]) == 1
    lines = [ln for ln in err.splitlines() if "lost" in ln]
    assert lines == [f"luaprobe run: exit 1: shard 1 (pid {victim.pid}) died (status -9) after {death['packets']} "
                     f"packets and was restarted: of {truth} packets read, {s['packets']} were walked by the shard "
                     f"processes that finished and {s['packets_lost']} by the dead one: its rows sent to the store "
                     "writer are committed (not counted in \"written\"); results not yet sent (open counter buckets, "
                     "live flows, in-flight T.async tasks) are lost"], err


def test_the_shard_loss_line_accounts_for_packets_passed_over_at_a_stop():
    """A shard that died during a stop: the line's numbers must add up to packets_read (walked + not walked at the
    stop + lost with the dead one); it left out not_walked_at_stop, so they did not."""
    from luaprobe.engine.daemon.cli import shard_loss_line
    s = {"shard_deaths": [{"shard": 1, "pid": 42, "status": -9, "packets": 300}], "packets_read": 1000,
         "packets": 500, "not_walked_at_stop": 200, "packets_lost": 300}
    line = shard_loss_line(s)
    nums = [int(n) for n in re.findall(r"(\d+) (?:were walked|were not walked|by the dead)", line)]
    assert sum(nums) == s["packets_read"] and len(nums) == 3, line
    s["not_walked_at_stop"], s["packets"] = 0, 700
    assert "not walked" not in shard_loss_line(s)


# ---------------------------------------------------------------- live: AF_PACKET fanout, one socket per shard
from .test_live import IP, needs_root, port_counts, run_live, send_udp, stop, veth, write_plugins  # noqa: E402,F401


def fanout_sockets(ifname) -> list:
    """The kernel's view (ss, packet diag) of the packet sockets on ifname: one (fanout group or None,
    BPF program text) per socket."""
    import re
    import subprocess
    text = subprocess.run(["ss", "-0", "-a", "-b", "-e"], capture_output=True, text=True, check=True).stdout
    out = []
    for block in re.split(r"\n(?=\S)", text)[1:]:
        if re.search(rf"\*:{re.escape(ifname)}\s", block):
            group = re.search(r"fanout\(id:(\d+)", block)
            prog = re.search(r"bpf filter \(\d+\):\s*(.*)", block)
            out.append((group and int(group.group(1)), prog and prog.group(1).strip()))
    return out


def capturing(ifname, n) -> bool:
    """n sockets in one fanout group, each with its real program (not the drop-all one it joins with)."""
    socks = fanout_sockets(ifname)
    return len(socks) == n and len({g for g, _ in socks}) == 1 and None not in {g for g, _ in socks} \
        and all(p and not p.startswith("0x06 0 0 0,") for _, p in socks)


@pytest.mark.root
@needs_root
def test_live_fanout_every_packet_once(tmp_path, veth):
    """--shards 2 --interface: two sockets in one PACKET_FANOUT_HASH group; every datagram of 20
    destination ports counted exactly once in the merged counters, both shards get a share.
    Traffic starts once the kernel shows both sockets in the group with their real filter (ss): a socket
    that has joined but still has its drop-all program loses its share uncounted (test below)."""
    ifname, ns = veth
    write_plugins(tmp_path / "plugins")
    proc, out, stats = run_live(tmp_path, ifname, "--shards", "2")
    with killed_when_left(proc):
        def ready():
            if proc.poll() is not None:
                raise AssertionError(f"luaprobe exited early ({proc.returncode}): {proc.communicate()}")
            return capturing(ifname, 2)
        wait_for(ready, timeout=60, interval=0.05)
        send_udp(ns, {9000 + k: 100 for k in range(20)})
        rc, so, se = stop(proc)
    assert rc == 0, (so, se)
    s = json.loads(stats.read_text())
    assert s["input_errors"] == [] and s["drops"]["capture"] == 0 and s["drops"]["kernel"] == 0
    assert s["shard_deaths"] == [] and [x["restarts"] for x in s["shards"]] == [0, 0], (s["shards"], se)
    assert port_counts(out) == {str(9000 + k): 100 for k in range(20)}, (s["shards"], s.get("captured_live"), se)
    assert all(x["packets"] > 0 for x in s["shards"]), s["shards"]
    metro = [p for p in s["plugins"] if p["plugin"].endswith("metronome.lua")]
    assert {p["shard"] for p in metro} == {0}



# ---------------------------------------------------------------- daemon: per-shard stats, Prometheus, shard restart
def test_daemon_shards_stats_prometheus_and_shard_restart(tmp_path):
    from luaprobe.engine.daemon import metrics

    from .test_supervisor import Daemon, free_port
    d = Daemon(tmp_path)
    port = free_port()
    path = d.write_config(pcap=(os.path.join(PCAPS, "mix-wikipedia-dns-http.pcap"),), port=port)
    try:
        start_sharded_daemon(d, path)
        # this capture's hosts use both shards (a busy machine may start one shard seconds after the other)
        snap = wait_for(lambda: (s := d.stats()).get("packets", 0) >= 2000 and len(s.get("shards", [])) == 2
                        and min(x["packets"] for x in s["shards"]) > 0 and s, 60, 0.1)
        assert [s["shard"] for s in snap["shards"]] == [0, 1]
        assert sum(s["packets"] for s in snap["shards"]) == snap["packets"]
        assert sum(s["flows"] for s in snap["shards"]) == snap["flows"]

        m = metrics.scrape(port)              # one scrape reads one merged snapshot: totals = sum of shards
        assert m['luaprobe_shard_packets_total{shard="0"}'] + m['luaprobe_shard_packets_total{shard="1"}'] \
            == m["luaprobe_packets_total"] > 0
        assert m['luaprobe_shard_restarts_total{shard="1"}'] == 0
        st = d.status()
        assert len(st["processes"]["shards"]) == 2
        victim = snap["shards"][1]["pid"]
        os.kill(victim, signal.SIGKILL)
        snap = wait_for(lambda: (s := d.stats())["shards"][1]["restarts"] == 1
                        and s["shards"][1]["pid"] != victim and s["shards"][1]["packets"] > 0 and s, 30, 0.1)
        st = d.status()
        assert st["state"] == "running" and st["restarts"] == 0     # the coordinator restarted the shard
        assert snap["shards"][0]["restarts"] == 0
        r = d.cli("stop")      # the dead shard's unwritten results are lost: the run's exit 1, which stop reports
        assert r.returncode == 1 and "exit status 1" in r.stderr and f"(pid {victim}) died" in r.stderr, r.stderr
        assert not d.alive() and not d.segments()
    finally:
        d.cleanup()


@pytest.mark.root
@needs_root
def test_fanout_join_order_no_duplicate_no_loss(veth):
    """engine/capture/afpacket.lua join order, forced step by step with two sockets of one group: a socket
    bound but not yet joined sees nothing (its drop-all program), so the member already in the group
    gets every packet once; after join() (group + real filter in two back-to-back calls) the two split
    the traffic, each packet once.  Truth: the kernel's per-socket tp_packets against what was sent."""
    from luaprobe.engine.capture.bpf import compile_bpf
    from luaprobe.shm.luajit import new_runtime, table
    ifname, ns = veth
    lua = new_runtime()
    flt = compile_bpf("udp and dst portrange 9000-9099", 1, ifname)
    open_ = lua.eval("function(o) return require('luaprobe.engine.capture.afpacket').open(o) end")
    counts = lua.eval("function(h) h:kernel_stats(); return h.kernel_packets end")
    group = os.getpid() & 0xFFFF
    a = open_(table(lua, {"interface": ifname, "filter": flt, "fanout": group}))
    b = open_(table(lua, {"interface": ifname, "filter": flt, "fanout": group, "join": False}))
    try:
        assert fanout_sockets(ifname) and sum(1 for g, _ in fanout_sockets(ifname) if g == group) == 1
        send_udp(ns, {9000 + k: 10 for k in range(20)})
        seen = [0, 0]

        def settled(want):                  # the veth delivers in softirq: allow it to finish
            seen[0], seen[1] = counts(a), counts(b)
            return sum(seen) >= want
        wait_for(lambda: settled(200), timeout=10, interval=0.02)
        assert seen == [200, 0]
        lua.eval("function(h, g) h:join(g) end")(b, group)
        assert capturing(ifname, 2)
        send_udp(ns, {9000 + k: 50 for k in range(20)})
        wait_for(lambda: settled(1200), timeout=10, interval=0.02)
        na, nb = seen[0] - 200, seen[1]
        assert na + nb == 1000 and na > 0 and nb > 0, (na, nb)
    finally:
        lua.eval("function(h) h:close() end")(a)
        lua.eval("function(h) h:close() end")(b)


@pytest.mark.root
@needs_root
def test_live_capturing_means_every_socket_joined(tmp_path, veth):
    """The stats snapshot's `capturing` turns true only once every shard's socket is in the fanout group
    with its real program (the kernel's view, ss), and traffic sent from then on is counted exactly once."""
    import threading
    ifname, ns = veth
    write_plugins(tmp_path / "plugins")
    out, stats = tmp_path / "out", str(tmp_path / "stats.json")
    run = make_run(RunConfig(plugins=[str(tmp_path / "plugins")], files=[], out_dir=str(out), shards=2,
                             interface=ifname, stats_file=stats, stats_interval=0.05))
    box = {}
    t = threading.Thread(target=lambda: box.setdefault("s", run.run()))
    t.start()
    try:
        def snap():
            return read_stats(stats)

        def ready():
            return snap().get("capturing") is True or not t.is_alive()
        wait_for(ready, timeout=60, interval=0.02)
        assert capturing(ifname, 2), fanout_sockets(ifname)
        send_udp(ns, {9000 + k: 50 for k in range(20)})
    finally:
        run.request_stop()
        t.join(120)
    assert not t.is_alive()
    s = box["s"]
    assert s["input_errors"] == [] and s["shard_deaths"] == [] and s["drops"]["capture"] == 0
    assert port_counts(out) == {str(9000 + k): 50 for k in range(20)}
    assert all(x["packets"] > 0 for x in s["shards"]), s["shards"]


def test_daemon_shards_log_in_the_configured_format(tmp_path):
    """`[log] format = "json"` with `[run] shards = 2`: every line of supervisor.log is a JSON object, the shard
    processes' lines too (they logged text lines into the JSON log before); shard 0's engine_monitor line is
    among them (window_report.lua logs one per window)."""
    from .test_supervisor import Daemon
    d = Daemon(tmp_path)
    path = d.write_config(loop=False)
    try:
        start_sharded_daemon(d, path, '[log]\nformat = "json"\n')
        wait_for(lambda: d.status()["state"].startswith("stopped"), 90, 0.2)
        d.cli("stop")
        lines = [x for x in open(os.path.join(d.run_dir, "supervisor.log")).read().splitlines() if x.strip()]
        records = [json.loads(x) for x in lines]                # raises on a text line
        assert any("[window_report.lua#0]" in r["msg"] for r in records), lines
        assert len({r["pid"] for r in records}) >= 3            # supervisor, coordinator, shard 0 at least
    finally:
        d.cleanup()


def test_a_shard_whose_store_writer_dies_counts_the_rows_it_lost(tmp_path):
    """kill -9 of shard 1's SQLite store writer: the shard ends (StoreDied, as a single fast path does) and is
    restarted, and the rows its writer lost reach the run's totals: the death in shard_deaths carries them
    (``store_rows_lost``, the writer's own count: rows handed to it minus rows SQLite has, tests/test_store.py),
    the summary and the stats snapshot sum them, the exit line names them, and every packet is still accounted
    for.  Before, the shard died with a traceback and its lost rows appeared nowhere (summary, stats, supervisor)."""
    # 2M packets: the kill must land mid-run (a 300k-packet run took ~0.15 s on a fast machine, shorter than the
    # 0.1 s stats snapshots that name the writer: the kill landed after the writer's last commit, 0 rows lost)
    spec = "packets=2000000,flows=2000,mix=tcp=70:udp=30,seed=5"

    def writer1(snap):
        sh = snap.get("shards", [])
        if not (len(sh) == 2 and sh[1]["packets"] > 20000):
            return None
        kids = [c for c in psutil.Process(sh[1]["pid"]).children() if "luaprobe.engine.store.writer" in cmdline(c)]
        return kids[0] if kids else None
    s, writer, seen = run_killing(tmp_path, str(tmp_path / "out"), spec, writer1, idle_timeout=1)
    assert [x["restarts"] for x in s["shards"]] == [0, 1]
    [death] = s["shard_deaths"]
    assert death["shard"] == 1 and death["status"] == 1
    # noticed while the shard runs (its writer check) or, when the kill lands in its last second, at its close
    assert (f"store writer (pid {writer.pid}) was killed by SIGKILL" in death["error"]
            or f"SQLite store writer (pid {writer.pid}) failed at the end of the run" in death["error"]
            and "writer exited (signal 9)" in death["error"]), death["error"]
    lost = death["store_rows_lost"]
    assert lost > 0                      # idle timeout 1 s: flow rows were on their way to it
    assert f"; {lost} rows handed to it are not in the database" in death["error"]
    assert s["store_rows_lost"] == lost and seen["store_rows_lost"] == lost
    from luaprobe.engine.daemon.cli import run_exit_code
    code, reasons = run_exit_code(s)
    assert code == 1 and f"(its SQLite store writer died: {lost} rows handed to it are not in the database)" in reasons[0]
    assert s["packets_read"] == s["packets"] + s["packets_lost"] and s["packets_lost"] == death["packets"]
