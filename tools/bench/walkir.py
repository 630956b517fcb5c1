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
# constant key, and of each HLOAD / HSTORE through an HREFK (the field it loads or stores: "op" or "op:key").
# With `side`, the traces that link back to it follow (each whole: a side exit of the loop taken often enough runs
# one of them instead of the rest of the loop).
DUMP = r'''function(HREFK, HREF, HLOAD, HSTORE, side)
  local ju = require("jit.util")
  local best, bn = nil, 0
  for tr = 1, 65535 do             -- no break at a missing number: an aborted trace's number is left free
    local info = ju.traceinfo(tr)
    if info ~= nil and info.linktype == "loop" and info.nins > bn then best, bn = tr, info.nins end
  end
  if best == nil then return "" end
  local ops = {}
  local todo = { best }
  if side then
    for tr = 1, 65535 do
      local info = ju.traceinfo(tr)
      if info ~= nil and tr ~= best and info.link == best then todo[#todo + 1] = tr end
    end
  end
  for _, t in ipairs(todo) do
  best, bn = t, ju.traceinfo(t).nins
  for ref = 1, bn do
    local m, ot, op1, op2 = ju.traceir(best, ref)
    if m then
      local op = math.floor(ot / 256)
      if (op == HLOAD or op == HSTORE) and op1 > 0 then         -- the field: its HREFK's key
        local _, rot, _, rop2 = ju.traceir(best, op1)
        if math.floor(rot / 256) == HREFK then op2 = rop2 else op2 = 0 end
      end
      local keyed = op == HREFK or ((op == HREF or op == HLOAD or op == HSTORE) and op2 < 0)
      ops[#ops + 1] = keyed and (op .. ":" .. tostring((ju.tracek(best, op2)))) or tostring(op)
    end
  end
  end
  return table.concat(ops, ",")
end'''


#: flow table capacity of hookwalk.BUILD's flows (a packet_storage walk's slots)
CAPACITY = 262144

#: script type -> (what sets the first VM's walk up: Lua function(host, capacity, dir) -> problem or nil, the Host
#: method that walks a batch); as engine/fastpath/run.py BATCH_WALKERS, packet_storage with a store of its own
SETUPS = {
    "simplecounter": ("function(h) return h:setup_simplecounter() end", "run_batch"),
    "protocol_handler": ("function(h) return h:setup_protocol_handler() end", "run_protocol_batch"),
    "packet_storage": ("""function(h, cap, dir)
        local st = require("luaprobe.engine.plugins.packetstore").new_store(dir .. "/packets.pcapng", cap)
        h.walkir_store = st
        return h:setup_packet_storage(st.store_addr, cap)
      end""", "run_storage_batch"),
}


def _load(plugdir: str, vms: list, kind: str, protocols, tmpdir: str) -> list:
    """Every plug-in file of ``plugdir`` (sorted) in a frontend PluginVM of its own (appended to ``vms``), its walk of
    type ``kind`` set up (SETUPS); [(host, walk(host, addr, n))]."""
    from luaprobe.engine.plugins.vm import PluginVM
    setup, method = SETUPS[kind]
    out = []
    for f in sorted(os.listdir(plugdir)):
        vm = PluginVM(os.path.join(plugdir, f), start_workers=False, enginetype="frontend",
                      pipeline="frontend", groups={}, protocols=protocols)
        vms.append(vm)
        problem = vm.lua.eval(setup)(vm.host, CAPACITY, tmpdir.encode())
        assert problem is None, problem
        out.append((vm.host, vm.lua.eval(f"function(h, a, n) return h:{method}(a, n) end")))
    return out


def walk_ir(capture: str, plugdir: str, kind: str = "simplecounter", protocols=(), side: bool = False) -> list:
    """Walk `capture` with the plug-ins of `plugdir` (hookwalk.py's staging; scripts of type `kind`, SETUPS;
    `protocols`: [(guid, name)] registered in each VM, a protocol_handler's own), then the IR of the first VM's walk
    loop trace: [(operation name, key of an HREFK, of an HREF by a constant key or of an HLOAD / HSTORE through an
    HREFK, else None)], empty when no loop trace was compiled; with `side`, followed by those of every trace that
    links back to that loop (its side traces).  The VMs' engine/plugins/jitprof.lua logs (LUAPROBE_JIT_TRACES, ...)
    are written at the end, as at a run's end."""
    from luaprobe.engine.capture.pcapfile import open_capture
    from luaprobe.shm.luajit import new_runtime
    lua = new_runtime()
    with open_capture(capture) as cap, tempfile.TemporaryDirectory(prefix="lp-walkir-") as tmpdir:
        keep, addr, n, size, hot, stage = lua.eval(hookwalk.BUILD)(cap.address, cap.size, CAPACITY)
        vms: list = []
        try:
            walks = _load(plugdir, vms, kind, protocols, tmpdir)
            for k in range(0, n, 1024):
                m = min(1024, n - k)
                stage(k, m)
                for host, walk in walks:
                    walk(host, hot, m)
            raw = vms[0].lua.eval(DUMP)(*(IR_NAMES.index(op) for op in ("HREFK", "HREF", "HLOAD", "HSTORE")), side)
            for vm in vms:      # LUAPROBE_JIT_TRACES / _ABORTS / _PROFILE logs written, as at a run's end
                vm.lua.eval("function(h) h.stop_profile() end")(vm.host)
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
