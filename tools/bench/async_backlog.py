"""Benchmark: what tasks in flight cost the fast path in-process, with the collector's pace of
engine/plugins/gcpace.lua against a fixed pause (issue 11).

    python tools/bench/async_backlog.py [--runs 6] [--style fresh] [--upvalues 1] [--windows 1024,16384,65536]
                                        [--fixed-pause 400]

End to end the worker runs behind the fast path and tens of thousands of tasks are in flight; their onresult
closures and data stay live until their results return, so the collector marks them at every cycle and the
delivery meets them cold.  This reproduces it in-process: tools/bench/async_roundtrip.py's fastpath_cost with
`window` tasks scheduled before each flush and delivery (fast-path thread CPU per task: hooks + flush + delivery),
each configuration in a plug-in VM and worker of its own, the two paces alternating (order flipped every round),
two measurements of 262 144 tasks per VM.  "fixed" pins the pause at --fixed-pause (gcpace's rule: pause 400 below
64 MiB of heap; a pace of 1000 was tried and reverted, docs/benchmarks.md "The backlog and the collector").  Prints min / median / max ns per task and the pause in force at the end.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))

import async_roundtrip as ar  # noqa: E402

TASKS = 262144


def one(path: str, style: str, k: int, window: int, fixed: int | None) -> tuple[list, int]:
    from luaprobe.engine.plugins.asyncruntime import AsyncRuntime
    from luaprobe.workers.pool import AsyncConfig
    rt = AsyncRuntime(AsyncConfig(workers=1, worker_spin_us=0, ring_size=max(1 << 24, window * 512)))
    try:
        vm = rt.load(path)
        if fixed:
            vm.lua.execute(f'collectgarbage("setpause", {fixed}); '
                           f'require("luaprobe.engine.plugins.gcpace").adjust = function() return {fixed} end')
        cost = vm.lua.eval("function(s, u, n, a, b) return fastpath_cost(s, u, n, a, b) end")
        cost(style.encode(), k, 50_000, vm.async_obj, window)                  # warm-up
        out = [sum(cost(style.encode(), k, TASKS, vm.async_obj, window)) for _ in range(2)]
        pause = vm.lua.execute('local p = collectgarbage("setpause", 100); collectgarbage("setpause", p); return p')
        st = vm.async_stats()
        assert st["scheduled"] == st["ok"] + st["pending"] and st["error"] == 0, st
        return out, int(pause)
    finally:
        rt.shutdown()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=6, help="rounds (each: both paces, every window)")
    ap.add_argument("--style", default="fresh", choices=["fresh", "hoisted"])
    ap.add_argument("--upvalues", type=int, default=1, choices=list(ar.STYLE_UPS))
    ap.add_argument("--windows", default="1024,16384,65536", help="tasks in flight per round, comma-separated")
    ap.add_argument("--fixed-pause", type=int, default=1000, help="the pause the gcpace rule is compared with")
    args = ap.parse_args(argv)
    windows = [int(x) for x in args.windows.split(",")]
    res: dict = {}
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "styles.lua")
        with open(path, "w") as f:
            f.write(ar.STYLE_PLUGIN.replace("STYLES", ar.style_lua()))
        for r in range(args.runs):
            for mode in (("gcpace", "fixed") if r % 2 == 0 else ("fixed", "gcpace")):
                for w in windows:
                    xs, pause = one(path, args.style, args.upvalues, w, args.fixed_pause if mode == "fixed" else None)
                    res.setdefault((mode, w), []).extend(xs)
                    res.setdefault((mode, w, "pause"), set()).add(pause)
    print(f"{args.style}, {args.upvalues} upvalue(s), fast-path ns per task (hooks + flush + delivery), "
          f"min / median / max of {2 * args.runs}:\n")
    print("| tasks in flight | fixed pause | gcpace | pause in force (gcpace) |")
    print("|---:|---:|---:|---:|")
    for w in windows:
        f, g = res[("fixed", w)], res[("gcpace", w)]
        mmm = lambda xs: f"{min(xs):.0f} / {statistics.median(xs):.0f} / {max(xs):.0f}"  # noqa: E731
        print(f"| {w:,} | {mmm(f)} (pause {args.fixed_pause}) | {mmm(g)} | {sorted(res[('gcpace', w, 'pause')])} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
