"""Same file, same result, every run, also for what T.async results write (docs/async.md "Time").

A plug-in schedules one task per TCP packet of trisul-tutorial.pcap (1 043 packets over 34 s); onresult writes an
alert, a resource, a key label and counters in 1-second buckets (COUNTER, GAUGE, RUNNING_COUNTER, MAXIMUM), and
every tenth result schedules a follow-up task from inside onresult that counts again.  The capture is run four times:
1 and 4 workers with an instant onexecute, 1 and 3 workers with onexecute sleeping 0-1.8 ms (so results come seconds
of replay after their packets' buckets would have closed).  The four databases must be equal (sha256 over the rows of
alerts, resources, key_info and counters, the alerts' and resources' row ids aside: rows are numbered in the order
results arrive).  Before: each row's time was the schedule time plus onexecute's measured run time (differing by
µs from run to run), and a counter update whose bucket was already written went to the bucket of the packet being
read when the result came.

Truth, independent of luaprobe: the capture's TCP packet times, read here with ``struct``
(test_async_time.packet_times_us); each alert carries its scheduling packet's time to the µs, and the COUNTER of
each 1-second bucket is the number of TCP packets of that second (tshark -r trisul-tutorial.pcap -Y tcp | wc -l:
1043).
"""
from __future__ import annotations

import collections
import hashlib
import os
import sqlite3
import subprocess
import sys

from tests import helpers
from tests.test_async_time import packet_times_us

CAPTURE = os.path.join(helpers.REPO, "tests", "data", "trisul-tutorial.pcap")
GROUP = "{C0DE0A11-5EED-4D5E-8C0E-0000000000A5}"
ALERT = "{C0DE0A11-5EED-4D5E-8C0E-0000000000A6}"
RESOURCE = "{C0DE0A11-5EED-4D5E-8C0E-0000000000A7}"

PLUGIN = r'''
local n = 0
TrisulPlugin = { id = { name = "deterministic async" },
  countergroup = {
    control = { guid = "GROUP", name = "async results", bucketsize = 1 },
    meters = {
      { 0, T.K.vartype.COUNTER, 10, 0, "results", "Results", "n" },
      { 1, T.K.vartype.GAUGE, 10, 0, "last", "Last task", "n" },
      { 2, T.K.vartype.RUNNING_COUNTER, 10, 0, "total", "Results so far", "n" },
      { 3, T.K.vartype.MAXIMUM, 10, 0, "max", "Largest task", "n" },
      { 4, T.K.vartype.COUNTER, 10, 0, "again", "Follow-ups", "n" },
    } },
  simplecounter = { protocol_guid = "{77E462AB-2E42-42ec-9A58-C1A6821D6B31}",
    onpacket = function(engine, layer)
      n = n + 1
      T.async:schedule{ data = tostring(n),
        onexecute = function(d)
          local k = tonumber(d)
          if SLOW then
            local ffi = require("ffi")
            pcall(ffi.cdef, "int usleep(unsigned int usec);")
            ffi.C.usleep((k % 7) * 300)
          end
          return ("%08x"):format((k * 2654435761) % 4294967296)
        end,
        onresult = function(e, d, r)
          local k = tonumber(d)
          local sec, usec = e:timestamp()
          e:add_alert("ALERT", nil, "T" .. (k % 5), 2, ("%d %d %d %s"):format(k, sec, usec, r))
          e:add_resource("RESOURCE", nil, "task/" .. d, r)
          e:update_key_info("GROUP", "k" .. (k % 3), "label " .. (k % 3))
          e:update_counter("GROUP", "all", 0, 1)
          e:update_counter("GROUP", "all", 1, k)
          e:update_counter("GROUP", "all", 2, 1)
          e:update_counter("GROUP", "k" .. (k % 3), 3, k)
          if k % 10 == 0 then
            T.async:schedule{ data = d,
              onexecute = function(x) return x end,
              onresult = function(e2, x) e2:update_counter("GROUP", "all", 4, 1) end }
          end
        end }
    end } }
'''.replace("GROUP", GROUP).replace("ALERT", ALERT).replace("RESOURCE", RESOURCE)


def run(tmp_path, name: str, workers: int, slow: bool) -> str:
    """One `luaprobe run` of the plug-in; returns the database path."""
    d = tmp_path / name
    d.mkdir()
    (d / "async_det.lua").write_text(PLUGIN.replace("if SLOW then", f"if {str(slow).lower()} then"))
    out = d / "out"
    r = subprocess.run([sys.executable, "-m", "luaprobe.engine.daemon.cli", "run", str(d / "async_det.lua"),
                        "--pcap", CAPTURE, "--out", str(out), "--workers", str(workers), "-q"],
                       cwd=helpers.REPO, capture_output=True, text=True, timeout=600,
                       env=dict(os.environ, PYTHONPATH=helpers.REPO))
    assert r.returncode == 0, r.stderr
    return str(out / "luaprobe.sqlite")


def digest(db_path: str) -> tuple[str, dict]:
    """sha256 over the sorted rows of the tables onresult writes (row ids left out), and the rows."""
    queries = {
        "alerts": "SELECT ts_sec, ts_usec, alert_guid, flowkey, sigid, classification, priority, message, status, "
                  "plugin FROM alerts",
        "resources": "SELECT * FROM resources",
        "key_info": "SELECT * FROM key_info",
        "counters": "SELECT * FROM counters",
    }
    h, rows = hashlib.sha256(), {}
    with sqlite3.connect(f"file:{db_path}?mode=ro", uri=True) as db:
        cols = [c[1] for c in db.execute("PRAGMA table_info(resources)")]
        if "id" in cols:
            queries["resources"] = "SELECT " + ", ".join(c for c in cols if c != "id") + " FROM resources"
        for t, q in queries.items():
            rows[t] = sorted(db.execute(q).fetchall(), key=repr)
            h.update(t.encode() + repr(rows[t]).encode())
    return h.hexdigest(), rows


def test_async_results_write_the_same_database_every_run(tmp_path):
    _, tcp = packet_times_us(CAPTURE)
    assert len(tcp) == 1043
    runs = {name: digest(run(tmp_path, name, w, slow))
            for name, w, slow in (("w1", 1, False), ("w4", 4, False), ("w1-slow", 1, True), ("w3-slow", 3, True))}
    _, rows = runs["w1"]
    # independent truth: every alert at its scheduling packet's time, to the µs
    assert len(rows["alerts"]) == 1043 and len(rows["resources"]) == 1043
    stamps = {int(a[7].split()[0]): a[0] * 1_000_000 + a[1] for a in rows["alerts"]}
    assert stamps == {i + 1: t for i, t in enumerate(tcp)}
    # each 1-second bucket counts the results of its own second's packets (meter 0) and follow-ups (meter 4)
    per_sec = collections.Counter(t // 1_000_000 for t in tcp)
    again = collections.Counter(t // 1_000_000 for i, t in enumerate(tcp) if (i + 1) % 10 == 0)
    got = {(r[1], r[3]): r[4] for r in rows["counters"] if r[2] == "all" and r[3] in (0, 4)}
    assert {b: v for (b, m), v in got.items() if m == 0} == dict(per_sec)
    assert {b: v for (b, m), v in got.items() if m == 4} == dict(again)
    digests = {name: d for name, (d, _) in runs.items()}
    for name, (d, r) in runs.items():
        for t in rows:
            assert r[t] == rows[t], (name, t, [x for x in r[t] if x not in rows[t]][:3])
    assert len(set(digests.values())) == 1, digests
