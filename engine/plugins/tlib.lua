-- engine/plugins/tlib.lua: the global `T` table of a plug-in VM or an async worker VM.
--
--   local tlib = require "luaprobe.engine.plugins.tlib"
--   local T = tlib.install{
--       script     = "path/to/plugin.lua",    -- used to tag log lines
--       instance   = "0",                      -- VM instance id (string)
--       enginetype = "frontend",               -- "frontend" | "backend" | "worker"
--       log        = function(level, script, instance, msg, is_print) end,  -- optional
--       print      = function(script, instance, line) end,                  -- optional (wrap_print)
--       homenets   = {{"192.168.0.0", "255.255.0.0"}, ...},                 -- optional
--       configpath = "...", datapath = "...", configfile = "...",           -- optional
--       config     = {["App>DataDirectory"] = "..."},                       -- optional T.env.get_config
--       broadcast  = function(msgid, classid, msg) end,                     -- optional T.host:broadcast
--       contextid  = 0, probeid = "probe0", args = "...",                   -- optional
--   }
--   tlib.wrap_print(opts)   -- optional: global print -> opts.print or opts.log(DEBUG, ..., true)
--
-- install() must run BEFORE the plug-in chunk: chunks read T.K.vartype.* in table constructors.
-- Call styles follow docs.trisul.org/docs/lua/obj_globalt: T.util.* and T.env.* with a dot, T.host:* with a
-- colon (T.host.x(...) is tolerated too), T.log* with a dot.
--
-- Numbers: every T.util function that returns a 32-bit quantity returns it UNSIGNED (0..2^32-1),
-- unlike LuaJIT's `bit` library which returns signed int32.

local bit = require "bit"
local band, bor, bxor, rshift, lshift, tobit =
    bit.band, bit.bor, bit.bxor, bit.rshift, bit.lshift, bit.tobit
local sbyte, schar, sfmt, sfind, ssub = string.byte, string.char, string.format, string.find, string.sub
local tostring, tonumber, type, select = tostring, tonumber, type, select
local concat = table.concat

local M = {}

local TWO32 = 4294967296

local function u32(x)           -- int32 (or any number) -> unsigned 32-bit
    x = tobit(x)
    if x < 0 then x = x + TWO32 end
    return x
end

---------------------------------------------------------------------------------------------------
-- constants

M.loglevel = { EMERG = 0, FATAL = 1, ALERT = 2, CRIT = 3, ERROR = 4, WARN = 5, NOTICE = 6,
               INFO = 7, DEBUG = 8 }
M.vartype = { COUNTER = 0, RATE_COUNTER = 1, GAUGE = 2, RUNNING_COUNTER = 3, AVERAGE = 4,
              DELTA_RATE_COUNTER = 5, MAXIMUM = 6, MINIMUM = 7 }
local DEBUG = M.loglevel.DEBUG

---------------------------------------------------------------------------------------------------
-- T.util (pure functions, shared by every T)

local util = {}

-- IPv6 text of a 32-hex-digit key (RFC 5952 section 4: lower case, no leading zeros in a group, the longest
-- run of two or more zero groups as "::", the first such run on a tie; IPv4-mapped addresses stay in hex)
local function ntop6(key)
    local g = {}
    for i = 1, 8 do g[i] = tonumber(key:sub(i * 4 - 3, i * 4), 16) end
    local best, bestn, i = 0, 1, 1
    while i <= 8 do
        if g[i] == 0 then
            local j = i
            while j < 8 and g[j + 1] == 0 do j = j + 1 end
            if j - i + 1 > bestn then best, bestn = i, j - i + 1 end
            i = j + 1
        else
            i = i + 1
        end
    end
    local function hex(a, b)
        local t = {}
        for k = a, b do t[#t + 1] = sfmt("%x", g[k]) end
        return table.concat(t, ":")
    end
    if best == 0 then return hex(1, 8) end
    return hex(1, best - 1) .. "::" .. hex(best + bestn, 8)
end

-- ntop(ip) -> text address, or nil.  Trisul (obj_globalt): ntop(u32) -> "a.b.c.d"; a u32 (signed int32 too)
-- may come as a number or as its decimal string (kiwisyslog.lua passes log fields).  luaprobe also takes a
-- Trisul host key: "C0.A8.01.02" -> "192.168.1.2", 32 hex digits -> IPv6 text ("2001:db8::1").
function util.ntop(n)
    if type(n) == "string" then
        local a, b, c, d = n:match("^(%x%x)%.(%x%x)%.(%x%x)%.(%x%x)$")
        if a then
            return sfmt("%d.%d.%d.%d", tonumber(a, 16), tonumber(b, 16), tonumber(c, 16), tonumber(d, 16))
        end
        if #n == 32 and not n:find("%X") then return ntop6(n) end
        if not n:match("^%s*%-?%d+%s*$") then return nil end
    end
    n = tonumber(n)
    if not n or n % 1 ~= 0 or n < -2147483648 or n > 4294967295 then return nil end
    n = u32(n)
    return sfmt("%d.%d.%d.%d", band(rshift(n, 24), 255), band(rshift(n, 16), 255),
                band(rshift(n, 8), 255), band(n, 255))
end

-- pton("a.b.c.d") -> u32 (Trisul obj_globalt), or nil for anything that is not a dotted quad of decimal
-- octets 0..255 without leading zeros (as inet_pton(AF_INET)); IPv6 has no u32 form: nil
function util.pton(s)
    if type(s) ~= "string" then return nil end
    local a, b, c, d = s:match("^%s*(%d+)%.(%d+)%.(%d+)%.(%d+)%s*$")
    if not a then return nil end
    for _, o in ipairs({ a, b, c, d }) do
        if #o > 3 or (#o > 1 and o:sub(1, 1) == "0") then return nil end
    end
    a, b, c, d = tonumber(a), tonumber(b), tonumber(c), tonumber(d)
    if a > 255 or b > 255 or c > 255 or d > 255 then return nil end
    return ((a * 256 + b) * 256 + c) * 256 + d
end

function util.bor(p, q) return u32(bor(p, q)) end
function util.band(p, q) return u32(band(p, q)) end

-- testbit32(n, bit) -> bool, bit 0 = LSB
function util.testbit32(n, b)
    return band(n, lshift(1, b)) ~= 0
end

-- bitval32(n, start, width) -> (n >> (start-width+1)) & ((1<<width)-1)
function util.bitval32(n, start, width)
    width = width or 1
    local v = rshift(n, start - width + 1)
    if width < 32 then v = band(v, lshift(1, width) - 1) end
    return u32(v)
end

-- split(s, delim) -> array of fields. `delim` is a plain string (no pattern magic, may be
-- several characters; default ","). Empty fields are kept, like Python's str.split(delim):
-- split("a||b","|") -> {"a","","b"}; split("","|") -> {""}. An empty delim splits into chars.
function util.split(s, delim)
    s = tostring(s)
    delim = delim == nil and "," or tostring(delim)
    local out, n = {}, 0
    if delim == "" then
        for i = 1, #s do out[i] = ssub(s, i, i) end
        return out
    end
    local pos, dl = 1, #delim
    while true do
        local a = sfind(s, delim, pos, true)
        n = n + 1
        if not a then out[n] = ssub(s, pos); return out end
        out[n] = ssub(s, pos, a - 1)
        pos = a + dl
    end
end

-- splitm(s, delim) -> the fields of split() as multiple return values
local unpack = unpack or table.unpack
function util.splitm(s, delim)
    local t = util.split(s, delim)
    return unpack(t, 1, #t)
end

-- hash(s[, nbits=32]) -> MurmurHash2 (32-bit, seed 0) of tostring(s), masked to its low nbits.
local function mul32(a, b)      -- (a*b) mod 2^32 as int32, exact for any int32/uint32 inputs
    local blo = band(b, 0xffff)
    local bhi = band(rshift(b, 16), 0xffff)
    a = u32(a)
    return tobit(a * blo + tobit(a * bhi) * 65536)
end
M.mul32 = mul32

local MM = 0x5bd1e995
local function murmur2(s, seed)
    local len = #s
    local h = bxor(tobit(seed or 0), len)
    local i = 1
    while len - i + 1 >= 4 do
        local b0, b1, b2, b3 = sbyte(s, i, i + 3)
        local k = bor(b0, lshift(b1, 8), lshift(b2, 16), lshift(b3, 24))
        k = mul32(k, MM)
        k = bxor(k, rshift(k, 24))
        k = mul32(k, MM)
        h = bxor(mul32(h, MM), k)
        i = i + 4
    end
    local rest = len - i + 1
    if rest == 3 then h = bxor(h, lshift(sbyte(s, i + 2), 16)) end
    if rest >= 2 then h = bxor(h, lshift(sbyte(s, i + 1), 8)) end
    if rest >= 1 then h = mul32(bxor(h, sbyte(s, i)), MM) end
    h = bxor(h, rshift(h, 13))
    h = mul32(h, MM)
    h = bxor(h, rshift(h, 15))
    return u32(h)
end
M.murmur2 = murmur2

function util.hash(s, nbits)
    local h = murmur2(tostring(s), 0)
    nbits = tonumber(nbits) or 32
    if nbits >= 32 then return h end
    if nbits <= 0 then return 0 end
    return h % (2 ^ nbits)
end

-- bin2hex(s) -> lower-case hex; hex2bin(s) -> bytes (whitespace and a "0x" prefix ignored,
-- an odd trailing digit is dropped, non-hex characters raise an error)
function util.bin2hex(s)
    s = tostring(s)
    return (s:gsub(".", function(c) return sfmt("%02x", sbyte(c)) end))
end

function util.hex2bin(s)
    s = tostring(s):gsub("%s", ""):gsub("^0[xX]", "")
    if s:find("%X") then error("hex2bin: not a hex string", 2) end
    if #s % 2 == 1 then s = ssub(s, 1, -2) end
    return (s:gsub("%x%x", function(h) return schar(tonumber(h, 16)) end))
end

M.util = util

---------------------------------------------------------------------------------------------------
-- default log sink

local function default_log(level, script, instance, msg)
    io.stderr:write(sfmt("[%s] %s:%s %s\n", tostring(level), tostring(script), tostring(instance),
                         tostring(msg)))
end

local level_of_name = {}
for k, v in pairs(M.loglevel) do level_of_name[k] = v end

---------------------------------------------------------------------------------------------------
-- homenets

local DEFAULT_HOMENETS = {
    { "10.0.0.0", "255.0.0.0" }, { "172.16.0.0", "255.240.0.0" }, { "192.168.0.0", "255.255.0.0" },
}

local function compile_homenets(list)
    local nets = {}
    for i, e in ipairs(list) do
        local ip, mask = e[1] or e.ip, e[2] or e.mask
        local nip = type(ip) == "number" and u32(ip) or util.pton(ip)
        local nmask
        if type(mask) == "number" then
            nmask = mask <= 32 and (mask == 0 and 0 or u32(lshift(-1, 32 - mask))) or u32(mask)
        else
            nmask = util.pton(mask)
        end
        if not nip or not nmask then error("bad homenet entry #" .. i, 3) end
        nets[#nets + 1] = { u32(band(nip, nmask)), nmask, util.ntop(nip), util.ntop(nmask) }
    end
    return nets
end

---------------------------------------------------------------------------------------------------
-- install

local DEFAULT_CONFIGPATH = "/usr/local/etc/trisul-probe/domain0/probe0/context0"
local DEFAULT_DATAPATH = "/usr/local/var/lib/trisul-probe/domain0/probe0/context0"

M.installed_opts = nil

function M.install(opts)
    opts = opts or {}
    local script = opts.script or "?"
    local instance = opts.instance ~= nil and tostring(opts.instance) or "0"
    local logcb = opts.log or default_log

    local T = {}
    T.K = { loglevel = M.loglevel, vartype = M.vartype }
    T.K.vartypes = T.K.vartype          -- one docs row spells it this way
    T.enginetype = opts.enginetype or "frontend"
    T.contextid = opts.contextid or 0
    T.execution_contextid = opts.execution_contextid or T.contextid
    T.probeid = opts.probeid or "probe0"
    T.probeversion = opts.probeversion or "luaprobe-0.1"
    T.context_name = opts.context_name or "context0"
    T.contextname = T.context_name
    T.args = opts.args
    -- backend flusher id (API reference §7, a number): the backend instance, engine:instanceid() "0", "1", ...
    if T.enginetype == "backend" then T.backend_engineid = tonumber(instance) or 0 end
    T.util = util
    T.re2 = function(pattern, o) return require("luaprobe.engine.plugins.re2").new(pattern, o) end
    T.ac = function(patterns) return require("luaprobe.engine.plugins.ac").new(patterns) end

    -- logging: T.log([level,] msg); a string level name ("ERROR") is accepted too
    local function emit(level, msg)
        logcb(level, script, instance, tostring(msg))
    end
    function T.log(...)
        local n = select("#", ...)
        if n <= 1 then return emit(DEBUG, (...)) end
        local level, msg = ...
        if type(level) ~= "number" then level = level_of_name[tostring(level):upper()] or DEBUG end
        return emit(level, msg)
    end
    function T.logerror(msg) return emit(M.loglevel.ERROR, msg) end
    function T.logwarning(msg) return emit(M.loglevel.WARN, msg) end
    function T.loginfo(msg) return emit(M.loglevel.INFO, msg) end
    function T.logdebug(msg) return emit(DEBUG, msg) end

    -- T.host (colon methods; a dot call T.host.f(a, b) also works because `self` is checked)
    local nets = compile_homenets(opts.homenets or DEFAULT_HOMENETS)
    local configpath = opts.configpath or DEFAULT_CONFIGPATH
    local datapath = opts.datapath or DEFAULT_DATAPATH
    local host = {}
    local function is_home_u32(n)
        for i = 1, #nets do
            if band(n, nets[i][2]) == tobit(nets[i][1]) then return true end
        end
        return false
    end
    function host.get_homenets(self)
        local out = {}
        for i, e in ipairs(nets) do out[i] = { e[3], e[4] } end
        return out
    end
    function host.is_homenet(self, ip)
        if self ~= host then ip = self end
        local n = type(ip) == "number" and ip or util.pton(ip)
        if not n then return false end
        return is_home_u32(n)
    end
    function host.is_homenet_key(self, key)
        if self ~= host then key = self end
        if type(key) ~= "string" then return false end
        local a, b, c, d = key:match("^(%x%x)%.(%x%x)%.(%x%x)%.(%x%x)$")
        if not a then return false end      -- IPv6 keys (32 hex digits) are never home here
        return is_home_u32(((tonumber(a, 16) * 256 + tonumber(b, 16)) * 256 + tonumber(c, 16)) * 256
                           + tonumber(d, 16))
    end
    function host.get_configpath(self) return configpath end
    function host.get_datapath(self) return datapath end
    function host.log(self, ...)
        if self ~= host then return T.log(self, ...) end
        return T.log(...)
    end
    -- createkey / prepare_config: accepted and ignored (no key database in luaprobe).
    function host.createkey(self, guid, key, label) end
    function host.prepare_config(self, plugin_guid, template) end
    -- broadcast(msgid, classid, msg): forwarded to opts.broadcast when given (a plug-in VM: the fast path delivers
    -- it to the channellistener instances of class classid, engine.lua Engine:broadcast), otherwise dropped.
    -- Returns nothing in both cases.
    function host.broadcast(self, msgid, classid, msg)
        if self ~= host then msgid, classid, msg = self, msgid, classid end
        if opts.broadcast then opts.broadcast(msgid, classid, msg) end
    end
    T.host = host

    -- T.env
    local config = {
        ["App>DataDirectory"] = datapath,
        ["App>DBRoot"] = datapath,
        ["App>RunStateDirectory"] = datapath .. "/run",
        ["App>User"] = "trisul",
        ["App>ConfigDirectory"] = configpath,
    }
    for k, v in pairs(opts.config or {}) do config[k] = v end
    local domain_config = opts.domain_config or {}
    T.env = {
        configfile = opts.configfile or (configpath .. "/trisulProbeConfig.xml"),
        domain_configfile = opts.domain_configfile or "/usr/local/etc/trisul-probe/domain0/domainConfig.xml",
        get_config = function(path)
            if path == T.env then return nil end
            return config[path]
        end,
        get_domain_config = function(path)
            return domain_config[path]
        end,
    }

    rawset(os, "exit", M.refused_exit)
    M.installed_opts = opts
    rawset(_G, "T", T)
    return T
end

--- os.exit in a plug-in, backend or T.async worker VM (every VM that installs T): refused with a Lua error at the
--- caller's line.  Trisul runs plug-ins inside its engine process, where os.exit would end the whole probe with
--- nothing written; here it ended `luaprobe run` silently with the plug-in's code and left shared memory behind.
--- So it is a plug-in error like any other (docs/plugins.md "os.exit"): in a hook it is counted and logged (a hook
--- failing on every call ends the run with exit 4), at a script's top level or in onload it is a load error (4),
--- in onexecute the task fails (onerror).  A plug-in that wants to stop disables itself: onload returns false.
function M.refused_exit(code)
    error(("os.exit(%s) refused: a plug-in cannot end luaprobe's process (its results and shared memory would be "
           .. "lost); return from the hook instead, or return false from onload to disable the instance")
          :format(code == nil and "" or tostring(code)), 2)
end

-- wrap_print(opts): replace the global print. Each call becomes one line: the tostring()'d
-- arguments joined with tabs. It goes to opts.print(script, instance, line) when given, otherwise
-- to opts.log(DEBUG, script, instance, line, true) (the 5th argument flags print output).
-- opts defaults to the table last given to install(). Returns the new print function.
function M.wrap_print(opts)
    opts = opts or M.installed_opts or {}
    local script = opts.script or "?"
    local instance = opts.instance ~= nil and tostring(opts.instance) or "0"
    local pcb, logcb = opts.print, opts.log or default_log
    local function lprint(...)
        local n = select("#", ...)
        local parts = {}
        for i = 1, n do parts[i] = tostring((select(i, ...))) end
        local line = concat(parts, "\t")
        if pcb then pcb(script, instance, line) else logcb(DEBUG, script, instance, line, true) end
    end
    rawset(_G, "print", lprint)
    return lprint
end

return M
