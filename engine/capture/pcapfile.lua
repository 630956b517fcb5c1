--[[
luaprobe.engine.capture.pcapfile — zero-copy record walker for classic pcap and pcapng files
held in memory (normally the read-only mmap of the file, see engine/capture/pcapfile.py).

    local pcapfile = require "luaprobe.engine.capture.pcapfile"
    local r = pcapfile.open(addr, size)   -- addr: number (or pointer) of the first byte
    while true do
      local ptr, caplen, wirelen, ts_sec, ts_nsec, linktype, ifindex = r:next()
      if not ptr then break end            -- EOF, or r.error is set
      ...                                  -- ptr: const uint8_t*, valid while the map is
    end
    if r.error then print(r.error_offset, r.error) end

Reader fields: r.packets (records returned so far), r.offset (byte offset of the
next record/block; after an error, the offset of the bad one), r.format ("pcap" |
"pcapng"), r.error / r.error_offset (set once, on the first corruption; next() then
keeps returning nil), r.swap (current byte order differs from the host's).
pcap only: r.linktype, r.snaplen, r.version_major/minor.  pcapng only: r.sections,
r.nif (interfaces declared in the current section).
open() raises the Lua error string "offset N: message" (level 0, no position
prefix) when the file header is not a usable pcap / pcapng header.

Formats
  * classic pcap, both byte orders: magic a1b2c3d4 (usec), a1b23c4d (nsec) and
    a1b2cd34 (Kuznetzov "modified" pcap, usec, 24-byte record headers, as libpcap
    reads it).  linktype = global header `network` & 0x03FFFFFF (libpcap's
    LT_LINKTYPE); any value is passed through.  The bits above carry FCS information
    (libpcap's LT_FCS_DATALINK_EXT): when 0x04000000 is set, every frame ends in an FCS
    of (network >> 28) * 2 bytes, which is removed (see "FCS" below); r.fcs_len.
    ifindex is always 0.
  * pcapng: any number of sections, each with its own byte order; interface ids
    restart at 0 in each section.  IDB: link type, snaplen, if_tsresol (10^-k or
    2^-k, default 10^-6) and if_tsoffset (seconds).  Packets come from EPB (6), SPB
    (3: interface 0, caplen = min(original length, snaplen if non-zero, block room);
    Wireshark instead rejects an SPB whose room is below min(original length, snaplen))
    and the obsolete PB (2).  Every other block type is skipped.
    An SPB has no timestamp: it reports the previous packet's timestamp (0 if none),
    so time never goes backwards because of it.  IDB option if_fcslen (13, in bits,
    pcapng draft §4.2 and Wireshark) gives the FCS length of the interface's frames; an EPB's (or PB's)
    epb_flags option with a non-zero FCS length (bits 5-8, in octets) overrides it for that packet, as
    the draft says and Wireshark does.  Only blocks that carry options pay for reading them.

FCS.  A frame check sequence is not payload: with a known FCS length f, a record of
wirelen w and caplen c is returned with wirelen w - f and caplen min(c, w - f) (the
FCS bytes that were captured are cut off; with a snaplen the FCS may be partly or
entirely absent already), as Wireshark does for Ethernet with FCS.  A record whose
original length is below its captured length (orig_len 0 from broken writers) has the
FCS as its last f captured bytes: caplen c - f, wirelen w - f.

Timestamps are always (ts_sec, ts_nsec) with 0 <= ts_nsec < 1e9: out-of-range
fractions (usec >= 1e6, nsec >= 1e9, as written by broken tools) are carried into
the seconds, never negative.

Corruption (sets r.error / r.error_offset = offset of the record or block):
  * fewer bytes left than a record header / block header (truncated final record)
  * caplen > MAX_CAPLEN (1 MiB = 4 x 262144, libpcap's largest snaplen)
  * caplen larger than the bytes left in the file / in the block
  * pcapng block length not a multiple of 4, below the block type's minimum,
    larger than the bytes left, or different from the trailing copy
  * EPB / PB with an interface id no IDB of the section declared, SPB without IDB 0
  * bad SHB byte-order magic or major version, IDB options overrunning the block,
    an if_tsresol finer than 10^-19 or 2^-63 s: the units per second would not fit in
    64 bits (libpcap's sf-pcapng.c and Wireshark's wiretap/pcapng.c refuse the file at
    the same limits; the offset is the IDB's, the packets before it are read)
  * an EPB / PB option (with its padding) running past the block, as Wireshark refuses
    it (wiretap/pcapng.c; libpcap reads no EPB option and accepts it)
  The snaplen is NOT enforced (caplen > snaplen is accepted): writers often put 0 or a
  wrong value there; MAX_CAPLEN and the file / block bounds keep the walker safe.
  The standard magic always means 16-byte record headers, as in libpcap (Wireshark
  may guess a 24-byte variant on corrupt files and then reads different records).
  No byte outside [addr, addr + size) is ever read.

Per-packet cost: no table or string allocation (strings are built on the error
path only); the byte-order decision is a per-section boolean (`swap`); next() has
no loop on the packet path (non-packet pcapng blocks are handled in skip_to_packet),
so a caller's loop over r:next() compiles to one trace.
]]

local ffi = require("ffi")
local bit = require("bit")

local bswap, band, rshift = bit.bswap, bit.band, bit.rshift
local cast, floor, tonumber = ffi.cast, math.floor, tonumber

local u8p = ffi.typeof("const uint8_t *")
local u16p = ffi.typeof("const uint16_t *")
local u32p = ffi.typeof("const uint32_t *")
local u64 = ffi.typeof("uint64_t")
local HOST_LE = ffi.abi("le")

local M = {
  MAX_CAPLEN = 1048576,
}
local MAX_CAPLEN = M.MAX_CAPLEN

-- block types
local SHB, IDB, PB, SPB, EPB = 0x0A0D0D0A, 1, 2, 3, 6
local BOM = 0x1A2B3C4D
local BOM_SWAPPED = 0x4D3C2B1A

local function rd32(p, off, swap)
  local v = cast(u32p, p + off)[0]
  if swap then
    v = bswap(v)
    if v < 0 then v = v + 4294967296 end
  end
  return v
end

local function rd16(p, off, swap)
  local v = cast(u16p, p + off)[0]
  if swap then v = rshift(bswap(v), 16) end
  return v
end

local function fail(r, off, msg)
  r.error = msg
  r.error_offset = off
  return nil
end

-- lengths without an FCS of f bytes at the end of the frame (see "FCS")
local function strip_fcs(caplen, wirelen, f)
  local w = wirelen - f
  if w < 0 then w = 0 end
  if caplen > wirelen then                  -- an original length below the captured one (0 or short, from broken
    caplen = caplen - f                     -- writers): the captured bytes end with the FCS, as Wireshark reads
    if caplen < 0 then caplen = 0 end       -- them (it shows eth.fcs from them); the file's length is kept as
  elseif caplen > w then                    -- frame.len, as without an FCS
    caplen = w
  end
  return caplen, w
end

-- The FCS length of one EPB / PB from its options: epb_flags (code 2, 4 bytes; pcapng draft §4.3.1,
-- bits 5-8 = FCS length in octets, "overrides the if_fcslen option of the Interface Description
-- Block") when non-zero, else the interface's `fcs`.  pos..stop: the options (bytes of the block).
-- Every option up to opt_endofopt is checked: one that runs past the block with its padding returns -1 - its
-- offset in the block (a number either way: one result type for the caller's trace), as Wireshark refuses the
-- file there (wiretap/pcapng.c pcapng_process_options: "Not enough data to handle option of length N";
-- libpcap's sf-pcapng.c reads no EPB option at all).
-- Called only for blocks that have options, so the per-packet path of option-less EPBs has no loop.
local function block_fcs(p, pos, stop, swap, fcs)
  local flags = 0
  while pos + 4 <= stop do
    local code, olen = rd16(p, pos, swap), rd16(p, pos + 2, swap)
    local after = pos + 4 + band(olen + 3, 0x1FFFC)                -- the value padded to 4 bytes (no float modulo)
    if after > stop then return -1 - pos end
    if code == 0 then break end
    if code == 2 and olen == 4 and flags == 0 then flags = band(rshift(rd32(p, pos + 4, swap), 5), 0x0F) end
    pos = after
  end
  if flags > 0 then return flags end
  return fcs
end

-- The error of a packet block whose option at `pos` runs past the block (block_fcs).
local function option_overrun(p, pos, swap, btype)
  return ("%s option %d of %d bytes overruns the block"):format(btype == EPB and "enhanced packet block"
    or "packet block", rd16(p, pos, swap), rd16(p, pos + 2, swap))
end

---------------------------------------------------------------------------
-- classic pcap
---------------------------------------------------------------------------

local function next_pcap(r)
  if r.error then return nil end
  local off = r.offset
  local left = r.size - off
  if left <= 0 then return nil end
  local hl = r.hdrlen
  if left < hl then
    return fail(r, off, "truncated record header (" .. left .. " of " .. hl .. " bytes)")
  end
  local p = r.base + off
  local swap = r.swap
  local caplen = rd32(p, 8, swap)
  if caplen > MAX_CAPLEN then
    return fail(r, off, "caplen " .. caplen .. " exceeds the maximum " .. MAX_CAPLEN)
  end
  if caplen > left - hl then
    return fail(r, off, "truncated record: caplen " .. caplen .. " but " .. (left - hl)
      .. " bytes left")
  end
  local sec = rd32(p, 0, swap)
  local nsec = rd32(p, 4, swap) * r.tsmul
  if nsec >= 1e9 then
    local carry = floor(nsec / 1e9)
    sec, nsec = sec + carry, nsec - carry * 1e9
  end
  r.offset = off + hl + caplen
  r.packets = r.packets + 1
  local wirelen = rd32(p, 12, swap)
  if r.fcs_len > 0 then caplen, wirelen = strip_fcs(caplen, wirelen, r.fcs_len) end
  return p + hl, caplen, wirelen, sec, nsec, r.linktype, 0
end

---------------------------------------------------------------------------
-- pcapng
---------------------------------------------------------------------------

-- Parse the SHB at `off` (block type already known).  Returns an error message or nil.
local function section(r, off)
  local left = r.size - off
  if left < 28 then return "truncated section header block (" .. left .. " bytes left)" end
  local p = r.base + off
  local bom = cast(u32p, p + 8)[0]
  local swap
  if bom == BOM then swap = false
  elseif bom == BOM_SWAPPED then swap = true
  else return string.format("bad pcapng byte-order magic 0x%08x", bom) end
  local blen = rd32(p, 4, swap)
  if blen % 4 ~= 0 or blen < 28 then return "bad section header block length " .. blen end
  if blen > left then
    return "section header block length " .. blen .. " exceeds the " .. left .. " bytes left"
  end
  if rd32(p, blen - 4, swap) ~= blen then return "section header block lengths differ" end
  local major = rd16(p, 12, swap)
  if major ~= 1 then return "unsupported pcapng major version " .. major end
  r.swap = swap
  r.le = (swap ~= HOST_LE)
  r.nif = 0
  r.sections = r.sections + 1
  r.offset = off + blen
  return nil
end

-- Parse an IDB of length blen at pointer p.  Returns an error message or nil.
-- Per interface (1-based index i) the tick unit is kept as:
--   kind 1: 10^-k, k <= 9   nsec = rem * mul        (mul = 10^(9-k))
--   kind 2: 10^-k, k > 9    nsec = floor(rem / div)  (div = 10^(k-9))
--   kind 3: 2^-k            nsec = floor(rem * mul)  (mul = 1e9 / 2^k), shift = k
-- with ups = ticks per second and rem = ticks % ups.
local function interface(r, p, blen)
  if blen < 20 then return "interface description block too short (" .. blen .. ")" end
  local swap = r.swap
  local linktype = rd16(p, 8, swap)
  local snaplen = rd32(p, 12, swap)
  local kind, ups, mul, div, shift, tsoff, fcs = 1, 1e6, 1000, 1, 0, 0, 0   -- default: 10^-6
  local pos, stop = 16, blen - 4
  while pos + 4 <= stop do
    local code, olen = rd16(p, pos, swap), rd16(p, pos + 2, swap)
    if code == 0 then break end
    local padded = olen + (4 - olen % 4) % 4
    if pos + 4 + padded > stop then
      return "interface description block option " .. code .. " overruns the block"
    end
    if code == 9 and olen >= 1 then               -- if_tsresol
      local v = p[pos + 4]
      if band(v, 0x80) ~= 0 then
        local k = band(v, 0x7f)
        if k > 63 then return "if_tsresol 2^-" .. k .. " s is finer than 2^-63 s, the finest a 64-bit tick count can "
                              .. "hold a second of (libpcap and Wireshark refuse it too)" end
        kind, ups, mul, shift = 3, 2 ^ k, 1e9 / 2 ^ k, k
      else
        if v > 19 then return "if_tsresol 10^-" .. v .. " s is finer than 10^-19 s, the finest a 64-bit tick count can "
                              .. "hold a second of (libpcap and Wireshark refuse it too)" end
        ups = 10 ^ v
        if v <= 9 then kind, mul = 1, 10 ^ (9 - v) else kind, div = 2, 10 ^ (v - 9) end
      end
    elseif code == 13 and olen >= 1 then          -- if_fcslen, in bits
      fcs = rshift(p[pos + 4], 3)
    elseif code == 14 and olen == 8 then          -- if_tsoffset, int64 seconds
      local w0, w1 = rd32(p, pos + 4, swap), rd32(p, pos + 8, swap)
      local lo, hi
      if r.le then lo, hi = w0, w1 else lo, hi = w1, w0 end
      if hi >= 2147483648 then hi = hi - 4294967296 end
      tsoff = hi * 4294967296 + lo
    end
    pos = pos + 4 + padded
  end
  local i = r.nif + 1
  r.nif = i
  r.if_link[i], r.if_snap[i], r.if_kind[i], r.if_ups[i] = linktype, snaplen, kind, ups
  r.if_mul[i], r.if_div[i], r.if_shift[i], r.if_tsoff[i] = mul, div, shift, tsoff
  r.if_fcs[i] = fcs
  return nil
end

-- floor(rem * 10^9 / 2^k) for 0 <= rem < 2^k, k <= 63, exactly: rem * 10^9 needs up to 93 bits, so rem is
-- split at 2^32 (a * 2^32 + b): (a*10^9 + (b*10^9 >> 32)) is below 2^62, then the shift (see ticks_to_ts).
local function binary_nsec(rem, k)
  rem = cast(u64, rem)
  if k < 32 then return tonumber(rshift(rem * 1000000000ULL, k)) end
  local z = rshift(rem, 32) * 1000000000ULL + rshift(band(rem, 0xFFFFFFFFULL) * 1000000000ULL, 32)
  return tonumber(rshift(z, k - 32))
end

-- Convert the 64-bit tick count hi:lo of interface i (1-based) to (sec, nsec), nsec exact (rounded down).
local function ticks_to_ts(r, i, hi, lo)
  local kind, ups = r.if_kind[i], r.if_ups[i]
  local sec, nsec
  if hi < 2097152 then                       -- hi*2^32 + lo < 2^53: exact in a double
    local t = hi * 4294967296 + lo
    sec = floor(t / ups)                      -- may round up by one, never down
    local rem = t - sec * ups
    if rem < 0 then sec, rem = sec - 1, rem + ups end
    if kind == 1 then nsec = rem * r.if_mul[i]                 -- exact: below 10^9
    elseif kind == 2 then nsec = tonumber(cast(u64, rem) / cast(u64, r.if_div[i]))   -- integer division
    else nsec = binary_nsec(rem, r.if_shift[i]) end
  else                                       -- e.g. nanosecond ticks: 64-bit integers
    local t = cast(u64, hi) * 4294967296 + lo
    if kind == 3 then
      local k = r.if_shift[i]
      local s = rshift(t, k)
      sec = tonumber(s)
      nsec = binary_nsec(t - s * ups, k)
    else
      local d = cast(u64, ups)
      local s = t / d
      sec = tonumber(s)
      local rem = t - s * d
      if kind == 1 then nsec = tonumber(rem) * r.if_mul[i]
      else nsec = tonumber(rem / cast(u64, r.if_div[i])) end
    end
  end
  if nsec >= 1e9 then nsec = 999999999 end   -- rounding guard (2^-k with large k)
  return sec + r.if_tsoff[i], nsec
end

-- Checked header of the block at `off`: p, type, total length; nil at EOF or on
-- error (r.error set).  An SHB's length is checked by section() instead.
local function block_at(r, off)
  local left = r.size - off
  if left <= 0 then return nil end
  if left < 12 then
    return fail(r, off, "truncated block header (" .. left .. " bytes left)")
  end
  local p = r.base + off
  local swap = r.swap
  local btype = rd32(p, 0, swap)
  if btype == SHB then return p, btype, 0 end
  local blen = rd32(p, 4, swap)
  if blen % 4 ~= 0 or blen < 12 then
    return fail(r, off, "bad block length " .. blen .. " (block type " .. btype .. ")")
  end
  if blen > left then
    return fail(r, off, "block length " .. blen .. " exceeds the " .. left .. " bytes left")
  end
  if rd32(p, blen - 4, swap) ~= blen then
    return fail(r, off, "block lengths differ (block type " .. btype .. ")")
  end
  return p, btype, blen
end

-- Process non-packet blocks (SHB, IDB; skip the others) until a packet block:
-- returns its p, type, length, or nil.  Kept out of next_pcapng so that the
-- per-packet path has no loop (an inner loop there aborts the caller's traces).
local function skip_to_packet(r, p, btype, blen)
  while true do
    local off = r.offset
    if btype == EPB or btype == SPB or btype == PB then
      return p, btype, blen
    elseif btype == SHB then
      local err = section(r, off)
      if err then return fail(r, off, err) end
    elseif btype == IDB then
      local err = interface(r, p, blen)
      if err then return fail(r, off, err) end
      r.offset = off + blen
    else
      r.offset = off + blen                   -- ISB, NRB, custom, DSB, ...: skipped
    end
    p, btype, blen = block_at(r, r.offset)
    if not p then return nil end
  end
end

local function next_pcapng(r)
  if r.error then return nil end
  local p, btype, blen = block_at(r, r.offset)
  if not p then return nil end
  if btype ~= EPB and btype ~= SPB and btype ~= PB then
    p, btype, blen = skip_to_packet(r, p, btype, blen)
    if not p then return nil end
  end
  local off = r.offset
  local swap = r.swap
  if btype == SPB then
    if blen < 16 then return fail(r, off, "simple packet block too short (" .. blen .. ")") end
    if r.nif < 1 then return fail(r, off, "simple packet block without interface 0") end
    local wirelen = rd32(p, 8, swap)
    local caplen = blen - 16
    if wirelen < caplen then caplen = wirelen end
    local snap = r.if_snap[1]
    if snap > 0 and snap < caplen then caplen = snap end
    if caplen > MAX_CAPLEN then
      return fail(r, off, "caplen " .. caplen .. " exceeds the maximum " .. MAX_CAPLEN)
    end
    r.offset = off + blen
    r.packets = r.packets + 1
    if r.if_fcs[1] > 0 then caplen, wirelen = strip_fcs(caplen, wirelen, r.if_fcs[1]) end
    return p + 12, caplen, wirelen, r.last_sec, r.last_nsec, r.if_link[1], 0
  end
  -- EPB or obsolete PB: same layout except a 16-bit interface id in the PB
  if blen < 32 then return fail(r, off, "packet block too short (" .. blen .. ")") end
  local ifid
  if btype == EPB then ifid = rd32(p, 8, swap) else ifid = rd16(p, 8, swap) end
  if ifid >= r.nif then
    return fail(r, off, "packet block for unknown interface id " .. ifid)
  end
  local caplen = rd32(p, 20, swap)
  if caplen > MAX_CAPLEN then
    return fail(r, off, "caplen " .. caplen .. " exceeds the maximum " .. MAX_CAPLEN)
  end
  if caplen > blen - 32 then
    return fail(r, off, "caplen " .. caplen .. " exceeds the block (" .. blen .. " bytes)")
  end
  local i = ifid + 1
  local sec, nsec = ticks_to_ts(r, i, rd32(p, 12, swap), rd32(p, 16, swap))
  local fcs = r.if_fcs[i]
  local opts = 28 + caplen + (4 - caplen % 4) % 4             -- options start (after the padded data)
  if opts + 4 <= blen - 4 then
    fcs = block_fcs(p, opts, blen - 4, swap, fcs)
    if fcs < 0 then return fail(r, off, option_overrun(p, -1 - fcs, swap, btype)) end
  end
  r.last_sec, r.last_nsec = sec, nsec
  r.offset = off + blen
  r.packets = r.packets + 1
  local wirelen = rd32(p, 24, swap)
  if fcs > 0 then caplen, wirelen = strip_fcs(caplen, wirelen, fcs) end
  return p + 28, caplen, wirelen, sec, nsec, r.if_link[i], ifid
end

---------------------------------------------------------------------------
-- open
---------------------------------------------------------------------------

-- first 4 bytes read with a native load -> {swap, fraction-to-ns multiplier, record header size}
local PCAP_MAGICS = {}
local function add_magic(magic, tsmul, hdrlen)
  PCAP_MAGICS[magic] = { false, tsmul, hdrlen }
  local sw = bswap(magic)
  if sw < 0 then sw = sw + 4294967296 end
  PCAP_MAGICS[sw] = { true, tsmul, hdrlen }
end
add_magic(0xA1B2C3D4, 1000, 16)
add_magic(0xA1B23C4D, 1, 16)
add_magic(0xA1B2CD34, 1000, 24)

--- Open a capture held in memory at `addr` (number or pointer), `size` bytes.
--- Raises "offset N: message" if the file header is unusable.
function M.open(addr, size)
  size = tonumber(size)
  local r = {
    base = cast(u8p, addr), size = size, offset = 0, packets = 0,
    format = nil, error = nil, error_offset = nil, swap = false,
  }
  if size < 4 then
    error("offset 0: file too short for a capture header (" .. size .. " bytes)", 0)
  end
  local base = r.base
  local magic = cast(u32p, base)[0]
  local m = PCAP_MAGICS[magic]
  if m then
    if size < 24 then
      error("offset 0: truncated pcap file header (" .. size .. " of 24 bytes)", 0)
    end
    r.format = "pcap"
    r.swap, r.tsmul, r.hdrlen = m[1], m[2], m[3]
    r.version_major, r.version_minor = rd16(base, 4, r.swap), rd16(base, 6, r.swap)
    if r.version_major < 2 then                              -- libpcap sf-pcap.c: "archaic pcap savefile format"
      error(("offset 0: archaic pcap savefile format (version %d.%d; libpcap and Wireshark read 2.x)")
            :format(r.version_major, r.version_minor), 0)
    end
    r.snaplen = rd32(base, 16, r.swap)
    local network = rd32(base, 20, r.swap)
    r.linktype = band(network, 0x03FFFFFF)                  -- LT_LINKTYPE
    r.fcs_len = 0
    if band(network, 0x04000000) ~= 0 then                   -- LT_FCS_LENGTH_PRESENT
      r.fcs_len = rshift(network, 28) * 2                    -- LT_FCS_LENGTH, 16-bit units
    end
    r.offset = 24
    r.next = next_pcap
    return r
  end
  if magic == SHB then
    r.format = "pcapng"
    r.sections, r.nif = 0, 0
    r.if_link, r.if_snap, r.if_kind, r.if_ups = {}, {}, {}, {}
    r.if_mul, r.if_div, r.if_shift, r.if_tsoff, r.if_fcs = {}, {}, {}, {}, {}
    r.last_sec, r.last_nsec = 0, 0
    local err = section(r, 0)
    if err then error("offset 0: " .. err, 0) end
    r.next = next_pcapng
    return r
  end
  -- the bytes in file order, as `luaprobe run` names a file's magic (engine/daemon/usage.py); a compressed
  -- stream (Wireshark reads gzip / zstd / lz4 captures itself, libpcap does not) is named
  local packer = (base[0] == 0x1f and base[1] == 0x8b) and "gzip"
                 or (base[0] == 0x28 and base[1] == 0xb5 and base[2] == 0x2f and base[3] == 0xfd) and "zstd"
                 or (base[0] == 0x04 and base[1] == 0x22 and base[2] == 0x4d and base[3] == 0x18) and "lz4"
                 or (base[0] == 0xfd and base[1] == 0x37 and base[2] == 0x7a and base[3] == 0x58) and "xz"
                 or (base[0] == 0x42 and base[1] == 0x5a and base[2] == 0x68) and "bzip2" or nil
  error(string.format("offset 0: unknown file magic 0x%02x%02x%02x%02x (not pcap or pcapng)%s", base[0], base[1],
    base[2], base[3], packer and ("; it is " .. packer .. "-compressed: decompress it first") or ""), 0)
end

--- Streams (a pipe, stdin: engine/capture/capture.lua stream): bytes needed before open() can parse the
--- capture header of the `filled` bytes at addr (24 for pcap; the whole SHB for pcapng); at most `filled`
--- when enough are there or the magic is unknown (open() then reports it).
function M.header_need(addr, filled)
  if filled < 12 then return 12 end
  local p = cast(u8p, addr)
  local magic = cast(u32p, p)[0]
  if PCAP_MAGICS[magic] then return 24 end
  if magic ~= SHB then return filled end
  local bom = cast(u32p, p + 8)[0]
  if bom ~= BOM and bom ~= BOM_SWAPPED then return filled end
  local blen = rd32(p, 4, bom == BOM_SWAPPED)
  if blen < 12 or blen > 16777216 then return filled end
  return blen
end

--- Streams: the end of the complete records (pcap) or blocks (pcapng) among the first `filled` bytes of the
--- reader's buffer, from r.offset on; the walker is given only those (r.size), so a record still arriving is
--- never taken for a truncated one.  A header that can never become valid (caplen above MAX_CAPLEN, a bad
--- block length or byte-order magic) returns `filled`: the walker reports it at its offset.
function M.complete_end(r, filled)
  local base, pos = r.base, r.offset
  if r.format == "pcap" then
    local hl, swap = r.hdrlen, r.swap
    while pos + hl <= filled do
      local caplen = rd32(base + pos, 8, swap)
      if caplen > MAX_CAPLEN then return filled end
      if pos + hl + caplen > filled then break end
      pos = pos + hl + caplen
    end
    return pos
  end
  local swap = r.swap
  while pos + 12 <= filled do
    local p = base + pos
    if cast(u32p, p)[0] == SHB then
      local bom = cast(u32p, p + 8)[0]
      if bom ~= BOM and bom ~= BOM_SWAPPED then return filled end
      swap = bom == BOM_SWAPPED
    end
    local blen = rd32(p, 4, swap)
    if blen % 4 ~= 0 or blen < 12 then return filled end
    if pos + blen > filled then break end
    pos = pos + blen
  end
  return pos
end

--- Walk the whole capture in one call: packets, captured bytes, error, error offset, format.
function M.count(addr, size)
  local r = M.open(addr, size)
  local n, bytes = 0, 0
  while true do
    local ptr, caplen = r:next()
    if not ptr then break end
    n = n + 1
    bytes = bytes + caplen
  end
  return n, bytes, r.error, r.error_offset, r.format
end

return M
