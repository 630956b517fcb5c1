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
