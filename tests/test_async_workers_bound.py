"""TrisulPlugin.request_async_workers has a bound (docs/async.md "Workers"): a request above 256 runs 256
workers and logs one warning naming the plug-in.  Before: no bound (100000 started 94 workers, then worker
tracebacks).  The plug-in schedules no task, so no worker starts (lazy start): the clamp is read from the log."""
from __future__ import annotations

import os
import subprocess
import sys

from tests import helpers

SAMPLE = os.path.join(helpers.REPO, "engine", "examples", "sample.pcap")
PLUGIN = """
TrisulPlugin = {
  id = { name = "greedy" },
  request_async_workers = 100000,
  simplecounter = { protocol_guid = "{77E462AB-2E42-42ec-9A58-C1A6821D6B31}", onpacket = function(engine, layer) end },
}
"""


def test_request_async_workers_above_the_maximum_is_clamped_with_one_warning(tmp_path):
    p = tmp_path / "greedy.lua"
    p.write_text(PLUGIN)
    r = subprocess.run([sys.executable, "-m", "luaprobe.engine.daemon.cli", "run", str(p), "--pcap", SAMPLE,
                        "--out", str(tmp_path / "o"), "-q"], cwd=helpers.REPO, capture_output=True, text=True,
                       timeout=120, env=dict(os.environ, PYTHONPATH=helpers.REPO))
    assert r.returncode == 0, r.stderr
    lines = [x for x in r.stderr.splitlines() if "request_async_workers" in x]
    assert len(lines) == 1 and lines[0].endswith(
        f"{p}: request_async_workers = 100000 is above the maximum 256: 256 workers"), r.stderr


UDP_ASYNC = """
TrisulPlugin = {
  id = { name = "udp async" },
  request_async_workers = 16,
  simplecounter = {
    protocol_guid = "{14D7AB53-CC51-47e9-8814-9C06AAE60189}",
    onpacket = function(engine, layer)
      T.async:schedule { data = "x", onexecute = function(d) return d end, onresult = function(e, d, r) end }
    end,
  },
}
"""


def test_accounting_holds_when_the_hook_budget_interrupts_the_worker_start(tmp_path):
    """The first schedule starts 16 workers (lazy start); the hook budget (0.2 s) interrupts it while it does on
    a loaded machine: that task is counted as dropped, so scheduled = ok + ... + dropped + pending (before:
    scheduled 48, ok 47, the rest 0).  On a machine fast enough to start them within the budget nothing is
    interrupted and the identity holds all the same."""
    import json
    p = tmp_path / "udp.lua"
    p.write_text(UDP_ASYNC)
    r = subprocess.run([sys.executable, "-m", "luaprobe.engine.daemon.cli", "run", str(p), "--pcap", SAMPLE,
                        "--out", str(tmp_path / "o"), "-q", "--json", "--hook-budget", "0.2"], cwd=helpers.REPO,
                       capture_output=True, text=True, timeout=300, env=dict(os.environ, PYTHONPATH=helpers.REPO))
    summary = json.loads(r.stdout)
    (plugin,) = summary["plugins"]
    helpers.assert_accounting(plugin["async"])
    assert plugin["async"]["scheduled"] == 48                 # UDP packets of sample.pcap (tshark: 48 udp)
