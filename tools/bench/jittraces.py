"""Ir of each LuaJIT trace of one callgrind process (issue 10): shared by tools/bench/flowtable_cg.py and
tools/bench/fillcg.py's ``--traces K``.

The child process runs ``HOOK`` in its Lua VM before the measured code: a ``jit.attach`` hook that keeps, for every
trace compiled, its machine-code range (``jit.util.tracemc``: address, size, loop offset), source and start line,
parent trace and exit (0 / 0 for a root trace), link and link type (``jit.util.traceinfo``), and counts the aborted
recordings (pass 1, or pass 2 once the Lua global ``COLLECT`` is true) by start line, parent / exit and LuaJIT error
number.  ``write_log(lua, path)`` stores both (the traces in ``path``, one a line; the aborts in ``path.aborts``).
The parent, under ``valgrind --tool=callgrind --dump-instr=yes --compress-pos=no``, gets each trace's Ir from the
callgrind output with ``trace_costs`` and prints them with ``report``.  Lua globals read by the hook when set before it
runs: ``TRACE_WHERE`` (a function of the start's ``jit.util.funcinfo``, called at each root trace's start: its text,
without spaces, is printed after that trace, e.g. which packet the recording began on), ``TRACE_TEXIT`` (also
count the counted pass's exits to the interpreter, ``exit T/E``), ``TRACE_LINES`` (a Lua pattern: log the lines
each trace recorded in sources matching it; a ``record`` hook, tens of Ir a packet more outside trace code).
The hook itself adds a few Ir a packet.
"""
from __future__ import annotations

import bisect
import os
import re

HOOK = r"""
local jutil = require "jit.util"
TRACES = {}
local function shortsrc(s)   -- "@/a/b/driver.lua" -> "driver.lua", "=luaprobe.engine.fastpath.decode" -> "decode"
  s = tostring(s)
  if s:sub(1, 1) == "=" then return (s:match("[^.]*$")) end
  return (s:match("[^/]*$"))
end
local cur = {}
jit.attach(function(what, tr, func, pc, otr, oex)
  if what == "start" then
    local fi = jutil.funcinfo(func, pc)
    cur[tr] = {line = fi.currentline or -1, src = fi.source or "?", parent = otr or 0, exit = oex or 0, lines = {},
               seen = {}, where = (otr or 0) == 0 and TRACE_WHERE and TRACE_WHERE(fi) or "-"}
  elseif what == "stop" then
    local c = cur[tr]
    local mc, addr, loop = jutil.tracemc(tr)
    local ti = jutil.traceinfo(tr)
    if c and mc then
      TRACES[#TRACES + 1] = string.format("%d %s %d %d %d %d %d %d %d %s %d %s %s", tr,
        tostring(c.src):gsub("%s", "_"), c.line, c.parent, c.exit, addr, #mc, loop or 0, ti.link, ti.linktype,
        COLLECT and 2 or 1, tostring(c.where):gsub("%s", "_"), table.concat(c.lines, ","))
    end
  elseif what == "abort" then
    local c = cur[tr]
    if c then
      local k = string.format("pass %d: abort %s:%d parent %d/%d: %s", COLLECT and 2 or 1,
                              shortsrc(c.src), c.line, c.parent, c.exit, tostring(otr))
      ABORTS[k] = (ABORTS[k] or 0) + 1
    end
    cur[tr] = nil
  end
end, "trace")
ABORTS = {}
if TRACE_TEXIT then
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
if TRACE_LINES then jit.attach(function(tr, func, pc, depth)
  local c = cur[tr]
  if not c then return end
  local fi = jutil.funcinfo(func, pc)
  local l = fi.currentline
  if l and not c.seen[l] and (fi.source or ""):find(TRACE_LINES) then c.seen[l] = true; c.lines[#c.lines + 1] = l end
end, "record") end
"""

CALLGRIND_ARGS = ("--dump-instr=yes", "--compress-pos=no")


def install(lua, texit: bool = False, lines: str | None = None) -> None:
    """Attach HOOK in lupa runtime `lua` (before the measured code runs); `texit`: count exits to the interpreter in
    the counted pass; `lines`: Lua pattern of the sources whose recorded lines are logged."""
    if texit:
        lua.execute("TRACE_TEXIT = true")
    if lines:
        lua.execute(f"TRACE_LINES = {lines!r}")
    lua.execute(HOOK)


def write_log(lua, path: str) -> None:
    """Store the hook's trace list in `path` and its abort counts in `path`.aborts (text, one a line)."""
    with open(path, "wb") as f:
        f.write(lua.eval("table.concat(TRACES, '\\n')"))
    with open(path + ".aborts", "wb") as f:
        f.write(lua.eval("ABORT_LIST()"))


def instr_costs(cgout: str):
    """(address, Ir, object file) of each instruction's cost line of callgrind output `cgout` (--dump-instr=yes
    --compress-pos=no), in file order; the inclusive cost line after each ``calls=`` line is skipped.  Object names
    are defined once, in an ``ob=`` or ``cob=`` line, then referred to by their id."""
    obs, ob, skip, col = {}, "?", False, 1
    for ln in open(cgout):
        if ln.startswith("positions:"):
            col = len(ln.split()) - 1         # "instr line": the Ir column after both positions
            continue
        if ln.startswith("ob=") or ln.startswith("cob="):
            m = re.match(r"c?ob=\((\d+)\)(?: (.*))?", ln.strip())
            name = (obs.setdefault(m.group(1), m.group(2)) if m.group(2) else obs.get(m.group(1), "?")) if m \
                else ln.strip().split("=", 1)[1]
            if ln.startswith("ob="):
                ob = name
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
        if len(f) > col:
            yield int(f[0], 16), int(f[col]), ob


def trace_costs(cgout: str, tlog: str) -> list:
    """Ir of each trace's machine code (callgrind --dump-instr=yes --compress-pos=no output, the HOOK log):
    rows (trace, source, start line, parent, exit, link, linktype, Ir in the pre-loop part, Ir in the loop, lines,
    pass compiled in: 2 once the Lua global COLLECT was true, where: TRACE_WHERE's text or "-");
    Ir summed over the counted part (divide by the packet count for a packet's share)."""
    tr = []
    for ln in open(tlog):
        f = ln.split()
        if len(f) < 12:
            continue
        tr.append((int(f[5]), int(f[6]), int(f[7]), f))
    tr.sort()
    starts = [t[0] for t in tr]
    pre, body = [0] * len(tr), [0] * len(tr)
    for a, ir, _ in instr_costs(cgout):
        i = bisect.bisect_right(starts, a) - 1
        if i >= 0 and a < tr[i][0] + tr[i][1]:
            if tr[i][2] and a >= tr[i][0] + tr[i][2]:
                body[i] += ir
            else:
                pre[i] += ir
    rows = []
    for i, (addr, size, loop, f) in enumerate(tr):
        rows.append((int(f[0]), f[1], int(f[2]), int(f[3]), int(f[4]), int(f[8]), f[9], pre[i], body[i],
                     f[12] if len(f) > 12 else "", int(f[10]), f[11]))
    return rows


def report(cgout: str, tlog: str, packets: int, ir_total: float, k: int) -> str:
    """Text for one process: trace count, Ir a packet in trace code and elsewhere (`ir_total`: the part's whole Ir
    count), the 16 commonest aborts, and the `k` traces with the most Ir a packet (number, marked * when compiled in the
    counted pass; source file and start line, parent / exit of a side trace, link, Ir in the pre-loop part and the
    loop, TRACE_WHERE's text, recorded lines if logged)."""
    rows = sorted(trace_costs(cgout, tlog), key=lambda r: -(r[7] + r[8]))
    n = packets
    jit = sum(r[7] + r[8] for r in rows)
    late = sum(1 for r in rows if r[10] == 2)
    out = [f"  traces: {len(rows)} ({late} compiled in the counted pass, marked *), Ir a packet in trace code "
           f"{jit / n:.2f}, elsewhere (interpreter, recorder, exit handling) {ir_total / n - jit / n:.2f}; aborted "
           f"recordings (count, pass, source:start line, parent trace / exit, LuaJIT error: 8 leaving loop in root "
           f"trace, 9 inner loop in root trace, 10 loop unroll limit):"]
    for ln in sorted(open(tlog + ".aborts").read().splitlines(), key=lambda x: -int(x.split()[0]))[:16]:
        out.append(f"    {ln}")
    for r in rows[:k]:
        src = r[1].rsplit(".", 1)[-1] if r[1].startswith("=") else os.path.basename(r[1])
        start = f"{src}:{r[2]}" + (f" (side of {r[3]}/{r[4]})" if r[3] else "")
        out.append(f"  {'*' if r[10] == 2 else '#'}{r[0]:<4} {start:34} -> {r[5]} {r[6]:8} Ir pre {r[7] / n:7.2f} "
                   f"loop {r[8] / n:7.2f}" + (f"  at {r[11]}" if r[11] != "-" else "")
                   + (f"  lines {r[9]}" if r[9] else ""))
    return "\n".join(out)
