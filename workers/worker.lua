--[[
luaprobe.workers.worker — the loop of one async worker process (one LuaJIT VM).

It pops request records from its request ring, runs them (onexecute bytecode
or a built-in file helper, never a shell) and pushes one result record per
task to its return ring, in request order.  The per-task path stays inside
LuaJIT; Python only starts the process and builds the VM (workers/worker.py).
]]
local ffi = require("ffi")
local ring = require("luaprobe.shm.ring")
local P = require("luaprobe.workers.protocol")

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

--- Load shipped onexecute bytecode as function #fid (a load failure
--- becomes a function that raises, so each task using it fails clearly).
local function define(funcs, names, fid, bytecode, name)
  local fn, err = loadstring(bytecode, name)
  funcs[fid] = fn or function() error("cannot load onexecute " .. name .. ": " .. tostring(err)) end
  names[fid] = name
end

local function traceback(msg)
  return debug.traceback(tostring(msg), 2)
end

--- Restore the upvalues shipped with a task (see engine/plugins/async.lua).
local function restore_upvalues(fn, blob)
  local loader, err = loadstring(blob, "=upvalues")
  if not loader then error("bad upvalue blob: " .. tostring(err)) end
  local n, values = loader()
  for i = 1, n do debug.setupvalue(fn, i, values[i]) end
end

--- Run onexecute functions outside the loop (a Ray actor: workers/raybridge.py).
--- e:define(fid, bytecode, name); e:run(fid, data, aux) -> status, payload.
function M.executor()
  local e = { funcs = {}, names = {} }
  function e.define(self, fid, bytecode, name) define(self.funcs, self.names, fid, bytecode, name) end
  function e.run(self, fid, data, aux)
    local fn = self.funcs[fid]
    if fn == nil then return P.ERROR, "worker has no function #" .. fid end
    if #aux > 0 then
      local ok, err = pcall(restore_upvalues, fn, aux)
      if not ok then return P.ERROR, err end
    end
    local ok, out = xpcall(fn, traceback, data)
    if not ok then return P.ERROR, out end
    local t = type(out)
    if t == "string" then return P.OK, out end
    if t == "nil" then return P.NIL, nil end
    if t == "number" then return P.OK, tostring(out) end
    return P.ERROR, ("onexecute (%s) returned a %s; expected a string or nil"):format(self.names[fid], t)
  end
  return e
end

--- Serve requests until asked to exit, the task budget is spent, or the
--- parent dies.  Returns the reason ("exit", "recycle", "orphan").
--- opts.remote (workers/raybridge.py): a function(op, fid, data, aux) that
--- takes DEFINE ("define") and EXEC ("exec": returns a status byte followed
--- by the payload) off the loop; file helpers always run here.
function M.serve(opts)
  local stop_profile = require("luaprobe.engine.plugins.jitprof").start("worker-" .. tostring(opts.slot or 0))
  local reason = M.loop(opts)
  stop_profile()
  return reason
end

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
  local remote = opts.remote
  local cur_task_p, cur_start_p = cast("double *", ctl) + 2, cast("double *", ctl) + 3
  local done_p, exit_p = cast("double *", ctl) + 4, cast("uint32_t *", ctl) + 10
  local done, unreleased = 0, 0
  local function exit_requested() return C.lp_load32(exit_p) ~= 0 end
  C.lp_store_d(done_p, 0)
  ctl.state = 1

  local function push_result(id, status, payload)
    local len = payload and #payload or 0
    local p = ret:reserve(P.RES_SIZE + len)
    while p == nil do                   -- the fast path drains between hooks: wait, never drop
      ret:publish()
      ret:wait_space(P.RES_SIZE + len, 50e6)
      if exit_requested() then return end
      p = ret:reserve(P.RES_SIZE + len)
    end
    local h = cast(P.resp, p)
    h.task_id, h.status, h.len = id, status, len
    if len > 0 then copy(p + P.RES_SIZE, payload, len) end
    ret:commit()
    ret:publish()
  end

  local function execute(id, fid, data, aux)
    if remote then
      local r = remote("exec", fid, data, aux)
      local payload = #r > 1 and r:sub(2) or nil
      return push_result(id, r:byte(1), payload)
    end
    return push_result(id, ex:run(fid, data, aux))
  end

  -- after a task, keep polling for spin_ns before sleeping on the doorbell:
  -- a steady trickle of tasks then never pays a futex wake-up
  local spin_ns, last_task = opts.spin_ns or 0, 0
  while true do
    local p, n = req:peek()
    if p == nil then
      if unreleased > 0 then req:release(); unreleased = 0 end   -- not on every idle poll (spin_ns)
      if exit_requested() then return "exit" end
      if max_tasks > 0 and done >= max_tasks then return "recycle" end
      if spin_ns > 0 and C.lp_now_ns() - last_task < spin_ns then
        -- keep polling
      elseif not req:wait_data(100e6) then
        if ffi.C.getppid() ~= ppid then return "orphan" end
      end
    else
      local h = cast(P.reqp, p)
      local kind, id, fid, arg = h.kind, h.task_id, h.fid, h.arg
      local dlen, alen = h.data_len, h.aux_len
      local data = fstring(p + P.REQ_SIZE, dlen)
      local aux = alen > 0 and fstring(p + P.REQ_SIZE + dlen, alen) or ""
      req:advance(n)
      unreleased = unreleased + 1
      if kind == P.DEFINE then
        if remote then remote("define", fid, data, aux) else ex:define(fid, data, aux) end
      else
        C.lp_store_d(cur_start_p, C.lp_now_ns())
        C.lp_store_d(cur_task_p, id)             -- after cur_start: the monitor reads task, then start
        if kind == P.EXEC then
          execute(id, fid, data, aux)
        else
          local ok, err = file_op(kind, data, aux, arg)
          if ok then push_result(id, P.FILE_OK) else push_result(id, P.FILE_ERROR, tostring(err)) end
        end
        C.lp_store_d(cur_task_p, 0)
        if spin_ns > 0 then last_task = C.lp_now_ns() end
        done = done + 1
        C.lp_store_d(done_p, done)
        if unreleased >= 64 then req:release(); unreleased = 0 end
        -- recycle / exit as soon as the current task is done, even with more work queued: under
        -- steady load the ring is never empty, and the tasks not started yet are re-dispatched
        -- to the replacement worker (Async:worker_lost)
        if (max_tasks > 0 and done >= max_tasks) or exit_requested() then
          req:release()
          return exit_requested() and "exit" or "recycle"
        end
        if max_rss > 0 and rss_bytes() > max_rss then   -- above the cap by at most this task's allocation
          req:release()
          return "recycle"
        end
      end
    end
  end
end

return M
