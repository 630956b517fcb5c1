"""Diagnostic: what LuaJIT compiled for the driver's fill loop and the flow table's key loop, per packet (issue 10).

    .venv/bin/python tools/bench/fillir.py [--corpus small-few] [--engine-dir DIR]

Runs tools/bench/stages.lua's pipeline (producer copying the --quick corpus capture into a packet ring in this
process, the real ``Driver:fill`` and flow table popping it) once, with a trace event hook attached to the VM, then
reads with ``jit.util.traceir`` each looping root trace that starts in engine/fastpath/driver.lua (the fill loop),
in flowtable.lua (update_batch's loops: the first is the key loop) or in stages.lua (a loop of decode only), and
prints per trace: where it starts, ``nins`` and ``per packet``
(the IR instructions after its LOOP: what runs on every iteration), the most frequent of those operations, and the
trace aborts seen in those two files.  IR operation names as tools/bench/walkir.py.
"""
from __future__ import annotations

import argparse
import collections
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)

from tools.bench import corpus, hookwalk  # noqa: E402
from tools.bench.walkir import IR_NAMES  # noqa: E402

RUN = r'''
local stages_path, addr, size = STAGES, ...
local ju = require("jit.util")
local starts, out = {}, {}
local function loc(func, pc) return ju.funcinfo(func, pc).loc or "?" end
-- the IR is read when each trace stops (a later flush would reuse its number)
jit.attach(function(what, tr, func, pc, a, b)
  if what == "start" then
    starts[tr] = { loc(func, pc), a }
  elseif what == "stop" then
    local s, info = starts[tr], ju.traceinfo(tr)
    if s and s[2] == nil and info and info.linktype == "loop" then
      local ops = {}
      for ref = 1, info.nins do
        local m, ot = ju.traceir(tr, ref)
        if m then ops[#ops + 1] = tostring(math.floor(ot / 256)) end
      end
      out[#out + 1] = s[1] .. "\t" .. table.concat(ops, ",")
    end
  elseif what == "abort" then
    out[#out + 1] = "abort\t" .. loc(func, pc) .. " error " .. tostring(a)
  end
end, "trace")
local stages = dofile(stages_path)
stages.run(addr, size, { runs = 1 })
jit.attach(function() end)
return table.concat(out, "\n")
'''


def fill_ir(capture: str, hotloop: int = 0) -> dict:
    """{start location: [IR op names]} of the looping root traces in driver.lua, flowtable.lua and stages.lua (its
    decode-only walk: tools/bench/stages.lua), plus
    "aborts": [location and error] of the aborts in those files, after one pipeline pass over `capture`.
    hotloop > 0: LuaJIT's hotloop parameter (loop iterations before a root trace is recorded; LuaJIT's default 56),
    which moves every loop's recording to another packet, as another process's hot counters would."""
    from luaprobe.engine.capture.pcapfile import open_capture
    from luaprobe.shm.luajit import new_runtime
    lua = new_runtime()
    if hotloop > 0:
        lua.execute(f"jit.opt.start('hotloop={int(hotloop)}')")
    with open_capture(capture) as cap:
        stages = os.path.join(REPO, "tools", "bench", "stages.lua")
        raw = lua.execute(RUN.replace("STAGES", repr(stages)), cap.address, cap.size)
    raw = raw.decode() if isinstance(raw, bytes) else raw
    res: dict = {"aborts": []}
    for line in filter(None, raw.split("\n")):
        where, _, rest = line.partition("\t")
        if where == "abort":
            if "driver.lua" in rest or "flowtable.lua" in rest or "decode.lua" in rest or "ring.lua" in rest:
                res["aborts"].append(rest)
        elif any(f in where for f in ("driver.lua", "flowtable.lua", "stages.lua")):
            res[where] = [IR_NAMES[int(o)] for o in rest.split(",")]
    return res


def per_packet(ops: list) -> list:
    """The operations after LOOP (all of them when the trace has none)."""
    return ops[ops.index("LOOP") + 1:] if "LOOP" in ops else ops


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--corpus", default="small-few", help="a traffic shape (--quick capture)")
    ap.add_argument("--engine-dir", help="luaprobe.engine's Lua modules from this folder")
    a = ap.parse_args(argv)
    if a.engine_dir:
        hookwalk.use_engine_dir(a.engine_dir)
    res = fill_ir(corpus.make(a.corpus, True))
    for where, ops in res.items():
        if where == "aborts":
            continue
        part = per_packet(ops)
        c = collections.Counter(part)
        print(f"{where}: nins {len(ops)}, per packet {len(part)}: "
              + ", ".join(f"{op} {n}" for op, n in c.most_common(12)))
    print(f"aborts: {len(res['aborts'])}" + "".join(f"\n  {x}" for x in res["aborts"][:20]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
