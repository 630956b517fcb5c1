"""Oversized T.async requests (issue 13.2): every call fails at the call site with a Lua error naming the ring's
record limit, before any worker has started (a plug-in's first task) and for every file helper; the run goes on.

Independent truth: the limit follows from --ring-size alone (shm/ring.lua: a record, with its 8-byte header,
fits half the ring), so the test computes it from the flag, not from the engine.
"""
from __future__ import annotations

import json
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
