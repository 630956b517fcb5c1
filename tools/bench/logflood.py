"""Benchmark (issue 13.11): a flood of file-helper errors, each naming a different packet-derived path.

    python tools/bench/logflood.py [--names 200000] [--chunk 10000] [--json]

One plug-in VM with one async worker (the same AsyncRuntime the fast path uses) calls
`T.async:copybuffer("x", DIR .. "/missing-dir/name-" .. i)` for --names distinct names (every call fails
with ENOENT in the worker), in chunks of --chunk calls each drained before the next (so the overflow queue
never refuses one), then 10 `T.async:rm` of over-long names (ENAMETOOLONG, a second kind of error).

Measured, before the flood and after it (after a full `collectgarbage("collect")` in each VM):
* log lines: ERROR records "file helper error" the luaprobe logger received;
* limiter keys: entries of the plug-in VM's rate limiter (engine/plugins/errlog.lua `seen`);
* Lua memory (KiB, `collectgarbage("count")`) of the plug-in VM and of the worker VM (a task that collects
  and returns its own count);
* RSS (MiB) of this process (the plug-in VM lives here, as in the fast path) and of the worker process.

The names are deterministic (no randomness); only the elapsed time depends on the machine.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time

import psutil

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)

PLUGIN = r'''
TrisulPlugin = { id = { name = "logflood" } }
worker_kb = nil
function flood(dir, first, last)
  for i = first, last do T.async:copybuffer("x", dir .. "/missing-dir/name-" .. i) end
end
function long_names(dir)
  for i = 1, 10 do T.async:rm(dir .. "/" .. string.rep("n", 300) .. i) end
end
function lua_kb() collectgarbage("collect"); collectgarbage("collect"); return collectgarbage("count") end
function ask_worker()
  worker_kb = nil
  T.async:schedule{ data = "", onexecute = function()
      collectgarbage("collect"); collectgarbage("collect")
      local ffi = require "ffi"
      pcall(ffi.cdef, "int getpid(void);")
      return string.format("%.1f %d", collectgarbage("count"), ffi.C.getpid())
    end,
    onresult = function(e, d, r) worker_kb = r end }
end
'''


class Counter(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.lines = 0
        self.samples: list[str] = []

    def emit(self, record):
        msg = record.getMessage()
        if "file helper error" in msg:
            self.lines += 1
            if len(self.samples) < 6:
                self.samples.append(msg.splitlines()[0][:160])


def measure(names: int = 200_000, chunk: int = 10_000) -> dict:
    from luaprobe.engine.plugins.asyncruntime import AsyncRuntime
    from luaprobe.workers.pool import AsyncConfig
    log = Counter()
    logger = logging.getLogger("luaprobe")
    logger.addHandler(log)
    logger.setLevel(logging.INFO)
    propagate, logger.propagate = logger.propagate, False     # counted here, not printed
    rt = AsyncRuntime(AsyncConfig(workers=1))
    try:
        with tempfile.TemporaryDirectory(prefix="logflood-") as d:
            path = os.path.join(d, "logflood.lua")
            with open(path, "w") as f:
                f.write(PLUGIN)
            vm = rt.load(path)
            q = json.dumps(d)

            def worker():
                vm.exec("ask_worker()")
                assert rt.run_until_idle(60)
                kb, pid = vm.lua.eval("worker_kb").split()
                return float(kb), int(pid)

            def keys():
                return int(vm.lua.eval("function(a) local n = 0 for _ in pairs(a.errors.seen) do n = n + 1 end "
                                       "return n end")(vm.async_obj))

            wkb0, wpid = worker()                      # starts the worker; its first task is the probe
            before = {"plugin_lua_kib": round(vm.exec("return lua_kb()"), 1), "worker_lua_kib": wkb0,
                      "fastpath_rss_mib": round(psutil.Process().memory_info().rss / 2**20, 1),
                      "worker_rss_mib": round(psutil.Process(wpid).memory_info().rss / 2**20, 1),
                      "limiter_keys": keys(), "log_lines": log.lines}
            t0 = time.monotonic()
            for first in range(1, names + 1, chunk):
                vm.exec(f"flood({q}, {first}, {min(names, first + chunk - 1)})")
                assert rt.run_until_idle(600), vm.async_stats()
            vm.exec(f"long_names({q})")
            assert rt.run_until_idle(60)
            elapsed = time.monotonic() - t0
            st = vm.async_stats()
            wkb1, wpid1 = worker()
            after = {"plugin_lua_kib": round(vm.exec("return lua_kb()"), 1), "worker_lua_kib": wkb1,
                     "fastpath_rss_mib": round(psutil.Process().memory_info().rss / 2**20, 1),
                     "worker_rss_mib": round(psutil.Process(wpid1).memory_info().rss / 2**20, 1),
                     "limiter_keys": keys(), "log_lines": log.lines}
            return {"names": names, "chunk": chunk, "elapsed_s": round(elapsed, 2),
                    "errors": st["error"], "ok": st["ok"], "scheduled": st["scheduled"],
                    "same_worker": wpid == wpid1, "before": before, "after": after, "log_samples": log.samples}
    finally:
        rt.close()
        logger.removeHandler(log)
        logger.propagate = propagate


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--names", type=int, default=200_000)
    ap.add_argument("--chunk", type=int, default=10_000)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    r = measure(a.names, a.chunk)
    if a.json:
        print(json.dumps(r))
        return 0
    b, e = r["before"], r["after"]
    print(f"{r['names']:,} distinct failing names (+10 over-long) in {r['elapsed_s']} s: "
          f"errors {r['errors']:,}, ok {r['ok']}")
    for k in ("log_lines", "limiter_keys", "plugin_lua_kib", "worker_lua_kib", "fastpath_rss_mib", "worker_rss_mib"):
        print(f"  {k:18} before {b[k]:>10}  after {e[k]:>10}")
    for s in r["log_samples"]:
        print("  |", s)
    return 0


if __name__ == "__main__":
    sys.exit(main())
