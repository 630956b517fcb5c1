"""`luaprobe run --lua-input FILE --args TEXT`: an inputfilter's step is the run's input (Trisul's
`trisul -mode lua -in FILE -args TEXT`; docs/plugins.md "inputfilter").  The truth each test checks against is the
input file the test wrote (Python's csv and sums), not luaprobe's output."""
from __future__ import annotations

import csv
import ipaddress
import json
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import time

import pytest

from tests import helpers

GUID = "{5C8F5EC6-2B1E-4E0A-9E1C-3A6C1F0B7D21}"      # a group no plug-in declares: 60 s buckets

# A flow import as trisul-scripts' lanl-cyber/lanlflow.lua and flowimport.lua do it: read a line, set the time, count
# bytes per source host, make the flow record (update_flow, then set_flow_duration).
IMPORT = r"""
TrisulPlugin = {
  id = { name = "csv import" },
  onload = function()
    f = io.open(T.args)
    if f == nil then return false end
  end,
  onunload = function() if f then f:close() end end,
  inputfilter = {
    step = function(packet, engine)
      local line = f:read()
      if line == nil then return false end
      local t = T.util.split(line, ",")
      if t[1] == "bad" then error("unparseable record: " .. line) end
      packet:set_timestamp(tonumber(t[1]))
      local function hexip(s)
        local a, b, c, d = s:match("(%d+)%.(%d+)%.(%d+)%.(%d+)")
        return string.format("%02X.%02X.%02X.%02X", a, b, c, d)
      end
      engine:update_counter("GUID", hexip(t[3]), 0, tonumber(t[8]))
      local fk = string.format("%02XA:%s:p-%04X_%s:p-%04X", tonumber(t[7]), hexip(t[3]), tonumber(t[4]),
                               hexip(t[5]), tonumber(t[6]))
      engine:update_flow(fk, 0, tonumber(t[8]))
      engine:update_flow(fk, 2, tonumber(t[9]))
      engine:set_flow_duration(fk, tonumber(t[2]))
      return true
    end,
  },
}
""".replace("GUID", GUID)


def luaprobe(*args, cwd):
    return subprocess.run([sys.executable, "-m", "luaprobe.engine.daemon.cli", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=300, stdin=subprocess.DEVNULL)


def records(n: int, seed: int, start: int = 1_600_000_000, step_max: int = 3):
    """n flow records (time, duration, src, sport, dst, dport, proto, bytes, packets), each 5-tuple once, in time
    order: the time advances 0..step_max s a record."""
    rnd, t, seen, out = random.Random(seed), start, set(), []
    while len(out) < n:
        t += rnd.randint(0, step_max)
        key = (f"10.{rnd.randint(0, 3)}.{rnd.randint(0, 255)}.{rnd.randint(1, 254)}", rnd.randint(1024, 65535),
               f"192.168.{rnd.randint(0, 3)}.{rnd.randint(1, 254)}", rnd.choice([53, 80, 443]), rnd.choice([6, 17]))
        if key in seen:
            continue
        seen.add(key)
        out.append((t, rnd.randint(0, 90), key[0], key[1], key[2], key[3], key[4], rnd.randint(40, 100_000),
                    rnd.randint(1, 80)))
    return out


def write_csv(path, rows) -> None:
    with open(path, "w", newline="") as f:
        csv.writer(f, lineterminator="\n").writerows(rows)


def hexip(s: str) -> str:
    return ".".join(f"{b:02X}" for b in ipaddress.ip_address(s).packed)


def test_flow_import_counters_and_flow_records_match_the_input_file(tmp_path):
    """Every record of the file reaches the database: the counter of each (bucket, source host) is the sum of its
    records' bytes, and each record is one flows row with its bytes, packets, first time and duration.  The records
    span ~4 h of engine time, so most end by the idle timeout (state TIMEOUT, --idle-timeout 120) during the
    import and the last ones at the end of the run (OPEN); T.args carries the file name to onload."""
    rows = records(10000, seed=3)          # > STEP_CALLS: several rounds of step calls, a tick after each
    write_csv(tmp_path / "flows.csv", rows)
    (tmp_path / "imp.lua").write_text(IMPORT)
    r = luaprobe("run", "--lua-input", "imp.lua", "--args", str(tmp_path / "flows.csv"), "--out", "out",
                 "--stats-json", "s.json", "--idle-timeout", "120", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    s = json.loads((tmp_path / "s.json").read_text())
    assert s["lua_input"]["step_calls"] == len(rows) + 1 and s["lua_input"]["ended"] == "end of input", s["lua_input"]
    assert s["packets"] == 0 and s["input_errors"] == []
    assert f"lua-input {tmp_path / 'imp.lua'}: step calls {len(rows) + 1:,} errors 0  frames 0  ended: end of input  " \
        "elapsed" in r.stdout
    assert "packets 0" not in r.stdout

    want = {}
    for t, _d, src, *_rest, nbytes, _p in rows:
        k = (t - t % 60, hexip(src))
        want[k] = want.get(k, 0) + nbytes
    db = sqlite3.connect(tmp_path / "out" / "luaprobe.sqlite")
    got = {(b, k): v for b, k, v in db.execute(
        "SELECT bucket_ts, key, value FROM counters WHERE group_guid = ? AND meter = 0", (GUID,))}
    assert got == want

    flows = {fk: (first, last, pkts, nbytes, state) for fk, first, last, pkts, nbytes, state in db.execute(
        "SELECT flowkey, first_ts, last_ts, packets_az, bytes_az, state FROM flows")}
    want_flows = {f"{p:02X}A:{hexip(s)}:p-{sp:04X}_{hexip(d)}:p-{dp:04X}": (t, t + dur, pk, nb)
                  for t, dur, s, sp, d, dp, p, nb, pk in rows}
    assert {fk: v[:4] for fk, v in flows.items()} == want_flows
    last_t = rows[-1][0]                     # the engine's time at the end: no record ends by timeout after it
    for fk, (first, last, *_x) in want_flows.items():
        state = flows[fk][4]
        assert state in ("TIMEOUT", "OPEN"), (fk, state)
        assert state == "OPEN" or last + 120 <= last_t, (fk, last, last_t)    # idle 120 s by a tick
        if last + 120 > last_t:
            assert state == "OPEN", (fk, last, last_t)
    assert sum(v[4] == "TIMEOUT" for v in flows.values()) > len(rows) // 2


def test_step_errors_skip_the_record_and_are_counted(tmp_path):
    """A record step raises an error on is a hook error (logged once with the plug-in's file and line, counted);
    the records around it are imported and the run exits 0.  Every call failing is exit 4: the input ends after
    ERRORS_IN_A_ROW calls with one problem line."""
    rows = records(50, seed=5)
    lines = [list(map(str, r)) for r in rows]
    lines.insert(10, ["bad"] * 9)
    lines.insert(30, ["bad"] * 9)
    write_csv(tmp_path / "flows.csv", lines)
    (tmp_path / "imp.lua").write_text(IMPORT)
    r = luaprobe("run", "-q", "--lua-input", "imp.lua", "--args", "flows.csv", "--out", "out", "--stats-json",
                 "s.json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    s = json.loads((tmp_path / "s.json").read_text())
    assert s["lua_input"]["step_errors"] == 2 and s["lua_input"]["step_calls"] == 53, s["lua_input"]
    assert "imp.lua:14: unparseable record: bad,bad" in r.stderr and "Traceback" not in r.stderr, r.stderr
    db = sqlite3.connect(tmp_path / "out" / "luaprobe.sqlite")
    assert db.execute("SELECT count(*), sum(bytes_az) FROM flows").fetchone() == (50, sum(x[7] for x in rows))

    write_csv(tmp_path / "allbad.csv", [["bad"] * 9] * 1500)
    r = luaprobe("run", "-q", "--lua-input", "imp.lua", "--args", "allbad.csv", "--out", "out2", "--stats-json",
                 "s2.json", cwd=tmp_path)
    assert r.returncode == 4, r.stderr
    s = json.loads((tmp_path / "s2.json").read_text())
    assert s["lua_input"] == {"script": str(tmp_path / "imp.lua"), "step_calls": 1000, "step_errors": 1000,
                              "ended": "errors", "frames": 0, "clipped": 0}
    assert "inputfilter.step failed on 1000 calls in a row; the input ends here after 1000 calls" in r.stderr


def test_step_packet_has_no_frame_and_nil_ends_the_input(tmp_path):
    """The packet step gets is written, not read: a frame reader (rawbytes) is an error naming the method; a step
    returning nil ends the input as false does.  A bad time is an error naming set_timestamp."""
    (tmp_path / "p.lua").write_text("""
N = 0
TrisulPlugin = { id = { name = "p" },
  inputfilter = { step = function(packet, engine)
    N = N + 1
    if N == 1 then packet:rawbytes() end
    if N == 2 then packet:set_timestamp("soon") end
    if N == 3 then packet:set_timestamp(1600000000.25); local s, us = engine:timestamp(); print("TS", s, us) end
    if N == 4 then return nil end
    return true
  end } }
""")
    r = luaprobe("run", "--lua-input", "p.lua", "--out", "out", "--stats-json", "s.json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "packet:rawbytes(): an inputfilter's step packet is written, not read: set_timestamp and set_packet" \
        in r.stderr
    assert "set_timestamp: seconds soon is not a Unix time in seconds (0..4294967295)" in r.stderr
    assert "TS\t1600000000\t250000" in r.stdout + r.stderr
    s = json.loads((tmp_path / "s.json").read_text())
    assert s["lua_input"]["step_calls"] == 4 and s["lua_input"]["step_errors"] == 2
    assert s["lua_input"]["ended"] == "end of input"


def test_usage_errors(tmp_path):
    """--args without --lua-input, --lua-input with --shards, and a --lua-input without a step: one line each,
    exit 2 (usage) or 4 (the plug-in), nothing run."""
    (tmp_path / "imp.lua").write_text(IMPORT)
    (tmp_path / "nostep.lua").write_text('TrisulPlugin = { id = { name = "n" }, inputfilter = '
                                         '{ step_alert = function() return nil end } }')
    r = luaprobe("run", "--pcap", "x.pcap", "--args", "a", "--out", "o1", cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.strip() == ("luaprobe run: --args needs --lua-input (they are the input "
                                                      "script's arguments)"), r.stderr
    r = luaprobe("run", "--lua-input", "imp.lua", "--shards", "2", "--out", "o2", cwd=tmp_path)
    assert r.returncode == 2 and "--shards needs packet input" in r.stderr and len(r.stderr.splitlines()) == 1
    r = luaprobe("run", "--lua-input", "nostep.lua", "--out", "o3", cwd=tmp_path)
    assert r.returncode == 4, r.stderr
    assert "nostep.lua: --lua-input needs an inputfilter with step(packet, engine)" in r.stderr
    assert "Traceback" not in r.stderr
    r = luaprobe("run", "--lua-input", "imp.lua", "--args", "missing.csv", "--out", "o4", cwd=tmp_path)
    assert r.returncode == 4 and "onload returned false" in r.stderr and "Traceback" not in r.stderr, r.stderr
    # check: alone, the step-only inputfilter cannot run (exit 4, the line says how it runs); as --lua-input it can
    r = luaprobe("check", "imp.lua", cwd=tmp_path)
    assert r.returncode == 4 and "runs only as the run's input (luaprobe run --lua-input FILE)" in r.stdout, r
    r = luaprobe("check", "--lua-input", "imp.lua", cwd=tmp_path)
    assert r.returncode == 0 and "types: inputfilter (supported)" in r.stdout and r.stderr == "", r
    r = luaprobe("check", "--lua-input", "nostep.lua", cwd=tmp_path)
    assert r.returncode == 4 and "--lua-input needs an inputfilter with step" in r.stdout + r.stderr, r


def test_stop_signal_ends_an_endless_input(tmp_path):
    """A step that never returns false (a listener, as fortigate-log.lua's UDP socket) runs until a stop signal:
    SIGINT ends the input, what was imported is written, the exit is 130, and no process or segment is left."""
    (tmp_path / "forever.lua").write_text(f"""
N = 0
TrisulPlugin = {{ id = {{ name = "forever" }},
  inputfilter = {{ step = function(packet, engine)
    N = N + 1
    packet:set_timestamp(1600000000 + math.floor(N / 1000))
    engine:update_counter("{GUID}", "calls", 0, 1)
    if N == 5000 then io.open(T.args, "w"):close() end
    return true
  end }} }}
""")
    mark = tmp_path / "started"
    p = subprocess.Popen([sys.executable, "-m", "luaprobe.engine.daemon.cli", "run", "-q", "--lua-input",
                          "forever.lua", "--args", str(mark), "--out", "out", "--stats-json", "s.json"],
                         cwd=tmp_path, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    with helpers.killed_when_left(p):
        helpers.wait_for(lambda: mark.exists() or p.poll() is not None, timeout=60)
        assert p.poll() is None, p.communicate()
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=60)
    assert p.returncode == 130, err
    s = json.loads((tmp_path / "s.json").read_text())
    calls = s["lua_input"]["step_calls"]
    assert s["lua_input"]["ended"] == "stopped" and calls >= 5000
    db = sqlite3.connect(tmp_path / "out" / "luaprobe.sqlite")
    assert db.execute("SELECT sum(value) FROM counters WHERE group_guid = ?", (GUID,)).fetchone()[0] == calls
    assert not os.path.exists(tmp_path / "out" / "luaprobe.sqlite-journal")


# Lines run as Lua, one per step call (a step that does whatever its input says): set_timestamp / counters / errors.
CMD = r"""
TrisulPlugin = { id = { name = "cmd" },
  onload = function() f = io.open(T.args) end,
  inputfilter = { step = function(p, e)
    packet, engine = p, e
    local line = f:read()
    if line == nil then return false end
    assert(loadstring(line))()
    return true
  end } }
"""
METRONOME = r"""
TrisulPlugin = { id = { name = "em" },
  engine_monitor = { onmetronome = function(engine, ts, tick_count, interval)
    if T.contextid == 0 and engine:instanceid() == "0" then print("TICK " .. ts) end end } }
"""
COUNT = 'engine:update_counter("' + GUID + '", "k", 0, 1)'


def test_scattered_errors_and_untimed_records(tmp_path):
    """Every other record failing does not end the input (a call that goes well starts the count of errors in a row
    again); 5 000 records before the first set_timestamp (a header, lines the script skips) tick nothing, so the
    timed records that follow count in their own minutes, not in the wall clock's; each second of engine time is
    ticked (onmetronome) as a packet run ticks it."""
    lines = ["x = 1"] * 5000                           # no time yet
    t0, want = 1_600_000_000, {}
    for i in range(3000):
        t = t0 + i
        lines.append(f"packet:set_timestamp({t}); {COUNT}")
        lines.append("error('bad record')")
        want[t - t % 60] = want.get(t - t % 60, 0) + 1
    (tmp_path / "in.txt").write_text("\n".join(lines) + "\n")
    (tmp_path / "cmd.lua").write_text(CMD)
    (tmp_path / "em.lua").write_text(METRONOME)
    r = luaprobe("run", "em.lua", "--lua-input", "cmd.lua", "--args", "in.txt", "--out", "out", "--stats-json",
                 "s.json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    s = json.loads((tmp_path / "s.json").read_text())
    assert s["lua_input"] == {"script": str(tmp_path / "cmd.lua"), "step_calls": 11001, "step_errors": 3000,
                              "ended": "end of input", "frames": 0, "clipped": 0}
    db = sqlite3.connect(tmp_path / "out" / "luaprobe.sqlite")
    got = dict(db.execute("SELECT bucket_ts, value FROM counters WHERE group_guid = ?", (GUID,)))
    assert got == want
    ticks = [int(x.split()[-1]) for x in (r.stdout + r.stderr).splitlines() if "TICK " in x]
    assert ticks == list(range(t0 + 1, t0 + 3000)), ticks[:5]     # every second after the first, once, in order


def test_times_that_are_not_seconds_and_the_memory_limit(tmp_path):
    """set_timestamp of a number that is not a Unix time in seconds (1e300, 2^62, FortiGate's nanosecond eventtime)
    is an error naming it, and the counters keep their minutes; a step that hits the plug-in memory limit ends the
    input with a plug-in problem (exit 4, ended "disabled"), not as a clean end of input."""
    lines = [f"packet:set_timestamp(1600000000); {COUNT}", "packet:set_timestamp(1e300)",
             "packet:set_timestamp(2^62)", "packet:set_timestamp(1557513467123456789)",
             f"packet:set_timestamp(1600000061); {COUNT}"]
    (tmp_path / "in.txt").write_text("\n".join(lines) + "\n")
    (tmp_path / "cmd.lua").write_text(CMD)
    r = luaprobe("run", "--lua-input", "cmd.lua", "--args", "in.txt", "--out", "out", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "set_timestamp: seconds 1e+300 is not a Unix time in seconds (0..4294967295)" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    db = sqlite3.connect(tmp_path / "out" / "luaprobe.sqlite")
    assert sorted(db.execute("SELECT bucket_ts, value FROM counters WHERE group_guid = ?", (GUID,))) == [
        (1599999960, 1), (1600000020, 1)]
    (tmp_path / "hog.lua").write_text("""T0 = {}
TrisulPlugin = { id = { name = "hog" }, inputfilter = { step = function(packet, engine)
  T0[#T0 + 1] = string.rep("x", 4096) .. #T0
  return true end } }
""")
    r = luaprobe("run", "--lua-input", "hog.lua", "--plugin-memory-mb", "64", "--out", "out2", "--stats-json",
                 "s.json", cwd=tmp_path)
    assert r.returncode == 4, r.stderr
    s = json.loads((tmp_path / "s.json").read_text())
    assert s["lua_input"]["ended"] == "disabled"
    assert "memory limit 64 MiB exceeded in inputfilter.step (--plugin-memory-mb); instance disabled" in r.stderr
    assert "Traceback" not in r.stderr and "internal error" not in r.stderr


# flowimport.lua's pattern (trisul-scripts lua/frontend_scripts/inputfilter/*/flowimport.lua): update_flow with the
# record's numbers, then new_flow_record announcing it, then set_flow_duration; keys repeat
FLOWIMPORT = r"""
TrisulPlugin = { id = { name = "fi" },
  onload = function() f = io.open(T.args) end,
  inputfilter = { step = function(packet, engine)
    local line = f:read()
    if line == nil then return false end
    local t, dur, port, nbytes, npk = line:match("(%d+),(%d+),(%d+),(%d+),(%d+)")
    packet:set_timestamp(tonumber(t))
    local fk = string.format("06A:0A.00.00.01:p-%04X_0A.00.00.02:p-0050", tonumber(port))
    engine:update_flow(fk, 0, tonumber(nbytes))
    engine:update_flow(fk, 2, tonumber(npk))
    engine:new_flow_record(fk, tonumber(nbytes), 0, tonumber(npk), 0)
    engine:set_flow_duration(fk, tonumber(dur))
    return true
  end } }
"""
NEWRECORDS = r"""
TrisulPlugin = { id = { name = "mm" }, messagemonitor = {
  onnewflowrecord = function(engine, flow, baz, bza, paz, pza)
    print(("NFR %s %d %d %d %d %d"):format(flow:id(), engine:timestamp(), baz, bza, paz, pza))
  end } }
"""


def test_repeated_flow_keys_add_up_and_are_announced(tmp_path):
    """Trisul's new_flow_record announces a flow record and leaves the metrics unchanged (update_flow changes them):
    a key imported again within the idle timeout adds to its record, so the flows rows hold every byte and packet of
    the file (before, new_flow_record set the totals and a repeated key kept only its last record's), and last_ts
    reaches the later record.  Every announcement reaches messagemonitor.onnewflowrecord with its numbers and time."""
    rnd = random.Random(7)
    rows = [(1_600_000_000 + i * 3, rnd.randint(0, 20), rnd.choice([1000, 1001, 1002]), rnd.randint(40, 9000),
             rnd.randint(1, 9)) for i in range(300)]
    write_csv(tmp_path / "in.csv", rows)
    (tmp_path / "fi.lua").write_text(FLOWIMPORT)
    (tmp_path / "mm.lua").write_text(NEWRECORDS)
    r = luaprobe("run", "mm.lua", "--lua-input", "fi.lua", "--args", "in.csv", "--out", "out", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    db = sqlite3.connect(tmp_path / "out" / "luaprobe.sqlite")
    got = {fk: (nb, pk, first, last) for fk, nb, pk, first, last in db.execute(
        "SELECT flowkey, bytes_az, packets_az, first_ts, last_ts FROM flows")}
    want = {}
    for t, dur, port, nb, pk in rows:
        fk = f"06A:0A.00.00.01:p-{port:04X}_0A.00.00.02:p-0050"
        b0, p0, first, last = want.get(fk, (0, 0, t, t))
        want[fk] = (b0 + nb, p0 + pk, first, max(last, t, first + dur))
    assert got == want
    nfr = [ln.split("NFR ", 1)[1].split() for ln in (r.stdout + r.stderr).splitlines() if "NFR " in ln]
    assert [(int(t), int(nb), int(pk)) for _fk, t, nb, _z, pk, _z2 in nfr] == [(t, nb, pk) for t, _d, _p, nb, pk in rows]


# A packet source as Trisul's inputfilter page describes it ("read packet data from non PCAP sources", "construct a
# real packet and use set_packet"): here a classic pcap file read with Lua's io library, one frame per step call.
READER = r"""
TrisulPlugin = {
  id = { name = "frames over step" },
  onload = function()
    f = io.open(T.args, "rb")
    if f == nil then return false end
    local g = f:read(24)
    linktype = g:byte(21) + g:byte(22) * 256
  end,
  onunload = function() if f then f:close() end end,
  inputfilter = {
    step = function(packet, engine)
      local h = f:read(16)
      if h == nil or #h < 16 then return false end
      local function u32(i) local a, b, c, d = h:byte(i, i + 3); return a + b * 256 + c * 65536 + d * 16777216 end
      packet:set_packet(u32(1), u32(5), linktype, f:read(u32(9)))
      return true
    end,
  },
}
"""

# Another plug-in's hook on the frames: Ethernet frames counted (written at unload)
ETH_COUNT = r"""
TrisulPlugin = {
  id = { name = "eth count" },
  onload = function() n = 0 end,
  simplecounter = { protocol_guid = "{974FB098-DE46-45db-94DA-8D64A3BBCDE5}",
                    onpacket = function(engine, layer) n = n + 1 end },
  onunload = function() local o = io.open("eth.txt", "w"); o:write(n); o:close() end,
}
"""


def pcap_frames(path) -> list[tuple[int, int, bytes]]:
    """(seconds, microseconds, bytes) of each record of a classic little-endian pcap, parsed here (struct)."""
    import struct
    data = open(path, "rb").read()
    assert data[:4] == b"\xd4\xc3\xb2\xa1"
    out, off = [], 24
    while off + 16 <= len(data):
        sec, usec, incl, _orig = struct.unpack_from("<IIII", data, off)
        out.append((sec, usec, data[off + 16:off + 16 + incl]))
        off += 16 + incl
    return out


@pytest.mark.parametrize("ring_mb", [32, 1], ids=["ring-32MiB", "ring-1MiB"])
def test_frames_set_by_step_are_walked_like_captured_packets(tmp_path, ring_mb):
    """Every frame step gives with packet:set_packet is decoded, tracked and seen by the other plug-ins' hooks: the
    packet and byte totals are the file's (parsed here), each IPv4 flow's packets per direction are tshark's
    conversation table's, and a simplecounter on Ethernet counted every frame (tshark).  With a 1 MiB packet ring
    (rounds end when it has no room for the largest frame) nothing is lost either."""
    from tests.test_flowmon import TUTORIAL, conversations, needs_tshark  # noqa: F401
    if shutil.which("tshark") is None:
        pytest.skip("tshark is not installed (the independent truth)")
    (tmp_path / "reader.lua").write_text(READER)
    (tmp_path / "eth.lua").write_text(ETH_COUNT)
    r = luaprobe("run", "eth.lua", "--lua-input", "reader.lua", "--args", TUTORIAL, "--out", "out", "--stats-json",
                 "s.json", "--packet-ring-mb", str(ring_mb), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    frames = pcap_frames(TUTORIAL)
    s = json.loads((tmp_path / "s.json").read_text())
    assert s["lua_input"]["frames"] == len(frames) == s["packets"], (s["lua_input"], s["packets"])
    assert s["lua_input"]["step_calls"] == len(frames) + 1 and s["lua_input"]["clipped"] == 0
    assert s["bytes"] == sum(len(b) for *_t, b in frames)
    assert s["drops"]["capture"] == 0 and s["input_errors"] == []
    assert f"frames {len(frames):,}  ended: end of input" in r.stdout and f"packets {len(frames):,}" in r.stdout
    assert int((tmp_path / "eth.txt").read_text()) == helpers.tshark_frames(TUTORIAL, "-Y", "eth")
    db = sqlite3.connect(tmp_path / "out" / "luaprobe.sqlite")
    got = {fk: (az, za) for fk, az, za in db.execute("SELECT flowkey, packets_az, packets_za FROM flows")}
    want = {fk: (c["packets_az"], c["packets_za"]) for proto in ("tcp", "udp")
            for fk, c in conversations(proto).items()}
    assert want and {fk: got.get(fk) for fk in want} == want
    first_sec = min(t for t, *_x in frames)
    assert min(v for (v,) in db.execute("SELECT first_ts FROM flows")) >= first_sec


SET_PACKET_CASES = r"""
local frames = dofile(T.args)     -- { {sec, usec, dlt, bytes, last?}, ... }
local i = 0
TrisulPlugin = {
  id = { name = "set_packet cases" },
  inputfilter = {
    step = function(packet, engine)
      i = i + 1
      local c = frames[i]
      if c == nil then return false end
      if c.replaced then packet:set_packet(c[1], c[2], c[3], "replaced by the next call") end
      packet:set_packet(c[1], c[2], c[3], c[4])
      return not c.last
    end,
  },
}
"""


def test_set_packet_errors_skip_that_call_and_long_frames_are_cut(tmp_path):
    """set_packet's arguments are checked (an error names the argument and the script's line; that call's frame is
    not walked, the others are); a second set_packet in one call replaces the first; a frame longer than 262 144
    bytes is cut to it (wirelen kept, counted as clipped); the frame of the call that returns false is walked."""
    udp = bytes.fromhex("ffffffffffff0200000000010800"   # Ethernet, IPv4 UDP 10.0.0.1:1000 -> 10.0.0.2:53, 4 bytes
                        "45000020000100004011" "0000" "0a000001" "0a000002" "03e80035000c0000") + b"abcd"
    big = udp[:14] + b"\x45" + b"\x00" * 299_985
    lua_str = lambda b: '"' + "".join(f"\\{x}" for x in b) + '"'           # noqa: E731
    cases = [
        f"{{1700000000, 0, 1, {lua_str(udp)}}}",
        f"{{1700000000, 1000000, 1, {lua_str(udp)}}}",         # microseconds out of range: an error
        f"{{1700000001, 5, 147, {lua_str(udp)}}}",             # a link type the decoder does not know
        f'{{1700000001, 6, 1, ""}}',                           # no bytes
        f"{{1700000001, 7, 1, {lua_str(udp)}, replaced = true}}",
        f"{{1700000002, 8, 1, string.rep('x', {len(big)}):gsub('^x', '')}}",   # (a string, not the first value)
        f"{{1700000003, 9, 228, {lua_str(udp[14:])}, last = true}}",          # raw IPv4; the last call
    ]
    (tmp_path / "cases.lua").write_text("return {\n" + ",\n".join(cases) + "\n}\n")
    (tmp_path / "sp.lua").write_text(SET_PACKET_CASES)
    r = luaprobe("run", "--lua-input", "sp.lua", "--args", "cases.lua", "--out", "out", "--stats-json", "s.json",
                 cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    s = json.loads((tmp_path / "s.json").read_text())
    li = s["lua_input"]
    assert (li["step_calls"], li["step_errors"], li["frames"], li["clipped"]) == (7, 3, 4, 1), li
    assert li["ended"] == "end of input"
    assert s["packets"] == 4 and s["bytes"] == len(udp) * 2 + (len(big) - 1) + len(udp) - 14, s["bytes"]
    assert "sp.lua:12: set_packet: microseconds 1000000 is not one of 0..999999" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    db = sqlite3.connect(tmp_path / "out" / "luaprobe.sqlite")
    rows = list(db.execute("SELECT flowkey, packets_az, bytes_az FROM flows"))
    assert rows == [("11A:0A.00.00.01:p-03E8_0A.00.00.02:p-0035", 3, len(udp) * 2 + len(udp) - 14)], rows



@pytest.mark.parametrize("case, message", [
    ("{1700000001, 5, 147, 'abc'}", "set_packet: dlt 147 is not a link type luaprobe decodes (0, 1, 12, 14, 101, 108,"),
    ("{1700000001, 6, 1, ''}", "set_packet: bytes must be a non-empty string (got an empty string)"),
    ("{-1, 6, 1, 'abc'}", "set_packet: seconds -1 is not a Unix time in seconds (0..4294967295)"),
    ("{1700000001, 6, 1, {}}", "set_packet: bytes must be a non-empty string (got table)"),
    ("{1700000001, false, 1, 'abc'}", "set_packet: microseconds false is not one of 0..999999"),
], ids=["dlt", "empty", "seconds", "not-a-string", "usec-false"])
def test_set_packet_argument_errors_name_the_argument_and_line(tmp_path, case, message):
    """Each bad argument is one logged line with the script's file:line and what was wrong (exit 0: the record is
    skipped, as any step error)."""
    (tmp_path / "cases.lua").write_text("return {" + case + "}\n")
    (tmp_path / "sp.lua").write_text(SET_PACKET_CASES)
    r = luaprobe("run", "-q", "--lua-input", "sp.lua", "--args", "cases.lua", "--out", "out", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert f"sp.lua:12: {message}" in r.stderr and "Traceback" not in r.stderr, r.stderr


ENDLESS = r"""
local udp = string.char(0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 2, 0, 0, 0, 0, 1, 8, 0, 0x45, 0, 0, 0x20, 0, 1, 0, 0, 0x40,
                        0x11, 0, 0, 10, 0, 0, 1, 10, 0, 0, 2, 3, 0xe8, 0, 0x35, 0, 0x0c, 0, 0) .. "abcd"
local i = 0
TrisulPlugin = { id = { name = "endless" }, inputfilter = { step = function(packet, engine)
  i = i + 1
  packet:set_packet(1700000000 + math.floor(i / 50000), i % 1000000, 1, udp)
  if i == 200000 then io.open("going", "w"):close() end
  return true
end } }
"""


def test_a_stop_while_frames_come_accounts_for_every_frame(tmp_path):
    """SIGINT during an endless frame source: the run ends as a stopped run (exit 130) and every frame step gave is
    walked, those still in the ring at the stop too (as a live capture's: the run says what came was processed)."""
    (tmp_path / "endless.lua").write_text(ENDLESS)
    p = subprocess.Popen([sys.executable, "-m", "luaprobe.engine.daemon.cli", "run", "-q", "--lua-input", "endless.lua",
                          "--out", "out", "--stats-json", "s.json"], cwd=tmp_path, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)
    with helpers.killed_when_left(p):
        helpers.wait_for(lambda: (tmp_path / "going").exists() or p.poll() is not None, timeout=120)
        p.send_signal(signal.SIGINT)
        _out, err = helpers.finish(p, 120)
    assert p.returncode == 130, err
    s = json.loads((tmp_path / "s.json").read_text())
    li = s["lua_input"]
    assert li["ended"] == "stopped" and li["frames"] >= 200000 and li["frames"] == li["step_calls"], li
    assert li["frames"] == s["packets"] and s["not_walked_at_stop"] == 0, (li, s["packets"], s["not_walked_at_stop"])
    assert s["bytes"] == 46 * s["packets"]
    db = sqlite3.connect(tmp_path / "out" / "luaprobe.sqlite")
    assert list(db.execute("SELECT packets_az, bytes_az FROM flows")) == [(s["packets"], s["bytes"])]


# A per-packet counter in 1 s buckets, to compare the buckets of step's frames with a --pcap run's
PER_PACKET = r"""
local G = "{4A3F1C2B-0000-4000-8000-00000000C7C7}"
TrisulPlugin = {
  id = { name = "per packet" },
  countergroup = { control = { guid = G, name = "pp", bucketsize = 1 },
                   meters = { { 0, T.K.vartype.COUNTER, 10, "n", "n", "n" } } },
  simplecounter = { protocol_guid = "{974FB098-DE46-45db-94DA-8D64A3BBCDE5}",
    onpacket = function(engine, layer) engine:update_counter(G, "eth", 0, 1) end } }
"""


def test_frames_with_set_timestamp_count_in_their_own_seconds(tmp_path):
    """A reader that moves the engine's clock (set_timestamp) to each frame's time before set_packet: the round ends
    at the call that moved the clock to another second, and that second is ticked only after the round's frames
    are walked, so the frames of the second before are not late: buckets and late_packets as the --pcap run's."""
    from tests.test_flowmon import TUTORIAL
    (tmp_path / "reader.lua").write_text(READER.replace(
        "packet:set_packet(u32(1)", "packet:set_timestamp(u32(1), u32(5)); packet:set_packet(u32(1)"))
    (tmp_path / "pp.lua").write_text(PER_PACKET)
    runs = {}
    for name, src in (("lua", ["--lua-input", "reader.lua", "--args", TUTORIAL]), ("pcap", ["--pcap", TUTORIAL])):
        r = luaprobe("run", "pp.lua", *src, "--out", name, "--stats-json", f"{name}.json", cwd=tmp_path)
        assert r.returncode == 0, r.stderr
        db = sqlite3.connect(tmp_path / name / "luaprobe.sqlite")
        rows = db.execute("SELECT bucket_ts, key, value FROM counters WHERE group_guid LIKE '%C7C7%' ORDER BY 1, 2")
        s = json.loads((tmp_path / f"{name}.json").read_text())
        runs[name] = (list(rows), s["packets"], s["late_packets"])
    assert runs["lua"] == runs["pcap"] and runs["pcap"][2] == 0 and len(runs["pcap"][0]) > 10


FIFO_FRAMES = r"""
local udp = string.char(0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 2, 0, 0, 0, 0, 1, 8, 0, 0x45, 0, 0, 0x20, 0, 1, 0, 0, 0x40,
                        0x11, 0, 0, 10, 0, 0, 1, 10, 0, 0, 2)
TrisulPlugin = { id = { name = "fifo frames" },
  onload = function() f = io.open(T.args, "r") end,
  inputfilter = { step = function(packet, engine)
    local n = f:read("*n")            -- blocks until the test writes the next number (nil: the writer closed)
    if n == nil then return false end
    packet:set_packet(1700000000, 0, 1, udp .. string.char(math.floor(n / 256), n % 256, 0, 53, 0, 12, 0, 0) .. "abcd")
    return true
  end } }
"""

SEEN = r"""
TrisulPlugin = { id = { name = "seen" },
  simplecounter = { protocol_guid = "{14D7AB53-CC51-47e9-8814-9C06AAE60189}", onpacket = function(engine, layer)
    io.open("seen-" .. layer:rawbytes():hval_16(0), "w"):close()
  end } }
"""


def _fifo_run(tmp_path, script: str):
    """(the FIFO, the running `luaprobe run seen.lua --lua-input fifo.lua --args FIFO`): `script` (fifo.lua) reads
    the FIFO the test writes, SEEN (seen.lua) marks each frame its UDP hook sees with a file seen-SPORT."""
    fifo = tmp_path / "in.fifo"
    os.mkfifo(fifo)
    (tmp_path / "fifo.lua").write_text(script)
    (tmp_path / "seen.lua").write_text(SEEN)
    p = subprocess.Popen([sys.executable, "-m", "luaprobe.engine.daemon.cli", "run", "-q", "seen.lua", "--lua-input",
                          "fifo.lua", "--args", str(fifo), "--out", "out", "--stats-json", "s.json"], cwd=tmp_path,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)
    return fifo, p


def test_frames_from_a_waiting_step_are_walked_without_waiting_for_the_next(tmp_path):
    """A step that waits for its input (a FIFO) with every frame in the same second: each frame reaches the other
    plug-ins' hooks while step waits for the next one (rounds are one call until FAST_CALLS calls in a row came
    back at once), not when a later frame or the end of the input comes.  The test writes the next number only
    after the hook saw the last one, so a frame held back would stop the exchange (the wait fails, whatever the
    timing: the writes come one at a time).  The frame counts reconcile."""
    fifo, p = _fifo_run(tmp_path, FIFO_FRAMES)
    with helpers.killed_when_left(p):
        fd = helpers.fifo_writer(fifo, p)
        try:
            for n in (1000, 1001, 1002):
                os.write(fd, f"{n}\n".encode())
                helpers.wait_for(lambda n=n: (tmp_path / f"seen-{n}").exists() or p.poll() is not None, timeout=60,
                                 fail=False)
                assert (tmp_path / f"seen-{n}").exists(), \
                    f"frame {n} not walked while step waits for the next (exit {p.poll()})"
        finally:
            os.close(fd)
        _out, err = helpers.finish(p, 120)
    assert p.returncode == 0, err
    s = json.loads((tmp_path / "s.json").read_text())
    assert (s["lua_input"]["frames"], s["packets"], s["lua_input"]["ended"]) == (3, 3, "end of input")



FIFO_TIMED_FRAMES = FIFO_FRAMES.replace('local n = f:read("*n")', 'local n, t = f:read("*n", "*n")').replace(
    "packet:set_packet(1700000000, 0,", "packet:set_packet(t, 0,")


def test_a_pause_into_another_second_makes_rounds_one_call_again(tmp_path):
    """A FIFO read at full speed (a burst of 100 lines, rounds longer than one call), then a pause: the call that
    waited returns a frame of another second, which ends its round; it must also count as a call that waited, so
    the next rounds are one call each again.  Before, that break came first and the input stayed 'fast' for good:
    every later burst had all its frames but the first held until the next burst (UDP bursts of 5 frames 2 s
    apart: 4 of 5 walked 2 s late)."""
    fifo, p = _fifo_run(tmp_path, FIFO_TIMED_FRAMES)
    with helpers.killed_when_left(p):
        fd = helpers.fifo_writer(fifo, p)
        try:
            os.write(fd, "".join(f"{1000 + i} 1700000000\n" for i in range(100)).encode())   # one burst
            helpers.wait_for(lambda: (tmp_path / "seen-1050").exists() or p.poll() is not None, timeout=60,
                             fail=False)
            time.sleep(0.2)                                    # the burst's tail is held by the waiting call
            os.write(fd, b"1100 1700000001\n")                # another second: returns the waiting call
            os.write(fd, b"1101 1700000001\n")
            helpers.wait_for(lambda: (tmp_path / "seen-1101").exists() or p.poll() is not None, timeout=20,
                             fail=False)
            assert (tmp_path / "seen-1101").exists(), f"frame 1101 held while step waits (exit {p.poll()})"
        finally:
            os.close(fd)
        _out, err = helpers.finish(p, 120)
    assert p.returncode == 0, err
    s = json.loads((tmp_path / "s.json").read_text())
    assert (s["lua_input"]["frames"], s["packets"], s["not_walked_at_stop"]) == (102, 102, 0)


ARGS_AT_TOP = r"""
local dir, name = T.args:match("^(.*)/([^/]*)$")      -- T.args read at the top level, as lanlflow.lua's onload does
local frames, saved = { 1700000000.25, 1700000001.5 }, nil
TrisulPlugin = { id = { name = "top-level args" },
  onunload = function()
    local ok, err = pcall(saved.set_packet, saved, 1700000002, 0, 1, "abc")   -- a kept step packet, used later
    local f = io.open(dir .. "/unload.txt", "w")
    f:write(tostring(ok), "\t", tostring(err))
    f:close()
  end,
  inputfilter = { step = function(packet, engine)
    saved = packet
    local t = table.remove(frames, 1)
    if t == nil then return false end
    packet:set_packet(t, nil, 228, string.char(0x45, 0, 0, 24, 0, 1, 0, 0, 64, 17, 0, 0, 10, 0, 0, 1, 10, 0, 0, 2,
                                               0, 7, 0, 7))
    return true
  end } }
"""


def test_t_args_at_the_top_level_a_seconds_fraction_and_a_kept_packet(tmp_path):
    """T.args is the --args TEXT wherever the script's top level runs (the run's load and `luaprobe check`; before,
    the probe ran it once with T.args nil: exit 4, and dofile(T.args) read stdin); set_packet's seconds with a fraction
    and no microseconds give the microseconds, as set_timestamp; a step packet kept and used outside step is an
    error naming set_packet, not a frame silently dropped."""
    (tmp_path / "top.lua").write_text(ARGS_AT_TOP)
    r = luaprobe("run", "-q", "--lua-input", "top.lua", "--args", str(tmp_path / "x.txt"), "--out", "out",
                 "--stats-json", "s.json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    s = json.loads((tmp_path / "s.json").read_text())
    assert (s["lua_input"]["frames"], s["packets"]) == (2, 2)
    db = sqlite3.connect(tmp_path / "out" / "luaprobe.sqlite")
    assert list(db.execute("SELECT first_ts, last_ts, packets_az + packets_za FROM flows")) == \
        [(1700000000.25, 1700000001.5, 2)]
    ok, err = (tmp_path / "unload.txt").read_text().split("\t")
    assert ok == "false" and "set_packet: called outside inputfilter.step" in err, err
    r = luaprobe("check", "--lua-input", "top.lua", "--args", str(tmp_path / "x.txt"), cwd=tmp_path)
    assert r.returncode == 0 and "inputfilter (supported)" in r.stdout, r.stdout + r.stderr
    r = luaprobe("check", "--args", "x", "top.lua", cwd=tmp_path)
    assert r.returncode == 2 and "--args needs --lua-input" in r.stderr


def _waits_on_read(pid: int) -> bool:
    """The process's main thread is blocked in read(2) (/proc/PID/syscall: number 0 on x86-64, 63 on arm64)."""
    try:
        with open(f"/proc/{pid}/syscall") as f:
            first = f.read().split()[0]
    except (OSError, IndexError):
        return False
    return first in ("0", "63")


def test_a_burst_then_a_pause_holds_back_few_frames(tmp_path):
    """A burst of 200 frames in one write, then the input waits: while step waits in read(2) for more, every frame
    but those of its last round has been walked.  Rounds are one call for the first 64 quick calls, then 2, 4, 8,
    ... so the last round took fewer than half of the frames after those: at most (200 - 65) / 2 held.  Before (one
    round of up to 4 096 calls after 64 quick ones) 135 of the 200 were held until the next input."""
    fifo, p = _fifo_run(tmp_path, FIFO_FRAMES)
    with helpers.killed_when_left(p):
        fd = helpers.fifo_writer(fifo, p)
        try:
            helpers.wait_for(lambda: _waits_on_read(p.pid) or p.poll() is not None, timeout=60)
            os.write(fd, "".join(f"{1000 + i}\n" for i in range(200)).encode())
            # read all 200 lines and waiting again: what it walked is done (the walk runs between rounds)
            helpers.wait_for(lambda: ((tmp_path / "seen-1000").exists() and _waits_on_read(p.pid))
                             or p.poll() is not None, timeout=60)
            seen = sum((tmp_path / f"seen-{1000 + i}").exists() for i in range(200))
            assert 200 - seen <= (200 - 65) // 2, f"{200 - seen} of 200 frames held while step waits"
        finally:
            os.close(fd)
        _out, err = helpers.finish(p, 120)
    assert p.returncode == 0, err
    s = json.loads((tmp_path / "s.json").read_text())
    assert (s["lua_input"]["frames"], s["packets"]) == (200, 200)


FRAMES_AND_COUNTS = r"""
local udp = string.char(0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 2, 0, 0, 0, 0, 1, 8, 0, 0x45, 0, 0, 0x20, 0, 1, 0, 0, 0x40,
                        0x11, 0, 0, 10, 0, 0, 1, 10, 0, 0, 2, 3, 0xe8, 0, 0x35, 0, 0x0c, 0, 0) .. "abcd"
local times = dofile(T.args)
local i = 0
TrisulPlugin = { id = { name = "frames and counts" }, inputfilter = { step = function(packet, engine)
  i = i + 1
  if times[i] == nil then return false end
  packet:set_packet(times[i], 0, 1, udp)
  engine:update_counter("GUID", "frames", 0, 1)         -- no set_timestamp: at the frame's time
  return true
end } }
""".replace("GUID", GUID)


def test_engine_methods_after_set_packet_write_at_the_frames_time(tmp_path):
    """set_packet's time is the packet's time, as set_timestamp's: a counter step updates after it lands in the
    bucket of the frame's time (60 s buckets, times going forward with a few steps back), computed here from the
    times the test chose.  Before, with no set_timestamp, it counted at the wall clock's time."""
    rnd = random.Random(7)
    t, times = 1_700_000_000, []
    for _ in range(400):
        t += rnd.randint(0, 3)
        times.append(t - rnd.randint(0, 2) if rnd.random() < 0.1 else t)
    (tmp_path / "times.lua").write_text("return {" + ",".join(map(str, times)) + "}\n")
    (tmp_path / "fc.lua").write_text(FRAMES_AND_COUNTS)
    r = luaprobe("run", "-q", "--lua-input", "fc.lua", "--args", "times.lua", "--out", "out", "--stats-json", "s.json",
                 cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    want, high = {}, None
    for x in times:                       # a time behind the newest second counts in the newest second's bucket
        high = x if high is None or x > high else high
        b = high - high % 60
        want[b] = want.get(b, 0) + 1
    db = sqlite3.connect(tmp_path / "out" / "luaprobe.sqlite")
    got = dict(db.execute("SELECT bucket_ts, value FROM counters WHERE group_guid = ? AND key = 'frames'", (GUID,)))
    assert got == want
    s = json.loads((tmp_path / "s.json").read_text())
    assert (s["lua_input"]["frames"], s["packets"]) == (400, 400)
