"""A T.async task scheduled in onload (before any packet: the engine has no time yet) files its onresult's rows at
the time of the run's first packet, not at 1970-01-01 and not at whichever packet was being read when its result
came (docs/async.md "Time").  Before 53315f7 the task was stamped with the engine time 0, so an alert added by its
onresult was stored with ts_sec 0 (plus onexecute's run time); after it, with the time of the packet read at the
delivery (varying from run to run), and a result delivered before the first packet still had time 0.
Truth: the capture's own record times, read here from the pcap file."""
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


def record_times(path) -> list[int]:
    """The record times (µs since the epoch, file order) of a classic little-endian microsecond pcap, walked here."""
    with open(path, "rb") as f:
        data = f.read()
    assert data[:4] == b"\xd4\xc3\xb2\xa1"
    off, times = 24, []
    while off + 16 <= len(data):
        sec, usec, incl = struct.unpack_from("<III", data, off)
        times.append(sec * 1_000_000 + usec)
        off += 16 + incl
    return times


def test_a_task_scheduled_in_onload_is_filed_at_packet_time(tmp_path):
    p = tmp_path / "onloadtask.lua"
    p.write_text(PLUGIN % json.dumps(str(tmp_path / "first-packet")))
    out = tmp_path / "o"
    r = subprocess.run([sys.executable, "-m", "luaprobe.engine.daemon.cli", "run", str(p), "--pcap", CAPTURE,
                        "--out", str(out), "-q"], cwd=helpers.REPO, capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, PYTHONPATH=helpers.REPO))
    assert r.returncode == 0, r.stderr
    with sqlite3.connect(out / "luaprobe.sqlite") as db:
        rows = db.execute("SELECT ts_sec * 1000000 + ts_usec, message FROM alerts WHERE sigid = 'ONLOAD-TASK'").fetchall()
    times = record_times(CAPTURE)
    assert rows == [(times[0], "seen")], (rows, times[0])


EARLY = r'''
local MARKS = %s
TrisulPlugin = { id = { name = "onload task, early result" },
  onload = function()
    T.async:schedule { data = MARKS[1],
      onexecute = function(mark) assert(io.open(mark, "wb")):close() return "done" end,
      onresult = function(engine, d, r)
        assert(io.open(MARKS[2], "wb")):close()
        local sec, usec = engine:timestamp()
        engine:add_alert("{B5F1DECB-51D5-4395-B71B-6FA730B772D9}", "k", "EARLY", 1, ("%%d %%d"):format(sec, usec))
      end }
  end,
  simplecounter = { protocol_guid = "{0A2C724B-5B9F-4ba6-9C97-B05080558574}", onpacket = function() end } }
'''


def test_a_result_ready_before_the_first_packet_waits_for_its_time(tmp_path):
    """The input is a FIFO the test fills only after the onload task ran in its worker (marker 1) and the
    old code had time to deliver its result (marker 2, written by onresult: within ~50 ms there; now it never
    comes before a packet, and the test goes on after 1 s, which only gives the old code its chance: with the
    results' wait for the first packet taken out of async.lua (await_origin never set), marker 2 was there when
    marker 1 was seen, 3 runs of 3, 2026-12-02).  The onresult's rows and engine:timestamp() then read the first
    packet's time.  Before: time 0 (1970-01-01)."""
    marks = [str(tmp_path / "executed"), str(tmp_path / "delivered")]
    p = tmp_path / "early.lua"
    p.write_text(EARLY % ("{" + ", ".join(json.dumps(m) for m in marks) + "}"))
    fifo, out = tmp_path / "in.pcap", tmp_path / "o"
    os.mkfifo(fifo)
    proc = subprocess.Popen([sys.executable, "-m", "luaprobe.engine.daemon.cli", "run", str(p), "--pcap", str(fifo),
                             "--out", str(out), "-q"], cwd=helpers.REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONPATH=helpers.REPO))
    try:
        fd = helpers.fifo_writer(fifo, proc)
        helpers.wait_for(lambda: os.path.exists(marks[0]), 120)
        try:
            helpers.wait_for(lambda: os.path.exists(marks[1]), 1)
        except AssertionError:
            pass                                       # the new code: held until the first packet
        with open(CAPTURE, "rb") as f, os.fdopen(fd, "wb") as w:
            w.write(f.read())
        _, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    with sqlite3.connect(out / "luaprobe.sqlite") as db:
        rows = db.execute("SELECT ts_sec * 1000000 + ts_usec, message FROM alerts WHERE sigid = 'EARLY'").fetchall()
    first = record_times(CAPTURE)[0]
    assert rows == [(first, f"{first // 1_000_000} {first % 1_000_000}")], (rows, first)
