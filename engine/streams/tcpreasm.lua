--[==[
luaprobe.engine.streams.tcpreasm — TCP stream reassembly per flow and direction (LuaJIT).

    local tcpreasm = require "luaprobe.engine.streams.tcpreasm"
    local R = tcpreasm.new{
      max_flow_bytes  = 4 << 20,   -- out-of-order bytes buffered per flow (both directions)
      max_total_bytes = 256 << 20, -- out-of-order bytes buffered over all flows
      max_gap         = 1 << 20,   -- out-of-order bytes buffered per direction before the hole
                                   -- in front of them is given up (reported as a gap)
      ack_timeout     = 2,         -- s of packet time an ACKed hole still waits for its data
      ack_window      = 64 << 10,  -- out-of-order bytes buffered after an ACKed hole before it is given up
      cb       = function(flow_id, dir, offset, ptr_or_string, len) end,  -- in-order bytes
      cb_gap   = function(flow_id, dir, offset, missing_len) end,
      cb_close = function(flow_id, reason, fins) end,   -- reason "fin" | "rst" | "timeout" | "reuse"; fins: bit 0
                                                        -- / 1 set when direction 0 (client->server) / 1 ended with
                                                        -- its FIN (every byte before it delivered or a gap)
    }
    R:packet(flow_id, pdir, seq, flags, payload_ptr, payload_len, ts[, cb[, ack]])
    R:expire(flow_id)        -- timeout: flush holes (gaps), cb_close(id, "timeout"), forget the flow
    R:forget(flow_id)        -- drop all state silently (flow-table record freed after a close)
    R:seed(flow_id, client, syn, isn0, isn1, ts)   -- the state a handshake recorded elsewhere would have built
    R:is_new_connection(flow_id, pdir, seq)  -- a SYN (no ACK) with this seq starts a new connection
    R:restart(flow_id)       -- close the connection (reason "reuse": holes become gaps, cb_close) and forget it
    R:client_dir(flow_id)    -- the flow-table dir (0/1) of the client, or nil
    R.stats                  -- counters, see below
    R.buffered               -- out-of-order bytes held now (all flows)

Inputs.  flow_id: any Lua value unique per flow (flowtable entry(idx).id);
pdir: the flow table's direction of the packet (0 = A->Z, 1 = Z->A); seq: the
TCP sequence number (0..2^32-1); flags: the TCP flags byte; payload_ptr: a
const uint8_t* (or a Lua string) valid during the call; ts: packet time.  The
optional cb argument overrides the data callback for this call; the optional
ack (the TCP acknowledgment number, used when flags has ACK) lets a hole be
given up as soon as the peer acknowledges data beyond it (the bytes were sent
but not captured: tshark's "ACKed segment that wasn't captured").

Mid-stream pickup.  When the flow's handshake was not captured, a direction starts at its first captured
byte, or at the last acknowledgment number the peer sent before it when that lies up to ack_window bytes
before it: the receiver had not got those bytes yet, so they were in flight (captured later, out of order, on
a mirror port; case 03 of ../shared/cases with the capture begun mid-connection).  Those first bytes wait as
out-of-order data for the missing ones; a missing lead that is given up (the rules under "Gaps") is not a gap:
the bytes were sent before the capture began, and the stream starts at its first captured byte, offset 0, as
when the peer sent no ACK (no cb_gap, stats unchanged).

Direction (pinned; docs/filex.md "Direction": Trisul's pages disagree).  Callbacks receive dir 0 =
client->server, 1 = server->client, the convention of fileextract.md /
filex_monitor.  The client is the sender of a SYN (without ACK), or the
receiver of a SYN+ACK; when the handshake was not captured the client is the
flow table's A end, i.e. the end with the higher port (the flow key's rule:
Z is the lower port, tie broken by address).  reassembly_handler scripts
(docs.trisul.org/docs/lua/reassembly) number directions the other way (1 = client->server):
the plug-in wiring flips dir for them.

Offsets are stream offsets per direction: 0 is the first byte after the SYN,
or the first payload byte seen when the flow was picked up mid-stream (its
sequence number becomes the base; or the peer's ACK number before it, see
"Mid-stream pickup").  All sequence arithmetic is 32-bit modular: a segment's
position is the signed 32-bit difference from the next expected sequence
number, added to a 53-bit stream offset, so wraparound is transparent.

Delivery.  Bytes are delivered exactly once and in order.  An in-order segment
is handed over zero-copy (the caller's pointer, advanced past any part already
delivered); out-of-order segments are copied into Lua strings and delivered as
strings when the hole in front of them is filled.

Overlap policy: "first" (BSD / Linux): bytes received first win.  Bytes already
delivered are never redelivered; a segment overlapping buffered out-of-order
data only contributes the parts not already buffered.  Fully duplicate bytes
count as retransmitted_bytes; a segment that is partly new and partly old
counts one in overlaps (its old bytes also count as retransmitted_bytes).

Gaps.  A hole is given up, reported as cb_gap(id, dir, offset, missing) and
delivery continues after it, when (0) the peer's ACK covers data beyond the
hole (ack argument) AND, since the first such ACK, ack_timeout seconds of
packet time have passed or ack_window more out-of-order bytes were buffered
for the direction (mirror / SPAN ports deliver an ACK before the data it
acknowledges: the late segment still fills the hole; tshark's "ACKed segment
that wasn't captured" is only certain after that), (a) the out-of-order bytes buffered for the
direction exceed max_gap, (b) a memory cap is hit (below), or (c) the flow
closes (FIN both ways, RST, expire) with data still buffered behind a hole,
or with a FIN whose sequence number lies beyond the delivered bytes.

Caps.  When buffering a segment would exceed max_flow_bytes for the flow or
max_total_bytes overall, the direction's first hole is given up (a gap) to
free memory; if the segment still does not fit it is dropped and counted
(cap_drops_flow / cap_drops_total); the dropped bytes later show up as a gap.

Connection reuse.  A SYN without ACK whose sequence number is not the ISN of
its direction (the SYN already seen, or the sequence number before the first
byte of a stream picked up mid-way) starts a new connection on the same
5-tuple (RFC 9293 §3.10.7.4 lets a closed-but-not-forgotten or abandoned
connection be replaced): the caller asks R:is_new_connection and calls
R:restart (stats.reused), which closes the old connection like a timeout.
A retransmitted SYN (same ISN) is not a new connection.

Close.  FIN in both directions (each delivered up to its FIN), RST in either
direction, or R:expire(id).  A RST whose sequence number is more than max_gap
from its direction's next expected one is not in any receive window the
endpoint could have: the endpoint drops it (RFC 9293 §3.10.7.4), so it closes
nothing and is counted in rst_ignored (an injected RST cannot end extraction);
so is a FIN behind the bytes its direction already delivered (fin_ignored).
Bytes still buffered at or beyond a direction's FIN when the flow closes are
not its data: dropped, counted in after_fin_bytes, never delivered after a gap.
cb_close is called once; the flow state is then kept as a small "closed"
marker (later packets of the same id are ignored) until R:forget(id) or
R:expire(id).

R.stats: segments (segments with payload), bytes_delivered,
retransmitted_bytes, overlaps, out_of_order (segments buffered out of order),
gaps, gap_bytes, cap_drops_flow, cap_drops_total, flows (created), closed,
reused (connections ended by a new SYN on the same 5-tuple), late_fills (ACKed
holes later filled by their data: mirror-port reordering), held (segments
held because their ACK covers peer bytes not delivered yet: the peer's bytes
go first, docs/filex.md "Mirror / SPAN ports"; both directions may wait, each
segment for its own peer bytes; after ack_timeout / ack_window held bytes / the
memory cap / the flow's end they go on as if never held), rst_ignored, fin_ignored
(RSTs and FINs outside any receive window, above), after_fin_bytes (above).
]==]
local ffi = require "ffi"
local bit = require "bit"
local band = bit.band
local fstring = ffi.string
local u8p = ffi.typeof("const uint8_t *")

local SYN, FIN, RST, ACK = 0x02, 0x01, 0x04, 0x10
local TWO32, TWO31 = 4294967296, 2147483648

local M = {}
local R = {}
R.__index = R

function M.new(opts)
  opts = opts or {}
  local self = setmetatable({
    max_flow_bytes = opts.max_flow_bytes or 4 * 1048576,
    max_total_bytes = opts.max_total_bytes or 256 * 1048576,
    max_gap = opts.max_gap or 1048576,
    ack_timeout = opts.ack_timeout or 2,
    ack_window = opts.ack_window or 65536,
    cb = opts.cb, cb_gap = opts.cb_gap, cb_close = opts.cb_close,
    flows = {},
    buffered = 0,
    held_bytes = 0,
    holding = {},      -- flow id -> flow, of the flows with held segments
    stats = { segments = 0, bytes_delivered = 0, retransmitted_bytes = 0, overlaps = 0, out_of_order = 0,
              gaps = 0, gap_bytes = 0, cap_drops_flow = 0, cap_drops_total = 0, flows = 0, closed = 0,
              reused = 0, late_fills = 0, held = 0, rst_ignored = 0, fin_ignored = 0, after_fin_bytes = 0 },
  }, R)
  return self
end

-- signed 32-bit difference a - b
local function sdiff(a, b)
  local d = (a - b) % TWO32
  if d >= TWO31 then d = d - TWO32 end
  return d
end

local function new_stream()
  -- started: base sequence known; nxt: next expected seq (uint32); off: stream offset of nxt
  -- segs: sorted non-overlapping out-of-order segments {off, string}; fin_off: stream offset of FIN
  -- isn: the SYN's sequence number (or the one before the first byte of a mid-stream pickup)
  -- ack_hole: stream offset of a hole the peer has ACKed (ack_ts / ack_nbuf: when, and nbuf then)
  -- peer_ack: before the stream started, the last ACK number the peer sent for it; lead: a mid-stream pickup
  -- started at peer_ack, before its first captured byte, and nothing is delivered yet (see "Mid-stream pickup")
  return { started = false, nxt = 0, off = 0, segs = {}, nbuf = 0, fin_off = nil, done = false, isn = nil,
           ack_hole = nil, ack_ts = 0, ack_nbuf = 0, peer_ack = nil, lead = false }
end

local function get_flow(self, id, pdir, flags)
  local f = self.flows[id]
  if f then return f end
  -- client: SYN sender, SYN+ACK receiver, else the A end (pdir 0)
  local client = 0
  if band(flags, SYN) ~= 0 then
    client = band(flags, ACK) ~= 0 and 1 - pdir or pdir
  end
  -- syn: the flow's first packet was a SYN (its stream starts are known)
  f = { client = client, syn = band(flags, SYN) ~= 0, s = { [0] = new_stream(), [1] = new_stream() }, nbuf = 0,
        closed = false, last_ts = 0 }
  self.flows[id] = f
  self.stats.flows = self.stats.flows + 1
  return f
end

local function deliver(self, id, dir, s, p, n, cb)
  s.lead = false
  local off = s.off
  s.off = off + n
  s.nxt = (s.nxt + n) % TWO32
  self.stats.bytes_delivered = self.stats.bytes_delivered + n
  if cb then cb(id, dir, off, p, n) end
end

-- deliver buffered segments that are now contiguous
local function drain(self, id, dir, f, s, cb)
  local segs = s.segs
  while segs[1] do
    local sg = segs[1]
    local so, str = sg[1], sg[2]
    local n = #str
    if so > s.off then break end
    table.remove(segs, 1)
    s.nbuf = s.nbuf - n
    f.nbuf = f.nbuf - n
    self.buffered = self.buffered - n
    local skip = s.off - so
    if skip < n then
      if skip > 0 then
        deliver(self, id, dir, s, str:sub(skip + 1), n - skip, cb)
      else
        deliver(self, id, dir, s, str, n, cb)
      end
    end
  end
end

-- give up the first hole of the direction (gap), deliver what follows it
local function skip_hole(self, id, dir, f, s, cb)
  local sg = s.segs[1]
  if not sg then return false end
  local missing = sg[1] - s.off
  if missing > 0 and s.lead then
    -- the bytes between the peer's ACK and the first captured byte of a mid-stream pickup never came: they were
    -- sent before the capture began, so the stream starts at its first captured byte, as without the ACK (no gap)
    s.lead = false
    for i = 1, #s.segs do s.segs[i][1] = s.segs[i][1] - missing end
    if s.fin_off then s.fin_off = s.fin_off - missing end
    s.nxt = (s.nxt + missing) % TWO32
    s.isn = (s.isn + missing) % TWO32
    s.ack_hole = nil
  elseif missing > 0 then
    self.stats.gaps = self.stats.gaps + 1
    self.stats.gap_bytes = self.stats.gap_bytes + missing
    if self.cb_gap then self.cb_gap(id, dir, s.off, missing) end
    s.off = s.off + missing
    s.nxt = (s.nxt + missing) % TWO32
  end
  drain(self, id, dir, f, s, cb)
  return true
end

-- insert (abs, p, n) into the out-of-order list, first-received bytes win
local function buffer_seg(self, f, s, abs, p, n)
  local segs = s.segs
  local st = self.stats
  local pos, e = abs, abs + n
  local i = 1
  local added, overlapped = 0, false
  while pos < e do
    local sg = segs[i]
    local so = sg and sg[1] or math.huge
    if pos < so then
      local stop = e < so and e or so
      local piece = fstring(p + (pos - abs), stop - pos)
      table.insert(segs, i, { pos, piece })
      added = added + (stop - pos)
      i = i + 1
      pos = stop
    else
      local send = so + #sg[2]
      if pos < send then
        overlapped = true
        local stop = e < send and e or send
        st.retransmitted_bytes = st.retransmitted_bytes + (stop - pos)
        pos = stop
      end
      i = i + 1
    end
  end
  if overlapped and added > 0 then st.overlaps = st.overlaps + 1 end
  s.nbuf = s.nbuf + added
  f.nbuf = f.nbuf + added
  self.buffered = self.buffered + added
end

local release
local function close_flow(self, id, f, reason, cb)
  if f.closed then return end
  if f.held then release(self, id, f, true) end   -- held segments first (they may close it)
  if f.closed then return end
  -- flush: give up every remaining hole
  for dir = 0, 1 do
    local s = f.s[dir]
    local fin, segs = s.fin_off, s.segs
    -- bytes buffered at or beyond the direction's FIN are not its data (a sender puts none after its FIN: an
    -- injected or stray segment); the endpoint drops them, so they are not delivered after a gap here either
    while fin and segs[#segs] and segs[#segs][1] + #segs[#segs][2] > fin do
      local sg = segs[#segs]
      local keep = sg[1] < fin and fin - sg[1] or 0
      local cut = #sg[2] - keep
      self.stats.after_fin_bytes = self.stats.after_fin_bytes + cut
      s.nbuf, f.nbuf, self.buffered = s.nbuf - cut, f.nbuf - cut, self.buffered - cut
      if keep > 0 then sg[2] = sg[2]:sub(1, keep) else segs[#segs] = nil end
    end
    while s.segs[1] do skip_hole(self, id, dir, f, s, cb) end
    if s.fin_off and s.fin_off > s.off then
      local missing = s.fin_off - s.off
      self.stats.gaps = self.stats.gaps + 1
      self.stats.gap_bytes = self.stats.gap_bytes + missing
      if self.cb_gap then self.cb_gap(id, dir, s.off, missing) end
      s.off = s.fin_off
    end
  end
  local fins = (f.s[0].fin_off and 1 or 0) + (f.s[1].fin_off and 2 or 0)
  f.closed = true
  f.s = nil
  self.stats.closed = self.stats.closed + 1
  if self.cb_close then self.cb_close(id, reason, fins) end
end

local function fin_check(self, id, f, cb)
  local s0, s1 = f.s[0], f.s[1]
  if s0.fin_off and s1.fin_off and s0.off >= s0.fin_off and s1.off >= s1.fin_off then
    close_flow(self, id, f, "fin", cb)
  end
end

-- the peer acknowledged up to `ack`: the hole of direction `dir` below it was sent; it is given
-- up once ack_timeout s have passed or ack_window bytes were buffered since the first such ACK
-- (on a mirror port the data may still come after its ACK)
local function ack_check(self, id, dir, f, s, ack, ts, cb)
  local a = s.off + sdiff(ack, s.nxt)
  if not (s.segs[1] and s.segs[1][1] <= a and a > s.off) then return end
  if s.ack_hole ~= s.off then
    s.ack_hole, s.ack_ts, s.ack_nbuf = s.off, ts or 0, s.nbuf
    return
  end
  if (ts or 0) - s.ack_ts < self.ack_timeout and s.nbuf - s.ack_nbuf < self.ack_window then return end
  while s.segs[1] and s.segs[1][1] <= a and a > s.off do
    skip_hole(self, id, dir, f, s, cb)
  end
  s.ack_hole = nil
end

local function segment(self, id, f, dir, seq, flags, p, n, ts, cb, ack)
  local s = f.s[dir]
  if band(flags, RST) ~= 0 and s.started and band(flags, SYN) == 0 then
    -- RFC 9293 §3.10.7.4 (RFC 793 §3.4, RFC 5961 §3): an endpoint drops a RST whose sequence number is outside its
    -- receive window, so such a RST (an injected one with a made-up number: the evasion of Ptacek & Newsham) ends
    -- nothing; the connection's later bytes still come.  Plausible: within max_gap of the next expected byte,
    -- either way (the bound the ACK rules use; a window up to 64 KiB without scaling, a missed segment ahead).
    local d = sdiff(seq, s.nxt)
    if d > self.max_gap or d < -self.max_gap then
      self.stats.rst_ignored = self.stats.rst_ignored + 1
      return
    end
  end
  if ack and band(flags, ACK) ~= 0 then
    local o = f.s[1 - dir]
    if o.segs[1] then ack_check(self, id, 1 - dir, f, o, ack, ts, cb) end
    if not o.started then o.peer_ack = ack end
  end
  if type(p) == "string" then
    local str = p
    n = n or #str
    p = ffi.cast(u8p, str)
  end
  if band(flags, SYN) ~= 0 then
    if not s.started then
      s.started = true
      s.nxt = (seq + 1) % TWO32
      s.isn = seq
    end
    seq = (seq + 1) % TWO32
    -- data on a SYN (TFO) follows the SYN's own sequence number
  end
  if not s.started then
    if n <= 0 and band(flags, FIN) == 0 then
      if band(flags, RST) ~= 0 then close_flow(self, id, f, "rst", cb) end
      return
    end
    s.started = true       -- mid-stream pickup: the first seen sequence number is offset 0
    s.nxt = seq
    local lead = n > 0 and s.peer_ack and sdiff(seq, s.peer_ack) or 0
    if lead > 0 and lead <= self.ack_window then
      s.nxt, s.lead = s.peer_ack, true   -- ... unless the peer's ACK says earlier bytes are still to come
    end
    s.isn = (s.nxt - 1) % TWO32
  end
  local abs = s.off + sdiff(seq, s.nxt)
  if n > 0 then
    local st = self.stats
    st.segments = st.segments + 1
    local e = abs + n
    if e <= s.off then
      st.retransmitted_bytes = st.retransmitted_bytes + n
    elseif abs <= s.off then
      local skip = s.off - abs
      if skip > 0 then
        st.retransmitted_bytes = st.retransmitted_bytes + skip
        st.overlaps = st.overlaps + 1
      end
      if s.ack_hole == s.off then st.late_fills = st.late_fills + 1 end
      s.ack_hole = nil
      deliver(self, id, dir, s, p + skip, n - skip, cb)
      if s.segs[1] then drain(self, id, dir, f, s, cb) end
    else
      -- out of order
      st.out_of_order = st.out_of_order + 1
      if f.nbuf + n > self.max_flow_bytes then
        skip_hole(self, id, dir, f, s, cb)
        if f.nbuf + n > self.max_flow_bytes and abs > s.off then
          st.cap_drops_flow = st.cap_drops_flow + 1
          n = 0
        end
      end
      if n > 0 and self.buffered + n > self.max_total_bytes then
        skip_hole(self, id, dir, f, s, cb)
        if self.buffered + n > self.max_total_bytes and abs > s.off then
          st.cap_drops_total = st.cap_drops_total + 1
          n = 0
        end
      end
      if n > 0 then
        if abs <= s.off then
          -- a forced skip made it in order
          if e > s.off then
            local skip = s.off - abs
            deliver(self, id, dir, s, p + skip, n - skip, cb)
            if s.segs[1] then drain(self, id, dir, f, s, cb) end
          end
        else
          buffer_seg(self, f, s, abs, p, n)
          while s.nbuf > self.max_gap and s.segs[1] do skip_hole(self, id, dir, f, s, cb) end
        end
      end
    end
  end
  if band(flags, RST) ~= 0 then
    close_flow(self, id, f, "rst", cb)
    return
  end
  if band(flags, FIN) ~= 0 then
    local fo = abs + (n > 0 and n or 0)
    if fo < s.off then
      -- behind bytes the sender already sent: no sender puts data after its FIN, and an endpoint drops a segment
      -- below its receive window (RFC 9293 §3.10.7.4), so an injected FIN with a made-up number ends nothing
      self.stats.fin_ignored = self.stats.fin_ignored + 1
    elseif not s.fin_off or fo < s.fin_off then
      s.fin_off = fo
    end
  end
  if s.fin_off then fin_check(self, id, f, cb) end
end

-- Peer bytes a segment answers that were not captured yet (mirror ports, the other way round: the
-- server's ACK of a request, even its response, is captured before the request): how far the ACK
-- is beyond the peer's delivered bytes (its FIN excluded); 0 when it is not, or not plausibly, ahead.
local function peer_behind(self, o, ack)
  if ack == o.nxt or not o.started then return 0 end     -- ack == nxt: exactly the delivered bytes (in order)
  local a = o.off + sdiff(ack, o.nxt)
  if o.fin_off and a == o.fin_off + 1 then a = o.fin_off end
  local behind = a - o.off
  if behind <= 0 or behind > self.max_gap then return 0 end
  return behind
end

-- A held segment: the arguments of its R:packet call (pdir, seq, flags, n, data: its payload copied to a string,
-- ts, cb, ack), need: the peer stream offset its ACK covers (it goes on once the peer's delivered bytes reach it),
-- dir: its reassembly direction (0 = client->server).  A flow's held segments: f.held (arrival order), f.hbytes
-- (the sum of their n), f.hts (ts of the first); self.held_bytes is the sum of f.hbytes over self.holding.

-- append held segment `it` to flow f's queue (the totals grow by its bytes)
local function hold(self, id, f, it)
  local q = f.held
  if q == nil then
    q = {}
    f.held, f.hts, f.hbytes = q, it.ts or 0, 0
    self.holding[id] = f
  end
  q[#q + 1] = it
  f.hbytes = f.hbytes + it.n
  self.held_bytes = self.held_bytes + it.n
end

-- flow f holds nothing any more; returns its queue (nil: none)
local function take_held(self, id, f)
  local q = f.held
  if q == nil then return nil end
  self.held_bytes = self.held_bytes - f.hbytes
  f.held, f.hbytes = nil, 0
  self.holding[id] = nil
  return q
end

-- hand held segments of flow f to R:packet again, in their arrival order: those whose peer bytes have come
-- (until no more do); forced (ack_timeout, ack_window, memory, the flow's end): all of them, as if never held
function release(self, id, f, forced)
  repeat
    local q = take_held(self, id, f)
    if q == nil then return end
    local keep, progress = {}, false
    f.replaying = true
    for i = 1, #q do
      local it = q[i]
      if f.closed then break end
      local peer = 1 - it.dir
      if forced or it.need <= f.s[peer].off then
        if forced then                             -- no more waiting for those peer bytes
          local w = f.waived or { [0] = -1, [1] = -1 }
          if it.need > w[peer] then w[peer] = it.need end
          f.waived = w
        end
        self:packet(id, it.pdir, it.seq, it.flags, it.data, it.n, it.ts, it.cb, it.ack)
        progress = true
      else
        keep[#keep + 1] = it
      end
    end
    f.replaying = false
    if f.closed then return end
    for i = 1, #keep do hold(self, id, f, keep[i]) end
  until forced or not progress
end

function R:packet(id, pdir, seq, flags, p, n, ts, cb, ack)
  cb = cb or self.cb
  local f = self.flows[id]
  if f == nil then f = get_flow(self, id, pdir, flags) end
  if f.closed then return end
  f.last_ts = ts or f.last_ts
  local dir = (pdir == f.client) and 0 or 1
  if f.held and (ts or 0) - f.hts >= self.ack_timeout then
    release(self, id, f, true)
    if f.closed then return end
  end
  if ack and not f.replaying and (n > 0 or band(flags, FIN + RST) ~= 0) and band(flags, ACK + SYN) == ACK then
    local o = f.s[1 - dir]
    local behind = peer_behind(self, o, ack)
    if behind > 0 and not (f.waived and o.off + behind <= f.waived[1 - dir]) then
      self.stats.held = self.stats.held + 1
      hold(self, id, f, { pdir = pdir, seq = seq, flags = flags, n = n, data = type(p) == "string" and p or fstring(p, n),
                          ts = ts, cb = cb, ack = ack, need = o.off + behind, dir = dir })
      if f.hbytes >= self.ack_window or self.held_bytes + self.buffered > self.max_total_bytes then
        release(self, id, f, true)
      end
      return
    end
  end
  segment(self, id, f, dir, seq, flags, p, n, ts, cb, ack)
  if f.held and not f.replaying and not f.closed then release(self, id, f, false) end
end

function R:expire(id, cb)
  local f = self.flows[id]
  if not f then return false end
  if not f.closed then
    close_flow(self, id, f, "timeout", cb or self.cb)
  end
  self.flows[id] = nil
  return true
end

--- Create the state of flow `id` from a handshake seen before it (engine/streams/stage.lua records it until
--- the flow's first payload): client (flow-table dir of the client), syn (the first packet was a SYN), isn0 /
--- isn1 (the SYN sequence numbers of flow-table directions 0 / 1, nil when not seen), ts (packet time).  The
--- same state R:packet would have built from those packets.
function R:seed(id, client, syn, isn0, isn1, ts)
  local f = { client = client, syn = syn, s = { [0] = new_stream(), [1] = new_stream() }, nbuf = 0,
              closed = false, last_ts = ts or 0 }
  self.flows[id] = f
  self.stats.flows = self.stats.flows + 1
  if isn0 then
    local s = f.s[client == 0 and 0 or 1]
    s.started, s.nxt, s.isn = true, (isn0 + 1) % TWO32, isn0
  end
  if isn1 then
    local s = f.s[client == 1 and 0 or 1]
    s.started, s.nxt, s.isn = true, (isn1 + 1) % TWO32, isn1
  end
  return f
end

function R:forget(id)
  local f = self.flows[id]
  if not f then return end
  if not f.closed then
    self.buffered = self.buffered - f.nbuf
    if f.held then self.held_bytes = self.held_bytes - f.hbytes end
  end
  self.holding[id] = nil
  self.flows[id] = nil
end

--- True when a SYN (flags; with or without ACK) with sequence number seq, direction pdir, on the live
--- connection `id` starts a new connection: its seq is not the ISN of its direction.  A SYN+ACK counts too:
--- when the new connection's SYN was not captured (asymmetric routing, a server-side tap), the server's
--- SYN+ACK with a new ISN is the first sign of it.
function R:is_new_connection(id, pdir, seq, flags)
  if band(flags, SYN) == 0 then return false end
  local f = self.flows[id]
  if not f or f.closed then return false end
  local s = f.s[(pdir == f.client) and 0 or 1]
  return s.isn ~= nil and s.isn ~= seq
end

--- End connection `id` because its 5-tuple is reused: holes become gaps, cb_close(id, "reuse"),
--- then the state is forgotten (the next packet starts a new connection).
function R:restart(id, cb)
  local f = self.flows[id]
  if not f then return end
  if not f.closed then
    self.stats.reused = self.stats.reused + 1
    close_flow(self, id, f, "reuse", cb or self.cb)
  end
  self.flows[id] = nil
end

--- True when a segment of flow `id` (flow-table direction pdir) starting at sequence number seq is not the next
--- byte of its started stream (captured out of order: bytes before it are still to come).
function R:out_of_order(id, pdir, seq)
  local f = self.flows[id]
  if not f or f.closed then return false end
  local s = f.s[(pdir == f.client) and 0 or 1]
  return s.started and sdiff(seq, s.nxt) > 0
end

function R:client_dir(id)
  local f = self.flows[id]
  return f and f.client
end

-- flows with no packet since `before` (packet time): expire them all; returns the count.  now (packet time,
-- optional): held segments waiting since ack_timeout before it go on first (their flow may get no more packets)
function R:expire_idle(before, now)
  local ids = {}
  if now and next(self.holding) then
    for id, f in pairs(self.holding) do
      if now - f.hts >= self.ack_timeout then ids[#ids + 1] = id end
    end
    for _, id in ipairs(ids) do
      local f = self.holding[id]
      if f and f.held and not f.closed then release(self, id, f, true) end
    end
    ids = {}
  end
  for id, f in pairs(self.flows) do
    if f.last_ts < before then ids[#ids + 1] = id end
  end
  for _, id in ipairs(ids) do self:expire(id) end
  return #ids
end

return M
