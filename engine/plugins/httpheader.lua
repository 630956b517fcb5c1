-- engine/plugins/httpheader.lua: the HTTPHeader object of filex_monitor hooks (docs.trisul.org/docs/lua/obj_httpheader).
--
--   local httpheader = require "luaprobe.engine.plugins.httpheader"
--   local h = httpheader.new{ is_request = true, method = "GET", path = "/x", status = nil,
--                             headers = { {"Host", "a.com"}, {"Content-Type", "text/html"} } }
--   h:is_request()  h:is_response()  h:get_path()  h:get_method()  h:get_status()
--   h:get_value(name)          -- case-insensitive name, first occurrence, nil when absent
--   h:get_all_headers()        -- {Name = value} (original name spelling, first occurrence wins)
--   h:is_method(m)             -- case-insensitive
--   h:match_value(name, re)    -- true only if the header exists and re partially matches its value
--
-- `re` in match_value is either an object with a partial_match(s) method (a T.re2 object) or a
-- pattern string, compiled with Google RE2 by httpheader.regex (cached per pattern string; see
-- engine/plugins/re2.lua). RE2 matches in linear time, so header values from the wire cannot drive a
-- match into exponential time.

local re2 = require("luaprobe.engine.plugins.re2")
local slower, type, error = string.lower, type, error

local M = {}

--- regex(pattern [, level]) -> a compiled T.re2 object (default options), cached per pattern string (256 at most).
--- A bad pattern raises T.re2's error ("T.re2: bad pattern '(': ...") at `level` as error() counts it from the
--- caller of regex: 1 (the default) names regex's caller's line, 2 its caller's (match_value: the plug-in's).
local cache, ncache = {}, 0
function M.regex(src, level)
    local r = cache[src]
    if r then return r end
    local ok, res = pcall(re2.new, src)     -- its error(msg, 2) then names pcall, a C function: no position
    if not ok then error(res, (level or 1) + 1) end
    r = res
    if ncache >= 256 then cache, ncache = {}, 0 end
    cache[src] = r
    ncache = ncache + 1
    return r
end

---------------------------------------------------------------------------------------------------
-- HTTPHeader

local HTTPHeader = {}
HTTPHeader.__index = HTTPHeader
M.HTTPHeader = HTTPHeader

-- new{is_request=bool, method=, path=, status=, headers={{name,value},...}}
-- headers may also be given as {name = value} (order then unspecified).
local function add_header(h, n, name, value)
    name, value = tostring(name), tostring(value)
    h._names[n], h._values[n] = name, value
    local lk = slower(name)
    if h._idx[lk] == nil then h._idx[lk] = n end
end

function M.new(t)
    local h = {
        _req = t.is_request and true or false,
        _method = t.method,
        _path = t.path,
        _status = tonumber(t.status),
        _names = {}, _values = {}, _idx = {},
    }
    local hdrs = t.headers or {}
    local n = 0
    if hdrs[1] ~= nil or next(hdrs) == nil then
        for i = 1, #hdrs do
            local e = hdrs[i]
            n = n + 1
            add_header(h, n, e[1], e[2])
        end
    else
        for name, value in pairs(hdrs) do
            n = n + 1
            add_header(h, n, name, value)
        end
    end
    return setmetatable(h, HTTPHeader)
end

function HTTPHeader:is_request() return self._req end
function HTTPHeader:is_response() return not self._req end
-- request URI; "" for a response built without a path
function HTTPHeader:get_path() return self._path or "" end
-- request method ("GET"); "" for a response
function HTTPHeader:get_method() return self._method or "" end
-- response status code as a number; 0 for a request
function HTTPHeader:get_status() return self._status or 0 end

function HTTPHeader:is_method(mth)
    local own = self._method
    if own == nil or mth == nil then return false end
    return slower(own) == slower(tostring(mth))
end

function HTTPHeader:get_value(name)
    local i = self._idx[slower(tostring(name))]
    if i then return self._values[i] end
    return nil
end

function HTTPHeader:get_all_headers()
    local out = {}
    for i = #self._names, 1, -1 do out[self._names[i]] = self._values[i] end   -- first wins
    return out
end

function HTTPHeader:match_value(name, re)
    local v = self:get_value(name)
    if v == nil then return false end
    if type(re) == "string" then
        return M.regex(re, 2):partial_match(v)
    end
    if re ~= nil and re.partial_match then
        return re:partial_match(v) and true or false
    end
    error("match_value: pattern must be a string or an object with partial_match()", 2)
end

return M
