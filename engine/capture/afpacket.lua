--[[
luaprobe.engine.capture.afpacket — live capture from a network interface: an AF_PACKET
SOCK_RAW socket with a TPACKET_V3 memory-mapped receive ring, driven entirely
from LuaJIT ffi.  The capture process (engine/capture/process.py --interface) runs
capture() and copies every frame into the packet ring as a PKT record.

    local afp = require "luaprobe.engine.capture.afpacket"
    local h = afp.open{ interface = "eth0", filter = "40 0 0 12\n21 0 1 2048\n...",  -- optional
                        block_size = 1 << 20, block_nr = 32, frame_size = 2048, retire_ms = 10,
                        promisc = true }
    -- fd = N (optional): use this unbound AF_PACKET socket instead of opening one
    -- fanout = GROUP_ID (optional): join an AF_PACKET fanout group (PACKET_FANOUT_HASH with
    -- PACKET_FANOUT_FLAG_DEFRAG), one socket per shard (engine/fastpath/shards.py)
    h:run(r, stop)      -- until stop() returns true; publishes STATS records every second
    h:close()

Setup order (as libpcap does it, so no packet of another interface or one
that the filter rejects ever reaches the ring): socket(protocol 0: receives
nothing yet) -> PACKET_VERSION = TPACKET_V3 -> PACKET_RX_RING -> mmap ->
SO_ATTACH_FILTER -> bind(ETH_P_ALL, ifindex) -> PACKET_ADD_MEMBERSHIP (promisc).

The kernel fills blocks of `block_size` bytes; a block is handed to user
space (TP_STATUS_USER) when it is full or `retire_ms` after its first packet.
We walk the blocks in order, copy each tpacket3_hdr's frame, and give the
block back (TP_STATUS_KERNEL).  block_status is read with an acquire load
and written with a release store (_lpsync): a plain ffi load would be hoisted
out of the loop by the JIT, and the store must not pass our reads of the block.

The packet ring is never waited on: when it has no room the packet is dropped
and counted (ring_drops), exactly like a NIC whose host is too slow.  Drops
in the kernel (the TPACKET ring was full: tp_drops) come from getsockopt
PACKET_STATISTICS, which resets on each read, so they are accumulated here.

Counters go to the fast path as control records kind STATS with the text
payload "seen\tring_drops\tkernel_drops\tkernel_packets\tfreeze_q\tlooped":
    seen           frames taken from the TPACKET ring (= pushed + ring_drops; loopback copies not included)
    ring_drops     frames dropped because the packet ring was full
    kernel_drops   tp_drops: frames the kernel could not put in the TPACKET ring
    kernel_packets tp_packets: frames the socket received (includes tp_drops)
    freeze_q       tp_freeze_q_cnt: times the kernel found the ring frozen (all blocks in user space)
    looped         outgoing copies skipped on a loopback interface (see below): not packets, not loss

Loopback (ARPHRD_LOOPBACK, e.g. `lo`): an AF_PACKET socket sees every frame sent on it twice, once
as sent (sll_pkttype PACKET_OUTGOING) and once as received (PACKET_HOST).  Like libpcap
(pcap-linux.c linux_check_direction: "If this is from the loopback device, reject it; we'll see the
packet as an incoming packet as well") the PACKET_OUTGOING copy is skipped, so each datagram counts
once.  On every other interface outgoing frames are kept, as libpcap keeps them (direction "out").
The sockaddr_ll that says so follows the tpacket3_hdr at TPACKET_ALIGN(sizeof(tpacket3_hdr)) = 48
(packet(7), PACKET_MMAP).

Frames the kernel received with the VLAN tag stripped (hardware/veth offload,
TP_STATUS_VLAN_VALID) get their 802.1Q tag re-inserted, so plug-ins see the
frame as it was on the wire (as libpcap does).
]]
local ffi = require("ffi")
local bit = require("bit")
local ring = require("luaprobe.shm.ring")
local packet = require("luaprobe.engine.plugins.packet")

if not pcall(ffi.typeof, "struct tpacket_req3") then
  ffi.cdef[[
struct tpacket_req3 {
  unsigned int tp_block_size, tp_block_nr, tp_frame_size, tp_frame_nr;
  unsigned int tp_retire_blk_tov, tp_sizeof_priv, tp_feature_req_word;
};
struct tpacket_bd_ts { unsigned int ts_sec; unsigned int ts_nsec; };
struct tpacket_hdr_v1 {
  uint32_t block_status, num_pkts, offset_to_first_pkt, blk_len;
  uint64_t seq_num;
  struct tpacket_bd_ts ts_first_pkt, ts_last_pkt;
};
struct tpacket_block_desc { uint32_t version, offset_to_priv; struct tpacket_hdr_v1 bh1; };
struct tpacket3_hdr {
  uint32_t tp_next_offset, tp_sec, tp_nsec, tp_snaplen, tp_len, tp_status;
  uint16_t tp_mac, tp_net;
  uint32_t tp_rxhash, tp_vlan_tci;
  uint16_t tp_vlan_tpid, tp_padding;
  uint8_t  tp_padding2[8];
};
struct tpacket_stats_v3 { unsigned int tp_packets, tp_drops, tp_freeze_q_cnt; };
struct lp_sockaddr_ll {
  unsigned short sll_family; uint16_t sll_protocol; int sll_ifindex;
  unsigned short sll_hatype; unsigned char sll_pkttype, sll_halen; unsigned char sll_addr[8];
};
struct lp_packet_mreq { int mr_ifindex; unsigned short mr_type, mr_alen; unsigned char mr_address[8]; };
struct lp_sock_filter { uint16_t code; uint8_t jt, jf; uint32_t k; };
struct lp_sock_fprog { unsigned short len; struct lp_sock_filter *filter; };
struct lp_pollfd { int fd; short events, revents; };
]]
end
for _, decl in ipairs({
  "int socket(int domain, int type, int protocol);",
  "int setsockopt(int fd, int level, int name, const void *val, unsigned int len);",
  "int getsockopt(int fd, int level, int name, void *val, unsigned int *len);",
  "int bind(int fd, const void *addr, unsigned int len);",
  "void *mmap(void *addr, size_t len, int prot, int flags, int fd, long off);",
  "int munmap(void *addr, size_t len);",
  "int close(int fd);",
  "int poll(struct lp_pollfd *fds, unsigned long n, int timeout);",
  "unsigned int if_nametoindex(const char *name);",
  "char *strerror(int errnum);",
}) do pcall(ffi.cdef, decl) end

local C = ffi.C
local S = ring.lib                        -- _lpsync: lp_load32 / lp_store32 / lp_now_ns
local band, bor, rshift, lshift = bit.band, bit.bor, bit.rshift, bit.lshift
local cast, copy = ffi.cast, ffi.copy
local REC, recp, PKT = packet.REC_SIZE, packet.recp, packet.PKT

local M = {
  AF_PACKET = 17, SOCK_RAW = 3, SOCK_CLOEXEC = 0x80000, ETH_P_ALL = 0x0003,
  SOL_SOCKET = 1, SO_ATTACH_FILTER = 26,
  SOL_PACKET = 263, PACKET_ADD_MEMBERSHIP = 1, PACKET_RX_RING = 5, PACKET_STATISTICS = 6,
  PACKET_VERSION = 10, TPACKET_V3 = 2, PACKET_MR_PROMISC = 1,
  PACKET_FANOUT = 18, PACKET_FANOUT_HASH = 0, PACKET_FANOUT_FLAG_DEFRAG = 0x8000,
  PACKET_OUTGOING = 4, ARPHRD_LOOPBACK = 772, SLL_OFFSET = 48,   -- TPACKET_ALIGN(sizeof(tpacket3_hdr))
  TP_STATUS_KERNEL = 0, TP_STATUS_USER = 1, TP_STATUS_VLAN_VALID = 16, TP_STATUS_VLAN_TPID_VALID = 64,
  POLLIN = 1, POLLERR = 8,
  STATS = packet.STATS or 4,
  -- ARPHRD (/sys/class/net/IF/type) -> pcap linktype of the frames SOCK_RAW delivers
  LINKTYPES = { [1] = 1, [772] = 1, [65534] = 101 },
}

local u8p, u32p = ffi.typeof("uint8_t *"), ffi.typeof("uint32_t *")
local bdp = ffi.typeof("struct tpacket_block_desc *")
local t3p = ffi.typeof("struct tpacket3_hdr *")

local function oserr(what)
  local e = ffi.errno()
  local msg = ("%s: %s"):format(what, ffi.string(C.strerror(e)))
  if e == 1 then msg = msg .. " (live capture needs root or CAP_NET_RAW)" end
  error(msg, 0)
end

local function htons(x) return bor(rshift(x, 8), band(x, 0xff) * 256) end

local function setopt(fd, level, name, val, what)
  if C.setsockopt(fd, level, name, val, ffi.sizeof(val)) ~= 0 then oserr(what) end
end

--- Parse `tcpdump -ddd` output (optionally with its leading count line) into a sock_filter array.
function M.parse_filter(text)
  local ins = {}
  for line in text:gmatch("[^\n]+") do
    local a, b, c, d = line:match("^%s*(%d+)%s+(%d+)%s+(%d+)%s+(%d+)%s*$")
    if a then ins[#ins + 1] = { tonumber(a), tonumber(b), tonumber(c), tonumber(d) }
    elseif not line:match("^%s*%d+%s*$") and line:match("%S") then
      error("bad BPF instruction line: " .. line, 0)
    end
  end
  if #ins == 0 then error("empty BPF program", 0) end
  local prog = ffi.new("struct lp_sock_filter[?]", #ins)
  for i, x in ipairs(ins) do
    local f = prog[i - 1]
    f.code, f.jt, f.jf, f.k = x[1], x[2], x[3], x[4]
  end
  return prog, #ins
end

local Live = {}
Live.__index = Live

--- Open the socket and its ring on opts.interface (see the header comment).
function M.open(opts)
  local ifname = assert(opts.interface, "afpacket.open: interface required")
  local self = setmetatable({
    interface = ifname, fd = -1, map = nil,
    block_size = opts.block_size or 1048576, block_nr = opts.block_nr or 32,
    frame_size = opts.frame_size or 2048, retire_ms = opts.retire_ms or 10,
    seen = 0, ring_drops = 0, kernel_drops = 0, kernel_packets = 0, freeze_q = 0, pushed = 0, looped = 0,
  }, Live)
  local ok, err = pcall(function()
    local idx = C.if_nametoindex(ifname)
    if idx == 0 then oserr("if_nametoindex") end
    self.ifindex = idx
    local hatype = 1
    local f = io.open(("/sys/class/net/%s/type"):format(ifname))
    if f then hatype = tonumber(f:read("*l")) or 1; f:close() end
    self.linktype = M.LINKTYPES[hatype]
    self.loopback = hatype == M.ARPHRD_LOOPBACK
    if not self.linktype then error(("interface %s: unsupported link type (ARPHRD %d)"):format(ifname, hatype), 0) end

    -- opts.fd: a socket opened before a privilege drop (engine/daemon/privileges.py); nothing below
    -- needs a privilege
    self.fd = opts.fd or C.socket(M.AF_PACKET, bor(M.SOCK_RAW, M.SOCK_CLOEXEC), 0)
    if self.fd < 0 then oserr("socket(AF_PACKET, SOCK_RAW)") end
    setopt(self.fd, M.SOL_PACKET, M.PACKET_VERSION, ffi.new("int[1]", M.TPACKET_V3), "setsockopt(PACKET_VERSION, TPACKET_V3)")
    local req = ffi.new("struct tpacket_req3")
    req.tp_block_size, req.tp_block_nr, req.tp_frame_size = self.block_size, self.block_nr, self.frame_size
    req.tp_frame_nr = self.block_size / self.frame_size * self.block_nr
    req.tp_retire_blk_tov = self.retire_ms
    setopt(self.fd, M.SOL_PACKET, M.PACKET_RX_RING, req, "setsockopt(PACKET_RX_RING)")
    self.map_len = self.block_size * self.block_nr
    local m = C.mmap(nil, self.map_len, 3, 1, self.fd, 0)        -- PROT_READ|PROT_WRITE, MAP_SHARED
    if cast("intptr_t", m) == -1 then oserr("mmap(TPACKET_V3 ring)") end
    self.map = cast(u8p, m)
    local function program(text)             -- a sock_fprog (kept alive by self.progs until attached)
      local prog, n = M.parse_filter(text)
      local fprog = ffi.new("struct lp_sock_fprog")
      fprog.len, fprog.filter = n, prog
      self.progs = self.progs or {}
      self.progs[#self.progs + 1] = prog
      return fprog, n
    end
    local function attach(fprog)
      setopt(self.fd, M.SOL_SOCKET, M.SO_ATTACH_FILTER, fprog, "setsockopt(SO_ATTACH_FILTER)")
    end
    -- fanout: accept nothing until the socket is in its group (a bound socket outside the group
    -- would see every packet, duplicating the other shards' share).  The real program is built
    -- before the join, so joining and attaching it are two back-to-back system calls (see below).
    if opts.fanout then
      attach((program("6 0 0 0")))
      self.join_prog, self.join_len = program(opts.filter or "6 0 0 262144")   -- the real filter, or all
    elseif opts.filter then
      local fprog, n = program(opts.filter)
      attach(fprog)
      self.filter_len = n
    end
    local sll = ffi.new("struct lp_sockaddr_ll")
    sll.sll_family, sll.sll_protocol, sll.sll_ifindex = M.AF_PACKET, htons(M.ETH_P_ALL), idx
    if C.bind(self.fd, sll, ffi.sizeof(sll)) ~= 0 then oserr(("bind(%s)"):format(ifname)) end
    if opts.fanout and opts.join ~= false then self:join(opts.fanout) end
    if opts.promisc ~= false then
      local mr = ffi.new("struct lp_packet_mreq")
      mr.mr_ifindex, mr.mr_type = idx, M.PACKET_MR_PROMISC
      setopt(self.fd, M.SOL_PACKET, M.PACKET_ADD_MEMBERSHIP, mr, "setsockopt(PACKET_ADD_MEMBERSHIP, promisc)")
    end
  end)
  if not ok then self:close(); error(err, 0) end
  self.pfd = ffi.new("struct lp_pollfd[1]")
  self.pfd[0].fd, self.pfd[0].events = self.fd, bor(M.POLLIN, M.POLLERR)
  self.st = ffi.new("struct tpacket_stats_v3")
  self.stlen = ffi.new("unsigned int[1]")
  self.cur = 0
  return self
end

--- Join fanout group `group` (open() does it unless opts.join == false; tests hold a socket bound but
--- outside the group to check that it sees nothing meanwhile), then attach the real filter.
--- PACKET_FANOUT_HASH: the kernel's symmetric flow hash picks the socket, so both directions of a flow
--- reach one shard; FLAG_DEFRAG reassembles IP fragments first, so a datagram's fragments are hashed
--- (and delivered) as one packet.  Group id: low 16 bits; type|flags: high 16 bits.
--- Between the join and the real filter the kernel already hashes this socket's share to it and the
--- drop-all program discards it, uncounted (a filter's verdict is not a tp_drop).  So both programs are
--- built beforehand and the two calls are back to back, and the capture process reports "capturing"
--- (its first STATS record) only after both (docs/scale.md, "Live start").
function Live:join(group)
  local v = ffi.new("int[1]", bor(band(group, 0xffff),
                                  lshift(bor(M.PACKET_FANOUT_HASH, M.PACKET_FANOUT_FLAG_DEFRAG), 16)))
  local prog = self.join_prog
  local ok_join = C.setsockopt(self.fd, M.SOL_PACKET, M.PACKET_FANOUT, v, 4) == 0
  local ok_filter = ok_join and C.setsockopt(self.fd, M.SOL_SOCKET, M.SO_ATTACH_FILTER, prog,
                                             ffi.sizeof(prog)) == 0
  if not ok_join then oserr("setsockopt(PACKET_FANOUT)") end
  if not ok_filter then oserr("setsockopt(SO_ATTACH_FILTER)") end
  self.fanout, self.filter_len = group, self.join_len
end

--- Read (and thereby reset) the kernel's counters, accumulating them.
function Live:kernel_stats()
  if self.fd < 0 then return end
  self.stlen[0] = ffi.sizeof(self.st)
  if C.getsockopt(self.fd, M.SOL_PACKET, M.PACKET_STATISTICS, self.st, self.stlen) == 0 then
    self.kernel_packets = self.kernel_packets + self.st.tp_packets
    self.kernel_drops = self.kernel_drops + self.st.tp_drops
    self.freeze_q = self.freeze_q + self.st.tp_freeze_q_cnt
  end
end

--- The STATS payload text.
function Live:stats_text()
  return ("%d\t%d\t%d\t%d\t%d\t%d"):format(self.seen, self.ring_drops, self.kernel_drops, self.kernel_packets,
                                          self.freeze_q, self.looped)
end

-- Push a STATS record without waiting (skipped when the ring is full: the next one carries the totals).
local function push_stats(self, r)
  self:kernel_stats()
  local text = self:stats_text()
  local p = r:reserve(REC + #text)
  if p == nil then return false end
  local h = cast(recp, p)
  ffi.fill(h, REC, 0)
  h.kind, h.caplen = M.STATS, #text
  copy(p + REC, text, #text)
  r:commit()
  r:publish()
  return true
end

--- Copy every frame of user-owned blocks into ring r, starting at the
--- current block.  Returns the number of blocks handed back.  Stops after
--- `max_blocks` blocks so the caller can check its clock.
function Live:drain(r, max_blocks)
  local map, bsize, nblk, linktype, ifindex = self.map, self.block_size, self.block_nr, self.linktype, self.ifindex
  local max_rec = r.max_record - REC - 4
  local blk, done = self.cur, 0
  local seen, drops, pushed, looped = self.seen, self.ring_drops, self.pushed, self.looped
  local loopback, OUT, SLL = self.loopback, M.PACKET_OUTGOING, M.SLL_OFFSET + 10   -- + offsetof(sll_pkttype)
  while done < max_blocks do
    local base = map + blk * bsize
    local statusp = cast(u32p, base) + 2                      -- block_desc.bh1.block_status
    if band(S.lp_load32(statusp), M.TP_STATUS_USER) == 0 then break end
    local bd = cast(bdp, base)
    local off = bd.bh1.offset_to_first_pkt
    for _ = 1, bd.bh1.num_pkts do
      local t = cast(t3p, base + off)
      if loopback and base[off + SLL] == OUT then
        looped = looped + 1                                     -- the sent copy of a looped-back frame
      else
        local caplen, wirelen, src = t.tp_snaplen, t.tp_len, base + off + t.tp_mac
        local vlan = band(t.tp_status, M.TP_STATUS_VLAN_VALID) ~= 0 and linktype == 1 and caplen >= 12
        local n = vlan and caplen + 4 or caplen
        if n > max_rec then n = max_rec end
        seen = seen + 1
        local p = r:reserve(REC + n)
        if p == nil then
          drops = drops + 1
        else
          local h = cast(recp, p)
          h.kind, h.ts_sec, h.ts_nsec = PKT, t.tp_sec, t.tp_nsec
          h.linktype, h.ifindex, h.pad = linktype, ifindex, 0
          local d = p + REC
          if vlan then
            local tpid = band(t.tp_status, M.TP_STATUS_VLAN_TPID_VALID) ~= 0 and t.tp_vlan_tpid or 0x8100
            if tpid == 0 then tpid = 0x8100 end
            local tci = t.tp_vlan_tci
            copy(d, src, 12)
            d[12], d[13], d[14], d[15] = rshift(tpid, 8), band(tpid, 0xff), band(rshift(tci, 8), 0xff), band(tci, 0xff)
            copy(d + 16, src + 12, n - 16)
            h.wirelen, h.caplen = wirelen + 4, n
          else
            copy(d, src, n)
            h.wirelen, h.caplen = wirelen, n
          end
          r:commit()
          pushed = pushed + 1
          if pushed % 64 == 0 then r:publish() end
        end
      end
      off = off + t.tp_next_offset
    end
    S.lp_store32(statusp, M.TP_STATUS_KERNEL)                  -- release: our reads of the block are done
    blk = blk + 1
    if blk == nblk then blk = 0 end
    done = done + 1
  end
  self.cur = blk
  self.seen, self.ring_drops, self.pushed, self.looped = seen, drops, pushed, looped
  if done > 0 then r:publish() end
  return done
end

--- Capture into ring r until stop() returns true (checked at least every
--- 100 ms: poll() waits at most 100 ms, and a busy loop looks at the clock
--- after every block).  A STATS record goes out at once (the fast path's
--- snapshot then says "capturing") and every `stats_every` seconds.
--- After stop, frames already received are drained (the kernel retires a
--- partly filled block after retire_ms), then the final STATS record is
--- pushed, waiting for room.
function Live:run(r, stop, stats_every)
  local every = (stats_every or 1) * 1e9
  local now = S.lp_now_ns()
  local next_check, next_stats = now + 100e6, now + every
  local pfd = self.pfd
  push_stats(self, r)              -- first STATS = "capturing": the socket is set up (and in its fanout group)
  while true do
    local n = self:drain(r, 8)
    now = S.lp_now_ns()
    if n == 0 or now >= next_check then
      if stop() then break end
      next_check = now + 100e6
      if now >= next_stats then
        push_stats(self, r)
        next_stats = now + every
      end
      if n == 0 then
        pfd[0].revents = 0
        C.poll(pfd, 1, 100)        -- EINTR (a signal) just returns early
      end
    end
  end
  -- drain what the kernel already holds: wait for the open block to retire
  local deadline = S.lp_now_ns() + (self.retire_ms * 3 + 20) * 1e6
  while S.lp_now_ns() < deadline do
    if self:drain(r, self.block_nr) == 0 then C.poll(pfd, 1, 5) end
  end
  self:kernel_stats()
  local text = self:stats_text()
  require("luaprobe.engine.capture.capture").control(r, M.STATS, text)
  return self.seen, self.ring_drops, self.kernel_drops
end

--- Unmap the ring and close the socket (idempotent).
function Live:close()
  if self.map ~= nil then C.munmap(self.map, self.map_len); self.map = nil end
  if self.fd >= 0 then C.close(self.fd); self.fd = -1 end
end

M.Live = Live
return M
