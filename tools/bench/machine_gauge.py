"""Benchmark: what this machine does with no engine code — an L1-resident LuaJIT loop timed in slices (issue 10).

    python tools/bench/machine_gauge.py [--processes 6] [--slices 6] [--iterations 20000000] [--both-cpus]

Each fresh process (lupa's LuaJIT, as the engine's VMs) times ``--slices`` runs of one loop: ``--iterations``
increments of a 1 024-slot Lua table (8 KiB: in L1 on any CPU this project runs on), ns an iteration.  The loop
is the same bytecode, trace and data every time, so whatever moves between slices and processes is the machine
(the host's other tenants, frequency, the vCPU's placement), not LuaJIT's trace choice or a cache the engine fills.
``--both-cpus`` runs two processes at once, pinned to CPU 0 and CPU 1 (``os.sched_setaffinity``), and prints their
slices side by side: the same moment on both vCPUs.  Read beside tools/bench/corpus_bench.py's spread column
(docs/benchmarks.md "The run-to-run spread on 2026-12-03", "A fresh machine").
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys

LOOP = """
return function(n)
  local t, band = {}, bit.band
  for i = 0, 1023 do t[i] = 0 end
  local t0 = os.clock()
  for i = 1, n do local k = band(i * 7, 1023); t[k] = t[k] + 1 end
  return os.clock() - t0
end"""


def slices(iterations: int, count: int) -> list[float]:
    """ns an iteration of `count` timed runs of the loop in this process (one untimed run first: the trace)."""
    from lupa.luajit21 import LuaRuntime
    f = LuaRuntime().execute(LOOP)
    f(iterations)
    return [f(iterations) / iterations * 1e9 for _ in range(count)]


def child(args, cpu: int | None) -> subprocess.Popen:
    cmd = [sys.executable, __file__, "--child", "--slices", str(args.slices), "--iterations", str(args.iterations)]
    if cpu is not None:
        cmd += ["--cpu", str(cpu)]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--processes", type=int, default=6, help="fresh processes (pairs with --both-cpus)")
    ap.add_argument("--slices", type=int, default=6, help="timed loops per process")
    ap.add_argument("--iterations", type=int, default=20_000_000, help="iterations per timed loop")
    ap.add_argument("--both-cpus", action="store_true", help="two processes at once, on CPU 0 and CPU 1")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--cpu", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        if args.cpu is not None:
            os.sched_setaffinity(0, {args.cpu})
        print(" ".join(f"{x:.3f}" for x in slices(args.iterations, args.slices)))
        return 0
    every = []
    for i in range(args.processes):
        procs = [child(args, 0), child(args, 1)] if args.both_cpus else [child(args, None)]
        outs = [[float(x) for x in p.communicate()[0].split()] for p in procs]
        for cpu, o in enumerate(outs):
            every += o
            where = f"cpu {cpu}" if args.both_cpus else "process"
            print(f"{i:2d} {where}: " + " ".join(f"{x:.2f}" for x in o))
    print(f"ns an iteration over {len(every)} slices: min {min(every):.2f} / median {statistics.median(every):.2f} / "
          f"max {max(every):.2f} (max/min {max(every) / min(every):.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
