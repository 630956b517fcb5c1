--[[
luaprobe.engine.gen.stream — the generator (engine/gen/builder.lua) as a live source.

gen.new{ file = W, ... } hands its pcap bytes (a 24-byte file header, then
16-byte record headers + frames, always whole records) to W:write(s) instead of
a file.  Two writers live here:

  M.ring_writer(r, stop)   every frame -> the packet ring as a PKT record, with
                           backpressure (like engine/capture/capture.lua: wait for
                           space, nothing lost).  Used by `luaprobe run --generate`.
  M.sender(opts)           every frame -> an AF_PACKET socket on opts.interface,
                           paced: sendmmsg batches scheduled against
                           CLOCK_MONOTONIC.  Used by `luaprobe gen --interface`.

When a writer is done (the sender reached its packet count or its deadline,
the ring writer was told to stop) write() raises M.STOP; engine/gen/stream.py
catches it.

Pacing (opts.rate packets/s, or opts.bitrate bits/s of frame bytes): packet i
(0-based) is due at t0 + i/rate (or t0 + 8 * bytes before i / bitrate), t0 =
the clock when the first packet is ready.  The loop sends every packet that is
due in one sendmmsg (at most opts.batch), then sleeps with clock_nanosleep
(TIMER_ABSTIME) until the next one is due.  A sender that falls behind sends
what is due in batches and so catches up; it stops at t0 + duration whatever
the count.

M.count_rx(opts) is a receiving counter for tests and the load-test harness:
a TPACKET_V3 socket (engine/capture/afpacket.lua) counting the frames that carry
the generator's server MAC, with the first and last kernel timestamps.
]]
local ffi = require("ffi")
local bit = require("bit")
local ring = require("luaprobe.shm.ring")
local clock = require("luaprobe.shm.clock")
local packet = require("luaprobe.engine.plugins.packet")
local afp = require("luaprobe.engine.capture.afpacket")

pcall(ffi.cdef, [[
struct lp_iovec { void *iov_base; size_t iov_len; };
struct lp_msghdr {
  void *msg_name; unsigned int msg_namelen; struct lp_iovec *msg_iov; size_t msg_iovlen;
  void *msg_control; size_t msg_controllen; int msg_flags;
};
struct lp_mmsghdr { struct lp_msghdr msg_hdr; unsigned int msg_len; };
]])
pcall(ffi.cdef, "int sendmmsg(int fd, struct lp_mmsghdr *msgs, unsigned int n, int flags);")

local C = ffi.C
local S = ring.lib
local band, bor, rshift = bit.band, bit.bor, bit.rshift
local cast, copy = ffi.cast, ffi.copy
local floor = math.floor
local REC, recp, PKT = packet.REC_SIZE, packet.recp, packet.PKT
local cu8p, cu32p, u32p = ffi.typeof("const uint8_t *"), ffi.typeof("const uint32_t *"), ffi.typeof("uint32_t *")
local EINTR, EAGAIN, ENOBUFS = 4, 11, 105

local M = { STOP = "genstream: stop" }

local now_ns, sleep_until = clock.now_ns, clock.sleep_until   -- EINTR ends a sleep: the loop re-checks
M.now_ns = now_ns

-- offset of the first record in s (skips the pcap file header once)
local function start_of(self, p, n)
  if self.header_seen then return 0 end
  assert(n >= 24 and cast(cu32p, p)[0] == 0xA1B2C3D4, "genstream: expected a little-endian pcap stream")
  self.header_seen = true
  return 24
end

-- ------------------------------------------------------------------ ring writer

--- A gen.lua `file` that pushes each frame into packet ring r (backpressure:
--- waits for space; stop() is checked while waiting).
function M.ring_writer(r, stop)
  local w = { packets = 0, bytes = 0, header_seen = false, stopped = false }
  local capture = require("luaprobe.engine.capture.capture")
  local slack, flush = capture.refill_slack(r), capture.flush   -- a quarter ring; 0 for a sharder
  function w.write(self, s)
    local p, n = cast(cu8p, s), #s
    local off = start_of(self, p, n)
    local np, nb, since = self.packets, self.bytes, 0
    while off + 16 <= n do
      local h = cast(cu32p, p + off)
      local caplen, wirelen = h[2], h[3]
      local rr = r                          -- a sharder (engine/capture/capture.lua) picks the shard's ring
      if r.rings then rr = r:pick(p + off + 16, caplen, 1, h[0], stop, h[1] * 1000) end
      local q = rr:reserve(REC + caplen)
      while q == nil do
        flush(r)                            -- a sharder: every shard's packets visible, sleepers woken
        rr:wait_space(REC + caplen, 50e6, slack)
        if stop() then
          self.packets, self.bytes, self.stopped = np, nb, true
          error(M.STOP, 0)
        end
        q = rr:reserve(REC + caplen)
      end
      local rec = cast(recp, q)
      rec.kind, rec.ts_sec, rec.ts_nsec, rec.wirelen, rec.caplen = PKT, h[0], h[1] * 1000, wirelen, caplen
      rec.linktype, rec.ifindex, rec.pad = 1, 0, 0
      copy(q + REC, p + off + 16, caplen)
      rr:commit()
      if rr ~= r then r:committed() end
      np, nb, since = np + 1, nb + wirelen, since + 1
      if since >= 64 then r:publish(); since = 0 end
      off = off + 16 + caplen
    end
    flush(r)
    self.packets, self.bytes = np, nb
    if stop() then self.stopped = true; error(M.STOP, 0) end
  end
  function w.close() end
  return w
end

-- ------------------------------------------------------------------ paced sender

local Sender = {}
Sender.__index = Sender

local function oserr(what)
  local e = ffi.errno()
  local msg = ("%s: %s"):format(what, ffi.string(C.strerror(e)))
  if e == 1 then msg = msg .. " (sending needs root or CAP_NET_RAW)" end
  error(msg, 0)
end

--- opts: interface, rate (packets/s) or bitrate (bits/s), duration (s), count (packets; rate mode
--- default rate * duration), batch (packets per sendmmsg, default 64).
function M.sender(opts)
  local rate, bitrate = opts.rate, opts.bitrate
  assert((rate and rate > 0) or (bitrate and bitrate > 0), "sender: rate or bitrate required")
  local B = opts.batch or 64
  local self = setmetatable({
    fd = -1, B = B, rate = rate, bitrate = bitrate, duration = opts.duration or 10,
    count = opts.count or (rate and floor(rate * (opts.duration or 10) + 0.5)) or math.huge,
    sent = 0, bytes = 0, calls = 0, retries = 0, t0 = nil, t_last = nil, header_seen = false,
    finished = false, why = nil, late_max_ns = 0,
  }, Sender)
  local idx = C.if_nametoindex(opts.interface)
  if idx == 0 then oserr("if_nametoindex(" .. opts.interface .. ")") end
  self.fd = C.socket(afp.AF_PACKET, bor(afp.SOCK_RAW, afp.SOCK_CLOEXEC), 0)   -- protocol 0: receives nothing
  if self.fd < 0 then oserr("socket(AF_PACKET, SOCK_RAW)") end
  local sll = ffi.new("struct lp_sockaddr_ll")
  sll.sll_family, sll.sll_protocol, sll.sll_ifindex = afp.AF_PACKET, 0, idx
  if C.bind(self.fd, sll, ffi.sizeof(sll)) ~= 0 then local fd = self.fd; self.fd = -1; C.close(fd); oserr("bind") end
  local one = ffi.new("int[1]", 1)
  C.setsockopt(self.fd, afp.SOL_PACKET, 20, one, 4)             -- PACKET_QDISC_BYPASS (best effort)
  local sndbuf = ffi.new("int[1]", 8 * 1048576)
  C.setsockopt(self.fd, afp.SOL_SOCKET, 32, sndbuf, 4)          -- SO_SNDBUFFORCE (root), else ...
  C.setsockopt(self.fd, afp.SOL_SOCKET, 7, sndbuf, 4)           -- ... SO_SNDBUF
  self.iov = ffi.new("struct lp_iovec[?]", B)
  self.msgs = ffi.new("struct lp_mmsghdr[?]", B)
  for i = 0, B - 1 do
    self.msgs[i].msg_hdr.msg_iov = self.iov + i
    self.msgs[i].msg_hdr.msg_iovlen = 1
  end
  self.lens = ffi.new("double[?]", B)
  return self
end

-- send iov[0..k) paced; sets self.finished at the count or the deadline
function Sender:_send(k)
  local done = 0
  local rate, bitrate, B = self.rate, self.bitrate, self.B
  while done < k do
    local now = now_ns()
    if self.t0 == nil then
      self.t0 = now
      self.deadline = now + self.duration * 1e9
    end
    if now >= self.deadline then self.finished, self.why = true, "duration"; return end
    local t0 = self.t0
    local allowed
    if rate then
      allowed = floor((now - t0) * rate / 1e9) + 1 - self.sent
      if allowed > k - done then allowed = k - done end
    else
      local budget = (now - t0) * bitrate / 8e9 - self.bytes     -- packet due when the bytes before it fit
      allowed = 0
      local acc = 0
      while done + allowed < k and acc <= budget do
        acc = acc + self.lens[done + allowed]
        allowed = allowed + 1
      end
    end
    local left = self.count - self.sent
    if allowed > left then allowed = left end
    if allowed <= 0 then
      if left <= 0 then self.finished, self.why = true, "count"; return end
      local due = rate and t0 + self.sent * 1e9 / rate or t0 + self.bytes * 8e9 / bitrate
      if due > self.deadline then due = self.deadline end
      sleep_until(due)
    else
      local r = C.sendmmsg(self.fd, self.msgs + done, allowed, 0)
      self.calls = self.calls + 1
      if r < 0 then
        local e = ffi.errno()
        if e == EINTR or e == EAGAIN or e == ENOBUFS then
          self.retries = self.retries + 1
          sleep_until(now_ns() + 50e3)
        else
          oserr("sendmmsg")
        end
      else
        for i = done, done + r - 1 do self.bytes = self.bytes + self.lens[i] end
        local due = rate and t0 + (self.sent + r - 1) * 1e9 / rate
        if due then
          local late = now - due
          if late > self.late_max_ns then self.late_max_ns = late end
        end
        self.sent = self.sent + r
        done = done + r
        self.t_last = now_ns()
      end
    end
  end
  if self.sent >= self.count then self.finished, self.why = true, "count" end
end

--- gen.lua `file` interface: send every record of s, paced.
function Sender:write(s)
  if self.finished then error(M.STOP, 0) end
  local p, n = cast(cu8p, s), #s
  local off = start_of(self, p, n)
  local k, B, iov, lens = 0, self.B, self.iov, self.lens
  while off + 16 <= n do
    local caplen = cast(cu32p, p + off)[2]
    iov[k].iov_base = ffi.cast("void *", p + off + 16)
    iov[k].iov_len = caplen
    lens[k] = caplen
    k = k + 1
    off = off + 16 + caplen
    if k == B then
      self:_send(k)
      k = 0
      if self.finished then error(M.STOP, 0) end
    end
  end
  if k > 0 then self:_send(k) end                 -- s must stay alive until its frames are sent
  if self.finished then error(M.STOP, 0) end
end

function Sender:close() end

--- Counters: sent, bytes, elapsed_s (first send to last), rates, sendmmsg calls, retries, max lateness.
function Sender:stats()
  local el = (self.t0 and self.t_last) and (self.t_last - self.t0) / 1e9 or 0
  return {
    sent = self.sent, bytes = self.bytes, elapsed_s = el, calls = self.calls, retries = self.retries,
    pps = el > 0 and (self.sent - 1) / el or 0, bps = el > 0 and self.bytes * 8 / el or 0,
    stopped_by = self.why or "input", late_max_ms = self.late_max_ns / 1e6,
  }
end

function Sender:shutdown()
  if self.fd >= 0 then C.close(self.fd); self.fd = -1 end
end

-- ------------------------------------------------------------------ receiving counter

--- Count frames from/to the generator's server MAC (02:00:5E:00:00:01) on opts.interface until
--- opts.idle seconds pass without one after the first (or opts.max seconds in all); ready() is called
--- once the socket is bound.  Returns count, first and last kernel timestamps (ns), other frames.
function M.count_rx(opts)
  local h = afp.open({ interface = opts.interface, block_size = 1048576, block_nr = 64, retire_ms = 2 })
  if opts.ready then opts.ready() end
  local idle, maxs = (opts.idle or 1.0) * 1e9, (opts.max or 60) * 1e9
  local map, bsize, nblk = h.map, h.block_size, h.block_nr
  local bdp = ffi.typeof("struct tpacket_block_desc *")
  local t3p = ffi.typeof("struct tpacket3_hdr *")
  local n, other, first, last = 0, 0, nil, nil
  local start, last_rx = now_ns(), nil
  local blk = 0
  while true do
    local base = map + blk * bsize
    local statusp = cast(u32p, base) + 2
    if band(S.lp_load32(statusp), afp.TP_STATUS_USER) ~= 0 then
      local bd = cast(bdp, base)
      local off = bd.bh1.offset_to_first_pkt
      for _ = 1, bd.bh1.num_pkts do
        local t = cast(t3p, base + off)
        local f = base + off + t.tp_mac
        local mine = (f[0] == 2 and f[1] == 0 and f[2] == 0x5E and f[3] == 0 and f[4] == 0 and f[5] == 1)
          or (f[6] == 2 and f[7] == 0 and f[8] == 0x5E and f[9] == 0 and f[10] == 0 and f[11] == 1)
        if mine then
          local ts = tonumber(t.tp_sec) * 1e9 + tonumber(t.tp_nsec)
          if first == nil then first = ts end
          last = ts
          n = n + 1
        else
          other = other + 1
        end
        off = off + t.tp_next_offset
      end
      S.lp_store32(statusp, afp.TP_STATUS_KERNEL)
      blk = blk + 1
      if blk == nblk then blk = 0 end
      last_rx = n > 0 and now_ns() or last_rx
    else
      local now = now_ns()
      if (last_rx and now - last_rx > idle) or now - start > maxs then break end
      h.pfd[0].revents = 0
      C.poll(h.pfd, 1, 5)
    end
  end
  h:kernel_stats()
  local drops = h.kernel_drops
  h:close()
  return n, first or 0, last or 0, other, drops
end

return M
