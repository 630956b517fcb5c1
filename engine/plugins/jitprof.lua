--[[
luaprobe.engine.plugins.jitprof — developer aids for LuaJIT's trace compiler, off (no-ops)
unless their variable is set:

  LUAPROBE_JIT_PROFILE=prefix   samples the VM with jit.profile (and records
                                trace aborts); the hottest lines go to
                                `<prefix>.<tag>.txt` when stopped.
  LUAPROBE_JIT_PROFILE_ONLY=s   samples only the VMs whose tag contains s
                                (jit.profile has one sampler per process:
                                the VM started last takes it over)
  LUAPROBE_JIT_ABORTS=prefix    counts trace aborts only (no sampling): one
                                line per (phase, place, error) goes to
                                `<prefix>.<tag>.aborts.tsv` when stopped:
                                phase \t count \t code \t message \t file:line
                                \t start file:line (where the aborted trace
                                began: LuaJIT penalises, then blacklists,
                                that place).
                                The phase starts at 0 and M.mark() advances it
                                (the fast path marks every end of an input
                                file), so a run over the same file twice
                                separates warm-up (phase 0) from steady state.
  LUAPROBE_JIT_TRACES=prefix    the trace tree: one line per trace event (start:
                                where, parent trace and exit; stop: IR size,
                                exits, link and link type; abort: where, error)
                                in order, then the most frequent exits to the
                                interpreter ("texit": a side exit without a
                                compiled side trace), to `<prefix>.<tag>.traces.txt`.
                                Two runs' files show whether they built the same
                                tree (docs/benchmarks.md, "Light hooks").
  LUAPROBE_JIT_DUMP=prefix      LuaJIT's own jit.dump ("tbisrx": traces, bytecode,
  LUAPROBE_JIT_DUMP_LIB=dir     IR, snapshots, exits) to `<prefix>.<tag>.dump`, loaded
                                from dir (jit/dump.lua and jit/vmdef.lua: lupa ships
                                neither; vmdef.lua must come from the same LuaJIT
                                commit as lupa's, `jit.version` 2.1.<commit time>:
                                `git archive <commit> | tar -x -C D && make -C D/src
                                jit/vmdef.lua`, then dir = D/src).  Alone: jit.dump
                                attaches to the events the tools above use, and
                                LuaJIT keeps one handler per event.  Which guard a
                                hot exit is: the first ">" IR line after its SNAP.

A trace abort means LuaJIT gave up compiling a path: after repeated aborts at
the same place it blacklists it and that path runs in the interpreter for
good (10-50x slower), so aborts on a per-packet path are bugs (issue 10).
The messages are LuaJIT's own (src/lj_traceerr.h, LuaJIT 2.1, in order;
error codes are 0-based): lupa's LuaJIT ships no jit/vmdef.lua to name them.
]]
local M = {}

M.TRACE_ERRORS = {
  [0] = "error thrown or hook called during recording", "trace too short", "trace too long",
  "trace too deep", "too many snapshots", "blacklisted", "retry recording", "NYI: bytecode %s",
  "leaving loop in root trace", "inner loop in root trace", "loop unroll limit reached",
  "bad argument type", "JIT compilation disabled for function", "call unroll limit reached",
  "down-recursion, restarting", "NYI: unsupported variant of FastFunc %s", "NYI: return to lower frame",
  "store with nil or NaN key", "missing metamethod", "looping index lookup", "NYI: mixed sparse/dense table",
  "symbol not in cache", "NYI: unsupported C type conversion", "NYI: unsupported C function type",
  "guard would always fail", "too many PHIs", "persistent type instability",
  "failed to allocate mcode memory", "machine code too long", "hit mcode limit (retrying)",
  "too many spill slots", "inconsistent register allocation", "NYI: cannot assemble IR instruction %d",
  "NYI: PHI shuffling too complex", "NYI: register coalescing too complex",
}

--- LuaJIT bytecode names by number (src/lj_bc.h of the 2.1 lupa ships: FUNCF = 89; later 2.1
--- sources insert bit-operation bytecodes before FUNCF), for "NYI: bytecode %s".
M.BYTECODES = {}
do
  local names = "ISLT ISGE ISLE ISGT ISEQV ISNEV ISEQS ISNES ISEQN ISNEN ISEQP ISNEP ISTC ISFC IST ISF "
    .. "ISTYPE ISNUM MOV NOT UNM LEN ADDVN SUBVN MULVN DIVVN MODVN ADDNV SUBNV MULNV DIVNV MODNV ADDVV "
    .. "SUBVV MULVV DIVVV MODVV POW CAT KSTR KCDATA KSHORT KNUM KPRI KNIL UGET USETV USETS USETN USETP "
    .. "UCLO FNEW TNEW TDUP GGET GSET TGETV TGETS TGETB TGETR TSETV TSETS TSETB TSETM TSETR CALLM CALL "
    .. "CALLMT CALLT ITERC ITERN VARG ISNEXT RETM RET RET0 RET1 FORI JFORI FORL IFORL JFORL ITERL IITERL "
    .. "JITERL LOOP ILOOP JLOOP JMP FUNCF IFUNCF JFUNCF FUNCV IFUNCV JFUNCV FUNCC FUNCCW"
  local i = 0
  for name in names:gmatch("%S+") do M.BYTECODES[i] = name; i = i + 1 end
end

--- "message" for trace error `code` with its argument `info` (as jit.v prints it).
function M.message(code, info)
  local fmt = M.TRACE_ERRORS[code]
  if not fmt then return "trace error " .. tostring(code) end
  if fmt:find("%%s") then
    local arg = type(info) == "number" and M.BYTECODES[info] or nil
    if code ~= 7 then arg = nil end
    return (fmt:gsub("%%s", arg or tostring(info)))
  end
  if fmt:find("%%d") then return (fmt:gsub("%%d", tostring(info))) end
  return fmt
end

local phase = 0

--- Advance the abort counter's phase (a no-op when nothing counts).
function M.mark() phase = phase + 1 end

-- LuaJIT keeps one handler per VM event (lib_jit.c jit_attach: the event's registry slot): a second
-- jit.attach(f, "trace") replaced the first, so the trace log and the abort counter together lost the log's
-- entries.  Both attach through this one dispatcher instead.
local trace_handlers = {}
local function dispatch(...)
  for i = 1, #trace_handlers do trace_handlers[i](...) end
end

local function attach_trace(fn)
  trace_handlers[#trace_handlers + 1] = fn
  if #trace_handlers == 1 then jit.attach(dispatch, "trace") end
end

local function detach_trace(fn)
  for i = #trace_handlers, 1, -1 do
    if trace_handlers[i] == fn then table.remove(trace_handlers, i) end
  end
  if #trace_handlers == 0 then jit.attach(dispatch) end
end

--- The abort counter: a table of "phase\tcode\tmessage\tplace\tstart" -> count, and the attach callback.
local function abort_counter()
  local jutil, counts, starts = require("jit.util"), {}, {}
  local function on_trace(what, tr, func, pc, code, info)
    if what == "start" then
      starts[tr] = jutil.funcinfo(func, pc).loc or "?"
    elseif what == "abort" then
      local key = ("%d\t%s\t%s\t%s\t%s"):format(phase, tostring(code), M.message(code, info),
        jutil.funcinfo(func, pc).loc or "?", starts[tr] or "?")
      counts[key] = (counts[key] or 0) + 1
    end
  end
  return counts, on_trace
end

local function write_aborts(path, counts)
  local f = io.open(path, "w")
  if not f then return end
  for k, v in pairs(counts) do
    local ph, rest = k:match("^(%d+)\t(.*)$")
    f:write(ph, "\t", v, "\t", rest, "\n")
  end
  f:close()
end

--- The trace-tree log (LUAPROBE_JIT_TRACES): returns a function that detaches it and writes `path`.
local function trace_log(path)
  local jutil, lines, exits = require("jit.util"), {}, {}
  local function loc(func, pc) return jutil.funcinfo(func, pc).loc or "?" end
  local function on_trace(what, tr, func, pc, a, b)
    if what == "start" then
      lines[#lines + 1] = ("start %d %s%s"):format(tr, loc(func, pc), a and (" parent %d exit %d"):format(a, b) or "")
    elseif what == "stop" then
      local ti = jutil.traceinfo(tr)
      lines[#lines + 1] = ("stop %d nins %d nexit %d link %d %s"):format(tr, ti.nins, ti.nexit, ti.link, ti.linktype)
    elseif what == "abort" then
      lines[#lines + 1] = ("abort %d %s error %s %s"):format(tr, loc(func, pc), tostring(a), M.message(a, b))
    elseif what == "flush" then
      lines[#lines + 1] = "flush"
    end
  end
  local function on_exit(tr, ex)
    local k = tr * 65536 + ex
    exits[k] = (exits[k] or 0) + 1
  end
  attach_trace(on_trace)
  jit.attach(on_exit, "texit")
  return function()
    detach_trace(on_trace)
    jit.attach(on_exit)
    local f = io.open(path, "w")
    if not f then return end
    for _, l in ipairs(lines) do f:write(l, "\n") end
    local rows = {}
    for k, v in pairs(exits) do rows[#rows + 1] = { k, v } end
    table.sort(rows, function(x, y) return x[2] > y[2] end)
    for i = 1, math.min(30, #rows) do
      f:write(("exit to interpreter: trace %d exit %d: %d times\n"):format(math.floor(rows[i][1] / 65536),
                                                                         rows[i][1] % 65536, rows[i][2]))
    end
    f:close()
  end
end

--- Start the tools the environment asks for in this VM (tag names the VM in the
--- file names); returns a function that stops them and writes the reports.
function M.start(tag)
  local dprefix, dlib = os.getenv("LUAPROBE_JIT_DUMP"), os.getenv("LUAPROBE_JIT_DUMP_LIB")
  if dprefix and dprefix ~= "" and dlib then
    package.path = dlib .. "/?.lua;" .. package.path
    require("jit.dump").on("tbisrx", ("%s.%s.dump"):format(dprefix, tag))
  end
  local tprefix = os.getenv("LUAPROBE_JIT_TRACES")
  local stop_traces = (tprefix and tprefix ~= "") and trace_log(("%s.%s.traces.txt"):format(tprefix, tag)) or nil
  local stop_rest = M.start_profile(tag)
  if not stop_traces then return stop_rest end
  return function() stop_traces(); stop_rest() end
end

--- LUAPROBE_JIT_PROFILE / LUAPROBE_JIT_ABORTS in this VM (M.start).
function M.start_profile(tag)
  local prefix = os.getenv("LUAPROBE_JIT_PROFILE")
  local only = os.getenv("LUAPROBE_JIT_PROFILE_ONLY")
  if only and only ~= "" and not tag:find(only, 1, true) then prefix = nil end
  local aprefix = os.getenv("LUAPROBE_JIT_ABORTS")
  if (not prefix or prefix == "") and (not aprefix or aprefix == "") then return function() end end
  local acounts, on_trace = abort_counter()
  attach_trace(on_trace)
  if not prefix or prefix == "" then
    return function()
      detach_trace(on_trace)
      write_aborts(("%s.%s.aborts.tsv"):format(aprefix, tag), acounts)
    end
  end
  local prof, counts = require("jit.profile"), {}
  prof.start("li1", function(th, samples, vmstate)
    local key = prof.dumpstack(th, "pl", 1) .. " [" .. vmstate .. "]"
    counts[key] = (counts[key] or 0) + samples
  end)
  return function()
    prof.stop()
    detach_trace(on_trace)
    if aprefix and aprefix ~= "" then write_aborts(("%s.%s.aborts.tsv"):format(aprefix, tag), acounts) end
    local rows = {}
    for k, v in pairs(counts) do rows[#rows + 1] = { k, v } end
    for k, v in pairs(acounts) do
      local ph, code, msg, loc, start = k:match("^(%d+)\t([^\t]*)\t([^\t]*)\t([^\t]*)\t(.*)$")
      rows[#rows + 1] = { ("trace abort at %s (phase %s, trace from %s): error %s %s"):format(loc, ph, start, code,
                                                                                            msg), v }
    end
    table.sort(rows, function(a, b) return a[2] > b[2] end)
    local f = io.open(("%s.%s.txt"):format(prefix, tag), "w")
    if not f then return end
    for i = 1, math.min(40, #rows) do f:write(rows[i][2], "  ", rows[i][1], "\n") end
    f:close()
  end
end

return M
