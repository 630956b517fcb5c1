-- engine/plugins/httpheader.lua: the HTTPHeader object of filex_monitor hooks (reference section 6.6),
-- plus a small RE2-subset regex engine used by match_value.
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
-- pattern string compiled by httpheader.regex (cached per pattern string).
--
-- httpheader.regex(pattern) -> object with partial_match(s) -> bool and
--   full_match(s) -> bool, and match(s, init) -> start, end (1-based, inclusive), captures...
-- Supported RE2 subset: literals; `.` (any byte but \n); `[...]` / `[^...]` with ranges, escapes
-- and [:alpha:]-style POSIX classes; \d \D \s \S \w \W \b \B \A \z; \n \r \t \f \v \xHH and escaped
-- punctuation; `^` `$` (whole text: RE2's default, not multi-line); groups `(...)`, `(?:...)`,
-- `(?P<name>...)`; alternation `|`; quantifiers `* + ? {n} {n,} {n,m}` and their lazy `?` forms;
-- flag groups `(?i)` `(?s)` `(?-i)` (they apply until the end of the enclosing group) and
-- `(?i:...)`. Matching is byte-wise (UTF-8 is not decoded; `(?i)` folds ASCII only) and uses
-- backtracking, so pathological patterns can be slow, unlike RE2. Not supported (raise an error):
-- backreferences (RE2 has none), \p{...} Unicode classes, \Q...\E.

local sbyte, ssub, schar, sfmt, slower = string.byte, string.sub, string.char, string.format, string.lower
local type, tostring, tonumber, error = type, tostring, tonumber, error

local M = {}

---------------------------------------------------------------------------------------------------
-- regex: parser -> tree; matcher: backtracking with continuations

local function is_word(c)
    return c and ((c >= 48 and c <= 57) or (c >= 65 and c <= 90) or (c >= 97 and c <= 122) or c == 95)
end
local function is_digit(c) return c >= 48 and c <= 57 end
local function is_space(c) return c == 32 or (c >= 9 and c <= 13) end

local POSIX = {
    alpha = function(c) return (c >= 65 and c <= 90) or (c >= 97 and c <= 122) end,
    digit = is_digit,
    alnum = function(c) return is_digit(c) or (c >= 65 and c <= 90) or (c >= 97 and c <= 122) end,
    space = is_space,
    upper = function(c) return c >= 65 and c <= 90 end,
    lower = function(c) return c >= 97 and c <= 122 end,
    punct = function(c) return (c >= 33 and c <= 47) or (c >= 58 and c <= 64) or (c >= 91 and c <= 96)
        or (c >= 123 and c <= 126) end,
    xdigit = function(c) return is_digit(c) or (c >= 65 and c <= 70) or (c >= 97 and c <= 102) end,
    word = is_word,
    blank = function(c) return c == 32 or c == 9 end,
    cntrl = function(c) return c < 32 or c == 127 end,
    print = function(c) return c >= 32 and c < 127 end,
    graph = function(c) return c > 32 and c < 127 end,
}

local function swapcase(c)
    if c >= 65 and c <= 90 then return c + 32 end
    if c >= 97 and c <= 122 then return c - 32 end
    return c
end

local SIMPLE_ESC = { n = 10, r = 13, t = 9, f = 12, v = 11, a = 7 }

local Parser = {}
Parser.__index = Parser

local function perr(p, msg)
    error(sfmt("regex %q: %s at position %d", p.src, msg, p.i), 0)
end

function Parser:peek() return ssub(self.src, self.i, self.i) end
function Parser:next()
    local ch = ssub(self.src, self.i, self.i)
    self.i = self.i + 1
    return ch
end

-- a class escape (\d \s \w and negations) -> predicate, or nil
local function class_escape(ch)
    if ch == "d" then return is_digit end
    if ch == "D" then return function(c) return not is_digit(c) end end
    if ch == "s" then return is_space end
    if ch == "S" then return function(c) return not is_space(c) end end
    if ch == "w" then return is_word end
    if ch == "W" then return function(c) return not is_word(c) end end
end

-- escape after the backslash -> byte value (literal) or nil, predicate
function Parser:escape()
    local ch = self:next()
    if ch == "" then perr(self, "trailing backslash") end
    local pred = class_escape(ch)
    if pred then return nil, pred end
    if SIMPLE_ESC[ch] then return SIMPLE_ESC[ch] end
    if ch == "x" then
        local h
        if self:peek() == "{" then
            h = self.src:match("^{(%x+)}", self.i)
            if not h then perr(self, "bad \\x{}") end
            self.i = self.i + #h + 2
        else
            h = self.src:match("^%x%x", self.i)
            if not h then perr(self, "bad \\x escape") end
            self.i = self.i + 2
        end
        local v = tonumber(h, 16)
        if v > 255 then perr(self, "\\x value above 0xFF (no UTF-8 support)") end
        return v
    end
    if ch == "0" then return 0 end
    if ch:match("%w") then perr(self, "unsupported escape \\" .. ch) end
    return sbyte(ch)
end

function Parser:class()
    -- after '['
    local neg = false
    if self:peek() == "^" then neg = true; self.i = self.i + 1 end
    local items = {}        -- {lo, hi} ranges or predicate functions
    local first = true
    while true do
        local ch = self:next()
        if ch == "" then perr(self, "missing ]") end
        if ch == "]" and not first then break end
        first = false
        local lo, pred
        if ch == "[" and self:peek() == ":" then
            local neg2, nm = self.src:match("^:(%^?)(%a+):%]", self.i)
            if not nm or not POSIX[nm] then perr(self, "bad POSIX class") end
            self.i = self.i + #neg2 + #nm + 3
            local f = POSIX[nm]
            pred = neg2 == "^" and function(c) return not f(c) end or f
        elseif ch == "\\" then
            lo, pred = self:escape()
        else
            lo = sbyte(ch)
        end
        if pred then
            items[#items + 1] = pred
        else
            local hi = lo
            if self:peek() == "-" and ssub(self.src, self.i + 1, self.i + 1) ~= "]"
                and ssub(self.src, self.i + 1, self.i + 1) ~= "" then
                self.i = self.i + 1
                local ch2 = self:next()
                if ch2 == "\\" then
                    local v = self:escape()
                    if not v then perr(self, "bad range end") end
                    hi = v
                else
                    hi = sbyte(ch2)
                end
                if hi < lo then perr(self, "bad range") end
            end
            items[#items + 1] = { lo, hi }
        end
    end
    local n = #items
    local function test(c)
        for k = 1, n do
            local it = items[k]
            if type(it) == "function" then
                if it(c) then return true end
            elseif c >= it[1] and c <= it[2] then
                return true
            end
        end
        return false
    end
    local ci = self.flags.i
    local base = test
    if ci then base = function(c) return test(c) or test(swapcase(c)) end end
    if neg then return function(c) return not base(c) end end
    return base
end

-- node kinds: {k="set", f=pred} {k="char", c=byte, ci=bool} {k="seq", ...} {k="alt", ...}
-- {k="grp", idx=n|nil, body} {k="rep", min, max, lazy, body} {k="bol"} {k="eol"} {k="wb", neg}

function Parser:alt()
    local alts = { self:seq() }
    while self:peek() == "|" do
        self.i = self.i + 1
        alts[#alts + 1] = self:seq()
    end
    if #alts == 1 then return alts[1] end
    return { k = "alt", unpack(alts) }
end

function Parser:seq()
    local items = {}
    while true do
        local ch = self:peek()
        if ch == "" or ch == "|" or ch == ")" then break end
        local atom = self:atom()
        if atom then
            atom = self:quant(atom)
            items[#items + 1] = atom
        end
    end
    return { k = "seq", unpack(items) }
end

function Parser:quant(atom)
    while true do
        local ch = self:peek()
        local mn, mx
        if ch == "*" then mn, mx = 0, math.huge; self.i = self.i + 1
        elseif ch == "+" then mn, mx = 1, math.huge; self.i = self.i + 1
        elseif ch == "?" then mn, mx = 0, 1; self.i = self.i + 1
        elseif ch == "{" then
            local a, comma, b = self.src:match("^{(%d+)(,?)(%d*)}", self.i)
            if not a then return atom end       -- a literal '{' (RE2 accepts that too)
            self.i = self.i + 2 + #a + #comma + #b
            mn = tonumber(a)
            mx = comma == "" and mn or (b == "" and math.huge or tonumber(b))
            if mx < mn then perr(self, "bad repeat") end
        else
            return atom
        end
        if atom.k == "bol" or atom.k == "eol" or atom.k == "wb" then perr(self, "nothing to repeat") end
        local lazy = false
        if self:peek() == "?" then lazy = true; self.i = self.i + 1 end
        atom = { k = "rep", min = mn, max = mx, lazy = lazy, body = atom }
    end
end

function Parser:atom()
    local ch = self:next()
    local flags = self.flags
    if ch == "(" then
        local idx
        if self:peek() == "?" then
            -- (?:  (?i)  (?i:  (?P<name>  (?<name>
            local fl, colon = self.src:match("^%?([%-imsU]*)([:)])", self.i)
            if fl then
                self.i = self.i + 1 + #fl + 1
                local on = true
                local newflags = { i = flags.i, s = flags.s }
                for f in fl:gmatch(".") do
                    if f == "-" then on = false
                    elseif f == "i" or f == "s" then newflags[f] = on end
                end
                if colon == ")" then
                    -- flag group: applies to the rest of the enclosing group
                    self.flags.i, self.flags.s = newflags.i, newflags.s
                    return nil
                end
                local saved = self.flags
                self.flags = newflags
                local body = self:alt()
                self.flags = saved
                if self:next() ~= ")" then perr(self, "missing )") end
                return { k = "grp", body = body }
            end
            local name = self.src:match("^%?P?<([%w_]+)>", self.i)
            if not name then perr(self, "unsupported group syntax") end
            self.i = self.i + #self.src:match("^%?P?<[%w_]+>", self.i)
        end
        self.ncap = self.ncap + 1
        idx = self.ncap
        local saved = { i = flags.i, s = flags.s }
        local body = self:alt()
        self.flags.i, self.flags.s = saved.i, saved.s
        if self:next() ~= ")" then perr(self, "missing )") end
        return { k = "grp", idx = idx, body = body }
    elseif ch == "[" then
        return { k = "set", f = self:class() }
    elseif ch == "." then
        if flags.s then return { k = "set", f = function() return true end } end
        return { k = "set", f = function(c) return c ~= 10 end }
    elseif ch == "^" then
        return { k = "bol" }
    elseif ch == "$" then
        return { k = "eol" }
    elseif ch == "\\" then
        local nx = self:peek()
        if nx == "b" or nx == "B" then self.i = self.i + 1; return { k = "wb", neg = nx == "B" } end
        if nx == "A" then self.i = self.i + 1; return { k = "bol" } end
        if nx == "z" then self.i = self.i + 1; return { k = "eol" } end
        local v, pred = self:escape()
        if pred then return { k = "set", f = pred } end
        return { k = "char", c = flags.i and slower(schar(v)):byte() or v, ci = flags.i }
    elseif ch == "*" or ch == "+" or ch == "?" then
        perr(self, "missing argument to repetition operator")
    else
        local c = sbyte(ch)
        if flags.i then c = sbyte(slower(ch)) end
        return { k = "char", c = c, ci = flags.i }
    end
end

-- matcher: m(node, s, i, caps, k) -> result of k(i') or false/nil; s is the subject string,
-- i the 1-based position of the next byte, caps[2n-1], caps[2n] the capture bounds
local m

local function single(node)      -- predicate on one byte for char/set nodes, else nil
    if node.k == "set" then return node.f end
    if node.k == "char" then
        local c = node.c
        if node.ci then return function(b) return b == c or swapcase(b) == c end end
        return function(b) return b == c end
    end
end

local function match_seq(node, j, s, i, caps, k)
    local item = node[j]
    if not item then return k(i) end
    return m(item, s, i, caps, function(i2) return match_seq(node, j + 1, s, i2, caps, k) end)
end

m = function(node, s, i, caps, k)
    local kind = node.k
    if kind == "char" then
        local b = sbyte(s, i)
        if not b then return false end
        if b == node.c or (node.ci and swapcase(b) == node.c) then return k(i + 1) end
        return false
    elseif kind == "set" then
        local b = sbyte(s, i)
        if b and node.f(b) then return k(i + 1) end
        return false
    elseif kind == "seq" then
        return match_seq(node, 1, s, i, caps, k)
    elseif kind == "alt" then
        for a = 1, #node do
            local r = m(node[a], s, i, caps, k)
            if r then return r end
        end
        return false
    elseif kind == "grp" then
        local idx = node.idx
        if not idx then return m(node.body, s, i, caps, k) end
        local o1, o2 = caps[2 * idx - 1], caps[2 * idx]
        local r = m(node.body, s, i, caps, function(i2)
            local p1, p2 = caps[2 * idx - 1], caps[2 * idx]
            caps[2 * idx - 1], caps[2 * idx] = i, i2
            local r2 = k(i2)
            if not r2 then caps[2 * idx - 1], caps[2 * idx] = p1, p2 end
            return r2
        end)
        if not r then caps[2 * idx - 1], caps[2 * idx] = o1, o2 end
        return r
    elseif kind == "rep" then
        local body, mn, mx = node.body, node.min, node.max
        local pred = node.pred
        if pred == nil then pred = single(body) or false; node.pred = pred end
        if pred then
            -- one byte per iteration: count the run, then try the continuation
            local n, len = 0, #s
            while n < mx and i + n <= len and pred(sbyte(s, i + n)) do n = n + 1 end
            if n < mn then return false end
            if node.lazy then
                for c = mn, n do
                    local r = k(i + c)
                    if r then return r end
                end
            else
                for c = n, mn, -1 do
                    local r = k(i + c)
                    if r then return r end
                end
            end
            return false
        end
        local lazy = node.lazy
        local function try(count, pos)
            if lazy and count >= mn then
                local r = k(pos)
                if r then return r end
            end
            if count < mx then
                local r = m(body, s, pos, caps, function(p2)
                    if p2 == pos and count >= mn then return false end   -- empty loop
                    return try(count + 1, p2)
                end)
                if r then return r end
            end
            if not lazy and count >= mn then return k(pos) end
            return false
        end
        return try(0, i)
    elseif kind == "bol" then
        if i == 1 then return k(i) end
        return false
    elseif kind == "eol" then
        if i == #s + 1 then return k(i) end
        return false
    elseif kind == "wb" then
        local at = is_word(sbyte(s, i - 1)) ~= is_word(sbyte(s, i))
        if at ~= node.neg then return k(i) end
        return false
    end
    error("regex: bad node " .. tostring(kind))
end

local Regex = {}
Regex.__index = Regex

-- firstset(node) -> set (byte -> true) of the bytes a match can start with, nullable flag
local function firstset(node)
    local kind = node.k
    if kind == "char" then
        return { [node.c] = true, [node.ci and swapcase(node.c) or node.c] = true }, false
    elseif kind == "set" then
        local t = {}
        for c = 0, 255 do if node.f(c) then t[c] = true end end
        return t, false
    elseif kind == "grp" then
        return firstset(node.body)
    elseif kind == "rep" then
        local t, nul = firstset(node.body)
        return t, nul or node.min == 0
    elseif kind == "seq" then
        local t = {}
        for j = 1, #node do
            local t2, nul = firstset(node[j])
            for c in pairs(t2) do t[c] = true end
            if not nul then return t, false end
        end
        return t, true
    elseif kind == "alt" then
        local t, any = {}, false
        for j = 1, #node do
            local t2, nul = firstset(node[j])
            for c in pairs(t2) do t[c] = true end
            any = any or nul
        end
        return t, any
    end
    return {}, true          -- zero-width assertions
end

local function compile(src)
    local p = setmetatable({ src = src, i = 1, flags = { i = false, s = false }, ncap = 0 }, Parser)
    local tree = p:alt()
    if p.i <= #src then perr(p, "unmatched )") end
    local anchored = tree.k == "seq" and tree[1] and tree[1].k == "bol"
    local first, nullable = firstset(tree)
    -- a leading greedy `x*` over single bytes: a failed start followed by a byte x accepts
    -- cannot succeed one byte later either (the loop would have absorbed that byte)
    local lead
    local t1 = tree.k == "seq" and tree[1] or tree
    if t1 and t1.k == "rep" and t1.min == 0 and t1.max == math.huge and not t1.lazy then
        lead = single(t1.body)
    end
    return setmetatable({ pattern = src, tree = tree, ncap = p.ncap, anchored = anchored,
                          first = not nullable and first or nil, lead = lead }, Regex)
end

-- match(s[, init]) -> start, stop (1-based inclusive), captures... ; nil if no match
function Regex:match(s, init)
    s = tostring(s)
    local tree = self.tree
    local last = self.anchored and 1 or #s + 1
    local first, lead = self.first, self.lead
    for st = init or 1, last do
        if first and not first[sbyte(s, st) or -1] then goto continue end
        if lead and st > (init or 1) and lead(sbyte(s, st - 1)) then goto continue end
        local caps = {}
        local stop
        local ok = m(tree, s, st, caps, function(e) stop = e; return true end)
        if ok then
            local out = { st, stop - 1 }
            for c = 1, self.ncap do
                local a, b = caps[2 * c - 1], caps[2 * c]
                out[#out + 1] = a and ssub(s, a, b - 1) or nil
            end
            return unpack(out, 1, 2 + self.ncap)
        end
        ::continue::
    end
    return nil
end

function Regex:partial_match(s)
    return self:match(s) ~= nil
end

function Regex:full_match(s)
    s = tostring(s)
    return m(self.tree, s, 1, {}, function(e) return e == #s + 1 end) and true or false
end

local cache, ncache = {}, 0
function M.regex(src)
    local r = cache[src]
    if r then return r end
    r = compile(src)
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
        return M.regex(re):partial_match(v)
    end
    if re ~= nil and re.partial_match then
        return re:partial_match(v) and true or false
    end
    error("match_value: pattern must be a string or an object with partial_match()", 2)
end

return M
