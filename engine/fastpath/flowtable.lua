--[[
luaprobe.engine.fastpath.flowtable — bidirectional 5-tuple flow table (LuaJIT ffi).

Used by the fast path once per decoded packet.  The packet path allocates no
Lua table or string: the flow records, the hash index and the two expiry
lists live in calloc'd ffi arrays (pages are touched only as flows arrive).
JIT note: every data-dependent branch in update() becomes a side trace, and
side traces of this large function have been seen to abort (error 34,
register coalescing) and fall back to the interpreter, so the per-packet
path is written branch-light; see the comments in update().

    local flowtable = require "luaprobe.engine.fastpath.flowtable"
    local ft = flowtable.new{ capacity = 1<<20,       -- max live flows (power of two)
                              idle_timeout = 120,     -- s of packet time
                              active_timeout = 1800 } -- s of packet time
    local idx, dir, is_new = ft:update(d, ts, wirelen)
    ft:flowkey(idx)        -- Trisul flow id, == decode.flowkey(d) of its packets
    ft:flow_parts(idx)     -- proto, ipa, porta, ipz, portz (key format)
    ft:entry(idx)          -- the lp_flow record (fields below)
    ft:expire(now, fn[, max])   -- fn(idx, reason) per timed-out flow, then frees it
    ft:terminate(idx)      -- explicit end (caller saw FIN/RST...): frees, no callback
    ft:each(fn)            -- fn(idx) for every live flow, least recently used first
    ft:is_live(idx)
    ft.live, ft.created, ft.expired, ft.expired_idle, ft.expired_active,
    ft.terminated, ft.full_drops, ft.capacity, ft.size (index slots = 2*capacity)

update(d, ts, wirelen)
  d        lp_decoded filled by decode.decode
  ts       packet time in seconds (double)
  wirelen  original length of the frame (bytes counters); default d.caplen
  returns  idx     0-based flow index in [0, capacity): stable for the flow's
                   whole life, reused after the flow is freed (compare
                   entry(idx).id to detect reuse)
                   -1 for non-IP packets (d.ip_version == 0)
                   -2 when the table is full: the packet is counted in
                   ft.full_drops and the flow is not tracked
           dir     0 = A->Z (the packet's source is the A end), 1 = Z->A
           is_new  true when this packet created the flow record

Key.  (ip version, ipproto, A address (16 bytes), Z address, A port, Z port),
normalised with decode.flowkey's rule: Z is the end with the lower port; on a
port tie the lower address (bytewise) is Z; if both are equal the destination
is Z.  Both directions therefore map to one entry, and ft:flowkey(idx) is
exactly decode.flowkey(d) for every packet of the flow.  Ports are 0 for
everything that is not TCP/UDP, so ICMP is one flow per address pair and
protocol, and non-first IP fragments (no L4 header) form their own ports-0
flow, as in decode.flowkey.  IPv4 addresses use bytes 0..3 only (bytes 4..15
are ignored).  VLAN ids are not part of the key.

Layout.
  flows[capacity]    lp_flow records; idx indexes this array.  Free records
                     are handed out from a stack, then from a high-water mark
                     (so a fresh table touches no record memory).
  slot_idx[size]     open-addressing index, size = 2 * capacity (load <= 0.5),
  slot_hash[size]    linear probing; slot_idx = -1 is empty; slot_hash keeps
                     the 32-bit hash so most collisions are rejected without
                     touching the record.  Full key comparison on a hash match.
                     Deletion is backward-shift (no tombstones): after
                     removing slot i, later entries of the cluster whose home
                     slot does not lie cyclically in (i, j] move back into the
                     hole, so every probe chain stays unbroken and lookups
                     never need a rehash.
  hash               Bob Jenkins' lookup3 hashword() over the 10 normalised
                     key words (bit ops only: no 32-bit multiply, which
                     LuaJIT cannot do exactly in doubles).
  LRU list           (lprev, lnext): every packet moves its flow to the tail,
                     so the head is the flow with the oldest last packet.
  age list           (aprev, anext): creation order, so the head has the
                     oldest first_ts.
  Both lists are circular, doubly linked through a sentinel record
  flows[capacity], so linking/unlinking is branch-free and terminate() is O(1).
  Probing: the first three probes are unrolled in update(), longer chains
  continue in probe_more() (a loop kept off the common path).

Expiry.  expire(now, fn, max) pops the LRU head while now - last_ts >
idle_timeout (state |= TIMEDOUT, fn(idx, flowtable.IDLE)), then the age head
while now - first_ts > active_timeout (fn(idx, flowtable.ACTIVE)).  Cost is
O(1) per expired flow plus O(1) per call, whatever the table size; `max`
(default unlimited) bounds the flows freed in one call, the rest go on the
next call.  Packet time is assumed monotone-ish: the lists are ordered by
packet arrival, so a packet with an earlier timestamp than its predecessors
still moves its flow to the LRU tail (last_ts never decreases), and a flow
behind it can only expire late, never early.

Active timeout decision.  Trisul flushes long-running flows periodically.
Here a flow older than active_timeout is reported through fn(idx, ACTIVE)
with its counters so far and then freed, exactly like an idle flow but
without the TIMEDOUT flag; the next packet of the same 5-tuple creates a new
flow record (is_new = true, new id, counters from zero, state INIT).  So
every record the caller reports covers at most active_timeout seconds, each
byte is reported once, and a caller keeping per-flow state initialises it
on is_new in both cases.  fn is called before the record is freed, so it can
read entry(idx), flowkey(idx)...; fn may call terminate(idx) itself.

lp_flow fields (counters are doubles: exact up to 2^53, no boxed uint64):
  id                   unique increasing number per flow record (1, 2, ...)
  first_ts, last_ts    packet time of the first / latest packet
  packets_az, packets_za, bytes_az, bytes_za    per direction, bytes = wirelen
  payload_az, payload_za                        L4 payload bytes (d.payload_length)
  tcp_flags_seen[2]    OR of the TCP flags, [0] A->Z, [1] Z->A
  state                §6.7 flags: INIT 0x1 (every record), SEEN_SYN 0x2 (SYN
                       without ACK), SEEN_SYN_ACK 0x4, SEEN_SYN_ACK_ACK 0x8 (an
                       ACK without SYN, after the SYN-ACK, from the end that did
                       not send it),
                       A_END_SERVER 0x10 / Z_END_SERVER 0x20 (which end sent
                       the SYN-ACK), SEEN_FIN 0x40, SEEN_RST 0x80, TIMEDOUT
                       0x100 (idle expiry), TERMINATED 0x800 (terminate())
  ipver, proto, porta, portz, a[4], z[4]   the key (addresses as int32 words
                       holding the network-order bytes)
  slot                 index slot, -1 when the record is free
--]]
local ffi = require "ffi"
local bit = require "bit"
local decode = require "luaprobe.engine.fastpath.decode"

local band, bor, bxor, rol, tobit, lshift = bit.band, bit.bor, bit.bxor, bit.rol, bit.tobit, bit.lshift
local cast = ffi.cast

if not pcall(ffi.typeof, "lp_flow") then
  ffi.cdef [[
typedef struct {
  union {
    int32_t key[10];
    struct {
      int32_t a[4];
      int32_t z[4];
      int32_t ports;
      int32_t vproto;
    };
  };
  int32_t hash;
  int32_t slot;
  int32_t lprev, lnext;
  int32_t aprev, anext;
  uint32_t state;
  uint16_t porta, portz;
  uint8_t ipver, proto;
  uint8_t tcp_flags_seen[2];
  double id;
  double first_ts, last_ts;
  union { double packets[2]; struct { double packets_az, packets_za; }; };
  union { double bytes[2];   struct { double bytes_az, bytes_za; }; };
  union { double payload[2]; struct { double payload_az, payload_za; }; };
} lp_flow;
]]
end
pcall(ffi.cdef, [[
void *calloc(size_t nmemb, size_t size);
void free(void *ptr);
]])

local flow_ptr = ffi.typeof("lp_flow *")
local i32_ptr = ffi.typeof("int32_t *")
local ci32_ptr = ffi.typeof("const int32_t *")
local C = ffi.C

local M = {}

local S = {
  INIT = 0x1, SEEN_SYN = 0x2, SEEN_SYN_ACK = 0x4, SEEN_SYN_ACK_ACK = 0x8,
  A_END_SERVER = 0x10, Z_END_SERVER = 0x20, SEEN_FIN = 0x40, SEEN_RST = 0x80,
  TIMEDOUT = 0x100, ERROR = 0x200, INCOMPLETE = 0x400, TERMINATED = 0x800,
  FLOWEND = 0x9C0,
}
M.STATE = S
M.IDLE, M.ACTIVE = 1, 2
local IDLE, ACTIVE = M.IDLE, M.ACTIVE
local TIMEDOUT, TERMINATED = S.TIMEDOUT, S.TERMINATED

local FT = {}
FT.__index = FT

local function alloc(ctype_ptr, n, size)
  local p = C.calloc(n, size)
  if p == nil then error("flowtable: out of memory allocating " .. n * size .. " bytes", 3) end
  return ffi.gc(ffi.cast(ctype_ptr, p), C.free)
end

function M.new(opts)
  opts = opts or {}
  local cap = opts.capacity or 1048576
  if cap < 1 or cap ~= math.floor(cap) or band(cap, cap - 1) ~= 0 or cap > 0x20000000 then
    error("flowtable: capacity must be a power of two <= 2^29", 2)
  end
  local size = cap * 2
  local self = setmetatable({
    capacity = cap,
    size = size,
    mask = size - 1,
    idle_timeout = opts.idle_timeout or 120,
    active_timeout = opts.active_timeout or 1800,
    flows = alloc(flow_ptr, cap + 1, ffi.sizeof("lp_flow")),   -- [cap]: list sentinel
    slot_idx = alloc(i32_ptr, size, 4),
    slot_hash = alloc(i32_ptr, size, 4),
    free_stack = alloc(i32_ptr, cap, 4),
    free_top = 0,        -- entries in free_stack
    hw = 0,              -- records [hw, cap) never used yet
    live = 0, created = 0, expired = 0, expired_idle = 0, expired_active = 0,
    terminated = 0, full_drops = 0,
    _scratch = decode.new(),
    kbuf = ffi.new("int32_t[10]"),   -- normalised key of the current packet (written)
  }, FT)
  -- the same words read through another pointer: the JIT cannot forward the
  -- stores to these loads, so the 10 key words do not stay in registers
  -- across the hash and the probes (register pressure -> side traces abort)
  self.kread = ffi.cast(ci32_ptr, self.kbuf)
  ffi.fill(self.slot_idx, size * 4, 0xff)   -- -1: empty
  local sen = self.flows[cap]                -- both lists are circular through it
  sen.lprev, sen.lnext, sen.aprev, sen.anext = cap, cap, cap, cap
  sen.slot = -1
  return self
end

-- lookup3 hashword() over 10 words --------------------------------------------
-- over the int32_t[10] key in memory (each word is loaded where it is used,
-- which keeps the compiled trace's register pressure low)
local function hash_key(k)
  local a = tobit(0xdeadbeef + 40)
  local b, c = a, a
  a = tobit(a + k[0]); b = tobit(b + k[1]); c = tobit(c + k[2])
  -- mix
  a = bxor(tobit(a - c), rol(c, 4));  c = tobit(c + b)
  b = bxor(tobit(b - a), rol(a, 6));  a = tobit(a + c)
  c = bxor(tobit(c - b), rol(b, 8));  b = tobit(b + a)
  a = bxor(tobit(a - c), rol(c, 16)); c = tobit(c + b)
  b = bxor(tobit(b - a), rol(a, 19)); a = tobit(a + c)
  c = bxor(tobit(c - b), rol(b, 4));  b = tobit(b + a)
  a = tobit(a + k[3]); b = tobit(b + k[4]); c = tobit(c + k[5])
  a = bxor(tobit(a - c), rol(c, 4));  c = tobit(c + b)
  b = bxor(tobit(b - a), rol(a, 6));  a = tobit(a + c)
  c = bxor(tobit(c - b), rol(b, 8));  b = tobit(b + a)
  a = bxor(tobit(a - c), rol(c, 16)); c = tobit(c + b)
  b = bxor(tobit(b - a), rol(a, 19)); a = tobit(a + c)
  c = bxor(tobit(c - b), rol(b, 4));  b = tobit(b + a)
  a = tobit(a + k[6]); b = tobit(b + k[7]); c = tobit(c + k[8])
  a = bxor(tobit(a - c), rol(c, 4));  c = tobit(c + b)
  b = bxor(tobit(b - a), rol(a, 6));  a = tobit(a + c)
  c = bxor(tobit(c - b), rol(b, 8));  b = tobit(b + a)
  a = bxor(tobit(a - c), rol(c, 16)); c = tobit(c + b)
  b = bxor(tobit(b - a), rol(a, 19)); a = tobit(a + c)
  c = bxor(tobit(c - b), rol(b, 4));  b = tobit(b + a)
  a = tobit(a + k[9])
  -- final
  c = tobit(bxor(c, b) - rol(b, 14))
  a = tobit(bxor(a, c) - rol(c, 11))
  b = tobit(bxor(b, a) - rol(a, 25))
  c = tobit(bxor(c, b) - rol(b, 16))
  a = tobit(bxor(a, c) - rol(c, 4))
  b = tobit(bxor(b, a) - rol(a, 14))
  c = tobit(bxor(c, b) - rol(b, 24))
  return c
end
M._hash_key = hash_key

-- list helpers ------------------------------------------------------------------
-- Both lists are circular and doubly linked through the sentinel record
-- flows[capacity], so linking and unlinking have no branch.
local function lru_unlink(flows, e)
  local p, n = e.lprev, e.lnext
  flows[p].lnext = n
  flows[n].lprev = p
end

local function lru_append(flows, e, i, sen)
  local s = flows[sen]
  local t = s.lprev
  e.lprev = t
  e.lnext = sen
  flows[t].lnext = i
  s.lprev = i
end

local function age_unlink(flows, e)
  local p, n = e.aprev, e.anext
  flows[p].anext = n
  flows[n].aprev = p
end

local function age_append(flows, e, i, sen)
  local s = flows[sen]
  local t = s.aprev
  e.aprev = t
  e.anext = sen
  flows[t].anext = i
  s.aprev = i
end

-- packet path ---------------------------------------------------------------------
-- The per-packet code is written to be (nearly) branch-free, because every
-- data-dependent branch becomes a side trace in LuaJIT, and a fast path full of
-- side traces hits register-coalescing limits and falls back to the
-- interpreter.  The direction picks words by index (src and dst, sport and
-- dport are adjacent in lp_decoded), IPv4 masks the upper address words,
-- per-direction counters are arrays indexed by dir, the lists use a sentinel
-- and the TCP state flags are bit arithmetic.
local W_SPORT = ffi.offsetof("lp_decoded", "sport") / 4
local W_SRC = ffi.offsetof("lp_decoded", "src") / 4
assert(ffi.offsetof("lp_decoded", "dport") == 4 * W_SPORT + 4)
assert(ffi.offsetof("lp_decoded", "dst") == 4 * W_SRC + 16)
local bnot, rshift, bswap = bit.bnot, bit.rshift, bit.bswap
local max = math.max

-- direction when the ports are equal: src is A unless its address is
-- lower (bytewise = unsigned compare of the byte-swapped words); no loop, so
-- it stays inside the caller's trace
local function word_cmp(x, y)   -- -1, 0, 1 comparing network-order words
  x = bxor(bswap(x), 0x80000000)
  y = bxor(bswap(y), 0x80000000)
  if x == y then return 0 end
  return x > y and 1 or -1
end

local function tie_dir(w, m6)
  local c = word_cmp(w[W_SRC], w[W_SRC + 4])
  if c == 0 then c = word_cmp(band(w[W_SRC + 1], m6), band(w[W_SRC + 5], m6)) end
  if c == 0 then c = word_cmp(band(w[W_SRC + 2], m6), band(w[W_SRC + 6], m6)) end
  if c == 0 then c = word_cmp(band(w[W_SRC + 3], m6), band(w[W_SRC + 7], m6)) end
  return c < 0 and 1 or 0
end

local function key_eq(k, kb)
  return k[0] == kb[0] and k[4] == kb[4] and k[8] == kb[8] and k[9] == kb[9] and k[1] == kb[1]
     and k[2] == kb[2] and k[3] == kb[3] and k[5] == kb[5] and k[6] == kb[6] and k[7] == kb[7]
end

-- the rest of a long probe chain (rare at load <= 0.5: the first three
-- probes are unrolled in update).  Returns the slot and its entry (-1: empty).
local function probe_more(self, kb, h, j)
  local mask, slot_idx, slot_hash, flows = self.mask, self.slot_idx, self.slot_hash, self.flows
  while true do
    j = band(j + 1, mask)
    local x = slot_idx[j]
    if x < 0 or (slot_hash[j] == h and key_eq(flows[x].key, kb)) then return j, x end
  end
end

local function new_flow(self, kb, h, j, ts)
  local idx
  if self.free_top > 0 then
    local t = self.free_top - 1
    self.free_top = t
    idx = self.free_stack[t]
  elseif self.hw < self.capacity then
    idx = self.hw
    self.hw = idx + 1
  else
    self.full_drops = self.full_drops + 1
    return -2
  end
  local flows = self.flows
  local e = flows[idx]
  ffi.fill(e, ffi.sizeof("lp_flow"))
  local k = e.key
  for i = 0, 9 do k[i] = kb[i] end
  e.porta, e.portz = rshift(kb[8], 16), band(kb[8], 0xffff)
  e.ipver, e.proto = rshift(kb[9], 8), band(kb[9], 0xff)
  e.hash = h
  e.slot = j
  e.state = S.INIT
  self.slot_idx[j] = idx
  self.slot_hash[j] = h
  local created = self.created + 1
  self.created = created
  e.id = created
  e.first_ts = ts
  e.last_ts = ts
  self.live = self.live + 1
  local sen = self.capacity
  lru_append(flows, e, idx, sen)
  age_append(flows, e, idx, sen)
  return idx
end

function FT:update(d, ts, wirelen)
  local v = d.ip_version
  if v == 0 then return -1, 0, false end
  local w = cast(ci32_ptr, d)
  local sp, dp = w[W_SPORT], w[W_SPORT + 1]
  -- dir 0: src is A (the higher port; same rule as decode.flowkey)
  local m6 = -band(rshift(v, 1), 1)          -- -1 for IPv6, 0 for IPv4
  local dir
  if sp ~= dp then
    dir = band(rshift(sp - dp, 31), 1)
  else
    dir = tie_dir(w, m6)
  end
  -- normalised key into the scratch words
  local kb = self.kbuf
  local ao = W_SRC + 4 * dir
  local zo = W_SRC + 4 - 4 * dir
  kb[0] = w[ao]
  kb[1] = band(w[ao + 1], m6)
  kb[2] = band(w[ao + 2], m6)
  kb[3] = band(w[ao + 3], m6)
  kb[4] = w[zo]
  kb[5] = band(w[zo + 1], m6)
  kb[6] = band(w[zo + 2], m6)
  kb[7] = band(w[zo + 3], m6)
  kb[8] = bor(lshift(w[W_SPORT + dir], 16), w[W_SPORT + 1 - dir])
  kb[9] = bor(lshift(v, 8), d.ipproto)
  kb = self.kread
  local h = hash_key(kb)
  local mask = self.mask
  local slot_idx, slot_hash, flows = self.slot_idx, self.slot_hash, self.flows
  local j = band(h, mask)
  -- linear probing, first three probes unrolled (no loop on the common path)
  local x = slot_idx[j]
  if x >= 0 and not (slot_hash[j] == h and key_eq(flows[x].key, kb)) then
    j = band(j + 1, mask)
    x = slot_idx[j]
    if x >= 0 and not (slot_hash[j] == h and key_eq(flows[x].key, kb)) then
      j = band(j + 1, mask)
      x = slot_idx[j]
      if x >= 0 and not (slot_hash[j] == h and key_eq(flows[x].key, kb)) then
        j, x = probe_more(self, kb, h, j)
      end
    end
  end
  local idx = x
  local is_new = false
  local e
  if idx >= 0 then
    e = flows[idx]
    e.last_ts = max(e.last_ts, ts)
    -- move to the LRU tail (also correct when it already is the tail)
    lru_unlink(flows, e)
    lru_append(flows, e, idx, self.capacity)
  else
    -- new flow: j is the empty slot that ended the probe chain
    idx = new_flow(self, kb, h, j, ts)
    if idx < 0 then return idx, dir, false end
    is_new = true
    e = flows[idx]
  end
  e.packets[dir] = e.packets[dir] + 1
  e.bytes[dir] = e.bytes[dir] + (wirelen or d.caplen)
  e.payload[dir] = e.payload[dir] + d.payload_length
  -- TCP (decode leaves tcp_flags 0 for everything else, so no proto test)
  local fl = d.tcp_flags
  e.tcp_flags_seen[dir] = bor(e.tcp_flags_seen[dir], fl)
  local st = e.state
  local syn = band(rshift(fl, 1), 1)
  local ack = band(rshift(fl, 4), 1)
  local srv = lshift(0x10, dir)              -- this packet's end as server bit
  local synack = band(syn, ack)
  -- first ACK (no SYN) from the client end once the SYN-ACK was seen
  local ack3 = band(ack, bnot(syn), rshift(st, 2), bnot(rshift(st, 3)),
                    bnot(rshift(band(st, srv), 4 + dir)), 1)
  st = bor(st,
           lshift(band(syn, bnot(ack)), 1),            -- SEEN_SYN 0x02
           band(-synack, bor(0x04, srv)),              -- SEEN_SYN_ACK 0x04 + A/Z_END_SERVER
           lshift(ack3, 3),                            -- SEEN_SYN_ACK_ACK 0x08
           lshift(band(fl, 0x01), 6),                  -- SEEN_FIN 0x40
           lshift(band(fl, 0x04), 5))                  -- SEEN_RST 0x80
  e.state = st
  return idx, dir, is_new
end

-- deletion -------------------------------------------------------------------------
local function free_flow(self, idx)
  local flows = self.flows
  local e = flows[idx]
  local i = e.slot
  if i < 0 then return false end
  local mask = self.mask
  local slot_idx, slot_hash = self.slot_idx, self.slot_hash
  -- backward-shift deletion
  local j = i
  while true do
    j = band(j + 1, mask)
    local x = slot_idx[j]
    if x < 0 then break end
    local k = band(slot_hash[j], mask)      -- home slot of the entry at j
    -- the entry at j may move to the hole i unless its home lies cyclically in (i, j]
    local stay
    if i <= j then
      stay = i < k and k <= j
    else
      stay = i < k or k <= j
    end
    if not stay then
      slot_idx[i] = x
      slot_hash[i] = slot_hash[j]
      flows[x].slot = i
      i = j
    end
  end
  slot_idx[i] = -1
  lru_unlink(flows, e)
  age_unlink(flows, e)
  e.slot = -1
  e.lprev, e.lnext, e.aprev, e.anext = -1, -1, -1, -1
  local t = self.free_top
  self.free_stack[t] = idx
  self.free_top = t + 1
  self.live = self.live - 1
  return true
end

function FT:is_live(idx)
  return idx >= 0 and idx < self.hw and self.flows[idx].slot >= 0
end

--- Explicit end of a flow (the caller saw FIN/RST...): sets TERMINATED and
--- frees the record without any callback.  Returns false if idx is not live.
function FT:terminate(idx)
  if not self:is_live(idx) then return false end
  local e = self.flows[idx]
  e.state = bor(e.state, TERMINATED)
  free_flow(self, idx)
  self.terminated = self.terminated + 1
  return true
end

--- Report and free flows idle for more than idle_timeout, then flows older
--- than active_timeout; fn(idx, flowtable.IDLE | flowtable.ACTIVE) is called
--- before each is freed (fn may be nil).  At most `max` flows per call.
--- Returns the number of flows expired.
function FT:expire(now, fn, max)
  max = max or math.huge
  local flows = self.flows
  local n = 0
  local idle, active = self.idle_timeout, self.active_timeout
  local sen = flows[self.capacity]
  while n < max do
    local i = sen.lnext
    if i == self.capacity then break end
    local e = flows[i]
    if not (now - e.last_ts > idle) then break end
    local id = e.id
    e.state = bor(e.state, TIMEDOUT)
    if fn then fn(i, IDLE) end
    if e.slot >= 0 and e.id == id then free_flow(self, i) end
    n = n + 1
    self.expired_idle = self.expired_idle + 1
  end
  while n < max do
    local i = sen.anext
    if i == self.capacity then break end
    local e = flows[i]
    if not (now - e.first_ts > active) then break end
    local id = e.id
    if fn then fn(i, ACTIVE) end
    if e.slot >= 0 and e.id == id then free_flow(self, i) end
    n = n + 1
    self.expired_active = self.expired_active + 1
  end
  self.expired = self.expired + n
  return n
end

--- fn(idx) for every live flow, least recently used first.  fn may
--- terminate(idx) the flow it is given.
function FT:each(fn)
  local flows = self.flows
  local sen = self.capacity
  local i = flows[sen].lnext
  while i ~= sen do
    local nxt = flows[i].lnext
    fn(i)
    i = nxt
  end
end

--- The lp_flow record of idx (a reference into the table: valid while the
--- table lives; its content belongs to another flow once idx is freed).
function FT:entry(idx)
  if idx < 0 or idx >= self.capacity then error("flowtable: bad flow index " .. tostring(idx), 2) end
  return self.flows[idx]
end

-- keys: rebuilt into a scratch lp_decoded (src = A, dst = Z) and formatted by
-- decode itself, so the strings are identical to decode.flowkey's.
local function to_scratch(self, idx)
  local e = self:entry(idx)
  local d = self._scratch
  d.ip_version = e.ipver
  d.ipproto = e.proto
  d.sport = e.porta
  d.dport = e.portz
  local sw, dw = ffi.cast(i32_ptr, d.src), ffi.cast(i32_ptr, d.dst)
  for k = 0, 3 do
    sw[k] = e.a[k]
    dw[k] = e.z[k]
  end
  return d
end

function FT:flowkey(idx)
  return decode.flowkey(to_scratch(self, idx))
end

function FT:flow_parts(idx)
  return decode.flow_parts(to_scratch(self, idx))
end

--- Counters as a plain table (tools / tests).
function FT:stats()
  return {
    live = self.live, created = self.created, expired = self.expired,
    expired_idle = self.expired_idle, expired_active = self.expired_active,
    terminated = self.terminated, full_drops = self.full_drops,
    capacity = self.capacity, size = self.size,
  }
end

return M
