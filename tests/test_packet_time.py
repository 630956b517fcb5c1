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
