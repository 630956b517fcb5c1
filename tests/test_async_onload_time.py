"""A T.async task scheduled in onload (before any packet: the engine has no time yet) files its onresult's rows at
the packet time it is delivered at, not at 1970-01-01 (docs/async.md "Time").  Before: the task was stamped with
the engine time 0, so an alert added by its onresult was stored with ts_sec 0 (plus onexecute's run time).
Truth: the capture's own record times, read here from the pcap file; the task's onexecute waits until the
plug-in's first onpacket has run (a marker file), so the result cannot arrive before the first packet."""
from __future__ import annotations

import json
import os
import sqlite3
import struct
import subprocess
import sys

from tests import helpers

CAPTURE = os.path.join(helpers.REPO, "tests", "data", "trisul-16minutes.pcap")
PLUGIN = r'''
local MARK = %s
TrisulPlugin = { id = { name = "onload task" },
  onload = function()
    T.async:schedule { data = MARK,
      onexecute = function(mark)
        local ffi = require "ffi"
        pcall(ffi.cdef, "int usleep(unsigned int usec);")
        for _ = 1, 30000 do                                   -- at most 60 s
          local f = io.open(mark, "rb")
          if f then f:close(); return "seen" end
          ffi.C.usleep(2000)
        end
        return "timeout"
      end,
      onresult = function(engine, d, r)
        engine:add_alert("{B5F1DECB-51D5-4395-B71B-6FA730B772D9}", "k", "ONLOAD-TASK", 1, r)
      end }
  end,
  simplecounter = { protocol_guid = "{0A2C724B-5B9F-4ba6-9C97-B05080558574}",
    onpacket = function(engine, layer)
      if not MARKED then MARKED = true; assert(io.open(MARK, "wb")):close() end
    end } }
'''


def record_times(path) -> tuple[float, float]:
    """First and last record time (s) of a classic little-endian microsecond pcap, walked here."""
    with open(path, "rb") as f:
        data = f.read()
    assert data[:4] == b"\xd4\xc3\xb2\xa1"
    off, times = 24, []
    while off + 16 <= len(data):
        sec, usec, incl = struct.unpack_from("<III", data, off)
        times.append(sec + usec / 1e6)
        off += 16 + incl
    return min(times), max(times)


def test_a_task_scheduled_in_onload_is_filed_at_packet_time(tmp_path):
    p = tmp_path / "onloadtask.lua"
    p.write_text(PLUGIN % json.dumps(str(tmp_path / "first-packet")))
    out = tmp_path / "o"
    r = subprocess.run([sys.executable, "-m", "luaprobe.engine.daemon.cli", "run", str(p), "--pcap", CAPTURE,
                        "--out", str(out), "-q"], cwd=helpers.REPO, capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, PYTHONPATH=helpers.REPO))
    assert r.returncode == 0, r.stderr
    with sqlite3.connect(out / "luaprobe.sqlite") as db:
        rows = db.execute("SELECT ts_sec + ts_usec / 1e6, message FROM alerts WHERE sigid = 'ONLOAD-TASK'").fetchall()
    first, last = record_times(CAPTURE)
    assert len(rows) == 1 and rows[0][1] == "seen", rows
    assert first <= rows[0][0] <= last + 1, (rows, first, last)
