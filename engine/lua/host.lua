--[[
engine.lua.host — boots one plug-in VM: installs T (with T.async) before the
chunk runs, loads the plug-in file, and calls its hooks with error isolation
(an error names file:line, is counted per hook and logged once per line).
]]
local tlib = require("engine.lua.tlib")
local async = require("engine.lua.async")
local errlog = require("engine.lua.errlog")

local M = {}
local Host = {}
Host.__index = Host

local function traceback(msg) return debug.traceback(tostring(msg), 2) end

--- Minimal engine object until the packet path provides the real one:
--- instanceid/id/timestamp plus a recorder for every output method.
local function recording_engine(instance, outputs)
  return setmetatable({
    instanceid = function() return instance end,
    id = function() return instance end,
    timestamp = function() return os.time(), 0 end,
  }, { __index = function(_, name)
    return function(_, ...) outputs[#outputs + 1] = { name, ... } end
  end })
end

--- Boot a VM for `opts.path`.  Returns a Host, or nil and an error message
--- ("file:line: message") when the file cannot be loaded or run.
function M.boot(opts)
  local path, instance = opts.path, opts.instance or "0"
  local function logf(level, msg) opts.log(level, path, instance, msg) end
  tlib.install({ script = path, instance = instance, enginetype = opts.enginetype or "frontend",
                 log = opts.log, print = opts.print })
  tlib.wrap_print({ script = path, instance = instance, log = opts.log, print = opts.print })
  local self = setmetatable({ path = path, instance = instance, outputs = {}, hook_errors = {},
                              hook_calls = {} }, Host)
  self.errors = errlog.new(logf)
  self.engine = opts.engine or recording_engine(instance, self.outputs)
  self.async = async.new({ script = path, log = logf, overflow_limit = opts.overflow_limit,
                           engine = self.engine })
  T.async = self.async.api
  local chunk, err = loadfile(path)
  if not chunk then return nil, err end
  local ok, rerr = xpcall(chunk, traceback)
  if not ok then return nil, rerr end
  if type(TrisulPlugin) ~= "table" then return nil, path .. ": no TrisulPlugin table" end
  self.plugin = TrisulPlugin
  return self, nil
end

--- Number of async workers the plug-in asks for (request_async_workers, default 1).
function Host:requested_workers()
  local n = tonumber(self.plugin.request_async_workers) or 1
  if n < 1 then n = 1 end
  return math.floor(n)
end

--- Call TrisulPlugin[sub][name](...) (or TrisulPlugin[name] when sub is nil).
--- Returns ok, result.  Errors are counted per hook and logged.
function Host:call(sub, name, ...)
  local t = sub and self.plugin[sub] or self.plugin
  local fn = t and t[name]
  if type(fn) ~= "function" then return true, nil end
  local key = sub and (sub .. "." .. name) or name
  self.hook_calls[key] = (self.hook_calls[key] or 0) + 1
  local ok, res = xpcall(fn, traceback, ...)
  if not ok then
    self.hook_errors[key] = (self.hook_errors[key] or 0) + 1
    self.errors:report(key .. " error", res)
  end
  return ok, res
end

--- Run a Lua string inside this VM (tests and tools).
function Host:exec(code)
  local f = assert(loadstring(code, "=exec"))
  return f()
end

return M
