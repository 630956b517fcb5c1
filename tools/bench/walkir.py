"""Diagnostic: what LuaJIT compiled for a simplecounter's batch walk, per packet (issue 10).

    .venv/bin/python tools/bench/walkir.py --body 'PRELUDE|BODY' [--body ...] [--corpus small-few] [--engine-dir DIR]

For each --body (a TCP simplecounter whose onpacket runs BODY, module-level PRELUDE, as in tools/bench/hookwalk.py)
walks the whole --quick corpus capture once, as hookwalk.py does (flows from the real flow table, each batch staged
in one hot batch array), then reads the plug-in VM's largest looping trace (the walk loop of engine/plugins/host.lua
with the hook inlined) with ``jit.util.traceir`` and prints:

* ``nins``: its IR instructions; ``per packet``: those after its LOOP instruction, the part LuaJIT runs on every
  iteration (what it could not hoist out of the loop or forward from an earlier store);
* the most frequent IR operations of that part;
* the keys of its ``HREFK`` (a table field looked up by a constant key: the walk's and the bindings' own fields,
  method lookups through ``__index``), each a load and a guard redone per packet;
* the keys of its ``HREF`` by a constant key: a lookup of a key the table does not hold (a hash search), e.g. a
  method looked up in an object before its metatable's ``__index``.

Comparing two bodies shows what a hook's code does to the walk around it: e.g. a store into a script's table
with a key LuaJIT cannot tell apart from the walk's own fields (``s[id] = ...`` with a string id) makes it redo
the bindings' field lookups on every packet (docs/benchmarks.md, session 11).  The operation names are LuaJIT
2.1's IR order (src/lj_ir.h, IRDEF); lupa's LuaJIT ships no jit/vmdef.lua to read them from.
"""
from __future__ import annotations

import argparse
import collections
import os
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)

from tools.bench import corpus, hookwalk, shapes  # noqa: E402

IR_NAMES = (
    "LT GE LE GT ULT UGE ULE UGT EQ NE ABC RETF NOP BASE PVAL GCSTEP HIOP LOOP USE PHI RENAME PROF "
    "KPRI KINT KGC KPTR KKPTR KNULL KNUM KINT64 KSLOT BNOT BSWAP BAND BOR BXOR BSHL BSHR BSAR BROL BROR "
    "ADD SUB MUL DIV MOD POW NEG ABS LDEXP MIN MAX FPMATH ADDOV SUBOV MULOV AREF HREFK HREF NEWREF UREFO UREFC "
    "FREF TMPREF STRREF LREF ALOAD HLOAD ULOAD FLOAD XLOAD SLOAD VLOAD ALEN ASTORE HSTORE USTORE FSTORE XSTORE "
    "SNEW XSNEW TNEW TDUP CNEW CNEWI BUFHDR BUFPUT BUFSTR TBAR OBAR XBAR CONV TOBIT TOSTR STRTO CALLN CALLA "
    "CALLL CALLS CALLXS CARG").split()

# The VM's largest trace that loops: its IR operations in order, with the key of each HREFK and of each HREF by a
# constant key ("op" or "op:key").
DUMP = r'''function(HREFK, HREF)
  local ju = require("jit.util")
  local best, bn = nil, 0
  for tr = 1, 65535 do
    local info = ju.traceinfo(tr)
    if info == nil then break end
    if info.linktype == "loop" and info.nins > bn then best, bn = tr, info.nins end
  end
  if best == nil then return "" end
  local ops = {}
  for ref = 1, bn do
    local m, ot, _, op2 = ju.traceir(best, ref)
    if m then
      local op = math.floor(ot / 256)
      local keyed = op == HREFK or (op == HREF and op2 < 0)
      ops[#ops + 1] = keyed and (op .. ":" .. tostring((ju.tracek(best, op2)))) or tostring(op)
    end
  end
  return table.concat(ops, ",")
end'''


def walk_ir(capture: str, plugdir: str) -> list:
    """Walk `capture` with the plug-ins of `plugdir` (hookwalk.py's staging), then the IR of the first VM's walk
    loop trace: [(operation name, key of an HREFK or of an HREF by a constant key, else None)], empty when no loop
    trace was compiled."""
    from luaprobe.engine.capture.pcapfile import open_capture
    from luaprobe.shm.luajit import new_runtime
    lua = new_runtime()
    with open_capture(capture) as cap:
        keep, addr, n, size, hot, stage = lua.eval(hookwalk.BUILD)(cap.address, cap.size, 262144)
        vms: list = []
        try:
            walks = hookwalk.load_walks(plugdir, vms)
            for k in range(0, n, 1024):
                m = min(1024, n - k)
                stage(k, m)
                for host, walk in walks:
                    walk(host, hot, m)
            raw = vms[0].lua.eval(DUMP)(IR_NAMES.index("HREFK"), IR_NAMES.index("HREF"))
        finally:
            for vm in vms:
                vm.close()
        del keep
    raw = raw.decode() if isinstance(raw, bytes) else raw
    out = []
    for x in filter(None, raw.split(",")):
        op, _, key = x.partition(":")
        i = int(op)
        out.append((IR_NAMES[i] if i < len(IR_NAMES) else op, key or None))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--body", action="append", required=True, help="'PRELUDE|BODY' of a TCP simplecounter")
    ap.add_argument("--corpus", default="small-few", help="a traffic shape (--quick capture)")
    ap.add_argument("--engine-dir", help="luaprobe.engine's Lua modules from this folder")
    a = ap.parse_args(argv)
    if a.engine_dir:
        hookwalk.use_engine_dir(a.engine_dir)
    capture = corpus.make(a.corpus, True)
    for b in a.body:
        with tempfile.TemporaryDirectory(prefix="lp-walkir-") as d:
            pre, _, body = b.partition("|")
            with open(os.path.join(d, "body.lua"), "w") as f:
                f.write(shapes._simple("body", "tcp", body, prelude=pre))
            ir = walk_ir(capture, d)
        names = [op for op, _ in ir]
        part = ir[names.index("LOOP") + 1:] if "LOOP" in names else ir
        ops = collections.Counter(op for op, _ in part)
        print(f"{b}\n  nins {len(ir)}, per packet {len(part)}: "
              + ", ".join(f"{op} {c}" for op, c in ops.most_common(10))
              + f"\n  HREFK per packet: {', '.join(k for op, k in part if op == 'HREFK') or 'none'}"
              + f"\n  HREF by a constant key per packet: {', '.join(k for op, k in part if op == 'HREF' and k) or 'none'}",
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
