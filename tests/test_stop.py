"""A stop request on a file or --generate run (issue 13.1, 17.4): SIGINT / SIGTERM stop gracefully like a live run.

The plug-in holds the fast path inside a hook until the test has sent its signal (it waits for a "go" file the
test writes after signalling), so the signal always lands mid-run, whatever the machine's load.  Independent
truths: the capture file's packet count (Python's own pcap walk via the generator's counts), the SQLite file read
with the sqlite3 module, /dev/shm and the process table.
"""
from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys

import psutil
import pytest

from luaprobe.shm import segment
from tests import helpers

GUID = "{9A1B2C3D-4E5F-4A6B-8C7D-0E1F2A3B4C5D}"

PLUGIN = r"""
local dir = "%(dir)s"
local function touch(name, text)
  local f = assert(io.open(dir .. "/" .. name, "w")); f:write(text or ""); f:close()
end
local function mark(name)                     -- one line per plug-in instance (one per shard process)
  local f = assert(io.open(dir .. "/" .. name, "a")); f:write("x\n"); f:close()
end
local function exists(name)
  local f = io.open(dir .. "/" .. name); if f then f:close(); return true end; return false
end
local seen, results = 0, 0
TrisulPlugin = {
  id = { name = "stopper" },
  request_async_workers = 1,
  countergroup = {
    control = { guid = "%(guid)s", name = "stop test", bucketsize = 60 },
    meters = { { 0, T.K.vartype.COUNTER, 10, 0, "packets", "Packets", "pkts" } },
  },
  onload = function() touch("loaded") end,
  onunload = function() touch("unloaded", seen .. " " .. results) end,
  simplecounter = {
    protocol_guid = "{77E462AB-2E42-42ec-9A58-C1A6821D6B31}",   -- TCP
    onpacket = function(engine, layer)
      seen = seen + 1
      engine:update_counter("%(guid)s", "all", 0, 1)
      if seen %% 1000 == 0 then
        T.async:schedule { data = tostring(seen),
          onexecute = function(d) %(onexecute)s return d end,
          onresult = function(e, d, r) results = results + 1 end }
      end
      if seen == 5000 then
        mark("running")
        while not exists("go") do end         -- hold the fast path until the test has signalled
      end
    end,
  },
}
"""


def _plugin(tmp_path, onexecute=""):
    return helpers.write_plugin(tmp_path, PLUGIN % {"dir": str(tmp_path), "guid": GUID, "onexecute": onexecute},
                                name="stopper.lua")


def _start(tmp_path, *args):
    return subprocess.Popen([sys.executable, "-m", "luaprobe.engine.daemon.cli", "run", str(tmp_path / "stopper.lua"), *args,
                             "--out", str(tmp_path / "out"), "--json"], cwd=helpers.REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _tree(pid):
    try:
        return [pid] + [c.pid for c in psutil.Process(pid).children(recursive=True)]
    except psutil.Error:
        return [pid]


def _stop_and_check(tmp_path, p, sig, total_packets):
    helpers.wait_for(lambda: (tmp_path / "running").exists(), timeout=60)
    pids = _tree(p.pid)
    assert len(pids) >= 4                    # fast path, capture, store writer, a worker
    p.send_signal(sig)
    (tmp_path / "go").write_text("")
    out, err = p.communicate(timeout=60)
    assert p.returncode == 128 + sig, err
    assert "Traceback" not in err and "stopped early by " + signal.Signals(sig).name in err
    s = json.loads(out)                      # the summary is printed
    assert s["stopped_by"] == signal.Signals(sig).name
    assert 5000 <= s["packets"] < total_packets
    assert s["files_done"] == []             # the file was not read to its end
    seen, results = map(int, (tmp_path / "unloaded").read_text().split())   # onunload ran, after the drain
    a = s["plugins"][0]["async"] if s["plugins"][0]["async"]["scheduled"] else s["plugins"][1]["async"]
    assert a["scheduled"] == seen // 1000 == results == a["ok"] and a["pending"] == 0
    db = sqlite3.connect(f"file:{tmp_path / 'out' / 'luaprobe.sqlite'}?mode=ro", uri=True)
    total = db.execute("SELECT sum(value) FROM counters WHERE group_guid = ? AND key = 'all'", (GUID,)).fetchone()[0]
    assert total == seen                      # every counted packet's bucket flushed
    assert json.loads(db.execute("SELECT value FROM run WHERE key = 'stopped_by'").fetchone()[0]) == \
        signal.Signals(sig).name
    db.close()
    assert not [n for n in segment.list_segments() if segment.owner_pid(n) in pids]
    assert not [q for q in pids if psutil.pid_exists(q) and psutil.Process(q).status() != psutil.STATUS_ZOMBIE]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_file_run_stops_gracefully(tmp_path, sig):
    cap = tmp_path / "big.pcap"
    subprocess.run([sys.executable, "-m", "luaprobe.engine.daemon.cli", "gen", "--out", str(cap), "--packets", "300000",
                    "--flows", "500", "--mix", "tcp=100"], cwd=helpers.REPO, check=True, capture_output=True)
    _plugin(tmp_path)
    p = _start(tmp_path, "--pcap", str(cap))
    _stop_and_check(tmp_path, p, sig, 299_847)


def test_generate_run_stops_gracefully(tmp_path):
    _plugin(tmp_path)
    p = _start(tmp_path, "--generate", "packets=50000000,flows=500,mix=tcp=100,seed=3")
    _stop_and_check(tmp_path, p, signal.SIGTERM, 50_000_000)


@pytest.mark.parametrize("shards", ["1", "2"])
def test_second_signal_hard_stops(tmp_path, shards):
    """A task that would run 120 s and a drain deadline of 100 s: the second signal ends the run at once,
    with no process and no segment left behind (with shards too: the coordinator SIGKILLs them and unlinks
    the segments they owned)."""
    _plugin(tmp_path, onexecute='if d == "1000" then local t = os.time(); while os.time() - t < 120 do end end')
    p = _start(tmp_path, "--generate", "packets=50000000,flows=500,mix=tcp=100,seed=3", "--drain-deadline", "100",
               "--task-timeout", "200", "--shards", shards)
    # every shard holds a stuck task (its 1000th packet's) before the stop: a shard started late under load that
    # had not scheduled it drained at once and ran onunload before the second signal came ("unloaded" existed)
    running = tmp_path / "running"
    helpers.wait_for(lambda: running.exists() and len(running.read_text().splitlines()) >= int(shards), timeout=60)
    pids = _tree(p.pid)
    p.send_signal(signal.SIGINT)
    (tmp_path / "go").write_text("")
    err = ""
    for line in p.stderr:                     # the first signal is being handled: the run is draining
        err += line
        if "stop requested" in line:
            break
    p.send_signal(signal.SIGINT)
    out, rest = p.communicate(timeout=30)
    err += rest
    assert p.returncode == 1 and "stopped hard by a second signal" in err and "Traceback" not in err
    assert not (tmp_path / "unloaded").exists()
    assert not [n for n in segment.list_segments() if segment.owner_pid(n) in pids]
    helpers.wait_for(lambda: not [q for q in pids if psutil.pid_exists(q)
                                  and psutil.Process(q).status() != psutil.STATUS_ZOMBIE], timeout=5)


STUCK = r"""
local marker, n = "%s", 0
TrisulPlugin = { id = { name = "stuck" }, request_async_workers = 1,
  simplecounter = { protocol_guid = "{77E462AB-2E42-42ec-9A58-C1A6821D6B31}",
    onpacket = function(e, l)
      n = n + 1
      if n == 100 then T.async:schedule { data = "x", onexecute = function(d) return d end } end
      if n == 2000 then
        local f = io.open(marker, "w"); f:close()
        local x = 0
        while true do x = x + 1 end            -- compiled: no signal handler and no Lua error gets in
      end
    end } }
"""


def test_second_signal_stops_a_run_whose_hook_never_returns(tmp_path):
    """The Python signal handler cannot run while a compiled hook loops; the second Ctrl-C still ends the
    run within seconds, with nothing left running or in /dev/shm."""
    plug = helpers.write_plugin(tmp_path, STUCK % (tmp_path / "stuck"), name="stuck.lua")
    p = subprocess.Popen([sys.executable, "-m", "luaprobe.engine.daemon.cli", "run", plug, "--generate",
                          "packets=50000000,flows=100,mix=tcp=100,seed=2", "--out", str(tmp_path / "out"), "-q"],
                         cwd=helpers.REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    helpers.wait_for(lambda: (tmp_path / "stuck").exists(), timeout=60)
    pids = _tree(p.pid)
    assert len(pids) >= 4
    p.send_signal(signal.SIGINT)
    err = ""
    for line in p.stderr:                     # the run says it saw the signal but the hook is still running
        err += line
        if "send the signal again to stop hard" in line:
            break
    p.send_signal(signal.SIGINT)
    out, rest = p.communicate(timeout=30)
    err += rest
    assert p.returncode == 1 and "stopped hard by a second signal while a hook did not return" in err, err
    assert not [n for n in segment.list_segments() if segment.owner_pid(n) in pids]
    helpers.wait_for(lambda: not [q for q in pids if psutil.pid_exists(q)
                                  and psutil.Process(q).status() != psutil.STATUS_ZOMBIE], timeout=10)


SLOW_TASK = r"""
local n = 0
TrisulPlugin = { id = { name = "slow task" }, request_async_workers = 1,
  onunload = function() local f = assert(io.open("%(dir)s/unloaded." .. T.contextid, "w")); f:close() end,
  simplecounter = { protocol_guid = "{77E462AB-2E42-42ec-9A58-C1A6821D6B31}",   -- TCP
    onpacket = function(e, l)
      n = n + 1
      if n == 1 then T.async:schedule { data = "x", onexecute = function(d)
          local t = os.time(); while os.time() - t < 120 do end; return d end,
        onresult = function() end } end
    end } }
"""


@pytest.mark.parametrize("shards", ["1", "2"])
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_during_the_final_drain_is_named_and_exits_128_plus_sig(tmp_path, sig, shards):
    """A signal while the run waits for T.async results at the end of input (here a task that would run 120 s,
    --drain-deadline 100) ends the wait: exit 128+signal (it was 4, 'lost at the drain deadline', with the
    signal named nowhere), exit.reasons names the signal, the lost tasks are counted as lost_at_stop (the T.async
    identity holds), the whole input was processed, onunload ran, nothing is left running or in /dev/shm."""
    sample = os.path.join(helpers.REPO, "engine", "examples", "sample.pcap")
    helpers.write_plugin(tmp_path, SLOW_TASK % {"dir": str(tmp_path)}, name="slow.lua")
    p = subprocess.Popen([sys.executable, "-m", "luaprobe.engine.daemon.cli", "run", str(tmp_path / "slow.lua"),
                          "--pcap", sample, "--out", str(tmp_path / "out"), "--json", "--drain-deadline", "100",
                          "--task-timeout", "200", "--shards", shards], cwd=helpers.REPO,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    err = ""
    for line in p.stderr:                     # the run says it is waiting for the drain
        err += line
        if "end of input: waiting up to 100 s" in line:
            break
    pids = _tree(p.pid)
    p.send_signal(sig)
    out, rest = p.communicate(timeout=60)
    err += rest
    name = signal.Signals(sig).name
    assert p.returncode == 128 + sig, err
    assert "Traceback" not in err
    s = json.loads(out)
    assert s["exit"]["code"] == 128 + sig and s["stopped_by"] == name and s["stopped_during"] == "drain"
    assert len(s["exit"]["reasons"]) == 1 and f"stopped early by {name} during the T.async drain" in \
        s["exit"]["reasons"][0]
    assert f"luaprobe run: stopped early by {name} during the T.async drain" in err
    assert s["packets"] == helpers.pcap_records(sample) and s["files_done"] == [sample]
    a = [pl["async"] for pl in s["plugins"] if pl["async"]["scheduled"]]
    assert a and all(x["lost_at_stop"] == x["scheduled"] == x["timeout"] and x["lost_at_deadline"] == 0 for x in a)
    for x in a:
        helpers.assert_accounting(x)
    assert len(list(tmp_path.glob("unloaded.*"))) == int(shards)     # onunload ran in every shard
    assert s["elapsed_s"] < 60
    assert not [n for n in segment.list_segments() if segment.owner_pid(n) in pids]
    helpers.wait_for(lambda: not [q for q in pids if psutil.pid_exists(q)
                                  and psutil.Process(q).status() != psutil.STATUS_ZOMBIE], timeout=10)
