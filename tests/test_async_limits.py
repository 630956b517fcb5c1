"""Oversized T.async requests (issue 13.2): every call fails at the call site with a Lua error naming the ring's
record limit, before any worker has started (a plug-in's first task) and for every file helper; the run goes on.

Independent truth: the limit follows from --ring-size alone (shm/ring.lua: a record, with its 8-byte header,
fits half the ring), so the test computes it from the flag, not from the engine.
"""
from __future__ import annotations

import json
import re
import subprocess
import sys

from tests import helpers

RING = 8192
REQ = 32                      # workers/protocol.lua lp_req: 2 doubles + 4 uint32
LIMIT = RING // 2 - 8

PLUGIN = r"""
local out = "%(out)s"
local done = false
TrisulPlugin = {
  id = { name = "big" },
  simplecounter = {
    protocol_guid = "{974FB098-DE46-45db-94DA-8D64A3BBCDE5}",   -- Ethernet: every packet
    onpacket = function(engine, layer)
      if done then return end
      done = true
      local big = string.rep("x", %(n)d)
      local calls = {
        function() T.async:schedule { data = big, onexecute = function(d) return d end } end,
        function() T.async:copy(big, "/tmp/x") end,
        function() T.async:cat("/tmp/x", big) end,
        function() T.async:rm(big) end,
        function() T.async:copybuffer(big, "/tmp/x") end,
      }
      local f = assert(io.open(out, "w"))
      for _, c in ipairs(calls) do
        local ok, err = pcall(c)
        f:write(tostring(ok), "\t", tostring(err), "\n")
      end
      f:close()
      T.async:schedule { data = "small", onexecute = function(d) return d .. "!" end,
                         onresult = function(e, d, r) local g = io.open(out .. ".ok", "w"); g:write(r); g:close() end }
    end,
  },
}
"""


def test_oversized_requests_fail_at_the_call_site(tmp_path):
    out = tmp_path / "calls.txt"
    plugin = helpers.write_plugin(tmp_path, PLUGIN % {"out": out, "n": LIMIT - REQ + 1})
    r = subprocess.run([sys.executable, "-m", "luaprobe.engine.daemon.cli", "run", plugin, "--pcap", "engine/examples/sample.pcap",
                        "--ring-size", str(RING), "--out", str(tmp_path / "o"), "--json"], cwd=helpers.REPO,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    lines = out.read_text().splitlines()
    assert len(lines) == 5
    for line, name in zip(lines, ("schedule", "copy", "cat", "rm", "copybuffer")):
        ok, err = line.split("\t", 1)
        assert ok == "false"
        assert f"T.async:{name}:" in err and "record limit" in err and "--ring-size" in err, err
        assert "plugin.lua:" in err                   # the error points at the plug-in's own line
    assert (tmp_path / "calls.txt.ok").read_text() == "small!"
    s = json.loads(r.stdout)
    assert s["packets"] == 136
    a = next(p["async"] for p in s["plugins"] if p["async"]["scheduled"])
    assert a["scheduled"] == a["ok"] == 1 and a["error"] == 0


def test_largest_request_that_fits_runs(tmp_path):
    """The boundary: LIMIT - header bytes of data is accepted and runs (no off-by-one in either direction)."""
    out = tmp_path / "calls.txt"
    body = (PLUGIN % {"out": out, "n": LIMIT - REQ}).replace('local calls = {', 'local calls = {}; local _ = {')
    plugin = helpers.write_plugin(tmp_path, body.replace(
        'T.async:schedule { data = "small"', 'T.async:schedule { data = big'))
    r = subprocess.run([sys.executable, "-m", "luaprobe.engine.daemon.cli", "run", plugin, "--pcap", "engine/examples/sample.pcap",
                        "--ring-size", str(RING), "--out", str(tmp_path / "o"), "--json"], cwd=helpers.REPO,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "calls.txt.ok").read_text() == "x" * (LIMIT - REQ) + "!"


RES = 24                      # workers/protocol.lua lp_res: 2 doubles + 2 uint32

RESULT_PLUGIN = r"""
local out = "%(out)s"
local n = 0
TrisulPlugin = {
  id = { name = "big results" },
  simplecounter = {
    protocol_guid = "{974FB098-DE46-45db-94DA-8D64A3BBCDE5}",
    onpacket = function(engine, layer)
      n = n + 1
      if n > 4 then return end
      local sizes = { %(fits)d, %(over)d, %(over)d, 3 }   -- fits, too big (result), too big (error), small
      T.async:schedule { data = tostring(n) .. ":" .. sizes[n],
        onexecute = function(d)
          local k, size = d:match("^(%%d+):(%%d+)$")
          if k == "3" then error(string.rep("e", tonumber(size))) end
          return string.rep("r", tonumber(size))
        end,
        onresult = function(e, d, r) local f = io.open(out, "a"); f:write("OK ", d, " ", #r, "\n"); f:close() end,
        onerror = function(e, d, msg) local f = io.open(out, "a"); f:write("ERR ", d, " ", #msg, " ", (msg:sub(1, 300) .. " | " .. msg:sub(-90)):gsub("\n", " "), "\n"); f:close() end }
    end,
  },
}
"""


def test_oversized_results_are_task_errors_not_worker_deaths(tmp_path):
    """A result (or an error message) larger than the result ring's record limit: the task gets an error naming
    onexecute's line, the result's size and the limit (an error message is cut to its start instead), and the
    worker goes on: no Python traceback, no worker death or restart, the next task runs on the same worker. Before,
    the record raised in ring.reserve and ended the worker with a traceback on stderr ("worker died (exit status
    1)", then a restart). Truth: the limit from --ring-size alone (half the ring minus the record's 8-byte header,
    minus the 24-byte result header) and the sizes asked for; the largest result that fits comes back whole."""
    out = tmp_path / "results.txt"
    limit = LIMIT - RES
    plugin = helpers.write_plugin(tmp_path, RESULT_PLUGIN % {"out": out, "fits": limit, "over": limit + 1})
    r = subprocess.run([sys.executable, "-m", "luaprobe.engine.daemon.cli", "run", plugin, "--pcap",
                        "engine/examples/sample.pcap", "--ring-size", str(RING), "--workers", "1", "--out",
                        str(tmp_path / "o"), "--json"], cwd=helpers.REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr and "worker died" not in r.stderr and "restarting" not in r.stderr, r.stderr
    lines = sorted(out.read_text().splitlines())
    assert lines[0] == f"ERR 2:{limit + 1} " + lines[0].split(" ", 2)[2]
    msg = lines[0].split(" ", 3)[3]
    assert msg.startswith("onexecute (=") and "plugin.lua:" in msg and f"a result of {limit + 1} bytes" in msg \
        and f"record limit of {limit} bytes" in msg and "--ring-size" in msg, msg
    assert lines[1].startswith(f"ERR 3:{limit + 1} ") and "plugin.lua:" in lines[1] and "eeee" in lines[1], lines[1]
    assert int(lines[1].split(" ")[2]) <= limit, lines[1]                 # the message as cut fits the ring
    assert re.search(r"\.\.\. \(an error message of \d+ bytes, cut to fit the result ring\)$", lines[1]), lines[1]
    assert lines[2:] == [f"OK 1:{limit} {limit}", "OK 4:3 3"], lines
    s = json.loads(r.stdout)
    a = next(p["async"] for p in s["plugins"] if p["async"]["scheduled"])
    assert a["scheduled"] == 4 and a["ok"] == 2 and a["error"] == 2, a


UPVALUE_PLUGIN = r"""
local out = "%(out)s"
local done = false
local wide = {}
for i = 1, %(n)d do wide[i] = i end
TrisulPlugin = {
  id = { name = "big upvalue" },
  simplecounter = {
    protocol_guid = "{974FB098-DE46-45db-94DA-8D64A3BBCDE5}",
    onpacket = function(engine, layer)
      if done then return end
      done = true
      local ok, err = pcall(function()
        T.async:schedule { data = "d", onexecute = function(d) return tostring(#wide) end }
      end)
      local f = assert(io.open(out, "w")); f:write(tostring(ok), "\t", tostring(err), "\n"); f:close()
    end,
  },
}
"""


def test_upvalues_larger_than_a_record_are_named_at_the_call_site(tmp_path):
    """Found by a hostile pass (2026-12-02): an onexecute whose upvalue (a table of 300 000 numbers, shipped with the
    task: docs/async.md) does not fit a request record failed with "data of 1 bytes exceeds the request ring's record
    limit of -602903 bytes": the data blamed, a negative limit.  Now the error names the upvalues, their encoded size
    and the limit of the ring (LIMIT - REQ, from --ring-size alone)."""
    out = tmp_path / "call.txt"
    plugin = helpers.write_plugin(tmp_path, UPVALUE_PLUGIN % {"out": out, "n": 3000})
    r = subprocess.run([sys.executable, "-m", "luaprobe.engine.daemon.cli", "run", plugin, "--pcap",
                        "engine/examples/sample.pcap", "--ring-size", str(RING), "--out", str(tmp_path / "o")],
                       cwd=helpers.REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    ok, err = out.read_text().rstrip("\n").split("\t", 1)
    assert ok == "false"
    m = re.search(r"plugin\.lua:\d+: T\.async:schedule: onexecute's upvalues, (\d+) bytes encoded, exceed the request "
                  rf"ring's record limit of {LIMIT - REQ} bytes \(raise --ring-size, or build the values inside "
                  r"onexecute\)$", err)
    assert m and int(m.group(1)) > LIMIT - REQ, err
