--[[
luaprobe.engine.plugins.ac — T.ac: Aho-Corasick multi-pattern search (docs.trisul.org/docs/lua/obj_ac), on the maintained
ahocorasick-rs library (shm/luajit.py AhoCorasick) rather than a matcher of our own.

    local ac = T.ac({ "cmd.exe", "powershell", "/etc/passwd" })
    ac:match_all(text) -> { [pattern] = pos, ... }   every pattern found (its first occurrence)
    ac:match_one(text) -> { [pattern] = pos }        stops after the first match (the one that ends first)

`pos` is the 1-based position of the match's last byte, so `text:sub(pos + 1)` is what follows the pattern
(Trisul's ac-httplog.lua reads it that way).  Matching is byte-wise and case-sensitive; patterns that overlap
are all reported.  An empty table is returned when nothing matches.
]]
local ffi = require("ffi")
local config = require("luaprobe.config")

local M = {}
local AC = {}
AC.__index = AC
local u32p = ffi.typeof("const uint32_t *")

--- T.ac(patterns) -> AC object; patterns is an array of non-empty strings.
function M.new(patterns)
  if type(patterns) ~= "table" then error("T.ac: expected an array of pattern strings", 2) end
  local pats = {}
  for i, p in ipairs(patterns) do
    if type(p) ~= "string" or #p == 0 then error("T.ac: pattern " .. i .. " is not a non-empty string", 2) end
    pats[i] = p
  end
  return setmetatable({ m = config.ac(pats), patterns = pats }, AC)
end

local function found(self, text, one)
  if type(text) ~= "string" then text = tostring(text) end
  local packed = self.m.find(text, one)
  local out, p = {}, ffi.cast(u32p, packed)
  for k = 0, #packed / 8 - 1 do out[self.patterns[p[2 * k]]] = tonumber(p[2 * k + 1]) end
  return out
end

function AC:match_all(text) return found(self, text, false) end
function AC:match_one(text) return found(self, text, true) end

return M
