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

--- logf(level, msg) receives the lines (level 4 = ERROR, 8 = DEBUG); path: the plug-in file, named when an
--- error is raised outside it (a helper module, luaprobe's engine) with the plug-in's line from the traceback.
--- now_ns: the clock (default the monotonic lp_now_ns; tests give their own).
function M.new(logf, path, now_ns)
  return setmetatable({ logf = logf, seen = {}, nkeys = 0, path = path, now_ns = now_ns or C.lp_now_ns }, Log)
end

local function plain(s) return (s:gsub("[%^%$%(%)%%%.%[%]%*%+%-%?]", "%%%0")) end

--- "file:line" of the first traceback frame in the plug-in file `path` (LuaJIT may shorten a long chunk name
--- to "..." and its tail), or nil.
function M.plugin_frame(tb, path)
  if not (tb and path) then return nil end
  for frame in tb:gmatch("\n\t([^\n]+)") do
    local name, line = frame:match("^(.-):(%d+):")
    if name and (name == path or (name:sub(1, 3) == "..." and path:find(plain(name:sub(4)) .. "$"))) then
      return path .. ":" .. line
    end
  end
  return nil
end

--- One line for the log: the message without its traceback, naming the plug-in's file:line first when the
--- error was raised elsewhere; and the traceback (nil when none), logged at debug level only.
function Log:split(msg)
  local head, tb = msg:match("^(.-)(\nstack traceback:.*)$")
  head = head or msg
  local path = self.path
  if path and head:sub(1, #path + 1) ~= path .. ":" then
    local short, rest = head:match("^(%.%.%.[^\n]-):(%d+:.*)$")
    if short and path:find(plain(short:sub(4)) .. "$") then
      head = path .. ":" .. rest                -- LuaJIT shortened the plug-in's own name (a path > 60 bytes)
    else
      local at = M.plugin_frame(tb, path)
      if at then head = at .. ": " .. head end
    end
  end
  return head, tb
end

--- "file:line" at the start of an error message, else its first line.
function M.site(msg)
  return msg:match("^([^\n]-:%d+):") or msg:match("^[^\n]*") or "?"
end

--- The key of an error whose message has no "file:line:" (error({...}) is "table: 0x55d0...", a Buffer range error
--- raised through a tail call names the offset and size): the plug-in's frame in the traceback when there is one,
--- else the first line with its numbers left out, so that a message that differs on every call is one key, not
--- MAX_KEYS logged lines (before: 256 ERROR lines for error({code = 1}) in onpacket, each with its own address).
function M.nosite_key(msg, path)
  local at = M.plugin_frame(msg:match("\nstack traceback:.*$"), path)
  if at then return at end
  return (M.site(msg):gsub("0[xX]%x+", "#"):gsub("%d+", "#"))
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
    site = helper and (helper .. ": " .. reason) or M.nosite_key(msg, self.path)
  end
  local key = kind .. "@" .. site
  local e = self.seen[key]
  local now = self.now_ns()
  if e == nil and self.nkeys >= M.MAX_KEYS then
    key, site = kind .. "@*", "other places"
    e = self.seen[key]
  end
  if e == nil then
    local head, tb = self:split(msg)       -- (only for a line that is logged: an error on every packet is counted)
    self.nkeys = self.nkeys + 1
    self.seen[key] = { count = 1, unlogged = 0, last = now }
    self.logf(4, ("%s: %s"):format(kind, head))
    if tb then self.logf(8, ("%s: %s%s"):format(kind, head:match("^[^\n]*"), tb)) end   -- -v shows it
    return
  end
  e.count, e.unlogged = e.count + 1, e.unlogged + 1
  if now - e.last >= 1e9 then
    local last = self:split(msg):match("^[^\n]*")
    local at, rest = last:match("^([^\n]-:%d+):(.*)$")   -- the line's own file:line, as its first report gave it
    if at and site ~= "other places" then
      self.logf(4, ("%s: %d more at %s (last:%s)"):format(kind, e.unlogged, at, rest))
    else                                      -- no source line ("returned a non-boolean"), or many places
      self.logf(4, ("%s: %d more: %s"):format(kind, e.unlogged, last))
    end
    e.unlogged, e.last = 0, now
  end
end

return M
