--[[
luaprobe.engine.capture.capture — the capture process's loop: walk a mapped capture file
with luaprobe.engine.capture.pcapfile and copy each record into the packet ring.  From
files the ring applies backpressure: when it is full the loop waits for
space, so nothing is ever lost.

Sharded runs (engine/fastpath/shards.py) hand the loops a *sharder* instead of one
ring: `r:pick(ptr, caplen, linktype, ts_sec)` decodes the frame and returns
the ring of the packet's shard (symmetric hash of the IP address pair, so
both directions of a flow and every fragment of a datagram land on one
shard; non-IP on shard 0), and sends a TIME record to the other shards when
the packet opens a new second.  `publish` (every 1024 records of a file, 64 of
a stream) makes every ring's records visible but checks a shard's doorbell only
once WAKE_PACKETS of its packets (or an eighth of its ring) went in since the
last check; `flush` (the end of a walk, before the loop waits for space) checks
every doorbell (Sharder:publish).
]]
local ffi = require("ffi")
local bit = require("bit")
local ring = require("luaprobe.shm.ring")
local clock = require("luaprobe.shm.clock")
local pcapfile = require("luaprobe.engine.capture.pcapfile")
local packet = require("luaprobe.engine.plugins.packet")
local decode = require("luaprobe.engine.fastpath.decode")

local cast, copy = ffi.cast, ffi.copy
local REC, recp = packet.REC_SIZE, packet.recp
local u32p = ffi.typeof("const uint32_t *")
local bxor, rshift = bit.bxor, bit.rshift
pcall(ffi.cdef, "void *memmove(void *dest, const void *src, size_t n);")
pcall(ffi.cdef, [[
int lp_cutguard_arm(const void *addr, uint64_t len, int fd);
double lp_fsize(int fd);
double lp_cutguard_end(void);
typedef struct { double at, fin, tail, pushed, bytes; int32_t ring; } lp_cap_log;
]])
pcall(ffi.cdef, [[
void *mmap(void *addr, size_t length, int prot, int flags, int fd, int64_t offset);
int munmap(void *addr, size_t length);
]])
local C = ffi.C
local S = ring.lib                               -- _lpsync (shm/_lpsync.c): the cut guard, lp_fsize
local M = {}
--- Records between publishes (push): a stream's, and a mapped file's, which are published only after an fstat() of
--- the file (a system call, and the TLB misses after it: at every 64th record the file loop took 18.4 ns a packet of
--- small-few instead of 11.7, at every 1024th 12.4; tools/bench/capture_ab.py, medians of 5 rounds)
local STREAM_EVERY, FILE_EVERY = 64, 1024

--- Shard (0-based) of a decoded packet among `n`: XOR of the 32-bit words of both
--- addresses (commutative, so A->B and B->A agree; fragments carry the same
--- addresses as their datagram's first fragment), mixed by a 64-bit Fibonacci multiply
--- whose TOP 32 bits pick the shard by multiply-shift (h * n / 2^32): Knuth's Fibonacci
--- hashing takes the high bits, the well-mixed ones; taking `h mod n` (the low bits of the
--- high half) put 12 of 16 neighbouring clients 192.0.2.10-25 -> one server on one of 2 shards.
--- Non-IP: shard 0.
function M.shard_of(d, n)
  if d.ip_version == 0 then return 0 end
  local s, t = cast(u32p, d.src), cast(u32p, d.dst)
  local x = bxor(s[0], s[1], s[2], s[3], t[0], t[1], t[2], t[3])
  local h = rshift(ffi.cast("uint64_t", ffi.cast("uint32_t", x)) * 0x9E3779B97F4A7C15ULL, 32)
  return tonumber(rshift(h * n, 32))
end

local Sharder = {}
Sharder.__index = Sharder

--- LuaJIT's limit of IR constants per trace in a VM that builds a sharder (M.sharder); 1 000 was enough for every
--- corpus capture (tools/bench/corpus.py).
M.MAX_IR_CONSTANTS = 2000

--- Packets put into one shard's ring between two checks of its doorbell while the loop publishes (Sharder:publish).
M.WAKE_PACKETS = 4096

--- A sharder over the Lua array `rings` (ring i+1 belongs to shard i).  `pushed` (optional): an array of
--- n uint64_t pointers where publish() / flush() store the packets committed to each ring so far (the shards'
--- doorbell segments, engine/fastpath/shards.py PUSHED_OFFSET: the capture side of the loss accounting).
function M.sharder(rings, pushed)
  -- The copy loop's trace with pick() inlined (decode.decode, the hash, the TIME check) holds more than LuaJIT's
  -- default 500 IR constants (maxirconst): it aborted "trace too long", its start was blacklisted and the loop ran
  -- in the interpreter, ~450 ns per packet against ~35 compiled (small-few; 1 100-1 800 on mixed-zipf / vlan-mpls;
  -- docs/benchmarks.md "Flow-sharded fast paths").  Per VM: this is the capture process's (or a test's).
  require("jit").opt.start("maxirconst=" .. M.MAX_IR_CONSTANTS)
  local counts, rung, rung_at = {}, {}, {}
  for i = 1, #rings do counts[i], rung[i], rung_at[i] = 0, 0, rings[i].tail_local end
  return setmetatable({ rings = rings, n = #rings, d = decode.new(), sec = -1, counts = counts, last = 1,
                        pushed = pushed, rung = rung, rung_at = rung_at }, Sharder)
end

--- The ring of this frame's shard; on a new packet-time second every other
--- shard gets a TIME record first (waiting for space like packets do), made
--- visible at once without a doorbell check (a shard asleep sees it when it
--- is woken for packets; records past a published tail are always packets).
--- ptr, caplen, linktype: the frame; ts_sec, ts_nsec: its time (s, ns: the TIME record's text is "sec usec", the
--- µs of the packet that opened the second); stop: the wait's stop check.  nil when the file was cut below the
--- records read so far (self.settle, the file walk's check before a new second: the walk ends there).
function Sharder:pick(ptr, caplen, linktype, ts_sec, stop, ts_nsec)
  local d = self.d
  decode.decode(d, ptr, caplen, linktype)
  local k = M.shard_of(d, self.n)
  if ts_sec ~= self.sec then
    if self.settle and not self.settle() then return nil end  -- the file's records checked first (push's settle)
    self.sec = ts_sec
    -- "sec usec": the time of the packet that opened the second, which every shard's tick stamps its idle expiry
    -- of HTTP/TLS and reassembled flows with (engine/fastpath/run.py _tick), as one fast path does
    local text = ("%d %d"):format(ts_sec, math.floor((ts_nsec or 0) / 1000))
    for i = 1, self.n do
      if i ~= k + 1 and M.put_control(self.rings[i], packet.TIME, text, stop, ts_sec, self) then
        self:_publish_ring(i, false)
      end
    end
  end
  self.last = k + 1
  return self.rings[k + 1]
end

--- The packet from the last pick() was committed to its ring: count it.
function Sharder:committed()
  local i = self.last
  self.counts[i] = self.counts[i] + 1
end

--- Ring i's records made visible, with its doorbell checked (`bell`: a sleeping shard is woken) or not (a
--- release store only); its packet count stored for the loss accounting.
function Sharder:_publish_ring(i, bell)
  local r, c = self.rings[i], self.counts[i]
  if bell then
    r:publish()
    self.rung[i], self.rung_at[i] = c, r.tail_local
  else
    r:expose()
  end
  if self.pushed then self.pushed[i][0] = c end
end

--- The loop's periodic publish: make each ring's committed records visible, and check the doorbell of a ring only
--- once M.WAKE_PACKETS packets or an eighth of its bytes went into it since its last check.  A shard that went to
--- sleep on an empty ring is therefore woken once per WAKE_PACKETS of its packets, not at every publish (capture
--- process slower than its shards, light hooks: ~9 500 futex wakes and voluntary context switches of the shards for
--- 500 000 packets when the loop published every 64 records, the shards' idle path on every one,
--- docs/benchmarks.md); a shard that is awake sees the exposed records at its next fill.  No sleeper waits past the
--- walk: flush() at its end and before the loop waits for space checks every ring's doorbell.
function Sharder:publish()
  local rung, rung_at, counts, rings = self.rung, self.rung_at, self.counts, self.rings
  for i = 1, self.n do
    local r = rings[i]
    self:_publish_ring(i, counts[i] - rung[i] >= M.WAKE_PACKETS or r.tail_local - rung_at[i] >= r.cap / 8)
  end
end

--- Publish every ring with its doorbell checked (the end of a walk, and before the loop sleeps for space).
function Sharder:flush()
  for i = 1, self.n do self:_publish_ring(i, true) end
end

--- The publish that ends a walk or precedes a wait: Ring:publish, or the sharder's flush.
function M.flush(r)
  if r.rings then r:flush() else r:publish() end
end

--- Refill slack of a file's producer (shm/ring.lua): once the packet ring is full, sleep until a quarter of it is
--- free, not until the next record fits: one futex wake per quarter ring instead of one per fast-path batch (the
--- consumer still holds three quarters of a ring of packets meanwhile).  Not for a sharder: one full shard would
--- hold back the packets of the others for a quarter ring.
function M.refill_slack(r)
  if r.rings then return 0 end
  return r.cap / 4
end

pcall(ffi.cdef, "int madvise(void *addr, size_t len, int advice);")
local MADV_POPULATE_READ = 22                    -- Linux >= 5.14 (include/uapi/asm-generic/mman-common.h)
local PAGE = 4096                                -- (a kernel with larger pages refuses the unaligned call: EINVAL,
                                                 -- and map_ahead turns itself off for that file)

--- Mapping a capture file's pages ahead of the reader while the loop would sleep for ring space.  Left to the copy, a
--- mapped file's pages come into the capture process by minor faults, one per 64 KiB (fault-around), and the copy of
--- mixed-zipf then took 133-173 ns a packet in the pipeline against 93-117 for pages mapped before (docs/benchmarks.md
--- "The fast path waits for the capture process", session 17): slower than the fast path reading the ring (~110), which
--- slept on an empty ring.  When the packet ring is full (the fast path still starting up, or busy) the loop used to
--- sleep until a quarter of it was free (the refill slack); it now first maps the file's next AHEAD_CHUNK bytes
--- (madvise MADV_POPULATE_READ, ~320 ns a 4 KiB page, this thread), chunk after chunk, up to AHEAD_WINDOW bytes past
--- the reader, and sleeps only once those are mapped or the ring has that room.  Only in time the loop would have
--- slept: mapped in line, a chunk before the copy reaches it, the cold copy got slower (mixed-zipf 108 -> 116 ns a
--- packet, http 188 -> 201), and on a helper thread of its own, slower still (docs/benchmarks.md, session 16).
M.AHEAD_CHUNK = 1048576
M.AHEAD_WINDOW = 256 * 1048576
--- Bytes mapped ahead and madvise calls in this process (tests/test_capture_map_ahead.py; the run summary reads the
--- per-ring count in the ring's header instead, Ring:mapped_ahead).
M.ahead_bytes, M.ahead_calls = 0, 0

--- Map the next chunk of reader rd's file, if less than `lead` bytes past its offset are mapped (rd.ahead: the file
--- offset mapped up to; nil: not a mapped file, or the kernel refused once: EINVAL before Linux 5.14, EFAULT for a
--- file cut under us, ...: the loop's reads then fault the pages in as before).  Returns the bytes it mapped (whole
--- pages), 0 when the window is mapped or mapping is off.
local function map_ahead(rd, lead)
  local from = rd.ahead
  if from == nil then return 0 end
  local off = rd.offset
  if from < off then from = off - off % PAGE end      -- the reader went past what was mapped ahead
  local limit = math.min(rd.size, off + lead)
  if from >= limit then rd.ahead = from; return 0 end
  local len = math.min(M.AHEAD_CHUNK, limit - from)
  if C.madvise(cast("void *", rd.base + from), len, MADV_POPULATE_READ) ~= 0 then
    rd.ahead = nil
    return 0
  end
  local to = from + len
  to = to + (PAGE - to % PAGE) % PAGE                 -- madvise maps whole pages; the next call starts page-aligned
  rd.ahead = to
  M.ahead_bytes, M.ahead_calls = M.ahead_bytes + to - from, M.ahead_calls + 1
  return to - from
end
M.map_ahead = map_ahead

--- Reserve n bytes in ring r, waiting for space (publishing first: r's own records, or with `all`, the sharder r
--- belongs to, every ring's, so that no other shard sleeps on records it cannot see while this waits).  `rd`
--- (optional): the mapped file's reader, whose pages are mapped ahead (map_ahead) while the ring has less than
--- `slack` bytes more than the record free, before the loop sleeps; the bytes mapped are added up in r's header
--- (Ring:mapped_ahead: the run summary's packet_ring_mapped_ahead_mb).
local function reserve(r, n, stop, slack, all, rd)
  local p = r:reserve(n)
  while p == nil do
    if all then all:flush() else r:publish() end
    if rd ~= nil then
      local want = r:footprint(n) + math.min(slack, r.cap - r:footprint(n))
      while r:free_bytes() < want do
        local got = map_ahead(rd, M.AHEAD_WINDOW)
        if got == 0 then break end
        r.ahead_p[0] = r.ahead_p[0] + got
        if stop() then return nil end
      end
    end
    r:wait_space(n, 50e6, slack)
    if stop() then return nil end
    p = r:reserve(n)
  end
  return p
end

--- Reserve, fill and commit a control record in ring `r` (not yet published); waits for space like a packet
--- (`all`: the sharder r belongs to, see reserve).  False when stop() ended the wait.
function M.put_control(r, kind, text, stop, ts_sec, all)
  local p = reserve(r, REC + #text, stop or function() return false end, 0, all)
  if p == nil then return false end
  local h = cast(recp, p)
  ffi.fill(h, REC, 0)
  h.kind, h.caplen, h.ts_sec = kind, #text, ts_sec or 0
  copy(p + REC, text, #text)
  r:commit()
  return true
end

--- Push a control record (EOF / ERROR / END / TIME) with a text payload, published at once.
--- To a sharder: END goes to every shard, the others to shard 0.
function M.control(r, kind, text, stop, ts_sec)
  if r.rings then
    if kind == packet.END then
      for i = 1, r.n do M.control(r.rings[i], kind, text, stop) end
      return
    end
    r = r.rings[1]
  end
  if M.put_control(r, kind, text, stop, ts_sec) then r:publish() end
end

--- Paced replay (engine/capture/process.py --speed, [source] speed): 0 = as fast as the ring takes the records; > 0 =
--- packet time advances M.speed seconds per second of the monotonic clock, as tcpreplay's --multiplier does.  The
--- pace's anchor: the (shifted) packet time and clock time of the first packet pushed since it was last reset (at
--- each file, M.file, and stream, M.stream, except a looped pass's files after the first, whose shift puts them one
--- second after the newest packet: the pace goes on across passes).  A packet whose time lies ahead of
--- anchor time + speed x (clock - anchor clock) is pushed only when it is due: the records committed before it are
--- published first (the fast path sees them) and the loop sleeps in slices of at most PACE_SLICE s, checking stop().
M.speed, M.pace_t0, M.pace_w0 = 0, nil, nil
M.PACE_SLICE = 0.05                      --- s: the longest sleep between two stop() checks while a packet is not due
local function clock_s() return clock.now_ns() * 1e-9 end   -- monotonic s (shm/clock.lua)

--- The packet time (s) that may be pushed now; the first call after a reset anchors the pace at packet time t.
local function pace_due(t)
  local now = clock_s()
  if M.pace_t0 == nil then M.pace_t0, M.pace_w0 = t, now end
  return M.pace_t0 + M.speed * (now - M.pace_w0)
end

--- Sleep until packet time t is due (slices of at most PACE_SLICE s; a signal ends a slice early).  Returns the
--- packet time due then, or nil when stop() said so first.
local function pace_wait(t, stop)
  local at = M.pace_w0 + (t - M.pace_t0) / M.speed      -- clock time (s) at which t is due
  while true do
    if stop() then return nil end
    local now = clock_s()
    if now >= at then return M.pace_t0 + M.speed * (now - M.pace_w0) end
    clock.sleep_until(math.min(at, now + M.PACE_SLICE) * 1e9)   -- EINTR (SIGTERM): stop() is looked at next
  end
end

-- Copy the records reader rd returns into ring r (or a sharder) until it returns nil or stop() says so:
-- packets, bytes, stopped (stop is checked while waiting for ring space and every 4096 records)
M.clipped = 0    --- records cut to the packet ring's record limit (engine/capture/process.py warns)
--- A looped replay (engine/capture/process.py --loop): seconds added to every packet's time (0: none), and the
--- first packet's own second and the newest second pushed so far (after the shift), nil before any packet.
M.shift, M.first_sec, M.max_sec, M.rebase = 0, nil, nil, false

--- The records of a mapped file committed since the last publish, one entry each (push; a stream logs none: it is
--- never cut-checked): the file offsets where the record's bytes
--- start (`at`, after the blocks before it) and end (`fin`), its ring (1-based in a sharder) and that ring's producer
--- position and record count before it (`tail`, `pushed`), and the run's byte count before it.
local LOG = ffi.new("lp_cap_log[?]", FILE_EVERY + 1)

--- A file cut (truncated in place) while it is read: the records committed since the last publish that end past
--- the file's size `now` are taken back from their rings (Ring:rewind), so that the publish after it shows only
--- records the file still holds.  Returns how many entries of the log are kept.
local function take_back(r, rings, since, now)
  local keep = since
  while keep > 0 and LOG[keep - 1].fin > now do keep = keep - 1 end
  for i = since - 1, keep, -1 do
    local e = LOG[i]
    rings[e.ring]:rewind(e.tail, e.pushed)
    if r.counts then r.counts[e.ring] = r.counts[e.ring] - 1 end
  end
  return keep
end

--- The error of a file cut to `now` bytes whose walk went past its new end, the records before file offset `done`
--- walked: the error a file that short gives at the first record it no longer holds (the walker reads it again with
--- the new size); the capture header cut: at offset 0, with the header's error; cut at a record's end: the cut; cut
--- behind records read and checked before it (published, push's settle): at the end of those records.
local function cut_error(rd, done, now)
  if now < rd.header_end then
    local _, msg = pcall(pcapfile.open, rd.base, now)
    rd.error = ("the file was cut to %d bytes while it was read: %s"):format(now, (tostring(msg):gsub("^offset %d+: ", "")))
    rd.error_offset = 0
    return
  end
  rd.offset, rd.error, rd.error_offset = done, nil, nil
  local more = rd:next()
  if more == nil and rd.error then return end
  rd.error = done > now and ("the file was cut to %d bytes after the records before this offset were read"):format(now)
             or ("the file was cut to %d bytes while it was read"):format(now)
  -- the file ends cleanly at the cut: where the walk of what it holds ended, past blocks that hold no record (pcapng:
  -- an interface block right before the cut; before, the offset named the end of the last record, or the SHB's)
  rd.error_offset = (more == nil and rd.offset > done) and rd.offset or done
end

-- A packet record (lp_pktrec, engine/plugins/packet.lua) holds its seconds as 32 bits: 1970-01-01 .. 2106-02-07
-- 06:28:15 UTC.  A packet time outside -- a pcapng if_tsoffset or tick count before 1970 or after 2106 (the reader
-- gives it exactly, up to 2^53 s), a classic record at 2^32 - 1 s whose fraction carries -- is refused at its
-- record, an input error: before, it was stored modulo 2^32 (if_tsoffset -2e9 s: 1906 became 2042; 9e9 s: 2255
-- became 1983), a wrong time in every bucket and row, exit 0 (tests/test_packet_time_range.py).
local MAX_SEC = 4294967295
local function time_range(sec)
  local ok, day = pcall(os.date, "!%Y-%m-%d %H:%M:%S", sec)
  return ("packet time %.0f s%s is outside 1970-01-01 00:00:00 .. 2106-02-07 06:28:15 UTC, the times luaprobe's "
    .. "packet records hold (32-bit seconds)"):format(sec, ok and day and (" (" .. day .. " UTC)") or "")
end

-- Byte offset of the record whose frame is at `ptr`: its packet block (pcapng: an EPB or PB's 28 header bytes; an
-- SPB takes the time of the packet block before it) or its record header (pcap), not the first block rd:next()
-- walked (an interface block before it).
local function record_at(rd, ptr)
  local head = rd.format == "pcapng" and 28 or rd.hdrlen
  return tonumber(cast("intptr_t", ptr) - cast("intptr_t", rd.base)) - head
end

--- A mapped file that grew while it was read (tcpdump -w / dumpcap still writing it, a copy under way): at the end of
--- what is mapped (the walker returned nil: the end, or a record running past it), fstat() the file; when it holds
--- more, map it again at its new size (a mapping of our own, rd.grown: the first one is process.py's), move the
--- walker onto it (offsets stay file offsets) and the cut guard with it, drop the walker's error (an error at the old
--- end is read again with the new size: the same bytes give the same error, a record completed since is read), and
--- return true.  False: no growth (the walk ends as before), a cut (settle's business: the guard mapped zeros over a
--- page, or the size went down), or no new mapping (rd.error says so).  Called only at the end of the mapped bytes,
--- never per record; it does not wait for growth to come (streams: `--pcap -`, a FIFO).
local PROT_READ, MAP_SHARED = 1, 1
local function grow(rd, fd)
  if rd.cut then return false end
  local now = S.lp_fsize(fd)
  if now <= rd.size or S.lp_cutguard_end() < rd.size then return false end
  local a = C.mmap(nil, now, PROT_READ, MAP_SHARED, fd, 0)
  if cast("intptr_t", a) == -1 then
    rd.error = ("the file grew to %.0f bytes while it was read and cannot be mapped again (mmap errno %d)")
               :format(now, ffi.errno())
    rd.error_offset = rd.offset
    return false
  end
  local rc = S.lp_cutguard_arm(a, now, fd)
  if rc ~= 0 then C.munmap(a, now); error("offset 0: cannot guard the mapping (sigaction: " .. rc .. ")", 0) end
  if rd.grown then C.munmap(rd.grown, rd.grown_size) end
  rd.grown, rd.grown_size = a, now
  rd.base, rd.size, rd.error, rd.error_offset = cast("const uint8_t *", a), now, nil, nil
  if rd.ahead then rd.ahead = 0 end     -- a new mapping: nothing of it mapped ahead yet
  return true
end

--- The walker's next record after the end of the mapped bytes: grow (above) as long as the file grew and the walker
--- finds no record in the new bytes (a pcapng block that holds none, or nothing new); nil at the end.
local function next_grown(rd, fd)
  while grow(rd, fd) do
    local ptr, caplen, wirelen, ts_sec, ts_nsec, linktype, ifindex = rd:next()
    if ptr ~= nil then return ptr, caplen, wirelen, ts_sec, ts_nsec, linktype, ifindex end
  end
  return nil
end

local function push(r, rd, stop, fd)
  local n, bytes, since, stopped = 0, 0, 0, false
  local sharded = r.rings ~= nil
  local rings = sharded and r.rings or { r }
  local slack = M.refill_slack(r)
  local shift, top, first = M.shift, M.max_sec or -1, M.first_sec
  local rebase = M.rebase and M.max_sec ~= nil   -- a looped pass after the first: this file's first packet sets shift
  if rebase then first = nil end
  local every = fd and FILE_EVERY or STREAM_EVERY
  local done = rd.offset          -- file offset where the records committed so far end
  local logged = fd ~= nil        -- the cut log (take_back): a mapped file's only; a stream has no cut check.  Loop-
                                  -- invariant, so its test is hoisted out of the compiled loop (a guard before it)
  local cut = false               -- a cut ended the walk (rd.error says where)
  local paced = M.speed > 0       -- loop-invariant, like `logged`: speed 0 costs the loop nothing per packet
  local due = -math.huge          -- paced: the packet time known to be due without reading the clock
  -- Publish every committed record.  A mapped file (fd): only after fstat() shows the file still holds them.  Sizes
  -- only shrink, so a record the file holds now held real bytes when it was read (past the end a read gets zeros: the
  -- rest of the new end's page, or a page the cut guard mapped over a SIGBUS, M.file).  The file cut below the
  -- walker's size: records past the new end are taken back, the walker's size becomes the new end, and when it had
  -- read past it the record at the new end is read again, for the error a file that short gives (the walk ends);
  -- else the walk goes on up to the new end.  Returns false when the cut ended the walk.  (A file cut and written
  -- again past the cut between two checks: the pages the guard mapped over still end it (lp_cutguard_end); the rest
  -- of the new end's page, if it was read as zeros before the writes, is not seen.)  `final` (the end of the walk,
  -- before a wait for space): a sharder checks every shard's doorbell (M.flush), as it does after a cut.
  local function settle(final)
    if fd then
      local now, zeros = S.lp_fsize(fd), S.lp_cutguard_end()   -- the guard's zero pages hold no record, whatever
      if zeros < now then now = zeros end                      -- was written there since
      if now >= 0 and now < rd.size then
        local keep = take_back(r, rings, since, now)
        if keep < since then n, bytes, done = n - (since - keep), LOG[keep].bytes, LOG[keep].at end
        rd.size, rd.cut = now, true
        if keep < since or rd.error or rd.offset > now then
          cut_error(rd, done, now)
          cut = true
        end
      end
    end
    if final or cut then M.flush(r) else r:publish() end
    since = 0
    return not cut
  end
  if sharded then r.settle = settle end
  while true do
    if n % 4096 == 4095 and stop() then stopped = true; break end
    local at = rd.offset
    local ptr, caplen, wirelen, ts_sec, ts_nsec, linktype, ifindex = rd:next()
    if ptr == nil then
      if not rd.grows then break end                      -- a stream (its caller feeds the bytes that come), or a
                                                          -- prefix of a file (file()'s `grows` not given)
      ptr, caplen, wirelen, ts_sec, ts_nsec, linktype, ifindex = next_grown(rd, fd)   -- the file grew meanwhile
      if ptr == nil then break end
    end
    if first == nil then
      first = ts_sec
      if rebase then shift, rebase, M.rebase = top + 1 - ts_sec, false, false end
    end
    if ts_sec + shift < 0 or ts_sec + shift > MAX_SEC then    -- the record's seconds are 32 bits (time_range)
      rd.error, rd.error_offset, rd.offset = time_range(ts_sec + shift), record_at(rd, ptr), at
      break
    end
    ts_sec = ts_sec + shift
    if paced then                 -- a packet ahead of the pace: publish what is committed, wait until it is due
      local t = ts_sec + ts_nsec * 1e-9
      if t > due then
        due = pace_due(t)
        if t > due then
          if not settle(true) then break end
          due = pace_wait(t, stop)
          if due == nil then stopped = true; break end
        end
      end
    end
    if ts_sec > top then top = ts_sec end
    local rr, k = r, 1
    if sharded then
      rr = r:pick(ptr, caplen, linktype, ts_sec, stop, ts_nsec)
      if rr == nil then break end
      k = r.last
    end
    if REC + caplen > rr.max_record then     -- longer than half the packet ring (--packet-ring-mb 1: 512 KiB): cut
      caplen = rr.max_record - REC           -- to fit, as a smaller snaplen would (wirelen kept); was an input error
      M.clipped = M.clipped + 1              -- that named capture.lua and ended the file at "byte offset 0"
    end
    local tail, pushed = rr.tail_local, rr.pushed_local
    local p = rr:reserve(REC + caplen)
    if p == nil then
      if not settle(true) then break end      -- the file's records are checked and published before the wait
      p = reserve(rr, REC + caplen, stop, slack, nil, fd and rd)
      if p == nil then stopped = true; break end
    end
    local h = cast(recp, p)
    h.kind, h.ts_sec, h.ts_nsec, h.wirelen, h.caplen = packet.PKT, ts_sec, ts_nsec, wirelen, caplen
    h.linktype, h.ifindex = linktype, ifindex
    copy(p + REC, ptr, caplen)
    rr:commit()
    if sharded then r:committed() end
    if logged then
      local e = LOG[since]
      e.at, e.fin, e.tail, e.pushed, e.bytes, e.ring = at, rd.offset, tail, pushed, bytes, k
      done = rd.offset
    end
    n, bytes, since = n + 1, bytes + wirelen, since + 1
    if since >= every and not settle() then break end
  end
  if not cut then settle(true) end
  if sharded then r.settle = nil end
  if rd.cut and not rd.error and not stopped then         -- cut at a record's end: still not the file it was
    rd.error, rd.error_offset = ("the file was cut to %d bytes while it was read"):format(rd.size), rd.size
  end
  if top >= 0 then M.max_sec = top end
  M.first_sec, M.shift = first, shift
  return n, bytes, stopped
end

--- Before each file of a looped replay's passes after the first: shift its packets so that its first packet comes
--- one second after the newest packet pushed so far, keeping their spacing (packet time goes on as in a live feed;
--- without it every pass after the first was "late" and its counters piled into the first pass's last bucket,
--- nothing flushed until the stop).  Per file, not per pass: a pass of files from different years shifted as one
--- moved packet time on by the whole range of their dates each pass (captures of 2011 .. 2018: 7 years a pass, past
--- 2106 and an input error that ended the daemon within seconds), and its older files' packets stayed late in every
--- pass.  A pass now moves packet time on by the sum of its files' spans plus one second each.  The shift is taken
--- at the file's first packet (push), so a file with no packet leaves it to the next.
function M.next_pass()
  M.rebase = true
end

--- Copy every packet of one mapped file into ring `r` (or a sharder).  Returns
--- packets, bytes, on corruption the error message and byte offset, and true
--- when stop() ended the walk before the end of the file (checked while
--- waiting for ring space and every 4096 records).  `fd` (optional): the mapped file's descriptor: a file cut
--- (truncated in place) while it is read ends at its new end, as a file that short does (an error at the offset of
--- the first record it no longer holds), every record before it published once (push's settle), none past it:
--- the cut guard (shm/_lpsync.c) turns the SIGBUS of a read past the new end into a read of zeros, and no record is
--- published before fstat() shows the file still holds it.
---
--- `grows` (with fd; engine/capture/process.py passes it): `size` is the whole file as it was mapped, and a file that
--- grew while it was read is read on to its size at the end of the walk (grow above: the end of the mapped bytes
--- fstat()s the file again, maps it again when it holds more, until an fstat at the end shows no growth; a partial
--- record at that moment is the truncated-record error, at its offset).  Without it (benchmarks and tests walking a
--- prefix of a file) the walk ends at `size`.
---
--- M.speed > 0 (engine/capture/process.py --speed): the walk is paced from its first pushed record (after `skip`'s),
--- or, in a looped pass after the first, on from the pass before (pace_due above).
function M.file(r, addr, size, stop, fd, grows, skip)
  if fd then
    local rc = S.lp_cutguard_arm(cast("const void *", addr), size, fd)
    if rc ~= 0 then error("offset 0: cannot guard the mapping (sigaction: " .. rc .. ")", 0) end
  end
  local ok, rd = pcall(pcapfile.open, addr, size)
  if not ok and fd then                    -- a header read past a cut: the header error of a file that short
    local now = S.lp_fsize(fd)
    if now >= 0 and now < size then
      ok, rd = pcall(pcapfile.open, addr, now)
      if ok then rd.cut = true
      else rd = ("offset 0: the file was cut to %d bytes while it was read: %s"):format(now,
                 (tostring(rd):gsub("^offset %d+: ", ""))) end
    end
  end
  if not ok then
    if fd then S.lp_cutguard_arm(nil, 0, -1) end
    error(rd, 0)
  end
  rd.header_end = rd.offset
  if not M.rebase then M.pace_t0 = nil end   -- each file paced from its first packet (a looped pass's: go on)
  rd.grows = fd ~= nil and grows == true
  rd.ahead = 0                            -- map_ahead: mapped ahead up to this file offset
  -- `skip`: the first records are read past, not pushed (a daemon's restarted fast path goes on after the packets
  -- its predecessors walked: engine/daemon/supervisor.py); off the per-record path
  local skipped = 0
  while skipped < (skip or 0) and not rd.error and rd:next() ~= nil do skipped = skipped + 1 end
  local res = { pcall(push, r, rd, stop, fd) }
  if fd then S.lp_cutguard_arm(nil, 0, -1) end
  if rd.grown then C.munmap(rd.grown, rd.grown_size); rd.grown = nil end
  if not res[1] then error(res[2], 0) end
  return res[2], res[3], rd.error, rd.error_offset, res[4], skipped
end

--- A capture read sequentially (stdin, a FIFO: engine/capture/process.py feeds it), in a buffer of `cap`
--- bytes at `addr` that the caller fills: S:space() compacts (drops the records already walked) and returns
--- the offset and room where the next bytes go; S:feed(r, n, eof, stop) takes n new bytes and walks the
--- complete records among them into ring r.  Offsets in errors count from the start of the stream.
local Stream = {}
Stream.__index = Stream

function M.stream(addr, cap)
  if not M.rebase then M.pace_t0 = nil end   -- paced from its first packet, as a file (M.file)
  return setmetatable({ base = cast("uint8_t *", addr), cap = tonumber(cap), filled = 0, consumed = 0,
                        rd = nil, packets = 0, bytes = 0 }, Stream)
end

function Stream:space()
  local rd = self.rd
  if rd and rd.offset > 0 then
    local keep = self.filled - rd.offset
    C.memmove(self.base, self.base + rd.offset, keep)
    self.consumed = self.consumed + rd.offset
    self.filled, rd.offset = keep, 0
  end
  return self.filled, self.cap - self.filled
end

--- Returns error message (or nil), its stream offset, stopped, and whether the reader waits for more bytes
--- (false after eof or an error).  open()'s header errors are raised as "offset N: message".
function Stream:feed(r, n, eof, stop)
  self.filled = self.filled + n
  local rd = self.rd
  if rd == nil then
    if self.filled == 0 and eof then error("offset 0: empty stream (no capture header)", 0) end
    local need = pcapfile.header_need(self.base, self.filled)
    if need > self.filled then
      if eof then rd = pcapfile.open(self.base, self.filled) end     -- raises the header error
      if need > self.cap then error("offset 0: capture header of " .. need .. " bytes exceeds the stream buffer", 0) end
      return nil, nil, false, true
    end
    rd = pcapfile.open(self.base, self.filled)
    self.rd = rd
  end
  rd.size = eof and self.filled or pcapfile.complete_end(rd, self.filled)
  local k, b, stopped = push(r, rd, stop)
  self.packets, self.bytes = self.packets + k, self.bytes + b
  if rd.error then return rd.error, rd.error_offset + self.consumed, stopped, false end
  if not eof and rd.offset == 0 and self.filled == self.cap then
    return "record of more than " .. self.cap .. " bytes (the stream buffer)", self.consumed, stopped, false
  end
  return nil, nil, stopped, not eof
end

return M
