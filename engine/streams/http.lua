--[[
luaprobe.engine.streams.http — HTTP/1.x message parser over the reassembled byte streams of
one TCP flow (both directions), LuaJIT.

    local http = require "luaprobe.engine.streams.http"
    local H = http.new{
      on_request  = function(req_hdr) end,
      on_response = function(req_hdr, resp_hdr) end,        -- also for interim 1xx responses
      on_body     = function(dir, req_hdr, resp_hdr, ptr_or_string, len) end,   -- decoded bytes
      on_body_end = function(dir, req_hdr, resp_hdr, total_len, flags) end,
      stats = nil, -- a table to count into (shared by parsers; created when nil)
      bomb_ratio = 100, bomb_min = 1 << 20,   -- the decompression bomb rule (below); ratio 0: no limit
      ctx = nil,   -- when set, every callback gets it as its first argument (on_request(ctx, req_hdr), ...):
                   -- one set of functions serves every flow, no closures per parser (LuaJIT does not
                   -- compile closure creation: a trace through it aborts)
    }
    H:data(dir, ptr_or_string, len)   -- dir 0 = client->server, 1 = server->client (tcpreasm's)
    H:gap(dir, len)                   -- len bytes of the direction were not captured
    H:close([fin])                    -- the TCP flow ended (FIN / RST / timeout); fin[dir]: that direction's FIN seen
    H.stats                           -- requests, responses, interim, bodies, resyncs, errors, gzip_trailing...

Headers are HTTPHeader objects (luaprobe.engine.plugins.httpheader).  A response whose
request was never seen (lost in a gap, capture started mid-flow) is matched
with a placeholder request header (method "", path "").

Messages are recognised by content, not by direction: a start line "HTTP/x.y
NNN ..." is a response, "METHOD URI HTTP/x.y" a request; `dir` is only passed
through to the body callbacks (0 for request bodies, 1 for response bodies
when tcpreasm's convention holds).

Bodies.
  * Request body: Transfer-Encoding chunked, else Content-Length, else none.
  * Response body: none for HEAD requests, 1xx, 204, 304; chunked; else
    Content-Length; else read until the flow closes.  Each 206 response is its
    own body (the range is in resp_hdr:get_value("Content-Range")); a
    multipart/byteranges 206 is delivered as one body, as sent.
  * Chunked: chunk extensions ignored; trailers are parsed and returned in
    flags.trailers = {{name, value}, ...}.  A chunk-size line (extensions
    included) or trailer line may be as long as a header block (max_header,
    64 KiB; RFC 9112 §7.1.1 sets no limit): a longer one loses the framing.
  * Content-Encoding gzip / x-gzip / deflate is inflated while streaming
    (luaprobe.engine.streams.zlib); on_body receives decoded bytes and total_len counts them.
    Other encodings (br, compress...) are delivered as sent, flags.encoding names them.
    An inflate error stops decoding: flags.decode_error holds the message.  Bytes after the end of the
    compressed data (after the last gzip member) are not decoded: flags.trailing counts them, and
    stats.gzip_trailing / gzip_trailing_bytes count the bodies and bytes; the decoded body is delivered.
  * Decompression bombs: decoding of a body stops once its decoded bytes are more than bomb_min (bytes,
    default 1 MiB) and more than bomb_ratio (default 100) times the compressed bytes it has received
    (after chunked decoding; libhtp's compression-bomb-limit rule, Suricata, with its own ratio 2048: see
    docs/filex.md).  The bytes decoded so far are delivered (a prefix of the content, at most one 64 KiB
    inflate piece past the bound), the rest of the body is framed but not inflated,
    flags.decompression_bomb is set and stats.decompression_bombs counts the body.  bomb_ratio 0: no limit.
  * Bodies whose declared length is 0 produce no on_body / on_body_end; a
    chunked body with no data chunk ends with total_len 0 (flags.chunked).
  * POST bodies, multipart included, are delivered raw as one body;
    http.multipart(content_type, body) splits a whole multipart body into parts
    ({headers = {{name, value}...}, name=, filename=, data=}) for callers that want
    the parts as separate files.
  * Interim responses: a 1xx other than 101 is reported with on_response and
    the request stays queued for the final response (Expect: 100-continue).
    101 Switching Protocols and a 2xx answer to CONNECT stop parsing: the rest of
    the flow is a tunnel and is ignored.
  * HTTP/0.9: a version-less "GET /path" line is a request without headers
    (header _version "0.9"); the other direction's reply, if it does not start
    with "HTTP/", is a body read until close under a synthetic response header
    (status 200, no headers, _version "0.9").
  * Pipelining: requests are queued in order; each final response takes the oldest.

on_body_end flags: coded (a compressed body: its bytes before decoding), chunked (chunked framing), truncated (fewer bytes than
announced, or a gap), gap (bytes of the body were lost), missing (raw bytes lost), decode_error, decompression_bomb,
encoding, trailers, incomplete (the reason the delivered body is not the whole content, or nil).

Gaps.  Inside a Content-Length body the missing bytes are counted (flags.gap,
flags.truncated) and the body continues after the hole; a compressed body stops
being decoded.  A gap in a chunked body or in headers, or one extending past
the end of a body, loses the framing: the body ends truncated and the
direction resynchronises at the next text that looks like a request line
("METHOD URI HTTP/1.x" with a known method) or a status line ("HTTP/1.x NNN
..."), searched anywhere in the data (a message may follow a body with no line
break), including right at the end of the gap.  In a read-until-close body a gap
is counted and reading continues.
]]
local ffi = require "ffi"
local httpheader = require "luaprobe.engine.plugins.httpheader"
local zlib = require "luaprobe.engine.streams.zlib"

local fstring, cast = ffi.string, ffi.cast
local u8p = ffi.typeof("const uint8_t *")
local sfind, ssub, smatch, slower, sbyte = string.find, string.sub, string.match, string.lower, string.byte
local tonumber = tonumber

local MAX_HEADER = 65536
local BOMB_RATIO, BOMB_MIN = 100, 1048576     -- decompression bomb rule defaults (RunConfig http_bomb_*)

-- modes
local HDR, BODY_LEN, CHUNK_SIZE, CHUNK_DATA, CHUNK_CRLF, TRAILER, BODY_CLOSE, RESYNC, TUNNEL, SKIPHDR =
  1, 2, 3, 4, 5, 6, 7, 8, 9, 10

local M = {}
local P = {}
P.__index = P

local NOP = function() end
local framing_problem

-- callbacks without ctx: the ctx is the table of the caller's functions
local function plain_request(c, req) return c.on_request(req) end
local function plain_response(c, req, resp) return c.on_response(req, resp) end
local function plain_body(c, dir, req, resp, p, n) return c.on_body(dir, req, resp, p, n) end
local function plain_body_end(c, dir, req, resp, total, flags) return c.on_body_end(dir, req, resp, total, flags) end

-- the counters (into `t` when given: parsers can share one table)
local function new_stats(t)
  t = t or {}
  t.requests, t.responses, t.interim, t.bodies, t.resyncs, t.errors, t.gaps = 0, 0, 0, 0, 0, 0, 0
  t.cl_te, t.bad_content_length, t.bad_transfer_encoding, t.unknown_codings, t.oversize_headers = 0, 0, 0, 0, 0
  t.gzip_trailing, t.gzip_trailing_bytes = 0, 0   -- bodies with bytes after their compressed data, those bytes
  t.decompression_bombs = 0                        -- bodies whose decoding the bomb rule stopped
  return t
end

function M.new(cbs)
  cbs = cbs or {}
  local ctx = cbs.ctx
  local on_request, on_response = cbs.on_request or NOP, cbs.on_response or NOP
  local on_body, on_body_end = cbs.on_body or NOP, cbs.on_body_end or NOP
  if ctx == nil then
    ctx = { on_request = on_request, on_response = on_response, on_body = on_body, on_body_end = on_body_end }
    on_request, on_response, on_body, on_body_end = plain_request, plain_response, plain_body, plain_body_end
  end
  local self = setmetatable({
    ctx = ctx, on_request = on_request, on_response = on_response, on_body = on_body, on_body_end = on_body_end,
    queue = {}, qh = 1, qt = 0,
    st = { [0] = { mode = HDR, hbuf = "", line = "" }, [1] = { mode = HDR, hbuf = "", line = "" } },
    stats = cbs.stats and cbs.stats.requests and cbs.stats or new_stats(cbs.stats),
    max_header = cbs.max_header or MAX_HEADER,
    bomb_ratio = cbs.bomb_ratio or BOMB_RATIO, bomb_min = cbs.bomb_min or BOMB_MIN,
    closed = false,
  }, P)
  return self
end

-- header parsing --------------------------------------------------------------------------------
local function trim(s) return (smatch(s, "^[ \t]*(.-)[ \t\r]*$")) end

local function start_kind(line)
  if smatch(line, "^HTTP/%d%.%d +%d%d%d") then return "resp" end
  if smatch(line, "^[%u][%u%-_]* +[^ ]+ +HTTP/%d%.%d[ \t\r]*$") then return "req" end
  if smatch(line, "^GET +[^ ]+[ \t\r]*$") then return "req09" end
  return nil
end

-- trim spaces, tabs and CRs at both ends without patterns (string.match is not compiled)
local function btrim(s, i, j)
  while i <= j do
    local c = sbyte(s, i)
    if c ~= 32 and c ~= 9 then break end
    i = i + 1
  end
  while j >= i do
    local c = sbyte(s, j)
    if c ~= 32 and c ~= 9 and c ~= 13 then break end
    j = j - 1
  end
  return ssub(s, i, j)
end

-- head: the text up to (excluding) the blank line.  -> header object, kind or nil
local function parse_head(head)
  local lines, n, pos, len = {}, 0, 1, #head
  while pos <= len + 1 do                   -- split on "\n" with plain finds
    local e = sfind(head, "\n", pos, true)
    n = n + 1
    if e == nil then lines[n] = ssub(head, pos); break end
    lines[n] = ssub(head, pos, e - 1)
    pos = e + 1
    if pos > len then break end
  end
  local first = lines[1] or ""
  first = (smatch(first, "^(.-)\r?$"))
  local kind = start_kind(first)
  if not kind then return nil end
  local headers, nh = {}, 0
  for i = 2, n do
    local l = lines[i]
    local c = sbyte(l, 1)
    if (c == 32 or c == 9) and nh > 0 then
      local h = headers[nh]
      h[2] = h[2] .. " " .. btrim(l, 1, #l)
    else
      local colon = sfind(l, ":", 1, true)
      if colon and colon > 1 then
        nh = nh + 1
        headers[nh] = { btrim(l, 1, colon - 1), btrim(l, colon + 1, #l) }
      end
    end
  end
  local h
  if kind == "req09" then
    h = httpheader.new{ is_request = true, method = "GET", path = smatch(first, "^GET +([^ \t\r]+)"), headers = {} }
    h._version = "0.9"
    return h, "req"
  elseif kind == "resp" then
    local major, minor, code = smatch(first, "^HTTP/(%d)%.(%d) +(%d%d%d)")
    h = httpheader.new{ is_request = false, status = tonumber(code), headers = headers }
    h._version = major .. "." .. minor
    h._reason = smatch(first, "^HTTP/%d%.%d +%d%d%d ?(.-)[ \r]*$") or ""
  else
    local method, uri, ver = smatch(first, "^([^ ]+) +([^ ]+) +HTTP/(%d%.%d)")
    h = httpheader.new{ is_request = true, method = method, path = uri, headers = headers }
    h._version = ver
  end
  h._raw = head                    -- the header text as sent, up to the blank line (HTTP-Header attribute)
  return h, kind
end

-- every value of header `name` (all its lines), split on commas, trimmed, lower-cased, empties dropped
local function list_values(h, name)
  local out, names, values = nil, h._names, h._values
  local lname = slower(name)
  local first = h._idx[lname]              -- first line of the field; nil: the field is absent
  if first == nil then return nil end
  for i = first, #names do
    if slower(names[i]) == lname then
      for item in string.gmatch(values[i], "[^,]+") do
        local v = slower(trim(item))
        if v ~= "" then
          out = out or {}
          out[#out + 1] = v
        end
      end
    end
  end
  return out
end

-- Message body framing, RFC 9112 §6.1-6.3.  Returns kind, length, te_codings, problem:
--   "chunked" (Transfer-Encoding whose final coding is chunked; te_codings: the codings before it),
--   "length", n (Content-Length: one value, or a list / repeated lines of equal values),
--   "close" (a response with a Transfer-Encoding whose final coding is not chunked: read until close),
--   "error" (a request with such a Transfer-Encoding, or Content-Length values that differ or are not
--   a number: the framing cannot be known; RFC 9112 §6.3 items 4 and 5), nil (no body framing headers).
-- problem "cl_te": both Transfer-Encoding and Content-Length (Transfer-Encoding wins, item 3).
local function body_framing(h, is_request)
  local te = list_values(h, "Transfer-Encoding")
  local cl = list_values(h, "Content-Length")
  if te then
    local problem = cl and "cl_te" or nil
    local codings = {}
    for i = 1, #te - 1 do codings[i] = te[i] end
    if te[#te] == "chunked" then return "chunked", nil, codings, problem end
    codings[#codings + 1] = te[#te]
    if is_request then return "error", nil, nil, "te_not_chunked" end
    return "close", nil, codings, problem
  end
  if cl then
    local v
    for i = 1, #cl do
      local x = smatch(cl[i], "^%d+$") and tonumber(cl[i]) or nil
      if x == nil or (v ~= nil and x ~= v) then return "error", nil, nil, "content_length" end
      v = x
    end
    return "length", v
  end
  return nil
end

-- body delivery ---------------------------------------------------------------------------------
-- A chain of inflaters for stacked codings (RFC 9110 §8.4: listed in the order they were applied,
-- decoded in reverse).  Same interface as one zlib inflater: feed, complete, close, total_in.
local Chain = {}
Chain.__index = Chain

function Chain:feed(p, n, out)
  local zs = self.zs
  -- false: out asked for no more output (the bomb rule), passed up so that every inflater stops
  local function stage(i, q, k)
    if i == 0 then return out(q, k) end
    local ok, err = zs[i]:feed(q, k, function(op, on) return stage(i - 1, op, on) end)
    if not ok and not self.failed then self.failed = err end
    if zs[i].stopped then return false end
  end
  if type(p) == "string" then n = n or #p end
  self.total_in = self.total_in + n
  stage(#zs, p, n)
  if self.failed then return nil, self.failed end
  return true
end

function Chain:complete()
  for _, z in ipairs(self.zs) do if not z:complete() then return false end end
  return true
end

function Chain:close() for _, z in ipairs(self.zs) do z:close() end end

local CODINGS = { gzip = "gzip", ["x-gzip"] = "gzip", deflate = "deflate" }

-- the decoder for a list of codings in the order applied, or nil, name of the first unknown coding
local function decoder(codings)
  local zs = {}
  for _, c in ipairs(codings) do
    if c ~= "identity" then
      local mode = CODINGS[c]
      if not mode then return nil, c end
      zs[#zs + 1] = zlib.inflater(mode)
    end
  end
  if #zs == 0 then return nil end
  if #zs == 1 then return zs[1] end
  return setmetatable({ zs = zs, total_in = 0 }, Chain)
end

-- te_codings: transfer codings other than chunked (applied after the content codings)
local function body_begin(self, st, dir, req, resp, hdr, te_codings)
  local b = { dir = dir, req = req, resp = resp, total = 0,
              flags = { truncated = false, gap = false, missing = 0 } }
  local codings = list_values(hdr, "Content-Encoding") or {}
  if te_codings then
    for _, c in ipairs(te_codings) do codings[#codings + 1] = c end
  end
  if #codings > 0 then
    local z, unknown = decoder(codings)
    if unknown then                          -- delivered as sent, flagged
      b.flags.encoding = table.concat(codings, ", ")
      b.flags.unknown_coding = unknown
      self.stats.unknown_codings = self.stats.unknown_codings + 1
    else
      b.z = z
    end
  end
  st.body = b
  self.stats.bodies = self.stats.bodies + 1
  return b
end

-- compressed body bytes: inflate and hand on (its closure lives here, not in
-- body_data, so the plain path's function has no upvalues to close: UCLO is
-- not compiled and would abort every trace through body_data)
-- The bomb rule (libhtp's): after each decoded piece, stop when the body's decoded bytes exceed both bomb_min and
-- bomb_ratio x the compressed bytes received so far (z.total_in counts the whole current feed, as libhtp counts
-- response_message_len before it decompresses).  The piece that crosses the bound is delivered.
local function body_data_z(self, b, p, n)
  if b.zdead then return end
  local on_body, ctx, dir, req, resp = self.on_body, self.ctx, b.dir, b.req, b.resp
  local z, ratio, min = b.z, self.bomb_ratio, self.bomb_min
  local ok, err = z:feed(p, n, function(op, on)
    b.total = b.total + on
    on_body(ctx, dir, req, resp, op, on)
    if ratio > 0 and b.total > min and b.total > ratio * z.total_in then
      b.flags.decompression_bomb = true
      return false                           -- the inflater stops here (zlib.lua z.stopped)
    end
  end)
  if b.flags.decompression_bomb then
    b.zdead = true
    self.stats.decompression_bombs = self.stats.decompression_bombs + 1
  elseif not ok then
    b.flags.decode_error = err
    b.zdead = true
    self.stats.errors = self.stats.errors + 1
  end
end

local function body_data(self, b, p, n)
  if n <= 0 then return end
  if b.z then return body_data_z(self, b, p, n) end
  b.total = b.total + n
  self.on_body(self.ctx, b.dir, b.req, b.resp, p, n)
end

local function body_end(self, st, truncated)
  local b = st.body
  if not b then return end
  st.body = nil
  if truncated then b.flags.truncated = true end
  local f = b.flags
  if b.z then
    if not b.zdead and not b.z:complete() and not f.truncated and b.z.total_in > 0 then
      -- stream ended without the compressed end marker (a truncated gzip): what we have was delivered
      f.decode_incomplete = true
    end
    if b.z.trailing and b.z.trailing > 0 then      -- not decoded, not delivered (curl: error 23 after the body;
      f.trailing = b.z.trailing                      -- Python: zlib's unused_data, gzip.decompress raises)
      self.stats.gzip_trailing = self.stats.gzip_trailing + 1
      self.stats.gzip_trailing_bytes = self.stats.gzip_trailing_bytes + b.z.trailing
    end
    f.coded = b.z.total_in                         -- compressed bytes the body had (decoded: total)
    b.z:close()
  end
  -- why the delivered body is not the whole content (nil: it is): first reason that applies
  f.incomplete = f.gap and "gap" or f.decode_error and "decode_error"
                 or f.decompression_bomb and "decompression_bomb" or f.truncated and "truncated"
                 or f.decode_incomplete and "decode_incomplete" or f.unknown_coding and "unknown_encoding" or nil
  self.on_body_end(self.ctx, b.dir, b.req, b.resp, b.total, f)
end

-- request queue ---------------------------------------------------------------------------------
local function placeholder()
  local h = httpheader.new{ is_request = true, method = "", path = "", headers = {} }
  h._placeholder = true
  return h
end

local function q_push(self, req)
  self.qt = self.qt + 1
  self.queue[self.qt] = req
  if self.qt - self.qh >= 1024 then          -- bound: drop the oldest unanswered request
    self.queue[self.qh] = nil
    self.qh = self.qh + 1
  end
end

local function q_peek(self)
  if self.qh <= self.qt then return self.queue[self.qh] end
  return nil
end

local function q_pop(self)
  if self.qh <= self.qt then
    local r = self.queue[self.qh]
    self.queue[self.qh] = nil
    self.qh = self.qh + 1
    return r
  end
  return nil
end

local function enter_resync(self, st)
  if st.body then body_end(self, st, true) end
  st.mode, st.line, st.hbuf = RESYNC, "", ""
  self.stats.resyncs = self.stats.resyncs + 1
end

-- count a framing ambiguity (request smuggling / response splitting signs, RFC 9112 §6.3, §11.2)
local FRAMING_STAT = { cl_te = "cl_te", content_length = "bad_content_length", te_not_chunked = "bad_transfer_encoding" }
framing_problem = function(self, h, problem)
  local k = FRAMING_STAT[problem]
  self.stats[k] = self.stats[k] + 1
  h._framing_problem = problem
end

-- message start -----------------------------------------------------------------------------------
local function start_message(self, dir, st, h, kind)
  if kind == "req" then
    self.req_dir = dir
    self.stats.requests = self.stats.requests + 1
    q_push(self, h)
    self.on_request(self.ctx, h)
    st.cur_req, st.cur_resp = h, nil
    local fr, len, tec, problem = body_framing(h, true)
    if problem then framing_problem(self, h, problem) end
    if fr == "chunked" then
      body_begin(self, st, dir, h, nil, h, tec).flags.chunked = true
      st.mode, st.line = CHUNK_SIZE, ""
    elseif fr == "length" and len > 0 then
      body_begin(self, st, dir, h, nil, h)
      st.mode, st.remaining = BODY_LEN, len
    elseif fr == "error" then
      enter_resync(self, st)                 -- RFC 9112 §6.3: the framing is unknown (server: 400)
    else
      st.mode = HDR
    end
    return
  end
  -- response
  local code = h:get_status()
  local req
  if code >= 100 and code < 200 and code ~= 101 then
    self.stats.interim = self.stats.interim + 1
    req = q_peek(self) or placeholder()
    self.on_response(self.ctx, req, h)
    st.mode = HDR
    return
  end
  self.stats.responses = self.stats.responses + 1
  req = q_pop(self) or placeholder()
  self.on_response(self.ctx, req, h)
  st.cur_req, st.cur_resp = req, h
  if code == 101 or (req:is_method("CONNECT") and code >= 200 and code < 300) then
    self.st[0].mode, self.st[1].mode = TUNNEL, TUNNEL
    return
  end
  if req:is_method("HEAD") or code == 204 or code == 304 or code < 200 then
    st.mode = HDR
    return
  end
  local fr, len, tec, problem = body_framing(h, false)
  if problem then framing_problem(self, h, problem) end
  if fr == "chunked" then
    body_begin(self, st, dir, req, h, h, tec).flags.chunked = true
    st.mode, st.line = CHUNK_SIZE, ""
  elseif fr == "length" then
    if len > 0 then
      body_begin(self, st, dir, req, h, h)
      st.mode, st.remaining = BODY_LEN, len
    else
      st.mode = HDR
    end
  elseif fr == "error" then
    enter_resync(self, st)                   -- RFC 9112 §6.3 item 5: unrecoverable, the response is discarded
  else
    body_begin(self, st, dir, req, h, h, tec)
    st.mode = BODY_CLOSE
  end
end

-- each mode handler consumes bytes from (p, n) and returns the count consumed ----------------------

-- Header lines of the skipped part of an oversize block that are still kept (the body's framing and
-- coding: without them a request body after 64 KiB of headers would be lost).
local SKIP_KEEP = { ["content-length"] = true, ["transfer-encoding"] = true, ["content-encoding"] = true }
local SKIP_LINE = 4096         -- a longer skipped line is dropped whole (no framing header is that long)

-- the complete lines of `s` (from a skipped header part) that SKIP_KEEP names go into header h;
-- returns the position after the blank line ending the block, or nil and the unfinished last line
local function skip_lines(st, h, s)
  local pos = 1
  while true do
    local e = sfind(s, "\n", pos, true)
    if not e then break end
    local a = pos
    pos = e + 1
    if st.skip_drop then
      st.skip_drop = false                       -- the end of an over-long line
    elseif e == a or (e == a + 1 and sbyte(s, a) == 13) then
      return pos
    else
      local colon = sfind(s, ":", a, true)
      if colon and colon > a and colon < e then
        local name = btrim(s, a, colon - 1)
        local lk = slower(name)
        if SKIP_KEEP[lk] then
          local k = #h._names + 1
          h._names[k], h._values[k] = name, btrim(s, colon + 1, e - 1)
          if h._idx[lk] == nil then h._idx[lk] = k end
        end
      end
    end
  end
  local rest = ssub(s, pos)
  if #rest > SKIP_LINE then rest, st.skip_drop = "", true end
  return nil, rest
end

-- A header block longer than max_header (start line included): what fits is kept (the start line,
-- or for a longer request line its method and the URI's first max_header bytes, and the whole header
-- lines) as a header marked truncated (h._truncated, stats.oversize_headers); the rest of the block is
-- skipped up to its blank line, keeping only its Content-Length, Transfer-Encoding and
-- Content-Encoding lines (SKIP_KEEP), then the message goes on with the framing of the kept headers.
local function oversize(self, st, buf, n)
  self.stats.oversize_headers = self.stats.oversize_headers + 1
  local head = ssub(buf, 1, self.max_header)
  local h, kind
  local last = nil
  local pos = sfind(head, "\n", 1, true)
  while pos do last = pos; pos = sfind(head, "\n", pos + 1, true) end
  if last then
    h, kind = parse_head(ssub(head, 1, last - 1))
  else
    local method, uri = smatch(head, "^([%u][%u%-_]*) +([^ \r\n]+)")
    if method then
      h, kind = httpheader.new{ is_request = true, method = method, path = uri, headers = {} }, "req"
      h._version = "1.1"
    end
  end
  if not h then
    self.stats.errors = self.stats.errors + 1
    enter_resync(self, st)
    return n
  end
  h._truncated = true
  st.hbuf, st.first_ok = "", false
  st.pending_h, st.pending_kind = h, kind
  -- the skipped part so far: whole lines after the last kept one (buf holds no blank line), or the
  -- rest of an over-long start line
  st.skip_drop = last == nil
  local _, rest = skip_lines(st, h, last and ssub(buf, last + 1) or "")
  st.mode, st.skip_line = SKIPHDR, rest
  return n
end

-- SKIPHDR: discard the rest of an oversize header block (keeping its SKIP_KEEP lines), then start its message
local function do_skiphdr(self, dir, st, p, n)
  local carry = st.skip_line
  local h, kind = st.pending_h, st.pending_kind
  local stop, rest = skip_lines(st, h, carry .. fstring(p, n))
  if not stop then
    st.skip_line = rest
    return n
  end
  st.pending_h, st.pending_kind, st.skip_line, st.skip_drop = nil, nil, "", false
  st.mode = HDR
  start_message(self, dir, st, h, kind)
  return stop - 1 - #carry
end

local function do_hdr(self, dir, st, p, n)
  local s = fstring(p, n)
  local old = st.hbuf
  local lead = 0
  if old == "" then
    local a = sfind(s, "[^\r\n]")
    if not a then return n end
    lead = a - 1
    if lead > 0 then s = ssub(s, a) end
  end
  local buf = old .. s
  local from = #old - 3
  if from < 1 then from = 1 end
  -- HTTP/0.9: the answer to a version-less GET is the raw stream until close (no status line)
  local q = q_peek(self)
  if q and q._version == "0.9" and dir ~= self.req_dir and #buf >= 5 and ssub(buf, 1, 5) ~= "HTTP/" then
    q_pop(self)
    self.stats.responses = self.stats.responses + 1
    local h = httpheader.new{ is_request = false, status = 200, headers = {} }
    h._version = "0.9"
    self.on_response(self.ctx, q, h)
    st.cur_req, st.cur_resp = q, h
    st.hbuf, st.first_ok = "", false
    body_begin(self, st, dir, q, h, h)
    st.mode = BODY_CLOSE
    return lead
  end
  -- validate the first line as soon as it is complete
  if not st.first_ok then
    local nl = sfind(buf, "\n", 1, true)
    if nl then
      local kind0 = start_kind((smatch(ssub(buf, 1, nl - 1), "^(.-)\r?$")))
      if kind0 == "req09" then
        st.hbuf = ""
        local h = parse_head(ssub(buf, 1, nl - 1))
        start_message(self, dir, st, h, "req")
        return lead + nl - #old
      end
      if not kind0 then
        enter_resync(self, st, true)
        self.stats.errors = self.stats.errors + 1
        -- rescan this data (the text after the bad line may hold a valid start)
        return 0, buf
      end
      st.first_ok = true
    elseif #buf > self.max_header then
      return oversize(self, st, buf, n)
    end
  end
  local i, j = sfind(buf, "\n\r?\n", from)
  if not i then
    if #buf > self.max_header then return oversize(self, st, buf, n) end
    st.hbuf = buf
    return n
  end
  st.hbuf = ""
  st.first_ok = false
  local used = lead + j - #old
  local h, kind = parse_head(ssub(buf, 1, i - 1))
  if not h then
    enter_resync(self, st, true)
    return used
  end
  h._term = ssub(buf, i, j)        -- "\n\r\n" or "\n\n": _raw .. _term is the block as sent, blank line included
  start_message(self, dir, st, h, kind)
  return used
end

local function do_body_len(self, st, p, n)
  local r = st.remaining
  local k = n < r and n or r
  body_data(self, st.body, p, k)
  r = r - k
  st.remaining = r
  if r == 0 then
    body_end(self, st, false)
    st.mode = HDR
  end
  return k
end

-- chunk-size [ chunk-ext ] (RFC 9112 §7.1): hex digits, any number of leading zeros, then
-- extensions (";name=value", BWS allowed) that are ignored.  nil when not a size or above 2^48.
local function chunk_size(line)
  local hex = smatch(line, "^[ \t]*(%x+)")
  if not hex then return nil end
  local digits = smatch(hex, "^0*(%x*)$")
  if #digits > 12 then return nil end
  return digits == "" and 0 or tonumber(digits, 16)
end

-- read a line (up to \n) into st.line; returns consumed, complete_line_or_nil
local function read_line(st, p, n)
  for i = 0, n - 1 do
    if p[i] == 10 then
      local line = st.line .. fstring(p, i)
      st.line = ""
      return i + 1, (smatch(line, "^(.-)\r?$"))
    end
  end
  st.line = st.line .. fstring(p, n)
  return n, nil
end

local function do_chunk_size(self, st, p, n)
  local k, line = read_line(st, p, n)
  if not line then
    if #st.line > self.max_header then enter_resync(self, st, false) end
    return k
  end
  if line == "" and not st.chunk_seen_size then return k end   -- tolerate stray CRLF
  local size = chunk_size(line)
  if not size then
    self.stats.errors = self.stats.errors + 1
    enter_resync(self, st, true)
    return k
  end
  if size == 0 then
    st.mode, st.trailers = TRAILER, nil
  else
    st.mode, st.remaining = CHUNK_DATA, size
  end
  return k
end

local function do_chunk_data(self, st, p, n)
  local r = st.remaining
  local k = n < r and n or r
  body_data(self, st.body, p, k)
  r = r - k
  st.remaining = r
  if r == 0 then st.mode, st.line = CHUNK_CRLF, "" end
  return k
end

local function do_chunk_crlf(self, st, p, n)
  local k, line = read_line(st, p, n)
  if line then
    if line ~= "" then
      -- missing CRLF after the data: treat the line as the next size line
      st.mode = CHUNK_SIZE
      st.line = ""
      local size = chunk_size(line)
      if not size then
        self.stats.errors = self.stats.errors + 1
        enter_resync(self, st, true)
        return k
      end
      if size == 0 then st.mode, st.trailers = TRAILER, nil
      else st.mode, st.remaining = CHUNK_DATA, size end
    else
      st.mode = CHUNK_SIZE
    end
  elseif #st.line > self.max_header then
    enter_resync(self, st, false)
  end
  return k
end

local function do_trailer(self, st, p, n)
  local k, line = read_line(st, p, n)
  if not line then
    if #st.line > self.max_header then body_end(self, st, true); enter_resync(self, st, false) end
    return k
  end
  if line == "" then
    if st.body and st.trailers then st.body.flags.trailers = st.trailers end
    body_end(self, st, false)
    st.mode, st.trailers = HDR, nil
  else
    local name, value = smatch(line, "^([^:]+):(.*)$")
    if name then
      st.trailers = st.trailers or {}
      st.trailers[#st.trailers + 1] = { trim(name), trim(value) }
    end
  end
  return k
end

-- RESYNC: look for the next request or status line anywhere in the data (a message may follow
-- the previous body without a line break).  The scan window is the carried tail (up to
-- RESYNC_CARRY bytes, so a start line split across calls is found) plus the new data.
-- Returns consumed, replay: replay is the text from the start line on, to be parsed in HDR mode.
local METHODS = { "GET", "POST", "HEAD", "PUT", "DELETE", "OPTIONS", "PATCH", "CONNECT", "TRACE",
                  "PROPFIND", "PROPPATCH", "MKCOL", "COPY", "MOVE", "LOCK", "UNLOCK", "REPORT", "SEARCH" }
local RESYNC_CARRY = 512

local function find_start(buf)
  local best
  local i = sfind(buf, "HTTP/1%.[01] %d%d%d[^\r\n]*\r?\n")
  if i then best = i end
  local init = 1
  while true do
    local j, _, m = sfind(buf, "(%u+) [^ \r\n]+ HTTP/1%.[01]\r?\n", init)
    if not j or (best and j > best) then break end
    for _, k in ipairs(METHODS) do
      if #m >= #k and ssub(m, -#k) == k then
        local pos = j + #m - #k
        if not best or pos < best then best = pos end
        break
      end
    end
    if best and best <= j + #m then break end
    init = j + 1
  end
  return best
end

local function do_resync(self, st, p, n)
  local buf = st.line .. fstring(p, n)
  local i = find_start(buf)
  if i then
    st.line = ""
    st.mode, st.hbuf, st.first_ok = HDR, "", false
    return n, ssub(buf, i)
  end
  st.line = #buf > RESYNC_CARRY and ssub(buf, -RESYNC_CARRY) or buf
  return n
end

local function do_body_close(self, st, p, n)
  body_data(self, st.body, p, n)
  return n
end

function P:data(dir, data, n)
  if self.closed then return end
  local keep
  if type(data) == "string" then
    keep = data
    n = n or #data
    data = cast(u8p, data)
  end
  local st = self.st[dir]
  local p = data
  while n > 0 do
    local mode = st.mode
    local k, replay
    if mode == BODY_LEN then k = do_body_len(self, st, p, n)
    elseif mode == CHUNK_DATA then k = do_chunk_data(self, st, p, n)
    elseif mode == HDR then k, replay = do_hdr(self, dir, st, p, n)
    elseif mode == CHUNK_SIZE then k = do_chunk_size(self, st, p, n)
    elseif mode == CHUNK_CRLF then k = do_chunk_crlf(self, st, p, n)
    elseif mode == TRAILER then k = do_trailer(self, st, p, n)
    elseif mode == BODY_CLOSE then k = do_body_close(self, st, p, n)
    elseif mode == SKIPHDR then k = do_skiphdr(self, dir, st, p, n)
    elseif mode == RESYNC then
      local rp
      k, rp = do_resync(self, st, p, n)
      if rp then
        -- a start line was found: parse from it in HDR mode
        keep = rp
        p, n = cast(u8p, keep), #keep
        k = 0
      end
    else -- TUNNEL
      k = n
    end
    if replay then
      -- HDR rejected its first line: rescan the buffered text (old + new) in RESYNC mode
      keep = ssub(replay, (sfind(replay, "\n", 1, true) or #replay) + 1)
      p, n = cast(u8p, keep), #keep
    else
      p = p + k
      n = n - k
    end
  end
  local _ = keep
end

function P:gap(dir, len)
  if self.closed or len <= 0 then return end
  self.stats.gaps = self.stats.gaps + 1
  local st = self.st[dir]
  local mode = st.mode
  if mode == TUNNEL then return end
  local b = st.body
  if mode == BODY_LEN then
    b.flags.gap, b.flags.truncated = true, true
    if b.z then b.zdead = true end
    if len < st.remaining then
      b.flags.missing = b.flags.missing + len
      st.remaining = st.remaining - len
      return
    end
    b.flags.missing = b.flags.missing + st.remaining
    local rest = len - st.remaining
    body_end(self, st, true)
    if rest == 0 then
      st.mode, st.hbuf, st.first_ok = HDR, "", false
    else
      enter_resync(self, st, true)
    end
    return
  elseif mode == BODY_CLOSE then
    b.flags.gap, b.flags.truncated = true, true
    b.flags.missing = b.flags.missing + len
    if b.z then b.zdead = true end
    return
  end
  if b then
    b.flags.gap = true
    b.flags.missing = b.flags.missing + len
  end
  enter_resync(self, st, true)
end

--- The TCP connection ended.  fin (optional): fin[dir] true when direction dir's stream ended with its FIN; a body
--- read until close then ends complete only in a direction whose FIN was seen (a RST or timeout truncates it).
--- Without fin every read-until-close body ends complete.
function P:close(fin)
  if self.closed then return end
  for dir = 0, 1 do
    local st = self.st[dir]
    if st.body then
      body_end(self, st, st.mode ~= BODY_CLOSE or (fin ~= nil and not fin[dir]))
    end
  end
  self.closed = true
end

-- multipart helper ------------------------------------------------------------------------------
-- http.multipart(content_type, body) -> list of parts {headers={{n,v}...}, name=, filename=, data=}
-- or nil when the content type has no boundary.
function M.multipart(ctype, body)
  if not ctype then return nil end
  local boundary = smatch(ctype, '[Bb]oundary="([^"]+)"') or smatch(ctype, "[Bb]oundary=([^;%s]+)")
  if not boundary then return nil end
  local delim = "--" .. boundary
  local parts = {}
  local pos = sfind(body, delim, 1, true)
  while pos do
    local after = pos + #delim
    if ssub(body, after, after + 1) == "--" then break end
    local hstart = sfind(body, "\n", after, true)
    if not hstart then break end
    local hi, hj = sfind(body, "\r?\n\r?\n", hstart)
    if not hi then break end
    local nextp = sfind(body, "\r\n" .. delim, hj + 1, true)
    local dend = nextp and nextp - 1 or #body
    local part = { headers = {}, data = ssub(body, hj + 1, dend) }
    for l in ssub(body, hstart + 1, hi):gmatch("[^\r\n]+") do
      local nm, v = smatch(l, "^([^:]+):%s*(.-)%s*$")
      if nm then
        part.headers[#part.headers + 1] = { nm, v }
        if slower(nm) == "content-disposition" then
          part.name = smatch(v, 'name="([^"]*)"')
          part.filename = smatch(v, 'filename="([^"]*)"')
        end
      end
    end
    parts[#parts + 1] = part
    if not nextp then break end
    pos = nextp + 2
  end
  return parts
end

-- ------------------------------------------------------------------ is it HTTP? (a flow's first payload)

pcall(ffi.cdef, "void *memmem(const void *haystack, size_t haystacklen, const void *needle, size_t needlelen);")
pcall(ffi.cdef, "void *memchr(const void *s, int c, size_t n);")
local memmem, memchr = ffi.C.memmem, ffi.C.memchr
local H_TRIES = 4          -- 'H' found by memchr and checked before the rest goes to memmem

-- "HTTP/1." within the first 2048 bytes (no Lua string made from the payload): p (const uint8_t *), n bytes.
-- The first H_TRIES 'H' bytes are found with memchr (vectorised in glibc) and the 6 bytes after each compared,
-- then memmem searches the rest.  glibc's memmem (2.36, a byte-pair shift loop) took ~150 ns for 1 000 bytes
-- without a match whatever they were, memchr a few ns per 'H'-free stretch: a first payload picked up mid-stream
-- is searched whole (every non-HTTP one), and on zero-filled, random (encrypted) or text payloads this is 1.5 to
-- 8 times faster; where 'H' is frequent it costs at most H_TRIES memchr calls more (docs/benchmarks.md, issue 10
-- "filex on short non-HTTP flows").
local function has_status_line(p, n)
  local left = (n < 2048 and n or 2048) - 6        -- positions where the 7 bytes can start
  for _ = 1, H_TRIES do
    if left <= 0 then return false end
    local h = memchr(p, 72, left)                   -- 'H'
    if h == nil then return false end
    h = cast(u8p, h)
    if h[1] == 84 and h[2] == 84 and h[3] == 80 and h[4] == 47 and h[5] == 49 and h[6] == 46 then return true end
    left = left - (h - p) - 1
    p = h + 1
  end
  return left > 0 and memmem(p, left + 6, "HTTP/1.", 7) ~= nil
end

--- Does a TCP flow whose first payload is (p: const uint8_t *, n bytes) carry HTTP/1.x?
--- True when the payload starts with a request line's method token and a space (1-20
--- upper-case letters, '-' or '_': RFC 9110 §9 token, the pattern this parser accepts; the longest
--- registered method, UPDATEREDIRECTREF of RFC 4437, has 17), after any empty lines (CR / LF: RFC 9112
--- §2.2, a server ignores at least one before a request line; so does tshark), or with
--- "HTTP/" (a response whose request was not captured).  handshake: the flow's first packet was a
--- SYN; without it the flow was picked up mid-stream and may start inside a body, so "HTTP/1."
--- anywhere in the first 2048 bytes counts too.  A payload too short to tell (a few upper-case
--- letters) counts as HTTP.  Used by the shared reassembly (engine/streams/stage.lua) to drop
--- non-HTTP flows from file extraction at their first payload (docs/filex.md).
function M.looks_http(p, n, handshake)
  local c = p[0]
  if c == 13 or c == 10 then                     -- empty lines before the request line
    local k = 1
    while k < n and k < 16 and (p[k] == 13 or p[k] == 10) do k = k + 1 end
    if k == n then return true end               -- nothing else yet: too short to tell
    p, n, c = p + k, n - k, p[k]
  end
  if c < 65 or c > 90 then                       -- not A-Z
    return not handshake and has_status_line(p, n)
  end
  local m = n < 21 and n or 21
  for i = 1, m - 1 do
    c = p[i]
    if c == 32 then return true end              -- "TOKEN "
    if c == 47 then                               -- "HTTP/"
      return fstring(p, i + 1) == "HTTP/" or (not handshake and has_status_line(p, n))
    end
    if not ((c >= 65 and c <= 90) or c == 45 or c == 95) then
      return not handshake and has_status_line(p, n)
    end
  end
  if m < 21 then return true end                  -- all token so far: too short to tell
  return false
end

M._parse_head = parse_head

--- The header block of h as sent, start line to the blank line included (the HTTP-Header attribute): the text
--- and its terminator as found ("\n\r\n" or "\n\n"); a block kept only in part (oversize, HTTP/0.9) ends with
--- the line ending its last line used (CRLF when that line ended with CR) and a CRLF blank line.
function M.block(h)
  local raw = h._raw or ""
  return raw .. (h._term or (sbyte(raw, -1) == 13 and "\n\r\n" or "\r\n\r\n"))
end

--- The header block of h without its blank line (start line to the last header line, line endings kept: the
--- HTTP headers FTS document).
function M.lines(h)
  local raw = h._raw or ""
  return raw .. ((h._term and ssub(h._term, 1, 1)) or (sbyte(raw, -1) == 13 and "\n" or "\r\n"))
end
return M
