"""T.async latency figures after tasks were lost at the drain deadline (engine/plugins/async.lua complete,
docs/async.md "Accounting"): they describe only the tasks that completed in a worker, latency_samples equals
ok + nil_result, and p50/p99 agree with schedule -> onresult times the plug-in measures itself on the same
monotonic clock.  The real CLI, a real worker and the real deadline."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys

from tests import helpers

PCAP = os.path.join(helpers.PCAPS, "http-website-keepalive.pcap")

PLUGIN = r'''
local ffi = require "ffi"
pcall(ffi.cdef, "typedef struct { long tv_sec; long tv_nsec; } lat_ts; int clock_gettime(int, lat_ts *);")
local ts = ffi.new("lat_ts")
local function now_ns() ffi.C.clock_gettime(1, ts); return tonumber(ts.tv_sec) * 1e9 + tonumber(ts.tv_nsec) end
TrisulPlugin = { id = { name = "slow" },
  onload = function() F = io.open(LATFILE, "w") end,
  simplecounter = { protocol_guid = "{0A2C724B-5B9F-4BA6-9C97-B05080558574}",
    onpacket = function(engine, layer)
      T.async:schedule { data = string.format("%.0f", now_ns()),
        onexecute = function(d)
          local ffi = require "ffi"
          pcall(ffi.cdef, "int poll(void *, unsigned long, int);")
          ffi.C.poll(nil, 0, 20)                       -- 20 ms per task
          return d
        end,
        onresult = function(engine, d, r) F:write(string.format("%.0f\n", now_ns() - tonumber(d))) end }
    end },
  onunload = function() F:close() end }
'''


def quantile(xs, p):
    """The sample at rank ceil(p * n) (async.lua's percentile rule: first bucket whose cumulative count >= p*n)."""
    xs = sorted(xs)
    return xs[max(0, math.ceil(p * len(xs)) - 1)]


def test_latency_only_from_completed_tasks_after_a_deadline_loss(tmp_path):
    lat_file = str(tmp_path / "lat.txt")
    plugin = helpers.write_plugin(tmp_path, PLUGIN.replace("LATFILE", json.dumps(lat_file)), "slow.lua")
    env = dict(os.environ, PYTHONPATH=helpers.REPO)
    r = subprocess.run([sys.executable, "-m", "luaprobe.engine.daemon.cli", "run", plugin, "--pcap", PCAP,
                        "--out", str(tmp_path / "o"), "--drain-deadline", "4", "--workers", "1", "--json", "-q"],
                       cwd=helpers.REPO, capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 4, r.stderr                                  # results lost at the deadline
    (p,) = json.loads(r.stdout)["plugins"]
    a = p["async"]
    measured = [int(x) for x in open(lat_file).read().split()]
    assert a["lost_at_deadline"] > 0 and a["ok"] == len(measured) > 0
    assert a["latency_samples"] == a["ok"] + a["nil_result"] == len(measured)
    assert a["scheduled"] == a["ok"] + a["nil_result"] + a["error"] + a["timeout"] + a["dropped"] + a["pending"]
    # luaprobe's clock starts when the task is written to the ring (a little after schedule) and reports a
    # bucket's upper edge (<= 2^(1/4) above): measured/1.1 <= reported <= measured * 2^(1/4)
    for q, key in ((0.5, "latency_p50_ns"), (0.99, "latency_p99_ns")):
        m = quantile(measured, q)
        assert m / 1.1 <= a[key] <= m * 2 ** 0.25 * 1.001, (key, a[key], m)
