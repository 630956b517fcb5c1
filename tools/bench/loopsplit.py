"""Benchmark: where the fast path's loop CPU goes per packet, in the real pipeline (issue 10).

    python tools/bench/loopsplit.py [--corpus small-few,mixed-zipf] [--shapes empty] [--runs 3] [--batch 1024]
                                    [--packet-ring-mb 32] [--producer-first SECONDS]

Runs the fast path in this process (``FastPath``: capture process, driver, plug-in VMs, SQLite writer, as
``luaprobe run`` does) over --quick corpus captures (tools/bench/corpus.py) with the plug-in shapes of
tools/bench/shapes.py loaded together, and splits the run's ``packet_loop_cpu_s`` (the fast-path thread's CPU
from the first batch to the last) per packet into

* **all batches** — every batch's fill and walks, the first batch's fill included (``packet_loop_cpu_s`` starts
  after it before 2026-11-30 15:00: that fill holds most of LuaJIT's first traces, 4-13 ms);
* **fill**  — ``Driver:fill`` calls that returned a batch: ring pop, decode, flow table, plus the lupa call;
* **flows** — of fill, the flow table's ``update_batch`` (timed in the driver VM with the thread CPU clock, two
  clock reads per batch), so fill - flows is the ring, the decoder and the batch bookkeeping;
* **walk**  — every plug-in VM's batch walk (hooks included), plus its lupa call;
* **rest**  — the loop between batches: ticks, T.async polling, stats, clocks (loop CPU minus the two above);
  of it, **between** — from each batch's last walk to the next fill call (one pass of the Python loop), and
  **idle** — fill calls that found no batch after the first (the ring empty: the capture process behind), with
  their count; the remainder is the idle loop around those (waits, service, stats).

and, batch by batch (the thread CPU of each batch's fill and walks), the same loop CPU as

* **steady** — the median batch's cost per packet (what the stages of tools/bench/stages.py add up to);
* **warm-up** — what the first WARM_BATCHES batches cost above the median batch (LuaJIT recording and compiling
  the traces, first touches of the flow table), spread over all packets of the run;
* **slow** — what later batches costing at least half a batch more than the median one cost above it (a
  preemption, an interrupt, a trace compiled late), and how many (in brackets);
* **JIT** — of the loop, the driver VM's thread CPU between each trace's start and its stop or abort (recording
  and compiling: ``jit.attach``), ms per run, with the traces it completed and aborted;
* **release** — ``Ring:release`` (handing the batch's ring space back; a futex wake when the capture process
  sleeps for space, counted in "wakes").

Thread CPU time, not elapsed (a busy machine inflates it much less than rates).  Prints min / median over --runs
runs, and packets per batch (a batch ends at each packet-time second).  The timers wrap the ``fill`` method and
``FastPath._budgeted`` (two clock reads per call, ~1 ns per packet, counted in fill and walk).
``--producer-first S`` holds the first batch S seconds, so that the capture process fills the ring before the
loop starts (with a ring the size of the capture, ``--packet-ring-mb``, it has finished: no writer on the other
CPU during the loop).
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

WARM_BATCHES = 64      #: the first batches of a run (LuaJIT records and compiles its traces in them)
SLOW = 0.5             #: a later batch costing this much of a typical full batch more than typical is "slow"


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
    if not JIT_FIRST then                 -- after the first batch's (outside the loop's CPU clock)
      JIT_FIRST, JIT_FIRST_T, JIT_FIRST_A = JIT_NS, JIT_TRACES, JIT_ABORTS
    end
    JIT_LAST, JIT_LAST_T, JIT_LAST_A = JIT_NS, JIT_TRACES, JIT_ABORTS   -- the end-of-input flow export comes later
  end
  -- thread CPU from each trace's start to its stop / abort (recording + compiling), summed: JIT_NS
  JIT_NS, JIT_TRACES, JIT_ABORTS = 0, 0, 0
  local t0 = nil
  jit.attach(function(what)
    if what == "start" then t0 = cpu_ns()
    elseif t0 then
      JIT_NS = JIT_NS + cpu_ns() - t0; t0 = nil
      if what == "abort" then JIT_ABORTS = JIT_ABORTS + 1 elseif what == "stop" then JIT_TRACES = JIT_TRACES + 1 end
    end
  end, "trace")
  local release = getmetatable(d.ring).release
  RELEASE_NS, RELEASE_WAKES = 0, 0
  d.ring.release = function(self)
    local t = cpu_ns()
    local seq = self.space_bell[1]              -- the space bell's futex word: bumped by every wake
    release(self)
    if self.space_bell[1] ~= seq then RELEASE_WAKES = RELEASE_WAKES + 1 end   -- this release woke the producer
    RELEASE_NS = RELEASE_NS + cpu_ns() - t
  end
end
"""


def count_traces(lua) -> int:
    """Traces LuaJIT holds in VM `lua` now (jit.util.traceinfo over the trace numbers)."""
    return int(lua.execute("local ti, n = require('jit.util').traceinfo, 0 "
                           "for i = 1, 65535 do if ti(i) then n = n + 1 elseif i > 4000 then break end end return n"))


def anon_huge_kib() -> int:
    """This process's transparent huge pages now (AnonHugePages, KiB): the flow table's, when THP gave it any."""
    try:
        with open("/proc/self/smaps_rollup") as f:
            for line in f:
                if line.startswith("AnonHugePages:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def one_run(path: str, plugdir: str, workdir: str, batch: int, ring_mb: int = 32, producer_first: float = 0) -> dict:
    """One in-process fast-path run: {fill, flows, walk, rest, loop: CPU ns per packet, per_batch: packets}."""
    from luaprobe.engine.fastpath import run as runmod
    acc = {"fill": 0, "walk": 0, "batches": 0, "lua": None, "wrapped": False, "per": [],
           "thp": 0,
           "gaps": [], "last_end": 0, "fill0": 0, "nfill0": 0}
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
                time.sleep(producer_first)     # the capture process fills the ring before the first batch
            t = time.thread_time_ns()
            if acc["per"] and acc["last_end"]:
                acc["gaps"].append((len(acc["per"]), t - acc["last_end"]))   # the loop between batches
                acc["last_end"] = 0
            r = f(d)
            k = r[0] if isinstance(r, tuple) else r
            if not k and acc["batches"]:
                acc["fill0"] += time.thread_time_ns() - t
                acc["nfill0"] += 1
            if k:
                dt = time.thread_time_ns() - t
                acc["fill"] += dt
                acc["batches"] += 1
                acc["per"].append([int(k), dt, 0])
            return r
        return fill

    def timed_budgeted(self, inst, walk):
        inner = budgeted(self, inst, walk)

        def run(host, addr, n):
            t = time.thread_time_ns()
            r = inner(host, addr, n)
            t2 = time.thread_time_ns()
            dt = t2 - t
            acc["last_end"] = t2
            acc["walk"] += dt
            if acc["per"]:
                acc["per"][-1][2] += dt
            return r
        return run

    runmod.method, runmod.FastPath._budgeted = timed_method, timed_budgeted
    try:
        out = os.path.join(workdir, "out")
        shutil.rmtree(out, ignore_errors=True)
        fp = runmod.FastPath(runmod.RunConfig(plugins=[plugdir], files=[path], out_dir=out, batch=batch,
                                              packet_ring_size=ring_mb << 20))
        s = fp.run()
        acc["thp"] = anon_huge_kib()     # the flow table's huge pages (read after the loop: ~1.5 ms per read, which
                                         # was inside the loop CPU and the idle column before 2026-11-30 17:40)
        traces = [count_traces(fp.driver_lua)] + [count_traces(i.vm.lua) for i in fp.instances]
    finally:
        runmod.method, runmod.FastPath._budgeted = method, budgeted
    n = s["packets"]
    loop = s["packet_loop_cpu_s"] * 1e9 / n
    per = acc["per"]
    steady = statistics.median((f + w) / k for k, f, w in per)     # ns per packet of the typical batch
    warm = per[1:WARM_BATCHES]       # the first batch's fill is before the loop's first clock read, its walk is in
    warm_x = (per[0][2] + sum(f + w - steady * k for k, f, w in warm)) / n
    late = [f + w - steady * k for k, f, w in per[WARM_BATCHES:]]
    slow_x = sum(x for x in late if x > SLOW * steady * 1024) / n   # batches far above the typical one
    return {"gaps": acc["gaps"], "between": sum(x for _, x in acc["gaps"]) / n,
            "fill0": acc["fill0"] / n, "nfill0": acc["nfill0"], "all": sum(f + w for _k, f, w in per) / n,     # every batch's fill and walks, the first one's included
            "traces": traces, "thp_mib": acc["thp"] / 1024, "pinned": s.get("cpus_pinned"),
            "nivcsw": s.get("packet_loop_rusage", {}).get("nivcsw"),
            "steady": steady, "warm": warm_x, "slow": slow_x, "per": per,
            "nslow": sum(1 for x in late if x > SLOW * steady * 1024),"loop": loop, "fill": acc["fill"] / n, "flows": float(acc["lua"].eval("FLOWS_NS")) / n,
            "release": float(acc["lua"].eval("RELEASE_NS")) / n,
            "jit_ms": float(acc["lua"].eval("JIT_LAST - JIT_FIRST")) / 1e6, "jit_traces": int(acc["lua"].eval("JIT_LAST_T - JIT_FIRST_T")),
            "jit_aborts": int(acc["lua"].eval("JIT_LAST_A - JIT_FIRST_A")), "wakes": int(acc["lua"].eval("RELEASE_WAKES")),
            "walk": acc["walk"] / n,
            "rest": loop - (acc["fill"] + acc["walk"]) / n, "per_batch": n / max(1, acc["batches"])}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--corpus", default="small-few,mixed-zipf", help="traffic shapes (--quick captures)")
    ap.add_argument("--shapes", default="empty", help="plug-in shapes loaded together")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--batch", type=int, default=1024, help="packets per batch (luaprobe run --batch)")
    ap.add_argument("--packet-ring-mb", type=int, default=32, help="packet ring size (luaprobe run --packet-ring-mb)")
    ap.add_argument("--producer-first", type=float, default=0.0, metavar="S",
                    help="hold the first batch S seconds (the capture process fills the ring first)")
    a = ap.parse_args(argv)
    print("CPU ns per packet of the fast-path thread, min / median of the runs\n")
    print("| traffic | plug-ins | all batches | loop | fill | of which flows | walk | rest | steady | warm-up | slow batches "
          "| between | idle (polls) | driver JIT ms (traces / aborts) | release (wakes) | packets per batch |\n"
          "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for c in a.corpus.split(","):
        path = corpus.make(c, True)
        with tempfile.TemporaryDirectory(prefix="lp-loopsplit-") as work:
            plugdir = os.path.join(work, "plugins")
            for s in a.shapes.split(","):
                shapes.write(s, plugdir)
            runs = [one_run(path, plugdir, work, a.batch, a.packet_ring_mb, a.producer_first) for _ in range(a.runs)]
        cols = " | ".join(f"{min(r[k] for r in runs):.1f} / {statistics.median(r[k] for r in runs):.1f}"
                          for k in ("all", "loop", "fill", "flows", "walk", "rest", "steady", "warm", "slow"))
        med = {k: statistics.median(r[k] for r in runs) for k in ("nslow", "jit_ms", "jit_traces", "jit_aborts",
                                                                   "release", "wakes", "per_batch", "between",
                                                                   "fill0", "nfill0")}
        print(f"| {c} | {a.shapes} | {cols} ({med['nslow']:.0f}) | {med['between']:.1f} | {med['fill0']:.1f} "
              f"({med['nfill0']:.0f}) | {med['jit_ms']:.1f} ({med['jit_traces']:.0f} / "
              f"{med['jit_aborts']:.0f}) | {med['release']:.1f} ({med['wakes']:.0f}) | {med['per_batch']:.0f} |",
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
