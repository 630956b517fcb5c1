"""Benchmark: where the fast path's loop CPU goes per packet, in the real pipeline (issue 10).

    python tools/bench/loopsplit.py [--corpus small-few,mixed-zipf] [--shapes empty] [--runs 3] [--batch 1024]

Runs the fast path in this process (``FastPath``: capture process, driver, plug-in VMs, SQLite writer, as
``luaprobe run`` does) over --quick corpus captures (tools/bench/corpus.py) with the plug-in shapes of
tools/bench/shapes.py loaded together, and splits the run's ``packet_loop_cpu_s`` (the fast-path thread's CPU
from the first batch to the last) per packet into

* **fill**  — ``Driver:fill`` calls that returned a batch: ring pop, decode, flow table, plus the lupa call;
* **flows** — of fill, the flow table's ``update_batch`` (timed in the driver VM with the thread CPU clock, two
  clock reads per batch), so fill - flows is the ring, the decoder and the batch bookkeeping;
* **walk**  — every plug-in VM's batch walk (hooks included), plus its lupa call;
* **rest**  — the loop between batches: ticks, T.async polling, stats, clocks (loop CPU minus the two above).

Thread CPU time, not elapsed (a busy machine inflates it much less than rates).  Prints min / median over --runs
runs, and packets per batch (a batch ends at each packet-time second).  The timers wrap the ``fill`` method and
``FastPath._budgeted`` (two clock reads per call, ~1 ns per packet, counted in fill and walk).
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)

from tools.bench import corpus, shapes  # noqa: E402


# wraps the driver's flow table update_batch with the thread CPU clock; FLOWS_NS holds the sum
WRAP_FLOWS = """
function(d)
  local ffi = require('ffi')
  pcall(ffi.cdef, "typedef struct { long tv_sec; long tv_nsec; } lp_bench_ts; int clock_gettime(int, lp_bench_ts *);")
  local ts = ffi.new("lp_bench_ts")
  local function cpu_ns() ffi.C.clock_gettime(3, ts); return tonumber(ts.tv_sec) * 1e9 + tonumber(ts.tv_nsec) end
  local update_batch = getmetatable(d.ft).update_batch
  FLOWS_NS = 0
  d.ft.update_batch = function(self, b, n)
    local t = cpu_ns()
    update_batch(self, b, n)
    FLOWS_NS = FLOWS_NS + cpu_ns() - t
  end
end
"""


def one_run(path: str, plugdir: str, workdir: str, batch: int) -> dict:
    """One in-process fast-path run: {fill, flows, walk, rest, loop: CPU ns per packet, per_batch: packets}."""
    from luaprobe.engine.fastpath import run as runmod
    acc = {"fill": 0, "walk": 0, "batches": 0, "lua": None, "wrapped": False}
    method, budgeted = runmod.method, runmod.FastPath.__dict__["_budgeted"]

    def timed_method(lua, name):
        f = method(lua, name)
        if name != "fill":
            return f
        acc["lua"] = lua

        def fill(d):
            if not acc["wrapped"]:
                lua.eval(WRAP_FLOWS)(d)
                acc["wrapped"] = True
            t = time.thread_time_ns()
            r = f(d)
            if (r[0] if isinstance(r, tuple) else r):
                acc["fill"] += time.thread_time_ns() - t
                acc["batches"] += 1
            return r
        return fill

    def timed_budgeted(self, inst, walk):
        inner = budgeted(self, inst, walk)

        def run(host, addr, n):
            t = time.thread_time_ns()
            r = inner(host, addr, n)
            acc["walk"] += time.thread_time_ns() - t
            return r
        return run

    runmod.method, runmod.FastPath._budgeted = timed_method, timed_budgeted
    try:
        out = os.path.join(workdir, "out")
        shutil.rmtree(out, ignore_errors=True)
        s = runmod.FastPath(runmod.RunConfig(plugins=[plugdir], files=[path], out_dir=out, batch=batch)).run()
    finally:
        runmod.method, runmod.FastPath._budgeted = method, budgeted
    n = s["packets"]
    loop = s["packet_loop_cpu_s"] * 1e9 / n
    return {"loop": loop, "fill": acc["fill"] / n, "flows": float(acc["lua"].eval("FLOWS_NS")) / n,
            "walk": acc["walk"] / n,
            "rest": loop - (acc["fill"] + acc["walk"]) / n, "per_batch": n / max(1, acc["batches"])}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--corpus", default="small-few,mixed-zipf", help="traffic shapes (--quick captures)")
    ap.add_argument("--shapes", default="empty", help="plug-in shapes loaded together")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--batch", type=int, default=1024, help="packets per batch (luaprobe run --batch)")
    a = ap.parse_args(argv)
    print("| traffic | plug-ins | loop | fill | of which flows | walk | rest | packets per batch |\n"
          "|---|---|---:|---:|---:|---:|---:|---:|")
    for c in a.corpus.split(","):
        path = corpus.make(c, True)
        with tempfile.TemporaryDirectory(prefix="lp-loopsplit-") as work:
            plugdir = os.path.join(work, "plugins")
            for s in a.shapes.split(","):
                shapes.write(s, plugdir)
            runs = [one_run(path, plugdir, work, a.batch) for _ in range(a.runs)]
        cols = " | ".join(f"{min(r[k] for r in runs):.1f} / {statistics.median(r[k] for r in runs):.1f}"
                          for k in ("loop", "fill", "flows", "walk", "rest"))
        print(f"| {c} | {a.shapes} | {cols} | {statistics.median(r['per_batch'] for r in runs):.0f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
