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
tools/bench/jittraces.py's ``jit.attach`` hook logging each trace's machine-code range, start line, parent trace and
exit, link): Ir a packet in each trace's pre-loop part and loop, Ir outside trace code (interpreter, recorder, exit
handling), and the aborted recordings of both passes (count, pass, start line, parent / exit, LuaJIT error number).
Start lines are those of
flowtable.lua with flowtable_loops.py's marks inserted (after the first mark, one to three more than in the file).
The hook adds up to a few Ir a packet (http, session 21's known_runs with a repeat loop: 344.2-349.8 in 52 processes
with it, 342.9-345.3 in 7 without).  Environment: FLOWTABLE_CG_KEEP=DIR keeps the callgrind output and the trace log in DIR;
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

from tools.bench import jittraces  # noqa: E402

PARTS = {"all": 0, "key": 1, "touch": 2, "probe": 3, "lru": 4, "reserve": 5, "new": 6, "loop3": 7, "prefault": 8,
         "decode": 9}
EVENTS = ("Ir", "Dr", "Dw", "I1mr", "D1mr", "D1mw", "ILmr", "DLmr", "DLmw", "Bc", "Bcm", "Bi", "Bim")
SHOW = ("Ir", "D1mr", "D1mw", "DLmr", "DLmw", "Bcm")
LIB = r"""
#include <valgrind/callgrind.h>
void cg_toggle(void) { CALLGRIND_TOGGLE_COLLECT; }
void cg_start(void) { CALLGRIND_START_INSTRUMENTATION; }
"""


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
        jittraces.install(lua, bool(os.environ.get("FLOWTABLE_CG_TEXIT")),
                          "flowtable" if os.environ.get("FLOWTABLE_CG_LINES") else None)
    pkts, linktype = read_pcap(corpus.make(shape, True))
    frames = b"".join(p[2] for p in pkts)
    fn(frames, lua.table_from([len(p[2]) for p in pkts]), lua.table_from([p[0] for p in pkts]),
       lua.table_from([p[1] for p in pkts]), 1 << 20, linktype, passes, False, 16384)
    print(f"packets {len(pkts)}")
    if tlog:
        jittraces.write_log(lua, tlog)


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
            extra = list(jittraces.CALLGRIND_ARGS) if a.traces else []
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
                print(jittraces.report(out, tlog, n, ev.get("Ir", 0), a.traces), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
