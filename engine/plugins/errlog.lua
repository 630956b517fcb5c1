--[[
luaprobe.engine.plugins.errlog — log an error once per source line with its traceback,
then at most once a second per line with a count ("rate-limited").
]]
local ring = require("luaprobe.shm.ring")
local C = ring.lib

local M = {}
local Log = {}
Log.__index = Log

--- logf(level, msg) receives the lines (level 4 = ERROR).
function M.new(logf)
  return setmetatable({ logf = logf, seen = {} }, Log)
end

--- "file:line" at the start of an error message, else its first line.
function M.site(msg)
  return msg:match("^([^\n]-:%d+):") or msg:match("^[^\n]*") or "?"
end

--- Count an error of `kind` (e.g. "onresult error") and log it if due.
function Log:report(kind, msg)
  msg = tostring(msg)
  local site = M.site(msg)
  local key = kind .. "@" .. site
  local e = self.seen[key]
  local now = C.lp_now_ns()
  if e == nil then
    self.seen[key] = { count = 1, unlogged = 0, last = now }
    self.logf(4, ("%s: %s"):format(kind, msg))
    return
  end
  e.count, e.unlogged = e.count + 1, e.unlogged + 1
  if now - e.last >= 1e9 then
    self.logf(4, ("%s: %d more at %s (last: %s)"):format(kind, e.unlogged, site, msg:match("^[^\n]*")))
    e.unlogged, e.last = 0, now
  end
end

return M
