--[[
luaprobe.engine.fastpath.flowtable — bidirectional 5-tuple flow table (LuaJIT ffi).

Used by the fast path once per batch of decoded packets (update_batch).  The
packet path allocates no Lua table or string: the flow records, the hash
index and the two expiry lists live in zero-filled ffi arrays (anonymous
mappings from 2 MiB on, advised for transparent huge pages or against them by
`huge_pages`; pages are mapped only as flows arrive, 1 024 records at a time ahead
of the high-water mark: FT:prefault).  JIT note: the batch is processed in small loops
(lookup, insertion, counters, LRU moves) so that every trace and side trace
compiles whatever the traffic; see "packet path" below for why (issue 10).

    local flowtable = require "luaprobe.engine.fastpath.flowtable"
    local ft = flowtable.new{ capacity = 1<<20,       -- max live flows (power of two)
                              batch = 1025,           -- update_batch scratch (grows when a batch is larger)
                              idle_timeout = 120,     -- s of packet time
                              active_timeout = 1800,  -- s of packet time
                              touch_flows = 8192,     -- live flows from which update_batch touches first
                              huge_pages = true }     -- false: 4 KiB pages (MADV_NOHUGEPAGE; engine/fastpath/hugepages.py)
    local idx, dir, is_new = ft:update(d, ts, wirelen)
    ft:update_batch(b, n)  -- the same for n lp_pkt (packet.lua): sets flow, dir, flow_uid
    ft:flowkey(idx)        -- Trisul flow id, == decode.flowkey(d) of its packets
    ft:flow_parts(idx)     -- proto, ipa, porta, ipz, portz (key format)
    ft:put_key(idx, buf)   -- flowkey(idx) written into a byte buffer, returns its length
    ft:entry(idx)          -- the lp_flow (hot) record (fields below)
    ft:cold_entry(idx)     -- the lp_flow_cold record (fields below)
    ft:side_array(size)    -- zeroed items of `size` bytes per record, mapped ahead as the records (stage.lua's votes)
    ft:expire(now, fn[, max])   -- fn(idx, reason) per timed-out flow, then frees it
    ft:terminate(idx)      -- explicit end (caller saw FIN/RST...): frees, no callback
    ft:each(fn)            -- fn(idx) for every live flow, LRU list order (oldest second first)
    ft:is_live(idx)
    ft.live, ft.created, ft.expired, ft.expired_idle, ft.expired_active,
    ft.terminated, ft.full_drops, ft.capacity, ft.size (index slots), ft.resizes,
    ft.renewed (records started again by a new connection: "Port reuse"), ft.on_renew = fn(idx, reason)
    (reason nil: port reuse; flowtable.IDLE: "Idle expiry in the packet loop")

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
protocol.  IP fragments (d.frag 1) get no flow in update_batch: the fast
path reassembles them (ipreasm.lua) and the reassembled datagram (d.frag 2)
is counted in its 5-tuple's flow; update() alone would give a non-first
fragment the ports-0 key of decode.flowkey.  IPv4 addresses use bytes 0..3 only (bytes 4..15
are ignored).  VLAN ids are not part of the key.

Layout.
  flows[capacity]    lp_flow hot records (128 bytes, two cache lines, 64-byte
                     aligned from 2 MiB of records on): everything a packet
                     of a known flow reads or writes, TCP segments included
                     (key, state, LRU second, TCP sequence tracking; then
                     last_ts, id and the counters); idx indexes this array.
  cold[capacity + 17] lp_flow_cold records (64 bytes, cold[i] belongs to
                     flows[i]): first_ts, setup RTT and its SYN time,
                     retransmissions, the age links, the key's ports and
                     protocol.  Written at creation, read at expiry and
                     export; a TCP segment writes its flow's cold record only
                     when it changes it (a client SYN, the ACK completing the
                     handshake, a retransmission: tcp_rare),
                     else a late SYN time's store goes to a scratch record,
                     cold[capacity + 1 + idx % 16] (syn_time, no branch; 16
                     of them, so consecutive segments of different flows
                     rarely chain through one read-modify-write in memory).  So the per-packet working set is 128 bytes a
                     flow, not the 256 of the single record this split
                     replaced (issue 10).  Free records are handed out from a
                     stack, then from a high-water mark (so a fresh table
                     touches no record memory, and a never-used record needs
                     no clearing).
  slots[size]        open-addressing index of lp_slot {idx, hash}, linear
                     probing; idx = -1 is empty; hash keeps the 32-bit hash
                     so most collisions are rejected without touching the
                     record.  size starts at 1024 (or 2 * capacity if less)
                     and doubles (rehash) whenever the live flows would make
                     it more than a quarter full, up to 2 * capacity (so at
                     most half full at capacity; a lookup of a live flow
                     reads 1.17 slots on average at load 1/4, 1.5 at 1/2
                     (Knuth), and each further slot is a side trace of the
                     probe loop): the index
                     stays proportional to the live flows, so a few hundred
                     flows probe a cache-resident index.  When its largest
                     size is 2 MiB or more (capacity >= 131 072) it is one
                     mapping of that size grown in place (grow_in_place: only
                     the new half of a doubling is fresh memory, mapped ahead
                     by the prefault helper when one runs).  Full key comparison on a hash match.
                     Deletion is backward-shift (no tombstones): after
                     removing slot i, later entries of the cluster whose home
                     slot does not lie cyclically in (i, j] move back into the
                     hole, so every probe chain stays unbroken and lookups
                     never need a rehash.
  hash               the 10 normalised key words as five uint64 words, a
                     multiply-sum and a multiply-xorshift finaliser (hash_key;
                     64-bit cdata arithmetic, which LuaJIT compiles to imul),
                     low 32 bits.
  lru[capacity + 1]  lp_link {prev, next}: the LRU list's links, 8 bytes per
                     record in an array of their own (lru[i] belongs to
                     flows[i]), so unlinking a flow writes two entries of a
                     dense array (800 KB at 100 000 flows: cache-resident)
                     instead of two random 256-byte records (issue 10: the
                     neighbours' misses were ~20 ns/packet on flows-100k).
  LRU list           (lru[i].prev, lru[i].next): a flow goes to the tail when it is
                     created, and at its first packet of a later packet-time
                     second than the one it was last placed in (lsec) it moves
                     to that second's part of the list (lru_move), so
                     the list is ordered by the second of each flow's last
                     packet (the head's is the oldest); within one second:
                     the flows moved into it, then the flows created in it,
                     each in packet order, whatever the batches (a move went
                     to the tail too, and update_batch creates a batch's flows
                     before it moves known ones: the order, and with it the
                     order of the rows expiry and the end-of-input export
                     write, the flows table's ids, followed the batches).  Most packets of a
                     flow then touch no neighbour record (issue 10: moving
                     on every packet cost two cache misses per packet with
                     100 000 flows).
  age list           (cold[i].aprev, cold[i].anext): creation order, so the
                     head has the oldest first_ts.
  Both lists are circular, doubly linked through a sentinel, cold[capacity]
  and lru[capacity], so linking/unlinking is branch-free and terminate() is O(1).
  Probing: one loop, bounded because load <= 0.5 leaves an empty slot at the
  end of every chain.

Expiry.  expire(now, fn, max) walks the LRU list from the head: a flow with
now - last_ts > idle_timeout is expired (state |= TIMEDOUT, fn(idx,
flowtable.IDLE)); one that is not but has now - lsec > idle_timeout (its last
packet lies in the boundary second, after now - idle_timeout) is stepped
over; the walk stops at the first flow with now - lsec <= idle_timeout (no
later flow can be idle: lsec only grows along the list and lsec <= last_ts).
Then it pops the age head while now - first_ts > active_timeout (fn(idx,
flowtable.ACTIVE)).  So each call expires exactly the flows idle at `now`,
whatever `now` and the timeouts (fractions included); the driver calls it at
each new whole second, where nothing is stepped over.  Cost is O(1) per
expired flow plus O(1) per call (plus the flows of the boundary second when
now - idle_timeout is not whole), whatever the table size; `max` (default
unlimited) bounds the flows freed in one call, the rest go on the next call,
in list order.  The idle flows go EXPIRE_CHUNK (512) at a time: the walk collects them, a loop of loads touches their
records and index slots (hashing their keys), fn is called for each (once it returns, the flow counts as freed:
is_live false, ft.live one less, terminate() of it returns false), then they leave the index and both lists; so fn
may read and terminate any flow, but must not add packets to the table (its lists and index drop a chunk's flows
after the chunk's fns).  Packet time is assumed monotone-ish: a packet earlier than
its flow's second moves nothing (last_ts never decreases), and a flow placed
behind a later one (a flow created by a late packet, or restarted by one: a
restart steps back over this batch's appended records only) can only expire
late, never early.

Idle expiry in the packet loop.  expire() runs between batches, at whole packet-time seconds, so on its
own a flow could take a packet after a silence of up to idle_timeout + 1 s (and, with other call times,
rows would depend on the batching).  So update / update_batch (loop 3, before the port-reuse check and the
counters) also end a flow at its next packet when ts - last_ts > idle_timeout: the record goes to
on_renew(idx, flowtable.IDLE) (the driver exports it as a row of its own, state TIMEOUT, flag TIMEDOUT, as
if expire() had freed it) and starts again in place for this packet like a reused port's (counters, state,
TCP tracking, stage_off from zero, first_ts = ts, moved in the age list), but with a new id (ft.created + 1,
as new_flow; in update_batch after the ids of the batch's new flows, which its insertion loop numbers first: flow_uid changes, so FlowIDs, the reassembly stage and handler votes see a new flow) and
counted in ft.expired / ft.expired_idle, not ft.renewed; is_new stays false (same idx and index slot).  One
compare per packet, on last_ts, which account() loads anyway.  So every row is a maximal run of its
5-tuple's packets without a gap > idle_timeout, whatever the batch size, the shards or the expire() calls.

Active timeout decision.  Trisul flushes long-running flows periodically.
Here a flow older than active_timeout is reported through fn(idx, ACTIVE)
with its counters so far and then freed, exactly like an idle flow but
without the TIMEDOUT flag; the next packet of the same 5-tuple creates a new
flow record (is_new = true, new id, counters from zero, state INIT).  So
every record the caller reports covers at most active_timeout seconds, each
byte is reported once, and a caller keeping per-flow state initialises it
on is_new in both cases.  fn is called before the record is freed, so it can
read entry(idx), flowkey(idx)...; fn may call terminate(idx) itself.

Port reuse.  A TCP SYN without ACK on a flow whose direction already carried a segment starts a new
connection on the same 5-tuple when its sequence number is not the connection's own ISN, whether or not
the old one closed: RFC 9293 §3.10.7.4; tshark 4.0 starts a new tcp.stream there ("TCP Port numbers
reused": a SYN whose sequence number differs from the stream's first; a SYN retried with the same one,
after a RST, or late, after data, as merged or mirrored captures show it, stays in the stream, "suspected
retransmission").  The ISN is the sequence number of the direction's latest SYN without ACK before the
handshake completed (cold syn_seq / syn_dir, stored with its time).  A direction picked up mid-stream has
none: there a SYN is the connection's own when it lies at most the direction's payload bytes + 2 (its SYN
and FIN) behind the direction's highest sequence end (a reordered SYN of a merged capture); a new
connection's random ISN falls there with a chance of (payload + 2) / 2^32.  The old record is handed to on_renew(idx) (when set: the driver exports it as a
row of its own), then the record starts again in place for this packet: same key, index slot and id
(reassembly, keyed by id, finds the new connection itself from the SYN), counters, state and TCP
tracking from zero, first_ts = the SYN's time (moved to its place in the age list); ft.renewed counts
it (ft.created counts new_flow's records, whose ids it numbers).  update_batch checks each SYN-without-ACK
packet in loop 3, in packet order, before its counters.

lp_flow fields (hot; counters are doubles: exact up to 2^53, no boxed uint64):
  id                   unique increasing number per flow record (1, 2, ...)
  last_ts              packet time of the latest packet
  packets_az, packets_za, bytes_az, bytes_za    per direction, bytes = wirelen
  payload_az, payload_za                        L4 payload bytes (d.payload_length)
  tcp_flags_seen[2]    OR of the TCP flags, [0] A->Z, [1] Z->A
  state                Flow state flags: INIT 0x1 (every record), SEEN_SYN 0x2 (SYN
                       without ACK), SEEN_SYN_ACK 0x4, SEEN_SYN_ACK_ACK 0x8 (an
                       ACK without SYN, after the SYN-ACK, from the end that did
                       not send it),
                       A_END_SERVER 0x10 / Z_END_SERVER 0x20 (which end sent
                       the SYN-ACK), SEEN_FIN 0x40, SEEN_RST 0x80, TIMEDOUT
                       0x100 (idle expiry), TERMINATED 0x800 (terminate())
  tcp_next[2], tcp_dirs   working state of the retransmission count (cold)
  a[4], z[4], ports, vproto   the key (addresses as int32 words holding the network-order bytes;
                       ports = porta << 16 | portz, vproto = ipver << 8 | proto)
  live                 1 while the record holds a flow, 0 when it is free (or never used).  The record
                       does not know its index slot nor keep its hash: free_flow hashes its key again
                       and probes from there, so an index doubling writes no record (issue 10: one cache
                       miss per live flow each)
  stage_off            written by the shared TCP reassembly only (engine/streams/stage.lua): 1 once no
                       handler and no filex_monitor wants the flow, for good; 0 in every new record and
                       when a new connection renews the record (port reuse)
  lsec                 packet-time second that last placed the flow in the LRU list
lp_flow_cold fields:
  first_ts             packet time of the first packet
  rtt                  TCP setup RTT in µs (latest client SYN -> the ACK completing
                       the handshake), -1 until measured; syn_sec, syn_nsec: that SYN's time;
                       syn_seq, syn_dir: its sequence number and direction + 1 (0: no SYN seen)
  retrans_az, retrans_za   TCP segments occupying sequence space that do not start
                       at or after the highest sequence end seen in that direction
                       (keep-alives excepted): docs/plugins.md "Setup RTT and
                       retransmissions"
  ipver, proto, porta, portz   the key's (as in the hot record's ports, vproto)
  aprev, anext         age list links
--]]
local ffi = require "ffi"
local bit = require "bit"
local decode = require "luaprobe.engine.fastpath.decode"

local band, bor, bxor, rol, tobit, lshift, arshift = bit.band, bit.bor, bit.bxor, bit.rol, bit.tobit, bit.lshift,
  bit.arshift
local cast = ffi.cast

if not pcall(ffi.typeof, "lp_flow") then
  ffi.cdef [[
typedef struct {
  /* the hot record (128 bytes, two cache lines, 64-byte aligned): all that a packet of a known flow reads or
     writes.  Line 1: the key the probe compares, state, LRU second, TCP sequence tracking; line 2: counters */
  union {
    int32_t key[10];
    struct {
      int32_t a[4];
      int32_t z[4];
      int32_t ports;
      int32_t vproto;
    };
  };
  uint32_t state;
  uint32_t lsec;                     /* packet-time second that put the flow where it is in the LRU list */
  int32_t tcp_next[2];               /* highest sequence end seen per direction (int32, mod 2^32) */
  int32_t tcp_dirs;                  /* bit dir set once a TCP segment was seen in that direction */
  uint8_t tcp_flags_seen[2];
  uint8_t live;                      /* 1: holds a flow; 0: free */
  uint8_t stage_off;                 /* 1: no reassembly for this record (engine/streams/stage.lua sets it) */
  double last_ts;
  double id;
  union { double packets[2]; struct { double packets_az, packets_za; }; };
  union { double bytes[2];   struct { double bytes_az, bytes_za; }; };
  union { double payload[2]; struct { double payload_az, payload_za; }; };
} lp_flow;
typedef struct {
  /* the cold record (64 bytes, one cache line, cold[i] belongs to flows[i]): written at creation, read at
     expiry and export; a TCP segment writes it only when it changes it (a client SYN, the ACK completing the
     handshake, a retransmission: tcp_rare; the SYN time only for a SYN without ACK: syn_time, else
     that store goes to a scratch record) */
  double first_ts;
  double rtt;                        /* setup RTT in µs, -1 until measured */
  union { double retrans[2]; struct { double retrans_az, retrans_za; }; };
  double syn_sec;                    /* time of the latest SYN (no ACK) before the handshake completed: s, */
  int32_t syn_nsec;                  /*   ns */
  int32_t syn_seq;                   /* that SYN's sequence number (the direction's ISN: port reuse) */
  int32_t aprev, anext;              /* age list (creation order) */
  uint16_t porta, portz;             /* the key's ports and protocol, as in key words ports / vproto */
  uint8_t ipver, proto;
  uint8_t syn_dir;                   /* that SYN's direction + 1; 0: none */
  uint8_t pad_;
} lp_flow_cold;
]]
end
if not pcall(ffi.typeof, "lp_slot") then
  ffi.cdef [[
typedef struct { int32_t idx, hash; } lp_slot;              /* one index slot: flow, its hash */
typedef struct { int32_t key[10]; int32_t hash, dir; } lp_fkey;   /* a packet's normalised key */
typedef struct { int32_t prev, next; } lp_link;            /* LRU list links of one record */
]]
end
pcall(ffi.cdef, "typedef struct { int32_t cut; double sec; } lp_lrucut;")   -- the LRU list's cut (lru_move)
pcall(ffi.cdef, [[
void *calloc(size_t nmemb, size_t size);
void free(void *ptr);
]])
pcall(ffi.cdef, "void *mmap(void *addr, size_t len, int prot, int flags, int fd, long off);")
pcall(ffi.cdef, "int munmap(void *addr, size_t len);")
pcall(ffi.cdef, "int madvise(void *addr, size_t len, int advice);")
assert(ffi.sizeof("lp_flow") == 128 and ffi.offsetof("lp_flow", "last_ts") == 64 and ffi.sizeof("lp_flow_cold") == 64)

local flow_ptr = ffi.typeof("lp_flow *")
local cold_ptr = ffi.typeof("lp_flow_cold *")
local link_ptr = ffi.typeof("lp_link *")
local slot_ptr = ffi.typeof("lp_slot *")
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
local TCP = decode.PROTO.TCP
local MIN_SLOTS = 1024   -- smallest index (slots); it doubles as flows arrive
local SLOTS_PER_FLOW = 4  -- index slots per live flow (load <= 1/4) until the index reaches 2 * capacity
local FLOW_SIZE = ffi.sizeof("lp_flow")
local FLOW_WORDS, COLD_WORDS = FLOW_SIZE / 4, ffi.sizeof("lp_flow_cold") / 4   -- records as int32 words
local SLOT_SIZE = 8       -- lp_slot (defined below)
local COLD_SIZE = ffi.sizeof("lp_flow_cold")
local SCRATCH = 16        -- scratch cold records (syn_time), cold[capacity + 1 + idx % 16] for flow idx
local EXPIRE_CHUNK = 512 -- idle flows expire() collects, then touches, reports and frees at a time (96 KiB of records)
local primed, prime_known_runs = false, nil   -- loop 3's first trace, once per VM (update_batch)
local sample_ip, sample_tcp = 0, 0              -- the VM's first SAMPLE_IP IP packets, and their TCP segments
local TOUCH_FLOWS = 8192  -- live flows (2 MiB of records) from which update_batch touches before it works

local FT = {}
FT.__index = FT

local HUGE = 2097152           -- bytes in a transparent huge page (x86-64, arm64 with 4 KiB pages)
local MADV_HUGEPAGE, MADV_NOHUGEPAGE, MADV_POPULATE_WRITE = 14, 15, 23
local PAGE = 4096              -- base page: the rounding of populate()'s start address
local PREFAULT = 1024          -- records whose pages prefault() maps at once ahead of the high-water mark
local AHEAD = 16384            -- with a prefault helper: records requested ahead of the high-water mark (3.2 MB)
local PREFAULT_ABI = 2         -- the lp_prefaulter layout of the cdef in start_prefaulter (shm/_lpsync.c lp_prefault_abi)

--- Map the pages of bytes [from, to) of the array at p writable now, in one madvise(MADV_POPULATE_WRITE)
--- call (Linux 5.14+) instead of one page fault per 4 KiB page at the first write.  On the benchmark VM a fresh
--- page costs ~1.6 µs faulted and ~1.45 µs populated (tools/bench/thp_touch.py --sides small,populate: the
--- host's side of a page the balloon reported free and the zeroing stay; the guest's trap in and out goes):
--- dns, whose 60 000 flows' records are all fresh memory, 4-8 ns/packet less in update_batch
--- (docs/benchmarks.md, "The flow table's fresh pages").  Advice only: on an older kernel it fails (EINVAL)
--- and the pages fault in at their first write as before.
local function populate(p, from, to)
  if to <= from then return end
  local a = tonumber(cast("uintptr_t", p)) + from
  local start = a - a % PAGE
  C.madvise(cast("void *", start), a - start + to - from, MADV_POPULATE_WRITE)
end

--- n zeroed items of `size` bytes.  From 2 MiB on: a private anonymous mapping (the kernel
--- zero-fills pages as they are first written, so untouched records cost no memory), aligned to
--- 2 MiB and advised MADV_HUGEPAGE when `huge` (with 100 000 flows the records span 25 MB, and with
--- 4 KiB pages nearly every record access also missed the TLB), else MADV_NOHUGEPAGE, so that a kernel
--- with transparent huge pages "always" gives 4 KiB pages too (on a VM whose balloon reports free
--- memory to its host, a first write to a fresh 2 MiB page costs 0.07-1.8 ms: docs/benchmarks.md,
--- "The flow table's huge_pages setting").  Smaller: calloc.
local function alloc(ctype_ptr, n, size, huge)
  local bytes = n * size
  if bytes < HUGE then
    local p = C.calloc(n, size)
    if p == nil then error("flowtable: out of memory allocating " .. bytes .. " bytes", 3) end
    return ffi.gc(cast(ctype_ptr, p), C.free)
  end
  local len = bytes + HUGE
  local m = C.mmap(nil, len, 3, 0x22, -1, 0)    -- PROT_READ|PROT_WRITE, MAP_PRIVATE|MAP_ANONYMOUS
  if cast("intptr_t", m) == -1 then error("flowtable: out of memory mapping " .. len .. " bytes", 3) end
  local a = tonumber(cast("uintptr_t", m))
  local p = cast("uint8_t *", m) + (HUGE - a % HUGE) % HUGE
  -- advice only: a kernel without THP ignores it.  The whole mapping (the alignment slack too), so that
  -- the kernel keeps it one area with one set of flags (/proc/PID/smaps VmFlags hg / nh).
  C.madvise(m, len, huge and MADV_HUGEPAGE or MADV_NOHUGEPAGE)
  return ffi.gc(cast(ctype_ptr, p), function() C.munmap(m, len) end)
end

function M.new(opts)
  opts = opts or {}
  local cap = opts.capacity or 1048576
  if cap < 1 or cap ~= math.floor(cap) or band(cap, cap - 1) ~= 0 or cap > 0x20000000 then
    error("flowtable: capacity must be a power of two <= 2^29", 2)
  end
  local size = math.min(cap * 2, MIN_SLOTS)    -- grows with the live flows (reserve)
  local huge = opts.huge_pages ~= false
  local self = setmetatable({
    capacity = cap,
    size = size,
    mask = size - 1,
    idle_timeout = opts.idle_timeout or 120,
    active_timeout = opts.active_timeout or 1800,
    touch_flows = opts.touch_flows or TOUCH_FLOWS,   -- update_batch's touch loops from this many live flows on
    huge_pages = huge,   -- mappings advised MADV_HUGEPAGE (true) or MADV_NOHUGEPAGE (false)
    flows = alloc(flow_ptr, cap + 1, ffi.sizeof("lp_flow"), huge),   -- hot records, [cap]: what an empty slot touches
    cold = alloc(cold_ptr, cap + 1 + SCRATCH, ffi.sizeof("lp_flow_cold"), huge),   -- cold records, [cap]: age list
                                                                   -- sentinel, [cap + 1 ..]: syn_time's scratch records
    lru = alloc(link_ptr, cap + 1, ffi.sizeof("lp_link"), huge),     -- LRU links of flows[i], [cap]: sentinel
    -- the index: one mapping of its largest size (2 * capacity slots) grown in place when that is 2 MiB or more
    -- (reserve: the pages of a doubling's first half are mapped already), else calloc'd anew at each doubling
    slot_map = cap * 2 * SLOT_SIZE >= HUGE,
    slots_mapped = 0,    -- bytes of the index mapping whose pages are mapped (slot_map)
    slots = alloc(slot_ptr, cap * 2 * SLOT_SIZE >= HUGE and cap * 2 or size, SLOT_SIZE, huge),
    free_stack = alloc(i32_ptr, cap, 4, huge),
    free_top = 0,        -- entries in free_stack
    hw = 0,              -- records [hw, cap) never used yet
    faulted = 0,         -- records [0, faulted) have their pages mapped (prefault)
    pf = nil,            -- the prefault helper (start_prefaulter: lp_prefaulter *), pf_lib its library
    side = nil,          -- side_array's mapped array (uint8_t *), side_size its item's bytes: mapped as the records
    pf_base = nil,       -- a restarted helper's predecessors' work (side_array): pages, calls, cpu_s
    kicks = 0, self_faulted = 0,   -- with a helper: its wake-ups, records the fast path still mapped itself
    mapped = (cap + 1) * FLOW_SIZE >= HUGE,   -- the records are a mapping of their own (alloc), not calloc's
    live = 0, created = 0, expired = 0, expired_idle = 0, expired_active = 0,
    terminated = 0, full_drops = 0, resizes = 0, renewed = 0, age_fresh = 0,
    on_renew = nil,                  -- function(idx, reason): a record about to start again (port reuse: nil; IDLE)
    _scratch = decode.new(),
    kone = ffi.new("lp_fkey"),       -- update()'s key
    nkeys = 0,                       -- update_batch's scratch: keys[nkeys], miss[nkeys], missj[nkeys] (made below)
    touched = 0,                     -- update_batch's touch loops' result (kept, so the loads are)
    lc = ffi.new("lp_lrucut", cap, -1),   -- the LRU list's cut (lru_move: where the next move into second sec goes)
    bsec = -1,                       -- update_batch: the latest second a batch began in (lru_move's cut)
  }, FT)
  if self.slot_map then
    populate(self.slots, 0, size * SLOT_SIZE)
    self.slots_mapped = size * SLOT_SIZE
  end
  ffi.fill(self.slots, size * ffi.sizeof("lp_slot"), 0xff)   -- idx -1: empty
  self.fw = cast(i32_ptr, self.flows)        -- the records as int32 words (probe, new_flow)
  local nb = opts.batch or 1025              -- the driver's batch (1024) + a reassembled datagram; grown on demand
  self.keys, self.miss, self.missj, self.nkeys = ffi.new("lp_fkey[?]", nb), ffi.new("int32_t[?]", nb),
    ffi.new("int32_t[?]", nb), nb
  -- update_batch's scratch of many flows: verdicts (verdict: flow, slot) and the hashes side by side
  self.sv, self.sj, self.sh = ffi.new("int32_t[?]", nb), ffi.new("int32_t[?]", nb), ffi.new("int32_t[?]", nb)
  -- expire()'s chunk: flows, their ids, their keys' hashes
  self.xids, self.xuids, self.xhs = ffi.new("int32_t[?]", EXPIRE_CHUNK), ffi.new("double[?]", EXPIRE_CHUNK),
    ffi.new("int32_t[?]", EXPIRE_CHUNK)
  local sen = self.cold[cap]                 -- the age list is circular through it
  sen.aprev, sen.anext = cap, cap
  self.lru[cap].prev, self.lru[cap].next = cap, cap
  self.flows[cap].live = 0
  return self
end

-- hash over the 10 key words ---------------------------------------------------
-- The key as five 64-bit words, each multiplied by its own odd constant and summed (independent
-- multiplies: the CPU runs them in parallel), then one multiply-xorshift finaliser (as in
-- MurmurHash3's fmix64 / splitmix64) so every input bit reaches the low bits the index uses; the
-- result is the low 32 bits.  uint64_t cdata arithmetic compiles to imul on 64-bit registers, about
-- 15 instructions against the ~90 dependent 32-bit operations of lookup3 it replaced (issue 10: the
-- key loop's largest cost).  The key words are read through k (int32_t[10], 8-byte aligned:
-- record key or lp_fkey), so nothing of the key stays live across the hash.
local u64_ptr = ffi.typeof("const uint64_t *")
local shr = bit.rshift
local H0, H1, H2 = 0x9E3779B97F4A7C15ULL, 0xC2B2AE3D27D4EB4FULL, 0x165667B19E3779F9ULL
local H3, H4, HF = 0xD6E8FEB86659FD93ULL, 0xFF51AFD7ED558CCDULL, 0xC4CEB9FE1A85EC53ULL
local function hash_key(k)
  local q = cast(u64_ptr, k)
  local h = q[0] * H0 + q[1] * H1 + q[2] * H2 + q[3] * H3 + q[4] * H4
  h = bxor(h, shr(h, 29)) * HF
  return tobit(bxor(h, shr(h, 32)))
end
M._hash_key = hash_key

-- list helpers ------------------------------------------------------------------
-- Both lists are circular and doubly linked through the sentinel (lru[capacity] for the LRU list,
-- flows[capacity] for the age list), so linking and unlinking have no branch.
local function lru_unlink(lru, i)
  local p, n = lru[i].prev, lru[i].next
  lru[p].next = n
  lru[n].prev = p
end

-- flow i into the LRU list after flow c
local function lru_insert_after(lru, i, c)
  local n = lru[c].next
  lru[i].prev = c
  lru[i].next = n
  lru[c].next = i
  lru[n].prev = i
end

local function lru_append(lru, i, sen)
  lru_insert_after(lru, i, lru[sen].prev)
end

--- The LRU move of flow idx (lsec already set to sec, its packet's second, a later one than before: lru_touch): into
--- the list after the flows moved there before it in that second and before the flows created in it (new_flow appends
--- at the tail), so the list's order within a second is the same whatever the batches (module doc, "LRU list").
--- self.lc (lp_lrucut, FFI): cut, the flow after which the next move of second lc.sec goes (the last one moved there,
--- else the last flow placed in an earlier second: the tail before the first batch of the second, update_batch;
--- else, a batch or update() whose packets change second, found at the second's first move by walking back from the
--- tail over the flows created in it so far); a flow that leaves its place while it is the cut hands it to its
--- predecessor (here, free_flow).
local function lru_move(lc, flows, lru, idx, sec, sen)
  if idx == lc.cut then lc.cut = lru[idx].prev end
  lru_unlink(lru, idx)
  if sec > lc.sec then
    local c = lru[sen].prev
    while c ~= sen and flows[c].lsec >= sec do c = lru[c].prev end
    lc.sec, lc.cut = sec, c
  end
  lru_insert_after(lru, idx, lc.cut)
  lc.cut = idx
end

local function age_unlink(cold, c)
  local p, n = c.aprev, c.anext
  cold[p].anext = n
  cold[n].aprev = p
end

local function age_append(cold, c, i, sen)
  local s = cold[sen]
  local t = s.aprev
  c.aprev = t
  c.anext = sen
  cold[t].anext = i
  s.aprev = i
end

-- packet path ---------------------------------------------------------------------
-- Why it is shaped like this (issue 10).  LuaJIT compiles a loop into a root
-- trace along the path the first hot iterations took, and every other path
-- into a side trace.  The former single per-packet update() put key, hash,
-- probe, insertion, LRU move and counters in one trace: when the root trace
-- was recorded on a packet that started a new flow it baked in the "empty
-- slot" outcome of the probe, every packet of a known flow then left the trace
-- there, and the side trace for that exit carried ~26 live values, failed to
-- compile (trace error 35, "NYI: register coalescing too complex") and was
-- blacklisted after a few hundred tries: nearly every packet then ran the rest
-- in the interpreter.  Which outcome the root trace saw depended on the share
-- of new flows while the traces formed and on LuaJIT's randomised re-arming
-- of hot counters, so the same file ran fast or 5x slower from run to run.
--
-- A batch is therefore processed in small loops (update_batch), each
-- with few live values, so whatever path a trace is recorded on, the side
-- traces of the others are small and compile:
--   1. lookup   key, direction and hash of every packet into a flat scratch
--               array (lp_fkey); then the read-only probe of the index: the
--               flow index or -1 (miss; the packet number and the empty slot
--               that ended its chain go on a miss list).  With more flows
--               than the caches hold, the probe is four loops instead of one,
--               so the cache misses of the whole batch overlap (with 100 000
--               flows nearly each is a miss): one touching each packet's home
--               slot; one deciding from the two first slots of each chain
--               (verdict, no branch, no record read) into a flat array; one
--               touching the record each verdict names; one comparing that
--               record's key (probe_chain for the rare rest); the record
--               loop also touches the LRU links of each packet's flow and of
--               its two list neighbours (what loop 3 writes when it moves it);
--   2. insert   only the misses: from the empty slot that ended the miss's
--               probe (probe_on: an earlier packet of the same batch may
--               have created the flow there or further on), create the record;
--   3. account  per packet, in packet order (a batch whose every packet
--               created its flow: first_packet instead, from the new records'
--               known state): for a SYN without ACK (one
--               test) the port-reuse check (renew_if_reused) and the SYN
--               time (syn_time: no store for any other segment); last_ts,
--               packets, bytes, payload (account, straight line); for a TCP
--               segment (one test) flags seen, state, setup RTT and
--               retransmissions (tcp_state, tcp_track, branch-free inside);
--               then the LRU move to the list tail when the packet's second
--               is later than the flow's lsec (lru_touch).  One loop: each
--               packet's batch entry, decoded fields and record are read
--               once (they were a SYN scan and three loops, or a packet-by-
--               packet variant for batches holding a SYN, each reading them
--               again: ~10-20 ns/packet).
-- The probe loop is bounded: the index is kept at most half full, so a probe
-- chain always ends at an empty slot.
-- Two hidden costs of a trace exit, avoided throughout (tests/test_flowtable_jit.py
-- counts both): a guard nobody wrote (unary minus of an integer is guarded
-- by "not 0", so negation is written 0 - x), and a cdata reference live at
-- an exit that is taken often, which is allocated each time: the probe and
-- new_flow read keys and records as int32 words (kw, fw), the loops index
-- b[k] again after a call instead of keeping the entry, and record
-- references are made after a test, not before it.
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

-- the 10 key words of record x (at word 64 * x of the records) equal those of the key at word o of kw: read as
-- five uint64 words through two pointers, xored and ored together, one test (the probe's; no branch per word,
-- and no cdata reference made: a reference to a record's key array or to an lp_fkey that a side exit has to
-- materialise is an allocation per packet)
local function key_eq(fw, f, kw, o)
  local a, k = cast(u64_ptr, fw + f), cast(u64_ptr, kw + o)
  return bor(bxor(a[0], k[0]), bxor(a[1], k[1]), bxor(a[2], k[2]), bxor(a[3], k[3]), bxor(a[4], k[4])) == 0ULL
end

-- the same comparison as a number, no test: 0 when the keys are equal, else not 0 (the two 32-bit halves of the
-- ored differences ored together)
--- Nonzero (an int32) when the five 64-bit key words at a and k (uint64_t *) differ: their XORs or-ed, folded to 32
--- bits.  The callers cast (key_diff: a word offset; key_diff_rec: a record pointer); inlined, the same trace IR.
local function key_xor(a, k)
  local v = bor(bxor(a[0], k[0]), bxor(a[1], k[1]), bxor(a[2], k[2]), bxor(a[3], k[3]), bxor(a[4], k[4]))
  return tobit(bor(v, shr(v, 32)))
end

local function key_diff(fw, f, kw, o)
  return key_xor(cast(u64_ptr, fw + f), cast(u64_ptr, kw + o))
end

-- key_diff of record r (an index into flows, lp_flow *): its address from pointer arithmetic (an integer shift),
-- where the word offset r * FLOW_WORDS is a double multiply and two conversions in a trace (LuaJIT does not
-- narrow a multiplication to integers), on the probe's critical path (issue 10; probe's home slot: small-few's
-- probe loop 95.9 -> 94.3 instructions a packet).  Not in the touch path's probe loop: there it measured 76.0 ->
-- 76.9 on dns; and with the key offset k * KEY_WORDS as an integer (tobit of two shifts) a side trace of the
-- one-loop probe failed to compile on small-few (error 34, register coalescing), so the key offsets stay doubles
local function key_diff_rec(flows, r, kw, o)
  return key_xor(cast(u64_ptr, flows + r), cast(u64_ptr, kw + o))
end

--- Normalised key of decoded packet d (ip_version v ~= 0) into kf (lp_fkey):
--- key words and hash; returns hash, dir (0 = the packet's source is the A end; the caller stores it: kf.dir is
--- update()'s).
---
--- The key is built as five 64-bit words (the layout of the 10 int32 key words on a little-endian CPU: A address
--- words 0-3, Z address 4-7, ports, version and protocol), each read from d as one 64-bit load (an address pair),
--- masked, stored once and hashed from the registers (hash_words).  Built as 10 int32 stores that the hash then
--- read back as five 64-bit loads, each load spanned two stores still in the CPU's store buffer: the store could
--- not be forwarded and the load waited for both stores to reach the cache, five times per packet (issue 10:
--- tools/bench/stages_ab.py, flows column; tests/test_fill_ir.py counts the key loop's loads and stores).
local cu64_ptr, u64_ptr_w = ffi.typeof("const uint64_t *"), ffi.typeof("uint64_t *")
local Q_SRC = W_SRC / 2                        -- d.src as a uint64_t index (d.dst follows it: Q_SRC + 2)
assert(W_SRC % 2 == 0)
local LOW32 = 0xFFFFFFFFULL
local function make_key(kf, d, v)
  local w = cast(ci32_ptr, d)
  local sp, dp = w[W_SPORT], w[W_SPORT + 1]
  -- dir 0: src is A (the higher port; same rule as decode.flowkey)
  local m6 = arshift(lshift(v, 30), 31)      -- -1 for IPv6, 0 for IPv4 (bit 1 of v; 0 - x had an overflow guard)
  local dir
  if sp ~= dp then
    dir = band(rshift(sp - dp, 31), 1)
  else
    dir = tie_dir(w, m6)
  end
  -- address words 1-3 are zero for IPv4 (only the first 4 bytes of d.src / d.dst are its address)
  local m1 = m6 + 0LL                         -- mask of the second pair (words 2, 3): 0 (IPv4) or all ones
  local m0 = bor(LOW32, m1)                   -- of the first (words 0, 1): word 0 always
  local q = cast(cu64_ptr, d)
  local ao = Q_SRC + 2 * dir
  local zo = Q_SRC + 2 - 2 * dir
  local k0, k1 = band(q[ao], m0), band(q[ao + 1], m1)
  local k2, k3 = band(q[zo], m0), band(q[zo + 1], m1)
  local ports = bor(lshift(w[W_SPORT + dir], 16), w[W_SPORT + 1 - dir])
  local k4 = bor(band(ports, LOW32), lshift(bor(lshift(v, 8), d.ipproto) + 0ULL, 32))
  local kq = cast(u64_ptr_w, kf.key)
  kq[0], kq[1], kq[2], kq[3], kq[4] = k0, k1, k2, k3, k4
  local h = k0 * H0 + k1 * H1 + k2 * H2 + k3 * H3 + k4 * H4   -- hash_key's, from the registers
  h = bxor(h, shr(h, 29)) * HF
  h = tobit(bxor(h, shr(h, 32)))
  kf.hash = h
  return h, dir          -- what it stored, for the caller's loop (not loaded back after its other stores)
end

--- Probe the index for the key at word o of kw (an lp_fkey array as int32_t *: key words o .. o + 9, hash
--- at o + 10): returns (slot, flow index) — the slot holding the flow, or the empty slot that ended the
--- chain and -1.
---
--- The home slot is decided without a branch (issue 10): the flow found there and an empty slot (a new flow)
--- take the same path, and only a slot held by another key (~7 % of the lookups on small-few, at the index's
--- load <= 1/4) goes on to the loop.  With `if` tests there, the loops' traces, recorded in the first batch where
--- nearly every packet starts a flow, kept the empty-slot path, and every later packet of a known flow left them
--- by a side exit into a side trace that re-entered the loop's trace at its start (flowtable_loops.py: probe 11
--- ns a packet on small-few's 500 flows; tests/test_flowtable_jit.py).
local KEY_WORDS = ffi.sizeof("lp_fkey") / 4
local FLOW_WORDS = FLOW_SIZE / 4
assert(ffi.offsetof("lp_fkey", "hash") == 40 and ffi.offsetof("lp_flow", "key") == 0)
-- 1 when the 32-bit words a and b are equal, else 0 (no branch)
local function same(a, b)
  local d = bxor(a, b)
  return rshift(bnot(bor(d, 0 - d)), 31)
end
--- The verdict of the index on hash h, from its first two slots (update_batch's slot loop, with many flows): the
--- candidate is the home slot j = h & mask when it is empty or holds hash h, else slot j + 1; returns the candidate's
--- slot number and its flow when it holds hash h (the key is still to be compared), -1 when it is empty (a new flow:
--- nothing before it on the chain can be the key), -2 when it holds another hash (the chain goes on).  No branch.
local function verdict(slots, h, mask)
  local j0 = band(h, mask)
  local j1 = band(j0 + 1, mask)
  local x0, x1 = slots[j0].idx, slots[j1].idx
  local s0, s1 = same(slots[j0].hash, h), same(slots[j1].hash, h)
  local m = 0 - bor(rshift(x0, 31), s0)                  -- all ones: the home slot is the candidate
  local x = bor(band(m, x0), band(bnot(m), x1))
  local e = rshift(x, 31)                                 -- 1: the candidate is empty
  local keep = band(bor(band(m, s0), band(bnot(m), s1)), bxor(e, 1))   -- 1: it holds hash h
  return bor(band(m, j0), band(bnot(m), j1)), bor(band(0 - keep, x), band(keep - 1, e - 2))
end
-- the chain from the home slot, one slot after the other (update_batch's rare case with many flows: a verdict of -2,
-- or a hash shared with another key): returns (slot, flow index) as probe.  Bounded: the index is at most half
-- full, so an empty slot ends every chain.  Recomputed from the key alone, so no value of the probe loop's
-- comparison is live at the exit into it (a side trace with them failed to compile: "register coalescing too
-- complex")
local function probe_chain(self, kw, o)
  local slots, fw, mask = self.slots, self.fw, self.mask
  local h = kw[o + 10]
  local j = band(h, mask)
  local x = slots[j].idx
  while x >= 0 and not (slots[j].hash == h and key_eq(fw, x * FLOW_WORDS, kw, o)) do
    j = band(j + 1, mask)
    x = slots[j].idx
  end
  return j, x
end
local function probe(self, kw, o)
  local slots, fw, mask = self.slots, self.fw, self.mask
  local h = kw[o + 10]
  local j = band(h, mask)
  local x = slots[j].idx
  -- the home slot: other = 1 when it holds another key (occupied, and its hash or key differs); the key compared is
  -- the slot's record only when the hashes are equal, else (and for an empty slot's record index -1) record 0's, a
  -- valid address whose comparison is masked out: a new flow whose home slot holds another flow reads no record
  -- (with many flows a cache miss each, which update_batch's touch loop no longer takes for it either)
  local hd = bxor(slots[j].hash, h)
  local r = band(x, bnot(arshift(x, 31)), rshift(bor(hd, 0 - hd), 31) - 1)
  local diff = bor(hd, key_diff_rec(self.flows, r, kw, o))
  local other = band(bnot(rshift(x, 31)), rshift(bor(diff, 0 - diff), 31))
  if other ~= 0 then
    -- bounded: the index is at most half full, so an empty slot ends every chain
    repeat
      j = band(j + 1, mask)
      x = slots[j].idx
    until x < 0 or (slots[j].hash == h and key_eq(fw, x * FLOW_WORDS, kw, o))
  end
  return j, x
end

--- Go on along a probe chain from slot j, whose earlier slots hold other keys (probe returned j as the chain's
--- empty end, and only empty slots were filled since): returns (slot, flow index) as probe does — the slot of the
--- key, or the next empty slot and -1.  An empty j (the common case: no earlier packet of the batch took it) reads
--- one slot; the loop is bounded as probe's.
local function probe_on(self, kw, o, j)
  local slots, mask = self.slots, self.mask
  local x = slots[j].idx
  if x >= 0 then
    local fw, h = self.fw, kw[o + 10]
    while not (slots[j].hash == h and key_eq(fw, x * FLOW_WORDS, kw, o)) do
      j = band(j + 1, mask)
      x = slots[j].idx
      if x < 0 then break end
    end
  end
  return j, x
end

--- Create the record for the key at word o of kw (as probe) in empty slot j at packet time ts, second sec
--- (the caller made room with reserve()).  Returns its index, or -2 (table full).
local function new_flow(self, kw, o, j, ts, sec)
  local idx
  local flows, cold = self.flows, self.cold
  if self.free_top > 0 then
    local t = self.free_top - 1
    self.free_top = t
    idx = self.free_stack[t]
    ffi.fill(flows[idx], FLOW_SIZE)
    ffi.fill(cold[idx], COLD_SIZE)
  elseif self.hw < self.capacity then
    idx = self.hw                      -- never used: still zero from the allocation
    self.hw = idx + 1
  else
    self.full_drops = self.full_drops + 1
    return -2
  end
  local e = flows[idx]
  local fw, f = self.fw, idx * FLOW_WORDS
  fw[f], fw[f + 1], fw[f + 2], fw[f + 3], fw[f + 4] = kw[o], kw[o + 1], kw[o + 2], kw[o + 3], kw[o + 4]  -- no loop:
  fw[f + 5], fw[f + 6], fw[f + 7], fw[f + 8], fw[f + 9] = kw[o + 5], kw[o + 6], kw[o + 7], kw[o + 8], kw[o + 9]  -- inlined
  local c = cold[idx]
  local ports, vproto = kw[o + 8], kw[o + 9]
  c.porta, c.portz = rshift(ports, 16), band(ports, 0xffff)
  c.ipver, c.proto = rshift(vproto, 8), band(vproto, 0xff)
  local h = kw[o + 10]
  e.live = 1
  e.state = S.INIT
  local s = self.slots[j]
  s.idx, s.hash = idx, h
  local created = self.created + 1
  self.created = created
  e.id = created
  c.rtt = -1
  c.first_ts = ts
  e.last_ts = ts
  e.lsec = sec
  self.live = self.live + 1
  local sen = self.capacity
  lru_append(self.lru, idx, sen)
  age_append(cold, c, idx, sen)
  return idx
end

--- Make the index big enough for `extra` more flows at load <= 1/4 (<= 1/2 once it has 2 * capacity slots): doubles it
--- (rehashing every live flow) as often as needed, up to 2 * capacity slots.
--- The index starts small and grows with the live flow count, so a few
--- hundred flows probe a cache-resident index, not one sized for a million.
function FT:reserve(extra)
  local cap = self.capacity
  local want = math.min(math.min(self.live + extra, cap) * SLOTS_PER_FLOW, cap * 2)
  if want <= self.size then return end
  local size = self.size
  while size < want do size = size * 2 end
  if self.slot_map then return self:grow_in_place(size) end
  local slots = alloc(slot_ptr, size, ffi.sizeof("lp_slot"), self.huge_pages)
  if size * ffi.sizeof("lp_slot") >= HUGE then populate(slots, 0, size * ffi.sizeof("lp_slot")) end
  ffi.fill(slots, size * ffi.sizeof("lp_slot"), 0xff)    -- idx -1: empty
  local mask, flows, old = size - 1, self.flows, self.slots
  -- every live flow, read from the old index in slot order (sequential; the LRU list would
  -- visit the flow records in random memory order, one dependent cache miss per flow); no record is
  -- written (a record does not store its slot)
  for i = 0, self.size - 1 do
    local x = old[i].idx
    if x >= 0 then
      local h = old[i].hash
      local j = band(h, mask)
      while slots[j].idx >= 0 do j = band(j + 1, mask) end
      slots[j].idx, slots[j].hash = x, h
    end
  end
  self.slots, self.size, self.mask = slots, size, mask
  self.resizes = self.resizes + 1
end

--- reserve() of an index that is one mapping of its largest size (slot_map): the live entries are copied out in slot
--- order (sequential) into a scratch array, slots [0, size) are emptied (the old part by the copy loop itself) and the
--- entries inserted again.  Only the
--- pages of the new part [old size, size) are fresh memory (a new mapping per doubling wrote 2x the final index in
--- fresh pages: 32 MiB at 1M flows), and with a prefault helper they were mapped by it after the previous doubling
--- (the index's next doubling: its second job, shm/_lpsync.c), so the fast path's thread maps none.
function FT:grow_in_place(size)
  local slots, old, live = self.slots, self.size, self.live
  -- the scratch: malloc'd and freed here (from 128 KiB on glibc maps it and unmaps it at free), not kept: RSS
  local raw = C.calloc(live + 1, SLOT_SIZE)       -- + 1: the copy loop's store after the last live entry
  if raw == nil then error("flowtable: out of memory growing the index", 3) end
  local tmp, m = cast(slot_ptr, raw), 0
  for i = 0, old - 1 do       -- no branch: every slot is copied, kept (m moves on) when it holds a flow, and emptied
    local x = slots[i].idx
    tmp[m].idx, tmp[m].hash = x, slots[i].hash
    m = m + 1 - rshift(x, 31)
    slots[i].idx, slots[i].hash = -1, -1   -- as the fill below (the slot's line is this loop's already: no second pass)
  end
  local bytes = size * SLOT_SIZE
  local pf = self.pf
  if self.slots_mapped < bytes then
    local from = math.max(self.slots_mapped, pf ~= nil and tonumber(pf.ix_done) or 0)
    populate(slots, from, bytes)                  -- the part the helper has not mapped (none when it is ahead)
    self.slots_mapped = bytes
  end
  ffi.fill(slots + old, bytes - old * SLOT_SIZE, 0xff)   -- the new part: idx -1, empty
  local mask = size - 1
  for r = 0, m - 1 do
    local h = tmp[r].hash
    local j = band(h, mask)
    while slots[j].idx >= 0 do j = band(j + 1, mask) end
    slots[j].idx, slots[j].hash = tmp[r].idx, h
  end
  C.free(raw)
  self.size, self.mask = size, mask
  self.resizes = self.resizes + 1
  self:prefault_index()
end

-- with a prefault helper: the slots of the index's next doubling mapped by it now (RSS: the index mapped up to twice
-- the size in use, at most the 2 * capacity slots of its mapping)
function FT:prefault_index()
  local pf = self.pf
  if pf == nil or not self.slot_map then return end
  local goal = math.min(2 * self.size, 2 * self.capacity) * SLOT_SIZE
  if goal > tonumber(pf.ix_goal) and goal > self.slots_mapped and pf.err == 0 then   -- err: the helper has ended
    pf.ix_goal = goal
    self.pf_lib.lp_prefault_kick(pf)
    self.kicks = self.kicks + 1
  end
end

--- Map the pages of the next `extra` never-used records (hot, cold, LRU links) before new_flow writes
--- them: from the high-water mark on, PREFAULT records at a time, each array in one populate() call, so a
--- run that creates flows takes one system call per 1 024 new records instead of ~50 page faults (their
--- 128 KiB hot, 64 KiB cold, 8 KiB links).  Records reused from the free stack are mapped already; an array
--- small enough for calloc (alloc: under 2 MiB) is left alone, and so is a table whose hot records are.
--- RSS: at most PREFAULT records beyond the high-water mark.
---
--- With a prefault helper (FT:start_prefaulter: a thread of its own that maps the pages in the fast path's place),
--- the records' pages are requested up to `ahead` records beyond the high-water mark and mapped by the helper; the
--- fast path maps a chunk itself only when the helper is behind (never waits for it).
function FT:prefault(extra)
  local want = self.hw + extra
  if not self.mapped then return end
  local pf = self.pf
  if pf ~= nil then
    local done = tonumber(pf.done)                    -- records the helper has mapped
    if done > self.faulted then self.faulted = done end
  end
  if want > self.faulted then                        -- the fast path maps the chunk it needs now itself
    local from, n = self.faulted, self.capacity + 1
    local to = math.min(self.capacity, want + PREFAULT - 1 - (want + PREFAULT - 1) % PREFAULT)
    populate(self.flows, from * FLOW_SIZE, to * FLOW_SIZE)
    if (n + SCRATCH) * COLD_SIZE >= HUGE then populate(self.cold, from * COLD_SIZE, to * COLD_SIZE) end
    if n * 8 >= HUGE then populate(self.lru, from * 8, to * 8) end
    if self.side ~= nil then populate(self.side, from * self.side_size, to * self.side_size) end
    self.faulted = to
    if pf ~= nil then pf.self = to; self.self_faulted = self.self_faulted + (to - from) end
  end
  if pf ~= nil then
    -- as far ahead as the records in use, up to `ahead` (a table of a few thousand flows maps no 16 384 records)
    local span = math.min(self.pf_ahead, math.max(PREFAULT, self.hw))
    local goal = tonumber(pf.goal)
    if 2 * (goal - want) < span and goal < self.capacity and pf.err == 0 then   -- err: refused, the helper ended
      pf.goal = math.min(self.capacity, want + span)
      self.pf_lib.lp_prefault_kick(pf)               -- one eventfd write per span / 2 records
      self.kicks = self.kicks + 1
    end
  end
end

--- Start the prefault helper (shm/_lpsync.c lp_prefault_start: a C thread, the protocol is there): from now on
--- prefault() sets its goal min(`ahead`, max(1 024, records in use)) records beyond the high-water mark (`ahead`:
--- default 16 384), wakes it whenever less than half of that is left, and maps a chunk itself only when the helper
--- is behind (it never waits).  RSS: at most that many records (~200 bytes each) beyond the flows seen.  Returns true when started; false with a reason when the records are
--- calloc'd (a small table: nothing to map) or no thread could be made.  stop_prefaulter() (or the table's
--- collection) joins it.
function FT:start_prefaulter(ahead)
  if self.pf ~= nil then return true end
  if not self.mapped then return false, "the flow records are not a mapping of their own (under 2 MiB)" end
  local ok, lib = pcall(function() return ffi.load(require("luaprobe.config").lpsync) end)
  if not ok then return false, "shm/_lpsync not loadable: " .. tostring(lib) end
  pcall(ffi.cdef, [[
typedef struct {
  int64_t goal, done, self, stop;
  int64_t pages, calls, err;
  double cpu_ns;
  int64_t cap;
  uint64_t addr[4], size[4];
  int32_t narrays, efd;
  uint64_t ix_addr;
  int64_t ix_goal, ix_done;
} lp_prefaulter;
lp_prefaulter *lp_prefault_start(int64_t cap, int64_t from, int32_t narrays, const double *addr, const double *size);
void lp_prefault_kick(lp_prefaulter *p);
void lp_prefault_stop(lp_prefaulter *p);
]])
  -- a _lpsync built before the helper or before its current layout (a tree updated without `pip install -e .`):
  -- no helper, as with 0 (the cdef below would not match the library's struct)
  pcall(ffi.cdef, "int lp_prefault_abi(void);")
  local abi_ok, abi = pcall(function() return lib.lp_prefault_abi() end)
  if not abi_ok or abi ~= PREFAULT_ABI then
    return false, "shm/_lpsync was built before this flowtable.lua's prefault helper (run `pip install -e .`)"
  end
  local n = self.capacity + 1
  local addr, size, k = ffi.new("double[4]"), ffi.new("double[4]"), 0
  local function add(p, bytes) addr[k], size[k], k = tonumber(cast("uintptr_t", p)), bytes, k + 1 end
  add(self.flows, FLOW_SIZE)
  if (n + SCRATCH) * COLD_SIZE >= HUGE then add(self.cold, COLD_SIZE) end
  if n * 8 >= HUGE then add(self.lru, 8) end
  if self.side ~= nil then add(self.side, self.side_size) end     -- the fourth and last (LP_PF_ARRAYS)
  local pf = lib.lp_prefault_start(self.capacity, self.faulted, k, addr, size)
  if pf == nil then return false, "lp_prefault_start: no thread or eventfd" end
  self.pf = ffi.gc(pf, lib.lp_prefault_stop)   -- joined before the arrays it maps go (they are the table's too)
  self.pf_lib = lib
  self.pf_ahead = math.max(PREFAULT, ahead or AHEAD)
  if self.slot_map then                         -- its second job: the index's next doubling (grow_in_place)
    pf.ix_addr = tonumber(cast("uintptr_t", self.slots))
    pf.ix_done, pf.ix_goal = self.slots_mapped, self.slots_mapped
    self:prefault_index()
  end
  return true
end

--- Stop and join the prefault helper (if any); returns its work: pages mapped, madvise calls, CPU seconds, errno of a
--- refusal (0), the wake-ups and the records the fast path mapped itself meanwhile.  prefault() maps by itself again.
function FT:stop_prefaulter()
  local pf = self.pf
  if pf == nil then return nil end
  local out = self:prefaulter_stats()
  self.faulted = math.max(self.faulted, tonumber(pf.done))
  if self.slot_map then self.slots_mapped = math.max(self.slots_mapped, tonumber(pf.ix_done)) end
  self.pf = nil
  self.pf_lib.lp_prefault_stop(ffi.gc(pf, nil))
  return out
end

--- The prefault helper's work so far (as stop_prefaulter's result), or nil without a helper.
function FT:prefaulter_stats()
  local pf = self.pf
  if pf == nil then return nil end
  local b = self.pf_base or {pages = 0, calls = 0, cpu_s = 0}
  return {pages = b.pages + tonumber(pf.pages), calls = b.calls + tonumber(pf.calls), cpu_s = b.cpu_s + pf.cpu_ns * 1e-9,
          err = tonumber(pf.err), kicks = self.kicks, self_faulted = self.self_faulted}
end

--- A zero-filled array of capacity + 1 items of `size` bytes, item i belonging to record i, as a `uint8_t *` (cast it;
--- the table keeps the memory for its life): the shared TCP reassembly's vote per flow (engine/streams/stage.lua
--- lp_svote, 48 bytes), read at a flow's first packets.  Its pages are mapped as the records' are: the first one of a
--- table whose records are a mapping of their own (from 2 MiB) is mapped now up to the records mapped so far, then
--- with them, ahead of the high-water mark (prefault), by the prefault helper when one runs (restarted to take it,
--- its work so far kept in the stats).  Before, the stage calloc'd its array: at the default capacity (2^20) 48 MiB of
--- fresh pages, each first touched by a new flow inside the packet loop (~1.6 us a 4 KiB page on the benchmark VM,
--- 85 flows a page: docs/benchmarks.md "filex on short non-HTTP flows").  A second array, or one of a small table,
--- is plain zeroed memory faulted in on first use.  RSS: `size` bytes per record mapped, as the records.
function FT:side_array(size)
  local n = self.capacity + 1
  local p = alloc(ffi.typeof("uint8_t *"), n, size, self.huge_pages)
  if self.side ~= nil or not self.mapped or n * size < HUGE then return p end
  local pf = self.pf
  local ahead = self.pf_ahead
  if pf ~= nil then
    local st = self:stop_prefaulter()                -- faulted: what it had mapped; its work kept
    self.pf_base = {pages = st.pages, calls = st.calls, cpu_s = st.cpu_s}
  end
  self.side, self.side_size = p, size
  populate(p, 0, self.faulted * size)
  if pf ~= nil then self:start_prefaulter(ahead) end
  return p
end

-- 1 when the segment (flags fl, direction dir) is the first ACK without SYN from the client end
-- once the SYN-ACK was seen (state st before it): the SEEN_SYN_ACK_ACK transition
local function handshake_ack(st, fl, dir)
  local syn = band(rshift(fl, 1), 1)
  local ack = band(rshift(fl, 4), 1)
  return band(ack, bnot(syn), rshift(st, 2), bnot(rshift(st, 3)),
              bnot(rshift(band(st, lshift(0x10, dir)), 4 + dir)), 1)
end

-- Negation is written 0 - x throughout: LuaJIT records unary minus of an integer that is not 0 as an integer
-- subtraction guarded by x ~= 0 (-0 is not an integer), so a trace recorded on, say, a segment with payload
-- left at every bare ACK (len 0) through that guard; its side trace carries ~20 live values, failed with
-- error 34 ("register coalescing too complex") and was blacklisted, and every such segment then ran in the
-- interpreter (issue 10: the `http` corpus, ~90 bytes of garbage and ~300 ns per packet).  Binary 0 - x has
-- only an overflow guard, never taken for these values.
-- i when bit c is 1, else scr (no branch): the cold record syn_time's store goes to
local function pick(c, i, scr)
  return scr + band(i - scr, 0 - c)
end

-- the SYN time of flow idx for a SYN without ACK (the callers' port-reuse test, after it: a segment of no other
-- kind writes it, so the per-packet path does not) before the handshake completed (state without SEEN_SYN_ACK_ACK;
-- t: 1 for a TCP segment); the setup RTT (tcp_track) runs from the latest.  Else the scratch record takes it.
local function syn_time(flows, cold, idx, sec, nsec, t, scr, seq, dir)
  local c = pick(band(bnot(rshift(flows[idx].state, 3)), t, 1), idx, scr + band(idx, SCRATCH - 1))
  cold[c].syn_sec = sec
  cold[c].syn_nsec = nsec
  cold[c].syn_seq = seq
  cold[c].syn_dir = dir + 1
end

-- the two rare stores of a TCP segment (tcp_track's result: r + 2 hs) into flow idx's cold record: r (0 or 1) more
-- retransmissions in direction dir, and, when hs is 1 (the segment completing the handshake, sec / nsec its time),
-- the setup RTT in microseconds from the latest SYN (syn_time), from seconds and nanoseconds apart (one double of
-- epoch seconds is only good to ~0.2 µs)
local function tcp_rare(cold, idx, dir, r, hs, sec, nsec)
  local c = cold[idx]
  c.retrans[dir] = c.retrans[dir] + r
  if hs ~= 0 then
    c.rtt = (sec - c.syn_sec) * 1e6 + (nsec - c.syn_nsec) * 1e-3
  end
end

-- The sequence ends of one segment (account(), TCP segments only: the caller's one test), branch-free; returns r + 2
-- hs (r: 1 for a retransmission, hs as below): the caller's test for the rare stores (tcp_rare), so the flow's own
-- cold record is touched only by the segments that change it.  In loop 3 (known_runs) that test ends the run, so
-- the loop's trace is never recorded on such a segment.  Before 2026-12-02 the retransmission count was stored
-- branch-free into the flow's or a scratch cold record (pick) and the RTT had its own test: 25 instructions a
-- packet more on small-few and mixed-zipf, 27 on http (callgrind, issue 10: docs/benchmarks.md "Known flows,
-- 2026-12-02, session 20 (2)" and "session 21"); computing the RTT for every segment into the scratch record had
-- cost ~7 more
local function tcp_track(flows, idx, dir, pl, seq, fl, hs, t)
  local e = flows[idx]
  -- t: 1 for a TCP segment, 0 for anything else (then nothing below changes: every choice is masked by it)
  -- hs: 1 when this segment completed the handshake (the SEEN_SYN_ACK_ACK transition) after a SYN (state
  -- SEEN_SYN), for a TCP segment (tcp_state: band(handshake_ack(st, fl, dir), rshift(st, 1), t), from ST_NEXT)
  -- retransmission: the segment occupies sequence space (payload, SYN, FIN: RFC 9293 §3.4) but does
  -- not start at or beyond the highest sequence end already seen in its direction; a keep-alive
  -- (no SYN/FIN, at most 1 byte, seq = that end - 1) is not counted
  local sf = band(fl, 0x03)                                   -- SYN 0x02, FIN 0x01
  -- SYN and FIN count 1 each: rshift(sf + 1, 1) is 0, 1, 1, 2 for sf 0-3.  tobit: a wrapping add, no overflow guard
  -- (pl < 2^16)
  local len = tobit(pl + rshift(sf + 1, 1))
  local hi = e.tcp_next[dir]
  local dirs = e.tcp_dirs
  local seen = band(rshift(dirs, dir), 1)
  local back = tobit(seq - hi)                                -- < 0: seq before hi (mod 2^32)
  local occ = band(rshift(0 - len, 31), t)                    -- len > 0 (and TCP): 1
  -- the keep-alive test among the segments that occupy sequence space (occ): no SYN/FIN and at most 1 byte means
  -- exactly 1 byte there, so x is 0 for a keep-alive (seq = hi - 1, pl = 1, sf = 0) and only then
  local x = bor(tobit(back + 1), pl - 1, sf)
  -- r: seen, occ, back < 0 and x ~= 0 (x or -x has bit 31 set): both sign bits in one shift
  local r = band(seen, occ, rshift(band(back, bor(x, tobit(0 - x))), 31))
  -- the highest end, moved only by segments that occupy sequence space (a bare ACK carries a
  -- sequence number but no data, and may be bogus): max(hi, seq + len) once seen, seq + len first.  adv = seq + len
  -- - hi (mod 2^32): the end moves by adv when the segment occupies sequence space, unless the direction was seen
  -- and adv < 0 (adv = 0 moves it nowhere either way)
  local adv = tobit(back + len)
  local mv = band(occ, bxor(band(seen, rshift(adv, 31)), 1))
  e.tcp_next[dir] = tobit(hi + band(0 - mv, adv))
  e.tcp_dirs = bor(dirs, lshift(occ, dir))
  -- the rare stores (tcp_rare) are the caller's: r in bit 0, hs in bit 1
  return bor(r, lshift(hs, 1))
end

-- the LRU move of flow idx (record e) for a packet of second sec (loop 3, last): to the tail at its
-- first packet of a later second, so the list stays ordered by the second of each flow's last packet
-- (lsec) while most packets of a flow touch no neighbour record (module doc, "LRU list")
local function lru_touch(lc, flows, lru, idx, sec, sen)
  if sec > flows[idx].lsec then
    flows[idx].lsec = sec       -- no record reference made: none live at the test's exit (see account)
    lru_move(lc, flows, lru, idx, sec, sen)
  end
end

-- per-packet counters of flow idx (loop 3, first): last_ts, packets, bytes, payload; returns the flow's id.  Straight
-- line: nothing here depends on the protocol.
local function account(flows, idx, dir, ts, wirelen, pl)
  local e = flows[idx]
  e.last_ts = max(e.last_ts, ts)
  e.packets[dir] = e.packets[dir] + 1
  e.bytes[dir] = e.bytes[dir] + wirelen
  e.payload[dir] = e.payload[dir] + pl
  return e.id
end

-- TCP state of one packet of flow idx (loop 3 for TCP segments, and any packet with TCP flags, which decode gives
-- only TCP segments; a packet with neither changes nothing here): flags seen, state flags, then tcp_track
-- with the state before this segment (t: 1 for a TCP segment).  Branch-free, so the loop's one test is its
-- only exit.
-- the state flags after a segment with flags fl in direction dir on a flow in state st (tcp_state, first_packet)
local function state_after(st, fl, dir)
  local syn = band(rshift(fl, 1), 1)
  local ack = band(rshift(fl, 4), 1)
  local srv = lshift(0x10, dir)              -- this packet's end as server bit
  local synack = band(syn, ack)
  local ack3 = handshake_ack(st, fl, dir)
  return bor(st,
             lshift(band(syn, bnot(ack)), 1),            -- SEEN_SYN 0x02
             band(0 - synack, bor(0x04, srv)),              -- SEEN_SYN_ACK 0x04 + A/Z_END_SERVER
             lshift(ack3, 3),                            -- SEEN_SYN_ACK_ACK 0x08
             lshift(band(fl, 0x01), 6),                  -- SEEN_FIN 0x40
             lshift(band(fl, 0x04), 5))                  -- SEEN_RST 0x80
end

-- state_after and tcp_track's handshake test as one table: state_after(st, fl, dir) and handshake_ack(st, fl, dir) read
-- only the flags FIN, SYN, RST, ACK of fl, dir and the state bits SEEN_SYN .. Z_END_SERVER (0x02 - 0x20) of st, so
-- ST_NEXT[st_index(st, fl, dir)] holds, in bits 0-7, the state bits state_after adds (bor(st, them) is state_after's
-- result) and, in bit 8, band(handshake_ack(st, fl, dir), rshift(st, 1), 1) (the handshake completed after a SYN).
-- Built from the two functions themselves (so equal by construction); a segment of a known flow then takes one
-- load instead of ~35 bit operations (issue 10: loop 3).  The index: FIN, SYN, RST, ACK where fl has them (bits 0, 1,
-- 2, 4), dir in PSH's bit 3, the state bits 0x02 - 0x20 in bits 6 - 10 (2 048 entries, 4 KiB; 6 operations, not 10)
local function st_index(st, fl, dir)
  return bor(band(fl, 0x17), lshift(dir, 3), lshift(band(st, 0x3E), 5))
end
local ST_NEXT = ffi.new("uint16_t[2048]")
for sb = 0, 0x3E, 2 do
  for fb = 0, 0x17 do
    if band(fb, 0x08) == 0 then
      for dir = 0, 1 do
        local i = st_index(sb, fb, dir)
        assert(ST_NEXT[i] == 0)
        ST_NEXT[i] = bor(band(state_after(sb, fb, dir), 0xFF),
                         lshift(band(handshake_ack(sb, fb, dir), rshift(sb, 1), 1), 8))
      end
    end
  end
end

local function tcp_state(flows, idx, dir, pl, fl, seq, t)
  local e = flows[idx]
  e.tcp_flags_seen[dir] = bor(e.tcp_flags_seen[dir], fl)
  local st = e.state
  local nx = ST_NEXT[st_index(st, fl, dir)]
  e.state = bor(st, band(nx, 0xFF))
  -- a tail call (its result is tcp_track's): LuaJIT records tcp_track in place of
  -- tcp_state's frame, so the snapshots inside tcp_track carry none of tcp_state's ~11 slots and fewer values stay
  -- live in the trace (callgrind, loop 3 on small-few -3.9 instructions a packet; docs/benchmarks.md "Known flows,
  -- 2026-12-02, session 20")
  return tcp_track(flows, idx, dir, pl, seq, fl, band(rshift(nx, 8), t), t)
end

-- A TCP segment's (or any packet with TCP flags: tf >= 0 or flags set) state of flow idx: tcp_state and, when it
-- changes the flow's cold record (a retransmission, the handshake's last ACK), tcp_rare.  update() and known_packet;
-- loop 3's for loop calls tcp_state itself (it stops at a nonzero result)
local function tcp_segment(flows, cold, idx, dir, pl, fl, seq, tf, sec, nsec)
  local rh = tcp_state(flows, idx, dir, pl, fl, seq, band(rshift(bnot(tf), 31), 1))
  if rh ~= 0 then tcp_rare(cold, idx, dir, band(rh, 1), rshift(rh, 1), sec, nsec) end
end

-- The first packet of flow idx, just created by new_flow (update_batch, a batch whose every packet created its flow):
-- what loop 3 would do for it, written from the record's known state (zero, state INIT, last_ts = its time, lsec =
-- its second).  Loop 3's idle check (last_ts is ts), port-reuse check (nothing was sent yet: tcp_dirs 0) and LRU move
-- (lsec is sec) change nothing for it; account adds to zero counters; tcp_state from state INIT cannot complete a
-- handshake (no SEEN_SYN_ACK: no RTT) nor see a retransmission (tcp_dirs 0), so of tcp_track only the sequence end and
-- the direction seen are left; a TCP SYN without ACK writes its SYN time (syn_time: the state has no
-- SEEN_SYN_ACK_ACK; no branch, scr as there).  t: 1 for a TCP segment, 0 else (then fl is 0: decode gives TCP flags to
-- TCP segments only).  Returns the flow's id.  tests/test_flowtable_first_packet.py: every record field equal to
-- update()'s (which runs the general steps) on captures of handshakes, retransmissions and port reuse.
local function first_packet(flows, cold, idx, dir, wirelen, pl, fl, seq, t, sec, nsec, scr)
  local e = flows[idx]
  e.packets[dir] = 1
  e.bytes[dir] = wirelen
  e.payload[dir] = pl
  e.tcp_flags_seen[dir] = fl
  e.state = state_after(S.INIT, fl, dir)
  local sf = band(fl, 0x03)                                   -- SYN 0x02, FIN 0x01: sequence space (tcp_track)
  local occ = band(rshift(0 - (pl + band(sf, 1) + rshift(sf, 1)), 31), t)
  e.tcp_next[dir] = band(0 - occ, tobit(seq + pl + band(sf, 1) + rshift(sf, 1)))
  e.tcp_dirs = lshift(occ, dir)
  syn_time(flows, cold, idx, sec, nsec, band(rshift(fl, 1), bnot(rshift(fl, 4)), t), scr, seq, dir)   -- SYN, no ACK
  return e.id
end

-- Flow idx's record ends and starts again in place for a packet at ts, before the packet's own counters and TCP
-- state: the old record goes to on_renew(idx, reason) first.  reason nil: a new connection on its 5-tuple (module
-- doc, "Port reuse": same id); IDLE: the packet came more than idle_timeout after the last ("Idle expiry in the
-- packet loop": a new id).
local function restart(self, flows, idx, ts, reason)
  local e = flows[idx]
  local cold = self.cold
  local c = cold[idx]
  if self.on_renew then self.on_renew(idx, reason) end
  e.packets_az, e.packets_za, e.bytes_az, e.bytes_za, e.payload_az, e.payload_za = 0, 0, 0, 0, 0, 0
  e.tcp_flags_seen[0], e.tcp_flags_seen[1] = 0, 0
  e.state = S.INIT
  c.syn_sec, c.syn_nsec, c.syn_seq, c.syn_dir = 0, 0, 0, 0
  c.rtt = -1
  c.retrans_az, c.retrans_za = 0, 0
  e.tcp_next[0], e.tcp_next[1], e.tcp_dirs = 0, 0, 0
  c.first_ts, e.last_ts = ts, ts
  e.stage_off = 0                      -- a new connection: the reassembly stage decides about it again
  -- back into the age list in first_ts order: behind the flows this batch appended with a later first packet
  -- (its insertion loop's new flows and its earlier restarts: self.age_fresh of them, counted in update_batch),
  -- never further.  A late packet (older than flows of earlier batches) lands behind them, as a flow new_flow
  -- creates for a late packet does ("Expiry": it can only expire late); walking on cost O(live flows) per restart
  -- (a capture given twice: 3 000 x 3 000 steps, 51 ns/packet on http, docs/benchmarks.md)
  local sen = self.capacity
  age_unlink(cold, c)
  local t = cold[sen].aprev
  local steps = self.age_fresh
  while steps > 0 and t ~= sen and cold[t].first_ts > ts do t, steps = cold[t].aprev, steps - 1 end
  self.age_fresh = self.age_fresh + 1
  local n = cold[t].anext
  c.aprev, c.anext = t, n
  cold[t].anext = idx
  cold[n].aprev = idx
  if reason == IDLE then               -- a flow that ended by silence: a new flow record, a new id (as new_flow)
    local created = self.created + 1
    self.created = created
    e.id = created
    self.expired, self.expired_idle = self.expired + 1, self.expired_idle + 1
  else
    self.renewed = self.renewed + 1
  end
end

-- A SYN (no ACK) of a new connection on flow idx's 5-tuple (module doc, "Port reuse"): restart.  Only called for
-- SYN-without-ACK packets, before the packet's own counters and TCP state.
local function renew_if_reused(self, flows, idx, dir, seq, ts)
  local e = flows[idx]
  if band(rshift(e.tcp_dirs, dir), 1) == 0 then return end           -- nothing sent this way yet
  local c = self.cold[idx]
  if c.syn_dir == dir + 1 then                                          -- this direction's SYN seen: its ISN
    if tobit(seq - c.syn_seq) == 0 then return end                      --   the same SYN again
  else                                                                  -- picked up mid-stream: no ISN
    local back = tobit(e.tcp_next[dir] - seq)                           --   how far behind the direction's end
    if back >= 1 and back <= e.payload[dir] + 2 then return end         --   within the bytes it sent
  end
  restart(self, flows, idx, ts, nil)
end

--- One packet (tools, tests and the single-packet users): the same
--- steps as update_batch.  d lp_decoded, ts packet time (s), wirelen bytes
--- (default d.caplen).  Returns idx, dir, is_new (see the module doc).
function FT:update(d, ts, wirelen)
  local v = d.ip_version
  if v == 0 then return -1, 0, false end
  local kf = self.kone
  local _, dir = make_key(kf, d, v)
  kf.dir = dir
  self:reserve(1)
  self:prefault(1)
  local kw = cast(i32_ptr, kf)
  local j, idx = probe(self, kw, 0)
  local is_new = false
  self.age_fresh = 0                   -- restart: one packet, nothing appended before it
  local sec = math.floor(ts)
  if idx < 0 then
    idx = new_flow(self, kw, 0, j, ts, sec)
    if idx < 0 then return idx, kf.dir, false end
    is_new = true
  else
    if ts - self.flows[idx].last_ts > self.idle_timeout then restart(self, self.flows, idx, ts, IDLE) end
    if band(d.tcp_flags, 0x12) == 0x02 then renew_if_reused(self, self.flows, idx, kf.dir, d.tcp_seq, ts) end
  end
  account(self.flows, idx, kf.dir, ts, wirelen or d.caplen, d.payload_length)
  local tf = d.first[TCP]
  if band(d.tcp_flags, 0x12) == 0x02 then
    syn_time(self.flows, self.cold, idx, sec, math.floor((ts - sec) * 1e9 + 0.5), band(rshift(bnot(tf), 31), 1),
             self.capacity + 1, d.tcp_seq, kf.dir)
  end
  if bor(d.tcp_flags, 1 + tf) ~= 0 then
    tcp_segment(self.flows, self.cold, idx, kf.dir, d.payload_length, d.tcp_flags, d.tcp_seq, tf, sec,
                math.floor((ts - sec) * 1e9 + 0.5))
  end
  lru_touch(self.lc, self.flows, self.lru, idx, sec, self.capacity)
  return idx, kf.dir, is_new
end

-- loop 3's general path (known_runs): packet k of batch b, any packet (one without a flow, a SYN without ACK, an
-- idle flow's), every step of update() in order
local function known_packet(self, flows, cold, lc, lru, b, k, idle, sen)
  local idx = b[k].flow
  if idx < 0 then
    b[k].flow_uid = 0
    return
  end
  local ts = b[k].ts_sec + b[k].ts_nsec * 1e-9
  if ts - flows[idx].last_ts > idle then           -- silent for longer than idle_timeout: ended ("Idle expiry")
    restart(self, flows, idx, ts, IDLE)
  end
  if band(b[k].d.tcp_flags, 0x12) == 0x02 then     -- no reference to b[k] kept across the call
    renew_if_reused(self, flows, idx, b[k].dir, b[k].d.tcp_seq, ts)
    syn_time(flows, cold, idx, b[k].ts_sec, b[k].ts_nsec, band(rshift(bnot(b[k].d.first[TCP]), 31), 1), sen + 1,
             b[k].d.tcp_seq, b[k].dir)
  end
  local p = b[k]
  local d = p.d
  local tf = d.first[TCP]               -- -1: not TCP
  local sec, nsec, pl, dir = p.ts_sec, p.ts_nsec, d.payload_length, p.dir
  p.flow_uid = account(flows, idx, dir, ts, p.wirelen, pl)
  if bor(d.tcp_flags, 1 + tf) ~= 0 then
    tcp_segment(flows, cold, idx, dir, pl, d.tcp_flags, d.tcp_seq, tf, sec, nsec)
  end
  lru_touch(lc, flows, lru, idx, sec, sen)
end

-- Loop 3 from packet k of batch b (n packets, the flows found or made): a run of packets in the for loop, which
-- does a packet's common steps (counters, TCP state and sequence ends, the LRU move) and stops at a packet with more
-- to do; that one packet is finished after the loop, then the next run starts by a tail call.  More to do: no flow
-- (non-IP, table full), a SYN without ACK (the port-reuse check, the SYN time), a flow silent for longer than
-- idle_timeout (idle expiry): stopped before any step, the whole packet done by known_packet; a retransmission or
-- the ACK completing the handshake (tcp_state's result x = r + 2 hs ~= 0): stopped after its TCP state, its rare
-- stores (tcp_rare) and LRU move done after the loop.  So every packet's steps are update()'s, in packet order.
-- Why this shape (issue 10, docs/benchmarks.md "Known flows, 2026-12-02, session 22"): the loop's root trace is
-- recorded on common packets before any traffic (prime_known_runs), and a later recording that meets an uncommon
-- packet leaves the loop at framedepth 0, which LuaJIT aborts for a root trace (lj_record.c, "leaving loop in root
-- trace"); the uncommon packets' side traces run the one packet and the tail call and link to the loop's trace
-- through its JFORI.  No loop holds the uncommon packets: a loop of its own needed a root trace that formed only by
-- chance (1 process in ~27 slow without it, session 21), and an outer loop could record a packet's whole path.
local function known_runs(self, b, n, k, flows, cold, lc, lru, idle, sen)
  local stop, rh = n, 0
  for j = k, n - 1 do
    local p = b[j]
    local idx = p.flow
    local d = p.d
    local fl = d.tcp_flags
    if idx < 0 or band(fl, 0x12) == 0x02 then stop = j break end
    local ts = p.ts_sec + p.ts_nsec * 1e-9
    if ts - flows[idx].last_ts > idle then stop = j break end
    local tf = d.first[TCP]               -- -1: not TCP
    local sec, pl, dir = p.ts_sec, d.payload_length, p.dir
    p.flow_uid = account(flows, idx, dir, ts, p.wirelen, pl)
    if bor(fl, 1 + tf) ~= 0 then
      local x = tcp_state(flows, idx, dir, pl, fl, d.tcp_seq, band(rshift(bnot(tf), 31), 1))
      if x ~= 0 then stop, rh = j, x break end
    end
    lru_touch(lc, flows, lru, idx, sec, sen)
  end
  if stop >= n then return end
  -- the packet the run stopped at, alone (no loop: see above), then the next run
  if rh ~= 0 then
    local p = b[stop]
    local idx = p.flow
    tcp_rare(cold, idx, p.dir, band(rh, 1), rshift(rh, 1), p.ts_sec, p.ts_nsec)
    lru_touch(lc, flows, lru, idx, p.ts_sec, sen)
  else
    known_packet(self, flows, cold, lc, lru, b, stop, idle, sen)
  end
  return known_runs(self, b, n, stop + 1, flows, cold, lc, lru, idle, sen)
end

-- Loop 3's root trace recorded on common packets, once per VM, at the first update_batch (prime_known_runs: a batch
-- of that call's C type): known_runs walked over PRIME_PACKETS packets of PRIME_FLOWS flows already open (TCP: ACK /
-- PSH-ACK segments of 10 bytes, sequence numbers advancing; UDP: 10-byte datagrams; both directions, one second) in
-- a scratch table.  TCP segments first; once the VM's first SAMPLE_IP IP packets are counted (sample_protocol), if
-- fewer than half were TCP (a DNS server's traffic, QUIC, say) loop 3's traces are flushed and recorded again on UDP
-- datagrams, so the trace runs the protocol the traffic mostly has and the other leaves it at the TCP test into a
-- side trace.  Why (issue 10, docs/benchmarks.md "Known flows, 2026-12-02, session 22"): LuaJIT records a loop's
-- root trace on whichever packet follows the moment the loop's hot counter runs out, and that moment differs between
-- processes (64 counters shared by bytecode address, random penalty bits after every aborted recording:
-- lj_dispatch.h, lj_trace.c penalty_pc); a trace recorded on a SYN, a retransmission or the minority protocol sent
-- every common packet out at that test (callgrind, update_batch on the ipv6 corpus: 397 instructions a packet
-- against 315; dns under a TCP trace: 401 against 324).  The choice depends only on the packets, in order, so the
-- same file gets the same trace in every process.  Only known_runs is walked (the flows are made by one update_batch
-- of each flow's first packet in both directions), so update_batch's other loops form their traces on the traffic.
local PRIME_FLOWS, PRIME_PACKETS = 4, 1024

local SAMPLE_IP = 4096

-- The protocol loop 3's trace runs (see above): counts the VM's first SAMPLE_IP IP packets (of batch b, n packets,
-- decoded) and their TCP segments; when the count is complete and fewer than half were TCP, loop 3's traces are
-- flushed and recorded again on UDP datagrams.  Counted in packet order, whatever the batches, so the same file makes
-- the same choice.
local function sample_protocol(b, n)
  for k = 0, n - 1 do
    local d = b[k].d
    if d.ip_version ~= 0 then
      sample_ip = sample_ip + 1
      if d.first[TCP] >= 0 then sample_tcp = sample_tcp + 1 end
      if sample_ip == SAMPLE_IP then
        if 2 * sample_tcp < sample_ip then
          jit.flush(known_runs)
          prime_known_runs(b, true)
        end
        return
      end
    end
  end
end

prime_known_runs = function(like, udp)
  primed = true                            -- before update_batch below: the scratch table does not prime again
  local left = sample_ip
  sample_ip = SAMPLE_IP                    -- nor count its packets
  local ft = M.new({capacity = 2 * PRIME_FLOWS, huge_pages = false, batch = PRIME_PACKETS})
  -- a batch of the caller's C type (lp_pkt[?] from the driver, lp_pkt * from the benchmarks): the trace is made
  -- for that type
  local ct = ffi.typeof(like)
  local keep, b
  if tostring(ct):find("%*>$") then
    keep = ffi.new("uint8_t[?]", PRIME_PACKETS * ffi.sizeof(like[0]))
    b = cast(ct, keep)
  else
    b = ffi.new(ct, PRIME_PACKETS)
  end
  local FRAME = 14 + 20 + 20 + 10          -- a TCP segment of 10 bytes (a UDP datagram's frame: padding after it)
  local frames = ffi.new("uint8_t[?]", PRIME_PACKETS * FRAME)
  local seq = {}
  for k = 0, PRIME_PACKETS - 1 do
    local f, srv = k % PRIME_FLOWS, band(rshift(k, 2), 1)   -- PRIME_FLOWS = 4: each round in one direction
    local q = frames + k * FRAME
    local ip = {10, 0, 0, 1 + f, 192, 0, 2, 1}
    local sp, dp = 1024 + f, udp and 53 or 80
    local a, z = 0, 4
    if srv == 1 then sp, dp, a, z = dp, sp, 4, 0 end
    for i = 0, 11 do q[i] = i end                        -- MAC addresses
    q[12], q[13] = 0x08, 0x00                            -- IPv4
    q[14], q[16], q[17], q[22], q[23] = 0x45, 0, 20 + 20 + 10, 64, 6   -- version / IHL, total length, TTL, TCP
    for i = 0, 3 do q[26 + i], q[30 + i] = ip[1 + a + i], ip[1 + z + i] end
    q[34], q[35], q[36], q[37] = rshift(sp, 8), band(sp, 255), rshift(dp, 8), band(dp, 255)
    if udp then
      q[17], q[23], q[39] = 20 + 8 + 10, 17, 8 + 10      -- total length, UDP, UDP length
    else
      local s = seq[f * 2 + srv] or (1000 + 7 * f + 100000 * srv)
      seq[f * 2 + srv] = s + 10
      q[38], q[39], q[40], q[41] = band(rshift(s, 24), 255), band(rshift(s, 16), 255), band(rshift(s, 8), 255),
        band(s, 255)
      q[45], q[46], q[47] = 1, 0x50, srv == 1 and 0x18 or 0x10         -- ack 1, data offset 5, ACK / PSH-ACK
      q[48] = 0x20                                                       -- window
    end
    local e = b[k]
    e.data, e.ts_sec, e.ts_nsec, e.wirelen, e.caplen, e.linktype = q, 1, k * 1000, FRAME, FRAME, 1
    decode.decode(e.d, q, FRAME, 1)
  end
  ft:update_batch(b, 2 * PRIME_FLOWS)       -- each connection's first segment in both directions: the flows
  for k = 2 * PRIME_FLOWS, PRIME_PACKETS - 1 do
    b[k].flow, b[k].dir = b[k % (2 * PRIME_FLOWS)].flow, b[k % (2 * PRIME_FLOWS)].dir
  end
  known_runs(ft, b, PRIME_PACKETS, 2 * PRIME_FLOWS, ft.flows, ft.cold, ft.lc, ft.lru, ft.idle_timeout, ft.capacity)
  sample_ip = left
end

--- A batch of decoded packets (lp_pkt, engine/lua/packet.lua: reads d, ts_sec,
--- ts_nsec, wirelen; writes flow, dir, flow_uid): the loops described
--- above.  flow = -1 for non-IP, -2 when the table was full.
function FT:update_batch(b, n)
  if not primed then prime_known_runs(b, false) end   -- loop 3's first trace, once per VM: TCP segments
  if sample_ip < SAMPLE_IP then sample_protocol(b, n) end   -- UDP datagrams instead when most packets are not TCP
  if n > self.nkeys then
    self.keys, self.miss, self.missj, self.nkeys = ffi.new("lp_fkey[?]", n), ffi.new("int32_t[?]", n),
      ffi.new("int32_t[?]", n), n
    self.sv, self.sj, self.sh = ffi.new("int32_t[?]", n), ffi.new("int32_t[?]", n), ffi.new("int32_t[?]", n)
  end
  local keys, miss, missj, sv, sj, sh = self.keys, self.miss, self.missj, self.sv, self.sj, self.sh
  if n > 0 and b[0].ts_sec > self.bsec then   -- the first batch of a later second: the list's tail is its cut (lru_move)
    local s0 = b[0].ts_sec
    self.bsec = s0
    self.lc.sec, self.lc.cut = s0, self.lru[self.capacity].prev
  end
  local kw = cast(i32_ptr, keys)
  local flows, cold = self.flows, self.cold
  local created0 = self.created
  -- 1. lookup (read-only).  a: keys and hashes; p.flow = 0 marks a packet to look up
  for k = 0, n - 1 do
    local p = b[k]
    local d = p.d
    local v = d.ip_version
    local x, dir = -1, 0
    if v ~= 0 and d.frag ~= 1 then     -- an IP fragment has no flow: its datagram (d.frag 2) counts it
      local h
      h, dir = make_key(keys[k], d, v)
      sh[k] = h                        -- the hashes side by side, for the loops of many flows (b)
      x = 0
    end
    p.dir = dir                        -- one store each (kf.dir is update()'s)
    p.flow = x
  end
  -- b: with more flows than the caches hold, touch the home slot of every packet; then each packet's verdict (the
  -- two first slots of its chain: verdict) into sv / sj; then the hot record each verdict names (both its cache lines;
  -- another flow's record, the home slot of most new flows once the index fills, is not what the probe reads: it
  -- compares hashes first), its LRU links and their two neighbours: independent loads in loops of a few instructions
  -- (the hashes read from sh, 16 a cache line, not from the 48-byte keys), so the CPU overlaps
  -- their cache misses across packets instead of paying them one after the other in the probe (with 100 000 flows
  -- each is a miss; a stale key of a non-IP packet reads valid slots; a verdict without a record, -1 or -2, touches
  -- the sentinel: x + band(arshift(x, 31), sen - x) is sen for x < 0).  The verdict has its own loop: in the loop of
  -- the record touches its ~25 instructions a packet left fewer record misses in flight (flows-100k +8 ns), and in the
  -- probe loop its second slot load waited for the first (docs/benchmarks.md, "dns: the probe in four loops")
  local touch = self.live >= self.touch_flows
  local lru, sen = self.lru, self.capacity
  local fw, slots, mask = self.fw, self.slots, self.mask
  if touch then
    local t = 0
    for k = 0, n - 1 do
      t = bxor(t, slots[band(sh[k], mask)].idx)
    end
    for k = 0, n - 1 do
      local j, x = verdict(slots, sh[k], mask)
      sv[k], sj[k] = x, j
    end
    for k = 0, n - 1 do
      local x = sv[k]
      local i = x + band(arshift(x, 31), sen - x)
      local rw = cast(i32_ptr, flows + i)   -- the record's words (an integer shift; i * FLOW_WORDS: key_diff_rec)
      t = bxor(t, rw[0], rw[16], lru[lru[i].prev].next, lru[lru[i].next].prev)
    end
    self.touched = t
  end
  -- c: probe
  local nmiss = 0
  if touch then
    -- what is left of the probe after the verdicts: the named record's key (touched) compared with the packet's (a
    -- verdict without a record compares record 0's, masked out); a chain past the second slot (-2) or a hash shared
    -- with another key goes to probe_chain, from the home slot (~3 % of dns's lookups, where the one-loop probe's
    -- home-slot step left its trace for 13.5 %: tests/test_flowtable_jit.py)
    for k = 0, n - 1 do
      if b[k].flow == 0 then     -- no reference to b[k] kept across the call (see probe)
        local o = k * KEY_WORDS
        local v = sv[k]
        local diff = key_diff(fw, band(v, bnot(arshift(v, 31))) * FLOW_WORDS, kw, o)
        local j, x = sj[k], v
        if bor(band(bnot(rshift(v, 31)), rshift(bor(diff, 0 - diff), 31)), same(v, -2)) ~= 0 then
          j, x = probe_chain(self, kw, o)
        end
        miss[nmiss], missj[nmiss] = k, j
        nmiss = nmiss + rshift(x, 31)
        b[k].flow = x
      end
    end
  else
    for k = 0, n - 1 do
      if b[k].flow == 0 then     -- no reference to b[k] kept across the probe (see probe)
        local j, x = probe(self, kw, k * KEY_WORDS)
        miss[nmiss], missj[nmiss] = k, j        -- kept when x < 0 (a new flow): the empty slot that ended its chain;
        nmiss = nmiss + rshift(x, 31)           -- no branch: see probe
        b[k].flow = x
      end
    end
  end
  -- d: the LRU neighbours of each packet's flow (the entries loop 3 unlinks it from when it moves: with 100 000 flows
  -- two misses per moved packet, ~25 ns/packet in loop 3) are touched in b's record loop, with the record: a packet
  -- without a flow yet (-1, -2) touches the sentinel's (always valid links, unlike a freed record's)
  -- 2. insertion of the new flows (the index grows first, never while probing).  Each goes on from the empty slot
  -- that ended its probe (probe_on): this batch's earlier insertions only filled empty slots, so the chain before
  -- that slot is unchanged, and the same key inserted by an earlier packet of the batch is at that slot or after it.
  -- A grown index moved every chain: then the slots are found again first (the batches where the index doubles).
  if nmiss > 0 then
    local size = self.size
    self:reserve(nmiss)
    self:prefault(nmiss)
    if self.size ~= size then
      for r = 0, nmiss - 1 do
        missj[r] = probe(self, kw, miss[r] * KEY_WORDS)
      end
    end
    for m = 0, nmiss - 1 do
      local k = miss[m]
      local j, x = probe_on(self, kw, k * KEY_WORDS, missj[m])
      if x < 0 then
        local p = b[k]
        x = new_flow(self, kw, k * KEY_WORDS, j, p.ts_sec + p.ts_nsec * 1e-9, p.ts_sec)
      end
      b[k].flow = x
    end
  end
  local made = self.created - created0
  self.age_fresh = made                       -- the records loop 2 appended to the age list (restart)
  -- 3. per packet, in packet order: the idle check ("Idle expiry in the packet loop"), the port-reuse check of a SYN
  -- without ACK ("Port reuse"), counters, the TCP state of a TCP segment, the LRU move (a flow's first packet of a
  -- later second).  A batch whose every packet created its flow (flows-1m: all of them; a scan, a flood) takes a
  -- loop of its own: first_packet, loop 3's work from the new records' known state (callgrind on flows-1m: 129
  -- instructions a packet against loop 3's 226; nothing of it can depend on another packet of the batch: each is
  -- another flow).  Any other batch: known_runs, runs of the common steps stopped at the packets with more to do
  -- (a per-packet test or a list of packets built in a loop before it cost mixed-zipf and dns +40-60 instructions a
  -- packet: docs/benchmarks.md, "flows-1m: a batch of new flows' first packets"; a classifying loop and runs
  -- between its packets, +30 on dns: "Known flows, 2026-12-02, session 21")
  if made == n then
    for k = 0, n - 1 do
      local d = b[k].d
      local tf = d.first[TCP]               -- -1: not TCP
      b[k].flow_uid = first_packet(flows, cold, b[k].flow, b[k].dir, b[k].wirelen, d.payload_length, d.tcp_flags,
                                   d.tcp_seq, band(rshift(bnot(tf), 31), 1), b[k].ts_sec, b[k].ts_nsec, sen + 1)
    end
    return
  end
  local lc = self.lc                    -- the LRU list's cut (lru_move)
  local idle = self.idle_timeout
  return known_runs(self, b, n, 0, flows, cold, lc, lru, idle, sen)
end

-- deletion -------------------------------------------------------------------------
--- Unlink flow idx whose key hashes to h (hash_key) from the table: its index slot (backward-shift deletion), its LRU
--- and age links, a free-stack push (free_flow and expire() mark it free: live = 0, ft.live - 1).
local function unlink_flow(self, idx, h)
  local mask = self.mask
  local slots = self.slots
  local i = band(h, mask)                    -- its slot: on the probe chain from its home slot
  while slots[i].idx ~= idx do i = band(i + 1, mask) end
  -- backward-shift deletion
  local j = i
  while true do
    j = band(j + 1, mask)
    local x = slots[j].idx
    if x < 0 then break end
    local k = band(slots[j].hash, mask)     -- home slot of the entry at j
    -- the entry at j may move to the hole i unless its home lies cyclically in (i, j]
    local stay
    if i <= j then
      stay = i < k and k <= j
    else
      stay = i < k or k <= j
    end
    if not stay then
      slots[i].idx = x
      slots[i].hash = slots[j].hash
      i = j
    end
  end
  slots[i].idx = -1
  local lru = self.lru
  if idx == self.lc.cut then self.lc.cut = lru[idx].prev end
  lru_unlink(lru, idx)
  local c = self.cold[idx]
  age_unlink(self.cold, c)
  lru[idx].prev, lru[idx].next, c.aprev, c.anext = -1, -1, -1, -1
  local t = self.free_top
  self.free_stack[t] = idx
  self.free_top = t + 1
end

local function free_flow(self, idx)
  local e = self.flows[idx]
  if e.live == 0 then return false end
  unlink_flow(self, idx, hash_key(e.key))
  e.live = 0
  self.live = self.live - 1
  return true
end

function FT:is_live(idx)
  return idx >= 0 and idx < self.hw and self.flows[idx].live ~= 0
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

--- Every flow ends at once (the end of input, after the driver exported them all by walking the LRU list
--- without freeing each: Driver:flush_flows): the table is emptied as new, its counters as after n terminate()
--- calls (n = the live flows).  Freeing a flow one at a time costs its index slot, its LRU and age neighbours
--- (two random records) and a free-list push; here a memset of the used records (256 bytes each), their LRU
--- links and the index (issue 10: tools/bench/flush_cost.py, docs/benchmarks.md "End-of-run flow export").
function FT:clear()
  local cap = self.capacity
  self.terminated = self.terminated + self.live
  ffi.fill(self.flows, self.hw * FLOW_SIZE)             -- records [0, hw): zero, as never used (new_flow)
  ffi.fill(self.cold, self.hw * COLD_SIZE)
  ffi.fill(self.lru, self.hw * ffi.sizeof("lp_link"))
  ffi.fill(self.slots, self.size * ffi.sizeof("lp_slot"), 0xff)
  self.hw, self.free_top, self.live = 0, 0, 0
  self.lc.cut, self.lc.sec, self.bsec = cap, -1, -1
  local sen = self.cold[cap]                            -- the age list's links are in the cold part (68b83d0)
  sen.aprev, sen.anext = cap, cap
  self.lru[cap].prev, self.lru[cap].next = cap, cap
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
  local cap = self.capacity
  local cold = self.cold
  local sen = cold[cap]
  local lru = self.lru
  -- the LRU list is ordered by lsec, and lsec <= last_ts: once now - lsec <= idle no later flow can
  -- be idle.  Flows before that point that are not idle (their last packet is in that boundary
  -- second, after now - idle) stay and are stepped over.  EXPIRE_CHUNK idle flows at a time, in four small loops
  -- that each compile on their own (one loop with free_flow's two loops inside made a different trace tree in each
  -- process: 289-848 ns a flow, docs/benchmarks.md): (1) the walk collects them (the list's links one after the
  -- other, each record's line 2 an independent load), (2) their key lines and cold lines are loaded and their keys
  -- hashed, their index slots loaded, in a loop of independent loads, (3) fn per flow, then marked free (live 0,
  -- ft.live - 1: what is_live / terminate see, as if freed), (4) each unlinked from the index and both lists.  A flow
  -- that an earlier fn ended or reused (live, id) is skipped by (3) and (4), as if the walk had not reached it; one
  -- that its own fn ended by (4).
  local ids, uids, hs = self.xids, self.xuids, self.xhs
  local fw, cw = self.fw, cast(i32_ptr, cold)
  local t = 0
  local kept = cap             -- the last flow stepped over (the sentinel: none)
  local more = true
  while more and n < max do
    local lim = max - n
    if lim > EXPIRE_CHUNK then lim = EXPIRE_CHUNK end
    local m = 0
    local i = lru[kept].next
    while m < lim do                                       -- (1)
      if i == cap then more = false; break end
      local e = flows[i]
      if now - e.last_ts > idle then
        ids[m], uids[m] = i, e.id
        m = m + 1
      elseif now - e.lsec > idle then
        kept = i
      else
        more = false; break
      end
      i = lru[i].next
    end
    local slots, mask = self.slots, self.mask              -- (fn may have grown the index)
    for k = 0, m - 1 do                                    -- (2)
      local x = ids[k]
      local h = hash_key(fw + x * FLOW_WORDS)
      hs[k] = h
      t = bxor(t, cw[x * COLD_WORDS], slots[band(h, mask)].idx)
    end
    for k = 0, m - 1 do                                    -- (3)
      local x = ids[k]
      local e = flows[x]
      local id = uids[k]
      if e.live ~= 0 and e.id == id then
        e.state = bor(e.state, TIMEDOUT)
        if fn then fn(x, IDLE) end
        n = n + 1
        if e.live ~= 0 and e.id == id then
          e.live = 0                                       -- freed as far as fn and the counters go: is_live,
          self.live = self.live - 1                        -- terminate see it so for the chunk's later flows
        else
          ids[k] = -1                                      -- fn freed it itself
        end
      else
        ids[k] = -1                                        -- an earlier flow's fn freed it
      end
    end
    for k = 0, m - 1 do                                    -- (4)
      local x = ids[k]
      if x >= 0 then unlink_flow(self, x, hs[k]) end
    end
  end
  self.expired_idle = self.expired_idle + n
  self.xtouched = t                                        -- kept, so the loads are
  while n < max do
    local i = sen.anext
    if i == self.capacity then break end
    local e = flows[i]
    if not (now - cold[i].first_ts > active) then break end
    local id = e.id
    if fn then fn(i, ACTIVE) end
    if e.live ~= 0 and e.id == id then free_flow(self, i) end
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
  local lru = self.lru
  local i = lru[sen].next
  while i ~= sen do
    local nxt = lru[i].next
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

--- The lp_flow_cold record of idx (first_ts, rtt, retrans_az/za, porta, portz, ipver, proto...), as entry.
function FT:cold_entry(idx)
  if idx < 0 or idx >= self.capacity then error("flowtable: bad flow index " .. tostring(idx), 2) end
  return self.cold[idx]
end

-- keys: rebuilt into a scratch lp_decoded (src = A, dst = Z) and formatted by
-- decode itself, so the strings are identical to decode.flowkey's.
local function to_scratch(self, idx)
  local e, c = self:entry(idx), self.cold[idx]
  local d = self._scratch
  d.ip_version = c.ipver
  d.ipproto = c.proto
  d.sport = c.porta
  d.dport = c.portz
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

--- Write flowkey(idx) into buf (uint8_t[>= 83]) without making a Lua string; returns its length
--- (decode.put_flowkey: 41 bytes for IPv4, 83 for IPv6).
function FT:put_key(idx, buf)
  return decode.put_flowkey(buf, to_scratch(self, idx))
end

--- Counters as a plain table (tools / tests).
function FT:stats()
  return {
    live = self.live, created = self.created, expired = self.expired,
    expired_idle = self.expired_idle, expired_active = self.expired_active,
    terminated = self.terminated, full_drops = self.full_drops, renewed = self.renewed,
    capacity = self.capacity, size = self.size,
  }
end

return M
