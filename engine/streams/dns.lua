--[[
luaprobe.engine.streams.dns — DNS message parser (RFC 1035 §4, RFC 3596 AAAA, RFC 2782 SRV,
RFC 3597 unknown types), LuaJIT.

    local dns = require "luaprobe.engine.streams.dns"
    local m, err = dns.parse(ptr_or_string, len)
    -- m = { id, qr (bool), opcode, aa, tc, rd, ra, rcode (number), rcode_name ("NOERROR"),
    --       questions = { {name, type, class}, ... },
    --       answers / authority / additional = { {name, type, class, ttl, rdata}, ... } }
    -- type/class are numbers; dns.TYPE[n] / dns.CLASS[n] give names ("A", "IN").
    -- rdata is presentation text: A "93.184.216.34", AAAA "2a00:1450:4001:800::200e"
    -- (RFC 5952), CNAME/NS/PTR "host.example.com", MX "10 mx.example.com", TXT the
    -- strings quoted and space separated, SOA "mname rname serial refresh retry expire
    -- minimum", SRV "prio weight port target", others "\# <len> <hex>" (RFC 3597).
    dns.dig(m)   -- the message as dig-style text (docs/plugins.md "DNS FTS document")

Names are returned without the trailing dot, as scripts compare them ("google.com").
Compression pointers must point backwards (RFC 1035 §4.1.4); a loop, a pointer
forward, a label past the end or a name over 255 bytes makes the message invalid.
Bad input returns nil and a message naming the byte offset; nothing is read past len.  When the header and
every question were read but a record was not, a third value is the message as far as it was read (the records
before the bad one; its section counts are those of the header), as tshark shows the records before a malformed
one: `m, err, partial = dns.parse(p, n)`.
]]
local ffi = require("ffi")
local bit = require("bit")
local band, rshift, lshift, bor = bit.band, bit.rshift, bit.lshift, bit.bor
local fstring, cast = ffi.string, ffi.cast
local u8p = ffi.typeof("const uint8_t *")
local concat, sformat = table.concat, string.format

local M = {}

M.TYPE = { [1] = "A", [2] = "NS", [5] = "CNAME", [6] = "SOA", [12] = "PTR", [13] = "HINFO", [15] = "MX",
           [16] = "TXT", [28] = "AAAA", [33] = "SRV", [35] = "NAPTR", [39] = "DNAME", [41] = "OPT",
           [43] = "DS", [46] = "RRSIG", [47] = "NSEC", [48] = "DNSKEY", [52] = "TLSA", [64] = "SVCB",
           [65] = "HTTPS", [99] = "SPF", [255] = "ANY", [257] = "CAA" }
M.CLASS = { [1] = "IN", [3] = "CH", [4] = "HS", [254] = "NONE", [255] = "ANY" }
M.RCODE = { [0] = "NOERROR", [1] = "FORMERR", [2] = "SERVFAIL", [3] = "NXDOMAIN", [4] = "NOTIMP",
            [5] = "REFUSED", [6] = "YXDOMAIN", [7] = "YXRRSET", [8] = "NXRRSET", [9] = "NOTAUTH",
            [10] = "NOTZONE" }

function M.type_name(t) return M.TYPE[t] or ("TYPE" .. t) end
function M.class_name(c) return M.CLASS[c] or ("CLASS" .. c) end

local function be16(p, o) return p[o] * 256 + p[o + 1] end
local function be32(p, o) return ((p[o] * 256 + p[o + 1]) * 256 + p[o + 2]) * 256 + p[o + 3] end

--- Read a (possibly compressed) name at offset o.  Returns name, offset after it in the
--- original position, or nil, error.
local function read_name(p, n, o)
  local labels, nl, total = {}, 0, 0
  local after = nil
  local pos, jumps = o, 0
  while true do
    if pos >= n then return nil, ("name at offset %d runs past the end"):format(o) end
    local len = p[pos]
    local top = band(len, 0xC0)
    if top == 0xC0 then
      if pos + 1 >= n then return nil, ("compression pointer at offset %d is cut"):format(pos) end
      local target = band(len, 0x3F) * 256 + p[pos + 1]
      if after == nil then after = pos + 2 end
      if target >= pos then return nil, ("compression pointer at offset %d does not point back"):format(pos) end
      jumps = jumps + 1
      if jumps > 64 then return nil, ("compression loop at offset %d"):format(pos) end
      pos = target
    elseif top ~= 0 then
      return nil, ("bad label type 0x%02x at offset %d"):format(len, pos)
    elseif len == 0 then
      if after == nil then after = pos + 1 end
      break
    else
      if pos + 1 + len > n then return nil, ("label at offset %d runs past the end"):format(pos) end
      total = total + len + 1
      if total > 255 then return nil, ("name at offset %d is longer than 255 bytes"):format(o) end
      nl = nl + 1
      labels[nl] = fstring(p + pos + 1, len)
      pos = pos + 1 + len
    end
  end
  return concat(labels, "."), after
end
M.read_name = read_name

local function ipv6_text(p, o)
  local w = {}
  for i = 0, 7 do w[i + 1] = be16(p, o + 2 * i) end
  -- RFC 5952: longest run (>= 2) of zero words becomes "::", first one on a tie
  local best, bestlen, cur, curlen = -1, 0, -1, 0
  for i = 1, 8 do
    if w[i] == 0 then
      if cur < 0 then cur, curlen = i, 1 else curlen = curlen + 1 end
      if curlen > bestlen then best, bestlen = cur, curlen end
    else cur, curlen = -1, 0 end
  end
  if bestlen < 2 then best = -1 end
  local out, i = {}, 1
  while i <= 8 do
    if i == best then
      out[#out + 1] = (i == 1) and ":" or ""
      i = i + bestlen
      if i > 8 then out[#out + 1] = "" end
    else
      out[#out + 1] = sformat("%x", w[i])
      i = i + 1
    end
  end
  return (concat(out, ":"):gsub(":::", "::"))
end
M.ipv6_text = ipv6_text

local function quote(s)
  return '"' .. s:gsub('[%c"\\\128-\255]', function(c)
    if c == '"' or c == "\\" then return "\\" .. c end
    return sformat("\\%03d", c:byte())
  end) .. '"'
end

local function hexs(p, o, len)
  local t = {}
  for i = 0, len - 1 do t[i + 1] = sformat("%02X", p[o + i]) end
  return concat(t)
end

--- rdata as presentation text, or nil, error.
local function rdata_text(p, n, t, o, len)
  local e = o + len
  if t == 1 and len == 4 then
    return sformat("%d.%d.%d.%d", p[o], p[o + 1], p[o + 2], p[o + 3])
  elseif t == 28 and len == 16 then
    return ipv6_text(p, o)
  elseif t == 2 or t == 5 or t == 12 or t == 39 then
    local name, after = read_name(p, e, o)
    if not name then return nil, after end
    return name
  elseif t == 15 and len >= 3 then
    local name, after = read_name(p, e, o + 2)
    if not name then return nil, after end
    return be16(p, o) .. " " .. name
  elseif t == 16 or t == 99 then
    local parts, pos = {}, o
    while pos < e do
      local l = p[pos]
      if pos + 1 + l > e then return nil, ("TXT string at offset %d runs past its record"):format(pos) end
      parts[#parts + 1] = quote(fstring(p + pos + 1, l))
      pos = pos + 1 + l
    end
    return concat(parts, " ")
  elseif t == 6 then
    local mname, a1 = read_name(p, e, o)
    if not mname then return nil, a1 end
    local rname, a2 = read_name(p, e, a1)
    if not rname then return nil, a2 end
    if a2 + 20 > e then return nil, ("SOA record at offset %d is short"):format(o) end
    return sformat("%s %s %d %d %d %d %d", mname, rname, be32(p, a2), be32(p, a2 + 4), be32(p, a2 + 8),
      be32(p, a2 + 12), be32(p, a2 + 16))
  elseif t == 33 and len >= 7 then
    local name, after = read_name(p, e, o + 6)
    if not name then return nil, after end
    return sformat("%d %d %d %s", be16(p, o), be16(p, o + 2), be16(p, o + 4), name)
  end
  return sformat("\\# %d %s", len, hexs(p, o, len))
end

local function parse_rrs(p, n, o, count, out, section)
  for _ = 1, count do
    local name, after = read_name(p, n, o)
    if not name then return nil, after end
    if after + 10 > n then return nil, ("%s record at offset %d is cut"):format(section, o) end
    local t, c, ttl, rdlen = be16(p, after), be16(p, after + 2), be32(p, after + 4), be16(p, after + 8)
    local rd = after + 10
    if rd + rdlen > n then return nil, ("%s rdata at offset %d runs past the end"):format(section, rd) end
    local text, err
    if t == 41 then text = "" else text, err = rdata_text(p, n, t, rd, rdlen) end
    if not text then return nil, err end
    out[#out + 1] = { name = name, type = t, class = c, ttl = ttl, rdata = text }
    o = rd + rdlen
  end
  return o
end

--- Parse one DNS message (UDP payload, or a TCP message without its 2-byte length).
function M.parse(p, n)
  if type(p) == "string" then n = n or #p; p = cast(u8p, p) end
  if n < 12 then return nil, ("message of %d bytes is shorter than the 12-byte header"):format(n) end
  local flags = be16(p, 2)
  local m = {
    id = be16(p, 0), qr = band(flags, 0x8000) ~= 0, opcode = band(rshift(flags, 11), 15),
    aa = band(flags, 0x400) ~= 0, tc = band(flags, 0x200) ~= 0, rd = band(flags, 0x100) ~= 0,
    ra = band(flags, 0x80) ~= 0, rcode = band(flags, 15),
    questions = {}, answers = {}, authority = {}, additional = {},
  }
  m.rcode_name = M.RCODE[m.rcode] or ("RCODE" .. m.rcode)
  local qd, an, ns, ar = be16(p, 4), be16(p, 6), be16(p, 8), be16(p, 10)
  local o = 12
  for _ = 1, qd do
    local name, after = read_name(p, n, o)
    if not name then return nil, after end
    if after + 4 > n then return nil, ("question at offset %d is cut"):format(o) end
    m.questions[#m.questions + 1] = { name = name, type = be16(p, after), class = be16(p, after + 2) }
    o = after + 4
  end
  local err
  o, err = parse_rrs(p, n, o, an, m.answers, "answer")
  if not o then return nil, err, m end
  o, err = parse_rrs(p, n, o, ns, m.authority, "authority")
  if not o then return nil, err, m end
  o, err = parse_rrs(p, n, o, ar, m.additional, "additional")
  if not o then return nil, err, m end
  return m
end

--- One record as a dig answer line: "name. TTL CLASS TYPE rdata" (tab separated).
function M.record_line(r)
  return sformat("%s.\t%d\t%s\t%s\t%s", r.name, r.ttl, M.class_name(r.class), M.type_name(r.type), r.rdata)
end

local function flag_text(m)
  local f = {}
  if m.qr then f[#f + 1] = "qr" end
  if m.aa then f[#f + 1] = "aa" end
  if m.tc then f[#f + 1] = "tc" end
  if m.rd then f[#f + 1] = "rd" end
  if m.ra then f[#f + 1] = "ra" end
  return concat(f, " ")
end

--[[ The DNS FTS document.  dig's layout (header line, flags, one section per
heading), with two additions real Trisul scripts parse (cu-dns-extractor.lua,
passive-dns-creator.lua): the first word is RESPONSE or QUERY, and each section
heading is followed by Trisul's compact lines ".<name> <TYPE> <CLASS> [<rdata>]"
(e.g. "Questions" / ".google.com A IN", "Answers" / ".google.com A IN 142.250.74.46").
]]
function M.dig(m)
  local out = {}
  local function add(s) out[#out + 1] = s end
  add(sformat("%s id %d opcode %d status %s flags %s", m.qr and "RESPONSE" or "QUERY", m.id, m.opcode,
    m.rcode_name, flag_text(m)))
  add(sformat(";; ->>HEADER<<- opcode: %s, status: %s, id: %d", m.opcode == 0 and "QUERY" or tostring(m.opcode),
    m.rcode_name, m.id))
  add(sformat(";; flags: %s; QUERY: %d, ANSWER: %d, AUTHORITY: %d, ADDITIONAL: %d", flag_text(m),
    #m.questions, #m.answers, #m.authority, #m.additional))
  add("")
  add(";; QUESTION SECTION:")
  for _, q in ipairs(m.questions) do
    add(sformat(";%s.\t\t%s\t%s", q.name, M.class_name(q.class), M.type_name(q.type)))
  end
  add("Questions")
  for _, q in ipairs(m.questions) do
    add(sformat(".%s %s %s", q.name, M.type_name(q.type), M.class_name(q.class)))
  end
  for _, sec in ipairs({ { "ANSWER", "Answers", m.answers }, { "AUTHORITY", "Authority", m.authority },
                         { "ADDITIONAL", "Additional", m.additional } }) do
    local rrs = sec[3]
    local shown = {}
    for _, r in ipairs(rrs) do if r.type ~= 41 then shown[#shown + 1] = r end end
    if #shown > 0 then
      add("")
      add(";; " .. sec[1] .. " SECTION:")
      for _, r in ipairs(shown) do add(M.record_line(r)) end
      add(sec[2])
      for _, r in ipairs(shown) do
        add(sformat(".%s %s %s %s", r.name, M.type_name(r.type), M.class_name(r.class), r.rdata))
      end
    end
  end
  return concat(out, "\n") .. "\n"
end

return M
