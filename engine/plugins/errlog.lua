--[[
luaprobe.engine.plugins.errlog — log an error once per source line with its traceback,
then at most once a second per line with a count ("rate-limited").

Memory and log volume are bounded whatever the errors say: the key is (kind of error, source
line), and for messages without a source line (file helpers, whose text names a packet-derived
path) the helper and the reason with the name left out ("copy: No such file or directory");
past MAX_KEYS distinct keys per plug-in VM every further one shares a single "other" entry.
]]
local ring = require("luaprobe.shm.ring")
local C = ring.lib

local M = { MAX_KEYS = 256 }
local Log = {}
Log.__index = Log

--- logf(level, msg) receives the lines (level 4 = ERROR).
function M.new(logf)
  return setmetatable({ logf = logf, seen = {}, nkeys = 0 }, Log)
end

--- "file:line" at the start of an error message, else its first line.
function M.site(msg)
  return msg:match("^([^\n]-:%d+):") or msg:match("^[^\n]*") or "?"
end

--- Count an error of `kind` (e.g. "onresult error") and log it if due.
function Log:report(kind, msg)
  msg = tostring(msg)
  if msg:find("' not found:\n\t", 1, true) then       -- a failed require: not its ~20 "no file" lines (the
    msg = msg:gsub("\n\tno [^\n]*", "")               -- run's plug-in problem names the directories searched)
  end
  local site
  if msg:match("^[^\n]-:%d+:") then
    site = M.site(msg)
  else                                       -- "copy: <name>: <reason>": the name is left out of the key
    local helper, reason = msg:match("^(%a+): .*: ([^:\n]*)$")
    site = helper and (helper .. ": " .. reason) or M.site(msg)
  end
  local key = kind .. "@" .. site
  local e = self.seen[key]
  local now = C.lp_now_ns()
  if e == nil and self.nkeys >= M.MAX_KEYS then
    key, site = kind .. "@*", "other places"
    e = self.seen[key]
  end
  if e == nil then
    self.nkeys = self.nkeys + 1
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
