"""A paced replay (`[source] speed`, `luaprobe run --speed X`, the capture process's --speed): packet time advances X
seconds per second of the monotonic clock, as tcpreplay's --multiplier does (engine/capture/capture.lua pace_due /
pace_wait, docs/operations.md "Paced replay").  Real processes throughout.  Truths: the capture file read by Python
(packets in order, bytes unchanged), the clock of the test process (a packet reaches a hook no earlier than its due
time, counted from before the run started: a lower bound that holds under any load; no upper bound is asserted), a
SIGTERM ending the run gracefully (exit 143, the capture process not killed at the stop deadline)."""
from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys
import time

import pytest

from tests import helpers, pktbuild
from tests.test_config_errors import BASE, start_refused
from tests.test_supervisor import daemon  # noqa: F401 - the fixture

SAMPLE = os.path.join(helpers.REPO, "engine", "examples", "sample.pcap")
ETHERNET = "{974FB098-DE46-45db-94DA-8D64A3BBCDE5}"

#: one line per packet: its time, the monotonic clock (s) when the hook ran, its whole frame in hex
PLUGIN = """local ffi = require("ffi")
pcall(ffi.cdef, "struct pace_ts { long s; long ns; }; int clock_gettime(int, struct pace_ts *);")
local ts = ffi.new("struct pace_ts")
TrisulPlugin = { id = { name = "paced" },
  simplecounter = { protocol_guid = "%s",
    onpacket = function(engine, layer)
      ffi.C.clock_gettime(1, ts)
      local sec, usec = layer:packet():timestamp()
      local s = layer:rawbytes():tostring()
      print(("PKT %%d %%d %%.6f %%s"):format(sec, usec, tonumber(ts.s) + tonumber(ts.ns) * 1e-9,
            (s:gsub(".", function(c) return ("%%02x"):format(c:byte()) end))))
    end } }
""" % ETHERNET


def read_pcap(path) -> list[tuple[int, int, str]]:
    """(seconds, microseconds, frame hex) of every record of a classic little-endian µs pcap file."""
    data = open(path, "rb").read()
    assert struct.unpack_from("<I", data)[0] == 0xA1B2C3D4
    out, off = [], 24
    while off < len(data):
        sec, usec, caplen, _wire = struct.unpack_from("<IIII", data, off)
        out.append((sec, usec, data[off + 16:off + 16 + caplen].hex()))
        off += 16 + caplen
    return out


def run(tmp_path, *args, stdin=None):
    plugin = helpers.write_plugin(tmp_path, PLUGIN)
    return subprocess.run([sys.executable, "-m", "luaprobe.engine.daemon.cli", "run", plugin, "--out",
                           str(tmp_path / "out"), "-q", *args], cwd=str(tmp_path), capture_output=True, text=True,
                          timeout=300, stdin=stdin)


def packets(stdout: str) -> list[tuple[int, int, float, str]]:
    rows = [ln.split("] ", 1)[1].split() for ln in stdout.splitlines() if "] PKT " in ln]
    return [(int(s), int(us), float(mono), frame) for _pkt, s, us, mono, frame in rows]


@pytest.mark.parametrize("source, speed", [("file", 4), ("stdin", 8), ("shards", 8)])
def test_paced_packets_arrive_unchanged_and_never_before_their_time(tmp_path, source, speed):
    """sample.pcap (136 packets over 6.38 s) at `--speed` 4 or 8: every packet reaches the hook with its time and
    bytes as Python reads them from the file (in file order: one fast path, from the file or standard input; with
    --shards 2 the same packets, each shard in file order), and no packet earlier than (its time - the first
    packet's time) / speed after the run was started (so the run takes at least 6.38 / speed s; at speed 0 it took
    ~0.5 s).  Before: no --speed (a usage error)."""
    want = read_pcap(SAMPLE)
    t0 = want[0][0] + want[0][1] / 1e6
    args = ["--speed", str(speed)] + (["--shards", "2"] if source == "shards" else [])
    start = time.monotonic()
    if source == "stdin":
        with open(SAMPLE, "rb") as f:
            r = run(tmp_path, "--pcap", "-", *args, stdin=f)
    else:
        r = run(tmp_path, "--pcap", SAMPLE, *args)
    assert r.returncode == 0, r.stderr
    got = packets(r.stdout)
    if source == "shards":
        assert sorted((s, us, fr) for s, us, _m, fr in got) == sorted(want)
    else:
        assert [(s, us, fr) for s, us, _m, fr in got] == want
    early = [(s, us, m - start) for s, us, m, _fr in got if m - start < (s + us / 1e6 - t0) / speed - 1e-3]
    assert not early, early[:5]
    assert max(m for *_x, m, _fr in got) - start >= (want[-1][0] + want[-1][1] / 1e6 - t0) / speed - 1e-3


def test_speed_zero_unchanged(tmp_path):
    """--speed 0 is the unpaced replay (every packet, in order, unchanged)."""
    r = run(tmp_path, "--pcap", SAMPLE, "--speed", "0")
    assert r.returncode == 0, r.stderr
    assert [(s, us, fr) for s, us, _m, fr in packets(r.stdout)] == read_pcap(SAMPLE)


WALK = """function(addr, size, fd, speed, skip)
  local ffi = require("ffi")
  local ring = require("luaprobe.shm.ring")
  local capture = require("luaprobe.engine.capture.capture")
  local cap = 4 * 1024 * 1024
  local buf = ffi.new("uint8_t[?]", ring.region_size(cap, false))
  local r = ring.format(buf, cap, false)
  capture.speed = speed
  local n, bytes, err, off, stopped, skipped = capture.file(r, addr, size, function() return false end, fd, true, skip)
  capture.speed = 0
  local recs = {}
  while true do
    local p, len = r:peek()
    if p == nil then break end
    local h = ffi.cast("const lp_pktrec *", p)
    recs[#recs + 1] = { h.ts_sec, h.ts_nsec, ffi.string(p + ffi.sizeof("lp_pktrec"), h.caplen) }
    r:advance(len)
  end
  r:release()
  return n, skipped, err, recs
end"""


def test_skip_with_speed():
    """capture.lua file() with `skip` (the capture process's --skip N: a daemon's fast path restarted over files reads
    on after the packets its predecessors walked) and speed 8, in this process: the records after the first 100,
    unchanged, paced from the first one pushed (the walk takes at least (last - packet 100's time) / 8 s)."""
    from luaprobe.engine.capture.pcapfile import open_capture
    from luaprobe.shm.luajit import new_runtime
    want = read_pcap(SAMPLE)
    lua = new_runtime(encoding=None)
    walk = lua.eval(WALK)
    with open_capture(SAMPLE) as c:
        start = time.monotonic()
        n, skipped, err, recs = walk(c.address, c.size, c.fd, 8, 100)
        took = time.monotonic() - start
    assert (n, skipped, err) == (len(want) - 100, 100, None)
    got = [(int(r[1]), int(r[2]) // 1000, bytes(r[3]).hex()) for r in recs.values()]
    assert got == want[100:]
    assert took >= ((want[-1][0] + want[-1][1] / 1e6) - (want[100][0] + want[100][1] / 1e6)) / 8 - 1e-3


def test_sigterm_during_a_long_pacing_wait(tmp_path):
    """Two packets 1000 s apart at --speed 1: after the first reached the hook, the capture process waits ~1000 s for
    the second; SIGTERM to the run ends it gracefully (exit 143, the first packet's results written) because the wait
    looks at the stop in slices of 50 ms.  Had it not, the fast path would have killed the capture at its stop
    deadline (`capture process ended unexpectedly`)."""
    frames = [pktbuild.ether(pktbuild.ipv4("192.0.2.1", "192.0.2.2", 17,
                                            pktbuild.udp("192.0.2.1", "192.0.2.2", 4000, 53, b"x" * i)))
              for i in (1, 2)]
    cap = tmp_path / "two.pcap"
    pktbuild.write_pcap(cap, [(1000.0, frames[0]), (2000.0, frames[1])])
    mark = tmp_path / "first"
    plugin = helpers.write_plugin(tmp_path, f"""TrisulPlugin = {{ id = {{ name = "first" }},
  simplecounter = {{ protocol_guid = "{ETHERNET}",
    onpacket = function(engine, layer) local f = io.open("{mark}", "w"); f:write("1"); f:close() end }} }}
""")
    p = subprocess.Popen([sys.executable, "-m", "luaprobe.engine.daemon.cli", "run", plugin, "--pcap", str(cap),
                          "--speed", "1", "--out", str(tmp_path / "out"), "-q", "--json"], cwd=str(tmp_path),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    with helpers.killed_when_left(p):
        helpers.wait_for(lambda: mark.exists(), 120, 0.05)
        p.send_signal(signal.SIGTERM)
        out, err = p.communicate(timeout=120)
    assert p.returncode == 143, err
    assert "ended unexpectedly" not in err and "killed" not in err, err
    assert json.loads(out)["packets"] == 1


@pytest.mark.parametrize("text, line, why", [
    ("speed = -1", 6, "[source] speed = -1: must be a number between 0 and 1000000"),
    ("speed = 2000000", 6, "[source] speed = 2000000: must be a number between 0 and 1000000"),
    ("speed = nan", 6, "[source] speed = nan: must be a number between 0 and 1000000"),
    ('speed = "fast"', 6, '[source] speed = "fast": must be a number between 0 and 1000000'),
    ("speed = true", 6, "[source] speed = true: must be a number between 0 and 1000000"),
])
def test_config_speed_errors(tmp_path, text, line, why):
    """A bad [source] speed: one line naming the file, the line and the valid range, exit 2, nothing started."""
    body = BASE.replace("[source]\n", "[source]\n").replace("\n[plugins]", f"\n{text}\n[plugins]")
    assert start_refused(tmp_path, body) == f"luaprobe start: {tmp_path / 'c.toml'}:{line}: {why}"


def test_config_speed_with_an_interface(tmp_path):
    """speed paces files; a live interface comes at its own pace: refused like loop."""
    body = BASE.replace(f"pcap = [{json.dumps(SAMPLE)}]", 'interface = "lo"\nspeed = 10')
    assert start_refused(tmp_path, body) == \
        f"luaprobe start: {tmp_path / 'c.toml'}:6: [source] speed = 10: only valid with pcap"


@pytest.mark.parametrize("args, err", [
    (["--pcap", SAMPLE, "--speed", "-1"], "argument --speed: -1 is out of range: must be >= 0 and <= 1000000"),
    (["--pcap", SAMPLE, "--speed", "x"], "argument --speed: 'x' is not a number"),
    (["--generate", "packets=10", "--speed", "2"], "--speed needs --pcap"),
])
def test_run_speed_usage_errors(tmp_path, args, err):
    r = run(tmp_path, *args)
    assert r.returncode == 2 and len(r.stderr.splitlines()) == 1 and err in r.stderr, r.stderr


def test_paced_loop_goes_on_across_passes_and_quiet_is_no_stall(daemon, tmp_path):
    """`loop = true`, `speed = 1`, `stall_timeout = 1` over three packets at 1000.0, 1000.01 and 1002.0 s: the looped
    passes are paced too (pass 2 is shifted to 1003.0 .. 1005.0, capture.lua next_pass, and its first packet is not
    pushed before 3 s after the first; the fourth packet counted by the daemon comes no earlier), and the capture's
    2 s waits with an empty ring are not a stuck file source for the stall rule (the paced source is a quiet one, like
    an interface): no restart.  Before: the stall rule killed the fast path after 1 s without packets."""
    frames = [pktbuild.ether(pktbuild.ipv4("192.0.2.1", "192.0.2.2", 17,
                                            pktbuild.udp("192.0.2.1", "192.0.2.2", 4000, 53, b"x" * i)))
              for i in (1, 2, 3)]
    cap = tmp_path / "three.pcap"
    pktbuild.write_pcap(cap, [(1000.0, frames[0]), (1000.01, frames[1]), (1002.0, frames[2])])
    start = time.monotonic()
    daemon.start(pcap=[cap], speed=1, supervise="stop_deadline = 15\nstall_timeout = 1")
    daemon.wait_packets(4, timeout=120)
    assert time.monotonic() - start >= 3.0
    st = daemon.status()
    assert st["restarts"] == 0 and st["state"] == "running", st
    assert "(loop, speed 1)" in st["source"], st
    assert daemon.cli("stop").returncode == 0
    assert not daemon.alive() and not daemon.segments()
