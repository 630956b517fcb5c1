"""A hook cut by the hook budget on BUDGET_STRIKES (3) calls in a row disables its instance, as the memory limit does
(docs/operations.md "Faults"); a hook that only sometimes runs past the budget is not disabled.  Before, an endless
loop in onpacket held `luaprobe run` for budget x packets (1043 packets at --hook-budget 2: 35 min).

Truth: tshark's TCP packet count of the capture (the counting plug-in must have seen every one of them), the flow
count of a run without the looping plug-ins, and the plug-in files themselves (the line of the loop, by marker)."""
from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys

import pytest

from tests import helpers

PCAP = os.path.join(helpers.PCAPS, "trisul-tutorial.pcap")
TCP = "{77E462AB-2E42-42ec-9A58-C1A6821D6B31}"
GUID = "{6B1D2C3A-4E5F-4A7B-8C9D-0E1F2A3B4C7E}"
BUDGET = 0.2

# the breaker's plug-in: an endless loop on every packet.  debug.getinfo keeps the loop in the interpreter, where the
# budget's interrupt lands (without it LuaJIT compiles the loop now and then, ~1 call in 300 here, and the run then
# ends hard 2 s past the budget, exit 4: "still runs in code the interrupt cannot reach", tests/test_watchdog.py)
LOOP = """TrisulPlugin = { id = { name = "loop" },
  simplecounter = { protocol_guid = "%s",
    onpacket = function(engine, layer)
      local n = 0
      while true do n = n + #tostring(n); debug.getinfo(1) end   -- LOOP
    end } }
""" % TCP

# loops on TCP packets 2, 3, 6, 7, 10, 11 of its own count (two in a row, never three): cut 6 times, not disabled;
# counts the packets whose call returned
SOMETIMES = """TrisulPlugin = { id = { name = "sometimes" },
  countergroup = { control = { guid = "%(g)s", name = "sometimes", bucketsize = 3600 },
                   meters = { { 0, T.K.vartype.COUNTER, 10, "packets", "Packets", "pkts" } } },
  simplecounter = { protocol_guid = "%(t)s",
    onpacket = function(engine, layer)
      seen = (seen or 0) + 1
      if seen <= 11 and seen %% 4 >= 2 then local n = 0; while true do n = n + #tostring(n); debug.getinfo(1) end end
      engine:update_counter("%(g)s", "returned", 0, 1)
    end } }
""" % {"g": GUID, "t": TCP}

# counts every TCP packet
COUNT = """TrisulPlugin = { id = { name = "count" },
  countergroup = { control = { guid = "%(g)s", name = "count", bucketsize = 3600 },
                   meters = { { 0, T.K.vartype.COUNTER, 10, "packets", "Packets", "pkts" } } },
  simplecounter = { protocol_guid = "%(t)s",
    onpacket = function(engine, layer) engine:update_counter("%(g)s", "tcp", 0, 1) end } }
""" % {"g": GUID, "t": TCP}


def _run(tmp_path, name, plugins):
    out = tmp_path / name
    r = subprocess.run([sys.executable, "-m", "luaprobe.engine", "run", *plugins, "--pcap", PCAP, "--out", str(out),
                        "--hook-budget", str(BUDGET), "--json"], capture_output=True, text=True, timeout=100)
    db = sqlite3.connect(out / "luaprobe.sqlite")
    try:
        counts = dict(db.execute("SELECT key, sum(value) FROM counters WHERE group_guid = ? GROUP BY key", (GUID,)))
        (flows,) = db.execute("SELECT count(*) FROM flows").fetchone()
    finally:
        db.close()
    return r, counts, flows


@pytest.mark.timeout(200)
def test_a_hook_cut_three_calls_in_a_row_is_disabled_and_the_run_goes_on(tmp_path):
    loop, sometimes, count = tmp_path / "loop.lua", tmp_path / "sometimes.lua", tmp_path / "count.lua"
    loop.write_text(LOOP)
    sometimes.write_text(SOMETIMES)
    count.write_text(COUNT)
    tcp = len(subprocess.run(["tshark", "-r", PCAP, "-Y", "tcp", "-T", "fields", "-e", "frame.number"],
                             capture_output=True, text=True, check=True).stdout.split())
    assert tcp > 100
    r, counts, flows = _run(tmp_path, "out", [str(loop), str(sometimes), str(count)])
    assert r.returncode == 4 and r.stdout, r.stderr[-3000:]          # a plug-in problem (docs/operations.md)
    summary = json.loads(r.stdout)
    by = {os.path.basename(p["plugin"]): p for p in summary["plugins"] if p["type"] == "simplecounter"}

    line = LOOP.splitlines().index(next(x for x in LOOP.splitlines() if "-- LOOP" in x)) + 1
    lp = by["loop.lua"]
    assert lp["hook_calls"] == {"simplecounter.onpacket": 3}          # exactly BUDGET_STRIKES calls, then disabled
    assert lp["hook_errors"] == {"simplecounter.onpacket": 3, "hook_budget": 3}
    want = (f"3 calls in a row of simplecounter.onpacket cut by the hook budget of {BUDGET:g} s (--hook-budget), "
            f"the last at {loop}:{line}; instance disabled")
    assert lp["disabled"] and lp["disabled"].endswith(want), lp["disabled"]
    assert lp["batches_skipped"] > 0
    disabled_lines = [x for x in r.stderr.splitlines() if want in x and "ERROR" in x]
    assert len(disabled_lines) == 1, r.stderr[-3000:]
    assert any(want in x for x in summary["exit"]["reasons"])

    sp = by["sometimes.lua"]                                         # cut 6 times, never 3 in a row: still called
    assert sp["disabled"] is None
    assert sp["hook_calls"] == {"simplecounter.onpacket": tcp}
    assert sp["hook_errors"] == {"simplecounter.onpacket": 6, "hook_budget": 6}
    assert counts["returned"] == tcp - 6

    cp = by["count.lua"]
    assert cp["disabled"] is None and cp["hook_errors"] == {}
    assert counts["tcp"] == tcp                                      # the counting plug-in saw every TCP packet

    _, base_counts, base_flows = _run(tmp_path, "base", [str(count)])
    assert base_counts["tcp"] == tcp and flows == base_flows         # flows as in a run without the loops


# a single-call hook (Host:call, not a batch walk): engine_monitor.onmetronome, once a second of capture time
METRO = """TrisulPlugin = { id = { name = "metro" },
  engine_monitor = {
    onmetronome = function(engine, ts, tick)
      local n = 0
      while true do n = n + #tostring(n); debug.getinfo(1) end   -- LOOP
    end } }
"""


@pytest.mark.timeout(200)
def test_a_single_call_hook_cut_three_times_in_a_row_is_disabled(tmp_path):
    metro, count = tmp_path / "metro.lua", tmp_path / "count.lua"
    metro.write_text(METRO)
    count.write_text(COUNT)
    pcap = os.path.join(helpers.PCAPS, "trisul-16minutes.pcap")      # ~16 min of capture: ~960 metronome ticks
    tcp = len(subprocess.run(["tshark", "-r", pcap, "-Y", "tcp", "-T", "fields", "-e", "frame.number"],
                             capture_output=True, text=True, check=True).stdout.split())
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "luaprobe.engine", "run", str(metro), str(count), "--pcap", pcap,
                        "--out", str(out), "--hook-budget", str(BUDGET), "--json"], capture_output=True, text=True,
                       timeout=100)
    assert r.returncode == 4 and r.stdout, r.stderr[-3000:]
    summary = json.loads(r.stdout)
    line = METRO.splitlines().index(next(x for x in METRO.splitlines() if "-- LOOP" in x)) + 1
    monitors = [p for p in summary["plugins"] if p["type"] == "engine_monitor"]
    assert monitors
    for p in monitors:                                               # every backend instance, each on its own
        assert p["hook_calls"] == {"engine_monitor.onmetronome": 3}
        assert p["hook_errors"] == {"engine_monitor.onmetronome": 3, "hook_budget": 3}
        want = (f"metro.lua [engine_monitor#{p['instance']}]: 3 calls in a row of engine_monitor.onmetronome cut by "
                f"the hook budget of {BUDGET:g} s (--hook-budget), the last at {metro}:{line}; instance disabled")
        assert p["disabled"] == want
        assert sum(want in x for x in r.stderr.splitlines()) == 1, r.stderr[-3000:]
    sc = next(p for p in summary["plugins"] if p["type"] == "simplecounter")
    assert sc["hook_calls"] == {"simplecounter.onpacket": tcp}
    db = sqlite3.connect(out / "luaprobe.sqlite")
    try:
        (n,) = db.execute("SELECT sum(value) FROM counters WHERE group_guid = ? AND key = 'tcp'", (GUID,)).fetchone()
    finally:
        db.close()
    assert n == tcp


# logs a line at the 10th metronome tick: a later moment of the run than the stuck plug-in's third cut call (tick 3)
TICKER = """TrisulPlugin = { id = { name = "ticker" },
  engine_monitor = {
    onmetronome = function(engine, ts, tick)
      if tick == 10 then T.logwarning("TICKER tick 10") end
    end } }
"""


@pytest.mark.timeout(200)
def test_a_single_call_hook_is_named_disabled_when_its_third_cut_call_returns(tmp_path):
    """The disable happens on the cut call's own return path (Host:call -> on_disable -> FastPath._disable), not when
    the run collects its hook counts at the end: its ERROR line comes before a line another plug-in logs 7 ticks
    later, and every later tick still reaches the other plug-in (the order of lines in one stream, stderr)."""
    metro, ticker = tmp_path / "metro.lua", tmp_path / "ticker.lua"
    metro.write_text(METRO)
    ticker.write_text(TICKER)
    pcap = os.path.join(helpers.PCAPS, "trisul-16minutes.pcap")
    r = subprocess.run([sys.executable, "-m", "luaprobe.engine", "run", str(metro), str(ticker), "--pcap", pcap,
                        "--out", str(tmp_path / "out"), "--hook-budget", str(BUDGET), "--json"],
                       capture_output=True, text=True, timeout=100)
    assert r.returncode == 4 and r.stdout, r.stderr[-3000:]
    lines = r.stderr.splitlines()
    disabled = [i for i, x in enumerate(lines) if "engine_monitor.onmetronome cut by the hook budget" in x
                and "instance disabled" in x and "ERROR" in x]
    ticks = [i for i, x in enumerate(lines) if "TICKER tick 10" in x]
    monitors = [p for p in json.loads(r.stdout)["plugins"] if os.path.basename(p["plugin"]) == "metro.lua"]
    assert len(disabled) == len(monitors) >= 1 and len(ticks) == len(monitors), r.stderr[-3000:]
    assert max(disabled) < min(ticks), r.stderr[-3000:]


@pytest.mark.timeout(200)
def test_the_text_summary_says_how_many_errors_were_cut_calls(tmp_path):
    """The plain summary line of a plug-in whose hook errors were budget interrupts says so (before: `errors 3` and
    no word why; the reason was only in --json's hook_errors["hook_budget"]).  Truth: the plug-in files (the loop
    cuts every call, `sometimes` cuts 6 and returns on the others)."""
    loop, sometimes = tmp_path / "loop.lua", tmp_path / "sometimes.lua"
    loop.write_text(LOOP)
    sometimes.write_text(SOMETIMES)
    r = subprocess.run([sys.executable, "-m", "luaprobe.engine", "run", str(loop), str(sometimes), "--pcap", PCAP,
                        "--out", str(tmp_path / "out"), "--hook-budget", str(BUDGET)],
                       capture_output=True, text=True, timeout=100, stdin=subprocess.DEVNULL)
    assert r.returncode == 4, r.stderr[-3000:]
    rows = {x.split(" [")[0]: x for x in r.stdout.splitlines() if " hook calls " in x}
    assert " errors 3 (3 of them cut by the hook budget (--hook-budget))" in rows["loop.lua"], r.stdout
    assert " errors 6 (6 of them cut by the hook budget (--hook-budget))" in rows["sometimes.lua"], r.stdout
