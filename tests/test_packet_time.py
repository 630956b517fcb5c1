"""Packet time going backwards in file input (issue 13.8): ticks never repeat, flushed buckets never reopen,
late packets are counted and attributed to the current bucket and window.

The capture is written here with struct (pcap format, independent of the engine); the expected ticks and
bucket sums follow from the timestamps alone.
"""
from __future__ import annotations

import json
import sqlite3
import struct
import subprocess
import sys

from tests import helpers

TS = [1000, 1001, 1002, 1000, 1003, 1061, 1000, 1062]
GUID = "{5B6C7D8E-9FA0-4B1C-8D2E-3F4A5B6C7D8E}"
PLUGIN = r"""
local out = "%(out)s"
TrisulPlugin = {
  id = { name = "clock" },
  countergroup = {
    control = { guid = "%(guid)s", name = "clock test", bucketsize = 60 },
    meters = { { 0, T.K.vartype.COUNTER, 10, 0, "packets", "Packets", "pkts" } },
  },
  simplecounter = {
    protocol_guid = "{974FB098-DE46-45db-94DA-8D64A3BBCDE5}",   -- Ethernet: every packet
    onpacket = function(engine, layer) engine:update_counter("%(guid)s", "all", 0, 1) end,
  },
  engine_monitor = {
    onmetronome = function(engine, ts, n, interval)
      local f = assert(io.open(out, "a")); f:write(ts, "\n"); f:close()
    end,
  },
}
"""


def _frame(i):
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 28, i, 0, 64, 17, 0, bytes([10, 0, 0, 1]), bytes([10, 0, 0, 2]))
    udp = struct.pack("!HHHH", 1000 + i, 53, 8, 0)
    return b"\x02" * 6 + b"\x04" * 6 + b"\x08\x00" + ip + udp


def test_time_never_goes_backwards(tmp_path):
    cap = tmp_path / "reordered.pcap"
    with open(cap, "wb") as f:
        f.write(struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 1))
        for i, ts in enumerate(TS):
            fr = _frame(i)
            f.write(struct.pack("<IIII", ts, 0, len(fr), len(fr)) + fr)
    ticks = tmp_path / "ticks.txt"
    plugin = helpers.write_plugin(tmp_path, PLUGIN % {"out": ticks, "guid": GUID})
    r = subprocess.run([sys.executable, "-m", "luaprobe.engine.daemon.cli", "run", plugin, "--pcap", str(cap), "--backend-instances",
                        "1", "--out", str(tmp_path / "o"), "--json"], cwd=helpers.REPO, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    s = json.loads(r.stdout)
    assert s["packets"] == len(TS) and s["late_packets"] == 2
    fired = [int(x) for x in ticks.read_text().split()]
    assert fired == list(range(1001, 1063))          # every second once, in order
    db = sqlite3.connect(tmp_path / "o" / "luaprobe.sqlite")
    rows = db.execute("SELECT bucket_ts, value FROM counters WHERE group_guid = ? ORDER BY bucket_ts",
                      (GUID,)).fetchall()
    db.close()
    # bucket 960: the five packets of 1000..1003; bucket 1020: 1061, the late 1000 (counted now), 1062
    assert rows == [(960, 5), (1020, 3)]


# ============================================================================ late packets: every hook's outputs

LATE_PLUGIN = r"""
local A, R = "{B5F1DECB-51D5-4395-B71B-6FA730B772D9}", "{4EF9DEB9-4332-4867-A667-6A30C5900E9E}"
TrisulPlugin = { id = { name = "late stamps" },
  simplecounter = { protocol_guid = "{77E462AB-2E42-42ec-9A58-C1A6821D6B31}",
    onpacket = function(engine, layer)
      engine:add_alert(A, layer:flowkey(), "SC", 3, tostring((layer:packet():timestamp())))
    end },
  reassembly_handler = {
    onpayload = function(engine, ts, flow, dir, seekpos, buff)
      engine:add_alert(A, flow:id(), "RH", 3, tostring(ts))
      engine:add_resource(R, flow:id(), "RH " .. ts, "")
    end },
  filex_monitor = {
    onfile_http = function(engine, ts, flow, path, req, resp, length, is_chunk)
      engine:add_alert(A, flow:id(), "FX", 3, tostring(ts))
      engine:add_resource(R, flow:id(), "FX " .. ts, "")
    end },
}
"""


def test_late_packets_outputs_of_every_hook_are_stamped_now(tmp_path):
    """docs/plugins.md "Time never goes backwards": the alerts and resources a late packet's hooks make are stamped
    with the engine's current second, not the packet's, from a simplecounter and also from reassembly_handler and
    filex_monitor hooks (run by event time); the hook's own `ts` still shows the packet's time.  Truth: the
    captures' timestamps (written here)."""
    from tests import pktbuild as pb
    caps = []
    for name, t0, port in (("now.pcap", 2000.0, 40001), ("old.pcap", 1000.0, 40002)):
        c = pb.Conv(cport=port, t0=t0)
        c.handshake()
        c.send(True, pb.http_request("/x"))
        c.send(False, pb.http_response(b"y" * 100, [("Content-Length", 100)]))
        c.close()
        pb.write_pcap(tmp_path / name, c.frames)
        caps.append(str(tmp_path / name))
    plugin = helpers.write_plugin(tmp_path, LATE_PLUGIN)
    r = subprocess.run([sys.executable, "-m", "luaprobe.engine.daemon.cli", "run", plugin, "--pcap", caps[0], "--pcap",
                        caps[1], "--out", str(tmp_path / "o"), "--json"], cwd=helpers.REPO, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["late_packets"] == 10
    db = sqlite3.connect(tmp_path / "o" / "luaprobe.sqlite")
    alerts = db.execute("SELECT sigid, ts_sec, message FROM alerts").fetchall()
    resources = db.execute("SELECT uri, ts_sec FROM resources").fetchall()
    db.close()
    old = [(sig, ts) for sig, ts, msg in alerts if msg.startswith("1000")]
    assert {sig for sig, _ in old} == {"SC", "RH", "FX"}
    assert all(ts >= 2000 for _, ts in old), old                   # never the late packet's own second
    assert {ts for _, ts in old} == {ts for sig, ts in old if sig == "SC"}
    late_res = [ts for uri, ts in resources if uri.split()[1].startswith("1000")]
    assert len(late_res) == 3 and all(ts >= 2000 for ts in late_res), resources


def _late_by_model(times: list[float]) -> int:
    """Packets older than the packet time already reached: their second is below the largest second before them."""
    late, top = 0, None
    for t in times:
        if top is not None and int(t) < top:
            late += 1
        top = int(t) if top is None else max(top, int(t))
    return late


def test_late_packets_are_named_in_the_printed_summary(tmp_path):
    """Two captures given newest first (`--pcap now.pcap --pcap old.pcap`): every packet of the older one is
    restamped into the current bucket (docs/plugins.md "Time never goes backwards"). The printed summary, the only
    thing a user reads, says so on one line with the count (it was only in --json / --stats-json, so a whole file's
    counters moved to another time without a word). Truth: the timestamps written here, through _late_by_model."""
    from tests import pktbuild as pb
    caps, times = [], []
    for name, t0, port in (("now.pcap", 2000.0, 40001), ("old.pcap", 1000.0, 40002), ("mid.pcap", 1500.0, 40003)):
        c = pb.Conv(cport=port, t0=t0)
        c.handshake()
        c.send(True, pb.http_request("/x"))
        c.close()
        pb.write_pcap(tmp_path / name, c.frames)
        caps += ["--pcap", str(tmp_path / name)]
        times += [t for t, _ in c.frames]
    expected = _late_by_model(times)
    assert expected == len(times) * 2 // 3               # the second and third files: all of them late
    plugin = helpers.write_plugin(tmp_path, LATE_PLUGIN)
    r = subprocess.run([sys.executable, "-m", "luaprobe.engine.daemon.cli", "run", plugin, *caps,
                        "--out", str(tmp_path / "o")], cwd=helpers.REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("late packets")]
    assert len(lines) == 1, r.stdout
    assert lines[0].startswith(f"late packets {expected}: ") and "current bucket" in lines[0], lines[0]
    # in time order nothing is late, and the line is not printed
    in_order = ["--pcap", caps[3], "--pcap", caps[5], "--pcap", caps[1]]      # old, mid, now
    r = subprocess.run([sys.executable, "-m", "luaprobe.engine.daemon.cli", "run", plugin, *in_order,
                        "--out", str(tmp_path / "o2")], cwd=helpers.REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "late packets" not in r.stdout, r.stdout
