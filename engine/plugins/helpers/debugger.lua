--[[
debugger — the `debugger` helper module Trisul ships in plugins/lua/helpers (docs.trisul.org/docs/lua/debugger: scripts do
`local dbg = require'debugger'`), for a probe that runs without a terminal.

Its API is that of the debugger.lua module Trisul bundles: `dbg()` sets a breakpoint, `dbg.error(msg)`,
`dbg.assert(cond, msg)`, `dbg.call(f, ...)`, `dbg.exit()`, `dbg.writeln(fmt, ...)`.  luaprobe has no
interactive session, so a breakpoint is logged once per source line (T.logwarning) and execution goes on;
`error`, `assert` and `call` behave like Lua's own error / assert / xpcall with a traceback.
]]
local M = {}
local seen = {}

local function warn(msg)
  if type(T) == "table" and type(T.logwarning) == "function" then T.logwarning(msg) else io.stderr:write(msg, "\n") end
end

setmetatable(M, { __call = function()
  local info = debug.getinfo(2, "Sl")
  local where = info and (info.short_src .. ":" .. tostring(info.currentline)) or "?"
  if not seen[where] then
    seen[where] = true
    warn("debugger breakpoint at " .. where .. " ignored: luaprobe runs without an interactive session")
  end
end })

function M.error(err, level) error(err, (level or 1) + 1) end
function M.assert(cond, msg, ...)
  if not cond then error(msg or "assertion failed!", 2) end
  return cond, msg, ...
end
function M.call(f, ...) return xpcall(f, debug.traceback, ...) end
function M.exit() end
function M.writeln(fmt, ...) warn(string.format(tostring(fmt), ...)) end

return M
