--[[
luaprobe.engine.plugins.host — boots one plug-in VM: installs T (with T.async) before the
chunk runs, loads the plug-in file, and calls its hooks with error isolation
(an error names file:line, is counted per hook and logged once per line).
]]
local tlib = require("luaprobe.engine.plugins.tlib")
local async = require("luaprobe.engine.plugins.async")
local gcpace = require("luaprobe.engine.plugins.gcpace")
local errlog = require("luaprobe.engine.plugins.errlog")
local engine_mod = require("luaprobe.engine.plugins.engine")
local packet = require("luaprobe.engine.plugins.packet")
local buffer = require("luaprobe.engine.plugins.buffer")
local decode = require("luaprobe.engine.fastpath.decode")
local ffi = require("ffi")

local M = {}
local Host = {}
Host.__index = Host

-- LuaJIT's LUA_ERRMEM message: the VM's memory limit (--plugin-memory-mb, engine/plugins/_lpwatch.c) was hit
local function is_memory_error(err) return type(err) == "string" and err:find("^not enough memory") ~= nil end

-- not debug.traceback(msg, 2) (a tail call, hence level 3 here): LuaJIT cuts msg at its first NUL byte
local function traceback(msg) return tostring(msg) .. debug.traceback("", 3) end

--- Minimal engine object until the packet path provides the real one:
--- instanceid/id/timestamp plus a recorder for every output method.
local function recording_engine(instance, outputs)
  return setmetatable({
    instanceid = function() return instance end,
    id = function() return instance end,
    timestamp = function() return os.time(), 0 end,
    own_pending = false,                  -- read by Host:call (the real engine's field: engine.lua post)
  }, { __index = function(_, name)
    return function(_, ...) outputs[#outputs + 1] = { name, ... } end
  end })
end

-- the luaprobe package directory ("<dir>/", this file is <dir>/engine/plugins/host.lua): the watchdog lands its
-- interrupt only in a plug-in's own code (frames outside it, or in engine/examples/), always inside a hook's xpcall
local PKGROOT = (debug.getinfo(1, "S").source:match("^@(.*/)engine/plugins/[^/]*$"))

--- The watchdog module (engine/plugins/watchdog.lua), or nil when _lpwatch is not built.
function M.watchdog()
  local ok, wd = pcall(require, "luaprobe.engine.plugins.watchdog")
  return ok and type(wd) == "table" and wd or nil
end

-- _lpwatch's crash line (Host:crash_line), when the built module has it (nil: no line, the fault kills as before)
local CRASH = M.watchdog()
if CRASH and not CRASH.crash_enter then CRASH = nil end

--- Boot a VM for `opts.path`.  Returns a Host, or nil and an error message
--- ("file:line: message") when the file cannot be loaded or run.
function M.boot(opts)
  local path, instance = opts.path, opts.instance or "0"
  gcpace.adjust()                                          -- the collector's pace (engine/plugins/gcpace.lua)
  local function logf(level, msg) opts.log(level, path, instance, msg) end
  local me                                                 -- this Host, for T.host:broadcast (set below)
  tlib.install({ script = path, instance = instance, enginetype = opts.enginetype or "frontend",
                 log = opts.log, print = opts.print, contextid = opts.contextid, args = opts.args,
                 config = opts.config, datapath = opts.config and opts.config["App>DataDirectory"],
                 broadcast = function(msgid, classid, msg)
                   if me and me.engine.broadcast then me.engine:broadcast(msgid, classid, msg) end
                 end })
  tlib.wrap_print({ script = path, instance = instance, log = opts.log, print = opts.print })
  for _, pr in ipairs(opts.protocols or {}) do decode.register_protocol(pr.guid, pr.name) end
  local self = setmetatable({ path = path, instance = instance, outputs = {}, hook_errors = {},
                              hook_calls = {}, walked = 0, recorded_again = false }, Host)
  me = self
  self.errors = errlog.new(logf, path)
  local report = self.errors.report
  self.errors.report = function(log, kind, msg)               -- LuaJIT's LUA_ERRMEM: the VM's memory limit
    if self.memory_limit and is_memory_error(msg) then        -- (--plugin-memory-mb) was hit; msg may carry a
      msg = self:memory_hit((kind:gsub(" error$", "")))       -- traceback
    end
    return report(log, kind, msg)
  end
  if opts.pipeline then
    self.engine = engine_mod.new({ instance = instance, pipeline = opts.pipeline, groups = opts.groups,
                                   plugin = path:match("[^/]*$") })
  else
    self.engine = recording_engine(instance, self.outputs)
  end
  self.async = async.new({ script = path, log = logf, overflow_limit = opts.overflow_limit,
                           max_record = opts.max_record,
                           engine = self.engine })
  T.async = self.async.api
  if opts.enginetype == "backend" and opts.group_names then    -- docs.trisul.org/docs/lua/obj_globalt: {name = guid} maps, backend only
    local g = opts.group_names
    T.countergroups, T.alertgroups, T.resourcegroups = g.counter or {}, g.alert or {}, g.resource or {}
    T.ftsgroups, T.sessiongroups = g.fts or {}, g.session or {}
  end
  local chunk, err = loadfile(path)
  if not chunk then return nil, err end
  -- the top level runs under the hook budget too (opts.budget s, 0/nil: off): an endless loop there is interrupted
  -- like one in a hook, or, compiled, ends the process from the Python side (engine/plugins/loadwatch.py)
  local wd = (opts.budget or 0) > 0 and M.watchdog() or nil
  if wd then
    wd.arm(opts.budget, ("the top level of %s ran longer than the hook budget of %g s (--hook-budget) while "
                         .. "loading"):format(path, opts.budget), PKGROOT)
  end
  local ok, rerr = xpcall(chunk, traceback)
  if wd then wd.disarm() end
  if not ok then return nil, rerr end
  if type(TrisulPlugin) ~= "table" then return nil, path .. ": no TrisulPlugin table" end
  self.plugin = TrisulPlugin
  self.stop_profile = require("luaprobe.engine.plugins.jitprof").start(path:match("[^/]*$") .. "-" .. instance)
  return self, nil
end

--- Number of async workers the plug-in gets for its request_async_workers (default 1: absent or nil), at most
--- `max` (workers/limits.py MAX_WORKERS), and, when the value was changed, the reason (a string, logged by
--- vm.py as one WARNING naming the plug-in): above `max` (+inf too) gives `max`; not a number (nan, a
--- table, "four") or below 1 gives 1.  A string of digits is a number, as Lua's tonumber reads it; a
--- fraction is floored.  Before, inf and nan reached Python's int() and ended the run (exit 1).
function Host:requested_workers(max)
  local v = self.plugin.request_async_workers
  if v == nil then return 1 end
  local n = tonumber(v)
  local shown = type(v) == "string" and ("%q"):format(v:sub(1, 40)):gsub("\\\n", "\\n") or tostring(v)
  if n == nil or n ~= n then return 1, ("request_async_workers = %s is not a number: 1 worker"):format(shown) end
  if n < 1 then return 1, ("request_async_workers = %s is below 1: 1 worker"):format(shown) end
  if n > max then
    return max, ("request_async_workers = %s is above the maximum %d: %d workers"):format(shown, max, max)
  end
  return math.floor(n)
end


--- The crash line of _lpwatch.c (wd.crash_enter; docs/operations.md "Exit codes", 139): what follows
--- "luaprobe run: crashed: SIGSEGV" (SIGBUS, SIGILL, SIGFPE) when this instance's hook `key` (or luaprobe's walk
--- around it) faults.  Built once per hook.
function Host:crash_line(key)
  local lines = self.crash_lines
  if not lines then lines = {}; self.crash_lines = lines end
  local line = lines[key]
  if not line then
    line = (" in plug-in %s (hook %s) \226\128\148 the rows sent to the store writer are committed; the rest "
      .. "(open counter buckets, live flows, the summary) is lost\n"):format(self.path, key)
    lines[key] = line
  end
  return line
end

--- Call TrisulPlugin[sub][name](...) (or TrisulPlugin[name] when sub is nil).
--- Returns ok, result and the hook's second result (Host:call: ok, result).  Errors are counted per hook and logged.
--- The call that makes BUDGET_STRIKES cut calls in a row (budget_strike) calls `self.on_disable(line)` (set by
--- engine/fastpath/run.py: the instance is disabled, its line logged) before it returns; from then on no hook of
--- this instance is called here.
function Host:call3(sub, name, ...)
  if self.memory_exceeded or self.budget_exceeded then return true, nil end   -- disabled: memory limit, budget
  local t = sub and self.plugin[sub] or self.plugin
  local fn = t and t[name]
  if type(fn) ~= "function" then return true, nil end
  local key = sub and (sub .. "." .. name) or name
  self.hook_calls[key] = (self.hook_calls[key] or 0) + 1
  local wd = self.watchdog
  if wd then wd.arm(self.budget, self.budget_msg, PKGROOT) end
  local cw = CRASH and CRASH.crash_enter(self:crash_line(key))      -- a fault in the hook names this plug-in
  -- res2: a hook's second result, which one hook has: cg_monitor.onflushfilter's overrides (engine/plugins/monitor.lua
  -- cg_filter calls call3).  Before, only ok, res came back, so the overrides Trisul documents never reached the
  -- stored row [test_monitors.py]
  local ok, res, res2 = xpcall(fn, traceback, ...)
  if cw then CRASH.crash_leave() end
  if wd then self:count_budget(wd.disarm()) end
  if not ok then
    local cut = wd and self:budget_strike(key, self.hook_calls[key], res)
    self.hook_errors[key] = (self.hook_errors[key] or 0) + 1
    if key == "onload" and not (self.memory_limit and is_memory_error(res)) then   -- the run reports it as the
      self.errors.logf(8, "onload error: " .. tostring(res))  -- one `plug-in problem:` line (engine/fastpath/run.py)
    else
      self.errors:report(key .. " error", res)
    end
    -- the run names it now (run.py), and gives a VM over its memory limit its headroom before it runs anything else
    -- (the memory limit's reserve, _lpwatch.c, is all it has until then: a backend's next tick ran out of it, exit 1)
    local why = self.memory_exceeded or (cut and self.budget_exceeded)
    if why and self.on_disable then self.on_disable(why) end
  end
  if self.async.backlog > 0 then self.async:flush() end    -- tasks it scheduled go out now
  if self.engine.own_pending and not self.delivering then self:deliver_own() end
  return ok, res, res2
end

--- Host:call3 with ok and the hook's first result only: what every caller but cg_filter wants (the Python side
--- unpacks two values: vm.call)
function Host:call(sub, name, ...)
  local ok, res = self:call3(sub, name, ...)
  return ok, res
end

--- Messages this VM posted to its own pipeline reach its onmessage as soon as the posting hook returned (before
--- its next hook: Trisul's ftp.lua posts "FTP PORT" in onpayload and needs it at the data connection's first
--- payload); the fast path then delivers them to the pipeline's other instances only.  Messages posted by an
--- onmessage called here are not delivered here (no recursion): they reach this VM after its next hook or with
--- the fast path's delivery, whichever comes first.
function Host:deliver_own()
  local eng = self.engine
  local todo = eng.own_pending                 -- rows of eng.rows.messages, in posting order (engine.lua post)
  eng.own_pending = false
  for i = 1, #todo do todo[i][4] = true end    -- delivered here: the fast path skips this VM for them
  self.delivering = true
  for i = 1, #todo do self:deliver_message(todo[i][2], todo[i][3]) end
  self.delivering = false
end

-- ------------------------------------------------------------------ script types

M.FRONTEND = { simplecounter = true, countergroup = true, filex_monitor = true, reassembly_handler = true,
               alertgroup = true, resourcegroup = true, protocol_handler = true, packet_storage = true,
               inputfilter = true, messagemonitor = true, flowmonitor = true, channellistener = true }
M.BACKEND = { engine_monitor = true, sg_monitor = true, resource_monitor = true, fts_monitor = true,
              cg_monitor = true, alert_monitor = true, flowtracker = true }

--- The script-type keys present in TrisulPlugin (sorted).
function Host:types()
  local out = {}
  for k, v in pairs(self.plugin) do
    if type(v) == "table" and (M.FRONTEND[k] or M.BACKEND[k]) then out[#out + 1] = k end
  end
  table.sort(out)
  return out
end

--- One row of countergroup.meters normalised, or nil and what is wrong with it (i: its index, for the message).
--- 7 fields {id, vartype, topN, bottomN, name, description, units} or 6 without bottomN; id a meter number
--- (0, 1, ...), vartype a T.K.vartype number, topN/bottomN numbers, the texts strings (or nil).
local function meter_row(row, i)
  local m
  if type(row[4]) == "number" then
    m = { id = row[1], vartype = row[2], topn = row[3], bottomn = row[4], name = row[5],
          description = row[6], units = row[7] }
  else
    m = { id = row[1], vartype = row[2], topn = row[3], bottomn = 0, name = row[4], description = row[5],
          units = row[6] }
  end
  local function bad(field, want)
    local v = m[field]
    return nil, ("countergroup.meters[%d] %s is %s, not %s"):format(i, field,
      type(v) == "string" and ("%q"):format(v) or type(v) == "number" and tostring(v) or "a " .. type(v), want)
  end
  if type(m.id) ~= "number" or m.id < 0 or m.id % 1 ~= 0 then return bad("id", "a meter number (0, 1, ...)") end
  if type(m.vartype) ~= "number" or m.vartype % 1 ~= 0 then return bad("vartype", "a T.K.vartype number") end
  if m.topn ~= nil and type(m.topn) ~= "number" then return bad("topn", "a number") end
  for _, f in ipairs({ "name", "description", "units" }) do
    if m[f] ~= nil and type(m[f]) ~= "string" then return bad(f, "a string") end
  end
  return m
end

--- A problem description when control[field] is given but is not a whole number >= 1 (bucket sizes and counts: the
--- Python side takes them as whole seconds / entries, and 0 divided by zero; a bucket size of 2.5 made bucket
--- times of .5 s that the store writer rejected at the end, exit 1, and inf a bucket of NaN), else nil.  name: the
--- field's full name, want: what it should be.
local function bad_number(control, field, name, want)
  local v = control[field]
  local n = tonumber(v) or 0
  if v == nil or (n >= 1 and n % 1 == 0) then return nil end
  return ("%s is %s, not %s"):format(name, type(v) == "string" and ("%q"):format(v) or type(v) == "number"
    and tostring(v) or "a " .. type(v), want)
end

--- The countergroup definition, normalised, or nil and a problem description.
function Host:countergroup()
  local cg = self.plugin.countergroup
  if type(cg) ~= "table" then return nil end
  local c = cg.control
  if type(c) ~= "table" or type(c.guid) ~= "string" then
    return nil, "countergroup.control.guid is missing"
  end
  if cg.meters ~= nil and type(cg.meters) ~= "table" then
    return nil, ("countergroup.meters is a %s, not a table of meters"):format(type(cg.meters))
  end
  local problem = bad_number(c, "bucketsize", "countergroup.control.bucketsize", "a whole number of seconds >= 1")
  if problem then return nil, problem end
  local meters = {}
  for i, row in ipairs(cg.meters or {}) do
    if type(row) ~= "table" then return nil, ("countergroup.meters[%d] is not a table"):format(i) end
    local m, problem = meter_row(row, i)
    if not m then return nil, problem end
    meters[#meters + 1] = m
  end
  local keyinfo = {}
  for i, row in ipairs(type(cg.keyinfo) == "table" and cg.keyinfo or {}) do
    if type(row) ~= "table" or row[1] == nil then
      return nil, ("countergroup.keyinfo[%d] is not a {key, label} pair"):format(i)
    end
    keyinfo[#keyinfo + 1] = { tostring(row[1]), tostring(row[2] or ""), row[3] ~= nil and tostring(row[3]) or "" }
  end
  return { guid = engine_mod.norm(c.guid), name = tostring(c.name or c.guid), description = tostring(c.description or ""),
           bucketsize = tonumber(c.bucketsize) or 60, meters = meters, keyinfo = keyinfo }
end

--- alertgroup / resourcegroup declarations (docs.trisul.org/docs/lua/alert_group, resource_group): a list of {kind, guid, name, description},
--- or nil and a problem description.
function Host:declarations()
  local out = {}
  for _, kind in ipairs({ "alertgroup", "resourcegroup" }) do
    local t = self.plugin[kind]
    if type(t) == "table" then
      local c = t.control
      if type(c) ~= "table" or type(c.guid) ~= "string" then return nil, kind .. ".control.guid is missing" end
      out[#out + 1] = { kind = kind == "alertgroup" and "alert" or "resource", guid = engine_mod.norm(c.guid),
                        name = tostring(c.name or c.guid), description = tostring(c.description or "") }
    end
  end
  return out
end

--- The flowtracker control block: {name, bucketsize, count}, or nil and a problem description.
function Host:flowtracker_control()
  local ft = self.plugin.flowtracker
  if type(ft) ~= "table" then return nil end
  local c = type(ft.control) == "table" and ft.control or {}
  if type(ft.getmetric) ~= "function" then return nil, "flowtracker.getmetric is not a function" end
  local problem = bad_number(c, "bucketsize", "flowtracker.control.bucketsize", "a whole number of seconds >= 1")
    or bad_number(c, "count", "flowtracker.control.count", "a whole number of flows >= 1")
  if problem then return nil, problem end
  return { name = tostring(c.name or (self.plugin.id and self.plugin.id.name) or self.path:match("[^/]*$")),
           bucketsize = tonumber(c.bucketsize) or 60, count = tonumber(c.count) or 10 }
end

-- ------------------------------------------------------------------ the per-packet batch walk

--- After a hook call of a batch walk failed with `err`, the walk's `calls`-th call of `hook` in this batch: true when
--- the rest of the batch is not walked: the VM is over its memory limit (memory_hit), or BUDGET_STRIKES calls in a
--- row were cut by the hook budget (budget_strike; each call would fill the VM up to the limit again, or run to the
--- hook budget: a 50-packet batch took 56 s); the instance is disabled after it.  The stop condition of both
--- walkers (walk, walk_direct), on their error path only: a method, since the walkers have no upvalues.
function Host:walk_stops(hook, calls, err)
  return self.memory_exceeded or (self.watchdog and self:budget_strike(hook, (self.hook_calls[hook] or 0) + calls, err))
end

-- One walker for every script type that runs a hook per packet (simplecounter below, protocol_handler in
-- protocol.lua, packet_storage in packetstore.lua).  It must stay one compiled trace (issue 10): no closure is
-- created per batch (bytecode FNEW aborts every trace through it), and each hook call has its own xpcall, which
-- LuaJIT compiles inline, instead of one xpcall around the whole walk: a trace of the walk loop that ends by
-- returning into an xpcall frame cannot be compiled ("NYI: return to lower frame"), and a retry loop around the
-- xpcall made a second, outer root trace that aborted on the walk ("inner loop in root trace").  Called from
-- Python, the loop's exit returns to a C frame, which LuaJIT handles.
--
-- `w`, the instance's walk state (a table made by Host:new_walk):
--   w.per                            hook calls at most per packet: call positions j = 0 .. n*per-1 (packet j//per)
--   w.pick(w, batch, j) -> invoke    prepares position j (nil: no call there); invoke(w) calls the hook with its
--                                    arguments, which pick left in w; w.invokes lists every invoke function
--   w.done(w, batch, j, ok, r1, r2, v1 .. v9)  after the call: true and the hook's first two results, or false and
--                                    the error; then w.inv's values, as pick gets them
--   w.hook, w.error_label            the hook's counter name and the prefix of its error lines
--   w.inv                            names of the up to 9 fields of w (per batch: not changed by a hook or a pick)
--                                    that pick and invoke read per packet: the walker reads them into locals
--                                    before its loop and passes them after their usual arguments,
--                                    pick(w, batch, j, v1 .. v9), invoke(w, v1 .. v9), done.  A field of w read in the
--                                    loop is looked up again on every packet once a hook has stored a new key into
--                                    a table of its own (NEWREF: state[id] on a new flow; tests/test_walk_fields.py)
--   w.call                           xpcall, or the C xpcall of _lpwatch.c when the hook cannot be compiled
--                                    (a "stitch point": the hook is not inlined, so its trace aborts cannot
--                                    blacklist this loop; issue 11)
-- It has no upvalues: Host:new_walk loads a copy of it per walk state (its own prototype, hot counters and
-- traces), and a second copy when the walk switches to the stitch point.
local function walk(self, w, batch, n)
  local pick, done, call, tb, inv = w.pick, w.done, w.call, w.traceback, w.inv
  local v1, v2, v3, v4, v5 = w[inv[1]], w[inv[2]], w[inv[3]], w[inv[4]], w[inv[5]]
  local v6, v7, v8, v9 = w[inv[6]], w[inv[7]], w[inv[8]], w[inv[9]]
  local calls, errors = 0, 0
  for j = 0, n * w.per - 1 do
    local invoke = pick(w, batch, j, v1, v2, v3, v4, v5, v6, v7, v8, v9)
    if invoke ~= nil then
      calls = calls + 1
      local ok, r1, r2 = call(invoke, tb, w, v1, v2, v3, v4, v5, v6, v7, v8, v9)
      if not ok then
        errors = errors + 1
        self.errors:report(w.error_label, r1)
        if self:walk_stops(w.hook, calls, r1) then
          done(w, batch, j, ok, r1, r2, v1, v2, v3, v4, v5, v6, v7, v8, v9)
          return calls, errors
        end
      end
      done(w, batch, j, ok, r1, r2, v1, v2, v3, v4, v5, v6, v7, v8, v9)
    end
  end
  return calls, errors
end

-- The walker of the stitch point (issue 11): the same loop, but the hook is called by the C function directly,
-- with its arguments, instead of through the invoke function: w.args[invoke](w) gives the argument count k, the
-- hook and its k arguments (what invoke would pass it), and w.call is wd.hcall (xpcall with the message handler
-- first: one stack move in C instead of wd.xpcall's four).  The invoke function was one more interpreted frame below
-- the C call (docs/benchmarks.md, issue 11: ~110 fewer instructions per hook call under callgrind).  One call site
-- per count: each passes exactly k arguments, as invoke did.
local function walk_direct(self, w, batch, n)
  local pick, done, call, tb, args, inv = w.pick, w.done, w.call, w.traceback, w.args, w.inv
  local v1, v2, v3, v4, v5 = w[inv[1]], w[inv[2]], w[inv[3]], w[inv[4]], w[inv[5]]
  local v6, v7, v8, v9 = w[inv[6]], w[inv[7]], w[inv[8]], w[inv[9]]
  local calls, errors = 0, 0
  for j = 0, n * w.per - 1 do
    local invoke = pick(w, batch, j, v1, v2, v3, v4, v5, v6, v7, v8, v9)
    if invoke ~= nil then
      calls = calls + 1
      local ok, r1, r2
      local k, f, x1, x2, x3, x4, x5, x6 = args[invoke](w, v1, v2, v3, v4, v5, v6, v7, v8, v9)
      if k == 2 then
        ok, r1, r2 = call(tb, f, x1, x2)
      elseif k == 1 then
        ok, r1, r2 = call(tb, f, x1)
      elseif k == 3 then
        ok, r1, r2 = call(tb, f, x1, x2, x3)
      else
        ok, r1, r2 = call(tb, f, x1, x2, x3, x4, x5, x6)
      end
      if not ok then
        errors = errors + 1
        self.errors:report(w.error_label, r1)
        if self:walk_stops(w.hook, calls, r1) then
          done(w, batch, j, ok, r1, r2, v1, v2, v3, v4, v5, v6, v7, v8, v9)
          return calls, errors
        end
      end
      done(w, batch, j, ok, r1, r2, v1, v2, v3, v4, v5, v6, v7, v8, v9)
    end
  end
  return calls, errors
end

local jutil = require("jit.util")
local band, rshift = require("bit").band, require("bit").rshift
local OP = {}
for i, name in pairs(require("luaprobe.engine.plugins.jitprof").BYTECODES) do OP[name] = i end
local WALK_BYTECODE = string.dump(walk)
local WALK_DIRECT_BYTECODE = string.dump(walk_direct)
local WALK_LOOP = nil                                      -- pc of the walker's FORL
for pc = 1, jutil.funcinfo(walk).bytecodes - 1 do
  if band(jutil.funcbc(walk, pc), 0xff) == OP.FORL then WALK_LOOP = pc end
end

--- True when `fn` or a function among its upvalues (`depth` levels deep) creates closures (bytecode FNEW):
--- LuaJIT cannot compile such a hook, so it is called through the stitch point from the start.
local function creates_closures(fn, depth)
  if type(fn) ~= "function" then return false end
  local info = jutil.funcinfo(fn)
  if not info.bytecodes then return false end             -- a C function
  for pc = 1, info.bytecodes - 1 do
    if band(jutil.funcbc(fn, pc), 0xff) == OP.FNEW then return true end
  end
  if depth > 0 then
    for i = 1, info.upvalues or 0 do
      local _, v = debug.getupvalue(fn, i)
      if v ~= fn and creates_closures(v, depth - 1) then return true end
    end
  end
  return false
end

local stitch_xpcall, stitch_hcall = nil, nil
do
  local ok, wd = pcall(require, "luaprobe.engine.plugins.watchdog")
  if ok and type(wd) == "table" then stitch_xpcall, stitch_hcall = wd.xpcall, wd.hcall end
end

local function use_stitch(w)
  if stitch_xpcall == nil then return end                  -- _lpwatch not built: inline calls only
  if w.args and stitch_hcall then                          -- walk_direct (an older _lpwatch build: walk)
    w.walker, w.call = assert(loadstring(WALK_DIRECT_BYTECODE)), stitch_hcall
  else
    w.walker, w.call = assert(loadstring(WALK_BYTECODE)), stitch_xpcall
  end
  w.stitched = true
  -- the invoke functions now run only below the stitch point; a trace started in one would record into the
  -- hook and abort there again and again, so they are left to the interpreter (one VM per instance: no other
  -- walk of this VM inlines them)
  for _, invoke in ipairs(w.invokes) do jit.off(invoke) end
  local twin = w.twin                                      -- the same hooks' walk over a position list (sc_select)
  if twin ~= nil and not twin.stitched then use_stitch(twin) end
end

--- Complete walk state `w` (fields above) for `hooks`, the plug-in functions it calls: a copy of the walker
--- of its own, calling the hooks inline, or through the stitch point when one of them creates closures.
function Host:new_walk(w, hooks)
  w.traceback, w.call, w.stitched, w.inv = traceback, xpcall, false, w.inv or {}
  w.walker = assert(loadstring(WALK_BYTECODE))
  for i = 1, table.maxn(hooks) do                          -- a list with holes: packet_storage's optional hooks
    if creates_closures(hooks[i], 2) then use_stitch(w); break end
  end
  return w
end

--- Walk positions after which a plug-in VM's traces are recorded again, once (Host:record_again).
M.RECORD_AGAIN_AT = 65536

--- Walk the batch at `addr` (n packets) with walk state `w`; add its calls and errors to the hook counters.
--- Returns the number of hook calls.  An error in a hook is counted and logged once per line; the walk goes on.
--- After the walk: if LuaJIT blacklisted the walker's loop (a hook it could not compile, found only at run time)
--- the next batches walk through the stitch point, with a fresh copy of the walker; once the VM's walks have
--- passed M.RECORD_AGAIN_AT positions, its traces may be recorded again (Host:record_again).
function Host:walk_batch(w, addr, n)
  local cw = CRASH and CRASH.crash_enter(self:crash_line(w.hook))   -- a fault in the walk names this plug-in
  local calls, errors = w.walker(self, w, ffi.cast(packet.pktp, addr), n)
  if cw then CRASH.crash_leave() end
  self:count_hook(w.hook, calls, errors)
  if not w.stitched and WALK_LOOP and band(jutil.funcbc(w.walker, WALK_LOOP), 0xff) == OP.IFORL then
    use_stitch(w)
  end
  if not self.recorded_again then
    self.walked = self.walked + n
    if self.walked >= M.RECORD_AGAIN_AT then self:record_again() end
  end
  return calls
end

-- LuaJIT 2.1's IR operation number of NEWREF (a key new to its table: src/lj_ir.h IRDEF order, as
-- tools/bench/walkir.py IR_NAMES; tests/test_walk_record_again.py fails if it is wrong)
local IR_NEWREF = 59

--- True when the compiled main path of walk state `w`'s loop (its root trace: the trace number in the walker's
--- FORL once LuaJIT patched it into a JFORL) stores a key its table did not hold.  A stitched walker does not
--- inline the hook, so only an inline one is read.
local function walk_adds_keys(w)
  if w == nil or w.stitched or WALK_LOOP == nil then return false end
  local ins = jutil.funcbc(w.walker, WALK_LOOP)
  if band(ins, 0xff) ~= OP.JFORL then return false end
  local tr = rshift(ins, 16)
  local info = jutil.traceinfo(tr)
  for ref = 1, info and info.nins or 0 do
    local m, ot = jutil.traceir(tr, ref)
    if m and rshift(ot, 8) == IR_NEWREF then return true end
  end
  return false
end

--- Once the VM's walks have passed M.RECORD_AGAIN_AT positions: when a walk loop's compiled main path adds a key
--- to a table, drop every trace of this VM and start its hot counters again, so the loops are compiled anew from the
--- traffic as it goes on.  LuaJIT records a loop's root trace on the iteration where the loop gets hot (its 56th
--- with the default hotloop) and compiles only the path that iteration took; other paths leave the trace at a
--- guard, for a side trace.  The walk's trace inlines the hook, so the hook's path on that one packet is baked
--- in, and the first packets of any capture or live start are not like the rest: their flows, ports and hosts are
--- new.  A hook that counts into a table (`t[k] = (t[k] or 0) + 1`, and engine:update_counter's bucket tables)
--- then had the new key's path (a guard that the key is absent, NEWREF) as its main path, and every later packet,
--- whose key the table held, left the loop there: the hval shape's walk cost 304 instead of 101 instructions a
--- packet on mixed-zipf (tools/bench/loopcg.py; docs/benchmarks.md "A hook walk's trace recorded on the traffic's
--- first packets").  jit.off() then jit.on() sets every hot counter back to its start (LuaJIT lj_dispatch.c: the
--- JIT off -> on transition), so the new root is the one where the walk gets hot again, not where a counter shared
--- with other code ran out.  A flush costs one recording and compilation of the VM's traces (~5M instructions, ~1-2
--- ms), so a VM whose walk loops add no key keeps its traces.  Not done when the VM's JIT is off.
function Host:record_again()
  self.recorded_again = true
  if not jit.status() then return end
  local sc = self.sc
  if not (walk_adds_keys(sc) or walk_adds_keys(sc and sc.twin) or walk_adds_keys(self.ph)
          or walk_adds_keys(self.ps)) then return end
  jit.flush()
  jit.off()
  jit.on()
end

--- How the hooks of this instance's walk are called: "inline", "stitched" or nil (no per-packet walk).
function Host:walk_mode()
  local w = self.sc or self.ph or self.ps
  return w and (w.stitched and "stitched" or "inline") or nil
end

-- simplecounter: onpacket(engine, layer) for each packet with the plug-in's protocol
local find, bind_layer, flowkey = decode.find, packet.bind_layer, decode.flowkey
-- plain calls: no __index lookup per packet (issue 10)
local set_clock, bind_struct = engine_mod.set_clock, packet.bind_struct

-- The walk's invariants (w.inv, the walker's v1 .. v9): the hook, the engine and the Layer object, the FFI structs
-- of the engine and the two objects, the protocol, whether it is L4, the list walk's position list.
local SC_INV = { "fn", "eng", "lobj", "tc", "pc", "lc", "proto", "l4", "sel" }
local function sc_invoke(_, fn, eng, lobj) return fn(eng, lobj) end
local function sc_args(_, fn, eng, lobj) return 2, fn, eng, lobj end  -- sc_invoke's call, for walk_direct
local function sc_done() end
-- The per-packet state goes straight into the FFI structs of the engine and the two objects, which the walk state
-- keeps (tc = engine._t, pc = the Packet's _c, lc = the Layer's _c; w.lobj is bound to w.pobj once, in
-- setup_simplecounter), and which the walker passes in (SC_INV): a Lua table field read here (engine.nflow_counters,
-- engine._t, pobj._c, lobj._c, and w's own fields) would be looked up again on every packet after a hook's store
-- of a new key into a table of its own (issue 10, tests/test_walk_fields.py).
local function sc_pick(w, batch, k, _, eng, _, tc, pc, lc, proto, l4)
  local p = batch[k]
  local li = find(p.d, proto)
  -- a reassembled IP datagram (d.frag 2, engine/fastpath/ipreasm.lua) is for L4 hooks only:
  -- link and IP-layer hooks saw each of its fragment packets
  if li >= 0 and (l4 or p.d.frag ~= 2) then
    set_clock(tc, batch, k)
    if tc.nfc > 0 and p.flow >= 0 then eng:apply_flow_counters(flowkey(p.d), p.dir) end
    bind_struct(pc, batch, k)
    lc.i = li
    return sc_invoke
  end
  -- no hook here: the engine's packet moves only for flow counters (and to the batch's last packet after the walk)
  if tc.nfc > 0 and p.flow >= 0 then
    set_clock(tc, batch, k)
    eng:apply_flow_counters(flowkey(p.d), p.dir)
  end
  return nil
end

-- Walking only the packets with the plug-in's protocol (issue 10).  In the full walk every packet on the less
-- frequent side of sc_pick's protocol test (UDP among TCP for a TCP hook) leaves the walk loop's trace by a side
-- exit and re-enters it from the top (an empty TCP hook cost twice as much on 70 % TCP as on TCP only).  On such
-- batches a branch-free loop (sc_select) lists the packets with the protocol, and a second walk state (the
-- instance's `twin`: the same hooks, its own copy of the walker) visits only those: sc_pick_sel maps call position
-- j to packet sel[j].  The walker itself is the same loop, with the same live values, as the full walk (a version
-- whose loop carried the list and its length made a flowstate hook's side trace fail, error 34, and was reverted:
-- 644f068).  Flow counters (engine:add_flow_counter) count every later packet of their flow, hook or not: a batch
-- that starts with one walks in full; a hook that adds the first one mid-batch makes the next picks (and the end
-- of the walk) give the packets the list passed over theirs first (sc_catch_up), as the full walk would have.

-- Packets from .. to - 1 (none of them in the list) get the flow counters the full walk's sc_pick gives a packet
-- without the hook's protocol.
local function sc_catch_up(w, batch, from, to)
  local eng = w.eng
  for k = from, to - 1 do
    local p = batch[k]
    if p.flow >= 0 then
      set_clock(w.tc, batch, k)
      eng:apply_flow_counters(flowkey(p.d), p.dir)
    end
  end
end

-- The list walk's pick: call position j is packet sel[j].
local function sc_pick_sel(w, batch, j, fn, eng, lobj, tc, pc, lc, proto, l4, sel)
  local k = sel[j]
  if tc.nfc > 0 then sc_catch_up(w, batch, j > 0 and sel[j - 1] + 1 or 0, k) end
  return sc_pick(w, batch, k, fn, eng, lobj, tc, pc, lc, proto, l4)
end

-- The packets of a batch with the plug-in's protocol into w.sel (branch-free: no side trace); returns how many.
-- Same rule as sc_pick: the layer is present, and a reassembled IP datagram (d.frag 2) only for L4 hooks.
local arshift = require("bit").arshift
local function sc_select(w, batch, n)
  local sel = w.sel
  if n > w.sel_cap then
    sel = ffi.new("int32_t[?]", n)
    w.sel, w.sel_cap = sel, n
  end
  local proto, m = w.proto, 0
  if w.l4 then
    for k = 0, n - 1 do
      sel[m] = k
      m = m + 1 + arshift(batch[k].d.first[proto], 31)        -- first[] is -1 when absent
    end
  else
    for k = 0, n - 1 do
      local d = batch[k].d
      sel[m] = k                                                -- kept: present and frag ~= 2 (frag is 0, 1 or 2)
      m = m + band(1 + arshift(d.first[proto], 31), 1 - rshift(d.frag, 1))
    end
  end
  return m
end

--- What keeps the simplecounter hook from being set up (setup_simplecounter), as a problem description, or nil:
--- its protocol_guid missing or not a protocol luaprobe decodes, its onpacket not a function.  Also asked by
--- `luaprobe check`'s probe (engine/plugins/discovery.py), so that check reports what `run` refuses; `known`
--- (optional): a set of upper-case GUIDs taken as decoded too (a protocol_handler's, which a run registers first).
function Host:simplecounter_problem(known)
  local sc = self.plugin.simplecounter
  local guid = sc.protocol_guid
  if type(guid) ~= "string" then return "simplecounter.protocol_guid is missing" end
  if decode.by_guid(guid) == nil and not (known and known[guid:upper()]) then
    return ("simplecounter.protocol_guid %s is not a protocol luaprobe decodes"):format(guid)
  end
  if type(sc.onpacket) ~= "function" then return "simplecounter.onpacket is not a function" end
  return nil
end

--- Prepare the simplecounter hook; returns nil or a problem description (simplecounter_problem).
function Host:setup_simplecounter()
  local problem = self:simplecounter_problem()
  if problem then return problem end
  local sc = self.plugin.simplecounter
  local proto = decode.by_guid(sc.protocol_guid)
  local P = decode.PROTO
  local pobj, lobj = packet.new_packet(), packet.new_layer()
  bind_layer(lobj, pobj, -1)                 -- for good: sc_pick sets only the layer index (w.lc.i)
  self.sc = self:new_walk({ per = 1, pick = sc_pick, done = sc_done, invokes = { sc_invoke },
                            args = { [sc_invoke] = sc_args },
                            hook = "simplecounter.onpacket",
                            error_label = "simplecounter.onpacket error", fn = sc.onpacket, eng = self.engine,
                            proto = proto, pobj = pobj, lobj = lobj, tc = self.engine._t, pc = pobj._c,
                            lc = lobj._c, l4 = proto == P.TCP or proto == P.UDP or proto == P.ICMP or proto == P.ICMPV6,
                            mixed = false, batches = -1, inv = SC_INV },
                          { sc.onpacket })
  local w, ws = self.sc, {}
  for k, v in pairs(w) do ws[k] = v end
  ws.pick, ws.walker = sc_pick_sel, assert(loadstring(ws.call == stitch_hcall and WALK_DIRECT_BYTECODE or WALK_BYTECODE))
  ws.sel, ws.sel_cap = ffi.new("int32_t[?]", packet.BATCH + 1), packet.BATCH + 1
  w.twin, ws.twin = ws, w
  return nil
end

--- Run simplecounter.onpacket for every packet of the batch at `addr` that has the plug-in's protocol.
--- Returns the number of hook calls.
--- Afterwards the engine's current packet is the batch's last, as if it had moved with every packet (what
--- hooks outside the walk see: onmessage, engine:timestamp() between batches).
function Host:run_batch(addr, n)
  local w, eng, calls = self.sc, self.engine, nil
  w.batches = w.batches + 1
  packet.touch_flowids(ffi.cast(packet.pktp, addr), n)
  -- The list pays on mixed batches (~2 ns per packet to make; each packet on the rare side of the full walk's
  -- test costs a side exit, ~13 ns).  After a batch where (nearly) every packet or (nearly) none has the
  -- protocol (> 90 % or < 10 %), the next 15 walk in full.
  if eng.nflow_counters == 0 and (w.mixed or w.batches % 16 == 0) then
    local ws, b = w.twin, ffi.cast(packet.pktp, addr)
    local m = sc_select(ws, b, n)
    w.mixed = m * 10 > n and m * 10 < n * 9
    calls = self:walk_batch(ws, addr, m)
    if eng.nflow_counters > 0 then sc_catch_up(ws, b, m > 0 and ws.sel[m - 1] + 1 or 0, n) end
  else
    calls = self:walk_batch(w, addr, n)
  end
  if n > 0 then self.engine:set_packet(ffi.cast(packet.pktp, addr), n - 1) end
  return calls
end

--- The hook budget (engine/plugins/watchdog.lua): every hook of this instance that runs longer than `seconds`
--- is interrupted with a Lua error naming `label` (plug-in and instance), the hook and the budget; 0 turns it off.
function Host:set_budget(seconds, label)
  local wd = seconds > 0 and require("luaprobe.engine.plugins.watchdog") or nil
  self.watchdog = type(wd) == "table" and wd or nil
  self.budget, self.budget_label = seconds, label
  self.budget_msg = ("%s: hook interrupted: it ran longer than the hook budget of %g s (--hook-budget)")
                    :format(label, seconds)
  return self.watchdog ~= nil
end

--- The VM's memory limit (--plugin-memory-mb, PluginVM max_memory): `mib` for the message naming `label`.
function Host:set_memory_limit(mib, label)
  self.memory_limit, self.memory_label = mib, label
end

--- The VM hit its memory limit (LUA_ERRMEM) in hook `where`, or in luaprobe's code of a walk (`where` nil): the
--- instance is disabled from here on.  Returns the one line the run logs (ERROR, exit 4); built here only, for
--- both places (engine/fastpath/run.py shows it).
function Host:memory_hit(where)
  collectgarbage()                                          -- the failed code's garbage: room for the message
  if not self.memory_exceeded then
    self.memory_exceeded = ("%s: memory limit %d MiB exceeded%s (--plugin-memory-mb); instance disabled"):format(
      tostring(self.memory_label or self.path), self.memory_limit or 0, where and (" in " .. where) or "")
  end
  return self.memory_exceeded
end

--- Hook calls in a row of one hook of an instance cut by the hook budget after which the instance is disabled
--- (docs/operations.md "Faults"): a hook stuck in a loop on every packet would otherwise hold the run for
--- budget x packets (1043 packets at --hook-budget 2: 35 min).  Calls, not time: a hook that only sometimes runs
--- past the budget (a call between two cut ones returned) starts the count again.
M.BUDGET_STRIKES = 3

--- A hook call of `key` failed with `err` (the traceback string of its xpcall); `idx`: its 1-based number among the
--- calls of `key` over the run.  When `err` is this instance's budget interrupt and the M.BUDGET_STRIKES - 1 calls
--- of `key` before it were cut too, sets self.budget_exceeded (the one line the run logs, ERROR, exit 4: the hook,
--- how many calls, the plug-in file and line where the last one was cut) and returns true: the instance is
--- disabled (engine/fastpath/run.py `_budgeted`).  Called on the error path only, never for a call that returned.
function Host:budget_strike(key, idx, err)
  if type(err) ~= "string" or not err:find(self.budget_msg, 1, true) then return false end
  if self.budget_exceeded then return true end
  local streaks = self.budget_streaks
  if not streaks then streaks = {}; self.budget_streaks = streaks end
  local st = streaks[key]
  if st and st.last == idx - 1 then st.n = st.n + 1 else st = { n = 1 }; streaks[key] = st end
  st.last = idx
  if st.n < M.BUDGET_STRIKES then return false end
  local file, line = err:match("^(.-):(%d+): ")              -- _lpwatch.c budget_hook: "file:line: message"
  if file then                                              -- a long path shortened to ".../tail" on its way
    local tail = file:gsub("^%.%.%.", "")
    if self.path:sub(-#tail) == tail then file = self.path end
  end
  local at = file and (file .. ":" .. line) or self.path
  self.budget_exceeded = ("%s: %d calls in a row of %s cut by the hook budget of %g s (--hook-budget), the last "
    .. "at %s; instance disabled"):format(tostring(self.budget_label or self.path), st.n, key, self.budget, at)
  return true
end

function Host:count_budget(fired)
  if fired > 0 then self.hook_errors.hook_budget = (self.hook_errors.hook_budget or 0) + fired end
end

--- One batch of a per-batch walk, in one call from Python (engine/fastpath/run.py `_budgeted`; a lupa call costs
--- 1-3 µs, and this was three: arm, walk, check): `walk(self, addr, n)` (a Host method: run_batch,
--- run_protocol_batch, run_storage_batch, run_filex_events) with the hook budget armed around it, under the VM's
--- memory limit.  Returns the walk's result (hook calls, events) and the memory-limit line when the VM hit its limit
--- in a hook (the instance is then disabled), else nil.  An error raised by the walker itself (LUA_ERRMEM outside a
--- hook's xpcall included) goes to Python, which then calls after_walk alone.  A plain call, not a pcall: a trace
--- that starts in the walked code and returns through a pcall frame aborts ("NYI: return to lower frame", seen for
--- filex events in tests/test_jit_aborts.py), one that returns into a Lua frame does not.
function Host:walk_budgeted(walk, addr, n)
  local wd = self.watchdog
  if wd then wd.arm(self.budget, self.budget_msg, PKGROOT) end
  local res = walk(self, addr, n)
  if wd then self:count_budget(wd.disarm()) end
  return res, self.memory_exceeded or self.budget_exceeded
end

--- After a walk_budgeted that raised (`err`: its error): the budget disarmed, its firings counted.  Returns the
--- memory-limit line when `err` is LUA_ERRMEM (the instance is then disabled), else nil (Python raises `err` again).
function Host:after_walk(err)
  if CRASH then CRASH.crash_leave() end                     -- the walker raised past walk_batch's crash_leave
  local wd = self.watchdog
  if wd then self:count_budget(wd.disarm()) end
  if is_memory_error(err) then return self:memory_hit(nil) end
  return nil
end

--- Add one batch's calls and errors of hook `name` to the instance's counters (hook_calls / hook_errors).
function Host:count_hook(name, calls, errors)
  local hc, he = self.hook_calls, self.hook_errors
  hc[name] = (hc[name] or 0) + calls
  if errors > 0 then he[name] = (he[name] or 0) + errors end
end

--- protocol_handler (engine/plugins/protocol.lua): its control block, setup, and the per-batch walk.
function Host:protocol_control() return require("luaprobe.engine.plugins.protocol").control(self.plugin) end
function Host:setup_protocol_handler() return require("luaprobe.engine.plugins.protocol").setup(self) end
function Host:run_protocol_batch(addr, n)
  packet.touch_flowids(ffi.cast(packet.pktp, addr), n)
  local ph = self.ph
  local calls = self:walk_batch(ph, addr, n)
  local cnt = ph.cnt
  if cnt.bad_returns > 0 then                -- parselayer answers that were not a number of bytes: hook errors too
    self:count_hook(ph.hook, 0, cnt.bad_returns)
    cnt.bad_returns = 0
  end
  return calls
end
function Host:protocol_stats()
  local ph = self.ph
  if not ph then return nil end
  local c = ph.cnt
  return { added = c.added, declined = c.declined, full = c.full, next_unknown = c.next_unknown }
end

--- packet_storage (engine/plugins/packetstore.lua): voting on flows into the run's shared votes array.
function Host:setup_packet_storage(store_addr, capacity)
  return require("luaprobe.engine.plugins.packetstore").setup(self, store_addr, capacity)
end
function Host:run_storage_batch(addr, n) return self:walk_batch(self.ps, addr, n) end

--- Prepare the filex_monitor type (opts: dir, chunk_size, dir_cap, idle_timeout, max_header).
function Host:setup_filex(opts)
  self.filex = require("luaprobe.engine.streams.filex").new(self, opts)
  return nil
end

--- Feed the shared reassembly's events (luaprobe.engine.streams.stage) to filex_monitor (HTTP, hooks);
--- errors are isolated per hook.
function Host:run_filex_events(addr, n)
  self.filex:run_events(addr, n)
  return n
end

--- End of input for filex: close every flow; returns the filex counters (the reassembly's are the stage's).
function Host:filex_finish()
  self.filex:finish()
  local out = {}
  for k, v in pairs(self.filex.stats) do out[k] = v end
  for k, v in pairs(self.filex.hstats) do out["http_" .. k] = v end
  return out
end

--- messagemonitor (Trisul's flow-metric events; docs/plugins.md "messagemonitor"): after each export of flow records
--- (the n lp_flowrow records at address addr, engine/fastpath/flowrow.lua), for every final record (not an
--- sg_monitor onnewflow peek) onflowmetric(engine, flow, 6, setup RTT in µs) when the flow's TCP handshake was
--- measured and onflowmetric(engine, flow, 7, retransmissions, both directions) when it had any: meter 6 is the
--- latency sample and 7 the loss sample, as trisul-scripts' techniques/latloss.lua reads them.  The engine's time is
--- `sec`, the export's packet time.  Returns the number of hook calls.
function Host:flow_metrics(addr, n, sec)
  local mm = self.plugin.messagemonitor
  if type(mm) ~= "table" or type(mm.onflowmetric) ~= "function" then return 0 end   -- onnewflowrecord only
  local fr = require("luaprobe.engine.fastpath.flowrow")
  local rows = ffi.cast("lp_flowrow *", addr)
  local eng, calls = self.engine, 0
  eng:set_time(sec, 0)
  for i = 0, n - 1 do
    local r = rows[i]
    if band(r.flags, fr.TERMINATED) ~= 0 then
      local flow, retrans = nil, r.retrans_az + r.retrans_za
      if r.setup_rtt_us >= 0 then
        flow = packet.flowid_from_key(ffi.string(r.key))
        self:call("messagemonitor", "onflowmetric", eng, flow, 6, r.setup_rtt_us)
        calls = calls + 1
      end
      if retrans > 0 then
        flow = flow or packet.flowid_from_key(ffi.string(r.key))
        self:call("messagemonitor", "onflowmetric", eng, flow, 7, retrans)
        calls = calls + 1
      end
    end
  end
  return calls
end

--- messagemonitor.onnewflowrecord(engine, flow, bytes_az, bytes_za, packets_az, packets_za) for a flow record a
--- plug-in announced (engine.lua new_flow_record: `msg` "time baz bza paz pza"), at the record's time.
function Host:deliver_flowrecord(fk, msg)
  local t, baz, bza, paz, pza = msg:match("^(%S+) (%S+) (%S+) (%S+) (%S+)$")
  t = tonumber(t) or self.engine._t.now
  self.engine:set_time(math.floor(t), math.floor((t - math.floor(t)) * 1e6 + 0.5) % 1000000)
  self:call("messagemonitor", "onnewflowrecord", self.engine, packet.flowid_from_key(fk), tonumber(baz),
            tonumber(bza), tonumber(paz), tonumber(pza))
end

--- inputfilter.step_alert (docs/plugins.md "inputfilter"): called until it returns nil, at most `max` times; the alert
--- tables it returned, in order (engine/plugins/inputfilter.py makes them rows).  An error in it is a hook error (the
--- poll ends); a value that is neither a table nor nil is one too ("not an alert table").
function Host:poll_alerts(max)
  local out = {}
  for _ = 1, max do
    local ok, a = self:call("inputfilter", "step_alert")
    if not ok or a == nil then break end
    if type(a) ~= "table" then
      self:hook_error("inputfilter.step_alert", ("returned a %s, not an alert table or nil"):format(type(a)))
      break
    end
    out[#out + 1] = a
  end
  return out
end

--- inputfilter.step as the run's input (--lua-input; engine/plugins/inputfilter.lua run): up to `max` calls, fewer once
--- the engine's clock reaches another second.  Returns calls, goes_on, second, error message or nil.
function Host:step_input(max)
  return require("luaprobe.engine.plugins.inputfilter").run(self, max)
end

--- A hook's fault found after it returned (a bad value it gave): counted and logged as that hook's error.
function Host:hook_error(key, msg)
  self.hook_errors[key] = (self.hook_errors[key] or 0) + 1
  self.errors:report(key .. " error", msg)
end

--- Prepare the reassembly_handler or flowmonitor type (opts: votes address, slot, table: the type; handler.lua).
function Host:setup_reassembly(opts)
  self.rh = require("luaprobe.engine.streams.handler").new(self, opts)
  return nil
end

function Host:rh_vote(addr, n) self.rh:vote(addr, n) end
function Host:rh_events(addr, n) return self.rh:run_events(addr, n) end

--- Deliver a message posted by some VM: broadcast (msgid "") or to subscribers.
function Host:deliver_message(msgid, msg)
  local fn = self.plugin.onmessage
  if type(fn) ~= "function" then return end
  if msgid ~= "" then
    local ok = false
    for _, g in ipairs(self.plugin.message_subscriptions or {}) do
      if engine_mod.norm(g) == msgid then ok = true; break end
    end
    if not ok then return end
  end
  self:call(nil, "onmessage", msgid, msg)
end

--- Deliver a T.host:broadcast message (Engine:broadcast) to this channellistener: onchannelmessage(msgid, buffer),
--- the Buffer over the message valid during the hook (Trisul's legacy channel; docs/plugins.md "channellistener").
function Host:deliver_channel(msgid, msg)
  local b = self.channel_buf
  if b == nil then b = buffer.new(nil, 0); self.channel_buf = b end
  buffer.rebind(b, msg, #msg, msg)
  self:call("channellistener", "onchannelmessage", msgid, b)
  buffer.invalidate(b)
end

--- The plug-in's id.clsid normalised (upper case), "" when it has none: the class a broadcast names.
function Host:clsid()
  local id = self.plugin.id
  local c = type(id) == "table" and id.clsid
  return type(c) == "string" and c:upper() or ""
end

--- Hook call and error counts as plain tables.
function Host:hook_stats() return self.hook_calls, self.hook_errors end

--- Run a Lua string inside this VM (tests and tools).
function Host:exec(code)
  local f = assert(loadstring(code, "=exec"))
  return (function(...)
    if self.async.backlog > 0 then self.async:flush() end  -- like a hook: its tasks go out at the end
    return ...
  end)(f())
end

--- True when hook f's parameter names say (engine, <second>, <time>, ...): its 2nd parameter's name contains
--- `second` ("flow", "key") and its 3rd names a time ("ts", or containing "time", "tv" or "sec": timestamp,
--- tvsec).  Trisul scripts written for an older argument order are told apart from the documented
--- (engine, ts, ...) only so; a vararg hook or stripped bytecode (no names) says nothing (false).
--- The one detector behind reassembly_handler.onattribute's legacy order (engine/streams/handler.lua) and
--- `luaprobe check`'s warning for cg_monitor.onupdate(engine, key, ts, metrics) (engine/plugins/discovery.py).
function M.swapped_order(f, second)
  if type(f) ~= "function" then return false end
  local n2, n3 = debug.getlocal(f, 2), debug.getlocal(f, 3)
  if type(n2) ~= "string" or type(n3) ~= "string" then return false end
  n2, n3 = n2:lower(), n3:lower()
  return n2:find(second, 1, true) ~= nil and (n3 == "ts" or n3:find("time", 1, true) ~= nil
                                              or n3:find("tv", 1, true) ~= nil or n3:find("sec", 1, true) ~= nil)
end

return M
