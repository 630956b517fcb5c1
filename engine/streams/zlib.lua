--[[
luaprobe.engine.streams.zlib — streaming gzip / zlib / raw-deflate inflation through the
system libz (ffi.load "z", libz.so.1 on Debian).

    local zlib = require "luaprobe.engine.streams.zlib"
    local z = zlib.inflater(mode)     -- mode: "gzip" | "deflate" | "auto" (default)
    local ok, err = z:feed(ptr_or_string, len, out)  -- out(ptr, n) per output piece (ptr valid only
                                                      -- during the call); out returning false stops
                                                      -- the inflater at that piece (z.stopped)
    z.done          -- true after the end of the compressed stream (later input is ignored;
                    -- gzip: only when what follows is not another gzip member)
    z.members       -- gzip members decoded (RFC 1952 §2.2: a gzip file is a series of members)
    z.trailing      -- bytes after the end of the stream that are not a gzip member (ignored, counted)
    z.failed        -- error string once decoding failed (later input is ignored)
    z.stopped       -- true once out returned false (the caller's output limit, e.g. streams/http.lua's
                    -- decompression bomb rule): the rest of this feed and later input are not inflated
    z.total_in, z.total_out
    z:complete()    -- the input so far ends at the end of a stream / gzip member
    z:close()       -- frees the z_stream (also done by the GC)
    zlib.inflate(str[, mode]) -> whole output string or nil, err   (tests, small bodies)

Modes.  inflateInit2 with windowBits 15+32 detects gzip and zlib headers
automatically.  HTTP "Content-Encoding: deflate" is meant to be zlib-wrapped
(RFC 9110) but many servers send raw deflate: for mode "deflate" (and "auto")
the first inflate error before any output is produced restarts the stream as raw
deflate (windowBits -15) and refeeds the bytes seen so far (they are kept only
until the first output byte).

Multi-member gzip (what `cat a.gz b.gz`, pigz and some servers produce; gunzip and
Python's gzip.decompress decode every member): at the end of a gzip member, input
that follows starts a new member (inflateReset, the gzip header is detected again);
if it does not start with the gzip magic (1f 8b) and does not inflate, the stream is done and the
rest is counted in z.trailing (gunzip's "trailing garbage ignored"), not an error; a member that starts
with the magic and then fails to inflate is an error (z.failed), as in gunzip and Python.
]]
local ffi = require "ffi"

if not pcall(ffi.typeof, "lp_z_stream") then
  ffi.cdef [[
typedef struct lp_z_stream_s {
  const uint8_t *next_in;  unsigned int avail_in;  unsigned long total_in;
  uint8_t *next_out;       unsigned int avail_out; unsigned long total_out;
  const char *msg;  void *state;
  void *zalloc;  void *zfree;  void *opaque;
  int data_type;  unsigned long adler;  unsigned long reserved;
} lp_z_stream;
const char *zlibVersion(void);
int inflateInit2_(lp_z_stream *strm, int windowBits, const char *version, int stream_size);
int inflate(lp_z_stream *strm, int flush);
int inflateEnd(lp_z_stream *strm);
]]
end
if not pcall(function() return ffi.C.inflateReset end) then
  pcall(ffi.cdef, "int inflateReset(lp_z_stream *strm);")
end

local Z = ffi.load("z")
local Z_OK, Z_STREAM_END, Z_NEED_DICT, Z_BUF_ERROR = 0, 1, 2, -5
local OUTSZ = 65536
local u8p = ffi.typeof("const uint8_t *")
local VERSION = Z.zlibVersion()
local SSIZE = ffi.sizeof("lp_z_stream")
local GZ_MAGIC = "\31\139"                  -- 1f 8b: a gzip member starts here (RFC 1952 §2.3.1)

local M = {}
local Inf = {}
Inf.__index = Inf

local function init(self, wbits)
  local strm = ffi.new("lp_z_stream")
  local rc = Z.inflateInit2_(strm, wbits, VERSION, SSIZE)
  if rc ~= Z_OK then error("inflateInit2 failed: " .. rc) end
  self.strm = ffi.gc(strm, Z.inflateEnd)
  self.wbits = wbits
end

function M.inflater(mode)
  local self = setmetatable({ mode = mode or "auto", done = false, failed = nil,
                              total_in = 0, total_out = 0, out = ffi.new("uint8_t[?]", OUTSZ),
                              pending = {}, members = 0, trailing = 0, member_end = false }, Inf)
  init(self, 15 + 32)
  self.can_retry = (self.mode ~= "gzip")
  return self
end

-- Run inflate over (p, n); returns true or nil, err.  Z_BUF_ERROR (no progress
-- possible: more input needed) is not an error.
local function run(self, p, n, out)
  local strm, obuf = self.strm, self.out
  strm.next_in = p
  strm.avail_in = n
  while true do
    strm.next_out = obuf
    strm.avail_out = OUTSZ
    local rc = Z.inflate(strm, 0)
    local produced = OUTSZ - strm.avail_out
    if produced > 0 then
      self.total_out = self.total_out + produced
      if self.pending then self.pending = nil end   -- past the raw-deflate retry window
      if out(obuf, produced) == false then          -- the caller wants no more output: stop here
        self.stopped = true
        return true
      end
    end
    if rc == Z_STREAM_END then
      self.members = self.members + 1
      if self.wbits == -15 or self.gz == false then  -- raw deflate / zlib: one stream
        self.trailing = self.trailing + strm.avail_in
        self.done, self.in_trailer = true, true
        return true
      end
      -- gzip: another member may follow (now or in a later feed)
      self.end_in = self.total_in - strm.avail_in
      self.member_end = true
      if strm.avail_in == 0 then return true end
      Z.inflateReset(strm)
      self.member_end = false
      self.member_start_out = self.total_out
      self.mhead = ffi.string(strm.next_in, strm.avail_in < 2 and strm.avail_in or 2)
    elseif rc == Z_BUF_ERROR then
      return true
    elseif rc ~= Z_OK and self.members > 0 and self.total_out == self.member_start_out and self.mhead ~= GZ_MAGIC then
      -- not a gzip header after a member: trailing bytes, ignored and counted.  Bytes that start with the gzip
      -- magic are a member: its inflate error is the body's decode error (gunzip and Python's gzip fail there too)
      self.trailing = self.total_in - self.end_in
      self.done, self.in_trailer = true, true
      return true
    elseif rc ~= Z_OK then
      return nil, (strm.msg ~= nil and ffi.string(strm.msg) or ("inflate error " .. rc))
    end
    if strm.avail_in == 0 and strm.avail_out ~= 0 then return true end
  end
end

function Inf:feed(data, len, out)
  if self.stopped then return true end
  if self.done or self.failed then
    if self.in_trailer then self.trailing = self.trailing + (len or #data) end
    return true
  end
  local p, keep = data, nil
  if type(data) == "string" then
    len = len or #data
    keep = data
    p = ffi.cast(u8p, data)
  end
  if len <= 0 then return true end
  if self.member_end then                  -- the previous feed ended exactly at a member's end
    Z.inflateReset(self.strm)
    self.member_end = false
    self.member_start_out = self.total_out
    self.mhead = ""
  end
  if self.mhead and #self.mhead < 2 then   -- a member's first two bytes may come in two feeds
    self.mhead = self.mhead .. ffi.string(p, math.min(2 - #self.mhead, len))
  end
  if self.gz == nil then self.gz = (p[0] == 0x1f) end   -- gzip (members may follow) or zlib
  self.total_in = self.total_in + len
  if self.pending then self.pending[#self.pending + 1] = ffi.string(p, len) end
  local ok, err = run(self, p, len, out)
  if not ok and self.can_retry and self.pending and self.total_out == 0 then
    -- retry once as raw deflate with everything seen so far
    local all = table.concat(self.pending)
    self.can_retry = false
    init(self, -15)
    self.pending = nil
    ok, err = run(self, ffi.cast(u8p, all), #all, out)
    keep = all
  end
  if not ok then self.failed = err; return nil, err end
  local _ = keep
  return true
end

--- True when the input so far ends exactly at the end of a stream / gzip member, or after a whole gzip member
--- with bytes that cannot begin another (the first is not the magic's 0x1f): those are trailing bytes, counted in
--- z.trailing as when they failed to inflate (a single byte, a lone newline after the data, is too few for zlib to
--- fail on; before, that body was called a truncated gzip).
function Inf:complete()
  if self.done or self.member_end then return true end
  local h = self.mhead
  if self.members > 0 and self.total_out == self.member_start_out and h and h ~= "" and h:byte(1) ~= 0x1f then
    self.trailing = self.total_in - self.end_in
    self.done, self.in_trailer = true, true
    return true
  end
  return false
end

function Inf:close()
  if self.strm then
    Z.inflateEnd(ffi.gc(self.strm, nil))
    self.strm = nil
  end
end

function M.inflate(s, mode)
  local z = M.inflater(mode)
  local parts = {}
  local ok, err = z:feed(s, #s, function(p, n) parts[#parts + 1] = ffi.string(p, n) end)
  z:close()
  if not ok then return nil, err end
  return table.concat(parts)
end

return M
