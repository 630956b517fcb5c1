"""T.async on Ray actors vs local workers: tasks/s for 10 ms I/O-bound tasks, added latency (docs/benchmarks.md).

    .venv/bin/pip install -e '.[ray]'
    .venv/bin/python tools/bench/ray_async.py [--address HOST:PORT] [--workers 1,2,4,8] [--tasks 400]

Without --address it starts a two-node Ray cluster on this machine (`ray start --head` plus a second
`ray start --address` node, 1 CPU each, loopback) and stops it at the end (`ray stop --force`).
The plug-in VM is driven directly (AsyncRuntime + PluginVM, as tests/test_async.py does), no packets:
* throughput: --tasks tasks of `usleep(10 ms)` scheduled at once on N slots (local workers or actors,
  actors reserve 0.1 CPU so both nodes take several), rate = tasks / time to the last result, after a
  warm-up round that starts every worker / actor;
* latency: 300 tasks one at a time (onexecute returns at once), schedule -> onresult round trip
  p50 / p99 on one slot.
Prints Markdown tables; run on a machine shared with other work, the figures say so.
"""
from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)

PLUGIN = r'''
TrisulPlugin = { id = { name = "ray bench" } }
results = 0
local function task(ms)
  T.async:schedule{ data = tostring(ms),
    onexecute = function(d)
      local ms = tonumber(d)
      if ms > 0 then
        local ffi = require("ffi")
        pcall(ffi.cdef, "int usleep(unsigned int usec);")
        ffi.C.usleep(ms * 1000)
      end
      return "ok"
    end,
    onresult = function(e, d, r) results = results + 1 end }
end
function go(k, ms) for i = 1, k do task(ms) end return true end
'''


def start_cluster(tmp: str) -> str:
    ray = os.path.join(os.path.dirname(sys.executable), "ray")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    common = ["--node-ip-address=127.0.0.1", "--num-cpus=1", "--object-store-memory=78643200",
              "--disable-usage-stats", f"--temp-dir={tmp}"]
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0")
    subprocess.run([ray, "start", "--head", f"--port={port}", "--include-dashboard=false", *common], check=True,
                   capture_output=True, env=env)
    subprocess.run([ray, "start", f"--address=127.0.0.1:{port}", *common], check=True, capture_output=True, env=env)
    return f"127.0.0.1:{port}"


def stop_cluster() -> None:
    subprocess.run([os.path.join(os.path.dirname(sys.executable), "ray"), "stop", "--force"], capture_output=True)


def measure(plugin: str, backend: str, address: str | None, workers: int, tasks: int) -> dict:
    from luaprobe.engine.plugins.asyncruntime import AsyncRuntime
    from luaprobe.workers.pool import AsyncConfig
    cfg = AsyncConfig(workers=workers, backend=backend, ray_address=address, ray_actor_cpus=0.1,
                      drain_deadline=60, worker_spin_us=0)
    rt = AsyncRuntime(cfg)
    try:
        vm = rt.load(plugin)
        count = vm.lua.eval("function() return results end")
        go = vm.lua.eval("function(k, ms) return go(k, ms) end")

        def wait(n, timeout=300):
            end = time.monotonic() + timeout
            while count() < n:
                if time.monotonic() > end:
                    raise SystemExit(f"{backend} x{workers}: only {count()} of {n} results")
                if not rt.service():
                    rt.wait(0.001)
        go(workers * 4, 10)                        # warm-up: every slot started, definitions sent
        wait(workers * 4)
        base = count()
        t0 = time.monotonic()
        go(tasks, 10)
        wait(base + tasks)
        rate = tasks / (time.monotonic() - t0)
        lat = []
        if workers == 1:
            for _ in range(300):
                n = count()
                t = time.monotonic()
                go(1, 0)
                wait(n + 1)
                lat.append((time.monotonic() - t) * 1e6)
        st = vm.async_stats()
        assert st["error"] == st["timeout"] == st["dropped"] == 0, st
        return {"rate": rate, "lat": sorted(lat)}
    finally:
        rt.close()


def pct(xs, p):
    return xs[min(len(xs) - 1, int(p * len(xs)))] if xs else float("nan")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--address")
    ap.add_argument("--workers", default="1,2,4,8")
    ap.add_argument("--tasks", type=int, default=400)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="bench-ray-")
    plugin = os.path.join(tmp, "bench.lua")
    with open(plugin, "w") as f:
        f.write(PLUGIN)
    address = args.address
    started = False
    try:
        if not address:
            address = start_cluster(os.path.join(tmp, "ray"))
            started = True
        print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()} (shared with other work); "
              f"Ray cluster {address}, 2 nodes")
        rows = {}
        for n in [int(x) for x in args.workers.split(",")]:
            for backend in ("local", "ray"):
                rows[(backend, n)] = [measure(plugin, backend, address if backend == "ray" else None, n, args.tasks)
                                      for _ in range(args.repeat)]
        print(f"\n{args.tasks} tasks of 10 ms (usleep) scheduled at once; tasks/s min / median / max of "
              f"{args.repeat} runs\n")
        print("| slots | local workers | Ray actors (2 nodes) |")
        print("|---:|---|---|")
        for n in sorted({k[1] for k in rows}):
            cells = []
            for backend in ("local", "ray"):
                r = sorted(x["rate"] for x in rows[(backend, n)])
                cells.append(f"{r[0]:.0f} / {statistics.median(r):.0f} / {r[-1]:.0f}")
            print(f"| {n} | {cells[0]} | {cells[1]} |")
        if (("local", 1) in rows) and (("ray", 1) in rows):
            print("\nround trip of an empty task, one at a time, one slot (µs; worker spin 0)\n")
            print("| backend | p50 | p99 |")
            print("|---|---:|---:|")
            for backend in ("local", "ray"):
                lat = sorted(x for r in rows[(backend, 1)] for x in r["lat"])
                print(f"| {backend} | {pct(lat, 0.5):.0f} | {pct(lat, 0.99):.0f} |")
            lo = sorted(x for r in rows[("local", 1)] for x in r["lat"])
            ra = sorted(x for r in rows[("ray", 1)] for x in r["lat"])
            print(f"\nadded by Ray: p50 {pct(ra, 0.5) - pct(lo, 0.5):.0f} µs, p99 {pct(ra, 0.99) - pct(lo, 0.99):.0f} µs")
    finally:
        if started:
            stop_cluster()
    return 0


if __name__ == "__main__":
    sys.exit(main())
