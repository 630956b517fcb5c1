"""Benchmark: what the walker's stitch point costs per hook call (engine/plugins/host.lua, issue 11).

    python tools/bench/stitch.py [--runs 5] [--calls 1000000]

A per-packet walker calls a hook that LuaJIT cannot compile (it creates closures: bytecode FNEW) through
`wd.xpcall` (engine/plugins/_lpwatch.c, a classic C function): LuaJIT ends the walk's trace at the C call and
stitches a new trace after it, so the hook's aborts cannot blacklist the walk.  This measures, in one plug-in-like
LuaJIT VM, thread CPU ns per call of loops that differ in one thing each (min / median / max over --runs runs,
the variants alternating):

* `compiled loop, wd.hcall`: the walker's way since issue 11's tenth session (host.lua walk_direct: a compiled
  loop, the C function called with the handler, the hook and its arguments, `wd.hcall(tb, hook, x)`);
* `compiled loop, wd.xpcall`: the walker's way before (a compiled loop, the C xpcall, an interpreted `invoke(w)`
  that calls the hook, as host.lua's sc_invoke);
* `interpreted loop, xpcall`: everything in the interpreter with LuaJIT's built-in xpcall (what the walk would cost
  per call if it ran interpreted, its own work aside);
* `interpreted loop, wd.xpcall`: the C xpcall's own price over the built-in one;
* `compiled loop, trivial C function` / `interpreted loop, trivial C function`: the trace exit and re-entry of a
  stitch alone (a C function that returns at once);
each with a trivial hook (`sink = sink + 1`, kept interpreted with jit.off) and with a hook that creates a table and
two closures (the Trisul T.async idiom without T.async: `{ d = x, f = function() end, g = function() end }`).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

LUA = r"""
local ffi = require("ffi")
pcall(ffi.cdef, "struct lp_bench_ts { long s; long ns; }; int clock_gettime(int, struct lp_bench_ts *);")
local tsb = ffi.new("struct lp_bench_ts")
local function cpu_ns() ffi.C.clock_gettime(3, tsb); return tonumber(tsb.s) * 1e9 + tonumber(tsb.ns) end
local wd = require("luaprobe.engine.plugins.watchdog")
local config = require("luaprobe.config")
local cfn = package.loadlib(config.lpsync, "lp_fninfo")     -- a classic C function; lp_fninfo(1) returns nil
local function tb(m) return m end
sink = 0
local function trivial(x) sink = sink + 1 end
jit.off(trivial)
local function idiom(x) local t = { d = x, f = function() end, g = function() end }; sink = sink + 1 end
local function invoke(w) return w.fn(w.x) end
jit.off(invoke)
local LOOP_CALL = "local call, invoke, tb, w, n = ... ; for i = 1, n do call(invoke, tb, w) end"
local LOOP_HCALL = "local call, invoke, tb, w, n = ... ; for i = 1, n do call(tb, w.fn, w.x) end"
local LOOP_C = "local cfn, n = ... ; for i = 1, n do cfn(1) end"
--- ns per call of variant `v` (see the module docstring) with hook `hook` ("trivial" / "idiom"), n calls.
function measure(v, hook, n)
  local w = { fn = hook == "idiom" and idiom or trivial, x = 1 }
  local f = assert(loadstring(v:find("C function") and LOOP_C or v:find("wd.hcall") and LOOP_HCALL or LOOP_CALL))
  if v:find("^interpreted") then jit.off(f) end
  local call = v:find("wd.xpcall") and wd.xpcall or v:find("wd.hcall") and wd.hcall or xpcall
  local function go(k)
    if v:find("C function") then f(cfn, k) else f(call, invoke, tb, w, k) end
  end
  go(20000)                                                 -- warm-up: traces
  local t = cpu_ns()
  go(n)
  return (cpu_ns() - t) / n
end
"""

VARIANTS = [("compiled loop, wd.hcall", "trivial"), ("compiled loop, wd.xpcall", "trivial"),
            ("interpreted loop, xpcall", "trivial"),
            ("interpreted loop, wd.xpcall", "trivial"), ("compiled loop, trivial C function", "-"),
            ("interpreted loop, trivial C function", "-"), ("compiled loop, wd.hcall", "idiom"),
            ("compiled loop, wd.xpcall", "idiom"),
            ("interpreted loop, xpcall", "idiom"), ("interpreted loop, wd.xpcall", "idiom")]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--calls", type=int, default=1_000_000)
    args = ap.parse_args(argv)
    from luaprobe.engine.plugins.vm import new_runtime
    lua = new_runtime([])
    lua.execute(LUA)
    measure = lua.eval("measure")
    res = {v: [] for v in VARIANTS}
    for _ in range(args.runs):
        for v, hook in VARIANTS:
            res[(v, hook)].append(measure(v.encode(), hook.encode(), args.calls))
    print(f"thread CPU ns per call, min / median / max of {args.runs} runs of {args.calls:,} calls:\n")
    print("| loop and call | hook | ns per call |")
    print("|---|---|---:|")
    for v, hook in VARIANTS:
        xs = res[(v, hook)]
        print(f"| {v} | {hook} | {min(xs):.1f} / {statistics.median(xs):.1f} / {max(xs):.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
