"""Benchmark: instructions of the whole fast path's packet loop under callgrind, by trace and by library (issue 10).

    python tools/bench/loopcg.py [--corpus small-few,ipv6] [--shapes empty] [--processes 3] [--tree DIR ...]
        [--top 8] [--batches K] [--hotloop N]

Why: a change to one Lua module moves the bytecode addresses of every module loaded after it, and LuaJIT's hot
counters are 64 slots indexed by bytecode address (``lj_dispatch.h`` ``hotcount[(pc >> 2) & 63]``), so which loops
share a counter, which packet each root trace is recorded on, and so each trace tree can change anywhere in the
process (docs/benchmarks.md, "The fill loop's trace tree with the hot counters moved": dormant code in driver.lua
moved small-few 87 -> 109 ns).  A per-part count (tools/bench/fillcg.py, flowtable_cg.py) misses that; this counts
the whole loop.

Each process runs ``FastPath`` (as ``luaprobe run`` does: capture process, driver, plug-in VMs, store writer) over a
--quick corpus capture (tools/bench/corpus.py) with one plug-in shape (tools/bench/shapes.py; on the layer the
corpus shape names, UDP for dns, as corpus_bench.py), under ``valgrind
--tool=callgrind --collect-atstart=no``.  Collection is switched on at each call of the driver's ``fill`` and off
when a fill returns no packet: the counted part is the packet loop as the summary's ``packet_loop_cpu_s`` times it
(its first batch, LuaJIT's warm-up and compilation, the plug-in walks, Python between batches), without the idle
waits.  Under callgrind the fast path is the slower side, so the ring is full and every batch holds --batch packets
(a fixed work split, unlike a timed run).  Printed per process: Ir a packet of the loop, split into each VM's trace
code (``jit.util.tracemc`` ranges of the traces alive at the end, dumped in the child), ``JIT, no trace`` (code of
flushed traces), the lupa module (its glue, LuaJIT's interpreter, recorder, compiler, collector: every LuaJIT
runtime cost), Python and libc; then the --top traces with the most Ir a packet (VM, source:line where the trace
starts, from ``LUAPROBE_JIT_TRACES``).  Counts, not time: the same code gives the same count to ~0.1 % when its trace
trees are the same, so several processes show the trees' lottery, and --tree A --tree B compare checkouts (each tree's
``engine/`` and ``shm/`` Lua modules in this interpreter: fillcg.py ``use_tree``).  LOOPCG_KEEP=DIR keeps each
process's callgrind output (``callgrind_annotate`` reads it) and trace dumps in DIR.  ``--batches K``: callgrind
dumps its counts at every fill after the first (a file per batch; the dump calls add ~4 Ir a packet of Python), and
the first K batches' Ir and the median later batch are printed: the run's warm-up (docs/benchmarks.md, "IPv6 flow ids
formatted in the interpreter, and the run's first batch").  ``--hotloop N``: LuaJIT's hotloop parameter in the
driver's and the plug-ins' VMs of the measured process (its default is 56).  Needs valgrind, its headers
(callgrind.h) and cc.  About 1-2 minutes a process.
"""
from __future__ import annotations

import argparse
import bisect
import collections
import ctypes
import glob
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, REPO)

from tools.bench import corpus, fillcg, jittraces, shapes  # noqa: E402
from tools.bench.perfsplit import DUMP, _text, trace_ranges, trace_starts  # noqa: E402


def child(lib: str, path: str, shape: str, work: str, tree: str, repeat: str = "1", layer: str = "tcp",
          hotloop: str = "0", per_batch: str = "0") -> None:
    """Under callgrind: FastPath over `path` with `shape`'s plug-ins, collection on while batches flow; writes
    work/run.json (packets, VM names) and work/traces.tsv (every alive trace's VM tag, number, address, size).
    `hotloop` (not "0"): LuaJIT's hotloop parameter in every VM of this process (the driver's and the plug-ins').
    `per_batch` ("1"): callgrind dumps its counts at each fill after the first (cg.out.1, .2, ...: one batch each)."""
    fillcg.use_tree(tree)
    cg = ctypes.CDLL(lib)
    if hotloop != "0":
        import luaprobe.shm.luajit as lj
        made = lj.new_runtime

        def new_runtime(*a, **k):
            lua = made(*a, **k)
            lua.execute(f'jit.opt.start("hotloop={int(hotloop)}")')
            return lua
        lj.new_runtime = new_runtime
    from luaprobe.engine.fastpath import run as runmod
    if hotloop != "0":
        from luaprobe.engine.plugins import vm as vmmod
        runmod.new_runtime = vmmod.new_runtime = lj.new_runtime     # the driver's VM and the plug-ins' VMs
    orig, on = runmod.method, [False]

    def method(lua, name):
        f = orig(lua, name)
        if name != "fill":
            return f

        def fill(d):
            if not on[0]:
                cg.cg_toggle()
                on[0] = True
            elif per_batch == "1":
                cg.cg_dump()
            r = f(d)
            if not r[0]:
                cg.cg_toggle()
                on[0] = False
            return r
        return fill
    runmod.method = method
    plugdir = os.path.join(work, "plugins")
    shapes.write(shape, plugdir, layer)
    fp = runmod.FastPath(runmod.RunConfig(plugins=[plugdir], files=[path] * int(repeat),
                                           out_dir=os.path.join(work, "out")))
    s = fp.run()
    if on[0]:
        cg.cg_toggle()
    rows, names = [_text(fp.driver_lua.eval(DUMP)("driver"))], {"driver": "driver"}
    for inst in fp.instances:
        tag = f"{os.path.basename(inst.vm.path)}-{inst.vm.instance}"
        names[tag] = os.path.basename(inst.vm.path)
        rows.append(_text(inst.vm.lua.eval(DUMP)(tag)))
    with open(os.path.join(work, "traces.tsv"), "w") as f:
        f.write("\n".join(r for r in rows if r) + "\n")
    with open(os.path.join(work, "run.json"), "w") as f:
        json.dump({"packets": s["packets"], "names": names}, f)


def _library(name: str) -> str:
    """A category for callgrind object `name`."""
    base = os.path.basename(name)
    if "lupa" in base or "luajit" in base.lower():
        return "lupa + LuaJIT runtime"
    if "python" in base:
        return "Python"
    if base.startswith("libc.") or base.startswith("libc-") or base.startswith("libm."):
        return "libc"
    if base.startswith("ld-linux"):
        return "ld.so"
    return base or "?"


def split(cgout: str, traces: list) -> tuple[collections.Counter, collections.Counter]:
    """({category: Ir}, {(VM tag, trace): Ir}) of callgrind output `cgout` (--dump-instr=yes --compress-pos=no),
    JIT code put in the trace whose machine code holds it (`traces`: sorted (start, end, tag, number))."""
    cats, per = collections.Counter(), collections.Counter()
    starts = [t[0] for t in traces]
    for a, ir, ob in jittraces.instr_costs(cgout):
        i = bisect.bisect_right(starts, a) - 1
        if i >= 0 and a < traces[i][1]:
            per[(traces[i][2], traces[i][3])] += ir
            cats[f"traces: {traces[i][2]}"] += ir
        elif ob in ("???", "?") or not ob.startswith("/"):
            cats["JIT, no trace"] += ir
        else:
            cats[_library(ob)] += ir
    return cats, per


LIB = fillcg.LIB + "void cg_dump(void) { CALLGRIND_DUMP_STATS; }\n"


def dumps(out: str) -> list:
    """The callgrind outputs of one process in order: out.1, out.2, ... (one a batch with --batches), then out."""
    parts = sorted(glob.glob(out + ".*"), key=lambda f: int(f.rsplit(".", 1)[1]))
    return parts + [out]


def totals(cgout: str) -> int:
    """Ir of callgrind output `cgout` (its summary line)."""
    with open(cgout) as f:
        for line in f:
            if line.startswith(("summary:", "totals:")):
                return int(line.split()[1])
    return 0


def measure(lib: str, tree: str, path: str, shape: str, repeat: int = 1, layer: str = "tcp", hotloop: int = 0,
            per_batch: bool = False) -> dict:
    """One process: {"ir": Ir a packet, "cats": {category: Ir a packet}, "top": [(Ir a packet, label)],
    "batches": [Ir of each batch] (with per_batch, else [])}."""
    work = tempfile.mkdtemp(prefix="lp-loopcg-")
    try:
        out = os.path.join(work, "cg.out")
        env = dict(os.environ, LUAPROBE_JIT_TRACES=os.path.join(work, "jt"))
        p = subprocess.run(["valgrind", "--tool=callgrind", "--collect-atstart=no", "--dump-instr=yes",
                            "--compress-pos=no", f"--callgrind-out-file={out}", sys.executable,
                            os.path.abspath(__file__), "--child", lib, path, shape, work, tree, str(repeat), layer,
                            str(hotloop), "1" if per_batch else "0"],
                           capture_output=True, text=True, env=env)
        if p.returncode or not os.path.exists(os.path.join(work, "run.json")):
            raise SystemExit(f"loopcg: {shape} {path}: exit {p.returncode}: {p.stderr[-800:]}")
        with open(os.path.join(work, "run.json")) as f:
            info = json.load(f)
        ranges, cats, per, batches = trace_ranges(work), collections.Counter(), collections.Counter(), []
        for part in dumps(out):
            c, q = split(part, ranges)
            cats.update(c)
            per.update(q)
            batches.append(totals(part))
        starts, n = trace_starts(work), info["packets"]
        top = [(v / n, f"{info['names'].get(t, t)} #{k} {starts.get((t, k), '?')}") for (t, k), v in per.items()]
        return {"ir": sum(cats.values()) / n, "cats": {k: v / n for k, v in cats.items()},
                "top": sorted(top, reverse=True), "names": info["names"], "batches": batches if per_batch else []}
    finally:
        if os.environ.get("LOOPCG_KEEP"):      # LOOPCG_KEEP=DIR: the callgrind output and trace dumps moved there
            shutil.copytree(work, os.path.join(os.environ["LOOPCG_KEEP"], os.path.basename(work)))
        shutil.rmtree(work, ignore_errors=True)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--child":
        child(*argv[1:10])
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--corpus", default="small-few,ipv6", help="traffic shapes (--quick captures)")
    ap.add_argument("--shapes", default="empty", help="plug-in shapes")
    ap.add_argument("--processes", type=int, default=3, help="processes per tree and cell")
    ap.add_argument("--tree", action="append", help="work tree whose engine/ and shm/ are measured (repeatable; "
                    "the trees alternate process by process)")
    ap.add_argument("--top", type=int, default=8, help="traces listed per process")
    ap.add_argument("--hotloop", type=int, default=0, help="LuaJIT's hotloop parameter in the driver's and the "
                    "plug-ins' VMs (0: LuaJIT's default, 56)")
    ap.add_argument("--batches", type=int, default=0, help="also print the Ir of the first K batches and the median "
                    "batch after them (the warm-up: callgrind dumps its counts at every fill)")
    ap.add_argument("--repeat", type=int, default=1, help="the capture given this many times (its later passes are "
                    "late packets, one bucket: the warm-up's share of a packet shrinks)")
    a = ap.parse_args(argv)
    if shutil.which("valgrind") is None:
        print("loopcg.py: valgrind is not installed", file=sys.stderr)
        return 2
    trees = [os.path.abspath(t) for t in (a.tree or [REPO])]
    with tempfile.TemporaryDirectory() as work:
        lib = os.path.join(work, "libcgtoggle.so")
        with open(os.path.join(work, "cg.c"), "w") as f:
            f.write(LIB)
        subprocess.run(["cc", "-O2", "-shared", "-fPIC", "-o", lib, os.path.join(work, "cg.c")], check=True)
        for c in a.corpus.split(","):
            path = corpus.make(c, True)
            for shape in a.shapes.split(","):
                got = {t: [] for t in trees}
                for _ in range(a.processes):
                    for t in trees:
                        r = measure(lib, t, path, shape, a.repeat, corpus.SHAPES[c].get("layer", "tcp"), a.hotloop,
                                    a.batches > 0)
                        got[t].append(r)
                        cats = ", ".join(f"{k} {v:.1f}" for k, v in sorted(r["cats"].items(), key=lambda x: -x[1])
                                         if v >= 0.5)
                        print(f"{c} {shape} {t}: {r['ir']:.1f} Ir a packet ({cats})", flush=True)
                        for v, label in r["top"][:a.top]:
                            print(f"    {v:7.1f}  {label}", flush=True)
                        if a.batches:
                            b = r["batches"]
                            later = b[a.batches:-1] or [0]
                            print(f"    batches: first {a.batches} " + " ".join(f"{x / 1e6:.1f}M" for x in b[:a.batches])
                                  + f" (sum {sum(b[:a.batches]) / 1e6:.1f}M), median later batch "
                                  f"{statistics.median(later) / 1e6:.2f}M, {len(b)} dumps", flush=True)
                for t in trees:
                    irs = [r["ir"] for r in got[t]]
                    print(f"== {c} {shape} {t}: Ir a packet min / median / max {min(irs):.1f} / "
                          f"{statistics.median(irs):.1f} / {max(irs):.1f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
