--[[
luaprobe.engine.plugins.packetstore — packet_storage scripts (docs.trisul.org/docs/lua/packet_storage) and the per-run pcapng they
steer.

    packet_storage = {
      filter = function(engine, ts, flow) return -1 end,                               -- on a new flow
      filter_payload = function(engine, ts, flow, dir, seekpos, buffer) return -1 end, -- first payload per direction
    }

Policy codes: -1 no opinion, 0 do not store, 1 full packets, 2 headers only, 3 first 1 MB, 4 first 100 KB,
5 first 10 KB, 6 first 10 MB; any other value counts as -1.  When scripts disagree the most permissive wins
(1 > 6 > 3 > 4 > 5 > 2 > 0); with no opinion at all a flow is stored in full (Trisul's default).  Choices where the
reference is silent (docs/plugins.md):
* `flow` is a FlowID; `ts` the packet time in seconds.  `filter` runs on the first packet of each flow record.
* `filter_payload` runs once per direction, on the first packet of that direction that carries payload, with
  `buffer` = that packet's payload and `seekpos` = 0 (luaprobe does not reassemble for this hook); `dir` is 0 for
  the flow's A->Z direction as the flow table orients it, 1 for Z->A.
* A vote applies to the packet it was cast on and the packets that follow it, whatever the batch size: a vote cast on
  packet k of a batch does not reach the earlier packets of that batch (the store applies the votes in packet
  order).  "First N bytes" counts captured bytes of stored packets per flow;
  the packet that crosses N is stored whole and later ones are not.  "Headers only" keeps each packet up to the start
  of its payload.  Packets without a flow (non-IP) are stored in full.
* Packets go to `<out>/packets.pcapng` (one interface block per link type seen, microsecond timestamps), written
  only when a packet_storage script is loaded.

Votes are shared between the packet_storage VMs of the fast path through the store's `lp_psstore` (allocated by the
store, its address handed to each VM): a queue of vote events (`lp_psev`: packet index in the batch, slot, flow uid,
code; C memory that a VM grows with realloc) that the VMs append to while they walk a batch, and the policy per
flow-table slot (`lp_psvote`) that the store keeps, applying the events in packet order as it writes the batch;
the slot's flow uid tells a new flow apart.
]]
local ffi = require("ffi")
local packet = require("luaprobe.engine.plugins.packet")
local buffer = require("luaprobe.engine.plugins.buffer")

if not pcall(ffi.typeof, "lp_psvote") then
  ffi.cdef [[
    typedef struct { double uid; double stored; int32_t policy; int32_t pad; } lp_psvote;
    typedef struct { double uid; int32_t k; int32_t slot; int32_t code; int32_t seq; } lp_psev;
    typedef struct { lp_psev *ev; int32_t count; int32_t cap; lp_psvote votes[?]; } lp_psstore;
  ]]
end
pcall(ffi.cdef, "void *realloc(void *, size_t); void free(void *);")
local storep = ffi.typeof("lp_psstore *")
local evp = ffi.typeof("lp_psev *")
local RESET = -2                 -- an event code: the slot holds a new flow from this packet on
local rshift, band = require("bit").rshift, require("bit").band

local M = {}
local RANK = { [0] = 1, [2] = 2, [5] = 3, [4] = 4, [3] = 5, [6] = 6, [1] = 7 }      -- permissiveness
local LIMIT = { [3] = 1048576, [4] = 102400, [5] = 10240, [6] = 10485760 }
M.RANK, M.LIMIT = RANK, LIMIT

-- ------------------------------------------------------------------ voting (in each packet_storage VM)

local function vote(v, code)
  if v.policy < 0 or RANK[code] > RANK[v.policy] then v.policy = code end
end

-- append an event to the store's queue (grown with realloc: the queue's C memory belongs to no VM)
local function push(st, k, slot, uid, code)
  local n = st.count
  if n == st.cap then
    local cap = math.max(64, n * 2)
    local ev = ffi.C.realloc(st.ev, cap * ffi.sizeof("lp_psev"))
    if ev == nil then error("packet_storage: out of memory for the vote queue", 0) end
    st.ev, st.cap = ffi.cast(evp, ev), cap
  end
  local e = st.ev[n]
  e.uid, e.k, e.slot, e.code, e.seq = uid, k, slot, code, n
  st.count = n + 1
end

-- The walk's invariants (host.lua w.inv: read once per batch, passed to pick, invoke and done after their own
-- arguments): the table's capacity, the per-slot flow uids and payload directions seen, the vote queue, the two
-- hooks, the engine and its clock struct (engine._t).  A field of the walk state read per packet is looked up again on every packet once a hook stores
-- a new key into a table of its own (issue 10, tests/test_walk_fields.py); what a call needs besides them (k, slot,
-- uid, ts, flow, dir, buf) is written only for a call, at a flow's first packet or a direction's first payload.
local PS_INV = { "capacity", "seen", "dirs", "store", "filter", "filter_payload", "eng", "tc" }
local set_clock = require("luaprobe.engine.plugins.engine").set_clock   -- Engine:set_packet on its struct (tc)
local flowid, new_buffer, tonumber = packet.flowid, buffer.new, tonumber
local function invoke_filter(ps, _, _, _, _, filter, _, eng) return filter(eng, ps.ts, ps.flow) end
local function invoke_payload(ps, _, _, _, _, _, fp, eng) return fp(eng, ps.ts, ps.flow, ps.dir, 0, ps.buf) end
-- the invokes' calls, for host.lua's walk_direct (the stitch point): argument count, hook, arguments
local function args_filter(ps, _, _, _, _, filter, _, eng) return 3, filter, eng, ps.ts, ps.flow end
local function args_payload(ps, _, _, _, _, _, fp, eng) return 6, fp, eng, ps.ts, ps.flow, ps.dir, 0, ps.buf end

-- the walk (host.lua, Host:walk_batch): two call positions per packet, j = 2k for `filter` on a new flow and
-- j = 2k + 1 for `filter_payload` on the first payload of a direction
local function pick(ps, batch, j, capacity, seen, dirs, store, filter, filter_payload, _, tc)
  local k = rshift(j, 1)
  local p = batch[k]
  local slot = p.flow
  if slot < 0 or slot >= capacity then return nil end
  if band(j, 1) == 0 then
    if seen[slot] == p.flow_uid then return nil end
    push(store, k, slot, p.flow_uid, RESET)
    seen[slot], dirs[slot] = p.flow_uid, 0
    if not filter then return nil end
    set_clock(tc, batch, k)
    ps.k, ps.slot, ps.uid, ps.ts, ps.flow = k, slot, p.flow_uid, p.ts_sec, flowid(p.d)
    return invoke_filter
  end
  local mask = p.dir == 0 and 1 or 2
  if not filter_payload or p.d.payload_length <= 0 or dirs[slot] % (2 * mask) >= mask then return nil end
  dirs[slot] = dirs[slot] + mask
  set_clock(tc, batch, k)
  ps.k, ps.slot, ps.uid, ps.ts, ps.flow, ps.dir = k, slot, p.flow_uid, p.ts_sec, flowid(p.d), p.dir
  ps.buf = new_buffer(p.data + p.d.payload_offset, p.d.payload_length)
  return invoke_payload
end

-- after each hook call of the walk: a policy code (an integer 0..6, RANK's keys) is queued.  The range is checked
-- before any table lookup: RANK has an array part, and LuaJIT does not compile indexing such a table with a key
-- that may be negative or fractional ("NYI: mixed sparse/dense table"), as RANK[-1] was for -1, no opinion,
-- the usual answer: the trace of the walk aborted here (tests/test_jit_aborts.py, packet_storage)
local function done(ps, _, _, ok, code, _, _, _, _, store)
  code = ok and tonumber(code)
  if code and code >= 0 and code <= 6 and code % 1 == 0 then push(store, ps.k, ps.slot, ps.uid, code) end
end

--- What keeps plug-in table `plugin`'s packet_storage from being set up (M.setup), as a problem description, or nil.
--- Also asked by `luaprobe check`'s probe (engine/plugins/discovery.py), so that check reports what `run` refuses.
function M.problem(plugin)
  local ps = plugin.packet_storage
  if type(ps.filter) ~= "function" and type(ps.filter_payload) ~= "function" then
    return "packet_storage has neither filter nor filter_payload"
  end
  return nil
end

--- Prepare a packet_storage instance on `host`: the store's lp_psstore at address `store_addr` (capacity slots);
--- its walk state host.ps.  Returns nil or a problem description.
function M.setup(host, store_addr, capacity)
  local problem = M.problem(host.plugin)
  if problem then return problem end
  local ps = host.plugin.packet_storage
  local f, fp = ps.filter, ps.filter_payload
  host.ps = host:new_walk({ per = 2, pick = pick, done = done, invokes = { invoke_filter, invoke_payload },
                            args = { [invoke_filter] = args_filter, [invoke_payload] = args_payload },
                            hook = "packet_storage",
                            error_label = "packet_storage hook error", eng = host.engine, tc = host.engine._t,
                            store = ffi.cast(storep, store_addr), capacity = capacity,
                            filter = type(f) == "function" and f or false,
                            filter_payload = type(fp) == "function" and fp or false,
                            seen = ffi.new("double[?]", capacity), dirs = ffi.new("uint8_t[?]", capacity),
                            k = 0, slot = 0, uid = 0, ts = 0, flow = false, dir = 0, buf = false, inv = PS_INV }, { f, fp })
  return nil
end

-- ------------------------------------------------------------------ the store (one per run, its own VM)

local Store = {}
Store.__index = Store

--- A store writing `path` (pcapng) for flow tables of `capacity` slots.  store.store_addr is the address of its
--- lp_psstore (the vote queue and the votes per slot) that M.setup takes.
function M.new_store(path, capacity)
  local fh, err = io.open(path, "wb")
  if not fh then error("packet_storage: cannot write " .. tostring(path) .. ": " .. tostring(err), 0) end
  local st = ffi.new("lp_psstore", capacity)
  local self = setmetatable({ fh = fh, st = st, votes = st.votes, store_addr = tonumber(ffi.cast("intptr_t", ffi.cast(storep, st))),
                              capacity = capacity, ifaces = {}, nifaces = 0, stored = 0, skipped = 0,
                              truncated = 0, bytes = 0, path = path,
                              -- LUAPROBE_JIT_* (engine/plugins/jitprof.lua): this VM's write_batch is per packet
                              stop_profile = require("luaprobe.engine.plugins.jitprof").start("packetstore") }, Store)
  -- Section Header Block: byte-order magic, version 1.0, section length unknown (-1)
  fh:write(M.block(0x0A0D0D0A, ffi.string(ffi.new("uint32_t[1]", 0x1A2B3C4D), 4) ..
                   ffi.string(ffi.new("uint16_t[2]", { 1, 0 }), 4) .. ffi.string(ffi.new("int64_t[1]", -1), 8)))
  return self
end

--- One pcapng block of `btype` around `body` (padded to 32 bits), pcapng draft section 3.1.
function M.block(btype, body)
  local pad = (4 - #body % 4) % 4
  local len = 12 + #body + pad
  local u = ffi.new("uint32_t[2]", btype, len)
  return ffi.string(u, 8) .. body .. string.rep("\0", pad) .. ffi.string(ffi.new("uint32_t[1]", len), 4)
end

function Store:iface(linktype)
  local id = self.ifaces[linktype]
  if id then return id end
  id = self.nifaces
  self.ifaces[linktype], self.nifaces = id, id + 1
  -- Interface Description Block: link type, reserved, snaplen 0 (no limit); default if_tsresol = microseconds
  self.fh:write(M.block(1, ffi.string(ffi.new("uint16_t[2]", { linktype, 0 }), 4) ..
                           ffi.string(ffi.new("uint32_t[1]", 0), 4)))
  return id
end

local epb_head = ffi.new("uint32_t[5]")

local function earlier(a, b) return a.k < b.k or (a.k == b.k and a.seq < b.seq) end

-- the events of the batch in packet order (the VMs walked the batch one after the other), queue order within a
-- packet (the comparator made once: a closure made per batch is "NYI: bytecode FNEW", an abort per batch)
local function ordered(st)
  local ev, list = st.ev, {}
  for i = 0, st.count - 1 do list[i + 1] = ev[i] end
  table.sort(list, earlier)
  return list
end

local function apply(votes, e)
  local v = votes[e.slot]
  if e.code == RESET then
    if v.uid ~= e.uid then v.uid, v.stored, v.policy = e.uid, 0, -1 end
  elseif v.uid == e.uid then
    vote(v, e.code)
  end
end

--- Write the packets of a batch that their flow's policy lets through: the votes cast on packet k (in any
--- packet_storage VM) apply from packet k on.
function Store:write_batch(addr, n)
  local batch = ffi.cast(packet.pktp, addr)
  local votes, cap, st = self.votes, self.capacity, self.st
  local events, ne, ei = nil, st.count, 1
  if ne > 0 then events = ordered(st) end
  for k = 0, n - 1 do
    local p = batch[k]
    while ei <= ne and events[ei].k <= k do apply(votes, events[ei]); ei = ei + 1 end
    if p.d.frag == 2 then goto next_packet end   -- a reassembled IP datagram: its fragments are the capture
    local len, policy, v = p.caplen, 1, nil
    if p.flow >= 0 and p.flow < cap then
      v = votes[p.flow]
      if v.uid == p.flow_uid and v.policy >= 0 then policy = v.policy end
    end
    local limit = LIMIT[policy]
    if policy == 0 or (limit and v and v.stored >= limit) then
      self.skipped = self.skipped + 1
    else
      if policy == 2 and p.d.payload_offset > 0 and p.d.payload_offset < len then
        len = p.d.payload_offset
        self.truncated = self.truncated + 1
      end
      if v then v.stored = v.stored + len end
      local usec = p.ts_sec * 1e6 + math.floor(p.ts_nsec / 1000)
      epb_head[0] = self:iface(p.linktype)
      epb_head[1] = math.floor(usec / 4294967296)
      epb_head[2] = usec % 4294967296
      epb_head[3], epb_head[4] = len, p.wirelen
      self.fh:write(M.block(6, ffi.string(epb_head, 20) .. ffi.string(p.data, len)))
      self.stored, self.bytes = self.stored + 1, self.bytes + len
    end
    ::next_packet::
  end
  while ei <= ne do apply(votes, events[ei]); ei = ei + 1 end
  st.count = 0
  return n
end

function Store:close()
  if self.stop_profile then self.stop_profile(); self.stop_profile = nil end
  if self.fh then self.fh:close(); self.fh = nil end
  if self.st.ev ~= nil then ffi.C.free(self.st.ev); self.st.ev, self.st.cap = nil, 0 end
  return { stored = self.stored, skipped = self.skipped, truncated = self.truncated, bytes = self.bytes }
end

return M
