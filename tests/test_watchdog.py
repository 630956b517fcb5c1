"""The hook budget (issue 13.3): a hook stuck in a loop is interrupted with a Lua error naming the plug-in, the
hook and the budget, counted, and the run goes on.  Truth for "goes on": tshark's TCP packet count."""
from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys

import psutil
import pytest

from tests import helpers

SAMPLE = os.path.join(helpers.REPO, "engine", "examples", "sample.pcap")
GUID = "{1D2C3B4A-5E6F-4A7B-8C9D-0E1F2A3B4C5D}"

STUCK = """
TrisulPlugin = { id = { name = "stuck" },
  countergroup = { control = { guid = "%(g)s", name = "seen", bucketsize = 3600 },
                   meters = { { 0, T.K.vartype.COUNTER, 10, "packets", "Packets", "pkts" } } },
  engine_monitor = {
    onmetronome = function(engine, ts, tick)
      if not stuck_backend then stuck_backend = true; while true do debug.getinfo(1) end end
    end },
  simplecounter = { protocol_guid = "{77E462AB-2E42-42ec-9A58-C1A6821D6B31}",
    onpacket = function(engine, layer)
      if not stuck then
        stuck = true
        while true do debug.getinfo(1) end        -- never returns; debug.getinfo keeps it in the interpreter
      end
      engine:update_counter("%(g)s", "tcp", 0, 1)
    end } }
""" % {"g": GUID}

# the same hook creating a closure per call: called through the walker's stitch point (a C function's
# lua_pcall, engine/plugins/_lpwatch.c), where the interruption must be caught and counted alike
STUCK_CLOSURE = STUCK.replace("      engine:update_counter(", "      local f = function() return layer end\n"
                                                           "      engine:update_counter(")


@pytest.mark.parametrize("src,walk", [(STUCK, "inline"), (STUCK_CLOSURE, "stitched")], ids=["inline", "stitched"])
def test_stuck_hooks_are_interrupted_and_the_run_goes_on(tmp_path, src, walk):
    plug = tmp_path / "stuck.lua"
    plug.write_text(src)
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "luaprobe.engine", "run", str(plug), "--pcap", SAMPLE, "--out", str(out),
                        "--hook-budget", "0.5", "--json"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    sc = next(p for p in summary["plugins"] if p["type"] == "simplecounter")
    assert sc["walk"] == walk
    assert sc["hook_errors"] == {"simplecounter.onpacket": 1, "hook_budget": 1}
    backend = [p for p in summary["plugins"] if p["type"] == "engine_monitor"]
    assert backend and all(p["hook_errors"] == {"engine_monitor.onmetronome": 1, "hook_budget": 1} for p in backend)
    assert "simplecounter.onpacket error" in r.stderr and "stuck.lua [simplecounter#" in r.stderr
    assert "hook budget of 0.5 s" in r.stderr
    tcp = subprocess.run(["tshark", "-r", SAMPLE, "-Y", "tcp", "-T", "fields", "-e", "frame.number"],
                         capture_output=True, text=True, check=True).stdout.split()
    db = sqlite3.connect(out / "luaprobe.sqlite")
    try:
        (n,) = db.execute("SELECT sum(value) FROM counters WHERE group_guid = ?", (GUID,)).fetchone()
    finally:
        db.close()
    assert n == len(tcp) - 1                          # every packet after the stuck one was counted


def test_budget_zero_turns_the_watchdog_off(tmp_path):
    plug = tmp_path / "slow.lua"
    plug.write_text("""TrisulPlugin = { id = { name = "slow" }, simplecounter = {
        protocol_guid = "{77E462AB-2E42-42ec-9A58-C1A6821D6B31}",
        onpacket = function(engine, layer)
          if not done then done = true; local t = os.clock(); while os.clock() - t < 0.3 do debug.getinfo(1) end end
        end } }""")
    r = subprocess.run([sys.executable, "-m", "luaprobe.engine", "run", str(plug), "--pcap", SAMPLE, "--out",
                        str(tmp_path / "out"), "--hook-budget", "0", "--json"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    sc = next(p for p in json.loads(r.stdout)["plugins"] if p["type"] == "simplecounter")
    assert sc["hook_errors"] == {}


COMPILED = """
TrisulPlugin = { id = { name = "compiled" },
  simplecounter = { protocol_guid = "{77E462AB-2E42-42ec-9A58-C1A6821D6B31}",
    onpacket = function(engine, layer) %s end } }
"""


@pytest.mark.parametrize("body", ["while true do end",                                 # an empty compiled loop
                                  "local x = 0 while true do x = x + math.floor(1.5) end",  # a fast function, inlined
                                  "local s = '' while true do s = s .. 'x' if #s > 64 then s = '' end end"],
                         ids=["empty", "fastfunc", "strings"])
def test_compiled_endless_loop_ends_the_run_as_a_plugin_error(tmp_path, body):
    """A loop LuaJIT compiled into a trace never reaches the interrupt: `run` must not spin forever (it did, for
    11 minutes with --hook-budget 1).  Truth: the documented code 4, one line naming the plug-in and the budget,
    no process and no /dev/shm segment of the run left; it ends within the budget + 2 s grace (+ load time)."""
    plug = tmp_path / "compiled.lua"
    plug.write_text(COMPILED % body)
    p = subprocess.Popen([sys.executable, "-m", "luaprobe.engine", "run", str(plug), "--pcap", SAMPLE,
                          "--out", str(tmp_path / "out"), "--hook-budget", "0.5"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    helpers.wait_for(lambda: psutil.Process(p.pid).children(recursive=True), timeout=60)
    kids = psutil.Process(p.pid).children(recursive=True)
    _out, err = helpers.finish(p, 90)
    assert p.returncode == 4, err
    lines = [ln for ln in err.splitlines() if ln.startswith("luaprobe run:")]
    assert len(lines) == 1, err
    assert "compiled.lua [simplecounter#" in lines[0] and "hook budget of 0.5 s" in lines[0]
    assert "Traceback" not in err
    assert not psutil.wait_procs(kids, timeout=10)[1]
    assert not helpers.our_segments([p.pid])


OUTER_ALARM = """
import signal, sys, time
from luaprobe.engine.daemon.cli import main
fired = []
signal.signal(signal.SIGALRM, lambda s, f: fired.append(time.monotonic()))
t0 = time.monotonic()
signal.setitimer(signal.ITIMER_REAL, %(x)r)
rc = main(sys.argv[1:])
ran = time.monotonic() - t0
left = signal.getitimer(signal.ITIMER_REAL)[0]
while not fired and time.monotonic() < t0 + %(x)r + 5:
    time.sleep(0.05)                              # the alarm's handler interrupts the sleep
print(rc, ran, left, fired[0] - t0 if fired else -1)
"""


def test_an_outer_alarm_survives_the_runs_watchdog(tmp_path):
    """An embedding application's (or pytest-timeout's) ITIMER_REAL alarm, armed before an in-process run, still
    fires at its time, into its own SIGALRM handler, after the run's hooks armed and disarmed the budget many
    times (the watchdog's disarm used to cancel it: setitimer(ITIMER_REAL, 0), and its arm took SIGALRM).
    Truth: the kernel's remaining time of the alarm (getitimer) and the moment the Python handler ran."""
    x = 8.0
    r = subprocess.run([sys.executable, "-c", OUTER_ALARM % {"x": x}, "run", os.path.dirname(SAMPLE), "--pcap",
                        SAMPLE, "--out", str(tmp_path / "out"), "-q", "--hook-budget", "5"],
                       capture_output=True, text=True, timeout=120)
    rc, ran, left, fired = r.stdout.split()[-4:]
    assert rc == "0", r.stderr
    if float(ran) < x:                            # the usual case: the run ended before the alarm's time
        assert 0 < float(left) <= x - float(ran) + 0.01
    assert x - 0.01 <= float(fired) < x + 1.0     # fired, at its time (+ the handler's scheduling)


def test_a_shorter_budget_after_a_longer_one_is_kept(tmp_path):
    """The watchdog's timer runs on across disarm / arm (no syscall per hook call or batch); a budget shorter than
    the running timer's (another in-process run's --hook-budget) must still end the hook at its own time.
    Truth: the monotonic clock around the interrupted loop, against the 30 s budget armed first."""
    import time
    from luaprobe.shm.luajit import new_runtime
    lua = new_runtime()
    f = lua.execute("""
    local wd = require("luaprobe.engine.plugins.watchdog")
    local loop = load("return function() while true do debug.getinfo(1) end end", "@/plug-in/stuck.lua")()
    return function()
      wd.arm(30, "long", "/no/such/root/"); wd.disarm()
      wd.arm(0.3, "short budget", "/no/such/root/")
      local ok, err = pcall(loop)
      return ok, tostring(err), wd.disarm()
    end""")
    t0 = time.monotonic()
    ok, err, fired = f()
    took = time.monotonic() - t0
    err = err.decode() if isinstance(err, bytes) else err
    assert not ok and "short budget" in err and fired == 1
    assert 0.25 <= took < 10, took
