-- engine/plugins/buffer.lua: the Buffer object handed to hooks (docs.trisul.org/docs/lua/obj_buffer).
--
-- A Buffer is a view (const uint8_t *, length) over memory the runtime owns: packet bytes in
-- the ring, a reassembly buffer, ... It is valid only while the hook runs. Byte offsets are
-- 0-based. All buffers share one metatable, so creating one is a small table allocation; a hook
-- dispatcher that wants zero allocations per call keeps one object and rebinds it:
--
--   local buffer = require "luaprobe.engine.plugins.buffer"
--   local b = buffer.new(ptr, len[, anchor])   -- ptr: any cdata pointer convertible to uint8_t*
--   buffer.rebind(b, ptr, len[, anchor])       -- reuse b for the next hook call
--   buffer.invalidate(b)                       -- after the hook: later use raises an error
--   local s = buffer.from_string("bytes")      -- view over a Lua string (kept alive by the object)
--   buffer.is_buffer(x)                        -- true for Buffer objects
--
-- Script methods: size(), length(), tostring([off[, len]]), hval_8/16/24/32(off),
-- hexdump([off[, len]]), appendtofile(file), writetofile(file, off).
-- Runtime-internal: bytes_ptr() -> ptr, len (no copy; T.async:copybuffer must copy the bytes
-- with ffi.string(ptr, len) or b:tostring() at call time, since the view dies with the hook).

local ffi = require "ffi"
local bit = require "bit"

local cast, fstring = ffi.cast, ffi.string
local sfmt, sbyte, error, type, tonumber = string.format, string.byte, error, type, tonumber
local concat = table.concat

local u8p = ffi.typeof("const uint8_t *")

local M = {}
local Buffer = {}
Buffer.__index = Buffer
M.Buffer = Buffer

local EMPTY = ""

-- The view's address is kept as a Lua number (`_p`, exact: addresses are below 2^53), not as a
-- pointer cdata: a cdata stored in a table field is a heap object, so rebinding a Buffer per packet
-- (Layer:rawbytes) would allocate one per call.  at(b) turns it back into a pointer inside the
-- compiled trace, which allocates nothing.
local intptr = ffi.typeof("intptr_t")
local function addr(ptr) return tonumber(cast(intptr, cast(u8p, ptr))) end
local function at(b) return cast(u8p, b._p) end

function M.new(ptr, len, anchor)
    len = tonumber(len) or 0
    if len < 0 then error("buffer.new: negative length", 2) end
    return setmetatable({ _p = addr(ptr ~= nil and ptr or EMPTY), _n = len, _a = anchor }, Buffer)
end

function M.rebind(b, ptr, len, anchor)
    b._p = addr(ptr)
    b._n = tonumber(len) or 0
    b._a = anchor
    return b
end

function M.invalidate(b)
    b._p = nil
    b._n = 0
    b._a = nil
end

function M.from_string(s)
    s = tostring(s)
    return setmetatable({ _p = addr(s), _n = #s, _a = s }, Buffer)
end

function M.is_buffer(x)
    return type(x) == "table" and getmetatable(x) == Buffer
end

local function check(b, name)
    if b._p == nil then
        error("Buffer:" .. name .. "(): buffer used after its hook returned", 3)
    end
end

function Buffer:size() return self._n end
function Buffer:length() return self._n end

-- 0-based (off, len) -> validated (off, len). off defaults to 0, len to the rest of the buffer.
-- off must lie in [0, size]; len is clipped to the bytes available.
local function range(self, name, off, len)
    check(self, name)
    local n = self._n
    off = off == nil and 0 or tonumber(off)
    if not off or off < 0 or off > n or off % 1 ~= 0 then
        error(sfmt("Buffer:%s(): offset %s out of range (buffer size %d)", name, tostring(off), n), 3)
    end
    if len == nil then
        len = n - off
    else
        len = tonumber(len)
        if not len or len < 0 then
            error(sfmt("Buffer:%s(): bad length %s", name, tostring(len)), 3)
        end
        if len > n - off then len = n - off end
    end
    return off, len
end

function Buffer:tostring(off, len)
    off, len = range(self, "tostring", off, len)
    return fstring(at(self) + off, len)
end

local function hval_check(self, name, off, w)
    check(self, name)
    off = off == nil and 0 or tonumber(off)
    if not off or off < 0 or off + w > self._n or off % 1 ~= 0 then
        error(sfmt("Buffer:%s(): offset %s out of range (buffer size %d)", name, tostring(off),
                   self._n), 3)
    end
    return off
end

function Buffer:hval_8(off)
    off = hval_check(self, "hval_8", off, 1)
    return at(self)[off]
end

function Buffer:hval_16(off)
    off = hval_check(self, "hval_16", off, 2)
    local p = at(self)
    return p[off] * 256 + p[off + 1]
end

function Buffer:hval_24(off)
    off = hval_check(self, "hval_24", off, 3)
    local p = at(self)
    return (p[off] * 256 + p[off + 1]) * 256 + p[off + 2]
end

function Buffer:hval_32(off)
    off = hval_check(self, "hval_32", off, 4)
    local p = at(self)
    return ((p[off] * 256 + p[off + 1]) * 256 + p[off + 2]) * 256 + p[off + 3]
end

-- hexdump([off[, len]]) -> string, exactly what `hexdump -C -v -s off -n len` prints for the same
-- bytes: "%08x" offset (absolute within the buffer), two groups of 8 hex bytes, "|ascii|" with
-- '.' for bytes outside 0x20..0x7e, then a final line with the end offset. An empty dump at
-- offset 0 is the empty string.
local HEX = {}
for i = 0, 255 do HEX[i] = sfmt("%02x ", i) end
local ASC = {}
for i = 0, 255 do ASC[i] = (i >= 32 and i < 127) and string.char(i) or "." end

function Buffer:hexdump(off, len)
    off, len = range(self, "hexdump", off, len)
    if len == 0 then return off == 0 and "" or sfmt("%08x\n", off) end
    local p = at(self)
    local lines = {}
    local pos, stop = off, off + len
    while pos < stop do
        local cnt = stop - pos
        if cnt > 16 then cnt = 16 end
        local hx, as = { sfmt("%08x  ", pos) }, {}
        for i = 0, 15 do
            if i < cnt then
                local c = p[pos + i]
                hx[#hx + 1] = HEX[c]
                as[#as + 1] = ASC[c]
            else
                hx[#hx + 1] = "   "
            end
            if i == 7 then hx[#hx + 1] = " " end
        end
        lines[#lines + 1] = concat(hx) .. " |" .. concat(as) .. "|"
        pos = pos + cnt
    end
    lines[#lines + 1] = sfmt("%08x", stop)
    return concat(lines, "\n") .. "\n"
end

-- appendtofile(file): append all bytes, creating the file if needed.
-- writetofile(file, off): write all bytes at byte offset off (0-based) without truncating,
-- creating the file if needed (a gap past the end reads back as zeros).
-- Both return nothing on success; on an I/O failure they return nil, errmsg (no error raised),
-- so a missing directory cannot kill a hook.
function Buffer:appendtofile(file)
    check(self, "appendtofile")
    local f, err = io.open(file, "ab")
    if not f then return nil, err end
    local ok, werr = f:write(fstring(at(self), self._n))
    f:close()
    if not ok then return nil, werr end
end

-- An offset that is not a byte offset (negative, NaN, infinite, 2^63 or more, a string that is not a number) is
-- that error before the file is touched; a seek the file system refuses (past its largest file) is an error that
-- leaves no file behind when this call created it.  Before, a NaN / infinite / huge offset left an empty file and
-- said only "Invalid argument", and a non-number offset (`"abc"`) wrote at 0.
function Buffer:writetofile(file, off)
    check(self, "writetofile")
    local pos = off == nil and 0 or tonumber(off)
    if pos == nil or pos ~= pos or pos < 0 or pos >= 9223372036854775808 then
        return nil, sfmt("%s: offset %s is not a byte offset (a number 0 .. 2^63)", tostring(file), tostring(off))
    end
    local created = false
    local f = io.open(file, "r+b")
    if not f then
        local err
        f, err = io.open(file, "wb")
        if not f then return nil, err end
        created = true
    end
    local ok, serr = f:seek("set", pos)
    if not ok then
        f:close()
        if created then os.remove(file) end
        return nil, sfmt("%s: offset %.0f: %s", tostring(file), pos, tostring(serr))
    end
    local wok, werr = f:write(fstring(at(self), self._n))
    f:close()
    if not wok then return nil, werr end
end

function Buffer:bytes_ptr()
    check(self, "bytes_ptr")
    return at(self), self._n
end

Buffer.__len = function(self) return self._n end
Buffer.__tostring = function(self) return sfmt("Buffer(%d bytes)", self._n) end

return M
