--[[
luaprobe.engine.streams.stage — the one TCP reassembly per flow of the fast path: it feeds
reassembly_handler plug-ins (docs.trisul.org/docs/lua/reassembly), filex_monitor plug-ins
(docs.trisul.org/docs/lua/fileextract) and the built-in attribute analysers.  It lives in the fast path's driver VM, next to the flow
table, so a flow is reassembled once however many handler and filex VMs watch it; the
attribute analysers (HTTP headers, TLS records, cipher and certificate chain:
luaprobe.engine.streams.tls) read the same reassembled bytes.  Per batch:

  1. every handler VM votes on the batch's new TCP flows
     (luaprobe.engine.streams.handler: H:vote) into the shared `votes` array
     (lp_svote per flow-table index, reset when the flow's uid changes);
  2. stage:run(batch, n) feeds the TCP segments of flows with at least one
     yes vote, and of flows a filex_monitor still wants, through
     luaprobe.engine.streams.tcpreasm and the analysers, appending events to `ev`
     (C memory; its address and count are read by Python);
  3. every handler VM (H:run_events) and every filex VM (luaprobe.engine.streams.filex:
     F:run_events) walks the events addressed to it and calls its hooks.

filex_monitor votes (lp_svote.fx): 0 = undecided (no payload seen yet: handshake packets
still go to reassembly, which learns the stream starts), -1 = not for file extraction,
k > 0 = k filex VMs still want the flow.  The flow's first payload decides, in this VM and
without calling any plug-in: a payload that does not look like HTTP/1.x
(luaprobe.engine.streams.http.looks_http) sets -1 and, unless a handler voted for the
flow, the flow leaves reassembly before any of its bytes is reassembled and costs one
byte read per packet from then on (its flow record's stage_off: the vote is not read).  An HTTP flow gets an FXNEW event, each filex VM
calls filter_flow and a false vote decrements fx (the last one sets -1: the flow leaves
reassembly at the next packet).  A SYN starting a new connection on the 5-tuple, or the
end of a filex flow, sets 0 again (a fresh vote).  fx, hs and the ISNs belong to the flow
`fxuid` (reset by this VM when a slot gets a new flow; uid/asked/yes/disabled are the
handlers', reset by their votes).

Handshake record (lp_svote.hs, isn0, isn1): while only filex wants a flow and no payload
came yet, the handshake is not fed to the reassembly (a Lua state per flow, allocated and
dropped again for every short non-HTTP connection) but recorded in the vote: what
tcpreasm would learn from it (the client, whether the first packet was a SYN, the SYN
sequence numbers per flow-table direction).  An HTTP flow's reassembly state is created
from the record at its first payload (tcpreasm R:seed); a FIN or RST before any payload
creates it too (tcpreasm handles those).  A SYN without ACK whose sequence number is not
the recorded ISN of its direction starts the record over (a new connection: counted in
tcp_reused, as tcpreasm's restart does).

Events (lp_sev, `to` = audience bits: TO_HANDLER, TO_FILEX; bi = index in the batch of
the packet that caused it, -1 outside the batch walk): NEWFLOW (p/len = the flow key;
handlers), FXNEW (p/len = the flow key; filex), DATA (dir in the reassembly_handler
convention 0 = server->client, 1 = client->server, off = stream offset, p/len = bytes),
GAP (dir, off = bytes missing; filex), ATTR (attr = index into M.ATTRS, p/len = value;
handlers), CLOSE (attr: bit 1 = the server->client stream ended with its FIN, bit 2 = the client->server one).  Pointers stay valid until the next run: packet bytes live in the packet
ring until the next batch is filled, copied bytes are anchored in `self.anchor` until the
next run.

Certificates are parsed by `opts.parse_cert(der)` (Python, the
`cryptography` X.509 library: engine/streams/certs.py), once per
certificate; everything per packet stays in Lua.
]]
local ffi = require("ffi")
local bit = require("bit")
local tcpreasm = require("luaprobe.engine.streams.tcpreasm")
local http = require("luaprobe.engine.streams.http")
local tls = require("luaprobe.engine.streams.tls")
local packet = require("luaprobe.engine.plugins.packet")
local decode = require("luaprobe.engine.fastpath.decode")

local band = bit.band
local cast, fstring = ffi.cast, ffi.string
local TCP = decode.PROTO.TCP

if not pcall(ffi.typeof, "lp_sev") then
  ffi.cdef [[
typedef struct { double uid; double ts; double off; const uint8_t *p; int32_t len; int16_t kind; int16_t dir;
                 int32_t idx; int16_t attr; int16_t to; int32_t bi; int32_t pad; } lp_sev;
typedef struct { double uid; uint32_t asked; int32_t yes; int32_t disabled; int32_t fx;
                 double fxuid; uint32_t isn0; uint32_t isn1; int32_t hs; int32_t pad; } lp_svote;
]]
end
pcall(ffi.cdef, "void *calloc(size_t, size_t);")
pcall(ffi.cdef, "void *realloc(void *, size_t);")
pcall(ffi.cdef, "void free(void *);")

local M = {}
M.NEWFLOW, M.DATA, M.ATTR, M.CLOSE, M.FXNEW, M.GAP = 1, 2, 3, 4, 5, 6
M.TO_HANDLER, M.TO_FILEX = 1, 2
local TO_H, TO_FX = M.TO_HANDLER, M.TO_FILEX
--- Attribute names (docs.trisul.org/docs/lua/reassembly); "" marks a flow's start and "^D" its end.
M.ATTRS = { [0] = "", "^D", "HTTP-Header", "Content-Type", "User-Agent", "Host", "URI",
            "TLS:RECORD", "TLS:O", "TLS:CA:ROOT", "TLS:CA:INTER", "TLS:CIPHER" }
local A = {}
for i = 0, #M.ATTRS do A[M.ATTRS[i]] = i end
M.MAX_HANDLERS = 32

local S = {}
S.__index = S

local looks_http = http.looks_http
-- lp_svote.hs bits: a packet recorded, the first one was a SYN, the client is the flow table's Z end (dir 1),
-- the SYN sequence number of direction 0 / 1 is known
local HS_SEEN, HS_SYN, HS_CLIENT1, HS_ISN0, HS_ISN1 = 1, 2, 4, 8, 16

local function be32(p, o)
  return ((p[o] * 256 + p[o + 1]) * 256 + p[o + 2]) * 256 + p[o + 3]
end

--- opts: capacity (flow-table capacity), attributes (bool: run the analysers),
--- parse_cert (function(der) -> "O\tCN\tissuerO\tissuerCN\tselfsigned" or nil),
--- idle_timeout (s of packet time), records (the flow table's hot records, `lp_flow *`: the stage sets a record's
--- stage_off once neither a handler nor filex wants the flow, and from then on skips its packets without reading
--- its vote, a random access into the vote array per packet), cold (its cold records, `lp_flow_cold *`: first_ts),
--- ft (the flow table itself, optional: the vote array is then its FT:side_array, whose pages are mapped ahead of new
--- flows with the records' instead of faulted in one by one by new flows in the packet loop; else calloc'd).  Fields set afterwards: nhandlers, nfilex (VMs attached).
function M.new(opts)
  local self = setmetatable({
    capacity = opts.capacity, attributes = opts.attributes, parse_cert = opts.parse_cert,
    idle_timeout = opts.idle_timeout or 120, nhandlers = 0, nfilex = 0,
    flows = {}, anchor = {}, nev = 0, evcap = 4096, last_expire = 0, ts = 0, bi = -1, wantcap = 0,
    -- flows: handler flows (NEWFLOW); filex_flows: FXNEW; flows_not_http: dropped at their first payload
    stats = { flows = 0, filex_flows = 0, flows_not_http = 0, events = 0, attributes = 0, certificates = 0,
              cert_errors = 0 },
  }, S)
  if opts.ft then               -- the flow table's side array: its pages mapped ahead with the records' (FT:side_array)
    self.votes_mem = opts.ft:side_array(ffi.sizeof("lp_svote"))
    self.votes = cast("lp_svote *", self.votes_mem)
  else
    self.votes = cast("lp_svote *", ffi.C.calloc(opts.capacity, ffi.sizeof("lp_svote")))
  end
  self.ev = cast("lp_sev *", ffi.C.calloc(self.evcap, ffi.sizeof("lp_sev")))
  assert(self.votes ~= nil and self.ev ~= nil, "stage: out of memory")
  self.votes_addr = tonumber(cast("intptr_t", self.votes))
  self.recs = assert(opts.records, "stage: the flow table's records are required")
  self.cold = assert(opts.cold, "stage: the flow table's cold records are required")
  self.R = tcpreasm.new({
    cb = function(id, dir, off, p, n) self:on_data(id, dir, off, p, n) end,
    cb_gap = function(id, dir, _, missing) self:on_gap(id, dir, missing) end,
    cb_close = function(id, _, fins) self:on_close(id, fins) end,
  })
  return self
end

function S:free()
  if self.votes_mem == nil then ffi.C.free(self.votes) end   -- else the flow table's (freed with it)
  ffi.C.free(self.ev)
  self.votes, self.votes_mem, self.ev = nil, nil, nil
end

--- Address of the event array (it moves when it grows) and the event count.
function S:events() return tonumber(cast("intptr_t", self.ev)), self.nev end

-- ------------------------------------------------------------------ events

function S:emit(kind, st, dir, off, p, n, attr, to)
  local k = self.nev
  if k >= self.evcap then
    local cap = self.evcap * 2
    local ev = cast("lp_sev *", ffi.C.realloc(self.ev, cap * ffi.sizeof("lp_sev")))
    assert(ev ~= nil, "stage: out of memory")
    self.ev, self.evcap = ev, cap
  end
  if type(p) == "string" then
    self.anchor[#self.anchor + 1] = p
    n = n or #p
    p = cast("const uint8_t *", p)
  end
  local e = self.ev[k]
  e.uid, e.ts, e.off, e.p, e.len, e.kind, e.dir, e.idx, e.attr = st.uid, self.ts, off or 0, p, n or 0, kind,
    dir or 0, st.idx, attr or 0
  e.to, e.bi = to or TO_H, self.bi
  self.nev = k + 1
end

function S:attr(st, name, value)
  if value == nil then return end
  self.stats.attributes = self.stats.attributes + 1
  self:emit(M.ATTR, st, 0, 0, tostring(value), nil, A[name])
end

-- ------------------------------------------------------------------ analysers

local METHODS = { "GET ", "POST ", "HEAD ", "PUT ", "DELETE ", "OPTIONS ", "PATCH ", "CONNECT ", "TRACE " }

local function request_start(s)
  for i = 1, #METHODS do
    local m = METHODS[i]
    if s:sub(1, #m) == m then return true end
  end
  return false
end

--- "O, else CN" of a parsed certificate record (subject or issuer).
local function org(o, cn) if o ~= "" then return o end; return cn end

function S:on_certs(st, list)
  local parsed = {}
  for i, der in ipairs(list) do
    self.stats.certificates = self.stats.certificates + 1
    local ok, rec = pcall(self.parse_cert, der)
    if not ok or rec == nil then
      self.stats.cert_errors = self.stats.cert_errors + 1
      break
    end
    local o, cn, io, icn, self_signed = tostring(rec):match("^(.-)\t(.-)\t(.-)\t(.-)\t(%d)$")
    parsed[i] = { subject = org(o or "", cn or ""), issuer = org(io or "", icn or ""), root = self_signed == "1" }
  end
  if #parsed == 0 then return end
  self:attr(st, "TLS:O", parsed[1].subject)
  for i = 2, #parsed do
    self:attr(st, parsed[i].root and "TLS:CA:ROOT" or "TLS:CA:INTER", parsed[i].subject)
  end
  local last = parsed[#parsed]
  if not last.root and #parsed == #list then self:attr(st, "TLS:CA:ROOT", last.issuer) end
end

function S:new_analyser(st, dir, first)
  if dir ~= 0 then return false end                  -- the server spoke first: neither HTTP nor TLS
  if tls.looks_like(first) then
    return tls.new({
      record = function(_, rec) self:attr(st, "TLS:RECORD", rec) end,
      cipher = function(hex) self:attr(st, "TLS:CIPHER", hex) end,
      certs = function(d, list) if d == 1 then self:on_certs(st, list) end end,
    })
  end
  if request_start(first) then
    return http.new({
      on_request = function(req)
        self:attr(st, "HTTP-Header", http.block(req))
        self:attr(st, "URI", req:get_path())
        self:attr(st, "Host", req:get_value("Host"))
        self:attr(st, "User-Agent", req:get_value("User-Agent"))
      end,
      on_response = function(_, resp)
        self:attr(st, "HTTP-Header", http.block(resp))
        self:attr(st, "Content-Type", resp:get_value("Content-Type"))
      end,
    })
  end
  return false
end

-- ------------------------------------------------------------------ reassembly callbacks (dir: 0 = client->server)

-- st (per reassembled flow): uid, idx (flow-table index), h (handlers voted for it), fx (filex VMs want it),
-- quiet (no handler takes its bytes: all disabled it, or none voted), an (attribute analyser or false)

function S:on_data(id, dir, off, p, n)
  local st = self.flows[id]
  if st == nil or n <= 0 then return end
  local to = (st.quiet and 0 or TO_H) + (st.fx and TO_FX or 0)
  if to ~= 0 then self:emit(M.DATA, st, 1 - dir, off, p, n, 0, to) end
  if self.attributes and st.h then
    local a = st.an
    if a == nil then
      local first = type(p) == "string" and p:sub(1, 16) or fstring(p, n < 16 and n or 16)
      a = self:new_analyser(st, dir, first)
      st.an = a
    end
    if a then a:data(dir, p, n) end
  end
end

function S:on_gap(id, dir, missing)
  local st = self.flows[id]
  if st == nil then return end
  if st.an then st.an:gap(dir, missing) end       -- the parser skips that many bytes (a body, else resync)
  if st.fx then self:emit(M.GAP, st, 1 - dir, missing, nil, 0, 0, TO_FX) end
end

--- A reassembled connection ended; fins (tcpreasm's bits: 1 client->server, 2 server->client ended with their FIN)
--- go to the CLOSE event's attr in this module's direction convention: 1 server->client (dir 0), 2 client->server.
function S:on_close(id, fins)
  local st = self.flows[id]
  if st == nil then return end
  if st.an and st.an.close then pcall(st.an.close, st.an) end
  if self.attributes and st.h then self:emit(M.ATTR, st, 0, 0, "", 0, A["^D"]) end
  local to = (st.h and TO_H or 0) + (st.fx and TO_FX or 0)
  fins = fins or 0
  local ends = (band(fins, 2) ~= 0 and 1 or 0) + (band(fins, 1) ~= 0 and 2 or 0)
  if to ~= 0 then self:emit(M.CLOSE, st, 0, 0, nil, 0, ends, to) end
  if st.fx then                                    -- the next connection on this flow gets a fresh vote
    local v = self.votes[st.idx]
    if v.fxuid == st.uid then v.fx, v.hs = 0, 0 end
  end
  self.flows[id] = nil
end

-- ------------------------------------------------------------------ the batch walk

function S:new_flow(id, idx, d, h)
  local st = { uid = id, idx = idx, h = h, fx = false, quiet = true }
  self.flows[id] = st
  if h then
    self.stats.flows = self.stats.flows + 1
    self:emit(M.NEWFLOW, st, 0, 0, decode.flowkey(d))
    if self.attributes then self:emit(M.ATTR, st, 0, 0, "", 0, A[""]) end
  end
  return st
end

--- The first payload of a flow filex has not decided on: HTTP (FXNEW) or not (fx = -1).  handshake: the flow's
--- first packet was a SYN; later: the payload was captured ahead of bytes of its stream still to come (its SYN
--- was seen and it does not follow it), so it cannot tell and counts as HTTP, like a payload too short to tell.
function S:filex_vote(id, p, d, v, st, handshake, later)
  if later or looks_http(p.data + d.payload_offset, d.payload_length, handshake) then
    if st == nil then st = self:new_flow(id, p.flow, d, false) end
    st.fx = true
    v.fx = self.nfilex
    self.stats.filex_flows = self.stats.filex_flows + 1
    self:emit(M.FXNEW, st, 0, 0, decode.flowkey(d), nil, 0, TO_FX)
  else
    v.fx = -1
    self.stats.flows_not_http = self.stats.flows_not_http + 1
  end
  return st
end

--- Record what the reassembly would learn from a packet without payload, FIN or RST before a flow's first
--- payload (its get_flow and SYN handling, engine/streams/tcpreasm.lua).
function S:handshake(v, pdir, flags, seq)
  local hs = v.hs
  local syn = band(flags, 0x02) ~= 0
  if syn and hs ~= 0 then                               -- a SYN (or SYN+ACK) with a new ISN: a new connection?
    if pdir == 0 then
      if band(hs, HS_ISN0) ~= 0 and v.isn0 ~= seq then hs = 0 end
    elseif band(hs, HS_ISN1) ~= 0 and v.isn1 ~= seq then hs = 0 end
    if hs == 0 then self.R.stats.reused = self.R.stats.reused + 1 end
  end
  if hs == 0 then
    hs = HS_SEEN
    if syn then
      hs = hs + HS_SYN
      if (band(flags, 0x10) ~= 0 and 1 - pdir or pdir) == 1 then hs = hs + HS_CLIENT1 end
    end
  end
  if syn then
    if pdir == 0 then
      if band(hs, HS_ISN0) == 0 then hs, v.isn0 = hs + HS_ISN0, seq end
    elseif band(hs, HS_ISN1) == 0 then hs, v.isn1 = hs + HS_ISN1, seq end
  end
  v.hs = hs
end

--- The reassembly state of flow `id` from its handshake record (consumed).
function S:seed(id, v)
  local hs = v.hs
  v.hs = 0
  return self.R:seed(id, band(hs, HS_CLIENT1) ~= 0 and 1 or 0, band(hs, HS_SYN) ~= 0,
                     band(hs, HS_ISN0) ~= 0 and v.isn0 or nil, band(hs, HS_ISN1) ~= 0 and v.isn1 or nil, self.ts)
end

--- The first payload (or FIN / RST) of a flow only filex wants, with nothing reassembled yet: the HTTP vote, then
--- the reassembly state from the handshake record and this packet.
function S:first_packet(p, v, id, plen)
  local d = p.d
  local st
  if plen > 0 then
    local hs, seq = v.hs, be32(p.data, d.l4_offset + 4)
    local later = (p.dir == 0 and band(hs, HS_ISN0) ~= 0 and seq ~= (v.isn0 + 1) % 4294967296)
               or (p.dir == 1 and band(hs, HS_ISN1) ~= 0 and seq ~= (v.isn1 + 1) % 4294967296)
    st = self:filex_vote(id, p, d, v, nil, band(hs, HS_SYN) ~= 0, later)
    if v.fx < 0 then                                   -- not HTTP: nothing was allocated for it
      self.recs[p.flow].stage_off = 1                  -- (and no handler voted for it: st == nil)
      return
    end
  end
  if v.hs ~= 0 then self:seed(id, v) end
  local data, l4 = p.data, d.l4_offset
  return self.R:packet(id, p.dir, be32(data, l4 + 4), d.tcp_flags, data + d.payload_offset, st and plen or 0,
                       p.ts_sec, nil, be32(data, l4 + 8))
end

--- TCP packet i of the batch, of a flow someone wanted when the batch's votes were read (a handler voted
--- for it, or filex had not said no; an earlier packet of the batch may have changed that).
function S:packet(batch, i)
  local p = batch[i]
  local v = self.votes[p.flow]
  if not (v.yes > 0 or (self.nfilex > 0 and v.fx >= 0)) then return end
  self.bi = i
  local d = p.d
  local id = p.flow_uid
  local R = self.R
  local flags = d.tcp_flags
  local data, l4 = p.data, d.l4_offset
  self.ts = p.ts_sec + p.ts_nsec * 1e-9
  local f = R.flows[id]
  if band(flags, 0x02) ~= 0 then                       -- SYN (or SYN+ACK): is the 5-tuple reused?
    if f ~= nil then
      if f.closed then R:forget(id); f = nil
      elseif R:is_new_connection(id, p.dir, be32(data, l4 + 4), flags) then
        R:restart(id); f = nil                          -- the old connection's CLOSE, then a new flow
      end
    end
    if f == nil and v.fx < 0 and band(flags, 0x10) == 0 then v.fx, v.hs = 0, 0 end   -- a new connection: filex votes again
  end
  if f ~= nil and f.closed then return end
  local st = self.flows[id]
  if st == nil and v.yes > 0 then st = self:new_flow(id, p.flow, d, true) end
  local fx = v.fx
  if fx == 0 and self.nfilex > 0 then
    local plen = d.payload_length
    if st == nil and f == nil then                     -- only filex wants it, nothing reassembled yet
      if plen == 0 and band(flags, 0x05) == 0 then     -- no payload, FIN or RST: the handshake record
        return self:handshake(v, p.dir, flags, be32(data, l4 + 4))
      end
      return self:first_packet(p, v, id, plen)         -- tail calls: see the end of this function
    elseif plen > 0 then
      st = self:filex_vote(id, p, d, v, st, f ~= nil and f.syn, f ~= nil and R:out_of_order(id, p.dir, be32(data, l4 + 4)))
      fx = v.fx
    end
  end
  if st ~= nil and st.fx and fx < 0 then st.fx = false end   -- every filex_monitor declined it
  if st == nil or not (st.h or st.fx) then
    if fx < 0 or self.nfilex == 0 then                 -- nobody wants it: out of reassembly
      if st ~= nil then self.flows[id] = nil end
      if f ~= nil then R:forget(id) end
      if v.yes == 0 then self.recs[p.flow].stage_off = 1 end
      return
    end
  end
  local quiet = true
  if st ~= nil then
    quiet = not st.h or v.disabled >= self.nhandlers
    st.quiet = quiet
  end
  local n = d.payload_length
  if quiet and (st == nil or (not st.fx and st.an == nil)) then n = 0 end
  -- a tail call: no slot of this frame stays live in the reassembly's side exits (with them, LuaJIT's
  -- side traces there failed with "register coalescing too complex" and were blacklisted)
  return R:packet(id, p.dir, be32(data, l4 + 4), flags, data + d.payload_offset, n, p.ts_sec, nil, be32(data, l4 + 8))
end

--- Reassemble the TCP segments of wanted flows in the batch at `addr` (n packets); returns the event count.
function S:run(addr, n)
  local batch = cast(packet.pktp, addr)
  self.nev, self.anchor = 0, {}
  local votes = self.votes
  local filex = self.nfilex > 0
  if n > self.wantcap then
    self.wantcap = n
    self.want = ffi.new("int32_t[?]", n)
  end
  -- two small loops (as the flow table's): the votes of every TCP packet, then the wanted packets
  -- through reassembly; the first one's trace stays tiny, the second's carries no batch-walk state
  local want, m = self.want, 0
  local recs = self.recs
  for i = 0, n - 1 do
    local p = batch[i]
    local fi = p.flow
    if fi >= 0 and p.d.first[TCP] >= 0 and recs[fi].stage_off == 0 then
      local v = votes[fi]
      if v.fxuid ~= p.flow_uid then
        v.fxuid, v.fx, v.hs = p.flow_uid, 0, 0
      elseif v.fx < 0 and band(p.d.tcp_flags, 0x12) == 0x02 and self.cold[fi].first_ts == p.ts_sec + p.ts_nsec * 1e-9 then
        v.fx, v.hs = 0, 0            -- the flow table renewed the record at this SYN (port reuse): filex votes again
      end
      if v.yes > 0 or (filex and v.fx >= 0) then
        want[m] = i
        m = m + 1
      end
    end
  end
  for k = 0, m - 1 do
    self:packet(batch, want[k])
  end
  self.bi = -1
  self.stats.events = self.stats.events + self.nev
  return self.nev
end

--- Packet time reached second `sec`, opened by a packet at `usec` µs (engine/fastpath/run.py _tick, before that
--- second's first packet; in every shard of a sharded run alike: TIME records): every 10 s of packet time idle flows
--- and held data end (tcpreasm.lua expire_idle), their events (onterminateflow, a filex file's end) at that time;
--- returns the event count.  Before, this ran in S:run before a batch's first packet, so a shard ran it only in the
--- seconds of its own packets, and its events carried the time of the last packet the stage had reassembled (any
--- flow's): with --shards 2 an idle flow's onterminateflow came at another second than with one fast path.
function S:tick(sec, usec)
  if sec - self.last_expire < 10 then return 0 end
  self.last_expire = sec
  self.nev, self.anchor, self.bi = 0, {}, -1
  self.ts = sec + usec * 1e-6
  self.R:expire_idle(sec - self.idle_timeout, sec)
  self.stats.events = self.stats.events + self.nev
  return self.nev
end

--- End of input: every open flow closes (CLOSE events), at `sec`.`usec` (the last tick's time: the same in every
--- shard); returns the event count.
function S:finish(sec, usec)
  self.nev, self.anchor, self.bi = 0, {}, -1
  if sec then self.ts = sec + usec * 1e-6 end
  local ids = {}
  for id in pairs(self.flows) do ids[#ids + 1] = id end
  table.sort(ids)
  for _, id in ipairs(ids) do self.R:expire(id) end
  return self.nev
end

function S:stats_table()
  local out = {}
  for k, v in pairs(self.stats) do out[k] = v end
  for k, v in pairs(self.R.stats) do out["tcp_" .. k] = v end
  return out
end

return M
