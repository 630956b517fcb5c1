"""Benchmark: what each plug-in VM's batch walk costs per packet, in the real fast path (issue 10).

    python tools/bench/hookcost.py [--corpus small-few] [--shapes empty,hval,counter,flowstate] [--runs 5] [--layer udp]

Runs the fast path in this process (``FastPath``: capture process, driver, plug-in VMs, SQLite writer, as
``luaprobe run`` does) over a --quick corpus capture (tools/bench/corpus.py) with the plug-in shapes of
tools/bench/shapes.py loaded together, and times every plug-in VM's walk of every batch with the thread's CPU
clock.  Prints, per VM, walk CPU ns per packet of the capture (min / median / max over --runs runs) and the
run's ``packet_loop_cpu_s`` per packet (the corpus benchmark's loop CPU column: driver and every walk).
CPU time, not elapsed: a busy machine inflates it much less than the rates.  The difference between a shape's
walk and the empty hook's is what the plug-in's own code and its bindings cost per packet.

The walk is timed by wrapping ``FastPath._budgeted`` (the function every batch walker passes through); the
wrapper costs two clock reads per VM and batch, ~0.1 ns per packet.  Set LUAPROBE_JIT_TRACES=prefix to get
each VM's trace tree per run (engine/plugins/jitprof.lua) and compare runs.  --engine-dir DIR runs the Lua modules
of luaprobe.engine from DIR, in the driver and the plug-in VMs (a copy of engine/ with other versions of some
files: an A/B of Lua changes in one checkout, alternating; tools/bench/hookwalk.py has the same option).
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


def one_run(path: str, plugdir: str, workdir: str) -> dict:
    """One in-process fast-path run: {vm file name: walk CPU ns per packet, "loop": loop CPU ns per packet}."""
    from luaprobe.engine.fastpath import run as runmod
    acc: dict = {}
    original = runmod.FastPath.__dict__["_budgeted"]

    def budgeted(self, inst, walk):
        inner = original(self, inst, walk)
        name = os.path.basename(inst.vm.path)

        def timed(host, addr, n):
            t = time.thread_time_ns()
            r = inner(host, addr, n)
            acc[name] = acc.get(name, 0) + time.thread_time_ns() - t
            return r
        return timed

    runmod.FastPath._budgeted = budgeted
    try:
        out = os.path.join(workdir, "out")
        shutil.rmtree(out, ignore_errors=True)
        s = runmod.FastPath(runmod.RunConfig(plugins=[plugdir], files=[path], out_dir=out)).run()
    finally:
        runmod.FastPath._budgeted = original
    n = s["packets"]
    res = {k: v / n for k, v in acc.items()}
    res["loop"] = s["packet_loop_cpu_s"] * 1e9 / n
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--corpus", default="small-few", help="traffic shapes (--quick captures), comma-separated")
    ap.add_argument("--shapes", default="empty,hval,counter,flowstate", help="plug-in shapes loaded together")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--engine-dir", help="luaprobe.engine's Lua modules from this folder")
    ap.add_argument("--layer", choices=("tcp", "udp"), default="tcp",
                    help="transport the light shapes hook (udp for the dns corpus, which has no TCP)")
    a = ap.parse_args(argv)
    if a.engine_dir:
        from tools.bench.hookwalk import use_engine_dir
        use_engine_dir(a.engine_dir)
    print("| traffic | VM | walk CPU ns/packet min / median / max |\n|---|---|---:|")
    for c in a.corpus.split(","):
        path = corpus.make(c, True)
        with tempfile.TemporaryDirectory(prefix="lp-hookcost-") as work:
            plugdir = os.path.join(work, "plugins")
            for s in a.shapes.split(","):
                shapes.write(s, plugdir, a.layer)
            runs = [one_run(path, plugdir, work) for _ in range(a.runs)]
        for k in sorted(runs[0], key=lambda k: (k == "loop", k)):
            xs = [r[k] for r in runs]
            label = "loop CPU (driver + every walk)" if k == "loop" else k
            print(f"| {c} | {label} | {min(xs):.0f} / {statistics.median(xs):.0f} / {max(xs):.0f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
