--[[
luaprobe.engine.streams.stage — the shared TCP reassembly of reassembly_handler
plug-ins (docs.trisul.org/docs/lua/reassembly).  It lives in the fast path's driver VM, next to
the flow table, so a flow is reassembled once however many handler VMs
watch it; the built-in attribute analysers (HTTP headers, TLS records,
cipher and certificate chain: luaprobe.engine.streams.tls) read the same reassembled
bytes.  Per batch:

  1. every handler VM votes on the batch's new TCP flows
     (luaprobe.engine.streams.handler: H:vote) into the shared `votes` array
     (lp_svote per flow-table index, reset when the flow's uid changes);
  2. stage:run(batch, n) feeds the TCP segments of flows with at least one
     yes vote through luaprobe.engine.streams.tcpreasm and the analysers, appending events
     to `ev` (C memory; its address and count are read by Python);
  3. every handler VM walks the events (H:run_events) and calls its hooks.

Events (lp_sev): NEWFLOW (p/len = the flow key), DATA (dir in the
reassembly_handler convention 0 = server->client, 1 = client->server, off =
stream offset, p/len = bytes), ATTR (attr = index into M.ATTRS, p/len =
value), CLOSE.  Pointers stay valid until the next run: packet bytes live in
the packet ring until the next batch is filled, copied bytes are anchored in
`self.anchor` until the next run.

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
                 int32_t idx; int32_t attr; } lp_sev;
typedef struct { double uid; uint32_t asked; int32_t yes; int32_t disabled; int32_t pad; } lp_svote;
]]
end
pcall(ffi.cdef, "void *calloc(size_t, size_t);")
pcall(ffi.cdef, "void *realloc(void *, size_t);")
pcall(ffi.cdef, "void free(void *);")

local M = {}
M.NEWFLOW, M.DATA, M.ATTR, M.CLOSE = 1, 2, 3, 4
--- Attribute names (docs.trisul.org/docs/lua/reassembly); "" marks a flow's start and "^D" its end.
M.ATTRS = { [0] = "", "^D", "HTTP-Header", "Content-Type", "User-Agent", "Host", "URI",
            "TLS:RECORD", "TLS:O", "TLS:CA:ROOT", "TLS:CA:INTER", "TLS:CIPHER" }
local A = {}
for i = 0, #M.ATTRS do A[M.ATTRS[i]] = i end
M.MAX_HANDLERS = 32

local S = {}
S.__index = S

local function be32(p, o)
  return ((p[o] * 256 + p[o + 1]) * 256 + p[o + 2]) * 256 + p[o + 3]
end

--- opts: capacity (flow-table capacity), attributes (bool: run the analysers),
--- parse_cert (function(der) -> "O\tCN\tissuerO\tissuerCN\tselfsigned" or nil),
--- idle_timeout (s of packet time).
function M.new(opts)
  local self = setmetatable({
    capacity = opts.capacity, attributes = opts.attributes, parse_cert = opts.parse_cert,
    idle_timeout = opts.idle_timeout or 120, nhandlers = 0,
    flows = {}, anchor = {}, nev = 0, evcap = 4096, last_expire = 0,
    stats = { flows = 0, events = 0, attributes = 0, certificates = 0, cert_errors = 0 },
  }, S)
  self.votes = cast("lp_svote *", ffi.C.calloc(opts.capacity, ffi.sizeof("lp_svote")))
  self.ev = cast("lp_sev *", ffi.C.calloc(self.evcap, ffi.sizeof("lp_sev")))
  assert(self.votes ~= nil and self.ev ~= nil, "stage: out of memory")
  self.votes_addr = tonumber(cast("intptr_t", self.votes))
  self.R = tcpreasm.new({
    cb = function(id, dir, off, p, n) self:on_data(id, dir, off, p, n) end,
    cb_gap = function(id, dir) self:on_gap(id, dir) end,
    cb_close = function(id) self:on_close(id) end,
  })
  return self
end

function S:free()
  ffi.C.free(self.votes); ffi.C.free(self.ev)
  self.votes, self.ev = nil, nil
end

--- Address of the event array (it moves when it grows) and the event count.
function S:events() return tonumber(cast("intptr_t", self.ev)), self.nev end

-- ------------------------------------------------------------------ events

function S:emit(kind, st, dir, off, p, n, attr)
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
  self.nev = k + 1
end

function S:attr(st, name, value)
  if value == nil then return end
  self.stats.attributes = self.stats.attributes + 1
  self:emit(M.ATTR, st, 0, 0, tostring(value), nil, A[name])
end

-- ------------------------------------------------------------------ analysers

local METHODS = { "GET ", "POST ", "HEAD ", "PUT ", "DELETE ", "OPTIONS ", "PATCH ", "CONNECT ", "TRACE " }

local function looks_http(s)
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
  if looks_http(first) then
    return http.new({
      on_request = function(req)
        self:attr(st, "HTTP-Header", (req._raw or "") .. "\r\n\r\n")
        self:attr(st, "URI", req:get_path())
        self:attr(st, "Host", req:get_value("Host"))
        self:attr(st, "User-Agent", req:get_value("User-Agent"))
      end,
      on_response = function(_, resp)
        self:attr(st, "HTTP-Header", (resp._raw or "") .. "\r\n\r\n")
        self:attr(st, "Content-Type", resp:get_value("Content-Type"))
      end,
    })
  end
  return false
end

-- ------------------------------------------------------------------ reassembly callbacks (dir: 0 = client->server)

function S:on_data(id, dir, off, p, n)
  local st = self.flows[id]
  if st == nil or n <= 0 then return end
  if not st.quiet then self:emit(M.DATA, st, 1 - dir, off, p, n) end
  if self.attributes then
    local a = st.an
    if a == nil then
      local first = type(p) == "string" and p:sub(1, 16) or fstring(p, n < 16 and n or 16)
      a = self:new_analyser(st, dir, first)
      st.an = a
    end
    if a then a:data(dir, p, n) end
  end
end

function S:on_gap(id, dir)
  local st = self.flows[id]
  if st and st.an then st.an:gap(dir, 0) end
end

function S:on_close(id)
  local st = self.flows[id]
  if st == nil then return end
  if st.an and st.an.close then pcall(st.an.close, st.an) end
  if self.attributes then self:emit(M.ATTR, st, 0, 0, "", 0, A["^D"]) end
  self:emit(M.CLOSE, st)
  self.flows[id] = nil
end

-- ------------------------------------------------------------------ the batch walk

--- Reassemble the TCP segments of voted flows in the batch at `addr` (n packets); returns the event count.
function S:run(addr, n)
  local batch = cast(packet.pktp, addr)
  self.nev, self.anchor = 0, {}
  local votes, R, nh = self.votes, self.R, self.nhandlers
  for i = 0, n - 1 do
    local p = batch[i]
    local d = p.d
    if d.first[TCP] >= 0 and p.flow >= 0 then
      local v = votes[p.flow]
      local id = p.flow_uid
      if v.uid == id and v.yes > 0 then
        self.ts = p.ts_sec + p.ts_nsec * 1e-9
        local f = R.flows[id]
        if f ~= nil and band(d.tcp_flags, 0x12) == 0x02 then       -- SYN: is the 5-tuple reused?
          if f.closed then R:forget(id); f = nil
          elseif R:is_new_connection(id, p.dir, be32(p.data, d.l4_offset + 4), d.tcp_flags) then
            R:restart(id); f = nil                                  -- the old connection's CLOSE, then NEWFLOW
          end
        end
        if f == nil or not f.closed then
          local st = self.flows[id]
          if st == nil then
            st = { uid = id, idx = p.flow }
            self.flows[id] = st
            self.stats.flows = self.stats.flows + 1
            self:emit(M.NEWFLOW, st, 0, 0, decode.flowkey(d))
            if self.attributes then self:emit(M.ATTR, st, 0, 0, "", 0, A[""]) end
          end
          st.quiet = v.disabled >= nh
          local l4, data = d.l4_offset, p.data
          R:packet(id, p.dir, be32(data, l4 + 4), d.tcp_flags, data + d.payload_offset,
                   st.quiet and st.an == nil and 0 or d.payload_length, p.ts_sec, nil, be32(data, l4 + 8))
        end
      end
    end
  end
  local now = n > 0 and batch[n - 1].ts_sec or 0
  if now - self.last_expire >= 10 then
    self.last_expire = now
    R:expire_idle(now - self.idle_timeout)
  end
  self.stats.events = self.stats.events + self.nev
  return self.nev
end

--- End of input: every open flow closes (CLOSE events); returns the event count.
function S:finish()
  self.nev, self.anchor = 0, {}
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
