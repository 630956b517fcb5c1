"""A T.async onexecute that allocates without bound is stopped by the worker VM's memory limit.

Found by the operator's chaos pass: the plug-in VMs of the fast path have a Lua memory limit (--plugin-memory-mb,
default 4096 MiB) but the worker VMs had none, so `for i = 1, 1e9 do t[i] = ... end` in onexecute grew the worker
by ~75 MB/s until task_timeout (60 s by default: several GB) or the machine's OOM killer.  Now the workers get the
same limit: the task fails with a `not enough memory` error naming the setting, the worker frees the task's garbage
and goes on with the next tasks (no death, no restart), and the accounting identity holds.

The hog would need ~10^12 bytes; a task_timeout far above the time the limit takes (64 MiB) shows that the limit,
not the timeout, ended it.  Real processes and rings; the leak guard of conftest.py checks processes and segments.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests import helpers

SAMPLE = os.path.join(helpers.REPO, "engine", "examples", "sample.pcap")

PLUGIN = r"""
local n = 0
TrisulPlugin = {
  id = { name = "worker hog" },
  request_async_workers = 1,
  simplecounter = {
    protocol_guid = "{0A2C724B-5B9F-4ba6-9C97-B05080558574}",   -- IPv4
    onpacket = function(engine, layer)
      n = n + 1
      if n <= 3 then
        T.async:schedule { data = "hog", onexecute = function(d)
          HOG
        end, onresult = function(e, d, r) end }
      else
        T.async:schedule { data = tostring(n), onexecute = function(d) return d .. "!" end,
                           onresult = function(e, d, r) end }
      end
    end,
  },
}
"""


HOGS = {
    "strings": 'local t = {}\n          for i = 1, 1e9 do t[i] = string.rep("y", 1000) .. i end',
    # a chain of small tables: the refused allocation leaves the VM a few bytes under its limit, and the worker's
    # error path runs on the limit's reserve (engine/plugins/_lpwatch.c), given again once the chain is garbage, so
    # the second and third hogs fail the same way (tests/test_memlimit_reserve.py: the fast path's VMs)
    "small-tables": "local l\n          while true do l = { l } end",
}


@pytest.mark.parametrize("hog", sorted(HOGS))
def test_onexecute_allocating_without_bound_fails_at_the_memory_limit(tmp_path, hog):
    plugin = helpers.write_plugin(tmp_path, PLUGIN.replace("HOG", HOGS[hog]), name="hog.lua")
    r = subprocess.run([sys.executable, "-m", "luaprobe.engine.daemon.cli", "run", plugin, "--pcap", SAMPLE,
                        "--out", str(tmp_path / "out"), "--json", "--plugin-memory-mb", "64",
                        "--task-timeout", "600"], cwd=helpers.REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr and "MemoryError" not in r.stderr, r.stderr
    assert "not enough memory: the worker VM's Lua memory limit was reached (--plugin-memory-mb" in r.stderr
    a = json.loads(r.stdout)["plugins"][0]["async"]
    helpers.assert_accounting(a)
    assert a["error"] == 3 and a["timeout"] == 0                      # the limit ended the hogs, not the timeout
    assert a["ok"] == a["scheduled"] - 3 > 0                          # every other task ran, in the same worker
    assert a["worker_deaths"] == 0 and a["worker_recycles"] == 0
