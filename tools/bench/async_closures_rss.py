"""Memory held for distinct onexecute functions (docs/async.md "Workers, queues and limits": function cache).

A plug-in makes a new onexecute *prototype* for each of its first N packets (`load` of a generated chunk: closures
of one `function ... end` expression share one prototype and are one function for T.async) and schedules one task
with it.  Printed per checkout: the plug-in VM's Lua heap at the end (collectgarbage("count") in onunload, after a
full collection), the fast-path process's peak RSS (VmHWM), and the worker's RSS and Lua heap at its last task (the
last task waits until every other result came, so the worker has seen every function).

    python tools/bench/async_closures_rss.py /work/main THIS [--tasks 100000] [--pcap tools/bench/data/bench300000.pcap]

Each checkout runs with its own .venv/bin/python when it has one.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

PLUGIN = r'''
local N, OUT = %d, %s
local n, done, worker = 0, 0, nil
local function rss(path)
  local f = io.open(path or "/proc/self/status") local s = f:read("*a") f:close()
  return tonumber(s:match("VmRSS:%%s+(%%d+)")), tonumber(s:match("VmHWM:%%s+(%%d+)"))
end
TrisulPlugin = { id = { name = "distinct closures" },
  simplecounter = { protocol_guid = "{0A2C724B-5B9F-4ba6-9C97-B05080558574}",
    onpacket = function(engine, layer)
      n = n + 1
      if n > N then return end
      local f = load("return function(d) if d == '" .. N .. "' then collectgarbage('collect') "
        .. "local s = io.open('/proc/self/status'):read('*a') "
        .. "return s:match('VmRSS:%%s+(%%d+)') .. ' ' .. math.floor(collectgarbage('count')) end "
        .. "return d .. '/" .. n .. "' end")()
      T.async:schedule{ data = tostring(n), onexecute = f,
        onresult = function(e, d, r) done = done + 1 if d == tostring(N) then worker = r end end }
    end },
  onunload = function()
    collectgarbage("collect") collectgarbage("collect")
    local r, hwm = rss()
    local w_rss, w_heap = (worker or ""):match("(%%d+) (%%d+)")
    local f = io.open(OUT, "w")
    f:write(('{"tasks": %%d, "results": %%d, "vm_heap_kb": %%d, "fastpath_rss_kb": %%d, "fastpath_hwm_kb": %%d, '
             .. '"worker_rss_kb": %%s, "worker_heap_kb": %%s}'):format(math.min(n, N), done,
             math.floor(collectgarbage("count")), r, hwm, w_rss or "null", w_heap or "null"))
    f:close()
  end }
'''


def run(repo: str, tasks: int, pcap: str) -> dict:
    with tempfile.TemporaryDirectory(prefix="async-closures-") as d:
        out = os.path.join(d, "out.json")
        plugin = os.path.join(d, "closures.lua")
        with open(plugin, "w") as f:
            f.write(PLUGIN % (tasks, json.dumps(out)))
        py = os.path.join(repo, ".venv", "bin", "python")
        r = subprocess.run([py if os.path.exists(py) else sys.executable, "-m", "luaprobe.engine.daemon.cli", "run",
                            plugin, "--pcap", pcap, "--out", os.path.join(d, "o"), "-q"],
                           cwd=repo, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=repo))
        if r.returncode != 0:
            raise SystemExit(f"{repo}: exit {r.returncode}: {r.stderr[-2000:]}")
        with open(out) as f:
            return json.load(f)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("checkouts", nargs="+")
    ap.add_argument("--tasks", type=int, default=100000)
    ap.add_argument("--pcap", default=os.path.join(os.path.dirname(__file__), "data", "bench300000.pcap"))
    ap.add_argument("--rounds", type=int, default=1, help="alternations of the checkouts")
    a = ap.parse_args()
    for k in range(a.rounds):
        for repo in a.checkouts:
            res = run(os.path.abspath(repo), a.tasks, os.path.abspath(a.pcap))
            print(f"round {k + 1} {repo}: " + ", ".join(f"{key} {v}" for key, v in res.items()), flush=True)


if __name__ == "__main__":
    main()
