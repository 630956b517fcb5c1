--[[
luaprobe.engine.analysers.run — luaprobe's built-in analysers (Trisul's own counter
groups, resources and full-text documents) in one LuaJIT VM that walks the
fast path's batch like a plug-in VM (docs/plugins.md "Built-in analysers").

    local A = require("luaprobe.engine.analysers.run").new{ counters = true, dns = true, http = true, tls = true }
    A:run_batch(batch_addr, n)        -- per batch (only when at least one analyser is on)
    A:finish()                        -- end of input: close HTTP/TLS flows
    A.engine:take_counters(now), A.engine:take_outputs()   -- like a plug-in VM's engine
    A:take_docs()                     -- { fts = {rows}, certs = {rows} }

Analysers and their outputs (GUIDs: docs/reference.md "Well-known groups", meters: docs.trisul.org/docs/ref/meters):
  counters  Hosts {4CD742B1-...} (IPv4 key C0.A8.01.02) and HostsIPv6 {6CD742B1-...} (32 hex digits):
              meter 0 bytes both ways, 1 bytes received (host is the destination), 2 bytes
              transmitted (host is the source), 3 packets both ways;
            Apps {C51B48D4-...} key p-XXXX (the flow's Z port: the lower one), meter 0 bytes;
            Mac {4B09BD22-...} key 00:1C:C0:B9:B9:10: meter 0 bytes transmitted, 1 bytes received;
            NetworkLayerStats ("Protocols") {E89BCD56-...} key = IP protocol in 2 hex digits:
              meter 0 bytes, 1 packets;
            Aggregates {393B5EBC-...} key TOTALBW: meter 0 bytes, 1 packets (every frame).
            Bytes are frame (wire) lengths.  Values are per-bucket totals (60 s buckets).
  dns       UDP port 53: one DNS resource {D1E27FF0-...} per answer record of a response
            (uri = the question name, label = the record as a dig line), one DNS FTS document
            {09B305DF-...} per message (engine.streams.dns.dig).
  http      TCP flows whose first bytes are HTTP/1.x: one URL resource {4EF9DEB9-...} per
            request (uri "METHOD host path", host = the Host header or else the server's address, label "status:N usec:T" with the response time in
            microseconds; "status:0" when no response came), one HTTP header FTS document
            {28217924-...} per request and per response header block (the bytes as sent, up to
            the blank line).
  tls       TCP flows whose first bytes are a TLS record: the server's Certificate message
            (TLS <= 1.2) as a `certs` row {ts, usec, flowkey, "", der...}; Python turns it into
            the SSL Certs resource and FTS document with `cryptography` (engine/analysers/certs.py).
]]
local ffi = require("ffi")
local bit = require("bit")
local engine_mod = require("luaprobe.engine.plugins.engine")
local decode = require("luaprobe.engine.fastpath.decode")
local packet = require("luaprobe.engine.plugins.packet")
local tcpreasm = require("luaprobe.engine.streams.tcpreasm")
local http = require("luaprobe.engine.streams.http")
local dns = require("luaprobe.engine.streams.dns")
local tls = require("luaprobe.engine.streams.tls")

local band, rshift = bit.band, bit.rshift
local fstring, sformat, sbyte, sfind = ffi.string, string.format, string.byte, string.find
local P = decode.PROTO
local ETHERNET, TCP, UDP = P.ETHERNET, P.TCP, P.UDP
local add = engine_mod.add

local M = {}
local A = {}
A.__index = A

M.GUID = {
  HOSTS = "{4CD742B1-C1CA-4708-BE78-0FCA2EB01A86}", HOSTS6 = "{6CD742B1-C1CA-4708-BE78-0FCA2EB01A86}",
  APPS = "{C51B48D4-7876-479E-B0D9-BD9EFF03CE2E}", MAC = "{4B09BD22-3B99-40FC-8215-94A430EA0A35}",
  PROTOCOLS = "{E89BCD56-30AD-40F5-B1C8-8B7683F440BD}", AGGREGATES = "{393B5EBC-AB41-4387-8F31-8077DB917336}",
  RES_DNS = "{D1E27FF0-6D66-4E57-BB91-99F76BB2143E}", RES_URL = "{4EF9DEB9-4332-4867-A667-6A30C5900E9E}",
  RES_SSL = "{5AEE3F0B-9304-44BE-BBD0-0467052CF468}",
  FTS_DNS = "{09B305DF-078C-4B9E-8E2F-EA64B7326880}", FTS_HTTP = "{28217924-E7A5-4523-993C-44B52758D5A8}",
  FTS_SSL = "{9FEB8ADE-ADBB-49AD-BC68-C6A02F389C71}",
}
local G = M.GUID

local function be32(p, o) return ((p[o] * 256 + p[o + 1]) * 256 + p[o + 2]) * 256 + p[o + 3] end

--- opts: counters, dns, http, tls (booleans), idle_timeout (s, default 120).
function M.new(opts)
  local self = setmetatable({
    on = { counters = opts.counters and true or false, dns = opts.dns and true or false,
           http = opts.http and true or false, tls = opts.tls and true or false },
    engine = engine_mod.new({ instance = "analysers", pipeline = "frontend", plugin = "luaprobe" }),
    ip4keys = {}, mackeys = {}, portkeys = {}, protokeys = {},
    flows = {}, rejected = {}, nrejected = 0, last_expire = 0,
    idle_timeout = opts.idle_timeout or 120,
    docs = { fts = {}, certs = {} },
    stats = { packets = 0, dns_messages = 0, dns_errors = 0, dns_records = 0, http_requests = 0,
              http_responses = 0, tls_chains = 0, tcp_flows = 0 },
  }, A)
  self.stream = self.on.http or self.on.tls
  if self.stream then
    self.R = tcpreasm.new({
      cb = function(id, dir, _, p, n) self:data(id, dir, p, n) end,
      cb_gap = function(id, dir, _, missing)
        local st = self.flows[id]
        if st and st.H then st.H:gap(dir, missing) end
        if st and st.T then st.T:gap(dir) end                   -- TLS cannot resynchronise
      end,
      cb_close = function(id) self:close_flow(id) end,
    })
  end
  return self
end

-- ------------------------------------------------------------------ keys

local HEX = "0123456789ABCDEF"
local function hex2(v) local h = rshift(v, 4) + 1; local l = band(v, 15) + 1
  return HEX:sub(h, h) .. HEX:sub(l, l) end

function A:ip4key(a)
  local n = ((a[0] * 256 + a[1]) * 256 + a[2]) * 256 + a[3]
  local k = self.ip4keys[n]
  if k == nil then
    k = hex2(a[0]) .. "." .. hex2(a[1]) .. "." .. hex2(a[2]) .. "." .. hex2(a[3])
    self.ip4keys[n] = k
  end
  return k
end

local function ip6key(a)
  local t = {}
  for i = 0, 15 do t[i + 1] = hex2(a[i]) end
  return table.concat(t)
end

function A:mackey(p, o)
  local n = ((((p[o] * 256 + p[o + 1]) * 256 + p[o + 2]) * 256 + p[o + 3]) * 256 + p[o + 4]) * 256 + p[o + 5]
  local k = self.mackeys[n]
  if k == nil then
    k = hex2(p[o]) .. ":" .. hex2(p[o + 1]) .. ":" .. hex2(p[o + 2]) .. ":" .. hex2(p[o + 3]) .. ":" ..
        hex2(p[o + 4]) .. ":" .. hex2(p[o + 5])
    self.mackeys[n] = k
  end
  return k
end

function A:portkey(port)
  local k = self.portkeys[port]
  if k == nil then k = sformat("p-%04X", port); self.portkeys[port] = k end
  return k
end

function A:protokey(proto)
  local k = self.protokeys[proto]
  if k == nil then k = sformat("%02X", proto); self.protokeys[proto] = k end
  return k
end

-- ------------------------------------------------------------------ counters

function A:count(e)
  local eng, d, len = self.engine, e.d, e.wirelen
  add(eng, G.AGGREGATES, "TOTALBW", 0, len)
  add(eng, G.AGGREGATES, "TOTALBW", 1, 1)
  local li = d.first[ETHERNET]
  if li >= 0 and d.layer[li].length >= 14 then
    local o = d.layer[li].offset
    local dst, src = self:mackey(e.data, o), self:mackey(e.data, o + 6)
    add(eng, G.MAC, src, 0, len)
    add(eng, G.MAC, dst, 1, len)
  end
  local v = d.ip_version
  if v == 0 then return end
  local g, sk, dk
  if v == 4 then g, sk, dk = G.HOSTS, self:ip4key(d.src), self:ip4key(d.dst)
  else g, sk, dk = G.HOSTS6, ip6key(d.src), ip6key(d.dst) end
  add(eng, g, sk, 0, len); add(eng, g, sk, 2, len); add(eng, g, sk, 3, 1)
  add(eng, g, dk, 0, len); add(eng, g, dk, 1, len); add(eng, g, dk, 3, 1)
  local pk = self:protokey(d.ipproto)
  add(eng, G.PROTOCOLS, pk, 0, len)
  add(eng, G.PROTOCOLS, pk, 1, 1)
  if d.first[TCP] >= 0 or d.first[UDP] >= 0 then
    local sp, dp = d.sport, d.dport
    add(eng, G.APPS, self:portkey(sp < dp and sp or dp), 0, len)
  end
end

-- ------------------------------------------------------------------ DNS

function A:dns(e, batch, i)
  local d = e.d
  local n = d.payload_length
  local m, _, partial = dns.parse(e.data + d.payload_offset, n)
  local st = self.stats
  if not m then
    st.dns_errors = st.dns_errors + 1
    m = partial                   -- a bad record: the questions and the records before it still count
    if not m then return end
  else
    st.dns_messages = st.dns_messages + 1
  end
  local eng = self.engine
  eng:set_packet(batch, i)
  local sec, usec = eng:timestamp()
  local fk = decode.flowkey(d)
  local fts = self.docs.fts
  fts[#fts + 1] = { sec, usec, G.FTS_DNS, fk, dns.dig(m), "luaprobe" }
  if m.qr then
    local q = m.questions[1]
    local qname = q and q.name or ""
    local res = eng.rows.resources
    for _, r in ipairs(m.answers) do
      st.dns_records = st.dns_records + 1
      res[#res + 1] = { sec, usec, G.RES_DNS, fk, qname, dns.record_line(r), "luaprobe" }
    end
  end
end

-- ------------------------------------------------------------------ TCP streams (HTTP, TLS)

local METHODS = { GET = true, POST = true, HEAD = true, PUT = true, DELETE = true, OPTIONS = true,
                  TRACE = true, CONNECT = true, PATCH = true, PROPFIND = true }

local function usec_now(eng)
  local s, u = eng:timestamp()
  return s * 1000000 + u
end

function A:flow_state(id, e)
  local st = self.flows[id]
  if st ~= nil then return st end
  if self.rejected[id] then return nil end
  st = { id = id, fk = decode.flowkey(e.d), kind = nil }
  self.flows[id] = st
  self.stats.tcp_flows = self.stats.tcp_flows + 1
  return st
end

function A:reject(st)
  self.flows[st.id] = nil
  self.rejected[st.id] = true
  self.nrejected = self.nrejected + 1
  if self.nrejected > 65536 then self.rejected, self.nrejected = {}, 0 end
  self.R:forget(st.id)
end

--- First bytes of a flow decide what it is: a TLS record, an HTTP start line, or neither.
function A:classify(st, p, n)
  local b0, b1
  if type(p) == "string" then b0, b1 = sbyte(p, 1, 2) else b0, b1 = p[0], n > 1 and p[1] or nil end
  if b0 == 0x16 and (b1 == nil or b1 == 3) then       -- a handshake record (tls.looks_like, narrowed)
    if not self.on.tls then return nil end
    return "tls"
  end
  if not self.on.http then return nil end
  local head = type(p) == "string" and p:sub(1, 16) or fstring(p, n < 16 and n or 16)
  local word = head:match("^(%u+) ") or (head:sub(1, 5) == "HTTP/" and "HTTP")
  if word and (METHODS[word] or word == "HTTP") then return "http" end
  return nil
end

function A:setup_http(st)
  local eng = self.engine
  local pending = {}
  st.pending = pending
  st.H = http.new({
    on_request = function(req)
      self.stats.http_requests = self.stats.http_requests + 1
      pending[#pending + 1] = { req = req, t = usec_now(eng) }
      self:header_doc(st, req)
    end,
    on_response = function(req, resp)
      self:header_doc(st, resp)
      if resp:get_status() < 200 then return end
      self.stats.http_responses = self.stats.http_responses + 1
      local item
      for k = 1, #pending do
        if pending[k].req == req then item = table.remove(pending, k); break end
      end
      if item then self:url_resource(st, req, resp:get_status(), usec_now(eng) - item.t) end
    end,
  })
end

function A:header_doc(st, h)
  if h._raw == nil then return end
  local sec, usec = self.engine:timestamp()
  local fts = self.docs.fts
  fts[#fts + 1] = { sec, usec, G.FTS_HTTP, st.fk, http.lines(h), "luaprobe" }
end

function A:url_resource(st, req, status, rt)
  local sec, usec = self.engine:timestamp()
  local host = req:get_value("Host")
  if host == nil or host == "" then          -- no Host header: the server's address, so the uri keeps 3 words
    local f = packet.flowid_from_key(st.fk)
    host = f:ipz_readable()
  end
  local uri = sformat("%s %s %s", req:get_method(), host, req:get_path())
  local label = status > 0 and sformat("status:%d usec:%d", status, rt) or "status:0"
  local res = self.engine.rows.resources
  res[#res + 1] = { sec, usec, G.RES_URL, st.fk, uri, label, "luaprobe" }
end

function A:setup_tls(st)
  -- engine.streams.tls (shared with reassembly_handler): dir 1 = server->client (tcpreasm's numbering)
  st.T = tls.new({ certs = function(dir, list) self:tls_chain(st, dir, list) end })
end

function A:tls_chain(st, dir, list)
  if dir ~= 1 or st.certs_done then return end
  st.certs_done = true
  self.stats.tls_chains = self.stats.tls_chains + 1
  local sec, usec = self.engine:timestamp()
  local row = { sec, usec, st.fk, "" }
  for k = 1, #list do row[#row + 1] = list[k] end
  local certs = self.docs.certs
  certs[#certs + 1] = row
end

function A:data(id, dir, p, n)
  local st = self.flows[id]
  if st == nil or n == 0 then return end
  if st.kind == nil then
    st.kind = self:classify(st, p, n)
    if st.kind == nil then st.ignore = true; return end
    if st.kind == "http" then self:setup_http(st) else self:setup_tls(st) end
  end
  if st.H then st.H:data(dir, p, n)
  elseif st.T then st.T:data(dir, p, n) end
end

function A:close_flow(id)
  local st = self.flows[id]
  if not st then return end
  self.flows[id] = nil
  if st.H then
    st.H:close()
    for _, item in ipairs(st.pending) do self:url_resource(st, item.req, 0, 0) end
  end
end

function A:tcp(e, batch, i)
  local d = e.d
  local id = e.flow_uid
  local R = self.R
  local f = R.flows[id]
  local closed = f ~= nil and f.closed
  local l4 = d.l4_offset
  local data = e.data
  local seq = be32(data, l4 + 4)
  self.engine:set_packet(batch, i)
  if f ~= nil and band(d.tcp_flags, 0x02) ~= 0 then        -- SYN or SYN+ACK: is the 5-tuple reused? (as filex)
    if closed then R:forget(id); closed = false
    elseif R:is_new_connection(id, e.dir, seq, d.tcp_flags) then R:restart(id) end
  end
  if closed then return end
  local st = self:flow_state(id, e)
  if st == nil then return end
  if st.ignore then self:reject(st); return end
  R:packet(id, e.dir, seq, d.tcp_flags, data + d.payload_offset, d.payload_length, e.ts_sec, nil, be32(data, l4 + 8))
  if st.ignore and self.flows[id] then self:reject(st) end
end

-- ------------------------------------------------------------------ the batch walk

function A:run_batch(addr, n)
  local batch = ffi.cast(packet.pktp, addr)
  local on = self.on
  local counters, dnson, stream = on.counters, on.dns, self.stream
  for i = 0, n - 1 do
    local e = batch[i]
    local d = e.d
    -- an IP datagram reassembled from fragments (d.frag 2, engine/fastpath/ipreasm.lua) follows its fragments in
    -- the batch: the fragments are the frames counted; the datagram is the DNS message (a fragment, d.frag 1, is
    -- only a piece of one)
    if counters and d.frag ~= 2 then self.engine:set_packet(batch, i); self:count(e) end
    if dnson and d.first[UDP] >= 0 and (d.sport == 53 or d.dport == 53) and d.frag ~= 1 then
      self:dns(e, batch, i)
    end
    if stream and d.first[TCP] >= 0 and e.flow >= 0 then self:tcp(e, batch, i) end
  end
  self.stats.packets = self.stats.packets + n
  return n
end

--- Packet time reached second `sec`, opened by a packet at `usec` µs (engine/fastpath/run.py _tick, before that
--- second's first packet, in every shard of a sharded run alike: TIME records): every 10 s of packet time the
--- reassembly's idle flows and held data end (tcpreasm.lua expire_idle), and the items they complete (an unanswered
--- request's status:0 URL) carry that time.  Before, this ran in run_batch before a batch's first packet, so a shard
--- ran it only in the seconds of its own packets: with --shards 2 an unanswered request's status:0 URL was stamped
--- at its flow's last packet, not 120 s later as by one fast path (tests/test_analysers.py
--- test_unanswered_request_s_url_time_is_the_same_with_shards).  (At a batch's end, earlier
--- still, which packets came before the expiry depended on where batches began: tests/test_flow_rows_repeatable.py)
function A:tick(sec, usec)
  if not self.stream or sec - self.last_expire < 10 then return end
  self.last_expire = sec
  self.engine:set_time(sec, usec)
  self.R:expire_idle(sec - self.idle_timeout, sec)
end

--- End of input: close every open TCP flow (unanswered requests become status:0 URLs), at `sec`.`usec` (the last
--- tick's time: the same in every shard).
function A:finish(sec, usec)
  if not self.stream then return end
  self.engine:set_time(sec, usec)
  local ids = {}
  for id in pairs(self.R.flows) do ids[#ids + 1] = id end
  table.sort(ids)
  for _, id in ipairs(ids) do self.R:expire(id) end
end

--- Move out FTS documents and certificate chains.
function A:take_docs()
  local d = self.docs
  self.docs = { fts = {}, certs = {} }
  return d
end

function A:get_stats() return self.stats end

return M
