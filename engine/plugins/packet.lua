--[[
luaprobe.engine.plugins.packet — the packet record in the packet ring, the decoded batch
the fast path hands to every plug-in VM, and the Layer / Packet / FlowID
objects scripts see (docs.trisul.org/docs/lua/obj_layer, obj_packet, obj_flowid).

Packet ring record: lp_pktrec header, then caplen bytes of frame.
    kind PKT   a packet
    kind EOF   end of one input file (payload: file name)
    kind ERROR input error (payload: "offset\tmessage"; ts_sec unused)
    kind END   end of all input
    kind STATS live capture counters (payload: "seen\tring_drops\tkernel_drops\t...",
               see engine/capture/afpacket.lua)
    kind TIME  sharded input only: packet time reached second ts_sec (sent to the
               shards that did not get the packet opening that second, so every
               shard ticks the same seconds as one fast path would: engine/fastpath/shards.py);
               payload "sec usec", the time of the packet that opened it

Batch: an array of lp_pkt in the fast-path driver's memory.  Each entry
points at its frame inside the packet ring (zero copy: the ring space is
released only after every VM has processed the batch) and holds the decoded
layer offsets, computed once per packet.  Plug-in VMs cast the batch address
and walk it in Lua; the objects below are views on an entry, rebound for
each hook call rather than allocated.
]]
local ffi = require("ffi")
local bit = require("bit")
local decode = require("luaprobe.engine.fastpath.decode")
local buffer = require("luaprobe.engine.plugins.buffer")

if not pcall(ffi.typeof, "lp_pktrec") then
  ffi.cdef[[
typedef struct { uint32_t kind, ts_sec, ts_nsec, wirelen, caplen, linktype, ifindex, pad; } lp_pktrec;
typedef struct {
  const uint8_t *data;
  uint32_t ts_sec, ts_nsec, wirelen, caplen, linktype, ifindex;
  int32_t flow, dir;
  double flow_uid;     /* the flow record's unique id (flowtable entry id), 0 for non-IP */
  lp_decoded d;
} lp_pkt;
]]
end
-- Per-packet state of the objects hooks see, in FFI structs rather than Lua fields (issue 10): a hook's store
-- into its own table with a string key (`state[id] = ...`) may alias any Lua table field with a string key as far
-- as LuaJIT can tell, so every such field the walk writes or reads per packet would be looked up again per packet;
-- FFI field loads and stores do not alias Lua table stores.  The objects stay Lua tables with the Trisul methods.
if not pcall(ffi.typeof, "lp_pobj") then
  ffi.cdef[[
typedef struct { lp_pkt *b; int32_t i; } lp_pobj;                         /* Packet: entry i of batch b */
typedef struct { lp_pobj *p; int32_t i; } lp_lobj;                         /* Layer: layer i of packet p */
typedef struct { lp_pkt *b; int32_t i, pos; double now, usec, floor, tus; int32_t nfc; } lp_engine_clock;   /* engine.lua */
]]
end
local new_pobj, new_lobj = ffi.typeof("lp_pobj"), ffi.typeof("lp_lobj")

local M = {
  PKT = 0, EOF = 1, ERROR = 2, END = 3, STATS = 4, TIME = 5,
  REC_SIZE = ffi.sizeof("lp_pktrec"),
  recp = ffi.typeof("lp_pktrec *"),
  pktp = ffi.typeof("lp_pkt *"),
  BATCH = 1024,
}

local find, flowkey, flow_parts = decode.find, decode.flowkey, decode.flow_parts
local GUID = decode.GUID
local band, rshift = bit.band, bit.rshift
local fstring = ffi.string
-- a local, not the global: a global's lookup is redone per packet in a walk whose hook stores into its own table
local setmetatable = setmetatable

--- A new batch array (keep the returned cdata alive while its address is used).
function M.new_batch(n) return ffi.new("lp_pkt[?]", n or M.BATCH) end

-- ---------------------------------------------------------------- FlowID

local FlowID = {}
FlowID.__index = FlowID

-- A FlowID is { key string, flow unique id (0: none)[, its slot in the key cache below] } with the FlowID
-- metatable: array slots allocated with the table itself (LuaJIT colocates a small array part), so making one is
-- one allocation (none when the trace compiler sinks it, Packet:flowid) and reading its key one cache line.
--
-- The getters parse the key (protocol, type, A address and port, Z address and port) once per flow, not once per
-- FlowID: the parts of a slot's key are kept in fparts[slot] ({ key, proto, type, ipa, porta, ipz, portz }, made on
-- a getter's first call, replaced when the slot's flow changes: at most FID_SLOTS of them); a FlowID without a
-- slot (flowid_from_key, an untracked packet's) keeps its own parts in its field _pt.
local PARTS = "^(%x%x)(%u):([%x.]+):(p%-%x+)_([%x.]+):(p%-%x+)"
local fparts = {}
local function parts(self)
  local key, s = self[1], self[3]
  local pt
  if s ~= nil then pt = fparts[s] else pt = self._pt end
  if pt ~= nil and pt[1] == key then return pt end
  local proto, t, ipa, pa, ipz, pz = key:match(PARTS)
  pt = { key, proto, t, ipa, pa, ipz, pz }
  if s ~= nil then fparts[s] = pt else self._pt = pt end
  return pt
end

function FlowID:id() return self[1] end
FlowID.key = FlowID.id
function FlowID:protocol() return parts(self)[2] end
function FlowID:flow_type() return parts(self)[3] end
function FlowID:ipa() return parts(self)[4] end
function FlowID:porta() return parts(self)[5] end
function FlowID:ipz() return parts(self)[6] end
function FlowID:portz() return parts(self)[7] end

-- "C0.A8.01.02" -> "192.168.1.2"; an IPv6 key (32 hex digits) -> RFC 5952 text ("2001:db8::1"), as T.util.ntop
-- and the DNS analyser write it and tshark prints it (a script compares it with an address it was configured with)
local ntop
local function readable_ip(k)
  ntop = ntop or require("luaprobe.engine.plugins.tlib").util.ntop
  return ntop(k) or k
end

local function readable_port(k) return tostring(tonumber(k:sub(3), 16)) end

function FlowID:ipa_readable() return readable_ip(self:ipa()) end
function FlowID:ipz_readable() return readable_ip(self:ipz()) end
function FlowID:porta_readable() return readable_port(self:porta()) end
function FlowID:portz_readable() return readable_port(self:portz()) end
function FlowID:netflow_router() return "00.00.00.00" end
function FlowID:netflow_router_readable() return "0.0.0.0" end
function FlowID:netflow_ifindex_in() return 0 end
function FlowID:netflow_ifindex_out() return 0 end
FlowID.netflow_ifindex_in_readable = FlowID.netflow_ifindex_in
FlowID.netflow_ifindex_out_readable = FlowID.netflow_ifindex_out
function FlowID:to_s()
  return ("%-3s %-40s %-7s %-40s %-7s"):format(self:protocol(), self:ipa_readable(), self:porta_readable(),
    self:ipz_readable(), self:portz_readable())
end
FlowID.__tostring = FlowID.id

--- A FlowID for a flow-id string (a plain value object: scripts may keep it).
function M.flowid_from_key(key) return setmetatable({ key, 0 }, FlowID) end

--- A FlowID for a decoded packet (the key string is computed now).
function M.flowid(d) return M.flowid_from_key(flowkey(d)) end

-- ---------------------------------------------------------------- Packet / Layer

local Packet = {}
Packet.__index = Packet
local Layer = {}
Layer.__index = Layer

-- Each Packet and Layer object carries its class's methods as fields of its own (issue 10): `layer:packet()` is
-- then one lookup of a key present in the object's table (LuaJIT: HREFK), not a lookup that misses (HREF, a hash
-- search) followed by the metatable's __index and the class table.  After a hook's store into its own table with a
-- string key, LuaJIT redoes those lookups on every packet (tests/test_walk_fields.py).  The metatable stays.
local function with_methods(obj, class)
  for k, v in pairs(class) do
    if type(v) == "function" and k:sub(1, 2) ~= "__" then obj[k] = v end
  end
  return setmetatable(obj, class)
end

--- Point a Packet object's struct c (lp_pobj, the object's _c) at entry i of batch b: bind_packet without the
--- object (the simplecounter walk keeps the struct: host.lua sc_pick).
local function bind_struct(c, b, i)
  c.b, c.i = b, i
end
M.bind_struct = bind_struct

--- Bind the reusable packet object of a VM to entry i of batch b.  Objects
--- keep (batch pointer, index) in their lp_pobj struct (field _c), never a per-packet pointer: storing a fresh
--- cdata pointer in a table would allocate for every packet.
function M.bind_packet(obj, b, i)
  bind_struct(obj._c, b, i)
  return obj
end

local function P(self)
  local c = self._c
  return c.b[c.i]
end
M.entry = P

function M.new_packet() return with_methods({ _c = new_pobj(nil, -1) }, Packet) end

function Packet:timestamp()
  local p = P(self)
  return p.ts_sec, math.floor(p.ts_nsec / 1000)
end
function Packet:wire_length() return P(self).wirelen end
function Packet:capture_length() return P(self).caplen end
-- rawbytes(): one Buffer per Packet / Layer object, rebound on every call
-- (a Buffer is valid only while the hook runs, buffer.lua), so a hook that
-- reads bytes on every packet allocates nothing.
function Packet:rawbytes()
  local p, b = P(self), self._rb
  if b == nil then
    b = buffer.new(p.data, p.caplen)
    self._rb = b
    return b
  end
  return buffer.rebind(b, p.data, p.caplen)
end
-- get_layer / find_layer: one Layer object per (Packet object, layer index), made on first use and kept.  It
-- reads the Packet object's current entry, so rebinding the Packet (once per hook call) rebinds it too: no
-- allocation per call, and like the hook's own `layer` it is valid while the hook runs.
local function layer_at(self, i)
  local ls = self._layers
  if ls == nil then ls = {}; self._layers = ls end
  local l = ls[i + 1]
  if l == nil then
    l = M.layer(self, i)
    ls[i + 1] = l
  end
  return l
end

function Packet:num_layers() return P(self).d.nlayers end
function Packet:get_layer(i)
  if not (i >= 0 and i < P(self).d.nlayers) then return nil end         -- NaN too (as getbyte below)
  return layer_at(self, i)
end
function Packet:find_layer(guid)
  local proto = type(guid) == "string" and decode.by_guid(guid) or nil
  if proto == nil then return nil end
  local i = find(P(self).d, proto)
  if i < 0 then return nil end
  return layer_at(self, i)
end
-- The key strings of recent flows, direct-mapped by the flow's record index in the flow table (p.flow, modulo
-- FID_SLOTS): fid[2s] the key of the flow last seen in slot s, fid[2s + 1] that flow's unique id (p.flow_uid,
-- never reused), side by side in one array (one cache line for the check and the key).  A script calling
-- packet:flowid() on every packet formats and interns the key string once per flow, not once per packet.  A record
-- index the flow table reuses for a new flow, or one FID_SLOTS apart, replaces the slot's key: the old string is
-- then the collector's (or the script's, if it kept it).  Memory stays bounded: at most FID_SLOTS strings.
--
-- The FlowID itself is a new { key, uid, slot } table per call (issue 10): a hook that only calls its methods
-- (`packet:flowid():id()`, the usual shape) lets LuaJIT sink the table out of the compiled walk (no allocation,
-- no object to load per packet), where a cached object per flow was one allocation per new flow and a dependent
-- cache miss per known flow.  Two FlowIDs of one flow compare equal (__eq); a script may keep either.
local FID_SLOTS = 131072
local fid = {}
local fid_made = 0       -- keys made and cached so far (touch_flowids works from TOUCH_FROM on)
local TOUCH_FROM = 16384  -- ~16 000 flows' keys (~1.3 MiB, and the cache's array) no longer stay in a core's cache

FlowID.__eq = function(a, b) return a[1] == b[1] end

--- Load the cached key and unique id of packets 0 .. n-1 of batch b (lp_pkt *), and the key strings' headers,
--- before a walk (issue 10).  With many flows each is a cache miss or two (the slot, the string a script
--- indexes its state by); here the loads of different packets do not depend on each other, so the CPU overlaps
--- their misses, and the hook's flowid():id() then finds them in cache (the flow table's touch loops do the same,
--- engine/fastpath/flowtable.lua).  Only once this VM has made TOUCH_FROM keys: with fewer flows they stay in
--- cache and the loop would only cost (~5 ns per packet).  The sum it makes is kept in M.touched so that the
--- loads are not optimised away.
function M.touch_flowids(b, n)
  if fid_made < TOUCH_FROM then return end
  local t, s = fid, 0
  for k = 0, n - 1 do
    local j = 2 * band(b[k].flow, FID_SLOTS - 1)
    local u = t[j + 1]
    if u then s = s + u + #t[j] end
  end
  M.touched = s
end

--- The key string of packet entry p (lp_pkt): the slot's cached string when the slot holds p's flow (its unique
--- id), else formatted now (decode.flowkey) and cached.  A packet without a tracked flow (non-IP, uid 0) gets its
--- key formatted, not cached.  Packet:flowid():id() and Layer:flowkey() give this string.
local function flow_key(p)
  local uid = p.flow_uid
  if uid <= 0 then return flowkey(p.d) end
  local s = band(p.flow, FID_SLOTS - 1)
  local t, j = fid, 2 * s
  if t[j + 1] == uid then return t[j], s end
  local k = flowkey(p.d)
  t[j], t[j + 1] = k, uid
  fid_made = fid_made + 1
  return k, s
end

--- The packet's FlowID: { key string (flow_key), flow unique id, cache slot } with the FlowID metatable; a packet
--- without a tracked flow gets a FlowID of its own key (unique id 0).
function Packet:flowid()
  local c = self._c
  local p = c.b[c.i]
  local uid = p.flow_uid
  if uid <= 0 then return M.flowid(p.d) end
  local k, s = flow_key(p)
  return setmetatable({ k, uid, s }, FlowID)
end
function Packet:originid() return P(self).ifindex end
function Packet:set_packetstore_policy() end
function Packet:set_timestamp(sec, usec)
  P(self).ts_sec = sec
  P(self).ts_nsec = (usec or 0) * 1000
end

--- A Layer object for layer i of a bound packet object: _packet (the Packet object, for Layer:packet()) and an
--- lp_lobj struct _c pointing at the packet object's struct (kept alive by _packet).
function M.layer(packet, i)
  return with_methods({ _packet = packet, _c = new_lobj(packet._c, i) }, Layer)
end

--- Rebind a reusable Layer to (packet object, layer index).
function M.bind_layer(layer, packet, i)
  local c = layer._c
  if layer._packet ~= packet then layer._packet = packet end
  c.p, c.i = packet._c, i
  return layer
end

function M.new_layer() return with_methods({ _c = new_lobj(nil, -1) }, Layer) end

-- The layer's lp_layer record and its packet's lp_pkt entry.
local function L(self)
  local c = self._c
  local pc = c.p
  return pc.b[pc.i].d.layer[c.i]
end
local function LP(self)
  local pc = self._c.p
  return pc.b[pc.i]
end

function Layer:layer_bytes() return L(self).length end
function Layer:protocol_id() return GUID[L(self).proto] end
function Layer:total_bytes() return LP(self).wirelen end
function Layer:packet() return self._packet end
--- Where the bytes of a layer that starts at `off` end: the end of the IP datagram (its total / payload length)
--- for the IP layer and the layers inside it, so that an Ethernet trailer or the padding of a short frame (tshark's
--- eth.padding / eth.trailer) is not read as TCP, UDP or ICMP payload; the captured bytes' end otherwise.
local function layer_end(p, off)
  local d = p.d
  if d.ip_version ~= 0 and d.l3_offset >= 0 and off >= d.l3_offset then
    local e = d.payload_offset + d.payload_length
    if e < p.caplen then return e end
  end
  return p.caplen
end
M.layer_end = layer_end

function Layer:rawbytes()
  local p, off, b = LP(self), L(self).offset, self._rb
  local n = layer_end(p, off) - off
  if n < 0 then n = 0 end
  if b == nil then
    b = buffer.new(p.data + off, n)
    self._rb = b
    return b
  end
  return buffer.rebind(b, p.data + off, n)
end
-- The range tests are written so that NaN fails them (every comparison with NaN is false): before, getbyte(0/0) and
-- testbit(0/0) passed `off < 0 or ... >= caplen` and indexed the packet's bytes at NaN, a SIGSEGV of the fast path
-- blamed on the plug-in's own FFI code (exit 139) [test_layer_rawbytes.py]
function Layer:getbyte(off)
  local p, start = LP(self), L(self).offset
  if not (off >= 0 and start + off < p.caplen) then
    error(("Layer:getbyte(%s): out of range"):format(tostring(off)), 2)
  end
  return p.data[start + off]
end
function Layer:testbit(n)
  local p, start = LP(self), L(self).offset
  local byte = math.floor(n / 8)
  if not (n >= 0 and start + byte < p.caplen) then return false end
  return band(p.data[start + byte], rshift(0x80, n % 8)) ~= 0
end
--- The packet's flow id string, as packet():flowid():id() (Trisul: a shortcut for it), from the per-flow cache.
function Layer:flowkey() return (flow_key(LP(self))) end

M.Packet, M.Layer, M.FlowID = Packet, Layer, FlowID
return M
