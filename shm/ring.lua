--[[
luaprobe.shm.ring — single-producer / single-consumer ring of variable-length records
living in shared memory.  This is the only implementation of the ring
protocol: workers and the fast path use it from LuaJIT, Python uses it through
shm/ring.py (which loads this file into a small LuaJIT VM).

Layout of a ring (offsets from the ring base, all little-endian):

    0    magic  u64 "LPRNG"         8  capacity u64 (power of two, bytes)
    64   tail   u64  producer position (bytes ever published)      [producer line]
    72   pushed u64  records ever published
    128  head   u64  consumer position (bytes ever released)       [consumer line]
    136  popped u64  records ever released
    192  data bell   {sleepers u32, seq u32}  the consumer sleeps here
    256  space bell  {sleepers u32, seq u32}  the producer sleeps here
    264  want   u64  the head position a sleeping producer waits for (refill slack, below)
    320  ahead  u64  bytes of its input file the producer mapped while this ring was full
                     (statistic: engine/capture/capture.lua map_ahead; Ring:mapped_ahead)
    16   hint slots u64  0, or the number of prefetch hint slots (below)
    4096 data area, `capacity` bytes
    4096 + capacity  hints: `hint slots` u32 (only in a ring formatted with hints)

Prefetch hints (the packet ring, issue 10).  The consumer finds each record
from the previous one's header, so with records of a few hundred bytes that
left its caches since the producer wrote them, each record's first load is a
cache miss that waits for the one before it: one memory latency per record,
in series.  A ring formatted with hints has a u32 array after the data area;
reserve() writes the index of record k's header into slot k % slots (k =
records ever pushed), and the consumer reads the slots of the records it is
about to pop to touch their headers all at once, so the misses overlap
(Ring:hint_at).  A hint is only ever used as an address to load from inside
the data area (masked): a stale or torn slot costs a wasted load, never a
wrong record, so the hints need no ordering of their own.  slots = capacity
/ 64: the hints of the next records stay unwritten-over while the ring holds
fewer than that many records (average record >= 64 bytes when full).

A record is an 8-byte header {len u32, flags u32} followed by len bytes,
padded to 8.  A record never wraps: if it does not fit before the end of the
data area, a PAD header (flags = 1) fills the rest and the record starts at
offset 0.  A record therefore needs at most capacity/2 bytes: MAX_RECORD.

Refill slack (issue 10).  A producer faster than its consumer (a capture
file read into the packet ring) finds the ring full again right after every
release, and sleeping until its next record fits meant one futex wake per
consumer batch.  Ring:wait_space(n, timeout, slack) stores at `want` the
head position at which the record fits with `slack` more bytes free (want =
tail + footprint - cap + slack, slack cut to cap - footprint so that want <=
tail: an emptied ring always satisfies it), then arms the space bell; the
consumer's release (lp_release in _lpsync.c) wakes it only once head >= want,
and claims the wake (want := UINT64_MAX), so one sleep costs at most one
wake.  Each wake therefore follows at least `slack` released bytes: wakes <=
bytes released / slack + 1 per run.  The seq word of the space bell counts
the wakes (Ring:space_wakes).  slack 0 is the plain protocol (woken once the
record fits); live capture does not wait for space at all (afpacket.lua
drops), and only the file / stream / generator producers pass a slack.

Memory ordering (the argument):
  * Only the producer writes `tail` and the record bytes beyond it; only the
    consumer writes `head`.  Positions grow monotonically; index = pos % cap,
    computed as band(pos, cap - 1) (index() below): cap is a power of two up
    to 2^32, and LuaJIT's bit operations take a number modulo 2^32 exactly
    below 2^51 (BitOp semantics), so this holds for the first 2 PiB through a
    ring.  (A float `%` is a division and a floor on the per-record path.)
  * The producer writes record bytes with plain stores, then publishes `tail`
    with a store-release (lp_publish, seq_cst).  The consumer reads `tail`
    with a load-acquire (lp_load) before reading record bytes: everything
    written before the release is visible after the acquire.
  * Symmetrically the consumer releases `head` after it has finished reading
    a record, and the producer acquire-loads `head` before overwriting space.
  * Each side caches the other side's position and reloads it only when the
    cache says "empty" / "full", so a busy pair touches the other cache line
    once per batch, and never makes a syscall.
  * The loads and stores of positions are calls into _lpsync (C, __atomic
    builtins).  A C call is opaque to LuaJIT, so the JIT can neither hoist a
    position load out of a polling loop (a plain ffi load would be hoisted and
    a polling consumer would never see new records) nor sink record writes
    below the publishing store.
  * Sleeping uses the doorbell protocol documented in _lpsync.c (seq_cst
    arm / re-check / futex wait versus seq_cst publish / check sleepers),
    which cannot lose a wakeup.
]]

local ffi = require("ffi")
local config = require("luaprobe.config")

ffi.cdef[[
double lp_load(const uint64_t *p);
double lp_load_sc(const uint64_t *p);
void lp_store(uint64_t *p, double v);
uint32_t lp_load32(const uint32_t *p);
void lp_store32(uint32_t *p, uint32_t v);
void lp_store_d(double *p, double v);
void lp_fence(void);
void lp_store_sc(uint64_t *p, double v);
int lp_release(uint64_t *pos, double v, uint32_t *bell, uint64_t *want);
double lp_now_ns(void);
int lp_publish(uint64_t *pos, double v, uint32_t *bell);
void lp_bell_ring(uint32_t *bell);
uint32_t lp_bell_arm(uint32_t *bell);
void lp_bell_disarm(uint32_t *bell);
int lp_bell_sleep(uint32_t *bell, uint32_t seq, double timeout_ns);
typedef struct { uint32_t len; uint32_t flags; } lp_rec_hdr;
]]

local C = ffi.load(config.lpsync)
local cast, copy, fstring = ffi.cast, ffi.copy, ffi.string
local band, bxor = require("bit").band, require("bit").bxor
local u8p, u32p, u64p = ffi.typeof("uint8_t *"), ffi.typeof("uint32_t *"), ffi.typeof("uint64_t *")
local hdrp = ffi.typeof("lp_rec_hdr *")
if not pcall(ffi.typeof, "lp_ring_cur") then
  ffi.cdef "typedef struct { uint8_t *q, *data, *data_end; } lp_ring_cur;"
end
local ring_cur = ffi.typeof("lp_ring_cur")     -- the batch pop's cursor (pop_cursor)

local M = {
  HEADER = 4096,            -- bytes before the data area
  TAIL = 64,                -- byte offsets in the header of the producer's published position (u64) ...
  HEAD = 128,               -- ... and of the consumer's released one (workers/pool.py reads both)
  MAGIC = 0x4C50524E47,     -- "LPRNG", small enough to be exact in a double
  PAD = 1,
  SPIN = 200,               -- polls before a waiter arms the doorbell
  lib = C,
}

local Ring = {}
Ring.__index = Ring

local function align8(n) return band(n + 7, -8) end     -- n < 2^31 - 7 (a record is at most cap / 2)

--- pos % cap for a power-of-two cap <= 2^32 (mask = cap - 1): band gives a signed 32-bit result, negative only
--- when cap is 2^32 (mask -1 as an int32)
local function index(self, pos)
  local i = band(pos, self.mask)
  if i < 0 then i = i + 4294967296 end
  return i
end

--- Prefetch hint slots of a ring of `capacity` data bytes formatted with hints (module doc), 0 when the ring
--- cannot have them (capacity above 2^30: the consumer's masked index arithmetic is 32-bit).
function M.hint_slots(capacity)
  if capacity > 1073741824 then return 0 end
  return capacity / 64
end

--- Size in bytes of a ring segment region holding `capacity` data bytes (and its prefetch hints when `hints`).
function M.region_size(capacity, hints)
  return M.HEADER + capacity + (hints and 4 * M.hint_slots(capacity) or 0)
end

--- Format a fresh ring at address `addr` (a number or pointer); `hints`: with prefetch hints (module doc: the
--- region must be region_size(capacity, true) bytes).
function M.format(addr, capacity, hints)
  assert(capacity >= 64 and capacity % 2 == 0 and math.floor(math.log(capacity) / math.log(2) + 0.5)
         == math.log(capacity) / math.log(2), "ring capacity must be a power of two >= 64")
  local base = cast(u8p, addr)
  ffi.fill(base, M.HEADER, 0)
  local h = cast(u64p, base)
  h[0] = M.MAGIC
  h[1] = capacity
  h[2] = hints and M.hint_slots(capacity) or 0
  C.lp_fence()
  return M.attach(addr)
end

--- Attach to a formatted ring at `addr`.  Both sides call this; each side
--- uses only its own half of the methods (producer or consumer).
function M.attach(addr)
  local base = cast(u8p, addr)
  local h = cast(u64p, base)
  assert(tonumber(h[0]) == M.MAGIC, "not a luaprobe ring (bad magic)")
  local cap = tonumber(h[1])
  assert(cap >= 64 and cap <= 2^32 and (cap == 2^32 or band(cap, cap - 1) == 0),
         "ring capacity is not a power of two in 64 .. 2^32")
  local self = setmetatable({
    base = base,
    data = base + M.HEADER,
    cur = ring_cur(nil, base + M.HEADER, base + M.HEADER + cap),   -- the batch pop's cursor (pop_cursor)
    cap = cap,
    mask = cap - 1,                     -- index = band(pos, mask)
    max_record = cap / 2 - 8,
    tail_p = cast(u64p, base + M.TAIL),
    pushed_p = cast(u64p, base + 72),
    head_p = cast(u64p, base + M.HEAD),
    popped_p = cast(u64p, base + 136),
    data_bell = cast(u32p, base + 192),
    space_bell = cast(u32p, base + 256),
    want_p = cast(u64p, base + 264),
    ahead_p = cast(u64p, base + 320),
    hint = nil,                         -- prefetch hints (module doc): u32 per record, or nil
    hint_mask = 0,
  }, Ring)
  local slots = tonumber(h[2])
  if slots > 0 then
    assert(slots == M.hint_slots(cap), "ring hint slots do not match its capacity")
    self.hint, self.hint_mask = cast(u32p, self.data + cap), slots - 1
  end
  self:resync()
  return self
end

--- Re-read both positions from shared memory (after attach or a reset).
function Ring:resync()
  local head, tail = C.lp_load(self.head_p), C.lp_load(self.tail_p)
  self.tail_local, self.head_cache = tail, head
  self.head_local, self.tail_cache = head, tail
  self.pushed_local = C.lp_load(self.pushed_p)
  self.popped_local = C.lp_load(self.popped_p)
end

--- Empty the ring.  Only safe when neither side is active (e.g. the peer died).
function Ring:reset()
  local tail = C.lp_load(self.tail_p)
  C.lp_store(self.head_p, tail)
  C.lp_store(self.popped_p, C.lp_load(self.pushed_p))
  self:resync()
end

-- ---------------------------------------------------------------- producer

--- Reserve room for a record of `n` payload bytes.  Returns a pointer to
--- write the payload to, or nil when the ring is full.  Nothing is visible to
--- the consumer until commit() and publish().
function Ring:reserve(n)
  -- (n > max_record is need > cap / 2; checked on n, before align8's 32-bit arithmetic)
  if n > self.max_record then error(("record of %d bytes exceeds the ring's limit of %d"):format(n, self.max_record), 2) end
  local need = 8 + align8(n)
  local pos = self.tail_local
  local idx = index(self, pos)
  local contiguous = self.cap - idx
  local total = need > contiguous and contiguous + need or need
  if pos + total - self.head_cache > self.cap then
    self.head_cache = C.lp_load(self.head_p)
    if pos + total - self.head_cache > self.cap then return nil end
  end
  if need > contiguous then
    local pad = cast(hdrp, self.data + idx)
    pad.len = contiguous - 8
    pad.flags = M.PAD
    pos = pos + contiguous
    idx = 0
    self.tail_local = pos
  end
  local hdr = cast(hdrp, self.data + idx)
  hdr.len = n
  hdr.flags = 0
  self.pending_need = need
  local hint = self.hint
  if hint ~= nil then hint[band(self.pushed_local, self.hint_mask)] = idx end
  return self.data + idx + 8
end

--- Make the record reserved last part of the next publish().
function Ring:commit()
  self.tail_local = self.tail_local + self.pending_need
  self.pushed_local = self.pushed_local + 1
end

--- Drop the records committed since the producer stood at `tail` with `pushed` records (a position reserve() started
--- from, at or after the last publish(): the consumer never saw them), and the PAD a reserve() may have put before
--- them.  The capture process takes back the records it read from a capture file cut under it (capture.lua settle).
--- Their prefetch hints stay stale (only ever an address to load from, module doc).
function Ring:rewind(tail, pushed)
  assert(tail >= C.lp_load(self.tail_p) and tail <= self.tail_local, "rewind past the published tail")
  self.tail_local, self.pushed_local = tail, pushed
end

--- Make every committed record visible and wake a sleeping consumer.
function Ring:publish()
  self.pushed_p[0] = self.pushed_local  -- statistic; ordered by the release below
  C.lp_publish(self.tail_p, self.tail_local, self.data_bell)
end

--- Make every committed record visible without the doorbell check: a cheap
--- release store.  A consumer that went to sleep meanwhile is woken by the next
--- publish(), which the producer must still call (e.g. once per batch).
function Ring:expose()
  self.pushed_p[0] = self.pushed_local
  C.lp_store(self.tail_p, self.tail_local)
end

--- Copy `n` bytes from `src` (string or pointer) as one record, committed but
--- not yet published.  Returns false when the ring is full.
function Ring:put(src, n)
  n = n or #src
  local p = self:reserve(n)
  if p == nil then return false end
  copy(p, src, n)
  self:commit()
  return true
end

--- try_push: put one record and publish it.  Returns true or false (full).
function Ring:try_push(src, n)
  if not self:put(src, n) then return false end
  self:publish()
  return true
end

--- Push records from the array `list` (strings) until full; publish once.
--- Returns how many were pushed.
function Ring:try_push_batch(list, first, last)
  first, last = first or 1, last or #list
  local i = first
  while i <= last and self:put(list[i]) do i = i + 1 end
  if i > first then self:publish() end
  return i - first
end

--- Free bytes for the producer (from its cached view, refreshed).
function Ring:free_bytes()
  self.head_cache = C.lp_load(self.head_p)
  return self.cap - (self.tail_local - self.head_cache)
end

-- ---------------------------------------------------------------- consumer

--- Look at the next record without consuming it.  Returns (pointer, length)
--- or nil when the ring is empty.
function Ring:peek()
  local pos = self.head_local
  if pos == self.tail_cache then
    self.tail_cache = C.lp_load(self.tail_p)
    if pos == self.tail_cache then return nil end
  end
  local idx = index(self, pos)
  local hdr = cast(hdrp, self.data + idx)
  if hdr.flags == M.PAD then
    pos = pos + hdr.len + 8
    self.head_local = pos
    if pos == self.tail_cache then return nil end   -- cannot happen: pad is always followed by a record
    idx = 0
    hdr = cast(hdrp, self.data)
  end
  return self.data + idx + 8, hdr.len
end

--- Batch pop: peek / advance with the consumer's state in the caller's locals instead of the ring's fields, for a
--- loop that pops many records before it releases them (the fast path's Driver:fill).  With peek / advance each
--- record cost two loads and two stores of table fields (head_local, popped_local), which a compiled loop redoes
--- per record (a table store is not sunk out of a loop), and a reload of tail_cache; here the loop carries the bytes
--- it consumed, the next record's header is a pointer in an FFI cursor (lp_ring_cur), and the ring's fields are
--- written once per batch (pop_commit).  From one record to the next the old loop carried the position (bytes ever,
--- a double up to 2^53): double -> int (index) -> load of the length -> int -> double and two double adds, ~25
--- cycles of latency in series per record (issue 10: the fill loop ran at half the instructions per cycle of the
--- walk's decode); the pointer plus the aligned length is one load and a few integer operations.  The pointer is
--- kept in an FFI field, not in a Lua local: as a local it made vlan-mpls (most packets through a side trace that
--- returns to the loop) 8 ns a packet slower, likely because a cdata a compiled loop carries is boxed (allocated)
--- where a side trace hands it back; an index in a local stays a double (LuaJIT keeps loop-carried numbers as doubles).
--- The cursor's functions are the module's, not methods, and the cursor holds the data area's bounds: on a path
--- through a side trace the loop re-enters its trace at the top, and method lookups there (a hash lookup in the
--- ring and in its metatable per name) are paid again for each such packet (vlan-mpls: +2 ns a packet with methods).
--- Between pop_cursor() and pop_commit() only pop_more / rec_at / rec_next may read the ring's consumer side.
---   local cur, used, avail = r:pop_cursor()
---   if used == avail then avail = r:pop_more() end        -- still equal: nothing published beyond
---   local p, len, skip = M.rec_at(cur)                     -- the record; a PAD before it is skipped (skip bytes)
---   used = used + skip + M.rec_bytes(len); M.rec_next(cur, p, len); popped = popped + 1   -- consume it
---   r:pop_commit(used, avail, popped)
--- Returns the cursor (an lp_ring_cur: q the next record's header, data and data_end the data area's bounds), 0
--- bytes consumed and the bytes published beyond head_local as last seen (tail_cache - head_local: no load of the
--- shared tail).
function Ring:pop_cursor()
  local head, cur = self.head_local, self.cur
  cur.q = self.data + index(self, head)
  return cur, 0, self.tail_cache - head
end

--- The bytes published beyond head_local, reloaded from the producer's position (load-acquire, as peek does when
--- it reaches the position it last saw).
function Ring:pop_more()
  return C.lp_load(self.tail_p) - self.head_local
end

--- The record at cursor `cur` (pop_cursor's; only when bytes are published there): (record pointer, length, bytes
--- of a PAD record skipped before it or 0).  A pad always runs to the end of the data area and is followed by a
--- record at its start.
local PAD = M.PAD
function M.rec_at(cur)
  local q = cur.q
  local hdr = cast(hdrp, q)
  if hdr.flags == PAD then
    local data = cur.data
    return data + 8, cast(hdrp, data).len, hdr.len + 8
  end
  return q + 8, hdr.len, 0
end

--- Move cursor `cur` past the record at p (rec_at's) of `len` bytes: to the start of the data area when that
--- record ends it.
function M.rec_next(cur, p, len)
  local q = p + align8(len)
  if q == cur.data_end then q = cur.data end
  cur.q = q
end

--- Ring bytes of a record of `len` bytes (its 8-byte header, the record, padding to 8 bytes).
function M.rec_bytes(len)
  return 8 + align8(len)
end

--- End a batch pop: the bytes the cursor consumed (records and pads), the published bytes it last saw (pop_cursor's
--- or pop_more's) and the number of records it consumed become the ring's head_local / tail_cache / popped_local (as
--- `popped` calls of advance would have left them); visible to the producer at the next release().
function Ring:pop_commit(used, avail, popped)
  local head = self.head_local
  self.head_local, self.tail_cache = head + used, head + avail
  self.popped_local = self.popped_local + popped
end

--- The prefetch hint of the k-th record after the next one to pop (k = 0: the next): the index of its header in
--- the data area, masked into it, or -1 when the ring has no hints.  Only an address to touch (module doc): the
--- record may not be published yet, or the slot may be stale.
function Ring:hint_at(k)
  local hint = self.hint
  if hint == nil then return -1 end
  return band(hint[band(self.popped_local + k, self.hint_mask)], self.mask)
end

--- Touch the first bytes (header and the frame's first headers: 3 cache lines) of the next `k` records, or of as
--- many as are published, with independent loads so their cache misses overlap (prefetch hints, module doc).
--- Returns a value the caller keeps (so the loads are not dropped); nothing is read without hints.
function Ring:touch_ahead(k)
  local hint = self.hint
  if hint == nil then return 0 end
  local avail = C.lp_load(self.pushed_p) - self.popped_local
  if avail < k then k = avail end
  local data, mask, hmask, j0, t = self.data, self.mask, self.hint_mask, self.popped_local, 0
  for j = 0, k - 1 do
    local x = band(hint[band(j0 + j, hmask)], mask)
    t = bxor(t, data[x], data[band(x + 60, mask)], data[band(x + 120, mask)])
  end
  return t
end

--- Consume the record returned by the last peek (visible to the producer at
--- the next release()).
function Ring:advance(n)
  self.head_local = self.head_local + 8 + align8(n)
  self.popped_local = self.popped_local + 1
end

--- Hand consumed space back to the producer and wake it if it sleeps and the space it waits for (its record and
--- its refill slack, module doc) is free now.
function Ring:release()
  self.popped_p[0] = self.popped_local
  C.lp_release(self.head_p, self.head_local, self.space_bell, self.want_p)
end

--- try_pop: one record as a Lua string, or nil when empty.
function Ring:try_pop()
  local p, n = self:peek()
  if p == nil then return nil end
  local s = fstring(p, n)
  self:advance(n)
  self:release()
  return s
end

--- Pop up to `max` records as strings into a new array; release once.
function Ring:try_pop_batch(max)
  local out, k = {}, 0
  while k < max do
    local p, n = self:peek()
    if p == nil then break end
    k = k + 1
    out[k] = fstring(p, n)
    self:advance(n)
  end
  if k > 0 then self:release() end
  return out
end

--- Records published and not yet released (the consumer's fresh view).
function Ring:fill_records()
  return C.lp_load(self.pushed_p) - C.lp_load(self.popped_p)
end

--- Bytes published and not yet released.
function Ring:fill_bytes()
  return C.lp_load(self.tail_p) - C.lp_load(self.head_p)
end

-- ---------------------------------------------------------------- waiting

--- Consumer: wait until a record is available or `timeout_ns` passes.
--- Spins SPIN polls first (no syscall for a busy pair), then sleeps on the
--- data doorbell.  Returns true when a record is available.
function Ring:wait_data(timeout_ns, bell)
  for _ = 1, M.SPIN do
    if self:peek() ~= nil then return true end
  end
  bell = bell or self.data_bell
  local seq = C.lp_bell_arm(bell)
  if C.lp_load_sc(self.tail_p) ~= self.head_local then C.lp_bell_disarm(bell); return true end
  C.lp_bell_sleep(bell, seq, timeout_ns or 0)
  return self:peek() ~= nil
end

--- Bytes the next record of `n` payload bytes occupies (with a PAD if it must wrap).
function Ring:footprint(n)
  local need = 8 + align8(n)
  local contiguous = self.cap - index(self, self.tail_local)
  if need > contiguous then return contiguous + need end
  return need
end

--- Producer: wait until a record of `n` payload bytes fits or `timeout_ns` passes (0 or nil: no limit).  Once it
--- sleeps, it is woken only when `slack` bytes more than the record needs are free too (refill slack, module doc;
--- default 0), or at the timeout.  Returns true when the record fits.
function Ring:wait_space(n, timeout_ns, slack)
  local total = self:footprint(n)
  local function fits(load) return self.tail_local + total - load(self.head_p) <= self.cap end
  for _ = 1, M.SPIN do if fits(C.lp_load) then return true end end
  slack = math.min(slack or 0, self.cap - total)
  local want = self.tail_local + total - self.cap + slack       -- <= tail_local: an empty ring satisfies it
  C.lp_store_sc(self.want_p, want)                              -- before the arm (lp_release's argument)
  local seq = C.lp_bell_arm(self.space_bell)
  if C.lp_load_sc(self.head_p) >= want then C.lp_bell_disarm(self.space_bell); return true end
  C.lp_bell_sleep(self.space_bell, seq, timeout_ns or 0)
  return fits(C.lp_load)
end

--- Producer wakes so far: how many times a release woke a producer sleeping for space (plus lp_bell_ring calls on
--- the space bell): the space bell's sequence word, modulo 2^32.
function Ring:space_wakes()
  return C.lp_load32(self.space_bell + 1)
end

--- Bytes of its input file the producer mapped ahead while waiting for space in this ring (a statistic the capture
--- process stores, engine/capture/capture.lua map_ahead; 0 for every other producer).
function Ring:mapped_ahead()
  return tonumber(C.lp_load(self.ahead_p))
end

M.Ring = Ring
M.index = index                 -- (tests: index({ mask = cap - 1 }, pos) == pos % cap)
M.now_ns = function() return C.lp_now_ns() end
return M
