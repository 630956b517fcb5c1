--[[
luaprobe.engine.plugins.re2 — T.re2: Google RE2 regular expressions (docs.trisul.org/docs/lua/obj_re2), through the
_lpre2 shim (engine/plugins/_lpre2.cc) and LuaJIT's ffi.  RE2 matches in time linear in the text whatever the
pattern, so packet data can never drive a match into exponential time.

    local re = T.re2("(?i)user-agent:\\s*(\\S+)" [, { case_sensitive = false, ... }])
    re:partial_match(s)      -> bool                    (somewhere in s)
    re:full_match(s)         -> bool                    (all of s)
    re:partial_match_c1(s)   -> bool, c1
    re:partial_match_c2(s)   -> bool, c1, c2
    re:partial_match_n(s)    -> bool, c1 .. cN          (N = the pattern's capturing groups)
    re:full_match_n(s)       -> bool, c1 .. cN
    re:match(s, init)        -> start, end, c1 .. cN    (1-based, inclusive; nil when no match; luaprobe's own)

No match returns false plus nils.  A group that did not take part in the match gives "" (RE2's C++ API, which
Trisul wraps, clears the string).  Options (booleans, RE2's defaults unless given): utf8 (true), posix_syntax,
longest_match, log_errors (false here: errors are raised as Lua errors instead of printed), literal, never_nl,
never_capture, case_sensitive (true).  A bad pattern raises "T.re2: bad pattern '...': <RE2's reason>".
]]
local ffi = require("ffi")
local config = require("luaprobe.config")

ffi.cdef [[
void *lp_re2_new(const char *pat, size_t len, int flags, char *err, size_t errlen);
void lp_re2_free(void *re);
int lp_re2_groups(void *re);
int lp_re2_match(void *re, const char *text, size_t len, int anchor, int nsub, long *spans);
]]

local M = {}
local OPT = { utf8 = 1, posix_syntax = 2, longest_match = 4, log_errors = 8, literal = 16, never_nl = 32,
              never_capture = 64, case_sensitive = 128 }
local DEFAULT = { utf8 = true, case_sensitive = true }
local MAX_GROUPS = 32

local lib, why_not
if config.lpre2 then lib = ffi.load(config.lpre2)
else why_not = "T.re2: luaprobe was built without RE2 (install libre2-dev, then reinstall luaprobe)" end

local spans = ffi.new("long[?]", 2 * (MAX_GROUPS + 1))
local errbuf = ffi.new("char[512]")
local ssub, unpack = string.sub, unpack

local RE2 = {}
RE2.__index = RE2

--- T.re2(pattern[, opts]) -> RE2 object; raises on a bad pattern or an unknown option.
function M.new(pattern, opts)
  if lib == nil then error(why_not, 2) end
  if type(pattern) ~= "string" then error("T.re2: pattern must be a string", 2) end
  local flags = 0
  for name, bit in pairs(OPT) do
    local v = DEFAULT[name] or false
    if opts ~= nil and opts[name] ~= nil then v = opts[name] and true or false end
    if v then flags = flags + bit end
  end
  if opts ~= nil then
    for k in pairs(opts) do
      if OPT[k] == nil then error("T.re2: unknown option '" .. tostring(k) .. "'", 2) end
    end
  end
  local re = lib.lp_re2_new(pattern, #pattern, flags, errbuf, 512)
  if re == nil then error("T.re2: bad pattern '" .. pattern .. "': " .. ffi.string(errbuf), 2) end
  local n = lib.lp_re2_groups(re)
  return setmetatable({ re = ffi.gc(re, lib.lp_re2_free), pattern = pattern,
                        ngroups = n < MAX_GROUPS and n or MAX_GROUPS }, RE2)
end

local function run(self, s, anchor, nsub)
  if type(s) ~= "string" then s = tostring(s) end
  return lib.lp_re2_match(self.re, s, #s, anchor, nsub, spans) == 1, s
end

local function cap(s, k)
  local a = spans[2 * k]
  if a < 0 then return "" end
  return ssub(s, tonumber(a) + 1, tonumber(spans[2 * k + 1]))
end

local function captures(self, s, anchor, n)
  local ok
  ok, s = run(self, s, anchor, n)
  if not ok then return false end
  local out = {}
  for k = 1, n do out[k] = cap(s, k) end
  return true, unpack(out, 1, n)
end

function RE2:partial_match(s) return (run(self, s, 0, 0)) end
function RE2:full_match(s) return (run(self, s, 1, 0)) end
function RE2:partial_match_c1(s) return captures(self, s, 0, 1) end
function RE2:partial_match_c2(s) return captures(self, s, 0, 2) end
function RE2:partial_match_n(s) return captures(self, s, 0, self.ngroups) end
function RE2:full_match_n(s) return captures(self, s, 1, self.ngroups) end

--- match(s[, init]) -> start, end (1-based, inclusive), captures...; nil when there is no match at or after init.
function RE2:match(s, init)
  init = init or 1
  local ok = run(self, ssub(s, init), 0, self.ngroups)
  if not ok then return nil end
  local out = { tonumber(spans[0]) + init, tonumber(spans[1]) + init - 1 }
  local rest = ssub(s, init)
  for k = 1, self.ngroups do out[k + 2] = cap(rest, k) end
  return unpack(out, 1, self.ngroups + 2)
end

M.available = lib ~= nil
return M
