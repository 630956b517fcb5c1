--[[
luaprobe.engine.capture.capture — the capture process's loop: walk a mapped capture file
with luaprobe.engine.capture.pcapfile and copy each record into the packet ring.  From
files the ring applies backpressure: when it is full the loop waits for
space, so nothing is ever lost.
]]
local ffi = require("ffi")
local ring = require("luaprobe.shm.ring")
local pcapfile = require("luaprobe.engine.capture.pcapfile")
local packet = require("luaprobe.engine.plugins.packet")

local cast, copy = ffi.cast, ffi.copy
local REC, recp = packet.REC_SIZE, packet.recp
local M = {}

local function reserve(r, n, stop)
  local p = r:reserve(n)
  while p == nil do
    r:publish()
    r:wait_space(n, 50e6)
    if stop() then return nil end
    p = r:reserve(n)
  end
  return p
end

--- Push a control record (EOF / ERROR / END) with a text payload.
function M.control(r, kind, text, stop)
  local p = reserve(r, REC + #text, stop or function() return false end)
  if p == nil then return end
  local h = cast(recp, p)
  ffi.fill(h, REC, 0)
  h.kind, h.caplen = kind, #text
  copy(p + REC, text, #text)
  r:commit()
  r:publish()
end

--- Copy every packet of one mapped file into ring `r`.  Returns packets,
--- bytes, on corruption the error message and byte offset, and true when
--- stop() ended the walk before the end of the file (checked while waiting
--- for ring space and every 4096 records).
function M.file(r, addr, size, stop)
  local rd = pcapfile.open(addr, size)
  local n, bytes, since, stopped = 0, 0, 0, false
  while true do
    if n % 4096 == 4095 and stop() then stopped = true; break end
    local ptr, caplen, wirelen, ts_sec, ts_nsec, linktype, ifindex = rd:next()
    if ptr == nil then break end
    local p = r:reserve(REC + caplen)
    if p == nil then
      p = reserve(r, REC + caplen, stop)
      if p == nil then stopped = true; break end
    end
    local h = cast(recp, p)
    h.kind, h.ts_sec, h.ts_nsec, h.wirelen, h.caplen = packet.PKT, ts_sec, ts_nsec, wirelen, caplen
    h.linktype, h.ifindex = linktype, ifindex
    copy(p + REC, ptr, caplen)
    r:commit()
    n, bytes, since = n + 1, bytes + wirelen, since + 1
    if since >= 64 then r:publish(); since = 0 end
  end
  r:publish()
  return n, bytes, rd.error, rd.error_offset, stopped
end

return M
