--[[
luaprobe.engine.streams.filex — the filex_monitor script type (docs.trisul.org/docs/lua/fileextract) inside one
plug-in VM: HTTP/1.x messages (luaprobe.engine.streams.http) over the shared TCP
reassembly (luaprobe.engine.streams.stage, in the driver VM: one reassembly per flow
for every filex_monitor, reassembly_handler and attribute analyser) and file extraction
into a RAM-backed directory.

Per batch the VM walks the stage's events addressed to filex (F:run_events): FXNEW (an
HTTP flow's first payload), DATA, GAP, CLOSE.  Hooks:
  filter_flow(engine, ts, flow)            once per TCP connection, at its first payload (before
                                           any of it reaches the HTTP parser); false = ignore it.
                                           That payload votes first, in the stage: a flow that
                                           does not start like HTTP/1.x (http.looks_http) leaves
                                           reassembly at once and never reaches this VM, so
                                           non-HTTP traffic costs one array read per packet
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
                                           "truncated", "decode_error", "decompression_bomb",
                                           "decode_incomplete", "unknown_encoding" (counted per reason in
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
local http = require("luaprobe.engine.streams.http")
local stage = require("luaprobe.engine.streams.stage")
local buffer = require("luaprobe.engine.plugins.buffer")
local packet = require("luaprobe.engine.plugins.packet")

local band = require("bit").band
local cast, fstring = ffi.cast, ffi.string
local FXNEW, DATA, GAP, CLOSE, TO_FX = stage.FXNEW, stage.DATA, stage.GAP, stage.CLOSE, stage.TO_FILEX
local M = {}
local F = {}
F.__index = F

--- The first-payload vote (luaprobe.engine.streams.http.looks_http), taken by the stage.
M.looks_http = http.looks_http

local function sanitize(s)
  s = s:gsub("[^%w%._%-]", "_")
  if #s > 96 then s = s:sub(1, 96) end
  return s
end

--- opts: host (luaprobe.engine.plugins.host object), dir (ramfs directory, shared by every filex_monitor
--- instance of the run), instance (this instance's number in the run: file names are
--- <dir>/<host><uri>-<instance>-<stream id>-<n>, so no two instances ever write or remove one file), chunk_size,
--- dir_cap (bytes), max_header (bytes of an HTTP header block kept, streams.http), bomb_ratio and bomb_min (bytes):
--- the decompression bomb rule of streams.http (decoding of a body stops past both; ratio 0: no limit),
--- votes (address of the stage's lp_svote array), batch (address of the fast path's packet batch).
function M.new(host, opts)
  local fx = host.plugin.filex_monitor
  local self = setmetatable({
    host = host, fx = fx, engine = host.engine, async = host.async,
    dir = opts.dir, instance = opts.instance or 1, chunk_size = opts.chunk_size or 5 * 1048576, dir_cap = opts.dir_cap or 256 * 1048576,
    max_header = opts.max_header, bomb_ratio = opts.bomb_ratio, bomb_min = opts.bomb_min,
    votes = cast("lp_svote *", opts.votes), batch = cast(packet.pktp, opts.batch),
    hstats = {},           -- HTTP parser counters of every flow (each parser counts into it: streams/http.lua)
    file_mode = type(fx.onfile_http) == "function",
    flows = {}, dir_bytes = 0, uid = 0,
    -- flows_not_http and the tcp_* counters are the stage's (engine/fastpath/run.py adds them)
    stats = { flows = 0, flows_rejected = 0, files = 0, chunks = 0, bytes = 0, skipped_cap = 0,
              skipped_filter = 0, truncated = 0, write_errors = 0,
              incomplete_gap = 0, incomplete_truncated = 0, incomplete_decode_error = 0,
              incomplete_decode_incomplete = 0, incomplete_unknown_encoding = 0,
              incomplete_decompression_bomb = 0 },
  }, F)
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
  local name = ("%s/%s%s-%d-%d-%d"):format(self.dir, sanitize(host), sanitize(path ~= "" and path or "/"),
    self.instance, st.id, self.uid)
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

--- true when the file at `path` holds exactly `want` bytes, else nil and why (a write lost on the way).
local function on_disk(path, want)
  local f, err = io.open(path, "rb")
  if not f then return nil, err end
  local size = f:seek("end")
  f:close()
  if size ~= want then
    return nil, ("%d of %d bytes on disk (a buffered write failed: full disk?)"):format(size or -1, want)
  end
  return true
end

--- Close the current file (or part) and hand it to onfile_http (incomplete: reason or nil).
function F:emit(st, b, is_chunk, final, incomplete)
  if b.fh then
    local ok, err = b.fh:close()            -- flushes the last buffered bytes
    b.fh = nil
    if ok then                              -- stdio can lose a buffer whose flush failed (ENOSPC) and still report
      ok, err = on_disk(b.path, b.size - b.part_start)   -- later writes and the close as done: check the size
    end
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

--- An HTTP flow's first payload (FXNEW event e): filter_flow votes; true = its state.  A false vote
--- takes this VM's share of the stage's vote (lp_svote.fx): when every filex VM declined, the flow
--- leaves reassembly.
function F:new_flow_state(e)
  local id = e.uid
  local flow = packet.flowid_from_key(fstring(e.p, e.len))
  if not self:hook("filter_flow", self.engine, self.engine:timestamp(), flow) then
    local v = self.votes[e.idx]
    if v.fxuid == id and v.fx > 0 then v.fx = v.fx > 1 and v.fx - 1 or -1 end
    self.stats.flows_rejected = self.stats.flows_rejected + 1
    return nil
  end
  local st = { id = id, flow = flow, votes = {}, body = {}, fx = self }
  st.H = self:parser(st)
  self.flows[id] = st
  self.stats.flows = self.stats.flows + 1
  return st
end

-- the HTTP parser's callbacks, one set for every flow (ctx = the flow state st, st.fx = the filex object):
-- no closures per flow, so the event walk's traces compile through a new flow

local function on_request(st, req)
  local self = st.fx
  st.votes[req] = self:hook("filter", self.engine, self.engine:timestamp(), st.flow, req) and true or false
end

local function on_response(st, req, resp)
  if resp:get_status() >= 200 then
    local self = st.fx
    st.votes[resp] = self:hook("filter", self.engine, self.engine:timestamp(), st.flow, resp) and true or false
  end
end

local function on_body(st, dir, req, resp, p, n) st.fx:body(st, dir, req, resp, p, n) end
local function on_body_end(st, dir, req, resp, total, flags) st.fx:body_end(st, dir, req, resp, total, flags) end

--- The HTTP parser of flow state `st`.
function F:parser(st)
  return http.new({ max_header = self.max_header, bomb_ratio = self.bomb_ratio, bomb_min = self.bomb_min, ctx = st, on_request = on_request, on_response = on_response,
                    on_body = on_body, on_body_end = on_body_end, stats = self.hstats })
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

local TRAILING_LINES = 10                   -- log lines per filex VM; the rest only counted (http_gzip_trailing)

--- Bytes after a body's compressed data (flags.trailing, streams/http.lua): one WARN line naming the flow.
function F:trailing(st, dir, req, n)
  self.trailing_logged = (self.trailing_logged or 0) + 1
  if self.trailing_logged > TRAILING_LINES then return end
  local f = st.flow
  local ok, who = pcall(function()
    return ("%s:%s <-> %s:%s"):format(f:ipa_readable(), f:porta_readable(), f:ipz_readable(), f:portz_readable())
  end)
  self.host.errors.logf(5, ("filex: %s body of %s %s in flow %s: %d bytes after the end of its compressed data "
    .. "not decoded (ignored; the decoded body is delivered; counted in http_gzip_trailing)%s"):format(
    dir == 0 and "request" or "response", req:get_method() ~= "" and req:get_method() or "(unseen request)",
    req:get_path(), ok and who or f:id(), n, self.trailing_logged == TRAILING_LINES and "; further ones are only counted" or ""))
end

function F:body_end(st, dir, req, resp, total, flags)
  if flags and flags.trailing then self:trailing(st, dir, req, flags.trailing) end
  local b = st.body[dir]
  if b == nil and total == 0 and flags and ((flags.coded or 0) > 0 or flags.chunked and not flags.incomplete) then
    -- a body that was sent but holds nothing (the gzip of an empty file; a chunked body of only its last
    -- chunk, "0\r\n\r\n"): an empty file, as tshark exports it.  A declared length of 0 is no body (no file).
    self:body(st, dir, req, resp, "", 0)
    b = st.body[dir]
    if self.file_mode and not b.skip then b.fh = io.open(b.path, "wb") end
  end
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

function F:unfinished(st, b)
  if b and not b.skip and b.fh then self:emit(st, b, b.chunked == true, true, "truncated") end
end

--- The connection of flow `id` ended; ends: the stage's CLOSE bits (1: the server->client stream ended with the
--- server's FIN, 2: the client->server one), nil when not known.  A response body read until close is complete
--- only when the server's FIN ended it (RFC 9112 §6.3: "octets received prior to the server closing the
--- connection"); ended by a RST, the idle timeout or the end of input it is incomplete ("truncated").
function F:close_flow(id, ends)
  local st = self.flows[id]
  if not st then return end
  if ends then
    st.H:close({ [0] = band(ends, 2) ~= 0, [1] = band(ends, 1) ~= 0 })   -- the parser's dir 0 = client->server
  else
    st.H:close()
  end
  self:unfinished(st, st.body[0])           -- bodies the parser could not finish (no loop here: a loop per
  self:unfinished(st, st.body[1])           -- closed flow aborted the event walk's traces)
  self.flows[id] = nil
  self:hook("onterminateflow", self.engine, self.engine:timestamp(), st.flow)
  -- the stage's reassembly keeps a "closed" marker for the connection: its trailing ACKs and RSTs are
  -- ignored instead of starting a second filter_flow .. onterminateflow
end

-- ------------------------------------------------------------------ the event walk

--- The engine's time for event e: its packet, or (events outside the batch walk) its timestamp.
function F:clock(e)
  local bi = e.bi
  if bi >= 0 then
    self.engine:set_packet(self.batch, bi)
  else
    local sec = math.floor(e.ts)
    self.engine:set_time(sec, math.floor((e.ts - sec) * 1e6))
  end
end

--- Run the stage's events addressed to filex (address of the lp_sev array, count).
function F:run_events(addr, n)
  local ev = cast("lp_sev *", addr)
  local flows = self.flows
  for i = 0, n - 1 do
    local e = ev[i]
    if band(e.to, TO_FX) ~= 0 then
      local kind = e.kind
      if kind == FXNEW then
        self:clock(e)
        self:new_flow_state(e)
      else
        local st = flows[e.uid]
        if st ~= nil then
          self:clock(e)
          if kind == DATA then st.H:data(1 - e.dir, e.p, e.len)   -- the stage's dir: 1 = client->server
          elseif kind == GAP then st.H:gap(1 - e.dir, e.off)
          elseif kind == CLOSE then self:close_flow(e.uid, e.attr) end
        end
      end
    end
  end
end

--- End of input: close the flows still open (the stage's finish has closed them all before).
function F:finish()
  local ids = {}
  for id in pairs(self.flows) do ids[#ids + 1] = id end
  table.sort(ids)
  for _, id in ipairs(ids) do self:close_flow(id) end
end

return M
