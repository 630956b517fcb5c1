--[[
luaprobe.engine.gen.builder — the packet builder of `luaprobe gen` (LuaJIT ffi).

Python (engine/gen/traffic.py) prepares one `lp_gen_flow` record per flow (addresses,
ports, initial sequence numbers, packet counts: a numpy structured array whose
address is passed here) and the HTTP request/response byte streams (one Python
call per HTTP flow).  Everything per packet happens here: scheduling which flow
sends next, Ethernet / 802.1Q / IPv4 / IPv6 / TCP / UDP / ICMP / ICMPv6 / DNS
headers, checksums, MSS segmentation, pcap / pcapng records and the file writes.

    local gen = require "luaprobe.engine.gen.builder"
    local g = gen.new(cfg)
    local fi = g.run()          -- returns the index of an HTTP flow that needs its
    while fi do                 -- streams (0-based), or nil when the file is complete
      g.provide(request, response)
      fi = g.run()
    end
    g.stats                     -- table of counters, see `stats` below

cfg fields: path (or file: an object with :write(string) and :close() that gets
the bytes instead, e.g. engine/gen/stream.lua's ring pusher and paced sender),
format ("pcap" | "pcapng"), flows_addr, nflows, concurrency,
seed (any non-zero integer), rate (packets/s), start_sec, vlan (-1: untagged),
mss (IPv4; IPv6 flows use mss - 20), dist_kind (0 fixed, 1 uniform, 2 imix),
dist_a, dist_b (IP datagram lengths), pool (payload text, >= 2048 bytes),
names (Lua array of DNS names, dotted).

Flow state machines (one packet per step, every step of a flow is in order):
  TCP  (kind 1): SYN (MSS option), SYN/ACK (MSS), ACK; data segments (first from
       the client, then either side at random, each PSH/ACK carrying the current
       acknowledgement); when one side has two segments unacknowledged the other
       side sends a pure ACK; FIN/ACK (client), FIN/ACK (server), ACK (client).
  HTTP (kind 5): handshake, request (one PSH/ACK), response segmented at the MSS
       (PSH on the last one), a client ACK after every second segment, then the
       same FIN exchange.
  UDP  (kind 2): datagrams, the first from the client, then either side.
  ICMP (kind 3): echo request / echo reply pairs (ICMPv6 128/129 over IPv6),
       the reply mirrors the request's identifier, sequence and payload.
  DNS  (kind 4): query / response pairs on one UDP 5-tuple (server port 53),
       distinct transaction ids, A or AAAA questions, 1-2 answers or NXDOMAIN.
Timestamps: packet i (0-based, file order) is at start + floor(i * 1e9 / rate) ns
(pcap: microseconds; pcapng: if_tsresol 9, nanoseconds).
--]]
local ffi = require "ffi"
local bit = require "bit"
local band, bor, bxor, rshift, lshift, tobit = bit.band, bit.bor, bit.bxor, bit.rshift, bit.lshift, bit.tobit
local floor = math.floor

assert(ffi.abi("le"), "luaprobe.engine.gen.builder: checksums assume a little-endian host")

if not pcall(ffi.typeof, "lp_gen_flow") then
  ffi.cdef [[
typedef struct {
  uint8_t cip[16];
  uint8_t sip[16];
  uint8_t cmac[6];
  uint8_t smac[6];
  uint16_t cport;
  uint16_t sport;
  uint32_t cisn;
  uint32_t sisn;
  uint32_t seed;
  int32_t count;
  uint8_t kind;
  uint8_t v6;
  uint16_t pad;
  uint32_t flowlabel;
} lp_gen_flow;

typedef struct {
  int32_t flow;
  int32_t phase;
  int32_t left;
  int32_t k;
  double seq[2];
  int32_t ipid[2];
  int32_t un[2];
  int32_t off;
  int32_t len;
  int32_t txid;
  int32_t qname;
  int32_t qtype;
  int32_t pad;
} lp_gen_state;
]]
end

local M = {}
M.KIND = { tcp = 1, udp = 2, icmp = 3, dns = 4, http = 5 }
M.FLOW_SIZE = ffi.sizeof("lp_gen_flow")
M.WRITE_ERROR = "gen: cannot write: "   -- the prefix of the error a failed open / write / close of cfg.path raises

local u8p = ffi.typeof("uint8_t *")
local cu8p = ffi.typeof("const uint8_t *")
local u16p = ffi.typeof("uint16_t *")
local u32p = ffi.typeof("uint32_t *")
local cu32p = ffi.typeof("const uint32_t *")
local cu16p = ffi.typeof("const uint16_t *")
local flowp = ffi.typeof("const lp_gen_flow *")
local STATE_SIZE = ffi.sizeof("lp_gen_state")

local TWO32 = 4294967296
local F_FIN, F_SYN, F_PSH, F_ACK = 0x01, 0x02, 0x08, 0x10

-- one's complement sum helpers (native little-endian 16-bit words; the fold
-- result stored natively is the correct big-endian checksum, RFC 1071)
local function csum(p, len, s)
  local w = ffi.cast(cu32p, p)
  local n = rshift(len, 2)
  for i = 0, n - 1 do s = s + w[i] end
  local r = band(len, 3)
  local q = p + lshift(n, 2)
  if r >= 2 then
    s = s + ffi.cast(cu16p, q)[0]
    if r == 3 then s = s + q[2] end
  elseif r == 1 then
    s = s + q[0]
  end
  return s
end

local function fold(s)
  while s > 65535 do s = s % 65536 + floor(s / 65536) end
  return 65535 - s
end

local function bswap16(x) return band(x, 255) * 256 + rshift(x, 8) end

local function w16(p, v)
  p[0] = rshift(v, 8)
  p[1] = band(v, 255)
end

local function w32(p, v)          -- v: number in [0, 2^32)
  local x = tobit(v)
  p[0] = band(rshift(x, 24), 255)
  p[1] = band(rshift(x, 16), 255)
  p[2] = band(rshift(x, 8), 255)
  p[3] = band(x, 255)
end

-- DNS name "www.example.com" -> wire format with a zero terminator
local function qname_wire(name)
  local out = {}
  for label in name:gmatch("[^%.]+") do
    assert(#label > 0 and #label < 64, "bad DNS label in " .. name)
    out[#out + 1] = string.char(#label) .. label
  end
  out[#out + 1] = "\0"
  return table.concat(out)
end

function M.new(cfg)
  local flows = ffi.cast(flowp, cfg.flows_addr)
  local nflows = cfg.nflows
  local K = cfg.concurrency
  if K > nflows then K = nflows end
  if K < 1 then K = 1 end
  local states = ffi.new("lp_gen_state[?]", K)
  local pcapng = cfg.format == "pcapng"
  local RH = pcapng and 28 or 16
  local vlan = cfg.vlan
  local mss4 = cfg.mss
  local mss6 = cfg.mss - 20
  local dist_kind, dist_a, dist_b = cfg.dist_kind, cfg.dist_a, cfg.dist_b
  local pool = cfg.pool
  local poolp = ffi.cast(cu8p, pool)
  local poollen = #pool - 1600
  assert(poollen > 0, "payload pool too small")
  local names, namelens, nnames = {}, {}, 0
  for i = 1, #cfg.names do
    local w = qname_wire(cfg.names[i])
    names[i - 1] = w
    namelens[i - 1] = #w
    nnames = i
  end
  assert(nnames > 0, "no DNS names")
  local ns_per_pkt = 1e9 / cfg.rate
  local start_sec = cfg.start_sec
  assert(start_sec >= 0 and start_sec < 2 ^ 31, "start_sec out of range")

  local BUFSZ = 8 * 1024 * 1024
  local buf = ffi.new("uint8_t[?]", BUFSZ)
  local scratch = ffi.new("uint8_t[?]", 1024)
  local pos = 0
  local FL = 0                  -- start of the frame being built
  -- cfg.file: any object with :write(s), :close() (its own errors are its own); a file opened here has every write
  -- and its close checked: a failure raises M.WRITE_ERROR .. reason (traffic.py: one line naming the file, exit 1;
  -- before, a full disk or /dev/full went unnoticed and the summary counted packets never written)
  local file, checked = cfg.file, cfg.file == nil
  if checked then
    local f, err = io.open(cfg.path, "wb")
    if not f then                              -- io.open's message is "PATH: reason"
      err = tostring(err)
      local pre = tostring(cfg.path) .. ": "
      if err:sub(1, #pre) == pre then err = err:sub(#pre + 1) end
      error(M.WRITE_ERROR .. err, 0)
    end
    file = f
  end
  local file_bytes = 0

  -- counters
  local npk, nbytes = 0, 0
  local c_syn, c_synack, c_fin, c_tcp_data, c_udp, c_echo_req, c_echo_rep = 0, 0, 0, 0, 0, 0, 0
  local c_dns_q, c_dns_r, c_nx, c_http_req, c_http_resp = 0, 0, 0, 0, 0
  local c_flows = { 0, 0, 0, 0, 0 }

  -- xorshift32 (deterministic, seeded from cfg.seed)
  local rs = tobit(cfg.seed)
  if rs == 0 then rs = 0x2545F491 end
  local function rnd()
    local x = rs
    x = bxor(x, lshift(x, 13))
    x = bxor(x, rshift(x, 17))
    x = bxor(x, lshift(x, 5))
    rs = x
    return x % TWO32
  end
  local function rint(n) return floor(rnd() * n / TWO32) end   -- [0, n)

  local function flush()
    if pos > 0 then
      local ok, err = file:write(ffi.string(buf, pos))
      if checked and not ok then error(M.WRITE_ERROR .. tostring(err), 0) end
      file_bytes = file_bytes + pos
      pos = 0
    end
  end

  -- file header
  do
    local h = ffi.cast(u32p, buf)
    if pcapng then
      -- SHB (28 bytes, no options)
      h[0] = 0x0A0D0D0A; h[1] = 28; h[2] = 0x1A2B3C4D
      ffi.cast(u16p, buf + 12)[0] = 1; ffi.cast(u16p, buf + 14)[0] = 0
      h[4] = 0xFFFFFFFF; h[5] = 0xFFFFFFFF           -- section length unknown (-1)
      h[6] = 28
      -- IDB (32 bytes): Ethernet, snaplen 262144, if_tsresol = 9 (nanoseconds)
      local i = ffi.cast(u32p, buf + 28)
      i[0] = 1; i[1] = 32
      ffi.cast(u16p, buf + 36)[0] = 1; ffi.cast(u16p, buf + 38)[0] = 0
      i[3] = 262144
      ffi.cast(u16p, buf + 44)[0] = 9; ffi.cast(u16p, buf + 46)[0] = 1
      buf[48] = 9; buf[49] = 0; buf[50] = 0; buf[51] = 0
      i[6] = 0                                         -- opt_endofopt
      i[7] = 32
      pos = 60
    else
      h[0] = 0xA1B2C3D4
      ffi.cast(u16p, buf + 4)[0] = 2; ffi.cast(u16p, buf + 6)[0] = 4
      h[2] = 0; h[3] = 0; h[4] = 262144; h[5] = 1
      pos = 24
    end
  end

  -- record header + bookkeeping for the frame [FL, FL + flen)
  local function finish(flen)
    local off = floor(npk * ns_per_pkt)
    local sec = floor(off / 1e9)
    local ns = off - sec * 1e9
    local abs = start_sec + sec
    local h = ffi.cast(u32p, buf + pos)
    if pcapng then
      local padded = band(flen + 3, -4)
      local blen = 32 + padded
      local X = abs * 1953125                        -- abs * 1e9 = X * 512, X < 2^52
      local hi = floor(X / 8388608)
      local lo = (X % 8388608) * 512 + ns
      if lo >= TWO32 then lo = lo - TWO32; hi = hi + 1 end
      h[0] = 6; h[1] = blen; h[2] = 0; h[3] = hi; h[4] = lo; h[5] = flen; h[6] = flen
      for j = flen, padded - 1 do buf[FL + j] = 0 end
      ffi.cast(u32p, buf + FL + padded)[0] = blen
      pos = pos + blen
    else
      h[0] = abs; h[1] = floor(ns / 1000); h[2] = flen; h[3] = flen
      pos = pos + 16 + flen
    end
    npk = npk + 1
    nbytes = nbytes + flen
    if pos > BUFSZ - 65536 then flush() end
  end

  -- Ethernet (+ 802.1Q) at FL; returns the L3 offset
  local function eth(fl, dir, et)
    FL = pos + RH
    local p = buf + FL
    if dir == 0 then
      ffi.copy(p, fl.smac, 6); ffi.copy(p + 6, fl.cmac, 6)
    else
      ffi.copy(p, fl.cmac, 6); ffi.copy(p + 6, fl.smac, 6)
    end
    local o = FL + 12
    if vlan >= 0 then
      buf[o] = 0x81; buf[o + 1] = 0x00
      buf[o + 2] = rshift(vlan, 8); buf[o + 3] = band(vlan, 255)
      o = o + 4
    end
    buf[o] = rshift(et, 8); buf[o + 1] = band(et, 255)
    return o + 2
  end

  -- IP header at o for an L4 segment of l4len bytes; returns (l4 offset,
  -- pseudo-header sum)
  local function ip(fl, st, dir, proto, l4len)
    if fl.v6 == 1 then
      local o = eth(fl, dir, 0x86dd)
      local p = buf + o
      local lab = fl.flowlabel
      p[0] = 0x60; p[1] = band(rshift(lab, 16), 15); p[2] = band(rshift(lab, 8), 255); p[3] = band(lab, 255)
      w16(p + 4, l4len)
      p[6] = proto
      p[7] = dir == 0 and 64 or 57
      if dir == 0 then
        ffi.copy(p + 8, fl.cip, 16); ffi.copy(p + 24, fl.sip, 16)
      else
        ffi.copy(p + 8, fl.sip, 16); ffi.copy(p + 24, fl.cip, 16)
      end
      return o + 40, csum(p + 8, 32, proto * 256 + bswap16(l4len))
    end
    local o = eth(fl, dir, 0x0800)
    local p = buf + o
    local id = st.ipid[dir]
    st.ipid[dir] = band(id + 1, 0xffff)
    p[0] = 0x45; p[1] = 0
    w16(p + 2, 20 + l4len)
    w16(p + 4, id)
    p[6] = 0x40; p[7] = 0                          -- DF
    p[8] = dir == 0 and 64 or 57
    p[9] = proto
    p[10] = 0; p[11] = 0
    if dir == 0 then
      ffi.copy(p + 12, fl.cip, 4); ffi.copy(p + 16, fl.sip, 4)
    else
      ffi.copy(p + 12, fl.sip, 4); ffi.copy(p + 16, fl.cip, 4)
    end
    ffi.cast(u16p, p + 10)[0] = fold(csum(p, 20, 0))
    return o + 20, csum(p + 12, 8, proto * 256 + bswap16(l4len))
  end

  local function tcp(fl, st, dir, flags, src, len, syn)
    local hl = syn and 24 or 20
    local o, ps = ip(fl, st, dir, 6, hl + len)
    local p = buf + o
    if dir == 0 then w16(p, fl.cport); w16(p + 2, fl.sport) else w16(p, fl.sport); w16(p + 2, fl.cport) end
    w32(p + 4, st.seq[dir])
    if band(flags, F_ACK) ~= 0 then w32(p + 8, st.seq[1 - dir]) else w32(p + 8, 0) end
    p[12] = lshift(rshift(hl, 2), 4)
    p[13] = flags
    p[14] = 0xff; p[15] = 0xff                     -- window 65535 (no window scaling)
    p[16] = 0; p[17] = 0; p[18] = 0; p[19] = 0
    if syn then
      p[20] = 2; p[21] = 4
      w16(p + 22, fl.v6 == 1 and mss6 or mss4)
    end
    if len > 0 then ffi.copy(p + hl, src, len) end
    ffi.cast(u16p, p + 16)[0] = fold(csum(p, hl + len, ps))
    finish(o + hl + len - FL)
  end

  local function udp(fl, st, dir, src, len)
    local o, ps = ip(fl, st, dir, 17, 8 + len)
    local p = buf + o
    if dir == 0 then w16(p, fl.cport); w16(p + 2, fl.sport) else w16(p, fl.sport); w16(p + 2, fl.cport) end
    w16(p + 4, 8 + len)
    p[6] = 0; p[7] = 0
    if len > 0 then ffi.copy(p + 8, src, len) end
    local c = fold(csum(p, 8 + len, ps))
    if c == 0 then c = 0xffff end
    ffi.cast(u16p, p + 6)[0] = c
    finish(o + 8 + len - FL)
  end

  local function icmp(fl, st, dir, typ, id, sq, src, len)
    local v6 = fl.v6 == 1
    local o, ps = ip(fl, st, dir, v6 and 58 or 1, 8 + len)
    local p = buf + o
    p[0] = typ; p[1] = 0; p[2] = 0; p[3] = 0
    w16(p + 4, id); w16(p + 6, sq)
    if len > 0 then ffi.copy(p + 8, src, len) end
    ffi.cast(u16p, p + 2)[0] = fold(csum(p, 8 + len, v6 and ps or 0))
    finish(o + 8 + len - FL)
  end

  -- IP datagram length from the size distribution
  local function draw_size()
    if dist_kind == 0 then return dist_a end
    if dist_kind == 1 then return dist_a + rint(dist_b - dist_a + 1) end
    local r = rint(12)                                -- simple IMIX 7:4:1
    if r < 7 then return 40 elseif r < 11 then return 576 end
    return 1500
  end

  local function clamp(v, lo, hi)
    if v < lo then return lo elseif v > hi then return hi end
    return v
  end

  local function adv(st, dir, n)
    local s = st.seq[dir] + n
    if s >= TWO32 then s = s - TWO32 end
    st.seq[dir] = s
  end

  -- HTTP streams of the active slots (Lua strings, anchored here)
  local req_s, resp_s = {}, {}

  -- TCP phases shared by generic TCP and HTTP; returns true when the flow is done
  local function tcp_common(fl, st)
    local ph = st.phase
    if ph == 0 then
      tcp(fl, st, 0, F_SYN, nil, 0, true); adv(st, 0, 1); st.phase = 1; c_syn = c_syn + 1
    elseif ph == 1 then
      tcp(fl, st, 1, F_SYN + F_ACK, nil, 0, true); adv(st, 1, 1); st.phase = 2; c_synack = c_synack + 1
    elseif ph == 2 then
      tcp(fl, st, 0, F_ACK, nil, 0, false)
      st.phase = fl.kind == 5 and 10 or 3
    elseif ph == 4 then
      tcp(fl, st, 0, F_FIN + F_ACK, nil, 0, false); adv(st, 0, 1); st.phase = 5; c_fin = c_fin + 1
    elseif ph == 5 then
      tcp(fl, st, 1, F_FIN + F_ACK, nil, 0, false); adv(st, 1, 1); st.phase = 6; c_fin = c_fin + 1
    else
      tcp(fl, st, 0, F_ACK, nil, 0, false)
      return true
    end
    return false
  end

  local function step_tcp(fl, st)
    if st.phase ~= 3 then return tcp_common(fl, st) end
    if st.un[0] >= 2 then
      tcp(fl, st, 1, F_ACK, nil, 0, false); st.un[0] = 0
    elseif st.un[1] >= 2 then
      tcp(fl, st, 0, F_ACK, nil, 0, false); st.un[1] = 0
    elseif st.left > 0 then
      local dir = st.k == 0 and 0 or rint(2)
      local mss = fl.v6 == 1 and mss6 or mss4
      local len = clamp(draw_size() - (fl.v6 == 1 and 60 or 40), 1, mss)
      tcp(fl, st, dir, F_PSH + F_ACK, poolp + rint(poollen), len, false)
      adv(st, dir, len)
      st.un[dir] = st.un[dir] + 1
      st.un[1 - dir] = 0
      st.left = st.left - 1
      st.k = st.k + 1
      c_tcp_data = c_tcp_data + 1
    else
      st.phase = 4
      return tcp_common(fl, st)
    end
    return false
  end

  local function step_http(fl, st, slot)
    local ph = st.phase
    if ph == 10 then
      local r = req_s[slot]
      tcp(fl, st, 0, F_PSH + F_ACK, ffi.cast(cu8p, r), #r, false)
      adv(st, 0, #r)
      st.phase = 11
      c_http_req = c_http_req + 1
      return false
    elseif ph ~= 11 then
      return tcp_common(fl, st)
    end
    local r = resp_s[slot]
    local total = #r
    if st.un[1] >= 2 then
      tcp(fl, st, 0, F_ACK, nil, 0, false); st.un[1] = 0
    elseif st.off < total then
      local mss = fl.v6 == 1 and mss6 or mss4
      local n = total - st.off
      local flags = F_ACK
      if n > mss then n = mss else flags = F_PSH + F_ACK end
      tcp(fl, st, 1, flags, ffi.cast(cu8p, r) + st.off, n, false)
      adv(st, 1, n)
      st.off = st.off + n
      st.un[1] = st.un[1] + 1
      if st.off >= total then c_http_resp = c_http_resp + 1 end
    else
      st.phase = 4
      return tcp_common(fl, st)
    end
    return false
  end

  local function step_udp(fl, st)
    local dir = st.k == 0 and 0 or rint(2)
    local len = clamp(draw_size() - (fl.v6 == 1 and 48 or 28), 1, fl.v6 == 1 and 1452 or 1472)
    udp(fl, st, dir, poolp + rint(poollen), len)
    c_udp = c_udp + 1
    st.k = st.k + 1
    st.left = st.left - 1
    return st.left <= 0
  end

  local function step_icmp(fl, st)
    local v6 = fl.v6 == 1
    local id = band(fl.seed, 0xffff)
    local sq = band(st.k + 1, 0xffff)
    if st.phase == 0 then
      st.len = clamp(draw_size() - (v6 and 48 or 28), 0, v6 and 1452 or 1472)
      st.off = rint(poollen)
      icmp(fl, st, 0, v6 and 128 or 8, id, sq, poolp + st.off, st.len)
      st.phase = 1
      c_echo_req = c_echo_req + 1
      return false
    end
    icmp(fl, st, 1, v6 and 129 or 0, id, sq, poolp + st.off, st.len)
    c_echo_rep = c_echo_rep + 1
    st.phase = 0
    st.k = st.k + 1
    st.left = st.left - 1
    return st.left <= 0
  end

  local function dns_question(p, o, st)
    local nl = namelens[st.qname]
    ffi.copy(p + o, names[st.qname], nl)
    o = o + nl
    w16(p + o, st.qtype); w16(p + o + 2, 1)
    return o + 4
  end

  local function step_dns(fl, st)
    local p = scratch
    if st.phase == 0 then
      st.txid = band(fl.seed + st.k * 40503, 0xffff)
      st.qname = rint(nnames)
      st.qtype = rint(4) == 0 and 28 or 1
      w16(p, st.txid); w16(p + 2, 0x0100)
      w16(p + 4, 1); w16(p + 6, 0); w16(p + 8, 0); w16(p + 10, 0)
      local o = dns_question(p, 12, st)
      udp(fl, st, 0, p, o)
      c_dns_q = c_dns_q + 1
      st.phase = 1
      return false
    end
    local nx = rint(20) == 0
    local nans = nx and 0 or 1 + rint(2)
    w16(p, st.txid); w16(p + 2, nx and 0x8183 or 0x8180)
    w16(p + 4, 1); w16(p + 6, nans); w16(p + 8, 0); w16(p + 10, 0)
    local o = dns_question(p, 12, st)
    local rdlen = st.qtype == 28 and 16 or 4
    for _ = 1, nans do
      p[o] = 0xc0; p[o + 1] = 0x0c                   -- pointer to the question name
      w16(p + o + 2, st.qtype); w16(p + o + 4, 1)
      w32(p + o + 6, 60 + rint(86340))               -- TTL
      w16(p + o + 10, rdlen)
      o = o + 12
      if rdlen == 4 then
        p[o] = 1 + rint(223); p[o + 1] = rint(256); p[o + 2] = rint(256); p[o + 3] = 1 + rint(254)
      else
        p[o] = 0x20; p[o + 1] = 0x01; p[o + 2] = 0x0d; p[o + 3] = 0xb8
        for j = 4, 15 do p[o + j] = rint(256) end
      end
      o = o + rdlen
    end
    udp(fl, st, 1, p, o)
    c_dns_r = c_dns_r + 1
    if nx then c_nx = c_nx + 1 end
    st.phase = 0
    st.k = st.k + 1
    st.left = st.left - 1
    return st.left <= 0
  end

  local function step(slot)
    local st = states[slot]
    local fl = flows[st.flow]
    local kind = fl.kind
    if kind == 1 then return step_tcp(fl, st)
    elseif kind == 5 then return step_http(fl, st, slot)
    elseif kind == 2 then return step_udp(fl, st)
    elseif kind == 3 then return step_icmp(fl, st)
    end
    return step_dns(fl, st)
  end

  local function activate(slot, fi)
    local st = states[slot]
    ffi.fill(st, STATE_SIZE)
    local fl = flows[fi]
    st.flow = fi
    st.seq[0] = fl.cisn
    st.seq[1] = fl.sisn
    st.ipid[0] = band(fl.seed, 0xffff)
    st.ipid[1] = band(rshift(fl.seed, 16), 0xffff)
    st.left = fl.count
    c_flows[fl.kind] = c_flows[fl.kind] + 1
  end

  local self = { stats = nil }
  local stop_profile = require("luaprobe.engine.plugins.jitprof").start("gen")   -- no-op unless LUAPROBE_JIT_PROFILE
  local active, nextf = 0, 0
  local pending = -1
  local finished = false

  function self.provide(req, resp)
    assert(pending >= 0, "provide() without a pending HTTP flow")
    local mss = flows[states[pending].flow].v6 == 1 and mss6 or mss4
    assert(#req <= mss, "HTTP request longer than the MSS")
    assert(#resp > 0, "empty HTTP response")
    req_s[pending] = req
    resp_s[pending] = resp
    pending = -1
  end

  function self.run()
    assert(pending < 0, "run() before provide()")
    if finished then return nil end
    while true do
      while active < K and nextf < nflows do
        local slot, fi = active, nextf
        activate(slot, fi)
        nextf = nextf + 1
        active = active + 1
        if flows[fi].kind == 5 then
          pending = slot
          return fi
        end
      end
      if active == 0 then break end
      local slot
      repeat
        slot = rint(active)
      until step(slot)
      local last = active - 1
      if slot ~= last then
        ffi.copy(states + slot, states + last, STATE_SIZE)
        req_s[slot], resp_s[slot] = req_s[last], resp_s[last]
      end
      req_s[last], resp_s[last] = nil, nil
      active = last
    end
    flush()
    local ok, err = file:close()
    if checked and not ok then error(M.WRITE_ERROR .. tostring(err), 0) end
    finished = true
    stop_profile()
    self.stats = {
      packets = npk, bytes = nbytes, file_bytes = file_bytes,
      flows = nflows,
      tcp_flows = c_flows[1], udp_flows = c_flows[2], icmp_flows = c_flows[3],
      dns_flows = c_flows[4], http_flows = c_flows[5],
      syn = c_syn, synack = c_synack, fin = c_fin, tcp_data = c_tcp_data,
      udp_datagrams = c_udp, echo_requests = c_echo_req, echo_replies = c_echo_rep,
      dns_queries = c_dns_q, dns_responses = c_dns_r, dns_nxdomain = c_nx,
      http_requests = c_http_req, http_responses = c_http_resp,
    }
    return nil
  end

  return self
end

return M
