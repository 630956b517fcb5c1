--[[
luaprobe.engine.fastpath.decode — the layer decoder (LuaJIT ffi).

Decodes one packet given (ptr, caplen, linktype) into a preallocated ffi
struct `lp_decoded`: no Lua table or string is created per packet, and the
code is straight-line ffi loads so the trace compiler turns it into machine
code.  One lp_decoded per fast path, reused for every packet.

    local decode = require "luaprobe.engine.fastpath.decode"
    local d = decode.new()
    local n = decode.decode(d, ptr, caplen, linktype)   -- number of layers
    decode.find(d, decode.PROTO.TCP)   -- 0-based layer index or -1
    decode.flowkey(d)                  -- Trisul flow id string (see "flow keys")
    decode.flow_parts(d)               -- proto, ipa, porta, ipz, portz (key format)
    decode.GUID[enum], decode.by_guid(guid) -> enum (case-insensitive, braces optional)
    decode.NAME[enum] -> "TCP", decode.MAX_LAYERS (16), decode.ZERO_FLOWKEY

Link types: 1 Ethernet, 113 Linux SLL, 276 SLL2, 0/108 BSD null/loopback
(AF_INET 2, AF_INET6 24/28/30, either byte order), 101/12/14 raw IP (by
version nibble), 228 raw IPv4, 229 raw IPv6.  Ethertypes: 0x8100/0x88a8/
0x9100 VLAN (any nesting), 0x8847/0x8848 MPLS, 0x0800, 0x86dd, 0x0806 ARP,
0x8035 RARP (as ARP), 0x8864 PPPoE session.  Anything else ends decoding
without an error (truncated = malformed = 0).

Struct (all offsets/lengths in bytes from the start of the captured frame):
    nlayers             number of decoded layers (<= decode.MAX_LAYERS)
    layer[i].proto      decode.PROTO enum, i is 0-based
    layer[i].offset     where the layer's header starts
    layer[i].length     header length (Trisul layer_bytes): Ethernet 14,
                        VLAN 4 per tag (one layer per tag), MPLS 4 * labels
                        (one layer for the whole label stack), SLL 16,
                        SLL2 20, LOOPBACK 4, PPPOE 8 (PPPoE + PPP protocol),
                        IPv4 IHL*4 (with options) + IPsec AH headers,
                        IPv6 40 + extension headers (AH included), TCP data offset*4 (the bytes captured
                        when the capture cut its options: l4_cut), UDP 8, ICMP/ICMPv6 8,
                        ARP (also RARP 0x8035) 8 + 2*hlen + 2*plen
    ip_version          0 (not IP) / 4 / 6
    ipproto             IPv4 protocol / IPv6 final next header (after the
                        extension headers; after AH headers in IPv4 too);
                        0 for non-IP
    src[16], dst[16]    addresses, IPv4 in the first 4 bytes; zero for non-IP
    first[32]           first[enum] = index of the first layer of that protocol, -1 if
                        absent (decode.find reads it: no loop per lookup)
    sport, dport        TCP/UDP ports (0 otherwise; also from a header cut short, when its
                        first 4 bytes were captured: l4_cut)
    tcp_flags           TCP flags byte (offset 13 of the header)
    tcp_seq, tcp_ack    TCP sequence and acknowledgment numbers (RFC 9293
                        §3.1) as int32 (the 32 bits, two's complement: use
                        bit.tobit differences for sequence comparisons);
                        0 when the packet has no TCP layer
    icmp_type, icmp_code  for ICMP/ICMPv6
    frag                1 if IPv4 (MF set or offset != 0) or IPv6 fragment
                        header (M set or offset != 0); non-first fragments
                        get no L4 layer
    truncated           1 when a header did not fit in the captured bytes
                        (or in the IP datagram): decoding stopped there
    malformed           1 when a header was invalid (bad version, IHL < 5,
                        TCP data offset < 5, too many layers...)
    vlan                outer (first) VLAN id, -1 when untagged
    nvlan               number of VLAN tags
    l3_offset, l4_offset  offsets of the IP and L4 headers, -1 if absent
    payload_offset      end of the last decoded header
    payload_length      bytes after it, up to the IP datagram end (so
                        Ethernet padding is excluded) or caplen for non-IP

Nothing beyond caplen is ever read.
--]]
local ffi = require "ffi"
local bit = require "bit"
local band, bor, rshift, lshift = bit.band, bit.bor, bit.rshift, bit.lshift
local min, max = math.min, math.max

local M = {}

local MAX_LAYERS = 16
M.MAX_LAYERS = MAX_LAYERS

if not pcall(ffi.typeof, "lp_decoded") then
  ffi.cdef [[
typedef struct {
  uint32_t proto;
  uint32_t offset;
  uint32_t length;
} lp_layer;

typedef struct {
  int32_t nlayers;
  int32_t ip_version;
  int32_t ipproto;
  int32_t sport;
  int32_t dport;
  int32_t tcp_flags;
  int32_t tcp_seq;
  int32_t tcp_ack;
  int32_t icmp_type;
  int32_t icmp_code;
  int32_t frag;
  int32_t truncated;
  int32_t malformed;
  int32_t vlan;
  int32_t nvlan;
  int32_t l3_offset;
  int32_t l4_offset;
  int32_t payload_offset;
  int32_t payload_length;
  int32_t caplen;
  uint8_t src[16];
  uint8_t dst[16];
  int8_t first[32];
  lp_layer layer[16];
} lp_decoded;
]]
end

local lp_decoded = ffi.typeof("lp_decoded")
local cast = ffi.cast
local ffill = ffi.fill   -- a local: a path through a side trace re-enters the batch loop's trace at its top, where
                         -- `ffi.fill` was a hash lookup in the ffi table again for each such packet
local u32p, cu32p, i64p = ffi.typeof("uint32_t *"), ffi.typeof("const uint32_t *"), ffi.typeof("int64_t *")
local u64p = ffi.typeof("uint64_t *")

-- The addresses and the src/dst reset are typed loads and stores, not ffi.copy / ffi.fill: those compile to the
-- same moves but end with a barrier (IR XBAR) after which LuaJIT forwards no earlier store of the struct to a later
-- load, so every put_layer re-read d.nlayers from memory (a store-to-load round trip feeding the next layer's
-- address) instead of knowing it (issue 10; tools/bench/fillir.py, tests/test_fill_ir.py).  The one ffi.fill
-- left, first[] at the top of decode(), puts its barrier before all other stores, so those still forward: with
-- first[] reset by typed stores as well, the fill loop's side trace for IPv4 AH packets (decode_ipv4's proto 51
-- exit) failed to compile ("register coalescing too complex", tests/test_jit_aborts.py mixed-ah).  Unaligned
-- 32-bit loads from the frame are fine on x86-64 and arm64.
local function copy16(dst, src)                -- 16 bytes
  local a, b = cast(u32p, dst), cast(cu32p, src)
  a[0], a[1], a[2], a[3] = b[0], b[1], b[2], b[3]
end

-- d.src / d.dst of an IPv4 packet: the 4 address bytes then 12 zero bytes, as two 64-bit stores each (the flow
-- table's make_key reads the first 8 bytes as one 64-bit load: a load spanning two smaller stores still in the
-- store buffer is not forwarded by the CPU).  The u32 widened to u64 puts the address bytes first on a
-- little-endian CPU; a big-endian one takes the u32 store and a u32 zero.
local LE = ffi.abi("le")
local function put4_zero12(dst, src)
  local w = cast(u64p, dst)
  if LE then
    w[0] = cast(cu32p, src)[0]
  else
    local a = cast(u32p, dst)
    a[0], a[1] = cast(cu32p, src)[0], 0
  end
  w[1] = 0
end

-- protocol enum ----------------------------------------------------------
local P = {
  ETHERNET = 1, VLAN = 2, MPLS = 3, SLL = 4, SLL2 = 5, IPV4 = 6, IPV6 = 7,
  TCP = 8, UDP = 9, ICMP = 10, ICMPV6 = 11, ARP = 12, LOOPBACK = 13, PPPOE = 14,
}
M.PROTO = P
local ETHERNET, VLAN, MPLS, SLL, SLL2 = P.ETHERNET, P.VLAN, P.MPLS, P.SLL, P.SLL2
local IPV4, IPV6, TCP, UDP, ICMP, ICMPV6 = P.IPV4, P.IPV6, P.TCP, P.UDP, P.ICMP, P.ICMPV6
local ARP, LOOPBACK, PPPOE = P.ARP, P.LOOPBACK, P.PPPOE

M.NAME = {}
for k, v in pairs(P) do M.NAME[v] = k end

-- Trisul GUIDs (docs/reference.md "Protocol GUIDs") for Ethernet/IPv4/IPv6/ICMP/UDP/TCP;
-- stable local GUIDs ("4C50" = "LP") for the others.
M.GUID = {
  [ETHERNET] = "{974FB098-DE46-45db-94DA-8D64A3BBCDE5}",
  [IPV4]     = "{0A2C724B-5B9F-4ba6-9C97-B05080558574}",
  [IPV6]     = "{85C0CCED-DA8D-4029-924A-A6AB87F62EF8}",
  [ICMP]     = "{7DDD65F2-A316-43b5-A103-368E700E045E}",
  [UDP]      = "{14D7AB53-CC51-47e9-8814-9C06AAE60189}",
  [TCP]      = "{77E462AB-2E42-42ec-9A58-C1A6821D6B31}",
  [VLAN]     = "{4C500002-0000-4000-8000-4C5056C4E002}",
  [MPLS]     = "{4C500003-0000-4000-8000-4C504D504C53}",
  [SLL]      = "{4C500004-0000-4000-8000-4C50534C4C31}",
  [SLL2]     = "{4C500005-0000-4000-8000-4C50534C4C32}",
  [ICMPV6]   = "{4C50000B-0000-4000-8000-4C5049434D36}",
  [ARP]      = "{4C50000C-0000-4000-8000-4C5041525000}",
  [LOOPBACK] = "{4C50000D-0000-4000-8000-4C504C4F4F50}",
  [PPPOE]    = "{4C50000E-0000-4000-8000-4C505050504F}",
}
local by_guid_tbl = {}
for k, g in pairs(M.GUID) do
  by_guid_tbl[g:upper()] = k
  by_guid_tbl[g:upper():gsub("[{}]", "")] = k
end

--- Protocols of protocol_handler plug-ins (docs.trisul.org/docs/lua/protocol_handler) get enums CUSTOM_FIRST..CUSTOM_LAST, in the order
--- the fast path registers them (the same order in every VM of a run, so the enum in a decoded packet means the same
--- protocol in every VM that reads the batch).  register_protocol(guid, name) -> enum; the same GUID twice returns
--- its enum; raises when all custom slots are taken.
M.CUSTOM_FIRST, M.CUSTOM_LAST = 16, 31
local next_custom = M.CUSTOM_FIRST
function M.register_protocol(guid, name)
  local have = M.by_guid(guid)
  if have ~= nil then return have end
  if next_custom > M.CUSTOM_LAST then error("too many protocol_handler protocols (at most 16)", 2) end
  local e = next_custom
  next_custom = e + 1
  M.GUID[e], M.NAME[e] = guid, name or guid
  by_guid_tbl[guid:upper()] = e
  by_guid_tbl[guid:upper():gsub("[{}]", "")] = e
  return e
end

--- One layer of protocol `proto` at byte `off`, `len` bytes, becomes d.layer[d.nlayers].  Returns false
--- (nothing added) when the packet already has MAX_LAYERS layers.  `own`: a header the decoder itself
--- found (add_layer): it also ends the decoded headers (payload_offset moves to its end) and one layer
--- too many marks the packet malformed.  Not `own`: a protocol_handler's parselayer result
--- (append_layer): payload_offset / payload_length keep describing the decoder's last header and a full
--- layer array is not the packet's fault.
local function put_layer(d, proto, off, len, own)
  local n = d.nlayers
  if n >= MAX_LAYERS then
    if own then d.malformed = 1 end
    return false
  end
  local l = d.layer[n]
  if d.first[proto] < 0 then d.first[proto] = n end
  l.proto, l.offset, l.length = proto, off, len
  d.nlayers = n + 1
  if own then d.payload_offset = off + len end
  return true
end

--- Append a layer of protocol `proto` at byte `off`, `len` bytes, to an already decoded packet (a protocol_handler's
--- parselayer result).  Returns false when the packet already has MAX_LAYERS layers.
function M.append_layer(d, proto, off, len)
  return put_layer(d, proto, off, len, false)
end

--- GUID string (any case, braces optional) -> enum, or nil.
function M.by_guid(guid)
  if type(guid) ~= "string" then return nil end
  return by_guid_tbl[guid:upper()]
end

function M.new()
  local d = lp_decoded()
  d.vlan = -1
  d.l3_offset = -1
  d.l4_offset = -1
  return d
end

-- decoding ----------------------------------------------------------------
-- Every step returns nothing; a header that does not fit sets d.truncated
-- and ends decoding.

-- Big-endian fields of the frame as one 16- or 32-bit load and a byte swap (x86 bswap, arm64 rev), not byte by
-- byte: a 32-bit field was four byte loads, three shifts and three ors (IR: 14 instructions with their addresses,
-- against 3), a 16-bit one two loads, a shift and an or; a TCP/IPv4 packet reads five 16-bit and two 32-bit fields
-- (issue 10: tests/test_fill_ir.py).  Unaligned loads, as above.  On a big-endian CPU the load is the value.  The
-- field is at o + k, k a constant: (p + o) + k, so the constant goes into the load's address (o + k first was an
-- integer add with an overflow check and a conversion per field).
local bswap = bit.bswap
local cu16p = ffi.typeof("const uint16_t *")
local function be16(p, o, k)
  if LE then return rshift(bswap(cast(cu16p, p + o + k)[0]), 16) end
  return cast(cu16p, p + o + k)[0]
end

-- big-endian 32 bits as an int32 (the sign bit is bit 31, as bit ops give it)
local function be32s(p, o, k)
  if LE then return bswap(cast(cu32p, p + o + k)[0]) end
  return bit.tobit(cast(cu32p, p + o + k)[0])
end

local function add_layer(d, proto, off, len)   -- a header the decoder found (put_layer, `own`)
  return put_layer(d, proto, off, len, true)
end

-- The L4 group (l4_offset, sport, dport, tcp_flags, tcp_seq, tcp_ack, icmp_type, icmp_code) is written exactly
-- once per packet: by decode_l4 on every path through it, by no_l4 on an IP path that stops before L4, by no_ip
-- when the packet has no IP layer.  decode() resets no field that a path writes anyway: LuaJIT does not remove a
-- store overwritten later when frame loads come between (it cannot tell the frame from the lp_decoded), so a reset
-- followed by the real value was two stores per field (issue 10, tests/test_fill_ir.py).
local function no_l4(d, l4_offset)
  d.l4_offset = l4_offset
  d.sport, d.dport = 0, 0
  d.tcp_flags, d.tcp_seq, d.tcp_ack = 0, 0, 0
  d.icmp_type, d.icmp_code = 0, 0
end

-- A TCP or UDP header cut short by the capture's snaplen (or by the datagram's end): what was captured still
-- names the connection, as tshark shows it ("Packet size limited during capture").  A headers-only capture
-- (`tcpdump -s 64`, `editcap -s 64`) cuts the options of nearly every TCP header (Linux sends 12 option bytes
-- with every segment, 20 with a SYN): before, each such packet had ports 0 and went to a port-0 flow of its
-- host pair, so a connection's packets were split off from it (trisul-tutorial.pcap at -s 64: 87 packets of
-- one connection in a phantom flow).  Ports when 4 bytes were captured, sequence 8, acknowledgment 12, flags
-- 14; a TCP layer (of the bytes captured, never past them) when the 20 fixed bytes were.  d.truncated stays
-- 1 and the payload is empty.  Only cut packets come here (the common path is unchanged).
local function l4_cut(d, p, o, lim, proto)
  d.truncated = 1
  no_l4(d, o)
  local have = lim - o
  if have >= 4 then
    d.sport = be16(p, o, 0)
    d.dport = be16(p, o, 2)
  end
  if proto == 6 then
    if have >= 8 then d.tcp_seq = be32s(p, o, 4) end
    if have >= 12 then d.tcp_ack = be32s(p, o, 8) end
    if have >= 14 then d.tcp_flags = p[o + 13] end
    if have >= 20 then add_layer(d, TCP, o, have) end
  end
end

local function decode_l4(d, p, o, lim, proto)
  if proto == 6 then
    if o + 20 > lim then l4_cut(d, p, o, lim, 6); return end
    local doff = lshift(rshift(p[o + 12], 4), 2)
    if doff < 20 then d.malformed = 1; no_l4(d, o); return end
    if o + doff > lim then l4_cut(d, p, o, lim, 6); return end
    d.l4_offset = o
    d.sport = be16(p, o, 0)
    d.dport = be16(p, o, 2)
    d.tcp_flags = p[o + 13]
    d.tcp_seq = be32s(p, o, 4)
    d.tcp_ack = be32s(p, o, 8)
    d.icmp_type, d.icmp_code = 0, 0
    add_layer(d, TCP, o, doff)
  elseif proto == 17 then
    if o + 8 > lim then l4_cut(d, p, o, lim, 17); return end
    d.l4_offset = o
    d.sport = be16(p, o, 0)
    d.dport = be16(p, o, 2)
    d.tcp_flags, d.tcp_seq, d.tcp_ack = 0, 0, 0
    d.icmp_type, d.icmp_code = 0, 0
    add_layer(d, UDP, o, 8)
  elseif proto == 1 or proto == 58 then
    if o + 8 > lim then d.truncated = 1; no_l4(d, o); return end
    d.l4_offset = o
    d.sport, d.dport = 0, 0
    d.tcp_flags, d.tcp_seq, d.tcp_ack = 0, 0, 0
    d.icmp_type = p[o]
    d.icmp_code = p[o + 1]
    add_layer(d, proto == 1 and ICMP or ICMPV6, o, 8)
  else
    no_l4(d, -1)
  end
end

-- IPsec AH headers (RFC 4302, protocol 51) right after the IPv4 header at o (which ends at q): like IPv6's
-- extension headers (decode_ipv6) they become part of the IP layer, whose length grows by theirs, and
-- d.ipproto becomes the protocol after them, so AH-protected TCP is a TCP flow with a TCP layer, as tshark
-- shows it.  An AH cut short (by caplen or the datagram) sets d.truncated; the layer then ends after the
-- last whole AH and d.ipproto stays 51.  Returns the offset after the last whole AH.  Only IPv4 packets
-- with protocol 51 come here: the common path pays one comparison.
local function skip_ah4(d, p, o, q, lim)
  local nh = 51
  while nh == 51 do
    if q + 8 > lim then d.truncated = 1; break end
    local len = lshift(p[q + 1] + 2, 2)
    if q + len > lim then d.truncated = 1; break end
    nh = p[q]
    q = q + len
  end
  d.ipproto = nh
  d.layer[d.nlayers - 1].length = q - o
  d.payload_offset = q
  return q
end

-- decode_ipv4 / decode_ipv6 return true when they wrote the IP group (ip_version, ipproto, l3_offset, src, dst,
-- payload_length) and the L4 group (no_l4), false when they wrote neither (the header did not fit, was invalid, or
-- found no room in the layer array): decode() then writes both as no_ip.
local function decode_ipv4(d, p, o, caplen)
  if o + 20 > caplen then d.truncated = 1; return false end
  local b0 = p[o]
  if rshift(b0, 4) ~= 4 then d.malformed = 1; return false end
  local ihl = lshift(band(b0, 15), 2)
  if ihl < 20 then d.malformed = 1; return false end
  if o + ihl > caplen then d.truncated = 1; return false end
  local tot = be16(p, o, 2)
  local lim
  if tot == 0 then            -- TSO / offloaded: length unknown
    lim = caplen
  elseif tot < ihl then
    d.malformed = 1; return false
  else
    lim = o + tot
    if lim > caplen then lim = caplen end
  end
  if not add_layer(d, IPV4, o, ihl) then return false end
  d.ip_version = 4
  d.l3_offset = o
  local proto = p[o + 9]
  d.ipproto = proto
  put4_zero12(d.src, p + o + 12)   -- no loop here: it would split the caller's trace
  put4_zero12(d.dst, p + o + 16)
  local fo = be16(p, o, 6)
  local off = band(fo, 0x1fff)
  if off ~= 0 or band(fo, 0x2000) ~= 0 then d.frag = 1 end
  local q = o + ihl
  if off ~= 0 then
    d.payload_length = lim - q
    no_l4(d, -1)
    return true
  end
  if proto == 51 then
    q = skip_ah4(d, p, o, q, lim)
    if d.truncated ~= 0 then
      d.payload_length = lim - q
      no_l4(d, -1)
      return true
    end
    proto = d.ipproto
  end
  decode_l4(d, p, q, lim, proto)
  d.payload_length = lim - d.payload_offset
  return true
end

local function decode_ipv6(d, p, o, caplen)
  if o + 40 > caplen then d.truncated = 1; return false end
  if rshift(p[o], 4) ~= 6 then d.malformed = 1; return false end
  local plen = be16(p, o, 4)
  local lim
  if plen == 0 then           -- jumbogram or offloaded
    lim = caplen
  else
    lim = o + 40 + plen
    if lim > caplen then lim = caplen end
  end
  d.ip_version = 6
  d.l3_offset = o
  copy16(d.src, p + o + 8)
  copy16(d.dst, p + o + 24)
  -- from here on every exit writes payload_length and the L4 group (decode_ipv4's note)
  local nh = p[o + 6]
  local q = o + 40
  local nofrag_l4 = false
  -- extension headers: hop-by-hop 0, routing 43, fragment 44, AH 51, dstopts 60
  while nh == 0 or nh == 43 or nh == 44 or nh == 51 or nh == 60 do
    if q + 8 > lim then
      d.ipproto = nh
      d.truncated = 1
      add_layer(d, IPV6, o, q - o)
      d.payload_length = 0
      no_l4(d, -1)
      return true
    end
    local len
    if nh == 44 then
      len = 8
      local fo = be16(p, q, 2)
      if band(fo, 0xfff8) ~= 0 or band(fo, 1) ~= 0 then d.frag = 1 end
      if band(fo, 0xfff8) ~= 0 then nofrag_l4 = true end
    elseif nh == 51 then
      len = lshift(p[q + 1] + 2, 2)
    else
      len = lshift(p[q + 1] + 1, 3)
    end
    if q + len > lim then
      d.ipproto = nh
      d.truncated = 1
      add_layer(d, IPV6, o, q - o)
      d.payload_length = 0
      no_l4(d, -1)
      return true
    end
    nh = p[q]
    q = q + len
  end
  d.ipproto = nh
  if not add_layer(d, IPV6, o, q - o) then
    d.payload_length = 0
    no_l4(d, -1)
    return true
  end
  if nofrag_l4 then
    d.payload_length = lim - q
    no_l4(d, -1)
    return true
  end
  decode_l4(d, p, q, lim, nh)
  d.payload_length = lim - d.payload_offset
  return true
end

local function decode_arp(d, p, o, caplen)
  if o + 8 > caplen then d.truncated = 1; return end
  local len = 8 + 2 * p[o + 4] + 2 * p[o + 5]
  if o + len > caplen then d.truncated = 1; return end
  add_layer(d, ARP, o, len)
end

local decode_ethertype

-- MPLS label stack: one layer for all labels, then IPv4/IPv6 by nibble.
local function decode_mpls(d, p, o, caplen)
  local q = o
  while true do
    if q + 4 > caplen then d.truncated = 1; return false end
    local bos = band(p[q + 2], 1)
    q = q + 4
    if bos ~= 0 then break end
    if q - o >= 64 then d.malformed = 1; return false end
  end
  if not add_layer(d, MPLS, o, q - o) then return false end
  if q + 1 > caplen then d.truncated = 1; return false end
  local v = rshift(p[q], 4)
  if v == 4 then
    return (decode_ipv4(d, p, q, caplen))
  elseif v == 6 then
    return (decode_ipv6(d, p, q, caplen))
  end
  return false   -- pseudowire / Ethernet-over-MPLS: not decoded further
end

-- ethertype dispatch at offset o (VLAN tags loop here).  Returns decode_ipv4's truth (true: the IP and L4 groups
-- are written).
decode_ethertype = function(d, p, o, caplen, et)
  while et == 0x8100 or et == 0x88a8 or et == 0x9100 do
    if o + 4 > caplen then d.truncated = 1; return false end
    local tci = be16(p, o, 0)
    if d.nvlan == 0 then d.vlan = band(tci, 0x0fff) end
    d.nvlan = d.nvlan + 1
    if not add_layer(d, VLAN, o, 4) then return false end
    et = be16(p, o, 2)
    o = o + 4
  end
  if et == 0x0800 then
    return (decode_ipv4(d, p, o, caplen))
  elseif et == 0x86dd then
    return (decode_ipv6(d, p, o, caplen))
  elseif et == 0x0806 or et == 0x8035 then   -- ARP, RARP (same layout)
    decode_arp(d, p, o, caplen)
  elseif et == 0x8847 or et == 0x8848 then
    return (decode_mpls(d, p, o, caplen))
  elseif et == 0x8864 then
    -- PPPoE session: 6-byte header + 2-byte PPP protocol
    if o + 8 > caplen then d.truncated = 1; return false end
    if not add_layer(d, PPPOE, o, 8) then return false end
    local pp = be16(p, o, 6)
    if pp == 0x0021 then
      return (decode_ipv4(d, p, o + 8, caplen))
    elseif pp == 0x0057 then
      return (decode_ipv6(d, p, o + 8, caplen))
    end
  end
  return false
end

local function decode_rawip(d, p, o, caplen)
  if o + 1 > caplen then d.truncated = 1; return false end
  local v = rshift(p[o], 4)
  if v == 4 then
    return (decode_ipv4(d, p, o, caplen))
  elseif v == 6 then
    return (decode_ipv6(d, p, o, caplen))
  end
  d.malformed = 1
  return false
end

-- A packet without an IP layer (decode_ipv4's false): the IP and L4 groups' values, written once.
local function no_ip(d)
  d.ip_version, d.ipproto, d.l3_offset = 0, 0, -1
  local z = cast(i64p, d.src)   -- src and dst are contiguous: 32 zero bytes
  z[0], z[1], z[2], z[3] = 0, 0, 0, 0
  no_l4(d, -1)
end

--- Link types decode() knows (others give no layer: the fast path warns once per number).
M.LINKTYPES = { [1] = "EN10MB", [113] = "LINUX_SLL", [276] = "LINUX_SLL2", [101] = "RAW", [12] = "RAW",
                [14] = "RAW", [228] = "IPV4", [229] = "IPV6", [0] = "NULL", [108] = "LOOP" }

--- Decode one packet. p: const uint8_t*, caplen: captured bytes, linktype:
--- pcap LINKTYPE_*.  Returns d.nlayers.
function M.decode(d, p, caplen, linktype)
  ffill(d.first, 32, 0xff)  -- first[proto] = index of the first layer of that protocol, -1 if none (first: above)
  -- only the fields no path is sure to write: the IP and L4 groups are written once, by the path (decode_ipv4) or
  -- by no_ip below
  d.nlayers = 0
  d.frag = 0
  d.truncated = 0
  d.malformed = 0
  d.vlan = -1
  d.nvlan = 0
  d.payload_offset = 0
  d.caplen = caplen
  local ip = false
  if linktype == 1 then
    if caplen < 14 then
      d.truncated = 1
    else
      add_layer(d, ETHERNET, 0, 14)
      local et = be16(p, 12, 0)
      if et >= 0x0600 then ip = decode_ethertype(d, p, 14, caplen, et) end
      -- else 802.3 length field (LLC/SNAP): not decoded further
    end
  elseif linktype == 113 then
    if caplen < 16 then
      d.truncated = 1
    else
      add_layer(d, SLL, 0, 16)
      ip = decode_ethertype(d, p, 16, caplen, be16(p, 14, 0))
    end
  elseif linktype == 276 then
    if caplen < 20 then
      d.truncated = 1
    else
      add_layer(d, SLL2, 0, 20)
      ip = decode_ethertype(d, p, 20, caplen, be16(p, 0, 0))
    end
  elseif linktype == 101 or linktype == 12 or linktype == 14 then
    ip = decode_rawip(d, p, 0, caplen)
  elseif linktype == 228 then
    ip = decode_ipv4(d, p, 0, caplen)
  elseif linktype == 229 then
    ip = decode_ipv6(d, p, 0, caplen)
  elseif linktype == 0 or linktype == 108 then
    -- BSD null/loopback: 4-byte address family in the capturing host's
    -- byte order (LOOP, 108: network order); accept either order.
    if caplen < 4 then
      d.truncated = 1
    else
      add_layer(d, LOOPBACK, 0, 4)
      local le = bor(p[0], lshift(p[1], 8), lshift(p[2], 16), lshift(p[3], 24))
      local be = bor(p[3], lshift(p[2], 8), lshift(p[1], 16), lshift(p[0], 24))
      if le == 2 or be == 2 then
        ip = decode_ipv4(d, p, 4, caplen)
      elseif le == 24 or le == 28 or le == 30 or be == 24 or be == 28 or be == 30 then
        ip = decode_ipv6(d, p, 4, caplen)
      end
    end
  end
  if not ip then
    no_ip(d)
    d.payload_length = caplen - d.payload_offset
  end
  if d.payload_length < 0 then d.payload_length = 0 end
  return d.nlayers
end

--- Index (0-based) of the first layer with this enum, or -1.
function M.find(d, proto)
  return d.first[proto]          -- no loop: keeps the per-packet loops of plug-ins one trace
end

-- flow keys ------------------------------------------------------------------
--[[
Trisul flow id (docs.trisul.org/docs/lua/obj_flowid, docs/reference.md conventions):
    <proto 2 hex>A:<ipA>:p-<portA 4 hex>_<ipZ>:p-<portZ 4 hex>
e.g. 06A:C0.A8.01.02:p-0B94_D1.D8.F9.3A:p-0016; 'B' and 32 hex digits per
address for IPv6.

Endpoint order: the Z end is the endpoint with the LOWER port.  Tie (equal
ports, which includes ICMP and every other non-TCP/UDP protocol, whose ports
are 0): the Z end is the endpoint with the lower IP address (bytewise); if
the addresses are equal too, the destination is Z.  So both directions of a
conversation always give the same key.

Ports are 0 for everything but TCP/UDP (ICMP, non-first fragments, ...).

Non-IP packets (ARP, LLC, truncated before IP...) get the all-zero IPv4-shaped
key "00A:00.00.00.00:p-0000_00.00.00.00:p-0000" (same length and layout as an
IPv4 key so scripts doing id:sub(24,34) keep working).
--]]
M.ZERO_FLOWKEY = "00A:00.00.00.00:p-0000_00.00.00.00:p-0000"

local HEX = ffi.new("const uint8_t[16]", "0123456789ABCDEF")
local kbuf = ffi.new("uint8_t[128]")
local copy = ffi.copy
local fstring = ffi.string   -- a local: `ffi.string` is a field lookup the walk would redo per new flow

-- No loops in the key functions: Packet:flowid() calls them from a plug-in's hook on a flow's first
-- packet, and a LuaJIT trace that starts in a plug-in function and runs into a loop ends there, linked to
-- the loop's trace; the batch walk's trace then stops at that function too instead of inlining it, and the
-- flow's later packets leave compiled code there on every call (docs/benchmarks.md, "Light hooks").

-- Address bytes i..i+3 as one number, big-endian (exact in a double; unsigned order).
local function word(a, i)
  return ((a[i] * 256 + a[i + 1]) * 256 + a[i + 2]) * 256 + a[i + 3]
end

-- The key functions make no tail calls (`return (f(x))`): LuaJIT counts the tail calls of a trace
-- towards its loop unroll limit (15), and the hook's trace, which runs through the walk, the
-- Packet/FlowID bindings and all of these helpers, aborted with "loop unroll limit reached" once
-- they were added up.

-- -1, 0 or 1 for x < 0, x == 0, x > 0 (math.min/max compile to branch-free instructions)
local function sign(x)
  return (max(-1, min(1, x)))
end

-- 1 when the source is the Z end, else 0 (the rule above), computed without a branch on the ports or
-- addresses: a branch there is a side exit of the hook's trace taken by about every other flow (which
-- end has the lower port), and the side trace starting there had to take over the hook's and the walk's
-- live registers -- with all registers live it aborted ("NYI: register coalescing too complex") hundreds
-- of times on mixed traffic, so new flows' keys were formatted in the interpreter.  c orders (port,
-- address words) lexicographically: each term outweighs all the later ones together.  The one branch,
-- on v6 (d.ip_version == 6), repeats the caller's guard on it: no new exit.
local function src_is_z(d, v6)
  local s, t = d.src, d.dst
  local c = 16 * sign(d.sport - d.dport) + 8 * sign(word(s, 0) - word(t, 0))
  if v6 then
    c = c + 4 * sign(word(s, 4) - word(t, 4)) + 2 * sign(word(s, 8) - word(t, 8))
      + sign(word(s, 12) - word(t, 12))
  end
  return -min(0, sign(c))                              -- c < 0: src lower -> src is Z
end

local function put_hex8(buf, pos, v)
  buf[pos] = HEX[rshift(v, 4)]
  buf[pos + 1] = HEX[band(v, 15)]
  return pos + 2
end

-- 4 address bytes at a[i] as hex, separated by `sep` (a byte) unless it is 0
local function put_quad(buf, pos, a, i, sep)
  pos = put_hex8(buf, pos, a[i])
  if sep ~= 0 then buf[pos] = sep; pos = pos + 1 end
  pos = put_hex8(buf, pos, a[i + 1])
  if sep ~= 0 then buf[pos] = sep; pos = pos + 1 end
  pos = put_hex8(buf, pos, a[i + 2])
  if sep ~= 0 then buf[pos] = sep; pos = pos + 1 end
  return (put_hex8(buf, pos, a[i + 3]))
end

-- the address at a[i], i = 0 or 16 (d.src or d.dst)
local function put_ip(buf, pos, a, i, v6)
  if not v6 then return (put_quad(buf, pos, a, i, 46)) end    -- '.'
  pos = put_quad(buf, pos, a, i, 0)
  pos = put_quad(buf, pos, a, i + 4, 0)
  pos = put_quad(buf, pos, a, i + 8, 0)
  return (put_quad(buf, pos, a, i + 12, 0))
end

local function put_port(buf, pos, port)
  buf[pos] = 112; buf[pos + 1] = 45                     -- 'p-'
  pos = put_hex8(buf, pos + 2, rshift(port, 8))
  return (put_hex8(buf, pos, band(port, 255)))
end

-- An IPv6 flow-id (put_flowkey's layout, 83 bytes) by string.format: proto, the A address's 16 bytes, the A port, the
-- Z address's 16 bytes, the Z port.  Why not digit by digit as IPv4's (put_ip): 32 address bytes' two hex-digit loads
-- and stores each, unrolled, made the trace through them longer than LuaJIT's limit (maxrecord, 4 000 IR: "trace too
-- long"): the side trace of a hook's first packet of a flow (the flowid cache's miss in the plug-in VM's walk) and the
-- driver's row export (Driver write_row) were given up after 4 tries and their IPv6 keys formatted in the interpreter
-- (~35 FFI byte loads and stores each, tens of microseconds): 80-100M instructions in the first batches of the ipv6
-- corpus's flowstate run (tools/bench/loopcg.py --batches).  string.format's %02X compiles to one call each
-- (lj_ffrecord.c recff_format); IPv4 keys keep the inline digits (their traces compile; 11 calls would cost more).
local KEY6 = "%02XB:" .. ("%02X"):rep(16) .. ":p-%04X_" .. ("%02X"):rep(16) .. ":p-%04X"
local sformat = string.format
local function flowkey6(d)
  local z = src_is_z(d, true)
  local sp, dp = d.sport, d.dport
  local s, a, b = d.src, 16 * z, 16 - 16 * z
  return sformat(KEY6, band(d.ipproto, 255),
    s[a], s[a + 1], s[a + 2], s[a + 3], s[a + 4], s[a + 5], s[a + 6], s[a + 7],
    s[a + 8], s[a + 9], s[a + 10], s[a + 11], s[a + 12], s[a + 13], s[a + 14], s[a + 15], sp + (dp - sp) * z,
    s[b], s[b + 1], s[b + 2], s[b + 3], s[b + 4], s[b + 5], s[b + 6], s[b + 7],
    s[b + 8], s[b + 9], s[b + 10], s[b + 11], s[b + 12], s[b + 13], s[b + 14], s[b + 15], dp + (sp - dp) * z)
end

--- Write the Trisul flow-id of an IP packet (d.ip_version 4 or 6) into `buf` (uint8_t[>= 83], no NUL
--- added); returns its length: 41 bytes for IPv4, 83 for IPv6.  Layout: proto (2 hex digits), 'A' (IPv4)
--- or 'B' (IPv6), ':', the A address (IPv4 "C0.A8.01.02", 11 bytes; IPv6 32 hex digits), ":p-" and the
--- A port (4 hex digits), '_', the Z address, ":p-", the Z port.  So the A address is bytes [4, 4+L) and
--- the Z address bytes [12+L, 12+2L), L = 11 or 32 (engine/fastpath/driver.lua exports them from there).
function M.put_flowkey(buf, d)
  if d.ip_version == 6 then                             -- flowkey6 above: why not digit by digit
    copy(buf, flowkey6(d), 83)
    return 83
  end
  local pos = put_hex8(buf, 0, band(d.ipproto, 255))
  buf[pos] = 65; buf[pos + 1] = 58                      -- 'A', ':'
  pos = pos + 2
  -- the A and Z ends picked without a branch (src_is_z); d.dst follows d.src in the struct (16 bytes)
  local z = src_is_z(d, false)
  local sp, dp = d.sport, d.dport
  local s = d.src
  pos = put_ip(buf, pos, s, 16 * z, false)
  buf[pos] = 58; pos = pos + 1                          -- ':'
  pos = put_port(buf, pos, sp + (dp - sp) * z)
  buf[pos] = 95; pos = pos + 1                          -- '_'
  pos = put_ip(buf, pos, s, 16 - 16 * z, false)
  buf[pos] = 58; pos = pos + 1
  return (put_port(buf, pos, dp + (sp - dp) * z))
end
local put_flowkey = M.put_flowkey

--- Trisul flow-id string for the decoded packet (put_flowkey's layout).
function M.flowkey(d)
  local v = d.ip_version
  if v == 0 then return M.ZERO_FLOWKEY end
  if v == 6 then return flowkey6(d) end
  return fstring(kbuf, put_flowkey(kbuf, d))
end

--- proto, ipa, porta, ipz, portz in key format ("06", "C0.A8.01.02",
--- "p-0B94", ...), for the FlowID getters.  Non-IP: zero parts.
function M.flow_parts(d)
  if d.ip_version == 0 then
    return "00", "00.00.00.00", "p-0000", "00.00.00.00", "p-0000"
  end
  local v6 = d.ip_version == 6
  local proto = ffi.string(kbuf, put_hex8(kbuf, 0, band(d.ipproto, 255)))
  local z = src_is_z(d, v6)
  local sp, dp = d.sport, d.dport
  local s = d.src
  local ipa = ffi.string(kbuf, put_ip(kbuf, 0, s, 16 * z, v6))
  local porta = ffi.string(kbuf, put_port(kbuf, 0, sp + (dp - sp) * z))
  local ipz = ffi.string(kbuf, put_ip(kbuf, 0, s, 16 - 16 * z, v6))
  local portz = ffi.string(kbuf, put_port(kbuf, 0, dp + (sp - dp) * z))
  return proto, ipa, porta, ipz, portz
end

return M
