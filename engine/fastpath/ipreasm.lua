--[[
luaprobe.engine.fastpath.ipreasm — IPv4 / IPv6 fragment reassembly in the fast path,
before the flow table, TCP reassembly and every hook that sees L4.

    local ipreasm = require "luaprobe.engine.fastpath.ipreasm"
    local R = ipreasm.new{ timeout = 30,            -- s of packet time per datagram
                           max_bytes = 16 << 20,    -- fragment bytes held over all datagrams
                           max_datagrams = 8192 }   -- datagrams being reassembled at once
    local frame, len, nfrags, wirelen = R:add(e, ts)   -- e: lp_pkt with e.d.frag == 1
    R:expire(now)            -- drop datagrams older than timeout (counted)
    R:flush()                -- end of input: drop every pending datagram (counted)
    R.stats                  -- counters, below

Sources: RFC 791 §3.2 (IPv4 fragmentation: identification + source +
destination + protocol name a datagram; offsets in 8-byte units; MF), RFC
8200 §4.5 (IPv6 Fragment header: identification + source + destination; the
unfragmentable part and the Next Header come from the first fragment), RFC
5722 (overlapping IPv6 fragments), Linux net/ipv4/ip_fragment.c (30 s timeout).

What the fast path does with a fragment (decode.lua sets d.frag = 1 for any
IPv4 packet with MF set or a non-zero offset, and any IPv6 packet whose
Fragment header has M set or a non-zero offset):
  * the fragment packet stays in the batch as it was captured, with its L4
    layer removed (a first fragment's TCP/UDP header is not a whole segment):
    hooks on link and IP layers (simplecounter on Ethernet, IPv4, IPv6, ...)
    see every fragment packet; L4 hooks never see a fragment.  A fragment has
    no flow of its own (flow -1): it is counted in its datagram's flow.
  * when the last missing byte arrives, add() returns the reassembled frame:
    the link-layer header of the first fragment (offset 0), its IP header
    (IPv4: options kept, total length set, MF/offset cleared, checksum
    recomputed; IPv6: the unfragmentable part, the Fragment header removed
    and its Next Header put in the preceding header, payload length set), then
    the datagram's payload.  The driver appends it to the batch right after
    the completing fragment with d.frag = 2: the flow table counts it as all
    of its fragments (packets and wire bytes), and L4 hooks, TCP reassembly
    and file extraction see the datagram once.  Link/IP-layer hooks skip it
    (they saw the fragments).

Policy.
  * Arrival order does not matter: fragments are placed by offset.
  * Overlap: first wins (the bytes that arrived first are kept, like
    luaprobe.engine.streams.tcpreasm and Linux/BSD TCP); a fragment that overlaps bytes
    already held counts once in stats.overlaps, its new bytes are still used.
    (RFC 5722 asks receivers to drop IPv6 datagrams with overlaps; a passive
    monitor keeps the data instead and counts it.)  When overlapping bytes
    differ, the completed datagram's TCP / UDP checksum is verified: if it
    fails, the kept bytes were another datagram's (an IP id used again while a
    fragment was missing, RFC 4963 §3) and the datagram is dropped, its
    fragments counted in stats.malformed and in_no_flow, as the endpoint drops
    it on the checksum.
  * Duplicates (all bytes already held) count in stats.duplicates.
  * The total length is set by the first fragment with MF clear; bytes beyond
    it, a datagram above 65,535 bytes (IPv4: header + payload; IPv6: payload),
    a non-last fragment whose length is not a multiple of 8, a fragment cut
    short by the capture (snaplen) or with an impossible header are not used:
    the fragment counts in stats.malformed (its datagram may still complete
    from the other fragments; a truncated capture usually makes it time out).
  * Timeout: a datagram not complete `timeout` seconds (packet time) after its
    first fragment is dropped (stats.timeouts); at end of input pending ones
    are dropped too (stats.incomplete).
  * Memory: fragment bytes held over all datagrams stay <= max_bytes and
    datagrams <= max_datagrams: to make room the oldest datagram is dropped
    (stats.dropped_cap); a single fragment larger than max_bytes is dropped.

stats: fragments (fragment packets seen), datagrams (reassembled), timeouts,
incomplete, overlaps, duplicates, malformed, dropped_cap, in_no_flow (fragment
packets that reach no flow: not used, or of a datagram dropped for a timeout,
incomplete at the end or the cap; the others count in their datagram's flow),
held_bytes (now),
pending (datagrams now).

Cost: nothing for packets that are not fragments (the driver tests
d.frag ~= 0); fragments are copied into Lua strings.
]]
local ffi = require "ffi"
local bit = require "bit"
local band, bor, rshift, lshift, bnot = bit.band, bit.bor, bit.rshift, bit.lshift, bit.bnot
local fstring = ffi.string
local u8arr = ffi.typeof("uint8_t[?]")

local decode = require "luaprobe.engine.fastpath.decode"
local P = decode.PROTO

local M = {}
local R = {}
R.__index = R

--- opts: timeout (s, default 30), max_bytes (default 16 MiB), max_datagrams (default 8192).
function M.new(opts)
  opts = opts or {}
  return setmetatable({
    timeout = opts.timeout or 30,
    max_bytes = opts.max_bytes or 16 * 1048576,
    max_datagrams = opts.max_datagrams or 8192,
    dgrams = {},          -- key -> datagram
    order = {}, head = 1, tail = 0,   -- FIFO of datagrams by first arrival (lazy deletion)
    stats = { fragments = 0, datagrams = 0, timeouts = 0, incomplete = 0, overlaps = 0, duplicates = 0,
              malformed = 0, dropped_cap = 0, held_bytes = 0, pending = 0, in_no_flow = 0 },
  }, R)
end

local function be16(p, o) return bor(lshift(p[o], 8), p[o + 1]) end

--- Remove the L4 layer decode gave a first fragment (it is not a whole segment).
local function strip_l4(d)
  if d.l4_offset < 0 then return end
  local n = d.nlayers
  if n > 0 then
    local l = d.layer[n - 1]
    if l.offset == d.l4_offset then
      d.first[l.proto] = -1
      d.nlayers = n - 1
      d.payload_offset = l.offset
      d.payload_length = d.payload_length + l.length
    end
  end
  d.l4_offset = -1
  d.sport, d.dport, d.tcp_flags, d.icmp_type, d.icmp_code = 0, 0, 0, 0, 0
  d.tcp_seq, d.tcp_ack = 0, 0
end
M.strip_l4 = strip_l4

local function drop(self, g, why)
  if g.dead then return end
  g.dead = true
  self.dgrams[g.key] = nil
  local st = self.stats
  st.held_bytes = st.held_bytes - g.held
  st.pending = st.pending - 1
  if why then
    st[why] = st[why] + 1
    st.in_no_flow = st.in_no_flow + g.nfrags         -- its fragment packets reach no flow
  end
end

-- the oldest live datagram (FIFO head, skipping dead ones)
local function oldest(self)
  local order = self.order
  while self.head <= self.tail do
    local g = order[self.head]
    if not g.dead then return g end
    order[self.head] = nil
    self.head = self.head + 1
  end
  return nil
end

-- Parse the fragment of entry e.  Returns key, v, off, mf, pay (payload start), plen,
-- hdr_end (end of the unfragmentable part), nhpos (v6: where the Next Header pointing
-- at the Fragment header is), nh (v6 next header after the Fragment header), or nil.
local function parse(e)
  local d, p, caplen = e.d, e.data, e.caplen
  local o = d.l3_offset
  if o < 0 then return nil end
  if d.ip_version == 4 then
    local ihl = lshift(band(p[o], 15), 2)
    local tot = be16(p, o + 2)
    if tot < ihl or o + tot > caplen then return nil end
    local fo = be16(p, o + 6)
    local key = "4" .. fstring(p + o + 12, 8) .. fstring(p + o + 9, 1) .. fstring(p + o + 4, 2)
    return key, 4, lshift(band(fo, 0x1fff), 3), band(fo, 0x2000) ~= 0, o + ihl, tot - ihl, o + ihl, -1, 0
  end
  local plen = be16(p, o + 4)
  local lim = o + 40 + plen
  if plen == 0 or lim > caplen then return nil end
  local nhpos, q = o + 6, o + 40
  local nh = p[nhpos]
  while nh ~= 44 do
    if not (nh == 0 or nh == 43 or nh == 60 or nh == 51) or q + 8 > lim then return nil end
    local len = nh == 51 and lshift(p[q + 1] + 2, 2) or lshift(p[q + 1] + 1, 3)
    nhpos = q
    nh = p[q]
    q = q + len
  end
  if q + 8 > lim then return nil end
  local fo = be16(p, q + 2)
  local key = "6" .. fstring(p + o + 8, 32) .. fstring(p + q + 4, 4)
  return key, 6, band(fo, 0xfff8), band(fo, 1) ~= 0, q + 8, lim - (q + 8), q, nhpos, p[q]
end

-- insert bytes [off, off+n) first-wins; returns bytes added, overlapped, and whether an overlapped byte differs
-- from the byte held (the fragments disagree: another datagram's under the same key, or a forged one)
local function insert(g, off, s)
  local frags = g.frags
  local pos, e, n = off, off + #s, #s
  local i, added, overlapped, differs = 1, 0, false, false
  while pos < e do
    local f = frags[i]
    local fo = f and f[1] or math.huge
    if pos < fo then
      local stop = e < fo and e or fo
      table.insert(frags, i, { pos, (pos == off and stop == e) and s or s:sub(pos - off + 1, stop - off) })
      added = added + (stop - pos)
      i = i + 1
      pos = stop
    else
      local fe = fo + #f[2]
      if pos < fe then
        overlapped = true
        local stop = e < fe and e or fe
        if not differs and s:sub(pos - off + 1, stop - off) ~= f[2]:sub(pos - fo + 1, stop - fo) then differs = true end
        pos = stop
      end
      i = i + 1
    end
  end
  return added, overlapped, differs
end

local function complete(g)
  if not g.total or not g.hdr then return false end
  local pos = 0
  for _, f in ipairs(g.frags) do
    if f[1] > pos then return false end
    local fe = f[1] + #f[2]
    if fe > pos then pos = fe end
  end
  return pos >= g.total
end

local function csum16(buf, o, n)
  local s = 0
  for i = o, o + n - 1, 2 do s = s + lshift(buf[i], 8) + buf[i + 1] end
  while s > 0xffff do s = band(s, 0xffff) + rshift(s, 16) end
  return band(bnot(s), 0xffff)
end

-- the reassembled frame: cdata buffer, length
local function build(g)
  local hdr, total = g.hdr, g.total
  local hl = #hdr
  local len = hl + total
  local buf = u8arr(len)
  ffi.copy(buf, hdr, hl)
  for _, f in ipairs(g.frags) do
    local fo, s = f[1], f[2]
    if fo < total then
      local k = #s
      if fo + k > total then k = total - fo end
      ffi.copy(buf + hl + fo, s, k)
    end
  end
  local o = g.l3
  if g.v == 4 then
    local ihl = hl - o
    local tot = ihl + total
    buf[o + 2], buf[o + 3] = rshift(tot, 8), band(tot, 255)
    buf[o + 6], buf[o + 7] = 0, 0
    buf[o + 10], buf[o + 11] = 0, 0
    local c = csum16(buf, o, ihl)
    buf[o + 10], buf[o + 11] = rshift(c, 8), band(c, 255)
  else
    local plen = hl - o - 40 + total
    buf[o + 4], buf[o + 5] = rshift(plen, 8), band(plen, 255)
    buf[g.nhpos] = g.nh
  end
  return buf, len
end

--- False when the reassembled datagram's TCP or UDP checksum (RFC 9293 §3.1, RFC 768; IPv6: RFC 8200 §8.1) does not
--- verify; true when it does or cannot be checked (another protocol, IPv4 UDP without a checksum, IPv6 extension
--- headers around the Fragment header).  Asked only of a datagram whose fragments disagreed.
local function l4_sum_ok(g, buf, len)
  local o, hl = g.l3, #g.hdr
  local proto, pseudo
  if g.v == 4 then
    proto = buf[o + 9]
    pseudo = csum16(buf, o + 12, 8)                     -- addresses
  else
    if hl - o ~= 40 then return true end
    proto = g.nh
    pseudo = csum16(buf, o + 8, 32)
  end
  if proto ~= 6 and proto ~= 17 then return true end
  local n = len - hl
  if proto == 17 and (n < 8 or (g.v == 4 and buf[hl + 6] == 0 and buf[hl + 7] == 0)) then return true end
  if proto == 6 and n < 20 then return true end
  local s = band(bnot(pseudo), 0xffff) + proto + n
  local body = u8arr(n + 1)                               -- one zero byte of padding for an odd length
  ffi.copy(body, buf + hl, n)
  s = s + band(bnot(csum16(body, 0, n + band(n, 1))), 0xffff)
  while s > 0xffff do s = band(s, 0xffff) + rshift(s, 16) end
  return s == 0xffff
end

--- Take fragment entry e (e.d.frag == 1) at packet time ts.  Strips its L4 layer.
--- Returns nil, or (frame cdata, length, fragments, summed wire length) when it
--- completed its datagram; the frame stays valid while the caller holds it.
function R:add(e, ts)
  local st = self.stats
  st.fragments = st.fragments + 1
  strip_l4(e.d)
  local key, v, off, mf, pay, plen, hdr_end, nhpos, nh = parse(e)
  if not key or (mf and plen % 8 ~= 0) or plen <= 0 then
    st.malformed = st.malformed + 1
    st.in_no_flow = st.in_no_flow + 1
    return nil
  end
  local hdrlen = hdr_end - e.d.l3_offset
  if off + plen > 65535 - (v == 4 and hdrlen or 0) then
    st.malformed = st.malformed + 1
    st.in_no_flow = st.in_no_flow + 1
    return nil
  end
  if plen > self.max_bytes then
    st.dropped_cap = st.dropped_cap + 1
    st.in_no_flow = st.in_no_flow + 1
    return nil
  end
  local g = self.dgrams[key]
  if g and ts - g.first_ts > self.timeout then
    drop(self, g, "timeouts")
    g = nil
  end
  if not g then
    while st.pending >= self.max_datagrams do drop(self, oldest(self), "dropped_cap") end
    g = { key = key, v = v, first_ts = ts, frags = {}, held = 0, nfrags = 0, wirelen = 0 }
    self.dgrams[key] = g
    self.tail = self.tail + 1
    self.order[self.tail] = g
    st.pending = st.pending + 1
  end
  while st.held_bytes + plen > self.max_bytes do
    local old = oldest(self)
    if old == g then  -- only this datagram left: drop the fragment instead
      st.dropped_cap = st.dropped_cap + 1
      st.in_no_flow = st.in_no_flow + 1
      return nil
    end
    drop(self, old, "dropped_cap")
  end
  local p = e.data
  if g.total and off + plen > g.total then
    st.malformed = st.malformed + 1
    st.in_no_flow = st.in_no_flow + 1
    return nil
  end
  if not mf then
    if g.total == nil then
      for _, f in ipairs(g.frags) do
        if f[1] + #f[2] > off + plen then   -- bytes already held beyond this end
          st.malformed = st.malformed + 1
          st.in_no_flow = st.in_no_flow + 1
          return nil
        end
      end
      g.total = off + plen
    elseif g.total ~= off + plen then
      st.malformed = st.malformed + 1
      st.in_no_flow = st.in_no_flow + 1
      return nil
    end
  end
  local added, overlapped, differs = insert(g, off, fstring(p + pay, plen))
  if differs then g.differs = true end
  if added == 0 then
    st.duplicates = st.duplicates + 1
  elseif overlapped then
    st.overlaps = st.overlaps + 1
  end
  g.held = g.held + added
  st.held_bytes = st.held_bytes + added
  g.nfrags = g.nfrags + 1
  g.wirelen = g.wirelen + e.wirelen
  if off == 0 and not g.hdr then
    g.hdr = fstring(p, hdr_end)
    g.l3 = e.d.l3_offset
    g.nhpos, g.nh = nhpos, nh
  end
  if not complete(g) then return nil end
  local buf, len = build(g)
  drop(self, g, nil)
  if g.differs and not l4_sum_ok(g, buf, len) then
    -- fragments that disagree and a datagram whose checksum fails: the bytes kept first were another datagram's
    -- (an IP id used again within the timeout while a fragment was missing, RFC 4963 §3; or forged); the endpoint
    -- drops it on the checksum, so no flow, hook or TCP reassembly gets it (a retransmission brings the real bytes)
    st.malformed = st.malformed + g.nfrags
    st.in_no_flow = st.in_no_flow + g.nfrags
    return nil
  end
  st.datagrams = st.datagrams + 1
  return buf, len, g.nfrags, g.wirelen
end

--- Drop datagrams whose first fragment is more than `timeout` s before `now`.
function R:expire(now)
  local limit = now - self.timeout
  while true do
    local g = oldest(self)
    if not g or g.first_ts >= limit then return end
    drop(self, g, "timeouts")
  end
end

--- End of input: every pending datagram is dropped (stats.incomplete).
function R:flush()
  while true do
    local g = oldest(self)
    if not g then return end
    drop(self, g, "incomplete")
  end
end

return M
