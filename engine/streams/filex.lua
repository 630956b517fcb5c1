--[[
luaprobe.engine.streams.filex — the filex_monitor script type (docs.trisul.org/docs/lua/fileextract) inside one
plug-in VM: TCP reassembly (luaprobe.engine.streams.tcpreasm), HTTP/1.x messages
(luaprobe.engine.streams.http) and file extraction into a RAM-backed directory.

Per batch the VM walks the TCP packets of the shared batch (like
simplecounter's run_batch).  Hooks:
  filter_flow(engine, ts, flow)            once per TCP flow, at its first payload (before
                                           any of it is reassembled); false = ignore it.
                                           That payload votes first: a flow that does not
                                           start like HTTP/1.x leaves reassembly at once and
                                           gets no hook (looks_http, not_http), so non-HTTP
                                           traffic costs a few table lookups per packet
  filter(engine, ts, flow, header)         request header, then response header;
                                           a request body is kept when the request vote is
                                           true, a response body when both votes are true
  onpayload_http(engine, ts, flow, path, req, resp, dir, seekpos, buffer)
                                           decoded body bytes (streaming); a zero-length
                                           buffer ends the body
  onfile_http(engine, ts, flow, path, req, resp, length, is_chunk, incomplete)
                                           a whole file, or a chunk of chunk_size bytes
                                           named <path>.<offset>.part; incomplete (luaprobe
                                           extension, docs/filex.md) is nil for a whole body,
                                           else why the file is not the whole content: "gap",
                                           "truncated", "decode_error", "decode_incomplete",
                                           "unknown_encoding" (counted per reason in
                                           stats.incomplete_<reason>)
  onterminateflow(engine, ts, flow)        the TCP flow ended
A hook that is absent votes true.  "File mode" (files written) only when the
script defines onfile_http.  Direction: 0 = client->server (fileextract.md).

File lifetime: a file exists until its onfile_http hook has returned and
every T.async task that names its path (in data or arguments) has finished;
then it is removed.  The directory has a size cap: a body that would exceed
it is not extracted (counted in stats.skipped_cap), the fast path never waits.
]]
local ffi = require("ffi")
local tcpreasm = require("luaprobe.engine.streams.tcpreasm")
local http = require("luaprobe.engine.streams.http")
local buffer = require("luaprobe.engine.plugins.buffer")
local packet = require("luaprobe.engine.plugins.packet")
local decode = require("luaprobe.engine.fastpath.decode")

local band = require("bit").band
local fstring = ffi.string
local TCP = decode.PROTO.TCP
local M = {}
local F = {}
local REJECT_GEN = 65536     -- ignored flow ids remembered per generation (F:reject)
local looks_http             -- the first-payload vote, defined in "is it HTTP?" below
F.__index = F

local function be32(p, o)
  return ((p[o] * 256 + p[o + 1]) * 256 + p[o + 2]) * 256 + p[o + 3]
end

local function sanitize(s)
  s = s:gsub("[^%w%._%-]", "_")
  if #s > 96 then s = s:sub(1, 96) end
  return s
end

--- opts: host (luaprobe.engine.plugins.host object), dir (ramfs directory), chunk_size,
--- dir_cap (bytes), idle_timeout, max_header (bytes of an HTTP header block kept, streams.http).
function M.new(host, opts)
  local fx = host.plugin.filex_monitor
  local self = setmetatable({
    host = host, fx = fx, engine = host.engine, async = host.async,
    dir = opts.dir, chunk_size = opts.chunk_size or 5 * 1048576, dir_cap = opts.dir_cap or 256 * 1048576,
    idle_timeout = opts.idle_timeout or 120, max_header = opts.max_header,
    hstats = {},           -- HTTP parser counters summed over closed flows (streams/http.lua stats)
    file_mode = type(fx.onfile_http) == "function",
    flows = {}, rejected = {}, rejected_old = {}, nrejected = 0, dir_bytes = 0, uid = 0, last_expire = 0,
    stats = { flows = 0, flows_rejected = 0, flows_not_http = 0, files = 0, chunks = 0, bytes = 0, skipped_cap = 0,
              skipped_filter = 0, truncated = 0, write_errors = 0,
              incomplete_gap = 0, incomplete_truncated = 0, incomplete_decode_error = 0,
              incomplete_decode_incomplete = 0, incomplete_unknown_encoding = 0 },
  }, F)
  self.R = tcpreasm.new({
    cb = function(id, dir, _, p, n) self:data(id, dir, p, n) end,
    cb_gap = function(id, dir, _, missing) local st = self.flows[id]; if st then st.H:gap(dir, missing) end end,
    cb_close = function(id) self:close_flow(id) end,
  })
  -- T.async file lifetime: tasks naming a live file keep it until they finish
  self.async.file_done = function(path) self:unref(path) end
  return self
end

-- ------------------------------------------------------------------ hooks

function F:hook(name, ...)
  local fn = self.fx[name]
  if type(fn) ~= "function" then return true end
  local ok, res = self.host:call("filex_monitor", name, ...)
  if not ok then return false end
  return res
end

-- ------------------------------------------------------------------ files

function F:new_file(st, dir, req, resp)
  local host = req:get_value("Host") or "nohost"
  local path = req:get_path()
  self.uid = self.uid + 1
  local name = ("%s/%s%s-%d-%d"):format(self.dir, sanitize(host), sanitize(path ~= "" and path or "/"),
    st.id, self.uid)
  return { path = name, size = 0, part_start = 0, fh = nil, req = req, resp = resp, dir = dir }
end

--- Keep `path` until the hook returned and every task naming it finished.
function F:ref(path)
  local a = self.async
  a.live_files[path] = (a.live_files[path] or 0) + 1
end

function F:unref(path)
  local a = self.async
  local n = (a.live_files[path] or 1) - 1
  if n <= 0 then
    a.live_files[path] = nil
    local size = self.sizes and self.sizes[path]
    os.remove(path)
    if size then self.dir_bytes = self.dir_bytes - size; self.sizes[path] = nil end
  else
    a.live_files[path] = n
  end
end

--- Close the current file (or part) and hand it to onfile_http (incomplete: reason or nil).
function F:emit(st, b, is_chunk, final, incomplete)
  if b.fh then
    local ok, err = b.fh:close()            -- flushes the last buffered bytes
    b.fh = nil
    if not ok then
      os.remove(b.path)
      self.dir_bytes = self.dir_bytes - (b.size - b.part_start)
      b.part_start, b.skip = b.size, true
      self.stats.write_errors = self.stats.write_errors + 1
      self.host.errors:report("filex write error", b.path .. ": " .. tostring(err))
      return
    end
  end
  local path = b.path
  local length = b.size - b.part_start
  if is_chunk then
    local part = ("%s.%d.part"):format(b.path, b.part_start)
    os.rename(b.path, part)
    path = part
    self.stats.chunks = self.stats.chunks + 1
  else
    self.stats.files = self.stats.files + 1
  end
  self.sizes = self.sizes or {}
  self.sizes[path] = length
  self:ref(path)                           -- held while the hook runs
  if incomplete then
    local k = "incomplete_" .. incomplete
    self.stats[k] = (self.stats[k] or 0) + 1
  end
  self:hook("onfile_http", self.engine, self.engine:timestamp(), st.flow, path, b.req, b.resp, length,
    is_chunk and true or false, incomplete)
  self:unref(path)                         -- removed now unless a T.async task names it
  b.part_start = b.size
  if not final then b.fh = nil end
end

function F:write(st, b, p, n)
  if self.dir_bytes + n > self.dir_cap then
    if b.fh then b.fh:close(); b.fh = nil; os.remove(b.path); self.dir_bytes = self.dir_bytes - (b.size - b.part_start) end
    b.skip = true
    self.stats.skipped_cap = self.stats.skipped_cap + 1
    return
  end
  local is_str = type(p) == "string"
  local pos = 0
  while pos < n do                          -- parts end exactly at multiples of chunk_size
    local err
    if not b.fh then b.fh, err = io.open(b.path, "wb") end
    local k = math.min(n - pos, self.chunk_size - (b.size - b.part_start))
    if b.fh then
      local ok, werr = b.fh:write(is_str and ((pos == 0 and k == #p) and p or p:sub(pos + 1, pos + k))
                                         or fstring(p + pos, k))
      if not ok then err = b.path .. ": " .. tostring(werr) end
    end
    if err then                             -- e.g. ENOSPC: no partial file is handed to onfile_http
      if b.fh then
        b.fh:close(); b.fh = nil
        os.remove(b.path)
        self.dir_bytes = self.dir_bytes - (b.size - b.part_start)
      end
      b.skip = true
      self.stats.write_errors = self.stats.write_errors + 1
      self.host.errors:report("filex write error", tostring(err))
      return
    end
    pos = pos + k
    b.size = b.size + k
    self.dir_bytes = self.dir_bytes + k
    self.stats.bytes = self.stats.bytes + k
    if b.size - b.part_start >= self.chunk_size then
      b.chunked = true
      self:emit(st, b, true, false)
    end
  end
end

-- ------------------------------------------------------------------ HTTP events

--- The state of TCP connection `id` for a packet without one yet: nil while
--- undecided (no payload seen: the packet still goes to reassembly, which
--- learns the handshake), false when the flow is ignored, else the new state.
--- The flow's first payload decides (looks_http), then filter_flow votes.
--- f is the reassembly record of the flow (nil before its first packet).
--- Kept apart from the per-packet walk so that walk creates no closures
--- (closing upvalues is not compiled by LuaJIT and would abort every trace).
function F:pending(id, p, d, f)
  if self.rejected[id] then return false end
  if self.rejected_old[id] then return self:reject_again(id) end
  local plen = d.payload_length
  if plen == 0 then return nil end
  if not looks_http(p.data + d.payload_offset, plen, f ~= nil and f.syn) then
    self:not_http(id)
    return false
  end
  return self:new_flow_state(id, d) or false
end

--- Remember that flow `id` is ignored.  Two generations of at most REJECT_GEN
--- ids each: when the newer one fills up, the older one is dropped, and an id
--- found in the older one moves back to the newer (reject_again), so the
--- flows that still send packets stay remembered and memory stays bounded.
function F:reject(id)
  self.rejected[id] = true
  self.nrejected = self.nrejected + 1
  if self.nrejected >= REJECT_GEN then
    self.rejected_old, self.rejected, self.nrejected = self.rejected, {}, 0
  end
end

function F:reject_again(id)
  self:reject(id)
  return nil
end

function F:new_flow_state(id, pkt_d)
  local flow = packet.flowid(pkt_d)
  local ts = self.engine:timestamp()
  if not self:hook("filter_flow", self.engine, ts, flow) then
    self.R:forget(id)
    self:reject(id)
    self.stats.flows_rejected = self.stats.flows_rejected + 1
    return nil
  end
  local st = { id = id, flow = flow, votes = {}, body = {} }
  st.H = http.new({
    max_header = self.max_header,
    on_request = function(req)
      st.votes[req] = self:hook("filter", self.engine, self.engine:timestamp(), flow, req) and true or false
    end,
    on_response = function(req, resp)
      if resp:get_status() >= 200 then
        st.votes[resp] = self:hook("filter", self.engine, self.engine:timestamp(), flow, resp) and true or false
      end
    end,
    on_body = function(dir, req, resp, p, n) self:body(st, dir, req, resp, p, n) end,
    on_body_end = function(dir, req, resp, total, flags) self:body_end(st, dir, req, resp, total, flags) end,
  })
  self.flows[id] = st
  self.stats.flows = self.stats.flows + 1
  return st
end

function F:kept(st, dir, req, resp)
  local v = st.votes[req] ~= false
  if dir == 1 then v = v and st.votes[resp] ~= false end
  return v
end

function F:body(st, dir, req, resp, p, n)
  local b = st.body[dir]
  if b == nil then
    if not self:kept(st, dir, req, resp) then
      b = { skip = true }
      self.stats.skipped_filter = self.stats.skipped_filter + 1
    else
      b = self:new_file(st, dir, req, resp)
    end
    st.body[dir] = b
  end
  if b.skip then return end
  if type(self.fx.onpayload_http) == "function" then
    local buf = type(p) == "string" and buffer.from_string(n == #p and p or p:sub(1, n)) or buffer.new(p, n)
    self:hook("onpayload_http", self.engine, self.engine:timestamp(), st.flow, b.path, req, resp, dir, b.size, buf)
    if not self.file_mode then b.size = b.size + n end
  end
  if self.file_mode then self:write(st, b, p, n) end
end

function F:body_end(st, dir, req, resp, total, flags)
  local b = st.body[dir]
  st.body[dir] = nil
  if b == nil or b.skip then return end
  if flags and flags.truncated then self.stats.truncated = self.stats.truncated + 1 end
  if type(self.fx.onpayload_http) == "function" then
    self:hook("onpayload_http", self.engine, self.engine:timestamp(), st.flow, b.path, req, resp, dir, b.size,
      buffer.from_string(""))
  end
  if self.file_mode and (b.fh or b.size > b.part_start) then
    self:emit(st, b, b.chunked == true, true, flags and flags.incomplete)
  end
end

function F:data(id, dir, p, n)
  local st = self.flows[id]
  if st then st.H:data(dir, p, n) end
end

function F:close_flow(id)
  local st = self.flows[id]
  if not st then return end
  st.H:close()
  for dir = 0, 1 do                         -- a body the parser could not finish
    local b = st.body[dir]
    if b and not b.skip and b.fh then self:emit(st, b, b.chunked == true, true, "truncated") end
  end
  local hs = self.hstats
  for k, v in pairs(st.H.stats) do hs[k] = (hs[k] or 0) + v end
  self.flows[id] = nil
  self:hook("onterminateflow", self.engine, self.engine:timestamp(), st.flow)
  -- tcpreasm keeps a "closed" marker for the id (removed by R:expire / expire_idle): the trailing ACKs
  -- and RSTs of this connection are ignored instead of starting a second filter_flow .. onterminateflow
end

-- ------------------------------------------------------------------ is it HTTP?

local HTTP_SLASH = "HTTP/"
pcall(ffi.cdef, "void *memmem(const void *haystack, size_t haystacklen, const void *needle, size_t needlelen);")
local memmem = ffi.C.memmem

-- "HTTP/1." within the first 2048 bytes (no Lua string made from the payload)
local function has_status_line(p, n)
  return memmem(p, n < 2048 and n or 2048, "HTTP/1.", 7) ~= nil
end

--- Does a flow whose first payload is (p, n) carry HTTP/1.x?  HTTP when the payload
--- starts with a request line's method token and a space (1-16 upper-case
--- letters, '-' or '_', RFC 9110 §9: a token; the same pattern http.lua
--- accepts) or with "HTTP/" (a response: the request was not captured).
--- A flow picked up mid-stream (no SYN seen) may start inside a body, so
--- "HTTP/1." anywhere in its first payload counts too.  A payload too short
--- to tell (a few upper-case letters) counts as HTTP: reassembly goes on.
function looks_http(p, n, handshake)
  local c = p[0]
  if c < 65 or c > 90 then                       -- not A-Z
    return not handshake and has_status_line(p, n)
  end
  local m = n < 17 and n or 17
  for i = 1, m - 1 do
    c = p[i]
    if c == 32 then return true end              -- "TOKEN "
    if c == 47 then                               -- "HTTP/"
      return fstring(p, i + 1) == HTTP_SLASH or (not handshake and has_status_line(p, n))
    end
    if not ((c >= 65 and c <= 90) or c == 45 or c == 95) then
      return not handshake and has_status_line(p, n)
    end
  end
  if m < 17 then return true end                  -- all token so far: too short to tell
  return false
end
M.looks_http = looks_http

--- Flow `id` does not carry HTTP: reassembly stops for good before any of
--- its payload is reassembled, and no hook runs for it (its filter_flow vote
--- is taken for it: Trisul's "true = extract from this flow", and nothing can
--- be extracted from it).
function F:not_http(id)
  self.R:forget(id)
  self:reject(id)
  self.stats.flows_not_http = self.stats.flows_not_http + 1
end

-- ------------------------------------------------------------------ the batch walk

--- Feed the TCP packets of a batch through reassembly and HTTP.
function F:run_batch(batch, n)
  local eng, R = self.engine, self.R
  for i = 0, n - 1 do
    local p = batch[i]
    local d = p.d
    if d.first[TCP] >= 0 and p.flow >= 0 then
      eng:set_packet(batch, i)
      local id = p.flow_uid
      local f = R.flows[id]
      local closed = f ~= nil and f.closed
      local l4 = d.l4_offset
      local data = p.data
      local seq = be32(data, l4 + 4)
      if f ~= nil and band(d.tcp_flags, 0x12) == 0x02 then  -- SYN: is the 5-tuple reused?
        if closed then
          R:forget(id)
          closed = false
        elseif R:is_new_connection(id, p.dir, seq, d.tcp_flags) then
          R:restart(id)                    -- the old connection ends: its files, onterminateflow
        end
      end
      if f == nil and band(d.tcp_flags, 0x12) == 0x02 then   -- a new connection on an ignored id
        self.rejected[id], self.rejected_old[id] = nil, nil   -- gets a fresh vote
      end
      if not closed then
        local st = self.flows[id]
        if st == nil then st = self:pending(id, p, d, f) end
        if st ~= false then                       -- a state, or undecided (no payload yet)
          R:packet(id, p.dir, seq, d.tcp_flags, data + d.payload_offset, d.payload_length,
            p.ts_sec, nil, be32(data, l4 + 8))
        end
      end
    end
  end
  local now = n > 0 and batch[n - 1].ts_sec or 0
  if now - self.last_expire >= 10 then
    self.last_expire = now
    R:expire_idle(now - self.idle_timeout)
  end
end

--- End of input: close every flow (bodies read until close are delivered).
function F:finish()
  local ids = {}
  for id in pairs(self.flows) do ids[#ids + 1] = id end
  table.sort(ids)
  for _, id in ipairs(ids) do self.R:expire(id) end
end

return M
