--[[
luaprobe.engine.streams.tls — TLS record framing and handshake extraction over the two
reassembled streams of one TCP flow (RFC 5246 §6.2 records, §7.4 handshake;
RFC 8446 §4 for TLS 1.3, whose certificates are encrypted and so not seen).

    local tls = require "luaprobe.engine.streams.tls"
    if tls.looks_like(first_bytes) then
      local A = tls.new{ record = function(dir, rec) end,        -- every record except application data
                         cipher = function(hex) end,             -- ServerHello cipher suite, "C02F"
                         certs  = function(dir, list_of_der) end } -- Certificate message, leaf first
      A:data(dir, ptr_or_string, len)   -- in order, per direction (any dir numbering)
      A:gap(dir)                        -- bytes lost: that direction stops being parsed
    end

Records are reframed from the byte stream: a 5-byte header (type 20..24,
version major 3, length <= 2^14 + 2048) and its body.  A record header that
does not fit these rules stops the analysis of that direction (not TLS, or
framing lost).  Application-data records (type 23) are skipped without
copying their bodies.  `rec` passed to `record` is the whole record, header
included (what the TLS:RECORD attribute carries, docs.trisul.org/docs/lua/reassembly).  Handshake messages
are reassembled across records until the direction sends ChangeCipherSpec;
a ServerHello yields the cipher suite, a Certificate message the DER
certificates (parsed by the caller, one call per message).
Shared module: reassembly_handler attributes (engine/streams/stage.lua) and
any analyser that needs TLS certificate chains.
]]
local ffi = require("ffi")
local fstring = ffi.string
local sbyte, ssub, sfmt = string.byte, string.sub, string.format

local M = {}
local A = {}
A.__index = A

local MAX_REC = 16384 + 2048

--- True when `s` (the first bytes of a client->server stream) starts like a TLS record.
function M.looks_like(s)
  local t, v = sbyte(s, 1, 2)
  return t ~= nil and t >= 20 and t <= 24 and v == 3
end

function M.new(cb)
  return setmetatable({ cb = cb, buf = { [0] = "", [1] = "" }, skip = { [0] = 0, [1] = 0 },
                        hs = { [0] = "", [1] = "" }, ccs = { [0] = false, [1] = false },
                        dead = { [0] = false, [1] = false } }, A)
end

local function u24(s, i)
  local a, b, c = sbyte(s, i, i + 2)
  return (a * 256 + b) * 256 + c
end

-- Handshake messages of one direction: type(1) length(3) body.
function A:handshake(dir, frag)
  local b = self.hs[dir] .. frag
  local pos = 1
  while #b - pos + 1 >= 4 do
    local typ, len = sbyte(b, pos), u24(b, pos + 1)
    if #b - pos + 1 < 4 + len then break end
    local body = ssub(b, pos + 4, pos + 3 + len)
    if typ == 2 then self:server_hello(body)
    elseif typ == 11 then self:certificate(dir, body) end
    pos = pos + 4 + len
  end
  b = ssub(b, pos)
  if #b > 1048576 then b = ""; self.ccs[dir] = true end     -- a runaway message: stop
  self.hs[dir] = b
end

function A:server_hello(body)
  -- version(2) random(32) session_id<0..32> cipher_suite(2)
  if #body < 38 then return end
  local sid = sbyte(body, 35)
  local i = 36 + sid
  if #body < i + 1 then return end
  local hi, lo = sbyte(body, i, i + 1)
  if self.cb.cipher then self.cb.cipher(sfmt("%02X%02X", hi, lo)) end
end

function A:certificate(dir, body)
  -- certificate_list<0..2^24-1> of ASN.1Cert<1..2^24-1> (TLS 1.2)
  if #body < 3 then return end
  local total = u24(body, 1)
  local pos, stop, out = 4, math.min(#body, 3 + total), {}
  while pos + 2 <= stop do
    local n = u24(body, pos)
    if n == 0 or pos + 2 + n > stop then break end
    out[#out + 1] = ssub(body, pos + 3, pos + 2 + n)
    pos = pos + 3 + n
  end
  if #out > 0 and self.cb.certs then self.cb.certs(dir, out) end
end

--- Bytes of direction `dir` (a const uint8_t* or a Lua string, `n` bytes).
function A:data(dir, p, n)
  if self.dead[dir] then return end
  local off = 0
  local skip = self.skip[dir]
  if skip > 0 then                                  -- inside an application-data record
    local k = skip < n and skip or n
    self.skip[dir] = skip - k
    off = k
    if off >= n then return end
  end
  local chunk
  if type(p) == "string" then chunk = off == 0 and n == #p and p or ssub(p, off + 1, n)
  else chunk = fstring(p + off, n - off) end
  local b = self.buf[dir] .. chunk
  local pos, len = 1, #b
  while len - pos + 1 >= 5 do
    local typ, vmaj = sbyte(b, pos, pos + 1)
    local rlen = sbyte(b, pos + 3) * 256 + sbyte(b, pos + 4)
    if typ < 20 or typ > 24 or vmaj ~= 3 or rlen > MAX_REC then
      self.dead[dir] = true; self.buf[dir] = ""
      return
    end
    if typ == 23 then                                -- application data: skip the body uncopied
      local have = len - pos + 1 - 5
      if have >= rlen then pos = pos + 5 + rlen
      else self.skip[dir] = rlen - have; pos = len + 1; break end
    else
      if len - pos + 1 < 5 + rlen then break end
      local rec = ssub(b, pos, pos + 4 + rlen)
      if self.cb.record then self.cb.record(dir, rec) end
      if typ == 20 then self.ccs[dir] = true
      elseif typ == 22 and not self.ccs[dir] then self:handshake(dir, ssub(rec, 6)) end
      pos = pos + 5 + rlen
    end
  end
  self.buf[dir] = pos > len and "" or ssub(b, pos)
end

function A:gap(dir)
  self.dead[dir] = true
  self.buf[dir] = ""
end

return M
