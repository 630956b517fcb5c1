--[[
luaprobe.engine.fastpath.driver — the fast path's driver VM: pops packets from the
packet ring into a batch (zero copy), decodes each once, tracks flows, and
reports control records (EOF / ERROR / END).  Plug-in VMs then walk the same
batch by address (luaprobe.engine.plugins.host: run_batch).

A batch never spans a change of packet-time second, so the per-second ticks
(metronome, bucket and window edges, flow expiry) fire exactly between the
packets they separate.
]]
local ffi = require("ffi")
local ring = require("luaprobe.shm.ring")
local decode = require("luaprobe.engine.fastpath.decode")
local flowtable = require("luaprobe.engine.fastpath.flowtable")
local packet = require("luaprobe.engine.plugins.packet")
local ipreasm = require("luaprobe.engine.fastpath.ipreasm")

local cast, copy, fstring = ffi.cast, ffi.copy, ffi.string
local REC, recp, PKT, TIME = packet.REC_SIZE, packet.recp, packet.PKT, packet.TIME
local u8p = ffi.typeof("uint8_t *")
local i32p = ffi.typeof("int32_t *")
local bxor = require("bit").bxor
local FLOW_WORDS, COLD_WORDS = ffi.sizeof("lp_flow") / 4, ffi.sizeof("lp_flow_cold") / 4   -- records as int32 words
local FLUSH_TOUCH = 512            -- flows whose records flush_flows touches before their rows (96 KiB: within L2)
-- a packet record's header (lp_pktrec) and a batch entry (lp_pkt) hold ts_sec, ts_nsec, wirelen, caplen,
-- linktype, ifindex as consecutive u32s: fill copies them as one block (its barrier, IR XBAR, comes before decode's
-- stores, so it does not keep LuaJIT from forwarding those: decode.lua copy16; six u32 moves measured no better)
local PKT_HDR, REC_HDR, HDR_BYTES = ffi.offsetof("lp_pkt", "ts_sec"), ffi.offsetof("lp_pktrec", "ts_sec"), 24
assert(ffi.offsetof("lp_pkt", "ifindex") - PKT_HDR == 20 and ffi.offsetof("lp_pktrec", "ifindex") - REC_HDR == 20)
local ddecode = decode.decode
local rec_bytes, rec_at, rec_next = ring.rec_bytes, ring.rec_at, ring.rec_next

local M = {}
local Driver = {}
Driver.__index = Driver

--- opts: ring (address), batch (size), tick_first (fill: see there), capacity/idle_timeout/active_timeout/huge_pages
--- (flow table), prefault_ahead
--- (records whose pages a helper thread maps ahead: FT:start_prefaulter; 0 / nil: none),
--- frag_timeout / frag_max_bytes / frag_max_datagrams (luaprobe.engine.fastpath.ipreasm), warn (function(msg)).
function M.new(opts)
  local self = setmetatable({
    ring = ring.attach(opts.ring),
    nbatch = opts.batch or packet.BATCH,
    ft = flowtable.new({ capacity = opts.capacity or 1048576, idle_timeout = opts.idle_timeout or 120,
                         active_timeout = opts.active_timeout or 1800, huge_pages = opts.huge_pages }),
    packets = 0, bytes = 0, truncated = 0, nonip = 0, released = 0,
    touched = 0,            -- fill: the touches' result (Ring:touch_ahead), kept so the loads are
    sec = -1,               -- packet-time second of the current batch
    ctl_kind = nil, ctl_text = nil,
    tick_first = opts.tick_first,   -- fill stops before a later second's first packet (TIME): see fill
    tick_sec = -1,          -- the latest second fill stopped before (tick_first)
    ipr = ipreasm.new({ timeout = opts.frag_timeout, max_bytes = opts.frag_max_bytes,
                        max_datagrams = opts.frag_max_datagrams }),
    reasm = {},             -- [batch index] = { frame, fragments } of this batch's reassembled datagrams
    warn = opts.warn,       -- function(message): a warning for the run's log
    unknown_linktypes = {}, unknown_linktype_packets = 0,   -- [link type] = packets
    tags = {}, ntags = 0,   -- tag_flow: [flowkey] = {tag, ...} until the flow's row is written
  }, Driver)
  if (opts.prefault_ahead or 0) > 0 then                -- new flows' pages mapped by a thread (FT:start_prefaulter)
    local ok, why = self.ft:start_prefaulter(opts.prefault_ahead)
    if not ok then self.prefault_off = why end
  end
  self.batch = packet.new_batch(self.nbatch + 1)   -- + 1: a datagram completed by the last packet
  self.batch_addr = tonumber(ffi.cast("intptr_t", self.batch))
  self.exp_cap = math.max(M.EXPORT_ROWS, self.nbatch + 1)  -- exported flow records (put_row below)
  self.exp = ffi.new("lp_flowrow[?]", self.exp_cap)
  self.exp_addr = tonumber(ffi.cast("intptr_t", self.exp))
  self.exp_tags = {}
  -- rows of records ended in the packet loop (pend_row: port reuse, idle expiry), exported first by the next expire /
  -- flush_flows
  self.pend_cap, self.npend, self.pend_tags, self.renewed = 64, 0, {}, {}
  self.pend = ffi.new("lp_flowrow[?]", self.pend_cap)
  self.ft.on_renew = function(idx, reason) self:pend_row(idx, reason) end
  if opts.bell then self.ring.data_bell = cast("uint32_t *", opts.bell) end
  self.stop_profile = require("luaprobe.engine.plugins.jitprof").start("driver")
  return self
end

--- Release the previous batch's ring space (fill, skip): every packet counted so far was in it.  A shard publishes
--- that count for its coordinator (engine/fastpath/shards.py) next to the release, so a kill -9 falls between
--- them only by chance.
local function release_batch(self)
  local released = self.packets
  self.released = released
  local pp = self.progress_p
  if pp ~= nil then pp[0] = released end
  self.ring:release()
  self.ctl_kind = nil
end

--- The ring's next record (at p, header h, len bytes) is a control record, met before any packet of the
--- batch: it becomes ctl_kind / ctl_text and leaves the ring.
local function take_control(self, p, h, len)
  self.ctl_kind, self.ctl_text = h.kind, fstring(p + REC, h.caplen)
  self.ring:advance(len)
end

--- Fill the batch.  Returns the number of packets (0 when the ring is empty
--- or a control record is next: then ctl_kind / ctl_text are set) and the
--- batch's packet-time second (self.sec: one call from Python, not two).
--- The previous batch's ring space is released here, not before.
--- With opts.tick_first (the fast path's loop, engine/fastpath/run.py), the first packet of a second later than any
--- before it is not taken at once: fill returns 0 with ctl_kind TIME, ctl_text "sec usec" (that second and the µs of
--- its first packet, as the sharder's TIME records: engine/capture/capture.lua Sharder:pick), the packet still in the
--- ring, and takes it at the next call.  The caller's tick (flow expiry: Driver:expire) so runs before the second's
--- first packet whatever the batch size, as a sharded run's TIME records of other shards' seconds already did:
--- which flows a full table admits, and where an active timeout cuts a flow, depend on packet time only (with the
--- tick after the batch, on how many of the second's packets that first batch held: rows changed with --batch).
function Driver:fill()
  local r, b, ft = self.ring, self.batch, self.ft
  release_batch(self)
  if self.nreasm then self.reasm, self.nreasm = {}, nil end   -- frames of the previous batch
  if #self.renewed > 0 then self.renewed = {} end             -- the previous batch's renewed records
  local n, max = 0, self.nbatch
  local sec = self.sec
  -- the batch's records were written by the capture process on the other core: read one after the other they are
  -- cache misses in series (each record's position is in the previous one's header); touched first from the ring's
  -- prefetch hints (their first three cache lines), they overlap (issue 10, shm/ring.lua).  Records of any size:
  -- until 2026-12-01 only batches of more than 192 ring bytes a packet, but dns (~175-byte records) loses ~10 ns a
  -- packet of loop CPU without it and small-few (~105) ~1 (docs/benchmarks.md, "dns and small-few: the ring's
  -- records touched whatever their size")
  self.touched = r:touch_ahead(max)
  -- counters of the ring's packets, kept in the loop (no second pass over the batch); a datagram completed by
  -- IP reassembly is appended to the batch but is not a captured packet (its fragments were counted)
  local got, truncated, nonip, bytes = 0, self.truncated, self.nonip, self.bytes
  -- the ring's consumer state in locals for the batch (Ring:pop_cursor / rec_at / rec_next / pop_commit): no table
  -- store per packet, and from one record to the next a pointer in the ring's FFI cursor, not the ring position (a
  -- double: shm/ring.lua)
  local cur, used, avail = r:pop_cursor()
  local ctl, ctl_len
  while n < max do
    if used == avail then
      avail = r:pop_more()
      if used == avail then break end
    end
    local p, len, skip = rec_at(cur)
    local h = cast(recp, p)
    if h.kind ~= PKT then
      if n == 0 then ctl, ctl_len, used = p, len, used + skip end   -- taken after the cursor is committed
      break
    end
    local ts = h.ts_sec
    if ts ~= sec then
      if n > 0 then break end          -- start the new second in a new batch
      if self.tick_first and ts > self.tick_sec then   -- a later second: the caller ticks first (a TIME record of its
        self.tick_sec = ts                             -- own, the record stays in the ring), so its flow expiry
        self.ctl_kind, self.ctl_text = TIME, ("%d %d"):format(ts, math.floor(h.ts_nsec / 1000))   -- (expire) comes
        -- before the second's first packet; "sec usec", the sharder's TIME text (engine/capture/capture.lua pick)
        break
      end
      sec = ts
      self.sec = ts
      if self.ipr.stats.pending > 0 then self.ipr:expire(ts) end
    end
    local e = b[n]
    local data = p + REC
    e.data = data
    copy(cast(u8p, e) + PKT_HDR, p + REC_HDR, HDR_BYTES)   -- ts_sec .. ifindex: the same u32s in both layouts
    local caplen = h.caplen
    local d = e.d
    ddecode(d, data, caplen, h.linktype)
    rec_next(cur, p, len)
    used = used + skip + rec_bytes(len)
    n = n + 1
    got = got + 1
    bytes = bytes + h.wirelen
    truncated = truncated + d.truncated
    if d.ip_version == 0 then nonip = nonip + 1 end
    if d.frag ~= 0 then n = self:fragment(e, n) end
    if d.nlayers == 0 then self:no_layer(e) end
  end
  r:pop_commit(used, avail, got)
  if ctl then take_control(self, ctl, cast(recp, ctl), ctl_len) end
  -- Flows after the whole batch is decoded, in the flow table's own small
  -- loops (lookup, insertion, counters: flowtable.lua "packet path"); one
  -- loop doing everything aborted its traces (issue 10).  A step that must
  -- see every packet before the flow table (IP reassembly) goes between the
  -- loop above and this call.
  ft:update_batch(b, n)
  self.truncated, self.nonip, self.bytes = truncated, nonip, bytes
  self.packets = self.packets + got
  if self.nreasm then self:reasm_accounting() end
  return n, self.sec
end

--- A packet with no decoded layer: count it when its link type is not one decode knows,
--- and warn once per link type number (opts.warn).
function Driver:no_layer(e)
  local lt = e.linktype
  if decode.LINKTYPES[lt] then return end
  local u = self.unknown_linktypes
  if u[lt] == nil then
    u[lt] = 0
    if self.warn then
      self.warn(("link type %d is not one luaprobe decodes (packets are counted, not decoded)"):format(lt))
    end
  end
  u[lt] = u[lt] + 1
  self.unknown_linktype_packets = self.unknown_linktype_packets + 1
end

--- A fragment packet was put at batch[n - 1]: give it to the reassembler; when it
--- completes a datagram, append the reassembled frame as batch[n] (d.frag = 2).
--- Returns the new batch length.  Kept out of fill(): fragments are rare.
function Driver:fragment(e, n)
  local ipr = self.ipr
  local frame, len, nfrags, wirelen = ipr:add(e, e.ts_sec + e.ts_nsec * 1e-9)
  if not frame then return n end
  local s = self.batch[n]
  s.data = frame
  s.ts_sec, s.ts_nsec, s.wirelen, s.caplen = e.ts_sec, e.ts_nsec, wirelen, len
  s.linktype, s.ifindex = e.linktype, e.ifindex
  ddecode(s.d, s.data, len, e.linktype)
  s.d.frag = 2
  self.reasm[n] = { frame, nfrags }
  self.nreasm = true
  return n + 1
end

--- After the flow table saw the batch (fragments have no flow: update_batch skips d.frag 1):
--- each reassembled datagram (d.frag 2) counts in its flow as all its fragment packets.  It is not a
--- captured packet itself: fill counts only the ring's packets in packets, bytes, truncated.
function Driver:reasm_accounting()
  local ft, b = self.ft, self.batch
  for k, r in pairs(self.reasm) do
    local e = b[k]
    if e.flow >= 0 then
      local f = ft.flows[e.flow]
      local extra = r[2] - 1                           -- the flow counts every fragment packet
      if e.dir == 1 then f.packets_za = f.packets_za + extra else f.packets_az = f.packets_az + extra end
    end
  end
end

--- After a stop (SIGINT / SIGTERM of a file or --generate run): release the previous batch and pass over the
--- packet records in the ring up to the next control record (then ctl_kind / ctl_text are set, as fill does) or
--- the ring's end, without decoding them.  Returns how many were passed over; they are counted in
--- self.not_walked (the run's not_walked_at_stop), so packets read = packets + not_walked.
function Driver:skip()
  local r = self.ring
  release_batch(self)
  local n = 0
  while true do
    local p, len = r:peek()
    if p == nil then break end
    local h = cast(recp, p)
    if h.kind ~= PKT then
      if n == 0 then take_control(self, p, h, len) end
      break
    end
    r:advance(len)
    n = n + 1
  end
  self.not_walked = (self.not_walked or 0) + n
  return n
end

--- True when a record is waiting in the packet ring.
function Driver:ready()
  return ring.lib.lp_load_sc(self.ring.tail_p) ~= self.ring.head_local
end

local bit = require("bit")

--- Exported flow records (engine/fastpath/flowrows.py reads them with numpy).  One lp_flowrow per flow
--- (engine/fastpath/flowrow.lua: the fields), in an array the driver owns (Driver.exp, capacity Driver.exp_cap).
--- A contiguous struct array, not text: Python reads a whole chunk as numpy columns with no per-field
--- parsing (issue 10: the text it replaces cost ~14 s of a 1M-flow export).
require("luaprobe.engine.fastpath.flowrow")
M.ROW_SIZE = ffi.sizeof("lp_flowrow")
M.EXPORT_ROWS = 4096          --- records per export call (at least the batch size: new_flows)
local OPEN, TIMEOUT, CLOSED, RESET, REUSED = 0, 1, 2, 3, 4
local RENEW = "renew"         -- put_row's reason for a record ended by a new connection (flowtable "Port reuse")

--- Final state (docs/schema.md): RESET or CLOSED from TCP flags, else TIMEOUT when it expired, REUSED when a
--- new connection on its 5-tuple ended it, else OPEN (still open at the end of input).
local function state_code(st, reason)
  if bit.band(st, 0x80) ~= 0 then return RESET end
  if bit.band(st, 0x40) ~= 0 then return CLOSED end
  if reason == flowtable.IDLE or reason == flowtable.ACTIVE then return TIMEOUT end
  if reason == RENEW then return REUSED end
  return OPEN
end

local flowrow = require("luaprobe.engine.fastpath.flowrow")
local join_tags = flowrow.join_tags     -- tags from tag_flow, joined by spaces; at most 64 bytes per flow
M.join_tags = join_tags

--- Write flow idx's record into row `r` (an lp_flowrow).  `peek`: a new flow reported to sg_monitor.onnewflow
--- (state OPEN, not a final record, its tags stay for its final record).  Returns the flow's tags joined
--- (join_tags), or nil; r.tags is left 0 (the caller lists them: put_row, drain_pending).
local function write_row(self, r, idx, reason, peek)
  local ft = self.ft
  local e, c = ft.flows[idx], ft.cold[idx]
  ffi.fill(r, M.ROW_SIZE)
  r.first_ts, r.last_ts = c.first_ts, e.last_ts
  r.packets_az, r.packets_za, r.bytes_az, r.bytes_za = e.packets_az, e.packets_za, e.bytes_az, e.bytes_za
  r.payload_az, r.payload_za = e.payload_az, e.payload_za
  local rtt = c.rtt
  r.setup_rtt_us = rtt < 0 and -1 or math.floor(rtt + 0.5)
  r.retrans_az, r.retrans_za = c.retrans_az, c.retrans_za
  local st = e.state
  r.state = peek and OPEN or state_code(st, reason)
  if reason == flowtable.IDLE then st = bit.bor(st, 0x100) end
  if not peek then st = bit.bor(st, 0x800) end
  r.flags = st
  r.porta, r.portz, r.proto = c.porta, c.portz, c.proto
  local n = ft:put_key(idx, r.key)
  local l = n == 41 and 11 or 32
  ffi.copy(r.ipa, r.key + 4, l)
  ffi.copy(r.ipz, r.key + 12 + l, l)
  if self.ntags == 0 then return nil end
  local key = fstring(r.key, n)
  local tl = self.tags[key]
  if tl == nil then return nil end
  if not peek then self.tags[key] = nil; self.ntags = self.ntags - 1 end
  return join_tags(tl)
end

--- Fill export record k with flow idx (write_row); its tags, if any, go to Driver.exp_tags.
local function put_row(self, k, idx, reason, peek)
  local r = self.exp[k]
  local tags = write_row(self, r, idx, reason, peek)
  if tags then
    local list = self.exp_tags
    list[#list + 1] = tags
    r.tags = #list
  end
end

--- flowtable on_renew: the record of flow idx ends because a new connection reuses its 5-tuple (reason nil: REUSED)
--- or because its next packet came after more than idle_timeout of silence (reason flowtable.IDLE: TIMEOUT, as an
--- expire() between batches); its row is kept (in order) until the next export, which sends it first.
function Driver:pend_row(idx, reason)
  local n = self.npend
  if n == self.pend_cap then
    local cap = self.pend_cap * 2
    local a = ffi.new("lp_flowrow[?]", cap)
    ffi.copy(a, self.pend, n * M.ROW_SIZE)
    self.pend, self.pend_cap = a, cap
  end
  self.pend_tags[n + 1] = write_row(self, self.pend[n], idx, reason or RENEW, false) or false
  self.npend = n + 1
  local rn = self.renewed
  rn[#rn + 1] = idx
end

--- Move pending rows (pend_row) into the export array from row 0; returns how many (at most exp_cap).
local function drain_pending(self)
  local n = math.min(self.npend, self.exp_cap)
  if n == 0 then return 0 end
  ffi.copy(self.exp, self.pend, n * M.ROW_SIZE)
  local list = self.exp_tags
  for i = 0, n - 1 do
    local t = self.pend_tags[i + 1]
    if t then list[#list + 1] = t; self.exp[i].tags = #list end
  end
  local rest = self.npend - n
  if rest > 0 then ffi.copy(self.pend, self.pend + n, rest * M.ROW_SIZE) end
  local tags = {}
  for i = 1, rest do tags[i] = self.pend_tags[n + i] end
  self.pend_tags, self.npend = tags, rest
  return n
end

--- Start an export: no record, no tags.
local function exp_reset(self)
  self.exp_tags = {}
end

--- Export records of the flows created by the last batch (n packets): flow uids only grow, so a flow is
--- new when its uid is above the last one reported.  Called between batches only when an sg_monitor
--- defines onnewflow; the packet loop does not change.  Returns the number of records.
function Driver:new_flows(n)
  exp_reset(self)
  local b, ft, last, k = self.batch, self.ft, self.last_new_uid or 0, 0
  local top, seen = last, {}
  for j = 0, n - 1 do
    local e = b[j]
    local uid = e.flow_uid
    if e.flow >= 0 and uid > last and not seen[uid] and ft:entry(e.flow).id == uid then
      seen[uid] = true
      if uid > top then top = uid end
      put_row(self, k, e.flow, nil, true)
      k = k + 1
    end
  end
  for _, idx in ipairs(self.renewed) do                -- records started again by a new connection
    local uid = ft:entry(idx).id
    if not seen[uid] and ft:is_live(idx) then
      seen[uid] = true
      put_row(self, k, idx, nil, true)
      k = k + 1
    end
  end
  self.last_new_uid = top
  return k
end

--- tag_flow from a plug-in VM (between batches): kept until the flow's record is exported, each tag once.  Tabs
--- and newlines in a tag become spaces (the stored tags are one space-separated line).
function Driver:tag(flowkey, tag)
  local tl = self.tags[flowkey]
  if tl == nil then
    if self.ntags >= 1048576 then return false end     -- bounded: tags of flows never seen are not kept forever
    tl = {}; self.tags[flowkey] = tl; self.ntags = self.ntags + 1
  end
  flowrow.add_tag(tl, (tag:gsub("[\t\r\n]", " ")))     -- a tag given twice is kept once
  return true
end

--- Export records of flows that timed out by packet time `now`, at most exp_cap of them (those flows are
--- freed); the caller repeats while the result equals exp_cap.  Returns the number of records.
function Driver:expire(now)
  exp_reset(self)
  local k = drain_pending(self)
  self.ft:expire(now, function(idx, reason) put_row(self, k, idx, reason); k = k + 1 end, self.exp_cap - k)
  return k
end

--- End of input, streamed: export records of up to exp_cap live flows (least recently used first); 0 once every
--- flow was exported, and the table is then emptied at once (FT:clear: freeing each flow cost about half of this
--- export's Lua time, issue 10).  The caller repeats until then, so the export of a million flows never builds one
--- huge table; nothing else may use the flow table in between (the end of the run).
function Driver:flush_flows()
  self.ipr:flush()
  exp_reset(self)
  local ft = self.ft
  local lru, sen = ft.lru, ft.capacity
  local idx = self.flush_next or lru[sen].next     -- the flows are not freed one by one: a cursor on the LRU list
  local k0 = drain_pending(self)
  -- the walk of the list first (one dependent load per flow), then the records: their loads are independent,
  -- so the CPU overlaps their cache misses (a million records are 256 MB in random order)
  local ids = self.flush_ids
  if ids == nil then ids = ffi.new("int32_t[?]", self.exp_cap); self.flush_ids = ids end
  local n = 0
  for _ = k0, self.exp_cap - 1 do
    if idx == sen then break end
    ids[n] = idx
    n = n + 1
    idx = lru[idx].next
  end
  -- then the rows, FLUSH_TOUCH flows at a time, each chunk's records touched first (its hot record's two lines and its
  -- cold record's one) in a loop of independent loads: put_row does several hundred instructions a flow (the key's
  -- text), more than the CPU looks ahead, so without the touches each record's misses came one flow after the other.
  -- In LRU order the records are in random memory order once flows had packets in more than one second (flows-100k:
  -- tools/bench/flush_cost.py --moved).  A chunk of consecutive records (its first and last flow as far apart as
  -- its length: flows exported in the order they were created, flows-1m) is not touched: the CPU's prefetcher follows
  -- sequential records, and the touches cost ~5 ns a flow there
  local fw, cw = ft.fw, cast(i32p, ft.cold)
  local t = 0
  for c = 0, n - 1, FLUSH_TOUCH do
    local last = math.min(c + FLUSH_TOUCH, n) - 1
    if ids[last] - ids[c] ~= last - c then
      for i = c, last do
        local x = ids[i]
        t = bxor(t, fw[x * FLOW_WORDS], fw[x * FLOW_WORDS + 16], cw[x * COLD_WORDS])
      end
    end
    for i = c, last do
      put_row(self, k0 + i, ids[i], nil)
    end
  end
  self.touched_rows = t                            -- kept, so the loads are
  self.flush_next = idx
  if idx == sen and k0 + n < self.exp_cap then
    self.prefault_done = ft:stop_prefaulter() or self.prefault_done   -- no new flow after the end of input
    ft:clear()                                     -- all exported: the table empties at once (FT:clear)
    self.flush_next = nil
  end
  return k0 + n
end

--- Counters for the run summary.
function Driver:stats()
  local s = self.ft:stats()
  local fs = self.ipr.stats
  return { packets = self.packets, bytes = self.bytes, truncated = self.truncated, nonip = self.nonip,
           flows_created = s.created + s.renewed, flows_live = s.live, flow_table_full = s.full_drops,
           ip_fragments = fs.fragments, ip_datagrams = fs.datagrams, ip_frag_timeouts = fs.timeouts,
           ip_frag_incomplete = fs.incomplete, ip_frag_overlaps = fs.overlaps,
           ip_frag_duplicates = fs.duplicates, ip_frag_malformed = fs.malformed,
           ip_frag_dropped_cap = fs.dropped_cap, ip_frag_in_no_flow = fs.in_no_flow,
           unknown_linktype_packets = self.unknown_linktype_packets, unknown_linktypes = self.unknown_linktypes,
           ring_space_wakes = self.ring:space_wakes(), ring_mapped_ahead = self.ring:mapped_ahead(),
           prefault = self.prefault_done or self.ft:prefaulter_stats(), prefault_off = self.prefault_off }
end

M.Driver = Driver
return M
