"""Instruction, cache-miss and branch counts of each part of the flow table's update_batch under callgrind (issue 10).

    python tools/bench/flowtable_cg.py [--corpus flows-1m] [--parts all,key,touch,probe,lru,reserve,new,loop3,prefault,decode]
        [--tree WORKTREE] [--ll 33554432,16,64] [--warm] [--hotloop N] [--traces K]

tools/bench/flowtable_loops.py's pass 1 (a fresh table at the driver's capacity, 4 KiB pages, the prefault helper
16 384 records ahead, the --quick capture in 1 024-packet batches) runs once per part under
``valgrind --tool=callgrind --cache-sim=yes --branch-sim=yes --instr-atstart=no --collect-atstart=no``; the marks
flowtable_loops.py puts before each loop of update_batch call a two-function C library (built here with cc from
valgrind/callgrind.h) that toggles collection on when the part starts and off when it ends, so each run counts only
that part (``all``: the whole update_batch; ``decode``: decode.decode of the batch, not the flow table).  Printed per
packet: Ir (instructions), D1mr / D1mw (L1 misses), DLmr / DLmw (last-level misses), Bcm (mispredicted conditional
branches).  Counts, not time: repeatable on a loaded machine.  ``--ll``: callgrind's last-level cache (size, ways,
line); the default is this benchmark VM's L3 (it reports 384 MiB to cpuid, which callgrind would simulate).  In the
``reserve`` part, ``rep stosb`` (ffi.fill) counts one instruction and branch per byte.  JIT compilation inside a part
is counted in it; ``--warm`` counts a second pass only (the same packets a capture's span later: every flow known,
the traces compiled), the steady state without the compiler.  ``--hotloop N`` (LuaJIT's hotloop, default 56) records
each loop's trace on another packet: which packet that is otherwise differs between processes (shared hot counters,
random penalty bits), so a form whose count moves with N is not the same in every process.

``--traces K`` also lists, for each part's process, the K traces with the most Ir (callgrind ``--dump-instr=yes`` and
a ``jit.attach`` hook logging each trace's machine-code range, start line, parent trace and exit, link): Ir a packet
in each trace's pre-loop part and loop, Ir outside trace code (interpreter, recorder, exit handling), and the aborted
recordings of both passes (count, pass, start line, parent / exit, LuaJIT error number).  Start lines are those of
flowtable.lua with flowtable_loops.py's marks inserted (after the first mark, one to three more than in the file).
The hook adds up to a few Ir a packet (http, branch loop3-known-runs: 344.2-349.8 in 52 processes with it,
342.9-345.3 in 7 without).  Environment: FLOWTABLE_CG_KEEP=DIR keeps the callgrind output and the trace log in DIR;
FLOWTABLE_CG_TEXIT=1 also counts the counted pass's exits to the interpreter (exits without a side trace);
FLOWTABLE_CG_LINES=1 logs the lines each trace recorded (a ``record`` hook: ~45 Ir a packet more outside trace code
on http).  Needs valgrind and its headers (Debian: valgrind).
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, REPO)

PARTS = {"all": 0, "key": 1, "touch": 2, "probe": 3, "lru": 4, "reserve": 5, "new": 6, "loop3": 7, "prefault": 8,
         "decode": 9}
EVENTS = ("Ir", "Dr", "Dw", "I1mr", "D1mr", "D1mw", "ILmr", "DLmr", "DLmw", "Bc", "Bcm", "Bi", "Bim")
SHOW = ("Ir", "D1mr", "D1mw", "DLmr", "DLmw", "Bcm")
LIB = r"""
#include <valgrind/callgrind.h>
void cg_toggle(void) { CALLGRIND_TOGGLE_COLLECT; }
void cg_start(void) { CALLGRIND_START_INSTRUMENTATION; }
"""


# --traces (in the child, FLOWTABLE_CG_TRACES=path): every trace's machine code range, start (line, parent trace and
# exit), link and, with FLOWTABLE_CG_LINES, the flowtable.lua lines it recorded; the aborted recordings (and with
# FLOWTABLE_CG_TEXIT the counted pass's exits to the interpreter) in path.aborts
TRACE_HOOK = r"""
local jutil = require "jit.util"
TRACES = {}
local cur = {}
jit.attach(function(what, tr, func, pc, otr, oex)
  if what == "start" then
    local fi = jutil.funcinfo(func, pc)
    cur[tr] = {line = fi.currentline or -1, src = fi.source or "?", parent = otr or 0, exit = oex or 0, lines = {},
               seen = {}}
  elseif what == "stop" then
    local c = cur[tr]
    local mc, addr, loop = jutil.tracemc(tr)
    local ti = jutil.traceinfo(tr)
    if c and mc then
      TRACES[#TRACES + 1] = string.format("%d %s %d %d %d %d %d %d %d %s %s", tr, tostring(c.src):gsub("%s", "_"),
        c.line, c.parent, c.exit, addr, #mc, loop or 0, ti.link, ti.linktype, table.concat(c.lines, ","))
    end
  elseif what == "abort" then
    local c = cur[tr]
    if c then
      local k = string.format("pass %d: abort line %d parent %d/%d: %s", COLLECT and 2 or 1, c.line, c.parent, c.exit,
                              tostring(otr))
      ABORTS[k] = (ABORTS[k] or 0) + 1
    end
    cur[tr] = nil
  end
end, "trace")
ABORTS = {}
if os.getenv("FLOWTABLE_CG_TEXIT") then
  jit.attach(function(tr, ex)
    if COLLECT then local k = "exit " .. tr .. "/" .. ex; ABORTS[k] = (ABORTS[k] or 0) + 1 end
  end, "texit")
end
function ABORT_LIST()
  local t = {}
  for k, v in pairs(ABORTS) do t[#t + 1] = v .. " " .. k end
  table.sort(t)
  return table.concat(t, "\n")
end
if os.getenv("FLOWTABLE_CG_LINES") then jit.attach(function(tr, func, pc, depth)
  local c = cur[tr]
  if not c then return end
  local fi = jutil.funcinfo(func, pc)
  local l = fi.currentline
  if l and not c.seen[l] and (fi.source or ""):find("flowtable") then c.seen[l] = true; c.lines[#c.lines + 1] = l end
end, "record") end
"""


def trace_costs(cgout: str, tlog: str) -> list:
    """Ir of each trace's machine code (callgrind --dump-instr=yes --compress-pos=no output, the TRACE_HOOK log):
    rows (trace, source, start line, parent, exit, link, linktype, Ir in the pre-loop part, Ir in the loop, lines);
    Ir summed over the counted part (divide by the packet count for a packet's share)."""
    import bisect
    tr = []
    for ln in open(tlog):
        f = ln.split()
        if len(f) < 10:
            continue
        tr.append((int(f[5]), int(f[6]), int(f[7]), f))
    tr.sort()
    starts = [t[0] for t in tr]
    pre, body = [0] * len(tr), [0] * len(tr)
    skip, col = False, 1
    for ln in open(cgout):
        if ln.startswith("positions:"):
            col = len(ln.split()) - 1         # "instr line": the Ir column after both positions
            continue
        if skip:
            skip = False
            continue
        if ln.startswith("calls="):
            skip = True
            continue
        if not ln.startswith("0x"):
            continue
        f = ln.split()
        a = int(f[0], 16)
        i = bisect.bisect_right(starts, a) - 1
        if i >= 0 and a < tr[i][0] + tr[i][1] and len(f) > col:
            if tr[i][2] and a >= tr[i][0] + tr[i][2]:
                body[i] += int(f[col])
            else:
                pre[i] += int(f[col])
    rows = []
    for i, (addr, size, loop, f) in enumerate(tr):
        rows.append((int(f[0]), f[1], int(f[2]), int(f[3]), int(f[4]), int(f[8]), f[9], pre[i], body[i],
                     f[10] if len(f) > 10 else ""))
    return rows


def child(lib: str, tree: str, part: int, shape: str, passes: int = 1, hotloop: int = 0) -> None:
    """Under callgrind: flowtable_loops.py's bench with the toggles (tree: whose flowtable.lua), counting in the last of
    `passes` passes only; hotloop > 0: LuaJIT's hotloop parameter (jit.opt.start), else its default (56)."""
    from tools.bench import corpus, flowtable_loops as fl
    from tools.bench.flowtable_ab import read_pcap
    bench = fl.BENCH
    edits = [
        ('ffi.cdef [[\ntypedef struct {\n  const uint8_t *data;',
         f'local cg = ffi.load({lib!r})\nffi.cdef "void cg_toggle(void); void cg_start(void);"\n'
         'ffi.cdef [[\ntypedef struct {\n  const uint8_t *data;'),
        ("function LOOPS_MARK(i) local t = clock(); acc[last] = acc[last] + t - tl; last = i; tl = t end",
         "PART = 0\nfunction LOOPS_MARK(i) if COLLECT and PART > 0 and PART < 9 and ((last == PART) ~= (i == PART)) then "
         "cg.cg_toggle() end; last = i end"),
        ("        decode.decode(p.d, p.data, p.caplen, linktype)\n",
         "        if PART == 9 and COLLECT then cg.cg_toggle() end\n        decode.decode(p.d, p.data, p.caplen, linktype)\n"
         "        if PART == 9 and COLLECT then cg.cg_toggle() end\n"),
        ("      ft:update_batch(b + k, m)\n      LOOPS_MARK(0)\n",
         "      if PART == 0 and COLLECT then cg.cg_toggle() end\n      ft:update_batch(b + k, m)\n      LOOPS_MARK(0)\n"
         "      if PART == 0 and COLLECT then cg.cg_toggle() end\n"),
        ("  for pass = 1, passes do", "  cg.cg_start()\n  for pass = 1, passes do\n    COLLECT = pass == passes"),
    ]
    for old, new in edits:
        if old not in bench:
            raise SystemExit(f"flowtable_cg: tools/bench/flowtable_loops.py changed: {old[:40]!r} not found")
        bench = bench.replace(old, new, 1)
    fl.BENCH = bench
    lua, fn = fl.side(None, tree)
    if hotloop > 0:
        lua.execute(f"jit.opt.start('hotloop={hotloop}')")
    lua.execute(f"PART = {part}")
    tlog = os.environ.get("FLOWTABLE_CG_TRACES")
    if tlog:
        lua.execute(TRACE_HOOK)
    pkts, linktype = read_pcap(corpus.make(shape, True))
    frames = b"".join(p[2] for p in pkts)
    fn(frames, lua.table_from([len(p[2]) for p in pkts]), lua.table_from([p[0] for p in pkts]),
       lua.table_from([p[1] for p in pkts]), 1 << 20, linktype, passes, False, 16384)
    print(f"packets {len(pkts)}")
    if tlog:
        with open(tlog, "wb") as f:
            f.write(lua.eval("table.concat(TRACES, '\\n')"))
        with open(tlog + ".aborts", "wb") as f:
            f.write(lua.eval("ABORT_LIST()"))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--corpus", default="flows-1m")
    ap.add_argument("--parts", default=",".join(PARTS))
    ap.add_argument("--tree", default=REPO, help="work tree whose engine/fastpath/flowtable.lua is measured "
                    "(decode.lua: this tree's)")
    ap.add_argument("--ll", default="33554432,16,64", help="callgrind --LL (size,assoc,line)")
    ap.add_argument("--warm", action="store_true",
                    help="count the second pass over the capture only (its packets a second later: the flows are "
                         "known, the traces compiled in the first pass)")
    ap.add_argument("--hotloop", type=int, default=0,
                    help="LuaJIT's hotloop parameter (iterations before a loop's trace is recorded; default: LuaJIT's "
                         "56): another value records each loop's trace on another packet, as a different hot count or "
                         "penalty state in another process would")
    ap.add_argument("--traces", type=int, default=0, metavar="K",
                    help="also print the K traces with the most Ir (per packet) in each part's process: trace number, "
                         "start line (parent trace / exit for a side trace), link, Ir in the pre-loop part and in the "
                         "loop, and the flowtable.lua lines recorded (callgrind --dump-instr=yes, a jit.attach hook)")
    ap.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        child(a.child[0], a.tree, int(a.child[1]), a.child[2], int(a.child[3]), a.hotloop)
        return 0
    with tempfile.TemporaryDirectory() as work:
        if os.environ.get("FLOWTABLE_CG_KEEP"):
            work = os.environ["FLOWTABLE_CG_KEEP"]
        lib = os.path.join(work, "libcgtoggle.so")
        with open(os.path.join(work, "cg.c"), "w") as f:
            f.write(LIB)
        subprocess.run(["cc", "-O2", "-shared", "-fPIC", "-o", lib, os.path.join(work, "cg.c")], check=True)
        print(f"{a.corpus}, {a.tree}{' (second pass)' if a.warm else ''}"
              f"{f', hotloop {a.hotloop}' if a.hotloop else ''}: per packet " + " ".join(SHOW))
        for name in a.parts.split(","):
            out = os.path.join(work, f"cg.{name}.out")
            tlog = os.path.join(work, f"traces.{name}")
            env = dict(os.environ, FLOWTABLE_CG_TRACES=tlog) if a.traces else None
            extra = ["--dump-instr=yes", "--compress-pos=no"] if a.traces else []
            p = subprocess.run(["valgrind", "--tool=callgrind", "--instr-atstart=no", "--collect-atstart=no", *extra,
                                "--cache-sim=yes", "--branch-sim=yes", f"--LL={a.ll}", f"--callgrind-out-file={out}",
                                sys.executable, os.path.abspath(__file__), "--tree", a.tree, "--hotloop", str(a.hotloop),
                                "--child", lib, str(PARTS[name]), a.corpus, "2" if a.warm else "1"],
                               capture_output=True, text=True, env=env)
            got = re.search(r"Collected : ([\d ]+)", p.stderr)
            npk = re.search(r"packets (\d+)", p.stdout)
            if p.returncode or not got or not npk:
                raise SystemExit(f"flowtable_cg: {name}: exit {p.returncode}: {p.stderr[-500:]}")
            ev = dict(zip(EVENTS, map(int, got.group(1).split())))
            n = int(npk.group(1))
            print(f"{name:8} " + " ".join(f"{k} {ev.get(k, 0) / n:.2f}" for k in SHOW), flush=True)   # a part that
            # never ran (no event collected) prints zeros
            if a.traces:
                rows = sorted(trace_costs(out, tlog), key=lambda r: -(r[7] + r[8]))
                jit = sum(r[7] + r[8] for r in rows)
                print(f"  traces: {len(rows)}, Ir a packet in trace code {jit / n:.2f}, elsewhere (interpreter, "
                      f"recorder, exit handling) {ev.get('Ir', 0) / n - jit / n:.2f}; aborted recordings (count, "
                      f"pass, start line, parent trace / exit, LuaJIT error: 8 leaving loop in root trace, 9 inner "
                      f"loop in root trace, 10 loop unroll limit):")
                for ln in sorted(open(tlog + ".aborts").read().splitlines(), key=lambda x: -int(x.split()[0]))[:16]:
                    print(f"    {ln}")
                for r in rows[:a.traces]:
                    start = f"line {r[2]}" + (f" (side of {r[3]}/{r[4]})" if r[3] else "")
                    print(f"  #{r[0]:<4} {start:26} -> {r[5]} {r[6]:8} Ir pre {r[7] / n:7.2f} loop {r[8] / n:7.2f}"
                          + (f"  lines {r[9][:160]}" if r[9] else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
