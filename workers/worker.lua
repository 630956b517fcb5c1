--[[
luaprobe.workers.worker — the loop of one async worker process (one LuaJIT VM).

It pops request records from its request ring, runs them (onexecute bytecode
or a built-in file helper, never a shell) and pushes one result record per
task to its return ring, in request order.  Each result is visible as soon as
it is written (a release store); the doorbell is rung when the request ring is
momentarily empty (so a lone task is answered at once) or every PUBLISH_EVERY
results.  onexecute's upvalues are set on the loaded
function when a request carries new values, not per task.  The per-task path stays inside
LuaJIT; Python only starts the process and builds the VM (workers/worker.py).
]]
local ffi = require("ffi")
local ring = require("luaprobe.shm.ring")
local P = require("luaprobe.workers.protocol")

local sbuf = require("string.buffer")

local C = ring.lib
local cast, fstring, copy = ffi.cast, ffi.string, ffi.copy
ffi.cdef[[ int getppid(void); ]]

local M = {}

local fileops = require("luaprobe.workers.fileops")

--- Run one file helper (workers/fileops.lua: confined names); returns true or nil, message.
--- Resident set size of this process in bytes (/proc/self/statm, second field, in pages).
pcall(ffi.cdef, "long sysconf(int name);")
local PAGE = tonumber(ffi.C.sysconf(30))      -- _SC_PAGESIZE
local function rss_bytes()
  local f = io.open("/proc/self/statm", "r")
  if not f then return 0 end
  local _, resident = f:read("*n", "*n")
  f:close()
  return (resident or 0) * PAGE
end

--- Descriptors an onexecute leaves to the garbage collector: an io.popen or io.open handle the script never
--- closes (trisul-scripts' save_content_types_sha256.lua: `local h = io.popen("sha256sum " .. path)`, read, never
--- closed) holds its descriptor, and a popen's child stays a zombie, until the VM collects the handle; a small heap
--- collects rarely (measured in a looped daemon: 1,645 descriptors and ~490 zombies in one worker before a
--- collection, above the usual `ulimit -n` of 1024, where io.popen / io.open start failing).  After every FD_EVERY
--- handles the io library opened (count_opens), and every FD_TASKS tasks for descriptors made otherwise (FFI, C
--- modules), the lowest free descriptor (what open() returns) is looked at; at FD_GC or more a full collection closes
--- the handles nothing refers to.  Returns the next threshold: twice what is still open when the script keeps them.
--- Not per task: one open / close pair is ~2 us, and a look every 16 tasks cost the raw T.async round trip 60 % of
--- its rate (tools/bench/async_roundtrip.py, 16.6M -> 6.0M round trips/s).
pcall(ffi.cdef, "int open(const char *path, int flags); int close(int fd);")
local FD_EVERY, FD_GC, FD_TASKS = 16, 256, 4096
local function lowest_free_fd()
  local fd = ffi.C.open("/dev/null", 0)
  if fd >= 0 then ffi.C.close(fd) end
  return fd
end
--- The worker VM's io.open / io.popen / io.lines / io.tmpfile, each counting the call first; returns a function
--- giving the count since it was last asked for (and resetting it).
local function count_opens()
  local opens = 0
  for _, name in ipairs({ "open", "popen", "lines", "tmpfile" }) do
    local f = io[name]
    if f then io[name] = function(...) opens = opens + 1; return f(...) end end
  end
  return function() local n = opens; opens = 0; return n end
end

local function collect_unclosed(limit)
  local fd = lowest_free_fd()
  if fd >= 0 and fd < limit then return limit end
  collectgarbage("collect")
  fd = lowest_free_fd()
  return math.max(limit, 2 * fd)
end

local function file_op(kind, data, aux, arg)
  local ok, err
  if kind == P.COPY then ok, err = fileops.copy(data, aux)
  elseif kind == P.CAT then ok, err = fileops.cat(data, aux)
  elseif kind == P.RM then ok, err = fileops.rm(data)
  elseif kind == P.COPYBUF then ok, err = fileops.copybuffer(data, aux, arg)
  else return nil, "unknown request kind " .. tostring(kind) end
  if ok then return true end
  return nil, P.KIND_NAME[kind] .. ": " .. tostring(err)
end

-- Opcodes that store into an upvalue (USETV/USETS/USETN/USETP), learnt from
-- probe functions so no opcode number is hard-coded.
local USET
do
  local ok, jutil = pcall(require, "jit.util")
  if ok then
    local u
    local probes = { function(x) u = x end, function() u = "s" end, function() u = 1 end,
                     function() u = true end }
    USET = {}
    for _, f in ipairs(probes) do USET[bit.band(jutil.funcbc(f, 1), 0xff)] = true end
    USET.util = jutil
  end
end

--- True unless fn and the functions nested in it provably never assign an
--- upvalue: then upvalues set once stay as shipped.
local function writes_upvalues(fn)
  if USET == nil then return true end
  local jutil = USET.util
  local function scan(f)
    local info = jutil.funcinfo(f)
    for pc = 1, info.bytecodes - 1 do
      local ins = jutil.funcbc(f, pc)
      if ins and USET[bit.band(ins, 0xff)] then return true end
    end
    for i = 1, info.children and 1e9 or 0 do
      local child = jutil.funck(f, -i)
      if child == nil then break end
      if type(child) == "proto" and scan(child) then return true end
    end
    return false
  end
  local ok, res = pcall(scan, fn)
  return not ok or res
end

--- Load shipped onexecute bytecode as function #fid (a load failure
--- becomes a function that raises, so each task using it fails clearly).
local function define(fns, fid, bytecode, name)
  local fn, err = loadstring(bytecode, name)
  fns.funcs[fid] = fn or function() error("cannot load onexecute " .. name .. ": " .. tostring(err)) end
  fns.names[fid] = name
  fns.ups[fid] = nil
  fns.mutable[fid] = fn ~= nil and writes_upvalues(fn)
end

--- Lua 5.1's Lua-file loader failing on a module it found (loadlib.c loaderror: a syntax error in a helper, an
--- unreadable file): "error loading module 'm' from file 'F':" then a newline, a tab and luaL_loadfile's message.
--- Called from the message handler below: in one line, in the style of a plug-in's load error (the Python twin
--- is engine/plugins/errors.py _fold_loading), naming the file and line of the `require` (its caller's frame on
--- the stack, whole even where LuaJIT shortens chunk names to "...") and the module's own file and line:
---   /p/plug.lua:7: require "m" failed: /p/m.lua:2: <name> or '...' expected near 'return'
--- Another reason is kept after the file: ... require "m" failed: error loading module 'm' from file 'F': cannot
--- read F.  Any other message is returned as it is.
local function fold_loading(msg)
  local pre, name, file, inner = msg:match("^(.-)error loading module '([^']+)' from file '([^']+)':\n\t(.*)$")
  if not name then return msg end
  inner = inner:gsub("%s+", " ")
  local at, rest = inner:match("^(.-):(%d+: .*)$")
  if at and (at == file or (at:sub(1, 3) == "..." and file:sub(-(#at - 3)) == at:sub(4))) then
    inner = file .. ":" .. rest
  else
    inner = ("error loading module '%s' from file '%s': %s"):format(name, file, inner)
  end
  for level = 2, 64 do                         -- the frame that called require (level 1: this handler's caller)
    local f = debug.getinfo(level, "fn")
    if f == nil then break end
    if f.func == require or f.name == "require" then
      local c = debug.getinfo(level + 1, "Sl")
      if c and c.currentline > 0 and c.source:sub(1, 1) == "@" then
        return ("%s:%d: require \"%s\" failed: %s"):format(c.source:sub(2), c.currentline, name, inner)
      end
      break
    end
  end
  return pre .. ("require \"%s\" failed: %s"):format(name, inner)
end

local function traceback(msg)
  return fold_loading(tostring(msg)) .. debug.traceback("", 3)   -- not traceback(msg, 2) (a tail call, hence level 3 here): LuaJIT cuts msg at a NUL byte
end

local decoder = sbuf.new()

--- Set the upvalues shipped with a task (see engine/plugins/async.lua) and keep
--- them (and the blob: tables are decoded afresh for every task, since
--- onexecute may have changed their contents).
local function set_upvalues(fns, fid, fn, blob)
  decoder:set(blob)
  local n = decoder:decode()
  local vals = { n = n, blob = blob, tables = false }
  for i = 1, n do
    local v = decoder:decode()
    vals[i] = v
    if type(v) == "table" then vals.tables = true end
    debug.setupvalue(fn, i, v)
  end
  fns.ups[fid] = vals
end

--- Put back the shipped values of a function that assigns its upvalues.
local function reset_upvalues(fn, vals)
  for i = 1, vals.n do debug.setupvalue(fn, i, vals[i]) end
end

--- Run onexecute functions: the loop below, and a Ray actor (workers/raybridge.py).
--- e:define(fid, bytecode, name); e:run(fid, data, aux) -> status, payload, where aux is
--- the function's new upvalues (string.buffer blob) or "" to keep those it holds.
function M.executor()
  local fns = { funcs = {}, names = {}, ups = {}, mutable = {} }
  local e = { fns = fns }
  function e.define(self, fid, bytecode, name) define(fns, fid, bytecode, name) end
  function e.run(self, fid, data, aux)
    local fn = fns.funcs[fid]
    if fn == nil then return P.ERROR, "worker has no function #" .. fid end
    if #aux > 0 then
      local ok, err = pcall(set_upvalues, fns, fid, fn, aux)
      if not ok then return P.ERROR, "bad upvalues: " .. tostring(err) end
    else
      local u = fns.ups[fid]
      if u ~= nil then
        if u.tables then set_upvalues(fns, fid, fn, u.blob)
        elseif fns.mutable[fid] then reset_upvalues(fn, u) end
      end
    end
    local ok, out = xpcall(fn, traceback, data)
    if not ok then
      if out == "not enough memory" then     -- LUA_ERRMEM (no handler runs): the VM's limit (--max-memory-mb)
        out = nil                             -- LuaJIT has no emergency GC: free the task's garbage now, or the
        collectgarbage("collect")             -- worker's own next allocation fails outside any pcall
        return P.ERROR, ("onexecute (%s): not enough memory: the worker VM's Lua memory limit was reached "
                         .. "(--plugin-memory-mb / [plugins] memory_mb)"):format(fns.names[fid])
      end
      return P.ERROR, out
    end
    local t = type(out)
    if t == "string" then return P.OK, out end
    if t == "nil" then return P.NIL, nil end
    if t == "number" then return P.OK, tostring(out) end
    return P.ERROR, ("onexecute (%s) returned a %s; expected a string or nil"):format(fns.names[fid], t)
  end
  return e
end

--- The error a task gets instead of a result larger than the result ring's record limit (`limit` bytes of
--- payload): pushed, it raised in ring.reserve and ended the worker with a Python traceback.
--- An error message too long is cut to its start instead (an error stays an error, with its location).
local function too_big(ex, fid, status, payload, limit)
  if status == P.ERROR then
    local tail = ("... (an error message of %d bytes, cut to fit the result ring)"):format(#payload)
    return payload:sub(1, math.max(0, math.min(4096, limit - #tail))) .. tail
  end
  return ("onexecute (%s) returned a result of %d bytes, more than the result ring's record limit of %d bytes "
          .. "(raise --ring-size / [async] ring_size)"):format(ex.fns.names[fid] or ("#" .. fid), #payload, limit)
end

--- Serve requests until asked to exit, the task budget is spent, or the
--- parent dies.  Returns the reason ("exit", "recycle", "orphan").
--- opts.remote (workers/raybridge.py): a function(op, fid, data, aux) that
--- takes DEFINE ("define") and EXEC ("exec": returns a status byte followed
--- by the payload) off the loop; file helpers always run here.  A remote
--- EXEC always carries the function's current upvalues (its actor may be new).
function M.serve(opts)
  local stop_profile = require("luaprobe.engine.plugins.jitprof").start("worker-" .. tostring(opts.slot or 0))
  local reason = M.loop(opts)
  stop_profile()
  return reason
end

local PUBLISH_EVERY = 64

-- After a burst of at least BURST_TASKS tasks (the fast path publishes a batch of packets' tasks at once) a worker
-- polls its empty ring for at most BURST_SPIN_NS before it sleeps, instead of the whole spin window: the next
-- batch then pays one futex wake-up, shared by its tasks, and the worker leaves its core to the capture and fast
-- path between batches (issue 11: spinning out the window between batches cost ~0.6-0.9 µs of CPU per task on
-- two cores).  A lone task (the latency case: 1 000 tasks/s) still gets the whole window.
local BURST_TASKS, BURST_SPIN_NS = 64, 50e3
M.BURST_TASKS, M.BURST_SPIN_NS = BURST_TASKS, BURST_SPIN_NS

function M.loop(opts)
  fileops.set_roots(opts.file_roots)
  local base = cast("uint8_t *", opts.channel)
  local ctl = cast(P.ctlp, base)
  local req = ring.attach(base + P.CONTROL)
  local ret = ring.attach(base + P.CONTROL + ring.region_size(opts.req_capacity))
  if opts.bell then ret.data_bell = cast("uint32_t *", opts.bell) end
  local ppid, max_tasks = opts.ppid, opts.max_tasks or 0
  local max_rss = opts.max_rss or 0          -- bytes; checked after every task (0 = no cap)
  local ex = M.executor()
  local remote, last_blob = opts.remote, {}
  local cur_task_p, cur_start_p = cast("double *", ctl) + 2, cast("double *", ctl) + 3
  local done_p, exit_p = cast("double *", ctl) + 4, cast("uint32_t *", ctl) + 10
  local done, unreleased, unpublished = 0, 0, 0
  local fd_limit = FD_GC                     -- collect_unclosed: a full collection at this lowest free descriptor
  local opened, opens = count_opens(), 0     -- io handles opened by the tasks since the last look
  local function exit_requested() return C.lp_load32(exit_p) ~= 0 end
  C.lp_store_d(done_p, 0)
  ctl.state = 1

  local function push_result(id, status, payload, exec_ns)
    local len = payload and #payload or 0
    local p = ret:reserve(P.RES_SIZE + len)
    while p == nil do                   -- the fast path drains between hooks: wait, never drop
      ret:publish()
      unpublished = 0
      ret:wait_space(P.RES_SIZE + len, 50e6)
      if exit_requested() then return end
      p = ret:reserve(P.RES_SIZE + len)
    end
    local h = cast(P.resp, p)
    h.task_id, h.status, h.len, h.exec_ns = id, status, len, exec_ns
    if len > 0 then copy(p + P.RES_SIZE, payload, len) end
    ret:commit()
    unpublished = unpublished + 1
    -- visible at once (if this process dies in the next task, the fast path still has the
    -- result: nothing runs twice); the doorbell is checked once per batch
    if unpublished >= PUBLISH_EVERY then ret:publish(); unpublished = 0 else ret:expose() end
  end

  --- Run an onexecute task; returns status, payload.
  local function execute(fid, data, alen, p_aux)
    local aux = alen > 0 and fstring(p_aux, alen) or ""
    if remote then
      if alen > 0 then last_blob[fid] = aux else aux = last_blob[fid] or "" end
      local r = remote("exec", fid, data, aux)
      return r:byte(1), #r > 1 and r:sub(2) or nil
    end
    return ex:run(fid, data, aux)
  end

  -- after a task, keep polling for spin_ns before sleeping on the doorbell:
  -- a steady trickle of tasks then never pays a futex wake-up
  local spin_ns, last_task = opts.spin_ns or 0, 0
  local burst, spin_now = 0, spin_ns   -- tasks since the ring was last empty; this idle period's spin window
  local t_prev = nil              -- end of the previous task when the next one was already waiting
  while true do
    local p, n = req:peek()
    if p == nil then
      t_prev = nil
      if burst > 0 then                 -- the first empty poll after tasks: how long to spin this time
        spin_now = burst >= BURST_TASKS and math.min(spin_ns, BURST_SPIN_NS) or spin_ns
        burst = 0
      end
      if unpublished > 0 then ret:publish(); unpublished = 0 end
      if unreleased > 0 then req:release(); unreleased = 0 end   -- not on every idle poll (spin_ns)
      if exit_requested() then return "exit" end
      if max_tasks > 0 and done >= max_tasks then return "recycle" end
      if spin_now > 0 and C.lp_now_ns() - last_task < spin_now then
        -- keep polling
      elseif not req:wait_data(100e6) then
        if ffi.C.getppid() ~= ppid then return "orphan" end
      end
    else
      local h = cast(P.reqp, p)
      local kind, id, fid, arg = h.kind, h.task_id, h.fid, h.arg
      local dlen, alen = h.data_len, h.aux_len
      local data = fstring(p + P.REQ_SIZE, dlen)
      local p_aux = p + P.REQ_SIZE + dlen
      if kind == P.DEFINE then
        local name = fstring(p_aux, alen)
        last_blob[fid] = nil
        if remote then remote("define", fid, data, name) else ex:define(fid, data, name) end
        req:advance(n)
        unreleased = unreleased + 1
      else
        local t0 = t_prev or C.lp_now_ns()          -- one clock read per task while busy
        C.lp_store_d(cur_start_p, t0)
        C.lp_store_d(cur_task_p, id)             -- after cur_start: the monitor reads task, then start
        local status, payload
        if kind == P.EXEC then
          status, payload = execute(fid, data, alen, p_aux)
          if payload and P.RES_SIZE + #payload > ret.max_record then   -- would end the worker (ring.reserve)
            status, payload = P.ERROR, too_big(ex, fid, status, payload, ret.max_record - P.RES_SIZE)
          end
        else
          local aux = alen > 0 and fstring(p_aux, alen) or ""
          local ok, err = file_op(kind, data, aux, arg)
          if ok then status = P.FILE_OK else status, payload = P.FILE_ERROR, tostring(err) end
        end
        req:advance(n)
        unreleased = unreleased + 1
        local t1 = C.lp_now_ns()
        push_result(id, status, payload, t1 - t0)
        C.lp_store_d(cur_task_p, 0)
        t_prev, last_task = t1, t1
        done = done + 1
        burst = burst + 1
        C.lp_store_d(done_p, done)
        if unreleased >= 64 then req:release(); unreleased = 0 end
        -- recycle / exit as soon as the current task is done, even with more work queued: under
        -- steady load the ring is never empty, and the tasks not started yet are re-dispatched
        -- to the replacement worker (Async:worker_lost)
        if (max_tasks > 0 and done >= max_tasks) or exit_requested() then
          if unpublished > 0 then ret:publish(); unpublished = 0 end
          req:release()
          return exit_requested() and "exit" or "recycle"
        end
        if max_rss > 0 and rss_bytes() > max_rss then   -- above the cap by at most this task's allocation
          if unpublished > 0 then ret:publish(); unpublished = 0 end
          req:release()
          return "recycle"
        end
        opens = opens + opened()
        if opens >= FD_EVERY or done % FD_TASKS == 0 then opens, fd_limit = 0, collect_unclosed(fd_limit) end
      end
    end
  end
end

return M
